"""The language model of Qwen3-VL, in plain torch: Qwen-Image 2.1's text encoder without its eyes.

`Qwen3TextModel` is what transformers calls `Qwen3VLTextModel`: token embeddings, N decoder
layers and a final RMSNorm. Each layer: RMSNorm, grouped-query self-attention (q/k/v/o
projections, no biases in the published checkpoints; per-head RMSNorm of the queries and keys,
`q_norm` / `k_norm`, before the rotary embedding), residual, RMSNorm, SwiGLU MLP, residual. It
computes what transformers 5.x computes with `attn_implementation="sdpa"`, operation for
operation.

Interleaved multimodal RoPE: the head_dim/2 rotary frequencies are not cut into contiguous
chunks (Qwen2.5-VL) but dealt out in turn: frequency i turns with the height position when
i % 3 == 1 and i < 3 * mrope_section[1], with the width position when i % 3 == 2 and
i < 3 * mrope_section[2], with the temporal position otherwise ([24, 20, 20] for head_dim
128); the angles are then repeated for the second half of the head (rotate-half convention).
For text the three positions are equal, which is plain RoPE.

DeepStack: the vision tower (`qwen3_vl_vision.py`) hands over one feature per picture token for
each of its deepstack layers; feature k is added to the hidden states at the picture tokens'
positions right after decoder layer k (k = 0, 1, 2 for the real model).

What `forward` returns is the output of the last decoder layer BEFORE the final norm: what
Qwen-Image 2.1 reads (diffusers' `QwenImage21Pipeline` neutralises transformers' final norm
with a hook to get it). `self.norm(h)` gives transformers' `last_hidden_state`.

The checkpoint contract (keys `model.language_model.*`) is the encoder's, `qwen3_vl_encoder.py`.
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from .qwen2_5_text import QwenMLP, QwenRMSNorm

# `enable_gqa` of scaled_dot_product_attention and safe softmax for fully masked rows (torch >= 2.5)
_TORCH_2_5 = tuple(int(v) for v in re.findall(r"\d+", torch.__version__)[:2]) >= (2, 5)
_ACTIVATIONS = ("silu", "swish", "gelu", "gelu_pytorch_tanh", "relu")  # what QwenMLP knows


@dataclass
class Qwen3TextParams:
    """The language model of Qwen3-VL. Defaults are Qwen3-VL-8B's, the text encoder of
    Qwen-Image 2.1 (hidden size 4096, the transformer's `context_in_dim`)."""

    vocab_size: int = 151936
    hidden_size: int = 4096
    intermediate_size: int = 12288
    num_hidden_layers: int = 36
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int = 128
    rms_norm_eps: float = 1e-6
    rope_theta: float = 5_000_000.0
    mrope_section: list[int] = field(default_factory=lambda: [24, 20, 20])
    hidden_act: str = "silu"
    attention_bias: bool = False

    def validate(self) -> None:
        where = "the config.json beside the weights (`text_config`)"
        if self.head_dim % 2 or self.head_dim < 2:
            raise ValueError(f"Qwen3-VL text model: head_dim {self.head_dim} must be even; fix `head_dim` in {where}")
        if len(self.mrope_section) != 3 or min(self.mrope_section) < 0:
            raise ValueError(
                f"Qwen3-VL text model: mrope_section {self.mrope_section} must be three counts of frequencies "
                f"(temporal, height, width; [24, 20, 20] for head_dim 128); fix `rope_parameters.mrope_section` "
                f"in {where}")
        if self.num_key_value_heads < 1 or self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"Qwen3-VL text model: {self.num_attention_heads} attention heads cannot share "
                f"{self.num_key_value_heads} key/value heads (grouped-query attention needs a multiple); fix "
                f"`num_attention_heads` / `num_key_value_heads` in {where}")
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"Qwen3-VL text model: hidden_act {self.hidden_act!r} is not supported "
                             f"({', '.join(_ACTIVATIONS)}; Qwen3-VL uses silu); fix `hidden_act` in {where}")


class Qwen3InterleavedRotary(nn.Module):
    """cos/sin tables of interleaved M-RoPE for (3, B, L) temporal/height/width positions ->
    (B, L, head_dim). Its buffers are non-persistent (not in the checkpoint) and built real even
    when the parameters are created on the meta device."""

    def __init__(self, head_dim: int, theta: float, mrope_section: Sequence[int]):
        super().__init__()
        exponents = torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim
        self.register_buffer("inv_freq", 1.0 / (theta ** exponents), persistent=False)
        axis = torch.zeros(head_dim // 2, dtype=torch.long)  # which position turns frequency i
        axis[1:3 * int(mrope_section[1]):3] = 1
        axis[2:3 * int(mrope_section[2]):3] = 2
        self.register_buffer("axis", axis, persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq = self.inv_freq.to(device=positions.device, dtype=torch.float32)
        angles = positions[..., None].float() * inv_freq  # (3, B, L, head_dim/2)
        index = self.axis.to(positions.device).view(1, 1, 1, -1).expand(1, *angles.shape[1:])
        angles = angles.gather(0, index)[0]  # frequency i from its axis
        angles = torch.cat((angles, angles), dim=-1)
        return angles.cos().to(dtype), angles.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def _repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(B, kv_heads, L, D) -> (B, kv_heads * groups, L, D): each key/value head once per query head."""
    if groups == 1:
        return x
    batch, heads, length, dim = x.shape
    return x[:, :, None].expand(batch, heads, groups, length, dim).reshape(batch, heads * groups, length, dim)


class Qwen3Attention(nn.Module):
    """Grouped-query self-attention with per-head q/k RMSNorm and rotary positions."""

    def __init__(self, p: Qwen3TextParams):
        super().__init__()
        self.head_dim = p.head_dim
        self.groups = p.num_attention_heads // p.num_key_value_heads
        self.scaling = p.head_dim**-0.5
        self.q_proj = nn.Linear(p.hidden_size, p.num_attention_heads * p.head_dim, bias=p.attention_bias)
        self.k_proj = nn.Linear(p.hidden_size, p.num_key_value_heads * p.head_dim, bias=p.attention_bias)
        self.v_proj = nn.Linear(p.hidden_size, p.num_key_value_heads * p.head_dim, bias=p.attention_bias)
        self.o_proj = nn.Linear(p.num_attention_heads * p.head_dim, p.hidden_size, bias=p.attention_bias)
        self.q_norm = QwenRMSNorm(p.head_dim, p.rms_norm_eps)
        self.k_norm = QwenRMSNorm(p.head_dim, p.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor | None) -> torch.Tensor:
        """`cos`/`sin` (B, 1, L, head_dim); `mask` None (causal) or boolean (B, 1, L, L), True
        where a query may attend to a key."""
        batch, length, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(batch, length, -1, self.head_dim)).transpose(1, 2)
        k = self.k_norm(self.k_proj(x).view(batch, length, -1, self.head_dim)).transpose(1, 2)
        v = self.v_proj(x).view(batch, length, -1, self.head_dim).transpose(1, 2)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        extra = {}
        if self.groups > 1:
            if mask is None and _TORCH_2_5:
                extra["enable_gqa"] = True  # the keys/values are not copied per query head
            else:
                k, v = _repeat_kv(k, self.groups), _repeat_kv(v, self.groups)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0, scale=self.scaling,
                                             is_causal=mask is None and length > 1, **extra)
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, -1))


class Qwen3DecoderLayer(nn.Module):
    def __init__(self, p: Qwen3TextParams):
        super().__init__()
        self.self_attn = Qwen3Attention(p)
        self.mlp = QwenMLP(p)
        self.input_layernorm = QwenRMSNorm(p.hidden_size, p.rms_norm_eps)
        self.post_attention_layernorm = QwenRMSNorm(p.hidden_size, p.rms_norm_eps)

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, mask)
        return h + self.mlp(self.post_attention_layernorm(h))


def causal_mask(attention_mask: torch.Tensor | None, batch: int, length: int,
                device: torch.device) -> torch.Tensor | None:
    """The boolean (B, 1, L, L) attention mask (a query sees the real tokens at or before it), or
    None where SDPA's causal flag does the same (no padding). A query with no real token at or
    before it (left padding) gets zeros from the attention."""
    if attention_mask is None:
        return None
    if tuple(attention_mask.shape) != (batch, length):
        raise ValueError(f"Qwen3-VL text model: attention_mask must be ({batch}, {length}), "
                         f"got {tuple(attention_mask.shape)}")
    keep = attention_mask.to(device=device, dtype=torch.bool)
    if bool(keep.all()):
        return None
    allowed = torch.ones(length, length, dtype=torch.bool, device=device).tril()[None, None]
    allowed = allowed & keep[:, None, None, :]
    if not _TORCH_2_5:  # older SDPA gives NaN for a query that may attend to nothing
        allowed = allowed | ~allowed.any(-1, keepdim=True)
    return allowed


class Qwen3TextModel(nn.Module):
    """The Qwen3-VL decoder. `forward(input_ids or inputs_embeds, attention_mask, position_ids,
    visual_mask, deepstack)` -> (B, L, hidden), the last decoder layer's output before `norm`.

    `attention_mask` (B, L), 1 for real tokens. `position_ids`: None (0..L-1 on all three axes,
    whatever the padding, as transformers does for text), (B, L) (the same on all three axes) or
    (3, B, L) temporal/height/width. `visual_mask` (B, L) bool marks the picture tokens and
    `deepstack` holds one (number of picture tokens, hidden) tensor per injected layer, in the
    order of the marked positions (row by row)."""

    def __init__(self, p: Qwen3TextParams):
        super().__init__()
        # given its weight, the embedding skips the random init (the checkpoint fills it anyway)
        self.embed_tokens = nn.Embedding(p.vocab_size, p.hidden_size, _weight=torch.empty(p.vocab_size, p.hidden_size))
        self.layers = nn.ModuleList(Qwen3DecoderLayer(p) for _ in range(p.num_hidden_layers))
        self.norm = QwenRMSNorm(p.hidden_size, p.rms_norm_eps)
        self.rotary_emb = Qwen3InterleavedRotary(p.head_dim, p.rope_theta, p.mrope_section)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        visual_mask: torch.Tensor | None = None,
        deepstack: Sequence[torch.Tensor] = (),
    ) -> torch.Tensor:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Qwen3-VL text model: give exactly one of input_ids and inputs_embeds")
        h = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        batch, length = h.shape[:2]
        positions = self._positions(position_ids, batch, length, h.device)
        if len(deepstack) > len(self.layers):
            raise ValueError(f"Qwen3-VL text model: {len(deepstack)} deepstack features for {len(self.layers)} "
                             "decoder layers; the vision tower and the language model come from different models")
        if deepstack and (visual_mask is None or any(int(visual_mask.sum()) != d.shape[0] for d in deepstack)):
            raise ValueError("Qwen3-VL text model: give visual_mask with as many marked positions as each "
                             "deepstack feature has rows")
        cos, sin = self.rotary_emb(positions, h.dtype)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # one table for all heads
        mask = causal_mask(attention_mask, batch, length, h.device)
        for index, layer in enumerate(self.layers):
            h = layer(h, cos, sin, mask)
            if index < len(deepstack):
                h = h.clone()
                h[visual_mask] = h[visual_mask] + deepstack[index].to(h.device, h.dtype)
        return h

    @staticmethod
    def _positions(position_ids: torch.Tensor | None, batch: int, length: int, device: torch.device) -> torch.Tensor:
        if position_ids is None:
            return torch.arange(length, device=device).view(1, 1, -1).expand(3, batch, -1)
        if position_ids.ndim == 2:
            position_ids = position_ids[None].expand(3, -1, -1)
        if tuple(position_ids.shape) != (3, batch, length):
            raise ValueError(f"Qwen3-VL text model: position_ids must be (3, {batch}, {length}) or "
                             f"({batch}, {length}), got {tuple(position_ids.shape)}")
        return position_ids.to(device)
