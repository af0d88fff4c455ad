"""Qwen-Image's text encoder: the language model of Qwen2.5-VL-7B, in plain torch.

`QwenTextModel` is the decoder of Qwen2.5-VL (what transformers calls `Qwen2_5_VLTextModel`):
token embeddings, N decoder layers (RMSNorm, grouped-query attention with q/k/v biases through
`scaled_dot_product_attention`, multimodal rotary embeddings, SwiGLU MLP) and a final RMSNorm.
It computes what transformers 5.x computes with `attn_implementation="sdpa"`, operation for
operation, so its hidden states are those of `Qwen2_5_VLForConditionalGeneration(input_ids,
attention_mask, output_hidden_states=True).hidden_states[-1]` (what diffusers' QwenImagePipeline
reads): the output of the last decoder layer after the final RMSNorm. Nothing here imports
transformers: text-to-image starts without it.

Multimodal RoPE (M-RoPE): the head_dim/2 rotary frequencies are cut into `mrope_section`
chunks ([16, 24, 24] for head_dim 128), contiguous and in this order; the first chunk turns
with the temporal position, the second with the height position, the third with the width
position; the angles are then repeated for the second half of the head (rotate-half
convention). For text the three positions are the same, 0..L-1 whatever the padding, which
is plain RoPE.

Checkpoint layouts recognised (both Qwen2.5-VL):
- legacy, on the hub and what `save_pretrained` writes (transformers 4.5x and 5.x):
  `model.embed_tokens.*`, `model.layers.N.*`, `model.norm.*`, `lm_head.*`, `visual.*`;
- newer module layout: `model.language_model.*`, `model.visual.*`, `lm_head.*`.
The language model loads under `model.*` (the legacy names); `lm_head` and the vision tower
are recognised but not loaded (text-to-image does not use them).

`QwenImageVLEncoder` (below, for the Qwen-Image-Edit family) recognises the same keys and also
loads the vision tower under `visual.*` (transformers' module, imported only when that class is
built); it encodes prompts with pictures (the processor side is
`pipelines.models.qwen_image_vision`). Which of the two classes a pipeline offers to the loader
decides whether the vision tower is loaded.

`QwenTokenizer` (at the end) reads the Qwen2 tokenizer folder with the `tokenizers` library
alone and gives the ids `transformers.AutoTokenizer` gives for it.
"""
from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

Shapes = Mapping[str, tuple[int, ...]]

# Keys of the language model, relative to `model.` (legacy) or `model.language_model.` (newer).
_LM_KEY = re.compile(r"^(?:embed_tokens|norm|layers\.\d+)\.")
_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.")

# The MLP activations of transformers' ACT2FN that a Qwen2-family config may name.
_ACTIVATIONS = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}

# `enable_gqa` of scaled_dot_product_attention (torch >= 2.5), and fully masked rows giving
# zeros instead of NaN (the math kernel's safe softmax, torch >= 2.5).
_TORCH_2_5 = tuple(int(v) for v in re.findall(r"\d+", torch.__version__)[:2]) >= (2, 5)


def _default_mrope_section(head_dim: int) -> list[int]:
    """[16, 24, 24] for the real head_dim 128; the same proportions for other sizes."""
    half = head_dim // 2
    t = half // 4
    h = (half - t) // 2
    return [t, h, half - t - h]


@dataclass
class QwenTextEncoderParams:
    """The language model of Qwen2.5-VL. Defaults are the real Qwen-Image values (7B)."""

    vocab_size: int = 152064
    hidden_size: int = 3584
    intermediate_size: int = 18944
    num_hidden_layers: int = 28
    num_attention_heads: int = 28
    num_key_value_heads: int = 4
    head_dim: int = 128
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    mrope_section: list[int] = field(default_factory=lambda: [16, 24, 24])
    max_position_embeddings: int = 128000
    hidden_act: str = "silu"
    use_sliding_window: bool = False
    sliding_window: int | None = None
    max_window_layers: int = 28

    def validate(self) -> None:
        if sum(self.mrope_section) * 2 != self.head_dim:
            raise ValueError(
                f"text encoder: mrope_section {self.mrope_section} must sum to head_dim/2 = "
                f"{self.head_dim // 2}; fix `rope_scaling.mrope_section` (or `head_dim`) in the config"
            )
        if self.num_key_value_heads < 1 or self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"text encoder: {self.num_attention_heads} attention heads cannot share {self.num_key_value_heads} "
                "key/value heads (grouped-query attention needs a multiple); fix `num_attention_heads` / "
                "`num_key_value_heads` in the config.json beside the weights"
            )
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(
                f"text encoder: hidden_act {self.hidden_act!r} is not supported ({', '.join(_ACTIVATIONS)}; "
                "Qwen2.5-VL uses silu); fix `hidden_act` in the config.json beside the weights"
            )
        if self.use_sliding_window and self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(
                f"text encoder: sliding_window {self.sliding_window} must be at least 1; fix `sliding_window` "
                "(or set `use_sliding_window: false`) in the config.json beside the weights"
            )


def _text_config_dict(config: Mapping[str, Any]) -> dict[str, Any]:
    """The text parameters of a Qwen2.5-VL config.json: flat at the top level (hub files
    written by transformers 4.4x-4.5x), nested under `text_config` (transformers 5.x writes
    only that), or both; the nested values win."""
    merged = {k: v for k, v in config.items() if k not in ("text_config", "vision_config")}
    nested = config.get("text_config")
    if isinstance(nested, Mapping):
        merged.update({k: v for k, v in nested.items() if v is not None})
    return merged


# ==================================================================== the language model


class QwenRMSNorm(nn.Module):
    """RMSNorm computed in float32, the result cast back before the scale (as Qwen2 does)."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class QwenMultimodalRotary(nn.Module):
    """cos/sin tables of M-RoPE for (3, B, L) temporal/height/width positions -> (B, L, head_dim).

    `inv_freq` is a non-persistent float32 buffer (not in the checkpoint; built real even when
    the parameters are created on the meta device)."""

    def __init__(self, head_dim: int, theta: float, mrope_section: Sequence[int]):
        super().__init__()
        self.mrope_section = [int(s) for s in mrope_section]
        exponents = torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim
        self.register_buffer("inv_freq", 1.0 / (theta ** exponents), persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        angles = positions[..., None].float() * self.inv_freq.to(device=positions.device, dtype=torch.float32)
        return self._interleave(angles.cos()).to(dtype), self._interleave(angles.sin()).to(dtype)

    def _interleave(self, table: torch.Tensor) -> torch.Tensor:
        """(3, B, L, head_dim/2) -> (B, L, head_dim): chunk i of the frequencies from axis i % 3
        (temporal, height, width), then the whole repeated for the second half of the head."""
        chunks = table.split(self.mrope_section, dim=-1)
        half = torch.cat([chunk[i % 3] for i, chunk in enumerate(chunks)], dim=-1)
        return torch.cat((half, half), dim=-1)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def _repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(B, kv_heads, L, D) -> (B, kv_heads * groups, L, D), each key/value head repeated for the
    query heads that share it."""
    if groups == 1:
        return x
    batch, heads, length, dim = x.shape
    return x[:, :, None].expand(batch, heads, groups, length, dim).reshape(batch, heads * groups, length, dim)


class QwenAttention(nn.Module):
    """Grouped-query self-attention with q/k/v biases and rotary positions."""

    def __init__(self, p: QwenTextEncoderParams):
        super().__init__()
        self.num_heads = p.num_attention_heads
        self.num_kv_heads = p.num_key_value_heads
        self.head_dim = p.head_dim
        self.groups = p.num_attention_heads // p.num_key_value_heads
        self.scaling = p.head_dim**-0.5
        self.q_proj = nn.Linear(p.hidden_size, p.num_attention_heads * p.head_dim, bias=True)
        self.k_proj = nn.Linear(p.hidden_size, p.num_key_value_heads * p.head_dim, bias=True)
        self.v_proj = nn.Linear(p.hidden_size, p.num_key_value_heads * p.head_dim, bias=True)
        self.o_proj = nn.Linear(p.num_attention_heads * p.head_dim, p.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor | None) -> torch.Tensor:
        """`cos`/`sin` (B, 1, L, head_dim); `mask` None (causal) or boolean (B, 1, L, L), True
        where a query may attend to a key."""
        batch, length, _ = x.shape
        q = self.q_proj(x).view(batch, length, -1, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, length, -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, length, -1, self.head_dim).transpose(1, 2)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        extra = {}
        if self.groups > 1:
            if mask is None and self.head_dim <= 256 and _TORCH_2_5:
                extra["enable_gqa"] = True  # the keys/values are not copied per query head
            else:
                k, v = _repeat_kv(k, self.groups), _repeat_kv(v, self.groups)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0, scale=self.scaling,
                                             is_causal=mask is None and length > 1, **extra)
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, -1))


class QwenMLP(nn.Module):
    def __init__(self, p: QwenTextEncoderParams):
        super().__init__()
        self.gate_proj = nn.Linear(p.hidden_size, p.intermediate_size, bias=False)
        self.up_proj = nn.Linear(p.hidden_size, p.intermediate_size, bias=False)
        self.down_proj = nn.Linear(p.intermediate_size, p.hidden_size, bias=False)
        self.act = _ACTIVATIONS[p.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class QwenDecoderLayer(nn.Module):
    def __init__(self, p: QwenTextEncoderParams, index: int):
        super().__init__()
        self.self_attn = QwenAttention(p)
        self.mlp = QwenMLP(p)
        self.input_layernorm = QwenRMSNorm(p.hidden_size, p.rms_norm_eps)
        self.post_attention_layernorm = QwenRMSNorm(p.hidden_size, p.rms_norm_eps)
        # transformers' layer_types: sliding-window attention from layer max_window_layers on
        windowed = p.use_sliding_window and p.sliding_window is not None and index >= p.max_window_layers
        self.sliding_window: int | None = p.sliding_window if windowed else None

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, mask)
        return h + self.mlp(self.post_attention_layernorm(h))


class QwenTextModel(nn.Module):
    """The Qwen2.5-VL decoder: `forward(input_ids or inputs_embeds, attention_mask, position_ids)`
    -> (B, L, hidden), the last hidden state after the final norm.

    `attention_mask` (B, L), 1 for real tokens: every query attends to the earlier real tokens
    (and itself). Without padding the attention runs with SDPA's causal flag, with padding on a
    boolean (B, 1, L, L) mask, as transformers' SDPA path does; a query with no real token at
    or before it (left padding) gets zeros from the attention. `position_ids`: None (0..L-1 on
    all three axes), (B, L) (the same on all three) or (3, B, L) temporal/height/width."""

    def __init__(self, p: QwenTextEncoderParams):
        super().__init__()
        # given its weight, the embedding skips the random init: the checkpoint fills it anyway, and
        # normal_ on the meta device would import torch._dynamo (seconds) on a cold start
        self.embed_tokens = nn.Embedding(p.vocab_size, p.hidden_size, _weight=torch.empty(p.vocab_size, p.hidden_size))
        self.layers = nn.ModuleList(QwenDecoderLayer(p, i) for i in range(p.num_hidden_layers))
        self.norm = QwenRMSNorm(p.hidden_size, p.rms_norm_eps)
        self.rotary_emb = QwenMultimodalRotary(p.head_dim, p.rope_theta, p.mrope_section)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("text encoder: give exactly one of input_ids and inputs_embeds")
        h = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        batch, length = h.shape[:2]
        if position_ids is None:
            position_ids = torch.arange(length, device=h.device).view(1, 1, -1).expand(3, batch, -1)
        elif position_ids.ndim == 2:
            position_ids = position_ids[None].expand(3, -1, -1)
        if position_ids.shape != (3, batch, length):
            raise ValueError(f"text encoder: position_ids must be (3, {batch}, {length}) or ({batch}, {length}), "
                             f"got {tuple(position_ids.shape)}")
        cos, sin = self.rotary_emb(position_ids, h.dtype)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # one table for all heads
        masks = self._masks(attention_mask, batch, length, h.device)
        for layer in self.layers:
            h = layer(h, cos, sin, masks[layer.sliding_window])
        return self.norm(h)

    def _masks(self, attention_mask: torch.Tensor | None, batch: int, length: int,
               device: torch.device) -> dict[int | None, torch.Tensor | None]:
        """The boolean (B, 1, L, L) attention mask per window size (None: full causal), or None
        where SDPA's causal flag does the same: no padding and no window shorter than L."""
        padding = None
        if attention_mask is not None:
            if tuple(attention_mask.shape) != (batch, length):
                raise ValueError(f"text encoder: attention_mask must be ({batch}, {length}), "
                                 f"got {tuple(attention_mask.shape)}")
            keep = attention_mask.to(device=device, dtype=torch.bool)
            if int(keep.sum()) != keep.numel():
                padding = keep[:, None, None, :]
        masks: dict[int | None, torch.Tensor | None] = {}
        for window in {layer.sliding_window for layer in self.layers}:
            if padding is None and (window is None or length < window):
                masks[window] = None
                continue
            allowed = torch.ones(length, length, dtype=torch.bool, device=device).tril()
            if window is not None:
                allowed = allowed.triu(1 - window)  # the key at most window - 1 tokens back
            allowed = allowed[None, None].expand(batch, 1, length, length)
            if padding is not None:
                allowed = allowed & padding
                if not _TORCH_2_5:  # older SDPA gives NaN for a query that may attend to nothing
                    allowed = allowed | ~allowed.any(-1, keepdim=True)
            masks[window] = allowed
        return masks


class QwenImageTextEncoder(nn.Module):
    """Qwen2.5-VL language model: `forward(input_ids, attention_mask)` -> (B, L, hidden), the
    last hidden state after the final norm."""

    CHECKPOINT_REQUIRED_KEYS: tuple[str, ...] = (
        "model.embed_tokens.weight",
        "model.norm.weight",
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.self_attn.k_proj.weight",
        "model.layers.0.mlp.gate_proj.weight",
    )

    def __init__(self, params: QwenTextEncoderParams | None = None):
        super().__init__()
        self.params = params or QwenTextEncoderParams()
        self.params.validate()
        self.model = QwenTextModel(self.params)

    # ---- checkpoint contract (see pipelines/core/checkpoint.py) ----------------------------

    @staticmethod
    def owns_checkpoint_key(key: str) -> bool:
        if key.startswith(("lm_head.", "visual.", "model.visual.", "model.language_model.")):
            return True
        return key.startswith("model.") and bool(_LM_KEY.match(key[len("model."):]))

    @staticmethod
    def convert_checkpoint_key(key: str) -> str | None:
        if key.startswith(("lm_head.", "visual.", "model.visual.")):
            return None  # not used for text-to-image
        if key.startswith("model.language_model."):
            rest = key[len("model.language_model."):]
            if _LM_KEY.match(rest):
                return "model." + rest
        elif key.startswith("model.") and _LM_KEY.match(key[len("model."):]):
            return key
        raise KeyError(f"text encoder: {key!r} is not a key of a Qwen2.5-VL checkpoint")

    @classmethod
    def params_from_checkpoint(
        cls, shapes: Shapes, config: Mapping[str, Any] | None = None
    ) -> QwenTextEncoderParams:
        """Sizes from the converted-key shapes; `config` (a Qwen2.5-VL config.json, flat or
        with `text_config`) wins where it gives a value; the real values fill the rest."""
        for key in cls.CHECKPOINT_REQUIRED_KEYS:
            if key not in shapes:
                raise ValueError(f"text encoder checkpoint: missing tensor {key!r}")
        cfg = _text_config_dict(config or {})

        vocab, hidden = shapes["model.embed_tokens.weight"]
        layer_ids = {int(m.group(1)) for k in shapes if (m := _LAYER_KEY.match(k))}
        num_layers = max(layer_ids) + 1
        intermediate = shapes["model.layers.0.mlp.gate_proj.weight"][0]
        q_out = shapes["model.layers.0.self_attn.q_proj.weight"][0]
        kv_out = shapes["model.layers.0.self_attn.k_proj.weight"][0]

        if cfg.get("head_dim"):
            head_dim = int(cfg["head_dim"])
        elif cfg.get("num_attention_heads") and cfg.get("hidden_size"):
            head_dim = int(cfg["hidden_size"]) // int(cfg["num_attention_heads"])
        else:
            head_dim = 128
        for key, size in (
            ("model.layers.0.self_attn.q_proj.weight", q_out),
            ("model.layers.0.self_attn.k_proj.weight", kv_out),
        ):
            if size % head_dim:
                raise ValueError(
                    f"text encoder checkpoint: {key!r} has {size} output features, not a "
                    f"multiple of head_dim {head_dim}; give `head_dim` (or `num_attention_heads`) "
                    "in the config.json beside the weights"
                )

        rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
        rope_theta = rope.get("rope_theta", cfg.get("rope_theta", 1_000_000.0))
        mrope_section = rope.get("mrope_section") or _default_mrope_section(head_dim)

        use_sliding_window = bool(cfg.get("use_sliding_window", False))
        params = QwenTextEncoderParams(
            vocab_size=int(cfg.get("vocab_size", vocab)),
            hidden_size=int(cfg.get("hidden_size", hidden)),
            intermediate_size=int(cfg.get("intermediate_size", intermediate)),
            num_hidden_layers=int(cfg.get("num_hidden_layers", num_layers)),
            num_attention_heads=int(cfg.get("num_attention_heads", q_out // head_dim)),
            num_key_value_heads=int(cfg.get("num_key_value_heads", kv_out // head_dim)),
            head_dim=head_dim,
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope_theta),
            mrope_section=[int(s) for s in mrope_section],
            max_position_embeddings=int(cfg.get("max_position_embeddings", 128000)),
            hidden_act=str(cfg.get("hidden_act", "silu")),
            use_sliding_window=use_sliding_window,
            sliding_window=cfg.get("sliding_window") if use_sliding_window else None,
            max_window_layers=int(cfg.get("max_window_layers", num_layers)),
        )
        params.validate()  # every key and shape is then checked by the loader
        return params

    @classmethod
    def from_checkpoint(cls, shapes: Shapes, config: dict[str, Any] | None) -> "QwenImageTextEncoder":
        return cls(cls.params_from_checkpoint(shapes, config))

    # ---- forward ---------------------------------------------------------------------------

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if input_ids.ndim != 2:
            raise ValueError(f"text encoder: input_ids must be (batch, length), got {tuple(input_ids.shape)}")
        return self.model(input_ids=input_ids, attention_mask=attention_mask)


# ==================================================================== with the vision tower

_VISION_BLOCK_KEY = re.compile(r"^visual\.blocks\.(\d+)\.")
IMAGE_TOKEN_ID = 151655  # <|image_pad|> of the Qwen2.5-VL tokenizer


@dataclass
class QwenVisionParams:
    """The vision tower of Qwen2.5-VL. Defaults are the real Qwen2.5-VL-7B values (its
    config.json `vision_config`); transformers' `Qwen2_5_VLVisionConfig` defaults differ in
    hidden_size (3584 there) and tokens_per_second (4 there, video only)."""

    depth: int = 32
    hidden_size: int = 1280
    intermediate_size: int = 3420
    num_heads: int = 16
    out_hidden_size: int = 3584
    in_channels: int = 3
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    window_size: int = 112
    fullatt_block_indexes: list[int] = field(default_factory=lambda: [7, 15, 23, 31])
    hidden_act: str = "silu"
    tokens_per_second: int = 2
    rope_theta: float = 10000.0

    def validate(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"vision tower: hidden_size {self.hidden_size} is not a multiple of num_heads "
                f"{self.num_heads}; fix `vision_config.num_heads` in the config.json beside the weights"
            )
        if (self.hidden_size // self.num_heads) % 4:
            raise ValueError(
                f"vision tower: head size {self.hidden_size // self.num_heads} must be a multiple of 4 "
                "(2-D rotary embedding); fix `vision_config.num_heads` in the config.json beside the weights"
            )
        if self.window_size // self.spatial_merge_size // self.patch_size < 1:
            raise ValueError(
                f"vision tower: window_size {self.window_size} is smaller than patch_size * "
                f"spatial_merge_size = {self.patch_size * self.spatial_merge_size}; fix "
                "`vision_config.window_size` in the config.json beside the weights"
            )

    def to_transformers_config(self):
        from transformers import Qwen2_5_VLVisionConfig

        return Qwen2_5_VLVisionConfig(
            depth=self.depth,
            hidden_size=self.hidden_size,
            hidden_act=self.hidden_act,
            intermediate_size=self.intermediate_size,
            num_heads=self.num_heads,
            in_channels=self.in_channels,
            patch_size=self.patch_size,
            spatial_merge_size=self.spatial_merge_size,
            temporal_patch_size=self.temporal_patch_size,
            tokens_per_second=self.tokens_per_second,
            window_size=self.window_size,
            out_hidden_size=self.out_hidden_size,
            fullatt_block_indexes=list(self.fullatt_block_indexes),
            # transformers 5.x reads the theta from here; 4.x hard-codes the same 10000
            rope_parameters={"rope_type": "axial", "rope_theta": self.rope_theta},
            attn_implementation="sdpa",
        )


def _config_value(cfg: Mapping[str, Any], *names: str) -> Any:
    return next((cfg[n] for n in names if cfg.get(n) is not None), None)


def _image_token_id(config: Mapping[str, Any] | None) -> int:
    config = config or {}
    nested = config.get("text_config") if isinstance(config.get("text_config"), Mapping) else {}
    value = _config_value(config, "image_token_id")
    if value is None:
        value = _config_value(nested, "image_token_id")
    return int(value) if value is not None else IMAGE_TOKEN_ID


class QwenImageVLEncoder(QwenImageTextEncoder):
    """Qwen2.5-VL language model + vision tower, for the Qwen-Image-Edit family.

    `forward(input_ids, attention_mask, pixel_values, image_grid_thw)` -> (B, L, hidden), the
    last hidden state after the final norm: equal to transformers'
    `Qwen2_5_VLForConditionalGeneration(..., output_hidden_states=True).hidden_states[-1]` with
    3-D M-RoPE positions (what `get_rope_index` computes from the image grids). Without
    pictures it is exactly `QwenImageTextEncoder.forward`.

    The vision tower is transformers' `Qwen2_5_VisionTransformerPretrainedModel` under the
    module name `visual`, so the legacy on-disk keys `visual.*` load as they are and the newer
    `model.visual.*` lose their `model.` prefix. `lm_head` is still not loaded.
    """

    CHECKPOINT_REQUIRED_KEYS: tuple[str, ...] = QwenImageTextEncoder.CHECKPOINT_REQUIRED_KEYS + (
        "visual.patch_embed.proj.weight",
    )
    # vision tensors the sizes are read from (beyond the required one)
    VISION_SIZE_KEYS: tuple[str, ...] = (
        "visual.patch_embed.proj.weight",
        "visual.blocks.0.attn.qkv.weight",
        "visual.blocks.0.mlp.gate_proj.weight",
        "visual.merger.mlp.0.weight",
        "visual.merger.mlp.2.weight",
    )

    def __init__(
        self,
        params: QwenTextEncoderParams | None = None,
        vision: QwenVisionParams | None = None,
        image_token_id: int = IMAGE_TOKEN_ID,
    ):
        super().__init__(params)
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

        self.vision_params = vision or QwenVisionParams()
        self.vision_params.validate()
        if self.vision_params.out_hidden_size != self.params.hidden_size:
            raise ValueError(
                f"vision tower: out_hidden_size {self.vision_params.out_hidden_size} differs from the "
                f"language model's hidden_size {self.params.hidden_size}; the text encoder and vision "
                "tower come from different models"
            )
        self.image_token_id = int(image_token_id)
        self.visual = Qwen2_5_VisionTransformerPretrainedModel(self.vision_params.to_transformers_config())
        # The dtype to compute in when the weights are stored in another (float8 under VRAM
        # management); None = the weights' dtype.
        self.compute_dtype: torch.dtype | None = None
        self.visual.patch_embed.forward = self._embed_patches

    def _embed_patches(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """transformers' patch embedding, casting the pixels to the dtype the projection computes
        in: transformers casts them to the stored weight's dtype, which is wrong (float8) when
        the weights are stored apart from the computation."""
        embed = self.visual.patch_embed
        v = self.vision_params
        dtype = self.compute_dtype or embed.proj.weight.dtype
        x = pixel_values.view(-1, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size).to(dtype)
        return embed.proj(x).view(-1, embed.embed_dim)

    # ---- checkpoint contract -----------------------------------------------------------------

    @staticmethod
    def convert_checkpoint_key(key: str) -> str | None:
        if key.startswith("visual."):
            return key
        if key.startswith("model.visual."):
            return key[len("model."):]
        return QwenImageTextEncoder.convert_checkpoint_key(key)

    @classmethod
    def vision_params_from_checkpoint(
        cls, shapes: Shapes, config: Mapping[str, Any] | None = None
    ) -> QwenVisionParams:
        """Vision sizes from the converted-key shapes; `config["vision_config"]` wins where it
        gives a value; the real Qwen2.5-VL-7B values fill the rest (num_heads, window_size,
        fullatt_block_indexes cannot be read from shapes)."""
        missing = [k for k in cls.VISION_SIZE_KEYS if k not in shapes]
        if missing:
            raise ValueError(
                f"text encoder checkpoint: no vision tower (missing {', '.join(missing)}). Editing "
                "needs the full Qwen2.5-VL text encoder with its `visual.*` tensors, e.g. the "
                "`text_encoder/` folder of Qwen/Qwen-Image-Edit; a text-only export cannot encode pictures"
            )
        cfg = (config or {}).get("vision_config") or {}
        if not isinstance(cfg, Mapping):
            raise ValueError(f"text encoder config: `vision_config` must be an object, got {type(cfg).__name__}")

        hidden, in_channels, temporal, patch, patch_w = shapes["visual.patch_embed.proj.weight"]
        if patch != patch_w:
            raise ValueError(
                f"text encoder checkpoint: 'visual.patch_embed.proj.weight' has a non-square patch "
                f"{patch}x{patch_w}, not a Qwen2.5-VL vision tower"
            )
        block_ids = {int(m.group(1)) for k in shapes if (m := _VISION_BLOCK_KEY.match(k))}
        depth = max(block_ids) + 1
        intermediate = shapes["visual.blocks.0.mlp.gate_proj.weight"][0]
        merged = shapes["visual.merger.mlp.0.weight"][1]
        out_hidden = shapes["visual.merger.mlp.2.weight"][0]
        hidden = int(_config_value(cfg, "hidden_size") or hidden)
        merge = math.isqrt(merged // hidden) if merged % hidden == 0 else 0
        if merge * merge * hidden != merged:
            raise ValueError(
                f"text encoder checkpoint: 'visual.merger.mlp.0.weight' takes {merged} features, not "
                f"hidden_size {hidden} times a square merge size; give `vision_config` in the "
                "config.json beside the weights"
            )
        fullatt = _config_value(cfg, "fullatt_block_indexes")
        rope = _config_value(cfg, "rope_parameters")
        rope_theta = rope.get("rope_theta", 10000.0) if isinstance(rope, Mapping) else 10000.0
        params = QwenVisionParams(
            depth=int(_config_value(cfg, "depth", "num_hidden_layers") or depth),
            hidden_size=hidden,
            intermediate_size=int(_config_value(cfg, "intermediate_size") or intermediate),
            num_heads=int(_config_value(cfg, "num_heads", "num_attention_heads") or 16),
            out_hidden_size=int(_config_value(cfg, "out_hidden_size") or out_hidden),
            in_channels=int(_config_value(cfg, "in_channels", "in_chans") or in_channels),
            patch_size=int(_config_value(cfg, "patch_size", "spatial_patch_size") or patch),
            temporal_patch_size=int(_config_value(cfg, "temporal_patch_size") or temporal),
            spatial_merge_size=int(_config_value(cfg, "spatial_merge_size") or merge),
            window_size=int(_config_value(cfg, "window_size") or 112),
            fullatt_block_indexes=[int(i) for i in fullatt] if fullatt is not None else [7, 15, 23, 31],
            hidden_act=str(_config_value(cfg, "hidden_act") or "silu"),
            tokens_per_second=int(_config_value(cfg, "tokens_per_second") or 2),
            rope_theta=float(rope_theta),
        )
        params.validate()  # every key and shape is then checked by the loader
        return params

    @classmethod
    def from_checkpoint(cls, shapes: Shapes, config: dict[str, Any] | None) -> "QwenImageVLEncoder":
        vision = cls.vision_params_from_checkpoint(shapes, config)
        return cls(cls.params_from_checkpoint(shapes, config), vision, _image_token_id(config))

    # ---- forward ---------------------------------------------------------------------------

    def image_features(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor) -> torch.Tensor:
        """(num_patches, C*T*P*P) -> (num_image_tokens, hidden): the merged patch features of
        all pictures, in order (what replaces the `<|image_pad|>` embeddings)."""
        if image_grid_thw.ndim != 2 or image_grid_thw.shape[1] != 3:
            raise ValueError(f"image_grid_thw must be (num_images, 3), got {tuple(image_grid_thw.shape)}")
        v = self.vision_params
        patch_dim = v.in_channels * v.temporal_patch_size * v.patch_size**2
        patches = int(image_grid_thw.prod(-1).sum())
        if pixel_values.ndim != 2 or pixel_values.shape != (patches, patch_dim):
            raise ValueError(
                f"pixel_values has shape {tuple(pixel_values.shape)} but image_grid_thw describes "
                f"{patches} patches of {patch_dim} values; pass both from the same QwenVLProcessor call"
            )
        out = self.visual(pixel_values, grid_thw=image_grid_thw)
        return getattr(out, "pooler_output", out)  # transformers 5.x returns an output object

    def mrope_position_ids(
        self,
        input_ids: torch.Tensor,
        image_grid_thw: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(3, B, L) temporal/height/width positions (transformers' `get_rope_index` for
        pictures): text tokens advance all three by one; the tokens of a picture with a merged
        grid (t, h, w) sit at start + (t, row, column), and the text after it continues from
        start + max(h, w). Counted over unmasked tokens only; masked ones get 0."""
        merge = self.vision_params.spatial_merge_size
        grids = iter(image_grid_thw.tolist())
        batch, length = input_ids.shape
        positions = torch.zeros(3, batch, length, dtype=torch.long, device=input_ids.device)
        for row in range(batch):
            if attention_mask is not None:
                keep = attention_mask[row].bool()
            else:
                keep = torch.ones_like(input_ids[row], dtype=torch.bool)
            is_image = (input_ids[row][keep] == self.image_token_id).tolist()
            pieces, start, i = [], 0, 0
            while i < len(is_image):
                if not is_image[i]:
                    j = i
                    while j < len(is_image) and not is_image[j]:
                        j += 1
                    pieces.append(torch.arange(start, start + j - i).expand(3, -1))
                    start += j - i
                    i = j
                    continue
                grid = next(grids, None)
                if grid is None:
                    raise ValueError("the prompts hold more pictures' <|image_pad|> runs than image_grid_thw rows")
                t, h, w = grid[0], grid[1] // merge, grid[2] // merge
                count = t * h * w
                run = is_image[i:i + count]
                if len(run) != count or not all(run):
                    raise ValueError(
                        f"row {row}: a picture with grid {grid} needs {count} consecutive <|image_pad|> "
                        "tokens; expand the placeholders with QwenVLProcessor"
                    )
                tt, hh, ww = torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij")
                pieces.append(torch.stack([tt, hh, ww]).reshape(3, -1) + start)
                start += max(h, w)
                i += count
            if pieces:
                positions[:, row, keep] = torch.cat(pieces, dim=1).to(positions.device)
        if next(grids, None) is not None:
            raise ValueError("image_grid_thw has more rows than the prompts hold pictures")
        return positions

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if input_ids.ndim != 2:
            raise ValueError(f"text encoder: input_ids must be (batch, length), got {tuple(input_ids.shape)}")
        image_tokens = input_ids == self.image_token_id
        if pixel_values is None and image_grid_thw is None:
            if bool(image_tokens.any()):
                raise ValueError(
                    f"text encoder: the prompt holds {int(image_tokens.sum())} <|image_pad|> token(s) but "
                    "no pixel_values were given; pass the pictures (QwenVLProcessor output) or drop the placeholders"
                )
            return super().forward(input_ids, attention_mask)
        if pixel_values is None or image_grid_thw is None:
            raise ValueError("text encoder: give pixel_values and image_grid_thw together")

        image_grid_thw = image_grid_thw.to(input_ids.device)  # the vision tower builds positions on its device
        embeds = self.model.embed_tokens(input_ids)
        features = self.image_features(pixel_values.to(input_ids.device), image_grid_thw)
        if int(image_tokens.sum()) != features.shape[0]:
            raise ValueError(
                f"text encoder: {int(image_tokens.sum())} <|image_pad|> tokens in the prompt but the "
                f"pictures give {features.shape[0]} features; expand the placeholders with QwenVLProcessor"
            )
        mask = image_tokens.unsqueeze(-1).expand_as(embeds)
        embeds = embeds.masked_scatter(mask, features.to(embeds.device, embeds.dtype))
        positions = self.mrope_position_ids(input_ids, image_grid_thw, attention_mask)
        return self.model(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=positions)


# ==================================================================== tokenizer

# The pre-tokenizer split of Qwen2 / Qwen2.5 (single digits). transformers 5.x builds its
# Qwen2Tokenizer with this pattern whatever tokenizer.json says; so does QwenTokenizer.
QWEN2_PRETOKENIZE_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
QWEN2_TOKENIZER_CLASSES = ("Qwen2Tokenizer", "Qwen2TokenizerFast")
# Qwen2Tokenizer's defaults for the named special tokens a tokenizer_config.json leaves out.
_QWEN2_SPECIAL_DEFAULTS = {"bos_token": None, "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
                           "pad_token": "<|endoftext|>"}
_NAMED_SPECIAL = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
_TOKENIZER_FIX = ("fetch the model's `tokenizer/` folder again (for Qwen-Image: tokenizer.json or vocab.json + "
                  "merges.txt, with tokenizer_config.json), or write one with "
                  "pipelines.demo.tokenizer.build_qwen_tokenizer")


class TokenizerOutput(dict):
    """`input_ids` and `attention_mask`, as keys and as attributes (like transformers' BatchEncoding)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def _read_json_file(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ValueError(f"{path}: cannot read it as JSON ({error}); {_TOKENIZER_FIX}") from error


def _token_content(value: Any, where: str) -> str | None:
    """A special token as the config files write it: a string, null, or {"content": ...}."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    raise ValueError(f"{where}: a special token must be a string or {{\"content\": ...}}, got {value!r}")


class QwenTokenizer:
    """The Qwen2 / Qwen2.5-VL byte-level BPE tokenizer on the `tokenizers` library alone.

    `QwenTokenizer.from_folder(folder)` reads a hub tokenizer folder (tokenizer.json, or
    vocab.json + merges.txt; tokenizer_config.json, special_tokens_map.json, added_tokens.json)
    the way transformers 5.x's `AutoTokenizer` builds its `Qwen2Tokenizer` from it: the BPE
    model with Qwen2's settings, NFC normalisation, Qwen2's split pattern then the byte-level
    mapping (the pre-tokenizer written in tokenizer.json is not used, as in transformers), the
    added tokens of tokenizer_config.json at their ids, the named special tokens, the padding
    side. Calling it gives the ids `AutoTokenizer` gives:

        tokenizer(text or [texts], return_tensors="pt", padding=True) -> input_ids, attention_mask
    """

    def __init__(self, backend: Any, *, special_tokens: Mapping[str, str | None], padding_side: str = "right",
                 source: str = "tokenizer"):
        if padding_side not in ("right", "left"):
            raise ValueError(f"{source}: padding_side must be 'right' or 'left', got {padding_side!r}")
        self._backend = backend
        self.special_tokens = dict(special_tokens)
        self.padding_side = padding_side
        self.source = source

    # ---- loading -----------------------------------------------------------------------------

    @classmethod
    def from_folder(cls, folder: str | os.PathLike) -> "QwenTokenizer":
        from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers

        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder}: no such tokenizer folder; {_TOKENIZER_FIX}")
        config = cls._read_config(folder, "tokenizer_config.json")
        special_map = cls._read_config(folder, "special_tokens_map.json")
        tokenizer_class = config.get("tokenizer_class")
        if tokenizer_class is not None and tokenizer_class not in QWEN2_TOKENIZER_CLASSES:
            raise ValueError(
                f"{folder / 'tokenizer_config.json'}: tokenizer_class {tokenizer_class!r} is not a Qwen2 tokenizer "
                f"({' or '.join(QWEN2_TOKENIZER_CLASSES)}); Qwen-Image needs the Qwen2.5-VL tokenizer: "
                f"{_TOKENIZER_FIX}")

        backend, source, from_json = cls._read_backend(folder, "added_tokens_decoder" in config)
        # what transformers' Qwen2Tokenizer sets, whatever the file says
        add_prefix_space = bool(config.get("add_prefix_space") or False)
        backend.normalizer = normalizers.NFC()
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space, use_regex=False),
        ])
        backend.decoder = decoders.ByteLevel()
        file_padding = backend.padding
        backend.no_padding()  # padding and truncation are done per call
        backend.no_truncation()
        backend.encode_special_tokens = bool(config.get("split_special_tokens") or False)

        special = {}
        for name in _NAMED_SPECIAL:
            where = folder / ("tokenizer_config.json" if name in config else "special_tokens_map.json")
            if name in config:
                special[name] = _token_content(config[name], str(where))
            elif name in special_map:
                special[name] = _token_content(special_map[name], str(where))
            elif name == "pad_token" and file_padding is not None:
                special[name] = file_padding.get("pad_token")
            else:
                special[name] = _QWEN2_SPECIAL_DEFAULTS.get(name)
        extra = config.get("additional_special_tokens") or config.get("extra_special_tokens") or \
            special_map.get("additional_special_tokens") or []
        extra_contents = [_token_content(t, str(folder / "tokenizer_config.json")) for t in extra]

        cls._add_declared_tokens(backend, folder, config, special, extra_contents, from_json)
        missing = [t for t in [*special.values(), *extra_contents] if t is not None and backend.token_to_id(t) is None]
        if missing:  # named special tokens the files do not declare: appended, as transformers does
            backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in dict.fromkeys(missing)])
        cls._set_post_processor(backend, config, special, keep=from_json)

        padding_side = config.get("padding_side") or (file_padding or {}).get("direction") or "right"
        return cls(backend, special_tokens=special, padding_side=padding_side, source=source)

    @staticmethod
    def _read_config(folder: Path, name: str) -> dict:
        path = folder / name
        if not path.is_file():
            return {}
        data = _read_json_file(path)
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}; {_TOKENIZER_FIX}")
        return data

    @staticmethod
    def _read_backend(folder: Path, config_declares_added: bool) -> tuple[Any, str, bool]:
        """The `tokenizers.Tokenizer` with the BPE model of tokenizer.json (or vocab.json +
        merges.txt) set up as transformers' Qwen2Tokenizer builds it; (tokenizer, source, from tokenizer.json)."""
        from tokenizers import Tokenizer
        from tokenizers.models import BPE

        settings = dict(dropout=None, unk_token=None, continuing_subword_prefix="", end_of_word_suffix="",
                        fuse_unk=False, byte_fallback=False)
        path = folder / "tokenizer.json"
        if path.is_file():
            try:
                backend = Tokenizer.from_file(str(path))
            except Exception as error:  # the tokenizers library raises bare Exceptions for broken files
                raise ValueError(f"{path}: the `tokenizers` library cannot read it ({error}); {_TOKENIZER_FIX}") \
                    from error
            if not isinstance(backend.model, BPE):
                raise ValueError(f"{path}: the model is {type(backend.model).__name__}, not the byte-level BPE of "
                                 f"the Qwen2 tokenizer; {_TOKENIZER_FIX}")
            for name, value in {**settings, "ignore_merges": False}.items():
                setattr(backend.model, name, value)
            if config_declares_added:
                # tokenizer_config.json's added tokens are the ones that count (transformers drops the
                # file's): the same BPE model in a tokenizer without them
                written = backend
                backend = Tokenizer(written.model)
                backend.post_processor = written.post_processor
                if written.padding is not None:
                    backend.enable_padding(**written.padding)
            return backend, str(path), True
        vocab, merges = folder / "vocab.json", folder / "merges.txt"
        if not vocab.is_file() or not merges.is_file():
            found = sorted(p.name for p in folder.iterdir())
            lacking = " and ".join(p.name for p in (vocab, merges) if not p.is_file())
            raise FileNotFoundError(
                f"{folder}: no tokenizer.json and no {lacking} (found: {', '.join(found) or 'nothing'}); "
                f"{_TOKENIZER_FIX}")
        try:
            model = BPE.from_file(str(vocab), str(merges), **settings)
        except Exception as error:
            raise ValueError(f"{vocab} + {merges.name}: the `tokenizers` library cannot read them ({error}); "
                             f"{_TOKENIZER_FIX}") from error
        return Tokenizer(model), str(vocab.parent), False

    @staticmethod
    def _add_declared_tokens(backend: Any, folder: Path, config: Mapping[str, Any], special: Mapping[str, Any],
                             extra: Sequence[str | None], from_json: bool) -> None:
        """The added tokens at the ids the files declare: tokenizer_config.json's
        `added_tokens_decoder`, or without it added_tokens.json (special when named as such)
        and tokenizer.json's own list (already in the backend)."""
        from tokenizers import AddedToken

        declared: dict[int, AddedToken] = {}
        source = folder / "tokenizer_config.json"
        if "added_tokens_decoder" in config:
            entries = config["added_tokens_decoder"]
            if not isinstance(entries, Mapping):
                raise ValueError(f"{source}: `added_tokens_decoder` must be an object of id -> token; {_TOKENIZER_FIX}")
            for index, entry in entries.items():
                try:
                    token_id = int(index)
                    declared[token_id] = AddedToken(
                        entry["content"], single_word=bool(entry.get("single_word", False)),
                        lstrip=bool(entry.get("lstrip", False)), rstrip=bool(entry.get("rstrip", False)),
                        normalized=bool(entry.get("normalized", not entry.get("special", False))),
                        special=bool(entry.get("special", False)))
                except (TypeError, ValueError, KeyError, AttributeError) as error:
                    raise ValueError(f"{source}: added token {index!r} is not an id with a token "
                                     f"{{\"content\": ...}} ({error!r}); {_TOKENIZER_FIX}") from error
        elif (folder / "added_tokens.json").is_file():
            source = folder / "added_tokens.json"
            entries = _read_json_file(source)
            named = {t for t in [*special.values(), *extra] if t is not None}
            if not isinstance(entries, Mapping) or not all(isinstance(i, int) for i in entries.values()):
                raise ValueError(f"{source}: expected an object of token -> id; {_TOKENIZER_FIX}")
            for content, token_id in entries.items():
                declared[token_id] = AddedToken(content, single_word=False, lstrip=False, rstrip=False,
                                                normalized=content not in named, special=content in named)
        for token_id, token in sorted(declared.items()):
            present = backend.token_to_id(token.content)
            if present is None:
                (backend.add_special_tokens if token.special else backend.add_tokens)([token])
                present = backend.token_to_id(token.content)
            if present != token_id:
                raise ValueError(
                    f"{source}: the added token {token.content!r} is declared with id {token_id} but the vocabulary "
                    f"gives it {present}: the tokenizer files do not belong together; {_TOKENIZER_FIX}")

    @staticmethod
    def _set_post_processor(backend: Any, config: Mapping[str, Any], special: Mapping[str, Any], keep: bool) -> None:
        """tokenizer.json's post-processor; without one a template adding bos/eos where
        tokenizer_config.json asks for them (add_bos_token / add_eos_token), as transformers builds it."""
        from tokenizers import processors

        if keep and backend.post_processor is not None:
            return
        pieces, tokens = ["$A:0"], []
        bos, eos = special.get("bos_token"), special.get("eos_token")
        if config.get("add_bos_token") and bos is not None:
            pieces.insert(0, f"{bos}:0")
            tokens.append((bos, backend.token_to_id(bos)))
        if config.get("add_eos_token") and eos is not None:
            pieces.append(f"{eos}:0")
            tokens.append((eos, backend.token_to_id(eos)))
        single = " ".join(pieces)
        pair = single + " " + " ".join(("$B" if p == "$A:0" else p[:-2]) + ":1" for p in pieces)
        backend.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=tokens)

    # ---- use -----------------------------------------------------------------------------------

    @property
    def backend_tokenizer(self) -> Any:
        """The `tokenizers.Tokenizer` underneath."""
        return self._backend

    def _special_id(self, name: str) -> int | None:
        token = self.special_tokens.get(name)
        return None if token is None else self._backend.token_to_id(token)

    pad_token = property(lambda self: self.special_tokens.get("pad_token"))
    eos_token = property(lambda self: self.special_tokens.get("eos_token"))
    bos_token = property(lambda self: self.special_tokens.get("bos_token"))
    unk_token = property(lambda self: self.special_tokens.get("unk_token"))
    pad_token_id = property(lambda self: self._special_id("pad_token"))
    eos_token_id = property(lambda self: self._special_id("eos_token"))
    bos_token_id = property(lambda self: self._special_id("bos_token"))
    unk_token_id = property(lambda self: self._special_id("unk_token"))

    def __len__(self) -> int:
        return self._backend.get_vocab_size(with_added_tokens=True)

    def __repr__(self) -> str:
        return f"QwenTokenizer({self.source!r}, {len(self)} tokens, padding_side={self.padding_side!r})"

    def convert_tokens_to_ids(self, tokens: str | Sequence[str]) -> int | None | list[int | None]:
        """Token string(s) -> id(s); an unknown token gives the unk id (None without one)."""
        if isinstance(tokens, str):
            token_id = self._backend.token_to_id(tokens)
            return self.unk_token_id if token_id is None else token_id
        return [self.convert_tokens_to_ids(t) for t in tokens]

    def decode(self, ids: Sequence[int] | torch.Tensor, skip_special_tokens: bool = False) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def __call__(self, text: str | Sequence[str], return_tensors: str | None = None, padding: bool | str = False,
                 max_length: int | None = None, add_special_tokens: bool = True) -> TokenizerOutput:
        """Text or texts -> {"input_ids", "attention_mask"}: lists (one list for one text), or
        with return_tensors="pt" (B, L) int64 tensors. `padding`: False / "do_not_pad", True /
        "longest" (to the longest text) or "max_length" (to `max_length`), with the pad token on
        the tokenizer's `padding_side`. Nothing is truncated."""
        single = isinstance(text, str)
        texts = [text] if single else list(text)
        if not all(isinstance(t, str) for t in texts):
            raise TypeError("tokenizer: expected a string or a list of strings")
        if return_tensors not in (None, "pt"):
            raise ValueError(f"tokenizer: return_tensors must be None or 'pt', got {return_tensors!r}")
        rows = [self._backend.encode(t, add_special_tokens=add_special_tokens).ids for t in texts]
        target = self._padded_length(rows, padding, max_length)
        masks = [[1] * len(r) for r in rows]
        if target is not None:
            pad_id = self.pad_token_id
            if pad_id is None:
                raise ValueError(f"{self.source}: padding asked for but the tokenizer has no pad token")
            for i, row in enumerate(rows):
                fill = target - len(row)
                if fill > 0 and self.padding_side == "right":
                    rows[i], masks[i] = row + [pad_id] * fill, masks[i] + [0] * fill
                elif fill > 0:
                    rows[i], masks[i] = [pad_id] * fill + row, [0] * fill + masks[i]
        if return_tensors is None:
            return TokenizerOutput(input_ids=rows[0] if single else rows, attention_mask=masks[0] if single else masks)
        if len({len(r) for r in rows}) > 1:
            raise ValueError("tokenizer: the texts have different lengths; give padding=True to make one tensor")
        shape = (len(rows), len(rows[0]) if rows else 0)
        return TokenizerOutput(input_ids=torch.tensor(rows, dtype=torch.long).reshape(shape),
                               attention_mask=torch.tensor(masks, dtype=torch.long).reshape(shape))

    @staticmethod
    def _padded_length(rows: Sequence[Sequence[int]], padding: bool | str, max_length: int | None) -> int | None:
        if padding in (False, None, "do_not_pad"):
            return None
        if padding in (True, "longest"):
            return max((len(r) for r in rows), default=0)
        if padding == "max_length":
            if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 0:
                raise ValueError(f"tokenizer: padding='max_length' needs max_length, a count of tokens; got "
                                 f"{max_length!r}")
            return max_length
        raise ValueError(f"tokenizer: padding must be True, False, 'longest', 'max_length' or 'do_not_pad', "
                         f"got {padding!r}")
