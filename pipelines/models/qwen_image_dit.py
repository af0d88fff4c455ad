"""Qwen-Image MMDiT (the 20B double-stream diffusion transformer) in plain torch.

Parameter names and shapes are exactly those of diffusers' `QwenImageTransformer2DModel`,
so the published `transformer/diffusion_pytorch_model*.safetensors` load without renaming.
The RoPE tables are computed (and cached), never stored: the state dict holds parameters only.

Shapes used below: B batch, Li image tokens (= height * width of the 2x2-packed latent grid),
Lt text tokens, S = Lt + Li, H heads, D head dim, C inner dim = H * D.

Every projection is an `nn.Linear` module called as a module, so VRAM management and hot
LoRA can wrap the layers from outside.
"""
from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

logger = logging.getLogger(__name__)

# (block index, generated image tokens (B, Li, C)) -> a residual to add to them, or None
BlockResidual = Callable[[int, Tensor], "Tensor | None"]


# ----------------------------------------------------------------------------------------------
# Parameters
# ----------------------------------------------------------------------------------------------


@dataclass
class QwenImageDiTParams:
    """Hyper-parameters; the defaults are those of the published Qwen-Image transformer."""

    patch_size: int = 2
    in_channels: int = 64  # packed 2x2 patches of the 16-channel VAE latent
    out_channels: int = 16
    num_layers: int = 60
    attention_head_dim: int = 128
    num_attention_heads: int = 24
    joint_attention_dim: int = 3584  # hidden size of the text encoder
    axes_dims_rope: tuple[int, int, int] = (16, 56, 56)  # frame, height, width slices of D
    rope_theta: float = 10000.0
    mlp_ratio: int = 4
    eps: float = 1e-6
    timestep_channels: int = 256
    # Qwen-Image-Edit-2511: reference-image tokens are modulated as at t = 0 (config.json)
    zero_cond_t: bool = False

    def __post_init__(self) -> None:
        self.axes_dims_rope = tuple(int(a) for a in self.axes_dims_rope)
        for name in ("patch_size", "in_channels", "out_channels", "num_layers",
                     "attention_head_dim", "num_attention_heads", "joint_attention_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"QwenImageDiTParams.{name} must be a positive int, got {value!r}")
        check_rope_axes(self.axes_dims_rope, self.attention_head_dim)

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def out_features(self) -> int:
        """Channels per output token: one packed patch of the predicted velocity."""
        return self.patch_size * self.patch_size * self.out_channels


def check_rope_axes(axes: tuple[int, ...], head_dim: int) -> None:
    if len(axes) != 3:
        raise ValueError(f"axes_dims_rope must have 3 entries (frame, height, width), got {axes}")
    if sum(axes) != head_dim:
        raise ValueError(
            f"axes_dims_rope {tuple(axes)} sums to {sum(axes)}, but the attention head dim is "
            f"{head_dim}; the three RoPE axes must exactly cover one head (the published rule "
            f"gives {default_rope_axes(head_dim)} for head dim {head_dim})")
    if any(a <= 0 or a % 2 for a in axes):
        raise ValueError(
            f"axes_dims_rope {tuple(axes)}: every axis must be a positive even number "
            f"(RoPE rotates pairs of channels)")


def default_rope_axes(head_dim: int) -> tuple[int, int, int]:
    """The rule of the published model: frame = D/8, height = width = the rest split in two
    (128 -> (16, 56, 56))."""
    frame = head_dim // 8
    side = (head_dim - frame) // 2
    return (frame, side, side)


# ----------------------------------------------------------------------------------------------
# Small layers
# ----------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """RMS norm over the last dim with a weight (`x / rms(x) * weight`)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x, self.weight.shape, self.weight.to(x.dtype), self.eps)


class TimestepEmbedder(nn.Module):
    """MLP on the sinusoidal embedding: `linear_1`, SiLU, `linear_2`."""

    def __init__(self, in_channels: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_channels, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class TimeTextEmbed(nn.Module):
    """Holds `timestep_embedder` (the name in the checkpoint)."""

    def __init__(self, channels: int, dim: int):
        super().__init__()
        self.channels = channels
        self.timestep_embedder = TimestepEmbedder(channels, dim)

    def forward(self, sigma: Tensor, dtype: torch.dtype) -> Tensor:
        return self.timestep_embedder(timestep_sinusoid(sigma, self.channels, dtype))


def timestep_sinusoid(sigma: Tensor, channels: int, dtype: torch.dtype) -> Tensor:
    """Sinusoidal embedding of `sigma * 1000`, order [cos, sin], as the reference computes it:
    sigma is first rounded to the activation dtype; frequencies and angles are fp32."""
    half = channels // 2
    exponent = (-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=sigma.device)) / half
    angles = (sigma.to(dtype).float()[:, None] * torch.exp(exponent)[None, :]) * 1000.0
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1).to(dtype)


class GeluProj(nn.Module):
    """Linear then tanh-approximated GELU (`net.0.proj` in the checkpoint)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.proj = nn.Linear(dim, hidden)

    def forward(self, x: Tensor) -> Tensor:
        return F.gelu(self.proj(x), approximate="tanh")


class FeedForward(nn.Module):
    """`net.0.proj` -> GELU(tanh) -> `net.2`. Slot `net.1` (a dropout in the reference) is an
    identity kept only so the checkpoint's indices line up."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.net = nn.ModuleList([GeluProj(dim, hidden), nn.Identity(), nn.Linear(hidden, dim)])

    def forward(self, x: Tensor) -> Tensor:
        return self.net[2](self.net[0](x))


class NormOut(nn.Module):
    """Final adaptive LayerNorm: `linear(SiLU(temb))` split into **scale, shift**."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.linear = nn.Linear(dim, 2 * dim)

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        scale, shift = self.linear(F.silu(temb)).unsqueeze(1).chunk(2, dim=-1)
        return modulated_layer_norm(x, shift, scale, self.eps)


def modulated_layer_norm(x: Tensor, shift: Tensor, scale: Tensor, eps: float) -> Tensor:
    """`LayerNorm(x) * (1 + scale) + shift` (LayerNorm without affine); shift/scale (B, 1, C).

    With one sample the modulation is a plain per-channel affine, so it folds into the
    LayerNorm kernel itself (one pass over x instead of three)."""
    dim = x.shape[-1]
    if x.shape[0] == 1:
        return F.layer_norm(x, (dim,), weight=1 + scale.reshape(dim), bias=shift.reshape(dim), eps=eps)
    return torch.addcmul(shift, F.layer_norm(x, (dim,), eps=eps), 1 + scale)


# ----------------------------------------------------------------------------------------------
# RoPE
# ----------------------------------------------------------------------------------------------


def rope_frequencies(axes: tuple[int, int, int], theta: float, grids: tuple[tuple[int, int], ...],
                     text_len: int, device: torch.device) -> Tensor:
    """Complex rotations (S, D/2) for the joint sequence [text, image 0, image 1, ...].

    Image i's token (y, x) sits at frame i, height y - ceil(h/2), width x - ceil(w/2) (centered);
    text token j sits at max over the images of max(h//2, w//2), plus j, on all three axes.
    Image 0 is the one generated; the others are reference pictures (edit models)."""
    positions = []
    for frame, (height, width) in enumerate(grids):
        ys = torch.arange(height, device=device) - (height - height // 2)
        xs = torch.arange(width, device=device) - (width - width // 2)
        positions.append(torch.stack([
            torch.full((height * width,), frame, dtype=torch.long, device=device),
            ys.repeat_interleave(width),
            xs.repeat(height),
        ], dim=-1))  # (Li, 3)
    text_start = max(max(h // 2, w // 2) for h, w in grids)
    txt_pos = (torch.arange(text_len, device=device) + text_start)[:, None].expand(-1, 3)
    pos = torch.cat([txt_pos, *positions], dim=0)  # (S, 3)

    angles = []
    for axis, dim in enumerate(axes):
        inv_freq = 1.0 / torch.pow(theta, torch.arange(0, dim, 2, device=device).to(torch.float32).div(dim))
        angles.append(torch.outer(pos[:, axis], inv_freq))
    angles = torch.cat(angles, dim=-1)  # (S, D/2) float32
    return torch.polar(torch.ones_like(angles), angles)


def apply_rope_(x: Tensor, freqs: Tensor) -> Tensor:
    """Rotate, in place, the interleaved pairs (x[2k], x[2k+1]) of the fp32 tensor x (B, L, H, D)
    by freqs (L, D/2) complex; returns x."""
    torch.view_as_complex(x.unflatten(-1, (-1, 2))).mul_(freqs[:, None, :])
    return x


def cat_as(tensors: list[Tensor], dtype: torch.dtype, dim: int = 1) -> Tensor:
    """torch.cat whose result has `dtype` (the cast happens in the same pass as the copy)."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return torch.cat(tensors, dim=dim).to(dtype)  # `out=` has no autograd
    shape = list(tensors[0].shape)
    shape[dim] = sum(t.shape[dim] for t in tensors)
    out = torch.empty(shape, dtype=dtype, device=tensors[0].device)
    return torch.cat(tensors, dim=dim, out=out)


# ----------------------------------------------------------------------------------------------
# Joint attention and the double-stream block
# ----------------------------------------------------------------------------------------------


class JointAttention(nn.Module):
    """Attention over [text, image] with separate projections per stream (names as diffusers)."""

    def __init__(self, dim: int, heads: int, head_dim: int, eps: float):
        super().__init__()
        self.heads = heads
        self.head_dim = head_dim
        inner = heads * head_dim
        self.to_q = nn.Linear(dim, inner)
        self.to_k = nn.Linear(dim, inner)
        self.to_v = nn.Linear(dim, inner)
        self.add_q_proj = nn.Linear(dim, inner)
        self.add_k_proj = nn.Linear(dim, inner)
        self.add_v_proj = nn.Linear(dim, inner)
        self.norm_q = RMSNorm(head_dim, eps)
        self.norm_k = RMSNorm(head_dim, eps)
        self.norm_added_q = RMSNorm(head_dim, eps)
        self.norm_added_k = RMSNorm(head_dim, eps)
        self.to_out = nn.ModuleList([nn.Linear(inner, dim)])
        self.to_add_out = nn.Linear(inner, dim)

    def forward(self, img: Tensor, txt: Tensor, freqs: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
        text_len, dtype = txt.shape[1], img.dtype
        txt_freqs, img_freqs = freqs[:text_len], freqs[text_len:]
        q = cat_as([self._rotated(self.add_q_proj, self.norm_added_q, txt, txt_freqs),
                    self._rotated(self.to_q, self.norm_q, img, img_freqs)], dtype)
        k = cat_as([self._rotated(self.add_k_proj, self.norm_added_k, txt, txt_freqs),
                    self._rotated(self.to_k, self.norm_k, img, img_freqs)], dtype)
        v = torch.cat([self._heads(self.add_v_proj(txt)), self._heads(self.to_v(img))], dim=1)

        out = F.scaled_dot_product_attention(  # (B, H, S, D) views of (B, S, H, D)
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
        out = out.transpose(1, 2).flatten(2)  # (B, S, C)
        return self.to_out[0](out[:, text_len:]), self.to_add_out(out[:, :text_len])

    def _heads(self, x: Tensor) -> Tensor:
        return x.unflatten(-1, (-1, self.head_dim))  # (B, L, C) -> (B, L, H, D)

    def _rotated(self, proj: nn.Module, norm: nn.Module, x: Tensor, freqs: Tensor) -> Tensor:
        """Projection, per-head RMSNorm and RoPE; the last two in fp32 (returned in fp32)."""
        return apply_rope_(norm(self._heads(proj(x)).float()), freqs)


class Segments:
    """The image stream as consecutive runs of tokens, each with its own adaLN parameters: one
    run, except with zero_cond_t (Qwen-Image-Edit-2511): the generated tokens, then the
    reference pictures' tokens modulated as at t = 0. Per-token work (norms, gates) runs per
    run; the projections and the MLP run once over the whole stream."""

    def __init__(self, lengths: tuple[int, ...], mods: list[tuple[Tensor, ...]]):
        self.lengths, self.mods = lengths, mods

    def apply(self, fn, *tensors: Tensor) -> Tensor:
        """`fn(mod, *parts)` on each run, concatenated along the tokens."""
        if len(self.lengths) == 1:
            return fn(self.mods[0], *tensors)
        parts = zip(*(t.split(self.lengths, dim=1) for t in tensors))
        return torch.cat([fn(mod, *run) for mod, run in zip(self.mods, parts)], dim=1)


class DoubleStreamBlock(nn.Module):
    """One MMDiT block: each stream gets its own adaLN modulation and MLP, attention is joint.
    `img_mod.1` / `txt_mod.1` give [shift1, scale1, gate1, shift2, scale2, gate2]."""

    def __init__(self, dim: int, heads: int, head_dim: int, mlp_ratio: int, eps: float):
        super().__init__()
        self.eps = eps
        self.img_mod = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.txt_mod = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.attn = JointAttention(dim, heads, head_dim, eps)
        self.img_mlp = FeedForward(dim, mlp_ratio * dim)
        self.txt_mlp = FeedForward(dim, mlp_ratio * dim)

    def forward(self, img: Tensor, txt: Tensor, temb: Tensor, freqs: Tensor, mask: Tensor | None,
                runs: tuple[tuple[int, Tensor], ...] = ()) -> tuple[Tensor, Tensor]:
        """`runs`: (token count, timestep embedding) of consecutive image-token runs with their
        own modulation; empty = every image token is modulated with `temb`."""
        eps = self.eps
        lengths, tembs = zip(*runs) if runs else ((img.shape[1],), (temb,))
        seg = Segments(lengths, [self.img_mod(t).unsqueeze(1).chunk(6, dim=-1) for t in tembs])
        txt_shift1, txt_scale1, txt_gate1, txt_shift2, txt_scale2, txt_gate2 = \
            self.txt_mod(temb).unsqueeze(1).chunk(6, dim=-1)

        img_attn, txt_attn = self.attn(
            seg.apply(lambda m, x: modulated_layer_norm(x, m[0], m[1], eps), img),
            modulated_layer_norm(txt, txt_shift1, txt_scale1, eps),
            freqs, mask)
        img = seg.apply(lambda m, x, a: torch.addcmul(x, m[2], a), img, img_attn)
        txt = torch.addcmul(txt, txt_gate1, txt_attn)

        img_mlp = self.img_mlp(seg.apply(lambda m, x: modulated_layer_norm(x, m[3], m[4], eps), img))
        img = seg.apply(lambda m, x, y: torch.addcmul(x, m[5], y), img, img_mlp)
        txt = torch.addcmul(txt, txt_gate2, self.txt_mlp(modulated_layer_norm(txt, txt_shift2, txt_scale2, eps)))

        if img.dtype == torch.float16:  # as the reference: keep fp16 activations finite
            img, txt = img.clip(-65504, 65504), txt.clip(-65504, 65504)
        return img, txt


# ----------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------

# Exactly the key names of a Qwen-Image checkpoint, not their top-level prefixes: the Qwen-Image 2.1 DiT
# (qwen_image_21_dit.py) shares some of them (img_in.weight, attn.to_q.weight...), and its own (modulation.1,
# txt_in.in_layer, img_mlp.gate_layer...) must not be claimed here. `time_text_embed.*` as a whole, so that the
# variants this file refuses (guidance and additional-timestep embedders) reach their config.json check.
_OWNED_KEY = re.compile(
    r"^(?:time_text_embed\..+|txt_norm\.weight|(?:img_in|txt_in|proj_out|norm_out\.linear)\.(?:weight|bias)"
    r"|transformer_blocks\.\d+\.(?:(?:img_mod|txt_mod)\.1|img_mlp\.net\.(?:0\.proj|2)|txt_mlp\.net\.(?:0\.proj|2)"
    r"|attn\.(?:to_[qkv]|add_[qkv]_proj|to_out\.0|to_add_out))\.(?:weight|bias)"
    r"|transformer_blocks\.\d+\.attn\.norm_(?:q|k|added_q|added_k)\.weight)$")
_BLOCK_KEY = re.compile(r"^transformer_blocks\.(\d+)\.")

# diffusers config.json fields that map onto QwenImageDiTParams.
_CONFIG_FIELDS = ("patch_size", "in_channels", "out_channels", "num_layers", "attention_head_dim",
                  "num_attention_heads", "joint_attention_dim", "axes_dims_rope")
# diffusers config.json fields that change the architecture in ways this file does not implement.
_UNSUPPORTED_FLAGS = {
    "guidance_embeds": "guidance-distilled variants (guidance embedding) are not implemented",
    "use_additional_t_cond": "the additional timestep condition (Qwen-Image-Layered) is not implemented",
    "use_layer3d_rope": "the layered 3D RoPE (Qwen-Image-Layered) is not implemented",
}


class QwenImageDiT(nn.Module):
    """The Qwen-Image MMDiT; `forward` predicts the flow-matching velocity of packed latents."""

    CHECKPOINT_REQUIRED_KEYS: tuple[str, ...] = (
        "img_in.weight",
        "txt_norm.weight",
        "txt_in.weight",
        "time_text_embed.timestep_embedder.linear_1.weight",
        "transformer_blocks.0.img_mod.1.weight",
        "transformer_blocks.0.attn.to_q.weight",
        "transformer_blocks.0.attn.add_q_proj.weight",
        "transformer_blocks.0.attn.norm_q.weight",
        "norm_out.linear.weight",
        "proj_out.weight",
    )

    def __init__(self, params: QwenImageDiTParams | None = None):
        super().__init__()
        self.params = p = params or QwenImageDiTParams()
        dim = p.inner_dim
        self.img_in = nn.Linear(p.in_channels, dim)
        self.txt_norm = RMSNorm(p.joint_attention_dim, p.eps)
        self.txt_in = nn.Linear(p.joint_attention_dim, dim)
        self.time_text_embed = TimeTextEmbed(p.timestep_channels, dim)
        self.transformer_blocks = nn.ModuleList([
            DoubleStreamBlock(dim, p.num_attention_heads, p.attention_head_dim, p.mlp_ratio, p.eps)
            for _ in range(p.num_layers)
        ])
        self.norm_out = NormOut(dim, p.eps)
        self.proj_out = nn.Linear(dim, p.out_features)
        # (token grids, text_len, device) -> complex RoPE table; not a buffer on purpose.
        self._rope_cache: dict[tuple, Tensor] = {}

    # -- forward --------------------------------------------------------------------------------

    # Set this when the weights are stored in another dtype than the one to compute in
    # (e.g. FP8 storage under VRAM management); None = compute in the weights' dtype.
    compute_dtype: torch.dtype | None = None

    @property
    def dtype(self) -> torch.dtype:
        """The computation dtype (inputs are cast to it, the output has it)."""
        return self.compute_dtype or self.img_in.weight.dtype

    def forward(self, latents: Tensor, timestep: Tensor, text: Tensor, text_mask: Tensor | None,
                height: int, width: int, references: tuple[tuple[int, int], ...] = (),
                zero_cond_t: bool | None = None, block_residual: BlockResidual | None = None) -> Tensor:
        """
        latents:   (B, Li + sum Lr, in_channels) packed 2x2 latent patches: the generated
                   image's Li = height * width tokens, then each reference picture's (edit models)
        timestep:  (B,) sigma in [0, 1] (a scalar is broadcast to the batch)
        text:      (B, Lt, joint_attention_dim) text-encoder hidden states
        text_mask: (B, Lt) bool, True = real token; None = all real. Pass None when there is
                   no padding: a mask switches SDPA to slower kernels (and `.all()` syncs).
        height, width: the token grid (image height / 16, width / 16).
        references: the (height, width) token grids of the reference pictures, in order.
        zero_cond_t: modulate the reference tokens as at t = 0 (Qwen-Image-Edit-2511); None =
                   the checkpoint's config (`params.zero_cond_t`).
        block_residual: the ControlNets' hook, `block_residual(i, image)` called after double-stream
                   block i with the generated image's tokens (B, Li, C) (reference tokens excluded);
                   it returns a residual to add to them (broadcast over the batch) or None. InstantX
                   nets answer with block samples computed once per step (diffusers' interval rule),
                   DiffSynth's Blockwise nets with an adapter of the image stream; None: no hook.
        Returns the velocity of the generated tokens (B, Li, patch_size**2 * out_channels) in
        the computation dtype.
        """
        grids = ((height, width), *(tuple(r) for r in references))
        timestep, text_mask = self._check_inputs(latents, timestep, text, text_mask, grids)
        dtype = self.dtype
        temb = self.time_text_embed(timestep, dtype)
        img = self.img_in(latents.to(dtype))
        txt = self.txt_in(self.txt_norm(text.to(dtype)))
        freqs = self.rope(grids, text.shape[1], latents.device)
        mask = joint_attention_mask(text_mask, img.shape[1])
        target = height * width
        zero_cond_t = self.params.zero_cond_t if zero_cond_t is None else zero_cond_t
        runs = ()
        if zero_cond_t and img.shape[1] > target:
            runs = ((target, temb), (img.shape[1] - target, self.time_text_embed(torch.zeros_like(timestep), dtype)))

        for index, block in enumerate(self.transformer_blocks):
            img, txt = block(img, txt, temb, freqs, mask, runs)
            if block_residual is not None:
                img = add_residual(img, block_residual(index, img[:, :target]), target)

        return self.proj_out(self.norm_out(img[:, :target], temb))

    def rope(self, grids: tuple[tuple[int, int], ...], text_len: int, device: torch.device) -> Tensor:
        key = (grids, text_len, torch.device(device))
        if key not in self._rope_cache:
            if len(self._rope_cache) >= 16:
                self._rope_cache.clear()
            self._rope_cache[key] = rope_frequencies(self.params.axes_dims_rope, self.params.rope_theta, grids,
                                                     text_len, device)
        return self._rope_cache[key]

    def _check_inputs(self, latents: Tensor, timestep: Tensor, text: Tensor, text_mask: Tensor | None,
                      grids: tuple[tuple[int, int], ...]) -> tuple[Tensor, Tensor | None]:
        p = self.params
        if latents.ndim != 3 or latents.shape[-1] != p.in_channels:
            raise ValueError(f"QwenImageDiT: latents must be (batch, image_tokens, {p.in_channels}), "
                             f"got {tuple(latents.shape)}")
        batch, image_len, _ = latents.shape
        expected = sum(h * w for h, w in grids)
        if any(h <= 0 or w <= 0 for h, w in grids) or image_len != expected:
            raise ValueError(f"QwenImageDiT: latents hold {image_len} image tokens but the token grids "
                             f"{' + '.join(f'{h}x{w}' for h, w in grids)} make {expected}; height/width are the "
                             f"image size / 16")
        if text.ndim != 3 or text.shape[0] != batch or text.shape[-1] != p.joint_attention_dim:
            raise ValueError(f"QwenImageDiT: text must be (batch={batch}, text_tokens, "
                             f"{p.joint_attention_dim}), got {tuple(text.shape)}")
        if text.shape[1] == 0:
            raise ValueError("QwenImageDiT: text has no tokens")
        timestep = torch.as_tensor(timestep, device=latents.device)
        if timestep.ndim == 0 or timestep.shape == (1,):
            timestep = timestep.reshape(1).expand(batch)
        if timestep.shape != (batch,):
            raise ValueError(f"QwenImageDiT: timestep must be (batch={batch},) sigmas, got {tuple(timestep.shape)}")
        if text_mask is not None:
            if text_mask.shape != text.shape[:2]:
                raise ValueError(f"QwenImageDiT: text_mask must be (batch, text_tokens) = "
                                 f"{tuple(text.shape[:2])}, got {tuple(text_mask.shape)}")
            text_mask = text_mask.to(device=latents.device, dtype=torch.bool)
            if bool(text_mask.all()):
                text_mask = None
        return timestep, text_mask

    # -- checkpoint contract (pipelines.core.checkpoint.CheckpointModel) ------------------------

    @staticmethod
    def owns_checkpoint_key(key: str) -> bool:
        return _OWNED_KEY.match(key) is not None

    @staticmethod
    def convert_checkpoint_key(key: str) -> str | None:
        return key  # the diffusers layout is ours

    @classmethod
    def from_checkpoint(cls, shapes: Mapping[str, tuple[int, ...]], config: dict[str, Any] | None) -> "QwenImageDiT":
        # every key and shape is then checked by the loader, which names the file
        return cls(params_from_checkpoint(shapes, config))


def add_residual(img: Tensor, residual: Tensor | None, target: int) -> Tensor:
    """The image stream with `residual` added to its first `target` (generated) tokens."""
    if residual is None:
        return img
    if img.shape[1] == target:
        return img + residual.to(img.dtype)
    return torch.cat([img[:, :target] + residual.to(img.dtype), img[:, target:]], dim=1)


def joint_attention_mask(text_mask: Tensor | None, image_len: int) -> Tensor | None:
    """(B, Lt) text mask -> (B, 1, 1, Lt + Li) key mask over [text, image]; None stays None."""
    if text_mask is None:
        return None
    image_mask = text_mask.new_ones(text_mask.shape[0], image_len)
    return torch.cat([text_mask, image_mask], dim=1)[:, None, None, :]


# ----------------------------------------------------------------------------------------------
# Checkpoint -> params
# ----------------------------------------------------------------------------------------------


def _shape(shapes: Mapping[str, tuple[int, ...]], key: str, ndim: int) -> tuple[int, ...]:
    if key not in shapes:
        raise ValueError(f"Qwen-Image DiT checkpoint: required key {key!r} is missing")
    shape = tuple(shapes[key])
    if len(shape) != ndim:
        raise ValueError(f"Qwen-Image DiT checkpoint: {key!r} has shape {shape}, expected {ndim} dims")
    return shape


def params_from_checkpoint(shapes: Mapping[str, tuple[int, ...]], config: dict[str, Any] | None) -> QwenImageDiTParams:
    """Infer the hyper-parameters from the tensor shapes; values in `config` (diffusers
    config.json) win where given."""
    config = dict(config or {})
    for flag, why in _UNSUPPORTED_FLAGS.items():
        if config.get(flag):
            raise NotImplementedError(f"Qwen-Image DiT: config.json sets {flag}=true: {why} in {__name__}")

    blocks = {int(m.group(1)) for k in shapes if (m := _BLOCK_KEY.match(k))}
    if not blocks:
        raise ValueError("Qwen-Image DiT checkpoint: no 'transformer_blocks.N.*' keys")
    if blocks != set(range(len(blocks))):
        raise ValueError(f"Qwen-Image DiT checkpoint: transformer_blocks indices are not 0..N-1 "
                         f"(missing {sorted(set(range(max(blocks, default=-1) + 1)) - blocks)[:10]})")
    inner, in_channels = _shape(shapes, "img_in.weight", 2)
    txt_inner, joint_dim = _shape(shapes, "txt_in.weight", 2)
    if txt_inner != inner:
        raise ValueError(f"Qwen-Image DiT checkpoint: 'txt_in.weight' has {txt_inner} rows but "
                         f"'img_in.weight' has {inner}; both must be the inner dim")
    (head_dim,) = _shape(shapes, "transformer_blocks.0.attn.norm_q.weight", 1)
    head_dim = int(config.get("attention_head_dim") or head_dim)
    if inner % head_dim:
        raise ValueError(f"Qwen-Image DiT checkpoint: inner dim {inner} (from 'img_in.weight') is not a "
                         f"multiple of the head dim {head_dim} (from 'transformer_blocks.0.attn.norm_q.weight')")
    patch_size = int(config.get("patch_size", QwenImageDiTParams.patch_size))
    out_rows = _shape(shapes, "proj_out.weight", 2)[0]
    if out_rows % (patch_size * patch_size):
        raise ValueError(f"Qwen-Image DiT checkpoint: 'proj_out.weight' has {out_rows} rows, not a multiple "
                         f"of patch_size**2 = {patch_size ** 2}")

    inferred = dict(
        patch_size=patch_size,
        in_channels=in_channels,
        out_channels=out_rows // (patch_size * patch_size),
        num_layers=len(blocks),
        attention_head_dim=head_dim,
        num_attention_heads=inner // head_dim,
        joint_attention_dim=joint_dim,
    )
    for name in _CONFIG_FIELDS:
        if config.get(name) is not None:
            inferred[name] = tuple(config[name]) if name == "axes_dims_rope" else int(config[name])
    if "axes_dims_rope" not in inferred:
        inferred["axes_dims_rope"] = default_rope_axes(inferred["attention_head_dim"])
    inferred["zero_cond_t"] = bool(config.get("zero_cond_t", False))
    return QwenImageDiTParams(**inferred)
