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

Checkpoint layouts recognised (both Qwen2.5-VL; the keys of modules only Qwen3-VL has, `q_norm`,
`k_norm`, `pos_embed`, the DeepStack mergers, are not, so Qwen-Image 2.1's text encoder is refused):
- legacy, on the hub and what `save_pretrained` writes (transformers 4.5x and 5.x):
  `model.embed_tokens.*`, `model.layers.N.*`, `model.norm.*`, `lm_head.*`, `visual.*`;
- newer module layout: `model.language_model.*`, `model.visual.*`, `lm_head.*`.
The language model loads under `model.*` (the legacy names); `lm_head` and the vision tower
are recognised but not loaded (text-to-image does not use them).

`QwenImageVLEncoder` (`qwen2_5_vl_encoder.py`, for the Qwen-Image-Edit family) recognises the
same keys and also loads the vision tower. Which of the two classes a pipeline offers to the
loader decides whether the vision tower is loaded. The tokenizer is `qwen_tokenizer.py`.
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

Shapes = Mapping[str, tuple[int, ...]]

# Keys of the language model, relative to `model.` (legacy) or `model.language_model.` (newer).
_LM_KEY = re.compile(r"^(?:embed_tokens|norm|layers\.\d+)\.")
_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.")
# Modules of Qwen3-VL (Qwen-Image 2.1's encoder, `qwen3_vl_encoder.py`) that Qwen2.5-VL lacks: its
# checkpoint shares the `model.language_model.*` / `model.visual.*` layout, keys naming these are not ours.
_QWEN3_VL_KEY = re.compile(r"\.self_attn\.[qk]_norm\.|^model\.visual\.(?:pos_embed|deepstack_merger_list|merger\.norm)\.|"
                           r"\.linear_fc[12]\.")

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
        if _QWEN3_VL_KEY.search(key):
            return False  # a Qwen3-VL checkpoint (Qwen-Image 2.1) is not a Qwen2.5-VL one
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
