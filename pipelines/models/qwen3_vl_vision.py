"""The vision tower of Qwen3-VL, in plain torch: pictures' patches -> picture tokens and DeepStack features.

`Qwen3VisionModel` is what transformers calls `Qwen3VLVisionModel`, under the same module and
parameter names (`model.visual.*` in a checkpoint):

- `patch_embed.proj`: a Conv3d over (temporal 2, 16, 16) patches, i.e. one linear map of each
  flattened patch of `in_channels * 2 * 16 * 16` values (the processor's `pixel_values` rows);
- `pos_embed`: a learned (side x side) grid of positions (side = sqrt(num_position_embeddings),
  48 for the real model) resampled bilinearly (align_corners=True) to each picture's patch grid
  and added to the patch embeddings;
- `blocks`: pre-norm transformer blocks (LayerNorm, attention with a 2-D rotary embedding of
  the patch's row and column, LayerNorm, MLP fc1 -> tanh-GELU -> fc2); a patch attends to the
  patches of its own picture only;
- `merger`: LayerNorm, then each 2x2 block of neighbouring patches concatenated (the processor
  emits them consecutively) and mapped by fc1 -> GELU -> fc2 to the language model's width:
  one picture token per 2x2 patches;
- `deepstack_merger_list`: one more merger per entry of `deepstack_visual_indexes` ([8, 16, 24]),
  applied to the output of that block, its LayerNorm over the concatenated 2x2 block. These are
  the DeepStack features the language model adds after its first decoder layers.

`forward(pixel_values, grid_thw)` -> (tokens (sum of t*h*w/4, out_hidden_size), [deepstack
feature (same shape) per deepstack layer]); `grid_thw` (num_pictures, 3) is the processor's
(1, rows, columns) of patches per picture. Everything is transformers' computation with
`attn_implementation="sdpa"`, operation for operation.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

_ACTIVATIONS = {
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
    "silu": F.silu,
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
}


@dataclass
class Qwen3VisionParams:
    """The vision tower of Qwen3-VL. Defaults are Qwen3-VL-8B's (Qwen-Image 2.1's text encoder)."""

    depth: int = 27
    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 16
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    out_hidden_size: int = 4096
    num_position_embeddings: int = 2304
    deepstack_visual_indexes: list[int] = field(default_factory=lambda: [8, 16, 24])
    hidden_act: str = "gelu_pytorch_tanh"
    rope_theta: float = 10000.0

    def validate(self) -> None:
        where = "`vision_config` in the config.json beside the weights"
        if self.hidden_size % self.num_heads or (self.hidden_size // self.num_heads) % 4:
            raise ValueError(
                f"Qwen3-VL vision tower: hidden_size {self.hidden_size} over {self.num_heads} heads must give a "
                f"head size that is a multiple of 4 (2-D rotary embedding); fix `num_heads` in {where}")
        side = math.isqrt(self.num_position_embeddings)
        if side < 2 or side * side != self.num_position_embeddings:
            raise ValueError(
                f"Qwen3-VL vision tower: num_position_embeddings {self.num_position_embeddings} is not the square "
                f"of a grid side of at least 2 (2304 = 48 x 48 for the real model); fix it in {where}")
        bad = [i for i in self.deepstack_visual_indexes if not 0 <= i < self.depth]
        if bad or len(set(self.deepstack_visual_indexes)) != len(self.deepstack_visual_indexes):
            raise ValueError(
                f"Qwen3-VL vision tower: deepstack_visual_indexes {self.deepstack_visual_indexes} must be distinct "
                f"block indexes below depth {self.depth}; fix them in {where}")
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"Qwen3-VL vision tower: hidden_act {self.hidden_act!r} is not supported "
                             f"({', '.join(_ACTIVATIONS)}); fix it in {where}")


# ---------------------------------------------------------------------------- grids


def patch_positions(grid_thw: torch.Tensor, merge: int) -> torch.Tensor:
    """(num_patches, 2) row and column of every patch, in the processor's order: 2x2 blocks of
    neighbouring patches one after the other, blocks row by row, every frame alike."""
    rows = []
    for t, h, w in grid_thw.tolist():
        row, col = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        blocks = (h // merge, merge, w // merge, merge)
        row = row.reshape(blocks).transpose(1, 2).flatten()
        col = col.reshape(blocks).transpose(1, 2).flatten()
        rows.append(torch.stack([row, col], dim=-1).repeat(t, 1))
    return torch.cat(rows).to(grid_thw.device)


def _bilinear_taps(index: torch.Tensor, size: torch.Tensor, side: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The two source rows (or columns) of the `side`-long learned grid that position `index` of
    an axis of `size` reads, and their weights (bilinear, align_corners=True, edges clamped)."""
    src = index.float() * (side - 1) / torch.clamp(size - 1, min=1)
    low = torch.floor(src)
    offsets = torch.arange(2, device=index.device)
    taps = (low.long()[:, None] + offsets).clamp(0, side - 1)
    weights = (1 - (src[:, None] - low[:, None] - offsets).abs()).clamp(min=0)
    return taps, weights


def position_taps(grid_thw: torch.Tensor, side: int, merge: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(num_patches, 4) indices into the flattened (side x side) position table and their
    bilinear weights: the learned grid resized to each picture's patch grid."""
    positions = patch_positions(grid_thw, merge)
    counts = grid_thw.prod(-1)
    heights = torch.repeat_interleave(grid_thw[:, 1], counts)
    widths = torch.repeat_interleave(grid_thw[:, 2], counts)
    row_taps, row_weights = _bilinear_taps(positions[:, 0], heights, side)
    col_taps, col_weights = _bilinear_taps(positions[:, 1], widths, side)
    indices = (row_taps[:, :, None] * side + col_taps[:, None, :]).reshape(-1, 4)
    weights = (row_weights[:, :, None] * col_weights[:, None, :]).reshape(-1, 4)
    return indices, weights


# ---------------------------------------------------------------------------- modules


class Qwen3VisionPatchEmbed(nn.Module):
    def __init__(self, p: Qwen3VisionParams):
        super().__init__()
        self.shape = (p.in_channels, p.temporal_patch_size, p.patch_size, p.patch_size)
        kernel = (p.temporal_patch_size, p.patch_size, p.patch_size)
        self.proj = nn.Conv3d(p.in_channels, p.hidden_size, kernel_size=kernel, stride=kernel, bias=True)

    def forward(self, pixel_values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        x = pixel_values.view(-1, *self.shape).to(dtype)
        return self.proj(x).view(x.shape[0], -1)


class Qwen3VisionRotary(nn.Module):
    """2-D rotary embedding: head_dim/4 frequencies turned by the row, the same by the column,
    the whole repeated for the second half of the head. `inv_freq` is a non-persistent buffer."""

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        half = head_dim // 2
        self.register_buffer("inv_freq", 1.0 / (theta ** (torch.arange(0, half, 2, dtype=torch.float32) / half)),
                             persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, 2) rows and columns -> float32 cos, sin (N, head_dim)."""
        angles = positions[..., None].float() * self.inv_freq.to(positions.device)  # (N, 2, head_dim/4)
        angles = angles.flatten(1)  # row frequencies, then column frequencies
        angles = torch.cat((angles, angles), dim=-1)
        return angles.cos(), angles.sin()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


class Qwen3VisionAttention(nn.Module):
    def __init__(self, p: Qwen3VisionParams):
        super().__init__()
        self.num_heads = p.num_heads
        self.scaling = (p.hidden_size // p.num_heads) ** -0.5
        self.qkv = nn.Linear(p.hidden_size, 3 * p.hidden_size, bias=True)
        self.proj = nn.Linear(p.hidden_size, p.hidden_size, bias=True)

    def forward(self, x: torch.Tensor, lengths: Sequence[int], cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """`x` (N, hidden), the patches of all pictures; `lengths`: patches per picture (and frame)."""
        n = x.shape[0]
        q, k, v = self.qkv(x).reshape(n, 3, self.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        cos, sin = cos[:, None], sin[:, None]  # rotated in float32
        q = (q.float() * cos + _rotate_half(q.float()) * sin).to(v.dtype)
        k = (k.float() * cos + _rotate_half(k.float()) * sin).to(v.dtype)
        q, k, v = (t.transpose(0, 1)[None] for t in (q, k, v))  # (1, heads, N, head_dim)
        pieces = [F.scaled_dot_product_attention(qi, ki, vi, dropout_p=0.0, scale=self.scaling)
                  for qi, ki, vi in zip(q.split(lengths, 2), k.split(lengths, 2), v.split(lengths, 2))]
        out = torch.cat(pieces, dim=2)[0].transpose(0, 1).reshape(n, -1)
        return self.proj(out)


class Qwen3VisionMLP(nn.Module):
    def __init__(self, p: Qwen3VisionParams):
        super().__init__()
        self.linear_fc1 = nn.Linear(p.hidden_size, p.intermediate_size, bias=True)
        self.linear_fc2 = nn.Linear(p.intermediate_size, p.hidden_size, bias=True)
        self.act = _ACTIVATIONS[p.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_fc2(self.act(self.linear_fc1(x)))


class Qwen3VisionBlock(nn.Module):
    def __init__(self, p: Qwen3VisionParams):
        super().__init__()
        self.norm1 = nn.LayerNorm(p.hidden_size, eps=1e-6)
        self.norm2 = nn.LayerNorm(p.hidden_size, eps=1e-6)
        self.attn = Qwen3VisionAttention(p)
        self.mlp = Qwen3VisionMLP(p)

    def forward(self, x: torch.Tensor, lengths: Sequence[int], cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), lengths, cos, sin)
        return x + self.mlp(self.norm2(x))


class Qwen3VisionMerger(nn.Module):
    """2x2 neighbouring patches -> one token of `out_hidden_size`. The LayerNorm runs per patch
    (`merger`) or over the concatenated block (`postshuffle`, the DeepStack mergers)."""

    def __init__(self, p: Qwen3VisionParams, postshuffle: bool):
        super().__init__()
        self.merged = p.hidden_size * p.spatial_merge_size**2
        self.postshuffle = postshuffle
        self.norm = nn.LayerNorm(self.merged if postshuffle else p.hidden_size, eps=1e-6)
        self.linear_fc1 = nn.Linear(self.merged, self.merged, bias=True)
        self.linear_fc2 = nn.Linear(self.merged, p.out_hidden_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x.reshape(-1, self.merged)) if self.postshuffle else self.norm(x).reshape(-1, self.merged)
        return self.linear_fc2(F.gelu(self.linear_fc1(x)))


class Qwen3VisionModel(nn.Module):
    """The Qwen3-VL vision tower (see the module docstring)."""

    def __init__(self, p: Qwen3VisionParams):
        super().__init__()
        p.validate()
        self.params = p
        self.side = math.isqrt(p.num_position_embeddings)
        self.patch_embed = Qwen3VisionPatchEmbed(p)
        self.pos_embed = nn.Embedding(p.num_position_embeddings, p.hidden_size,
                                      _weight=torch.empty(p.num_position_embeddings, p.hidden_size))
        self.rotary_pos_emb = Qwen3VisionRotary(p.hidden_size // p.num_heads, p.rope_theta)
        self.blocks = nn.ModuleList(Qwen3VisionBlock(p) for _ in range(p.depth))
        self.merger = Qwen3VisionMerger(p, postshuffle=False)
        self.deepstack_merger_list = nn.ModuleList(
            Qwen3VisionMerger(p, postshuffle=True) for _ in p.deepstack_visual_indexes)
        # The dtype to compute in when the weights are stored in another (float8 under VRAM
        # management); None = the weights' dtype.
        self.compute_dtype: torch.dtype | None = None

    def check_inputs(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> None:
        p = self.params
        if grid_thw.ndim != 2 or grid_thw.shape[1] != 3:
            raise ValueError(f"Qwen3-VL vision tower: grid_thw must be (num_pictures, 3), got {tuple(grid_thw.shape)}")
        merge = p.spatial_merge_size
        if bool((grid_thw < 1).any()) or bool((grid_thw[:, 1:] % merge != 0).any()):
            raise ValueError(f"Qwen3-VL vision tower: every grid_thw row must be positive, with rows and columns "
                             f"multiples of spatial_merge_size {merge}; got {grid_thw.tolist()}")
        patch_dim = p.in_channels * p.temporal_patch_size * p.patch_size**2
        patches = int(grid_thw.prod(-1).sum())
        if pixel_values.ndim != 2 or tuple(pixel_values.shape) != (patches, patch_dim):
            raise ValueError(
                f"Qwen3-VL vision tower: pixel_values has shape {tuple(pixel_values.shape)} but grid_thw describes "
                f"{patches} patches of {patch_dim} values; pass both from the same processor call")

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        self.check_inputs(pixel_values, grid_thw)
        grid_thw = grid_thw.to(pixel_values.device)
        dtype = self.compute_dtype or self.patch_embed.proj.weight.dtype
        x = self.patch_embed(pixel_values, dtype)
        indices, weights = position_taps(grid_thw, self.side, self.params.spatial_merge_size)
        x = x + (self.pos_embed(indices) * weights[:, :, None]).sum(1).to(x.dtype)
        cos, sin = self.rotary_pos_emb(patch_positions(grid_thw, self.params.spatial_merge_size))
        lengths = torch.repeat_interleave(grid_thw[:, 1] * grid_thw[:, 2], grid_thw[:, 0]).tolist()
        deepstack = []
        for index, block in enumerate(self.blocks):
            x = block(x, lengths, cos, sin)
            if index in self.params.deepstack_visual_indexes:
                merger = self.deepstack_merger_list[self.params.deepstack_visual_indexes.index(index)]
                deepstack.append(merger(x))
        return self.merger(x), deepstack
