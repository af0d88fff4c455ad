"""Qwen-Image VAE (AutoencoderKLQwenImage, Wan-2.1 style) for single images, in plain torch.

The published checkpoint is a causal *video* VAE. For one frame every causal 3x3x3
convolution sees two zero frames in front of the image, so only the last temporal slice of
its kernel touches data: it is exactly a 2D convolution with `weight[:, :, -1]`. The temporal
resample convolutions (`time_conv`) act from the second frame on and never run for an image.
The modules here keep the on-disk parameter names and shapes (5-D conv weights, `*.gamma`
norm weights, the unused `time_conv` weights) so the diffusers checkpoint loads as it is,
while the forwards run on (B, C, H, W) tensors.

Layout of the state dict (identical to diffusers):
  encoder.conv_in, encoder.down_blocks.N (residual | attention | resample), encoder.mid_block,
  encoder.norm_out, encoder.conv_out, quant_conv, post_quant_conv, decoder.conv_in,
  decoder.mid_block, decoder.up_blocks.N.{resnets.M, upsamplers.0}, decoder.norm_out,
  decoder.conv_out.
"""
from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, fields
from typing import Any, Callable, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

logger = logging.getLogger(__name__)

LATENTS_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)
LATENTS_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)

# The checkpoint's key grammar: exact, so that the Qwen-Image 2.1 VAE's file (the same head and
# mid-block names, but `down_blocks.N.resnets.M`, `downsampler`, `upsampler`) is not claimed.
_RES = r"(norm1|norm2)\.gamma|(conv1|conv2|conv_shortcut)\.(weight|bias)"
_ATTN = r"norm\.gamma|(to_qkv|proj)\.(weight|bias)"
_RESAMPLE = r"(resample\.1|time_conv)\.(weight|bias)"
_KEY = re.compile(
    r"(post_)?quant_conv\.(weight|bias)"
    r"|(encoder|decoder)\.(conv_in\.(weight|bias)|norm_out\.gamma|conv_out\.(weight|bias))"
    rf"|(encoder|decoder)\.mid_block\.(resnets\.\d+\.({_RES})|attentions\.\d+\.({_ATTN}))"
    rf"|encoder\.down_blocks\.\d+\.({_RES}|{_ATTN}|{_RESAMPLE})"
    rf"|decoder\.up_blocks\.\d+\.(resnets\.\d+\.({_RES})|upsamplers\.0\.{_RESAMPLE})"
)


@dataclass
class QwenImageVAEParams:
    base_dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_scales: tuple[float, ...] = ()
    temperal_downsample: tuple[bool, ...] = (False, True, True)  # diffusers' spelling
    input_channels: int = 3
    latents_mean: tuple[float, ...] = LATENTS_MEAN
    latents_std: tuple[float, ...] = LATENTS_STD

    def __post_init__(self) -> None:
        self.dim_mult = tuple(int(m) for m in self.dim_mult)
        self.attn_scales = tuple(float(s) for s in self.attn_scales)
        self.temperal_downsample = tuple(bool(t) for t in self.temperal_downsample)
        self.latents_mean = tuple(float(v) for v in self.latents_mean)
        self.latents_std = tuple(float(v) for v in self.latents_std)
        if not self.dim_mult:
            raise ValueError("QwenImageVAEParams.dim_mult must not be empty")
        if len(self.temperal_downsample) != len(self.dim_mult) - 1:
            raise ValueError(
                f"QwenImageVAEParams.temperal_downsample has {len(self.temperal_downsample)} entries, "
                f"dim_mult {self.dim_mult} needs {len(self.dim_mult) - 1} (one per downsample)"
            )
        for name in ("latents_mean", "latents_std"):
            values = getattr(self, name)
            if len(values) != self.z_dim:
                raise ValueError(
                    f"QwenImageVAEParams.{name} has {len(values)} values but z_dim is {self.z_dim}; "
                    f"give {name} with {self.z_dim} values (config.json of the VAE)"
                )
        if any(s <= 0 for s in self.latents_std):
            raise ValueError("QwenImageVAEParams.latents_std must be positive")

    @property
    def scale_factor(self) -> int:
        """Spatial compression: image pixels per latent pixel along each axis."""
        return 2 ** (len(self.dim_mult) - 1)


# ----------------------------------------------------------------------------- layers


class CausalConv3d(nn.Conv3d):
    """A causal 3D convolution applied to a single frame.

    A subclass of nn.Conv3d so that its parameters are the on-disk (out, in, kt, kh, kw)
    tensors and outside code that wraps layers (VRAM management, LoRA) sees a standard
    convolution layer. The forward takes (B, C, H, W): with the time padding all in front,
    only the last temporal slice of the kernel meets the frame, so it is a 2D convolution with
    `weight[:, :, -1]`. Wrappers must call this module's forward (not re-implement conv3d).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int, int],
                 stride: int | tuple[int, int, int] = 1, padding: int = 0) -> None:
        # spatial padding is symmetric; the temporal padding (2*p in front) is implicit
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=(0, padding, padding))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(f"CausalConv3d expects one frame as (B, C, H, W), got shape {tuple(x.shape)}")
        return F.conv2d(x, self.weight[:, :, -1], self.bias, self.stride[1:], self.padding[1:])


class RMSNorm(nn.Module):
    """`normalize(x, dim=channels) * sqrt(C) * gamma`. gamma keeps its on-disk shape:
    (C, 1, 1, 1) in residual blocks and heads, (C, 1, 1) in attention blocks."""

    def __init__(self, dim: int, gamma_dims: int) -> None:
        super().__init__()
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones((dim,) + (1,) * gamma_dims))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the channel norm is reduced in float32 without a float32 copy of x
        norm = torch.linalg.vector_norm(x, dim=1, keepdim=True, dtype=torch.float32)
        inv = norm.clamp_min_(1e-12).reciprocal_().to(x.dtype)
        return (x * inv).mul_(self.gamma.reshape(1, -1, 1, 1) * self.scale)


class ResidualBlock(nn.Module):
    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.norm1 = RMSNorm(in_dim, gamma_dims=3)
        self.conv1 = CausalConv3d(in_dim, out_dim, 3, padding=1)
        self.norm2 = RMSNorm(out_dim, gamma_dims=3)
        self.conv2 = CausalConv3d(out_dim, out_dim, 3, padding=1)
        self.conv_shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = self.conv_shortcut(x)
        x = self.conv1(F.silu(self.norm1(x), inplace=True))
        x = self.conv2(F.silu(self.norm2(x), inplace=True))
        return x.add_(shortcut)


class AttentionBlock(nn.Module):
    """Single-head self-attention over all pixels; the channels are the head dimension."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = RMSNorm(dim, gamma_dims=2)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        qkv = self.to_qkv(self.norm(x))                                     # (b, 3c, h, w)
        qkv = qkv.reshape(b, 3 * c, h * w).transpose(1, 2).contiguous()     # (b, hw, 3c)
        q, k, v = qkv.unsqueeze(1).chunk(3, dim=-1)                         # (b, 1, hw, c) each
        out = F.scaled_dot_product_attention(q, k, v)
        del qkv, q, k, v
        out = out.squeeze(1).transpose(1, 2).reshape(b, c, h, w)
        return self.proj(out).add_(x)


class Resample(nn.Module):
    """Spatial down/up-sampling. `time_conv` (modes *3d) exists for the checkpoint's keys only:
    it acts on the second frame onward, never on a single image."""

    MODES = ("downsample2d", "downsample3d", "upsample2d", "upsample3d")

    def __init__(self, dim: int, mode: str) -> None:
        super().__init__()
        if mode not in self.MODES:
            raise ValueError(f"Resample mode must be one of {self.MODES}, got {mode!r}")
        self.mode = mode
        if mode.startswith("down"):
            # pad right/bottom by one, then a stride-2 conv: H -> H/2
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2))
        else:
            # nearest x2 (exact copies, any dtype), then a conv halving the channels
            self.resample = nn.Sequential(nn.Upsample(scale_factor=2.0, mode="nearest-exact"),
                                          nn.Conv2d(dim, dim // 2, 3, padding=1))
        if mode == "downsample3d":
            self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1))
        elif mode == "upsample3d":
            self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resample(x)


class MidBlock(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.resnets = nn.ModuleList([ResidualBlock(dim, dim), ResidualBlock(dim, dim)])
        self.attentions = nn.ModuleList([AttentionBlock(dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        for attention, resnet in zip(self.attentions, self.resnets[1:]):
            x = resnet(attention(x))
        return x


class Encoder(nn.Module):
    def __init__(self, p: QwenImageVAEParams) -> None:
        super().__init__()
        dims = [p.base_dim * m for m in (1,) + p.dim_mult]
        self.conv_in = CausalConv3d(p.input_channels, dims[0], 3, padding=1)

        # one flat list, as on disk: per stage the residual blocks (each followed by an
        # attention block where the stage's scale is in attn_scales), then a downsample
        blocks: list[nn.Module] = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            with_attention = 1.0 / 2**i in p.attn_scales
            for _ in range(p.num_res_blocks):
                blocks.append(ResidualBlock(in_dim, out_dim))
                if with_attention:
                    blocks.append(AttentionBlock(out_dim))
                in_dim = out_dim
            if i < len(p.dim_mult) - 1:
                blocks.append(Resample(out_dim, "downsample3d" if p.temperal_downsample[i] else "downsample2d"))
        self.down_blocks = nn.ModuleList(blocks)

        self.mid_block = MidBlock(dims[-1])
        self.norm_out = RMSNorm(dims[-1], gamma_dims=3)
        self.conv_out = CausalConv3d(dims[-1], 2 * p.z_dim, 3, padding=1)  # posterior mean, logvar

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(F.silu(self.norm_out(x), inplace=True))


class UpBlock(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, num_res_blocks: int, upsample_mode: str | None) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(
            [ResidualBlock(in_dim if j == 0 else out_dim, out_dim) for j in range(num_res_blocks + 1)]
        )
        self.upsamplers = nn.ModuleList([Resample(out_dim, upsample_mode)]) if upsample_mode else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


class Decoder(nn.Module):
    def __init__(self, p: QwenImageVAEParams) -> None:
        super().__init__()
        dims = [p.base_dim * m for m in (p.dim_mult[-1],) + p.dim_mult[::-1]]
        temperal_upsample = p.temperal_downsample[::-1]
        self.conv_in = CausalConv3d(p.z_dim, dims[0], 3, padding=1)
        self.mid_block = MidBlock(dims[0])

        blocks = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            if i > 0:
                in_dim //= 2  # every upsample conv halves the channels
            mode = None
            if i < len(p.dim_mult) - 1:
                mode = "upsample3d" if temperal_upsample[i] else "upsample2d"
            blocks.append(UpBlock(in_dim, out_dim, p.num_res_blocks, mode))
        self.up_blocks = nn.ModuleList(blocks)

        self.norm_out = RMSNorm(dims[-1], gamma_dims=3)
        self.conv_out = CausalConv3d(dims[-1], p.input_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(z)
        x = self.mid_block(x)
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.norm_out(x), inplace=True))


# ----------------------------------------------------------------------------- tiling


def _tile_starts(size: int, tile: int, stride: int) -> list[int]:
    """Evenly spaced starts of tiles of length `tile` covering [0, size), step <= stride."""
    if size <= tile:
        return [0]
    n = math.ceil((size - tile) / stride) + 1
    return [i * (size - tile) // (n - 1) for i in range(n)]


def _tile_weights(starts: list[int], length: int, scale: int, device: torch.device) -> list[torch.Tensor]:
    """1-D blend weights (in output pixels) for each tile: linear ramps over the overlap
    with each neighbour, so that two overlapping tiles' weights sum to one there."""
    weights = []
    for i, start in enumerate(starts):
        w = torch.ones(length * scale, dtype=torch.float32, device=device)
        if i > 0:
            overlap = (starts[i - 1] + length - start) * scale
            if overlap > 0:
                ramp = torch.arange(1, overlap + 1, dtype=torch.float32, device=device) / (overlap + 1)
                w[:overlap] = torch.minimum(w[:overlap], ramp)
        if i < len(starts) - 1:
            overlap = (start + length - starts[i + 1]) * scale
            if overlap > 0:
                ramp = torch.arange(overlap, 0, -1, dtype=torch.float32, device=device) / (overlap + 1)
                w[-overlap:] = torch.minimum(w[-overlap:], ramp)
        weights.append(w)
    return weights


def tiled_map(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, grid_size: tuple[int, int],
              tile_size: int, tile_stride: int, in_scale: int, out_scale: int) -> torch.Tensor:
    """Apply `fn` to overlapping tiles of `x` and blend the results with linear ramps.

    Tiles are laid on a grid of `grid_size` = (h, w) cells (latent pixels); one cell is
    `in_scale` pixels of `x` and `out_scale` pixels of the output of `fn`. Tiles are
    `tile_size` cells, at most `tile_stride` cells apart, the last one flush with the edge.
    Returns the blended output in float32 (B, C_out, h * out_scale, w * out_scale).
    """
    if tile_size < 1 or not 0 < tile_stride <= tile_size:
        raise ValueError(f"tiling needs tile_size >= 1 and 0 < tile_stride <= tile_size, "
                         f"got tile_size={tile_size}, tile_stride={tile_stride}")
    h, w = grid_size
    th, tw = min(tile_size, h), min(tile_size, w)
    rows, cols = _tile_starts(h, th, tile_stride), _tile_starts(w, tw, tile_stride)
    row_w = _tile_weights(rows, th, out_scale, x.device)
    col_w = _tile_weights(cols, tw, out_scale, x.device)

    out: torch.Tensor | None = None
    weight_sum = torch.zeros(h * out_scale, w * out_scale, dtype=torch.float32, device=x.device)
    for r, wr in zip(rows, row_w):
        for c, wc in zip(cols, col_w):
            tile = x[:, :, r * in_scale:(r + th) * in_scale, c * in_scale:(c + tw) * in_scale]
            y = fn(tile)
            if out is None:
                out = torch.zeros(y.shape[0], y.shape[1], h * out_scale, w * out_scale,
                                  dtype=torch.float32, device=y.device)
            ys, xs = slice(r * out_scale, (r + th) * out_scale), slice(c * out_scale, (c + tw) * out_scale)
            if y.shape[-2:] != (th * out_scale, tw * out_scale):
                raise ValueError(f"tile function returned spatial size {tuple(y.shape[-2:])}, "
                                 f"expected {(th * out_scale, tw * out_scale)}")
            blend = wr[:, None] * wc[None, :]
            out[:, :, ys, xs].addcmul_(y.float(), blend)
            weight_sum[ys, xs] += blend
            del y
    assert out is not None
    return out.div_(weight_sum)


# ----------------------------------------------------------------------------- the model


class QwenImageVAE(nn.Module):
    """Qwen-Image VAE for images: `encode` (B, 3, H, W) in [-1, 1] -> normalised latents
    (B, z_dim, H/8, W/8); `decode` the reverse. The state dict is diffusers' layout."""

    CHECKPOINT_REQUIRED_KEYS: tuple[str, ...] = (
        "encoder.conv_in.weight",
        "encoder.down_blocks.0.norm1.gamma",
        "encoder.mid_block.attentions.0.to_qkv.weight",
        "quant_conv.weight",
        "post_quant_conv.weight",
        "decoder.conv_in.weight",
        "decoder.up_blocks.0.resnets.0.norm1.gamma",
        "decoder.conv_out.weight",
    )

    def __init__(self, params: QwenImageVAEParams | None = None) -> None:
        super().__init__()
        self.params = params or QwenImageVAEParams()
        self.encoder = Encoder(self.params)
        self.quant_conv = CausalConv3d(2 * self.params.z_dim, 2 * self.params.z_dim, 1)
        self.post_quant_conv = CausalConv3d(self.params.z_dim, self.params.z_dim, 1)
        self.decoder = Decoder(self.params)
        # Override the computation dtype/device (default: those of the weights), e.g. when
        # outside code keeps the weights in another precision or place than the compute.
        self.compute_dtype: torch.dtype | None = None
        self.compute_device: torch.device | None = None

    # ------------------------------------------------------------------ checkpoint contract

    @staticmethod
    def owns_checkpoint_key(key: str) -> bool:
        return _KEY.fullmatch(key) is not None

    @staticmethod
    def convert_checkpoint_key(key: str) -> str | None:
        return key  # diffusers' names are ours

    @classmethod
    def from_checkpoint(cls, shapes: Mapping[str, tuple[int, ...]],
                        config: dict[str, Any] | None = None) -> "QwenImageVAE":
        # every key and shape is then checked by the loader, which names the file
        return cls(cls.params_from_checkpoint(shapes, config))

    @staticmethod
    def params_from_checkpoint(shapes: Mapping[str, tuple[int, ...]],
                               config: dict[str, Any] | None = None) -> QwenImageVAEParams:
        """Params from a checkpoint's shapes; a diffusers config.json dict wins where given.
        latents_mean/std come from the config, else they are Qwen-Image's."""
        overrides = _params_from_config(config or {})
        arch = {"base_dim", "z_dim", "dim_mult", "num_res_blocks", "attn_scales",
                "temperal_downsample", "input_channels"}
        values = {} if arch <= overrides.keys() else _arch_from_shapes(shapes)
        values.update(overrides)
        return QwenImageVAEParams(**values)

    # ------------------------------------------------------------------ inference

    def _compute(self) -> tuple[torch.dtype, torch.device]:
        weight = self.encoder.conv_in.weight
        return self.compute_dtype or weight.dtype, self.compute_device or weight.device

    def _latent_stats(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        mean = torch.tensor(self.params.latents_mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        std = torch.tensor(self.params.latents_std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        return mean, std

    def _encode_moments(self, image: torch.Tensor) -> torch.Tensor:
        """Posterior [mean, logvar] stacked on channels, not normalised."""
        return self.quant_conv(self.encoder(image))

    def _decode_raw(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z))

    @torch.no_grad()
    def encode(self, image: torch.Tensor, tiled: bool = False, tile_size: int = 128,
               tile_stride: int = 64, generator: torch.Generator | None = None) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> normalised latents (B, z_dim, H/8, W/8), float32: the
        posterior mean, or with `generator` a posterior sample mean + std * noise (the noise
        drawn in float32 from `generator`, as diffusers' image-to-image does).
        tile_size/tile_stride are in latent pixels (x8 image pixels)."""
        p, f = self.params, self.params.scale_factor
        if image.dim() != 4 or image.shape[1] != p.input_channels:
            raise ValueError(f"QwenImageVAE.encode expects an image batch (B, {p.input_channels}, H, W), "
                             f"got shape {tuple(image.shape)}")
        height, width = image.shape[-2:]
        if height % f or width % f:
            raise ValueError(f"QwenImageVAE.encode: height and width must be multiples of {f}, "
                             f"got {height}x{width}")
        dtype, device = self._compute()
        x = image.to(device=device, dtype=dtype)
        grid = (height // f, width // f)
        if tiled and (grid[0] > tile_size or grid[1] > tile_size):
            moments = tiled_map(self._encode_moments, x, grid, tile_size, tile_stride, in_scale=f, out_scale=1)
        else:
            moments = self._encode_moments(x).float()
        mean, logvar = moments[:, : p.z_dim].contiguous(), moments[:, p.z_dim :]
        if generator is not None:
            noise = torch.randn(mean.shape, generator=generator, device=generator.device, dtype=torch.float32)
            mean += torch.exp(0.5 * logvar.clamp(-30.0, 20.0)) * noise.to(mean.device)
        latents_mean, latents_std = self._latent_stats(mean.device)
        return mean.sub_(latents_mean).div_(latents_std)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, tiled: bool = False, tile_size: int = 128,
               tile_stride: int = 64) -> torch.Tensor:
        """Normalised latents (B, z_dim, h, w) -> image (B, 3, 8h, 8w) in [-1, 1], float32.
        tile_size/tile_stride are in latent pixels."""
        p, f = self.params, self.params.scale_factor
        if latents.dim() != 4 or latents.shape[1] != p.z_dim:
            raise ValueError(f"QwenImageVAE.decode expects latents (B, {p.z_dim}, h, w), "
                             f"got shape {tuple(latents.shape)}")
        dtype, device = self._compute()
        latents_mean, latents_std = self._latent_stats(device)
        z = (latents.to(device=device, dtype=torch.float32) * latents_std + latents_mean).to(dtype)
        grid = tuple(z.shape[-2:])
        if tiled and (grid[0] > tile_size or grid[1] > tile_size):
            image = tiled_map(self._decode_raw, z, grid, tile_size, tile_stride, in_scale=1, out_scale=f)
        else:
            image = self._decode_raw(z).float()
        return image.clamp_(-1.0, 1.0)


# ----------------------------------------------------------------------------- checkpoint helpers


def _params_from_config(config: Mapping[str, Any]) -> dict[str, Any]:
    known = {f.name for f in fields(QwenImageVAEParams)}
    values = {}
    for key, value in config.items():
        if key in known:
            values[key] = tuple(value) if isinstance(value, (list, tuple)) else value
        elif not key.startswith("_") and key != "dropout":
            logger.warning("QwenImageVAE: config key %r is not used", key)
    return values


def _shape(shapes: Mapping[str, tuple[int, ...]], key: str, ndim: int) -> tuple[int, ...]:
    if key not in shapes:
        raise ValueError(f"QwenImageVAE checkpoint lacks the key {key!r}; is this a Qwen-Image "
                         f"(AutoencoderKLQwenImage) VAE file?")
    shape = tuple(shapes[key])
    if len(shape) != ndim:
        raise ValueError(f"QwenImageVAE checkpoint key {key!r} has shape {shape}, expected {ndim} dimensions")
    return shape


def _arch_from_shapes(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
    """Infer the architecture fields of QwenImageVAEParams from the checkpoint's shapes."""
    base_dim, input_channels = _shape(shapes, "encoder.conv_in.weight", 5)[:2]
    z_dim = _shape(shapes, "post_quant_conv.weight", 5)[0]
    quant = _shape(shapes, "quant_conv.weight", 5)[0]
    if quant != 2 * z_dim:
        raise ValueError(f"QwenImageVAE checkpoint: 'quant_conv.weight' has {quant} output channels but "
                         f"'post_quant_conv.weight' implies z_dim {z_dim} (expected {2 * z_dim})")

    prefix = "encoder.down_blocks."
    indices = sorted({int(k[len(prefix):].split(".")[0]) for k in shapes if k.startswith(prefix)})
    if indices != list(range(len(indices))) or not indices:
        raise ValueError(f"QwenImageVAE checkpoint: encoder.down_blocks indices {indices} are not 0..N-1")

    # walk the flat block list; a resample closes a stage
    stages: list[dict[str, Any]] = [{"res": [], "attn": 0}]
    temporal: list[bool] = []
    for i in indices:
        block = f"{prefix}{i}."
        if block + "conv1.weight" in shapes:
            stages[-1]["res"].append((block + "conv1.weight", _shape(shapes, block + "conv1.weight", 5)[0]))
        elif block + "to_qkv.weight" in shapes:
            stages[-1]["attn"] += 1
        elif block + "resample.1.weight" in shapes:
            temporal.append(block + "time_conv.weight" in shapes)
            stages.append({"res": [], "attn": 0})
        else:
            raise ValueError(f"QwenImageVAE checkpoint: cannot tell what kind of block {block[:-1]!r} is "
                             f"(no conv1, to_qkv or resample.1 weight)")

    num_res_blocks = len(stages[0]["res"])
    dim_mult, attn_scales = [], []
    for s, stage in enumerate(stages):
        if len(stage["res"]) != num_res_blocks or num_res_blocks == 0:
            raise ValueError(f"QwenImageVAE checkpoint: encoder stage {s} has {len(stage['res'])} residual "
                             f"blocks, stage 0 has {num_res_blocks}")
        if stage["attn"] not in (0, num_res_blocks):
            raise ValueError(f"QwenImageVAE checkpoint: encoder stage {s} has {stage['attn']} attention "
                             f"blocks, expected 0 or {num_res_blocks}")
        key, out_dim = stage["res"][0]
        if out_dim % base_dim:
            raise ValueError(f"QwenImageVAE checkpoint: {key!r} has {out_dim} output channels, "
                             f"not a multiple of base_dim {base_dim} ('encoder.conv_in.weight')")
        dim_mult.append(out_dim // base_dim)
        if stage["attn"]:
            attn_scales.append(1.0 / 2**s)
    return {"base_dim": base_dim, "z_dim": z_dim, "dim_mult": tuple(dim_mult), "num_res_blocks": num_res_blocks,
            "attn_scales": tuple(attn_scales), "temperal_downsample": tuple(temporal),
            "input_channels": input_channels}
