"""Qwen-Image 2.1 VAE (diffusers' AutoencoderKLQwenImage21) for single images, in plain torch.

What it does for the 2.1 pipeline (the contract):
  encode: (B, in_channels, H, W), RGBA with straight (not premultiplied) alpha, every channel in
          [-1, 1] (pixel / 127.5 - 1; an RGB picture is given alpha 255 -> 1.0 first), H and W
          multiples of 16 -> normalised latents (B, z_dim, H/16, W/16), float32: the posterior
          mean (diffusers' `sample_mode="argmax"`), then (mean - latents_mean) / latents_std.
          Each reference picture is encoded on its own in the pipeline (batch 1); a batch works.
  decode: normalised latents (B, z_dim, h, w) -> (B, out_channels, 16h, 16w) RGBA in [-1, 1],
          float32, clamped: latents * latents_std + latents_mean, then the decoder. The picture
          is `((x / 2 + 0.5).clamp(0, 1) * 255).round()` per channel, channel 3 the alpha.
  `params.scale_factor` (16), `params.z_dim` (64); `tiled=True` decodes/encodes overlapping
  tiles blended with linear ramps (the 1.x VAE's `tiled_map`, not diffusers' tiled_encode/decode;
  off by default, sizes in latent pixels).

The architecture is Wan-2.2-style (`is_residual`): each encoder stage is residual blocks plus a
downsample, added to a parameter-free shortcut that averages space (and time) to depth; each
decoder stage the reverse with a shortcut that duplicates depth to space. The decoder is wider
than the encoder (`decoder_base_dim`). diffusers' checkpoint is already the image specialisation
of the causal video VAE: its "causal 3D" convolutions are 2D convolutions with 4-D weights, and
for the one frame of an image:
  - a temporal downsample shortcut sees one zero frame in front of the image (the time axis is
    padded to a multiple of 2), so half of what it averages is zero;
  - a temporal upsample shortcut duplicates the frame and keeps the last copy (`first_chunk`);
  - the `time_conv` of a temporal down/upsample acts from the second frame on: never run here,
    its weights are kept so that the checkpoint loads as it is.
This file runs every layer on (B, C, H, W); parity with diffusers is the proof (tests/test_vae_21.py).
Only the published layout is built: `is_residual=True`, no `patch_size` (refused otherwise).

Layout of the state dict (identical to diffusers):
  encoder.conv_in, encoder.down_blocks.N.{resnets.M, downsampler.{resample.1, time_conv}},
  encoder.mid_block, encoder.norm_out, encoder.conv_out, quant_conv, post_quant_conv,
  decoder.conv_in, decoder.mid_block, decoder.up_blocks.N.{resnets.M, upsampler.{resample.1,
  time_conv}}, decoder.norm_out, decoder.conv_out.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, fields
from typing import Any, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from .qwen_image_vae import AttentionBlock, RMSNorm, tiled_map

logger = logging.getLogger(__name__)

# the published model's latent statistics (diffusers' AutoencoderKLQwenImage21 defaults)
LATENTS_MEAN = (
    0.5126, 0.7721, -0.0631, 1.3506, -0.7855, -2.1025, -0.3458, 1.3722, 1.8873, -1.7177, -0.6510, 0.2732, 0.7562,
    -0.6163, -1.0277, 3.8363, 2.0210, 0.0472, 0.9320, 2.0087, 2.4954, -0.1391, -1.4249, 1.8464, -0.5236, 1.2826,
    3.7046, -1.3035, 2.7286, -1.4518, -1.9036, -1.9955, -0.0342, -1.0265, -0.7636, 3.0555, 0.0746, -3.0751,
    -0.1076, 1.7376, -1.0914, -1.9435, -0.2784, -1.3680, 0.4809, -0.4433, 0.3764, 0.5729, -2.0595, 1.0960,
    -1.3260, -2.0211, -5.0179, 0.5275, 4.0162, 1.8505, 0.3026, 1.9373, 1.4937, 0.2632, 0.5547, -1.7121, -0.1562,
    0.0304,
)
LATENTS_STD = (
    3.2001, 3.2936, 3.4321, 3.0091, 3.1061, 4.0379, 4.0705, 3.7910, 3.0785, 3.6500, 3.9308, 3.0904, 2.8778,
    3.7675, 3.7320, 5.0756, 3.2864, 4.0397, 3.1317, 4.0443, 2.9249, 3.9454, 3.0988, 4.2489, 3.4896, 3.8513,
    3.9323, 3.4719, 3.7498, 4.2830, 3.5694, 4.2467, 3.9037, 3.2947, 5.0770, 3.5075, 3.2700, 3.4767, 2.8063,
    5.1125, 3.5327, 4.7833, 3.1286, 4.1819, 3.8527, 3.8312, 3.5605, 4.3875, 3.9624, 4.0168, 3.5643, 4.0550,
    5.5614, 4.2963, 4.4080, 3.4959, 3.8747, 3.7608, 3.5735, 3.1490, 3.7662, 3.6746, 3.4563, 3.8161,
)

# The checkpoint's key grammar. The 1.x VAE shares the head, mid-block and decoder-resnet names;
# the encoder stages (`down_blocks.N.resnets.M`, `downsampler`) and `upsampler` are 2.1's alone.
_RES = r"(norm1|norm2)\.gamma|(conv1|conv2|conv_shortcut)\.(weight|bias)"
_ATTN = r"norm\.gamma|(to_qkv|proj)\.(weight|bias)"
_RESAMPLE = r"(resample\.1|time_conv)\.(weight|bias)"
_KEY = re.compile(
    r"(post_)?quant_conv\.(weight|bias)"
    r"|(encoder|decoder)\.(conv_in\.(weight|bias)|norm_out\.gamma|conv_out\.(weight|bias))"
    rf"|(encoder|decoder)\.mid_block\.(resnets\.\d+\.({_RES})|attentions\.\d+\.({_ATTN}))"
    rf"|encoder\.down_blocks\.\d+\.(resnets\.\d+\.({_RES})|downsampler\.{_RESAMPLE})"
    rf"|decoder\.up_blocks\.\d+\.(resnets\.\d+\.({_RES})|upsampler\.{_RESAMPLE})"
)
# config.json keys that are not params: nothing an image model builds differently (dropout; attention
# scales, which the residual layout ignores; time; diffusers' tiling factor, which it does not check
# against dim_mult either), or checked on their own
_OTHER_CONFIG = {"dropout", "attn_scales", "scale_factor_temporal", "is_residual", "patch_size",
                 "scale_factor_spatial"}


@dataclass
class QwenImage21VAEParams:
    base_dim: int = 96
    decoder_base_dim: int | None = 144  # None: base_dim (diffusers' rule)
    z_dim: int = 64
    dim_mult: tuple[int, ...] = (1, 2, 4, 8, 8)
    num_res_blocks: int = 2
    temperal_downsample: tuple[bool, ...] = (False, True, True, True)  # diffusers' spelling
    in_channels: int = 4
    out_channels: int = 4
    latents_mean: tuple[float, ...] = LATENTS_MEAN
    latents_std: tuple[float, ...] = LATENTS_STD

    def __post_init__(self) -> None:
        if self.decoder_base_dim is None:
            self.decoder_base_dim = self.base_dim
        self.dim_mult = tuple(int(m) for m in self.dim_mult)
        self.temperal_downsample = tuple(bool(t) for t in self.temperal_downsample)
        self.latents_mean = tuple(float(v) for v in self.latents_mean)
        self.latents_std = tuple(float(v) for v in self.latents_std)
        where = "QwenImage21VAEParams"
        if not self.dim_mult or min(self.dim_mult + (self.base_dim, self.decoder_base_dim, self.num_res_blocks)) < 1:
            raise ValueError(f"{where}: base_dim, decoder_base_dim, num_res_blocks and dim_mult {self.dim_mult} "
                             f"must be positive")
        if len(self.temperal_downsample) != len(self.dim_mult) - 1:
            raise ValueError(f"{where}.temperal_downsample has {len(self.temperal_downsample)} entries, dim_mult "
                             f"{self.dim_mult} needs {len(self.dim_mult) - 1} (one per downsample)")
        for name in ("latents_mean", "latents_std"):
            if len(getattr(self, name)) != self.z_dim:
                raise ValueError(f"{where}.{name} has {len(getattr(self, name))} values but z_dim is {self.z_dim}; "
                                 f"give {name} with {self.z_dim} values (config.json of the VAE)")
        if any(s <= 0 for s in self.latents_std):
            raise ValueError(f"{where}.latents_std must be positive")
        for stage in self.encoder_stages() + self.decoder_stages():
            stage.check()

    @property
    def scale_factor(self) -> int:
        """Spatial compression: image pixels per latent pixel along each axis (16)."""
        return 2 ** (len(self.dim_mult) - 1)

    def encoder_stages(self) -> list["Stage"]:
        dims = [self.base_dim * m for m in (1,) + self.dim_mult]
        last = len(self.dim_mult) - 1
        return [Stage(i, "encoder", dims[i], dims[i + 1], i < last, i < last and self.temperal_downsample[i])
                for i in range(len(self.dim_mult))]

    def decoder_stages(self) -> list["Stage"]:
        dims = [self.decoder_base_dim * m for m in (self.dim_mult[-1],) + self.dim_mult[::-1]]
        temporal, last = self.temperal_downsample[::-1], len(self.dim_mult) - 1
        return [Stage(i, "decoder", dims[i], dims[i + 1], i < last, i < last and temporal[i])
                for i in range(len(self.dim_mult))]


@dataclass
class Stage:
    """One encoder (down) or decoder (up) stage: its channels and whether it resamples space/time."""
    index: int
    side: str
    in_dim: int
    out_dim: int
    spatial: bool
    temporal: bool

    def check(self) -> None:
        # the shortcut regroups in_dim * factor values into out_dim channels (or the reverse)
        if self.side == "decoder" and not self.spatial:
            return  # a decoder stage without upsampling has no shortcut
        factor = (2 if self.temporal else 1) * (4 if self.spatial else 1)
        big, small = (self.in_dim * factor, self.out_dim) if self.side == "encoder" else \
            (self.out_dim * factor, self.in_dim)
        if big % small:
            raise ValueError(f"QwenImage21VAEParams: {self.side} stage {self.index} goes from {self.in_dim} to "
                             f"{self.out_dim} channels with a resampling factor {factor}: its shortcut needs "
                             f"{big} divisible by {small}; check base_dim, decoder_base_dim and dim_mult")


# ----------------------------------------------------------------------------- layers


def conv3x3(in_dim: int, out_dim: int) -> nn.Conv2d:
    """diffusers' `QwenImage21CausalConv3d(in, out, 3, padding=1)`: zero padding 1, a 2D convolution."""
    return nn.Conv2d(in_dim, out_dim, 3, padding=1)


class ResidualBlock(nn.Module):
    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.norm1 = RMSNorm(in_dim, gamma_dims=3)
        self.conv1 = conv3x3(in_dim, out_dim)
        self.norm2 = RMSNorm(out_dim, gamma_dims=3)
        self.conv2 = conv3x3(out_dim, out_dim)
        self.conv_shortcut = nn.Conv2d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = self.conv_shortcut(x)
        x = self.conv1(F.silu(self.norm1(x), inplace=True))
        x = self.conv2(F.silu(self.norm2(x), inplace=True))
        return x.add_(shortcut)


class MidBlock(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.resnets = nn.ModuleList([ResidualBlock(dim, dim), ResidualBlock(dim, dim)])
        self.attentions = nn.ModuleList([AttentionBlock(dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resnets[1](self.attentions[0](self.resnets[0](x)))


class Resample(nn.Module):
    """Spatial x2 down- or upsampling. `time_conv` (temporal stages) is in the checkpoint but acts
    from the second frame on: an image never runs it."""

    def __init__(self, dim: int, down: bool, temporal: bool) -> None:
        super().__init__()
        if down:  # pad right/bottom by one, then a stride-2 conv: H -> H/2
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2))
        else:  # nearest x2 (exact copies, any dtype), then a conv keeping the channels
            self.resample = nn.Sequential(nn.Upsample(scale_factor=2.0, mode="nearest-exact"), conv3x3(dim, dim))
        if temporal:
            self.time_conv = nn.Conv2d(dim, dim if down else 2 * dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resample(x)


class SpaceToDepthMean(nn.Module):
    """The encoder stage's shortcut (diffusers' AvgDown3D on one frame): each channel's fs x fs
    pixels become fs*fs channels (preceded by as many zeros: the zero frame in front of the image
    when the stage also halves time), then groups of consecutive channels are averaged to out_dim."""

    def __init__(self, in_dim: int, out_dim: int, temporal: bool, spatial: bool) -> None:
        super().__init__()
        self.out_dim, self.temporal, self.fs = out_dim, temporal, 2 if spatial else 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        fs = self.fs
        x = x.reshape(b, c, 1, h // fs, fs, w // fs, fs).permute(0, 1, 2, 4, 6, 3, 5)  # (b, c, t, fs, fs, h', w')
        if self.temporal:
            x = torch.cat([torch.zeros_like(x), x], dim=2)
        return x.reshape(b, self.out_dim, -1, h // fs, w // fs).mean(dim=2)


class DepthToSpaceRepeat(nn.Module):
    """The decoder stage's shortcut (diffusers' DupUp3D on the first frame): channels repeated to
    out_dim * factor, read as (out, t, fs, fs); the frame is the last temporal copy."""

    def __init__(self, in_dim: int, out_dim: int, temporal: bool) -> None:
        super().__init__()
        self.out_dim, self.ft, self.fs = out_dim, 2 if temporal else 1, 2
        self.repeats = out_dim * self.ft * self.fs * self.fs // in_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        fs = self.fs
        x = x.repeat_interleave(self.repeats, dim=1).view(b, self.out_dim, self.ft, fs, fs, h, w)[:, :, -1]
        return x.permute(0, 1, 4, 2, 5, 3).reshape(b, self.out_dim, h * fs, w * fs)


class DownBlock(nn.Module):
    """diffusers' QwenImage21ResidualDownBlock."""

    def __init__(self, stage: Stage, num_res_blocks: int) -> None:
        super().__init__()
        self.avg_shortcut = SpaceToDepthMean(stage.in_dim, stage.out_dim, stage.temporal, stage.spatial)
        dims = [stage.in_dim] + [stage.out_dim] * num_res_blocks
        self.resnets = nn.ModuleList([ResidualBlock(i, o) for i, o in zip(dims[:-1], dims[1:])])
        self.downsampler = Resample(stage.out_dim, down=True, temporal=stage.temporal) if stage.spatial else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = self.avg_shortcut(x)
        for resnet in self.resnets:
            x = resnet(x)
        if self.downsampler is not None:
            x = self.downsampler(x)
        return x.add_(shortcut)


class UpBlock(nn.Module):
    """diffusers' QwenImage21ResidualUpBlock."""

    def __init__(self, stage: Stage, num_res_blocks: int) -> None:
        super().__init__()
        dims = [stage.in_dim] + [stage.out_dim] * (num_res_blocks + 1)
        self.resnets = nn.ModuleList([ResidualBlock(i, o) for i, o in zip(dims[:-1], dims[1:])])
        self.upsampler = Resample(stage.out_dim, down=False, temporal=stage.temporal) if stage.spatial else None
        self.avg_shortcut = DepthToSpaceRepeat(stage.in_dim, stage.out_dim, stage.temporal) if stage.spatial else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = self.avg_shortcut(x) if self.avg_shortcut is not None else None
        for resnet in self.resnets:
            x = resnet(x)
        if self.upsampler is not None:
            x = self.upsampler(x)
        return x if shortcut is None else x.add_(shortcut)


class Encoder(nn.Module):
    def __init__(self, p: QwenImage21VAEParams) -> None:
        super().__init__()
        stages = p.encoder_stages()
        self.conv_in = conv3x3(p.in_channels, stages[0].in_dim)
        self.down_blocks = nn.ModuleList([DownBlock(stage, p.num_res_blocks) for stage in stages])
        self.mid_block = MidBlock(stages[-1].out_dim)
        self.norm_out = RMSNorm(stages[-1].out_dim, gamma_dims=3)
        self.conv_out = conv3x3(stages[-1].out_dim, 2 * p.z_dim)  # posterior mean, logvar

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(F.silu(self.norm_out(x), inplace=True))


class Decoder(nn.Module):
    def __init__(self, p: QwenImage21VAEParams) -> None:
        super().__init__()
        stages = p.decoder_stages()
        self.conv_in = conv3x3(p.z_dim, stages[0].in_dim)
        self.mid_block = MidBlock(stages[0].in_dim)
        self.up_blocks = nn.ModuleList([UpBlock(stage, p.num_res_blocks) for stage in stages])
        self.norm_out = RMSNorm(stages[-1].out_dim, gamma_dims=3)
        self.conv_out = conv3x3(stages[-1].out_dim, p.out_channels)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.norm_out(x), inplace=True))


# ----------------------------------------------------------------------------- the model


class QwenImage21VAE(nn.Module):
    """Qwen-Image 2.1 VAE for images: `encode` RGBA (B, 4, H, W) in [-1, 1] -> normalised latents
    (B, 64, H/16, W/16); `decode` the reverse (see the module docstring for the contract)."""

    CHECKPOINT_REQUIRED_KEYS: tuple[str, ...] = (
        "encoder.conv_in.weight",
        "encoder.down_blocks.0.resnets.0.norm1.gamma",
        "encoder.down_blocks.0.downsampler.resample.1.weight",
        "encoder.mid_block.attentions.0.to_qkv.weight",
        "quant_conv.weight",
        "post_quant_conv.weight",
        "decoder.conv_in.weight",
        "decoder.up_blocks.0.resnets.0.norm1.gamma",
        "decoder.up_blocks.0.upsampler.resample.1.weight",
        "decoder.conv_out.weight",
    )

    def __init__(self, params: QwenImage21VAEParams | None = None) -> None:
        super().__init__()
        self.params = params or QwenImage21VAEParams()
        self.encoder = Encoder(self.params)
        self.quant_conv = nn.Conv2d(2 * self.params.z_dim, 2 * self.params.z_dim, 1)
        self.post_quant_conv = nn.Conv2d(self.params.z_dim, self.params.z_dim, 1)
        self.decoder = Decoder(self.params)
        # the computation dtype/device when they differ from the weights' (VRAM management sets them)
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
                        config: dict[str, Any] | None = None) -> "QwenImage21VAE":
        # every key and shape is then checked by the loader, which names the file
        return cls(cls.params_from_checkpoint(shapes, config))

    @staticmethod
    def params_from_checkpoint(shapes: Mapping[str, tuple[int, ...]],
                               config: dict[str, Any] | None = None) -> QwenImage21VAEParams:
        """Params from a checkpoint's shapes; a diffusers config.json dict wins where given.
        latents_mean/std come from the config, else they are the published model's."""
        overrides = _params_from_config(config or {})
        values = _arch_from_shapes(shapes)
        values.update(overrides)
        return QwenImage21VAEParams(**values)

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
    def encode(self, image: torch.Tensor, tiled: bool = False, tile_size: int = 64,
               tile_stride: int = 32) -> torch.Tensor:
        """(B, 4, H, W) RGBA in [-1, 1] -> normalised posterior mean (B, z_dim, H/16, W/16), float32.
        tile_size/tile_stride are in latent pixels (x16 image pixels)."""
        p, f = self.params, self.params.scale_factor
        if image.dim() != 4 or image.shape[1] != p.in_channels:
            raise ValueError(f"QwenImage21VAE.encode expects a picture batch (B, {p.in_channels}, H, W) (RGBA in "
                             f"[-1, 1]), got shape {tuple(image.shape)}")
        height, width = image.shape[-2:]
        if height % f or width % f:
            raise ValueError(f"QwenImage21VAE.encode: height and width must be multiples of {f}, "
                             f"got {height}x{width}")
        dtype, device = self._compute()
        x = image.to(device=device, dtype=dtype)
        grid = (height // f, width // f)
        if tiled and (grid[0] > tile_size or grid[1] > tile_size):
            moments = tiled_map(self._encode_moments, x, grid, tile_size, tile_stride, in_scale=f, out_scale=1)
        else:
            moments = self._encode_moments(x).float()
        latents_mean, latents_std = self._latent_stats(moments.device)
        return moments[:, : p.z_dim].sub(latents_mean).div_(latents_std)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, tiled: bool = False, tile_size: int = 64,
               tile_stride: int = 32) -> torch.Tensor:
        """Normalised latents (B, z_dim, h, w) -> RGBA (B, 4, 16h, 16w) in [-1, 1], float32.
        tile_size/tile_stride are in latent pixels."""
        p, f = self.params, self.params.scale_factor
        if latents.dim() != 4 or latents.shape[1] != p.z_dim:
            raise ValueError(f"QwenImage21VAE.decode expects latents (B, {p.z_dim}, h, w), "
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
    if not config.get("is_residual", True):
        raise ValueError("QwenImage21VAE config.json: is_residual is false; only the residual layout of the "
                         "published Qwen-Image 2.1 VAE is supported")
    if config.get("patch_size") not in (None, 1):
        raise ValueError(f"QwenImage21VAE config.json: patch_size {config['patch_size']} is not supported "
                         f"(the published Qwen-Image 2.1 VAE has none); remove it or use null")
    known = {f.name for f in fields(QwenImage21VAEParams)}
    values = {}
    for key, value in config.items():
        if key in known:
            values[key] = tuple(value) if isinstance(value, (list, tuple)) else value
        elif not key.startswith("_") and key not in _OTHER_CONFIG:
            logger.warning("QwenImage21VAE: config key %r is not used", key)
    return values


def _shape(shapes: Mapping[str, tuple[int, ...]], key: str, ndim: int = 4) -> tuple[int, ...]:
    if key not in shapes:
        raise ValueError(f"QwenImage21VAE checkpoint lacks the key {key!r}; is this a Qwen-Image 2.1 "
                         f"(AutoencoderKLQwenImage21) VAE file?")
    shape = tuple(shapes[key])
    if len(shape) != ndim:
        raise ValueError(f"QwenImage21VAE checkpoint key {key!r} has shape {shape}, expected {ndim} dimensions")
    return shape


def _arch_from_shapes(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
    """The architecture fields of QwenImage21VAEParams from the checkpoint's shapes."""
    base_dim, in_channels = _shape(shapes, "encoder.conv_in.weight")[:2]
    out_channels = _shape(shapes, "decoder.conv_out.weight")[0]
    z_dim = _shape(shapes, "post_quant_conv.weight")[0]
    quant = _shape(shapes, "quant_conv.weight")[0]
    if quant != 2 * z_dim:
        raise ValueError(f"QwenImage21VAE checkpoint: 'quant_conv.weight' has {quant} output channels but "
                         f"'post_quant_conv.weight' implies z_dim {z_dim} (expected {2 * z_dim})")
    stages = sorted({int(k.split(".")[2]) for k in shapes if k.startswith("encoder.down_blocks.")})
    if stages != list(range(len(stages))) or not stages:
        raise ValueError(f"QwenImage21VAE checkpoint: encoder.down_blocks indices {stages} are not 0..N-1")
    num_res_blocks = len({k.split(".")[4] for k in shapes if k.startswith("encoder.down_blocks.0.resnets.")})
    dim_mult = []
    for s in stages:
        key = f"encoder.down_blocks.{s}.resnets.0.conv1.weight"
        out_dim = _shape(shapes, key)[0]
        if out_dim % base_dim:
            raise ValueError(f"QwenImage21VAE checkpoint: {key!r} has {out_dim} output channels, not a multiple "
                             f"of base_dim {base_dim} ('encoder.conv_in.weight')")
        dim_mult.append(out_dim // base_dim)
    decoder_dim = _shape(shapes, "decoder.conv_in.weight")[0]
    if decoder_dim % dim_mult[-1]:
        raise ValueError(f"QwenImage21VAE checkpoint: 'decoder.conv_in.weight' has {decoder_dim} output channels, "
                         f"not a multiple of the last dim_mult {dim_mult[-1]}")
    decoder_base_dim = decoder_dim // dim_mult[-1]
    temporal = tuple(f"encoder.down_blocks.{s}.downsampler.time_conv.weight" in shapes for s in stages[:-1])
    return {"base_dim": base_dim, "decoder_base_dim": decoder_base_dim, "z_dim": z_dim, "dim_mult": tuple(dim_mult),
            "num_res_blocks": num_res_blocks, "temperal_downsample": temporal, "in_channels": in_channels,
            "out_channels": out_channels}
