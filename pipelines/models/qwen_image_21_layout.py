"""Qwen-Image 2.1's joint sequence, for `qwen_image_21_dit.py` (whose docstring describes it): which keys each token
attends to (block-causal inside the prefix, everything for the target), several prompts' tokens packed into one
sequence and back, where each token sits (the prompt's text, the reference pictures' latent tokens in its vision
slots, the target) and the RoPE rotations of those positions, and the KV cache that keeps the prefix's keys and
values across steps."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

SLOT_TOKENS = 4  # one vision slot of the text encoder stands for 2x2 latent tokens


# (q, k, v) -> attention output, all (B, L, H, D); which keys each query sees is the callable's business
Attend = Callable[[Tensor, Tensor, Tensor], Tensor]


def sdpa(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:  # on (B, L, H, D) tensors
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                          attn_mask=mask).transpose(1, 2)


def prefix_attention(q: Tensor, k: Tensor, v: Tensor, segments: tuple[tuple[int, int, bool], ...],
                     key_valid: Tensor | None) -> Tensor:
    """Block-causal attention inside the prefix, one call per segment: a segment [start, end) sees the keys
    [0, end); a text segment sees its own keys causally, a picture all of its own. `key_valid` (B, P) drops
    padded text keys."""
    outputs = []
    for start, end, is_text in segments:
        mask = None
        if is_text:  # row i sees the keys up to start + i
            mask = torch.ones(end - start, end, dtype=torch.bool, device=q.device).tril(diagonal=start)[None, None]
        if key_valid is not None:
            valid = key_valid[:, None, None, :end]
            mask = valid if mask is None else mask & valid
        outputs.append(sdpa(q[:, start:end], k[:, :end], v[:, :end], mask))
    return torch.cat(outputs, dim=1)


def target_attention(q: Tensor, k: Tensor, v: Tensor, prefix_k: Tensor, prefix_v: Tensor,
                     key_valid: Tensor | None) -> Tensor:
    """The target sees every key: the prefix's, then its own. `key_valid` (B, P + T)."""
    mask = None if key_valid is None else key_valid[:, None, None, :]
    return sdpa(q, torch.cat([prefix_k, k], dim=1), torch.cat([prefix_v, v], dim=1), mask)


def packed(tensors: Sequence[Tensor], dim: int = 1) -> Tensor | None:
    """Several prompts' tokens one after the other along `dim` (their token axis); None for none."""
    if not tensors:
        return None
    return tensors[0] if len(tensors) == 1 else torch.cat(list(tensors), dim=dim)


def unpacked(tensors: Sequence[Tensor], lengths: Sequence[int]) -> list[tuple[Tensor, ...]]:
    """Each packed tensor (B, sum of lengths, ...) back into its prompts' parts (views)."""
    return [t.split(list(lengths), dim=1) for t in tensors]


def packed_attention(q: Tensor, k: Tensor, v: Tensor, parts: Sequence[tuple[int, Attend]]) -> Tensor:
    """Attention of several prompts' tokens packed one after the other (B, sum of lengths, H, D): each part, given
    as (its length, its attention), sees only its own queries, keys and values."""
    outputs, start = [], 0
    for length, attend in parts:
        end = start + length
        outputs.append(attend(q[:, start:end], k[:, start:end], v[:, start:end]))
        start = end
    return packed(outputs)


@dataclass(frozen=True)
class Layout:
    """Where every token of `[prefix | target]` sits (P prefix tokens, T target tokens)."""

    prefix_len: int
    text_index: Tensor    # (Nt,) positions of `text` that hold text, not vision slots
    prefix_text: Tensor   # (Nt,) where those tokens sit in the prefix
    prefix_image: Tensor  # (R,) where the reference pictures' latent tokens sit in the prefix, in order
    segments: tuple[tuple[int, int, bool], ...]  # the prefix as (start, end, is_text) runs
    freqs: Tensor         # (P + T, D/2) complex RoPE rotations

    def key_valid(self, text_mask: Tensor | None, target_len: int) -> Tensor | None:
        """(B, P + T) bool, False at padded text keys; None when nothing is padded."""
        if text_mask is None:
            return None
        valid = text_mask.new_ones(text_mask.shape[0], self.prefix_len + target_len)
        valid[:, self.prefix_text] = text_mask[:, self.text_index]
        return None if bool(valid.all()) else valid


def grid_positions(frame: int, height: int, width: int) -> Tensor:
    """(h * w, 3) positions of a picture's tokens: one frame, height and width centred on zero."""
    ys = torch.arange(height) - (height - height // 2)
    xs = torch.arange(width) - (width - width // 2)
    return torch.stack([torch.full((height * width,), frame), ys.repeat_interleave(width), xs.repeat(height)], -1)


def build_layout(slots: Tensor, references: tuple[tuple[int, int], ...], target: tuple[int, int],
                 axes: tuple[int, ...], theta: float, device: torch.device) -> Layout:
    """Text tokens advance one position on all three axes; a picture takes the next position as its frame, its
    grid centred on zero for height and width, and then advances the position by max(h, w)."""
    is_image = slots.repeat_interleave(torch.where(slots, SLOT_TOKENS, 1))  # the prefix: slots expanded
    prefix_len, image_at = is_image.numel(), is_image.nonzero()[:, 0].tolist()
    positions, segments = [], []
    cursor = position = offset = 0

    def text_run(end: int) -> None:
        nonlocal cursor, position
        if end > cursor:
            positions.append(torch.arange(position, position + end - cursor)[:, None].expand(-1, 3))
            segments.append((cursor, end, True))
            position += end - cursor

    for index, (height, width) in enumerate(references):
        count = height * width
        start = image_at[offset]
        if image_at[offset + count - 1] != start + count - 1:
            raise ValueError(f"QwenImage21DiT: reference picture {index} ({height}x{width} latent tokens) needs "
                             f"{count // SLOT_TOKENS} consecutive vision slots in the prompt, but text interrupts "
                             f"them; `references` must list the pictures' grids in the order of their slots")
        text_run(start)
        positions.append(grid_positions(position, height, width))
        segments.append((start, start + count, False))
        position, cursor, offset = position + max(height, width), start + count, offset + count
    text_run(prefix_len)
    positions.append(grid_positions(position, *target))

    positions = torch.cat(positions)
    tables = []
    for axis, dim in enumerate(axes):
        inv_freq = 1.0 / torch.pow(theta, torch.arange(0, dim, 2).to(torch.float32).div(dim))
        angles = torch.outer(positions[:, axis], inv_freq)
        tables.append(torch.polar(torch.ones_like(angles), angles))
    text_at = (~is_image).nonzero()[:, 0]
    return Layout(prefix_len, (~slots).nonzero()[:, 0].to(device), text_at.to(device),
                  torch.tensor(image_at, dtype=torch.long, device=device), tuple(segments),
                  torch.cat(tables, dim=-1).to(device))


class KVCache:
    """Every block's prefix keys and values (after RoPE), filled by the first forward given the cache, read by the
    later ones, with what they were computed from (`inputs`: text, mask, pictures, their layout, dtype, device)."""

    def __init__(self) -> None:
        self.clear()

    @property
    def filled(self) -> bool:
        return self.layers is not None

    def clear(self) -> None:
        self.layers: list[tuple[Tensor, Tensor]] | None = None
        self.inputs: tuple = ()

    def check(self, inputs: tuple) -> None:
        if len(inputs) != len(self.inputs) or not all(map(_same, inputs, self.inputs)):
            raise ValueError("QwenImage21DiT: this KVCache holds the keys and values of another prompt (text, "
                             "text_mask, pictures, their layout, dtype or device differ from the call that filled "
                             "it); use one cache per prompt and generation (one for the negative prompt too), or "
                             "cache.clear() it first")


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, Tensor) and isinstance(b, Tensor):
        return a is b or (a.shape == b.shape and a.dtype == b.dtype and a.device == b.device and torch.equal(a, b))
    return not isinstance(a, Tensor) and not isinstance(b, Tensor) and a == b
