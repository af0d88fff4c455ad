"""Qwen-Image's text encoder: the language model of Qwen2.5-VL-7B, text only.

The network itself is transformers' `Qwen2_5_VLTextModel`, so the hidden states are exactly the
ones `Qwen2_5_VLForConditionalGeneration(input_ids, attention_mask,
output_hidden_states=True).hidden_states[-1]` gives for text-only input (what diffusers'
QwenImagePipeline reads): the output of the last decoder layer after the final RMSNorm. For text
the three M-RoPE axes carry the same positions, 0..L-1 whatever the padding.

Checkpoint layouts recognised (both Qwen2.5-VL):
- legacy, on the hub and what `save_pretrained` writes (transformers 4.5x and 5.x):
  `model.embed_tokens.*`, `model.layers.N.*`, `model.norm.*`, `lm_head.*`, `visual.*`;
- newer module layout: `model.language_model.*`, `model.visual.*`, `lm_head.*`.
The language model loads under `model.*` (the legacy names); `lm_head` and the vision tower
are recognised but not loaded (text-to-image does not use them).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
import torch.nn as nn

Shapes = Mapping[str, tuple[int, ...]]

# Keys of the language model, relative to `model.` (legacy) or `model.language_model.` (newer).
_LM_KEY = re.compile(r"^(?:embed_tokens|norm|layers\.\d+)\.")
_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.")

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

    def to_transformers_config(self):
        from transformers import Qwen2_5_VLTextConfig

        return Qwen2_5_VLTextConfig(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            head_dim=self.head_dim,
            hidden_act=self.hidden_act,
            max_position_embeddings=self.max_position_embeddings,
            rms_norm_eps=self.rms_norm_eps,
            # `rope_scaling` + `rope_theta` is understood by transformers 4.5x and 5.x alike
            # (5.x turns them into `rope_parameters`).
            rope_theta=self.rope_theta,
            rope_scaling={"rope_type": "default", "mrope_section": list(self.mrope_section)},
            use_sliding_window=self.use_sliding_window,
            sliding_window=self.sliding_window,
            max_window_layers=self.max_window_layers,
            attention_dropout=0.0,
            use_cache=False,
            bos_token_id=None,
            eos_token_id=None,
            pad_token_id=None,
            attn_implementation="sdpa",
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
        from transformers import Qwen2_5_VLTextModel

        self.params = params or QwenTextEncoderParams()
        self.params.validate()
        self.model = Qwen2_5_VLTextModel(self.params.to_transformers_config())

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
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return out.last_hidden_state
