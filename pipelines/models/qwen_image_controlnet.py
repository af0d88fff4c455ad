"""InstantX's ControlNets for Qwen-Image 1.x (Qwen-Image-ControlNet-Union, -Inpainting) in plain torch.

Parameter names and shapes are those of diffusers' `QwenImageControlNetModel`, so the published
`diffusion_pytorch_model.safetensors` load without renaming. The net is the head of the Qwen-Image
DiT (`img_in`, `txt_norm`, `txt_in`, `time_text_embed`, a few `transformer_blocks`) plus
`controlnet_x_embedder`, the projection of the packed condition latents added to the image
stream, and one zero-initialised `controlnet_blocks.N` projection per block: its forward returns
the block samples the DiT adds to its image stream (`QwenImageDiT.forward(block_residual=...)`).

Two variants, recognised from the shapes: Union (canny, soft edge, depth, pose; 5 blocks) takes the
control picture's packed latents (`in_channels`, 64); Inpainting (6 blocks,
`extra_condition_channels` 4) takes the masked picture's latents and the kept-region mask packed
together (4 x (16 + 1) = 68 channels).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.nn as nn
from torch import Tensor

from .qwen_image_dit import (
    DoubleStreamBlock,
    RMSNorm,
    TimeTextEmbed,
    check_rope_axes,
    default_rope_axes,
    joint_attention_mask,
    rope_frequencies,
)


@dataclass
class QwenImageControlNetParams:
    """Hyper-parameters; the defaults are those of InstantX's Qwen-Image-ControlNet-Union."""

    patch_size: int = 2
    in_channels: int = 64  # packed 2x2 patches of the 16-channel VAE latent
    num_layers: int = 5
    attention_head_dim: int = 128
    num_attention_heads: int = 24
    joint_attention_dim: int = 3584
    axes_dims_rope: tuple[int, int, int] = (16, 56, 56)
    extra_condition_channels: int = 0  # 4 for the Inpainting net: the packed mask
    rope_theta: float = 10000.0
    mlp_ratio: int = 4
    eps: float = 1e-6
    timestep_channels: int = 256

    def __post_init__(self) -> None:
        self.axes_dims_rope = tuple(int(a) for a in self.axes_dims_rope)
        for name in ("patch_size", "in_channels", "num_layers", "attention_head_dim", "num_attention_heads",
                     "joint_attention_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"QwenImageControlNetParams.{name} must be a positive int, got {value!r}")
        if not isinstance(self.extra_condition_channels, int) or self.extra_condition_channels < 0:
            raise ValueError(f"QwenImageControlNetParams.extra_condition_channels must be an int >= 0, got "
                             f"{self.extra_condition_channels!r}")
        check_rope_axes(self.axes_dims_rope, self.attention_head_dim)

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def condition_channels(self) -> int:
        """Channels per token of the packed condition the net reads."""
        return self.in_channels + self.extra_condition_channels


# Exactly the key names of an InstantX Qwen-Image ControlNet checkpoint. `controlnet_blocks.N` is a plain
# linear layer here; DiffSynth's Blockwise nets have `controlnet_blocks.N.input_proj...`, not claimed.
_BLOCK = (r"transformer_blocks\.\d+\.(?:(?:(?:img_mod|txt_mod)\.1|img_mlp\.net\.(?:0\.proj|2)"
          r"|txt_mlp\.net\.(?:0\.proj|2)|attn\.(?:to_[qkv]|add_[qkv]_proj|to_out\.0|to_add_out))\.(?:weight|bias)"
          r"|attn\.norm_(?:q|k|added_q|added_k)\.weight)")
_OWNED_KEY = re.compile(
    r"^(?:time_text_embed\.timestep_embedder\.linear_[12]\.(?:weight|bias)|txt_norm\.weight"
    r"|(?:img_in|txt_in|controlnet_x_embedder)\.(?:weight|bias)|controlnet_blocks\.\d+\.(?:weight|bias)|"
    + _BLOCK + r")$")
_NUMBERED = {"transformer_blocks": re.compile(r"^transformer_blocks\.(\d+)\."),
             "controlnet_blocks": re.compile(r"^controlnet_blocks\.(\d+)\.")}
_CONFIG_FIELDS = ("patch_size", "in_channels", "num_layers", "attention_head_dim", "num_attention_heads",
                  "joint_attention_dim", "axes_dims_rope", "extra_condition_channels")


class QwenImageControlNet(nn.Module):
    """An InstantX ControlNet: `forward` returns one block sample (B, Li, C) per block, unscaled."""

    CHECKPOINT_REQUIRED_KEYS: tuple[str, ...] = (
        "img_in.weight",
        "txt_norm.weight",
        "txt_in.weight",
        "time_text_embed.timestep_embedder.linear_1.weight",
        "transformer_blocks.0.attn.to_q.weight",
        "transformer_blocks.0.attn.norm_q.weight",
        "controlnet_blocks.0.weight",
        "controlnet_x_embedder.weight",
    )

    def __init__(self, params: QwenImageControlNetParams | None = None):
        super().__init__()
        self.params = p = params or QwenImageControlNetParams()
        dim = p.inner_dim
        self.img_in = nn.Linear(p.in_channels, dim)
        self.txt_norm = RMSNorm(p.joint_attention_dim, p.eps)
        self.txt_in = nn.Linear(p.joint_attention_dim, dim)
        self.time_text_embed = TimeTextEmbed(p.timestep_channels, dim)
        self.transformer_blocks = nn.ModuleList([
            DoubleStreamBlock(dim, p.num_attention_heads, p.attention_head_dim, p.mlp_ratio, p.eps)
            for _ in range(p.num_layers)
        ])
        self.controlnet_blocks = nn.ModuleList([nn.Linear(dim, dim) for _ in range(p.num_layers)])
        self.controlnet_x_embedder = nn.Linear(p.condition_channels, dim)
        self._rope_cache: dict[tuple, Tensor] = {}

    compute_dtype: torch.dtype | None = None  # set by VRAM management when storage differs from computation

    @property
    def dtype(self) -> torch.dtype:
        return self.compute_dtype or self.img_in.weight.dtype

    @property
    def inpaint(self) -> bool:
        """Whether the net reads a masked picture and its mask (the Inpainting net) rather than a
        control picture (Union)."""
        return self.params.extra_condition_channels > 0

    def forward(self, latents: Tensor, condition: Tensor, timestep: Tensor, text: Tensor, text_mask: Tensor | None,
                height: int, width: int) -> list[Tensor]:
        """
        latents:   (B, Li, in_channels) the generated image's packed latents, Li = height * width
        condition: (B or 1, Li, condition_channels) the packed condition latents
        timestep:  (B,) or (1,) sigma in [0, 1]
        text, text_mask: the prompt's hidden states (B, Lt, joint_attention_dim) and mask (None: all real)
        Returns the block samples (B, Li, C) in the computation dtype, one per block, before any scale.
        """
        self._check_inputs(latents, condition, text, height, width)
        dtype = self.dtype
        batch = latents.shape[0]
        timestep = torch.as_tensor(timestep, device=latents.device).reshape(-1).expand(batch)
        img = self.img_in(latents.to(dtype)) + self.controlnet_x_embedder(condition.to(dtype))
        temb = self.time_text_embed(timestep, dtype)
        txt = self.txt_in(self.txt_norm(text.to(dtype)))
        if text_mask is not None and bool(text_mask.all()):
            text_mask = None
        mask = joint_attention_mask(None if text_mask is None else text_mask.to(latents.device, torch.bool),
                                    img.shape[1])
        freqs = self.rope(((height, width),), text.shape[1], latents.device)
        samples = []
        for block, project in zip(self.transformer_blocks, self.controlnet_blocks):
            img, txt = block(img, txt, temb, freqs, mask)
            samples.append(project(img))
        return samples

    def rope(self, grids: tuple[tuple[int, int], ...], text_len: int, device: torch.device) -> Tensor:
        key = (grids, text_len, torch.device(device))
        if key not in self._rope_cache:
            if len(self._rope_cache) >= 16:
                self._rope_cache.clear()
            self._rope_cache[key] = rope_frequencies(self.params.axes_dims_rope, self.params.rope_theta, grids,
                                                     text_len, device)
        return self._rope_cache[key]

    def _check_inputs(self, latents: Tensor, condition: Tensor, text: Tensor, height: int, width: int) -> None:
        p = self.params
        if latents.ndim != 3 or latents.shape[1:] != (height * width, p.in_channels):
            raise ValueError(f"QwenImageControlNet: latents must be (batch, {height}*{width}, {p.in_channels}), got "
                             f"{tuple(latents.shape)}")
        if condition.ndim != 3 or condition.shape[1:] != (height * width, p.condition_channels):
            raise ValueError(f"QwenImageControlNet: the condition must be (batch, {height}*{width}, "
                             f"{p.condition_channels}), got {tuple(condition.shape)}")
        if text.ndim != 3 or text.shape[-1] != p.joint_attention_dim or text.shape[1] == 0:
            raise ValueError(f"QwenImageControlNet: text must be (batch, text_tokens > 0, {p.joint_attention_dim}), "
                             f"got {tuple(text.shape)}")

    # -- checkpoint contract (pipelines.core.checkpoint.CheckpointModel) ------------------------

    @staticmethod
    def owns_checkpoint_key(key: str) -> bool:
        return _OWNED_KEY.match(key) is not None

    @staticmethod
    def convert_checkpoint_key(key: str) -> str | None:
        return key  # diffusers' layout is ours

    @classmethod
    def from_checkpoint(cls, shapes: Mapping[str, tuple[int, ...]],
                        config: dict[str, Any] | None) -> "QwenImageControlNet":
        return cls(params_from_checkpoint(shapes, config))


def _shape(shapes: Mapping[str, tuple[int, ...]], key: str, ndim: int) -> tuple[int, ...]:
    if key not in shapes:
        raise ValueError(f"Qwen-Image ControlNet checkpoint: required key {key!r} is missing")
    shape = tuple(shapes[key])
    if len(shape) != ndim:
        raise ValueError(f"Qwen-Image ControlNet checkpoint: {key!r} has shape {shape}, expected {ndim} dims")
    return shape


def _count(shapes: Mapping[str, tuple[int, ...]], name: str) -> int:
    """How many `name.N` blocks, checking that N runs 0..count-1."""
    found = {int(m.group(1)) for k in shapes if (m := _NUMBERED[name].match(k))}
    if found != set(range(len(found))):
        raise ValueError(f"Qwen-Image ControlNet checkpoint: {name} indices are not 0..N-1 (missing "
                         f"{sorted(set(range(max(found, default=-1) + 1)) - found)[:10]})")
    return len(found)


def params_from_checkpoint(shapes: Mapping[str, tuple[int, ...]],
                           config: dict[str, Any] | None) -> QwenImageControlNetParams:
    """The hyper-parameters from the tensor shapes; values in `config` (diffusers config.json) win."""
    config = dict(config or {})
    inner, in_channels = _shape(shapes, "img_in.weight", 2)
    txt_inner, joint_dim = _shape(shapes, "txt_in.weight", 2)
    embed_inner, condition_channels = _shape(shapes, "controlnet_x_embedder.weight", 2)
    if txt_inner != inner or embed_inner != inner:
        raise ValueError(f"Qwen-Image ControlNet checkpoint: 'img_in.weight' has {inner} rows but 'txt_in.weight' "
                         f"has {txt_inner} and 'controlnet_x_embedder.weight' {embed_inner}; all are the inner dim")
    if condition_channels < in_channels:
        raise ValueError(f"Qwen-Image ControlNet checkpoint: 'controlnet_x_embedder.weight' reads {condition_channels} "
                         f"channels, fewer than the {in_channels} of 'img_in.weight'")
    blocks, projections = _count(shapes, "transformer_blocks"), _count(shapes, "controlnet_blocks")
    if blocks == 0 or blocks != projections:
        raise ValueError(f"Qwen-Image ControlNet checkpoint: {blocks} transformer_blocks but {projections} "
                         "controlnet_blocks; a net has one projection per block")
    (head_dim,) = _shape(shapes, "transformer_blocks.0.attn.norm_q.weight", 1)
    head_dim = int(config.get("attention_head_dim") or head_dim)
    if inner % head_dim:
        raise ValueError(f"Qwen-Image ControlNet checkpoint: inner dim {inner} is not a multiple of the head dim "
                         f"{head_dim}")
    inferred = dict(in_channels=in_channels, num_layers=blocks, attention_head_dim=head_dim,
                    num_attention_heads=inner // head_dim, joint_attention_dim=joint_dim,
                    extra_condition_channels=condition_channels - in_channels)
    for name in _CONFIG_FIELDS:
        if config.get(name) is not None:
            inferred[name] = tuple(config[name]) if name == "axes_dims_rope" else int(config[name])
    inferred.setdefault("axes_dims_rope", default_rope_axes(inferred["attention_head_dim"]))
    return QwenImageControlNetParams(**inferred)
