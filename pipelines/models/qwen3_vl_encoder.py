"""Qwen-Image 2.1's prompt encoder: Qwen3-VL (`qwen3_text.py` + `qwen3_vl_vision.py`) reading
prompts with or without pictures, giving the prompt embeddings the 2.1 transformer reads.

`QwenImage21TextEncoder` holds the language model under `model.language_model` and the vision
tower under `model.visual`: the names of transformers' `Qwen3VLForConditionalGeneration`, which
is what the hub's `text_encoder/` folder holds (sharded safetensors + config.json with
`text_config` / `vision_config`). Those keys load as they are; `lm_head.weight` is recognised
and not loaded. A Qwen2.5-VL checkpoint (Qwen-Image 1.x, `qwen2_5_text.py`) is not claimed:
its layers have no `q_norm` / `k_norm` and its vision tower other modules.

Inputs (from `qwen3_vl_processor.QwenImage21Processor`):
- `input_ids`, `attention_mask`: (B, L) int64, left-padded;
- `pixel_values` (num_patches, 3*2*16*16) float and `image_grid_thw` (num_pictures, 3) int64,
  or None for text-to-image. The picture tokens of row b, in order, are those of the
  pictures in `image_grid_thw` order (the processor gives every prompt the same pictures).

`forward(...)` -> (B, L, hidden) the last decoder layer's output before the final norm, equal to
diffusers' `outputs.hidden_states[-1]` with its norm-neutralising hook. Positions: with pictures
the 3-D M-RoPE positions transformers' `get_rope_index` computes over the real tokens (padding
0); without, 0..L-1 on every axis whatever the padding (what transformers does for text).

`encode_prompt(..., drop=processor.system_tokens)` -> what diffusers' `_get_qwen_prompt_embeds`
returns: `prompt_embeds` (B, T, hidden) (the real tokens of each row without the first `drop`
ones, the system turn, then zeros up to the longest row), `prompt_mask` (B, T) int64 (1 for
those tokens) and `image_pad_mask` (B, T) bool (True at picture tokens). diffusers'
`encode_prompt` then repeats them per image and drops the mask when it is all ones.
"""
from __future__ import annotations

import math
import re
from typing import Any, Mapping

import torch
import torch.nn as nn

from .qwen3_text import Qwen3TextModel, Qwen3TextParams
from .qwen3_vl_vision import Qwen3VisionModel, Qwen3VisionParams

Shapes = Mapping[str, tuple[int, ...]]
IMAGE_TOKEN_ID = 151655  # <|image_pad|> of the Qwen3-VL tokenizer

_LM = "model.language_model."
_VISION = "model.visual."
_LM_KEY = re.compile(r"^model\.language_model\.(?:embed_tokens\.weight|norm\.weight|layers\.\d+\.(?:"
                     r"(?:input_layernorm|post_attention_layernorm|self_attn\.q_norm|self_attn\.k_norm)\.weight|"
                     r"self_attn\.[qkvo]_proj\.(?:weight|bias)|mlp\.(?:gate|up|down)_proj\.weight))$")
_VISION_KEY = re.compile(r"^model\.visual\.(?:patch_embed\.proj|pos_embed|blocks\.\d+\.(?:norm1|norm2|attn\.qkv|"
                         r"attn\.proj|mlp\.linear_fc1|mlp\.linear_fc2)|(?:merger|deepstack_merger_list\.\d+)\."
                         r"(?:norm|linear_fc1|linear_fc2))\.(?:weight|bias)$")
_LAYER = re.compile(r"^model\.language_model\.layers\.(\d+)\.")
_BLOCK = re.compile(r"^model\.visual\.blocks\.(\d+)\.")
_DEEPSTACK = re.compile(r"^model\.visual\.deepstack_merger_list\.(\d+)\.")
_CONFIG_FIX = "give the config.json that transformers wrote beside the weights (Qwen/Qwen-Image-2.1 text_encoder/)"


def _section(config: Mapping[str, Any] | None, name: str) -> dict[str, Any]:
    value = (config or {}).get(name) or {}
    if not isinstance(value, Mapping):
        raise ValueError(f"text encoder config: `{name}` must be an object, got {type(value).__name__}")
    return {k: v for k, v in value.items() if v is not None}


def _count(shapes: Shapes, pattern: re.Pattern) -> int:
    found = {int(m.group(1)) for k in shapes if (m := pattern.match(k))}
    return max(found) + 1 if found else 0


def mrope_positions(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, grid_thw: torch.Tensor,
                    image_token_id: int, merge: int) -> torch.Tensor:
    """(3, B, L) temporal/height/width positions over each row's real tokens (padding 0): text
    advances all three by one; a picture with merged grid (t, h, w) sits at start + (t, row,
    column) and the text after it goes on from start + max(h, w)."""
    grids = iter(grid_thw.tolist())
    batch, length = input_ids.shape
    positions = torch.zeros(3, batch, length, dtype=torch.long)
    keep = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    for row in range(batch):
        is_image = (input_ids[row][keep[row]] == image_token_id).tolist()
        pieces, start, i = [], 0, 0
        while i < len(is_image):
            j = i
            while j < len(is_image) and is_image[j] == is_image[i]:
                j += 1
            if not is_image[i]:
                pieces.append(torch.arange(start, start + j - i).expand(3, -1))
                start += j - i
            else:
                grid = next(grids, None)
                if grid is None:
                    raise ValueError("text encoder: the prompts hold more pictures than image_grid_thw has rows")
                t, h, w = grid[0], grid[1] // merge, grid[2] // merge
                if j - i != t * h * w:
                    raise ValueError(f"text encoder: row {row} holds {j - i} consecutive <|image_pad|> tokens for a "
                                     f"picture of {t * h * w}; build the inputs with QwenImage21Processor")
                tt, hh, ww = torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij")
                pieces.append(torch.stack([tt, hh, ww]).reshape(3, -1) + start)
                start += max(h, w)
            i = j
        if pieces:
            positions[:, row, keep[row].cpu()] = torch.cat(pieces, dim=1)
    if next(grids, None) is not None:
        raise ValueError("text encoder: image_grid_thw has more rows than the prompts hold pictures")
    return positions.to(input_ids.device)


class Qwen3VLModel(nn.Module):
    """`language_model` and `visual`, as transformers nests them under `model.`."""

    def __init__(self, text: Qwen3TextParams, vision: Qwen3VisionParams):
        super().__init__()
        self.language_model = Qwen3TextModel(text)
        self.visual = Qwen3VisionModel(vision)


class QwenImage21TextEncoder(nn.Module):
    """Qwen3-VL, the prompt encoder of Qwen-Image 2.1 (see the module docstring)."""

    CHECKPOINT_REQUIRED_KEYS: tuple[str, ...] = (
        _LM + "embed_tokens.weight",
        _LM + "norm.weight",
        _LM + "layers.0.self_attn.q_proj.weight",
        _LM + "layers.0.self_attn.k_proj.weight",
        _LM + "layers.0.self_attn.q_norm.weight",
        _LM + "layers.0.mlp.gate_proj.weight",
        _VISION + "patch_embed.proj.weight",
        _VISION + "pos_embed.weight",
        _VISION + "blocks.0.mlp.linear_fc1.weight",
        _VISION + "merger.linear_fc1.weight",
        _VISION + "merger.linear_fc2.weight",
    )

    def __init__(self, text: Qwen3TextParams | None = None, vision: Qwen3VisionParams | None = None,
                 image_token_id: int = IMAGE_TOKEN_ID):
        super().__init__()
        text, vision = text or Qwen3TextParams(), vision or Qwen3VisionParams()
        text.validate()
        if vision.out_hidden_size != text.hidden_size:
            raise ValueError(
                f"text encoder: the vision tower gives {vision.out_hidden_size} features per picture token but the "
                f"language model is {text.hidden_size} wide; the two come from different models: {_CONFIG_FIX}")
        self.text_params, self.vision_params = text, vision
        self.image_token_id = int(image_token_id)
        self.model = Qwen3VLModel(text, vision)

    @property
    def compute_dtype(self) -> torch.dtype | None:
        """The dtype to compute in when the weights are stored in another (float8 under VRAM
        management); None = the weights' dtype. Set by the VRAM manager."""
        return self.model.visual.compute_dtype

    @compute_dtype.setter
    def compute_dtype(self, dtype: torch.dtype | None) -> None:
        self.model.visual.compute_dtype = dtype

    # ---- checkpoint contract (see pipelines/core/checkpoint.py) ----------------------------

    @staticmethod
    def owns_checkpoint_key(key: str) -> bool:
        return key == "lm_head.weight" or bool(_LM_KEY.match(key) or _VISION_KEY.match(key))

    @staticmethod
    def convert_checkpoint_key(key: str) -> str | None:
        if key == "lm_head.weight":
            return None  # the encoder reads hidden states, not logits
        if _LM_KEY.match(key) or _VISION_KEY.match(key):
            return key
        raise KeyError(f"text encoder: {key!r} is not a key of a Qwen3-VL checkpoint")

    @classmethod
    def text_params_from_checkpoint(cls, shapes: Shapes, config: Mapping[str, Any] | None) -> Qwen3TextParams:
        """Sizes from the shapes; `config["text_config"]` wins where it gives a value."""
        cfg = _section(config, "text_config")
        vocab, hidden = shapes[_LM + "embed_tokens.weight"]
        head_dim = int(cfg.get("head_dim") or shapes[_LM + "layers.0.self_attn.q_norm.weight"][0])
        q_out = shapes[_LM + "layers.0.self_attn.q_proj.weight"][0]
        kv_out = shapes[_LM + "layers.0.self_attn.k_proj.weight"][0]
        rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
        if not isinstance(rope, Mapping):
            raise ValueError(f"text encoder config: `text_config.rope_parameters` must be an object; {_CONFIG_FIX}")
        params = Qwen3TextParams(
            vocab_size=int(cfg.get("vocab_size", vocab)),
            hidden_size=int(cfg.get("hidden_size", hidden)),
            intermediate_size=int(cfg.get("intermediate_size", shapes[_LM + "layers.0.mlp.gate_proj.weight"][0])),
            num_hidden_layers=int(cfg.get("num_hidden_layers", _count(shapes, _LAYER))),
            num_attention_heads=int(cfg.get("num_attention_heads", q_out // head_dim)),
            num_key_value_heads=int(cfg.get("num_key_value_heads", kv_out // head_dim)),
            head_dim=head_dim,
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope.get("rope_theta", cfg.get("rope_theta", 5_000_000.0))),
            mrope_section=[int(s) for s in rope.get("mrope_section") or (24, 20, 20)],
            hidden_act=str(cfg.get("hidden_act", "silu")),
            attention_bias=bool(cfg.get("attention_bias", _LM + "layers.0.self_attn.q_proj.bias" in shapes)),
        )
        params.validate()
        return params

    @classmethod
    def vision_params_from_checkpoint(cls, shapes: Shapes, config: Mapping[str, Any] | None) -> Qwen3VisionParams:
        """Sizes from the shapes; `config["vision_config"]` wins where it gives a value;
        num_heads and the deepstack block indexes cannot be read from shapes (Qwen3-VL-8B's
        16 and [8, 16, 24] unless the config says otherwise)."""
        cfg = _section(config, "vision_config")
        hidden, in_channels, temporal, patch, _ = shapes[_VISION + "patch_embed.proj.weight"]
        hidden = int(cfg.get("hidden_size", hidden))
        merged = shapes[_VISION + "merger.linear_fc1.weight"][1]
        merge = math.isqrt(merged // hidden) if merged % hidden == 0 else 0
        if merge * merge * hidden != merged:
            raise ValueError(f"text encoder checkpoint: 'model.visual.merger.linear_fc1.weight' takes {merged} "
                             f"features, not hidden_size {hidden} times a square merge size; {_CONFIG_FIX}")
        deepstack = _count(shapes, _DEEPSTACK)
        indexes = cfg.get("deepstack_visual_indexes", [8, 16, 24] if deepstack == 3 else None)
        if indexes is None or len(indexes) != deepstack:
            raise ValueError(f"text encoder checkpoint: {deepstack} deepstack mergers but deepstack_visual_indexes "
                             f"{indexes} in the config; {_CONFIG_FIX}")
        rope = cfg.get("rope_parameters") or {}
        return Qwen3VisionParams(
            depth=int(cfg.get("depth", _count(shapes, _BLOCK))),
            hidden_size=hidden,
            intermediate_size=int(cfg.get("intermediate_size", shapes[_VISION + "blocks.0.mlp.linear_fc1.weight"][0])),
            num_heads=int(cfg.get("num_heads", 16)),
            in_channels=int(cfg.get("in_channels", in_channels)),
            patch_size=int(cfg.get("patch_size", patch)),
            temporal_patch_size=int(cfg.get("temporal_patch_size", temporal)),
            spatial_merge_size=int(cfg.get("spatial_merge_size", merge)),
            out_hidden_size=int(cfg.get("out_hidden_size", shapes[_VISION + "merger.linear_fc2.weight"][0])),
            num_position_embeddings=int(cfg.get("num_position_embeddings", shapes[_VISION + "pos_embed.weight"][0])),
            deepstack_visual_indexes=[int(i) for i in indexes],
            hidden_act=str(cfg.get("hidden_act", "gelu_pytorch_tanh")),
            rope_theta=float(rope.get("rope_theta", 10000.0) if isinstance(rope, Mapping) else 10000.0),
        )

    @classmethod
    def from_checkpoint(cls, shapes: Shapes, config: dict[str, Any] | None) -> "QwenImage21TextEncoder":
        missing = [k for k in cls.CHECKPOINT_REQUIRED_KEYS if k not in shapes]
        if missing:
            raise ValueError(f"text encoder checkpoint: missing {', '.join(missing)}")
        image_token_id = (config or {}).get("image_token_id") or IMAGE_TOKEN_ID
        vision = cls.vision_params_from_checkpoint(shapes, config)
        return cls(cls.text_params_from_checkpoint(shapes, config), vision, int(image_token_id))

    # ---- forward ---------------------------------------------------------------------------

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                pixel_values: torch.Tensor | None = None, image_grid_thw: torch.Tensor | None = None) -> torch.Tensor:
        if input_ids.ndim != 2:
            raise ValueError(f"text encoder: input_ids must be (batch, length), got {tuple(input_ids.shape)}")
        lm = self.model.language_model
        image_mask = input_ids == self.image_token_id
        if pixel_values is None and image_grid_thw is None:
            if bool(image_mask.any()):
                raise ValueError(f"text encoder: the prompt holds {int(image_mask.sum())} <|image_pad|> token(s) "
                                 "but no pictures were given; build the inputs with QwenImage21Processor")
            return lm(input_ids=input_ids, attention_mask=attention_mask)
        if pixel_values is None or image_grid_thw is None:
            raise ValueError("text encoder: give pixel_values and image_grid_thw together")
        image_grid_thw = image_grid_thw.to(input_ids.device)
        tokens, deepstack = self.model.visual(pixel_values.to(input_ids.device), image_grid_thw)
        if int(image_mask.sum()) != tokens.shape[0]:
            raise ValueError(f"text encoder: {int(image_mask.sum())} <|image_pad|> tokens in the prompts but the "
                             f"pictures give {tokens.shape[0]}; build the inputs with QwenImage21Processor")
        embeds = lm.embed_tokens(input_ids)
        embeds = embeds.masked_scatter(image_mask[..., None].expand_as(embeds), tokens.to(embeds.dtype))
        positions = mrope_positions(input_ids, attention_mask, image_grid_thw, self.image_token_id,
                                    self.vision_params.spatial_merge_size)
        return lm(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=positions,
                  visual_mask=image_mask, deepstack=deepstack)

    def encode_prompt(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, drop: int,
                      pixel_values: torch.Tensor | None = None,
                      image_grid_thw: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (prompt_embeds, prompt_mask, image_pad_mask), see the module docstring."""
        hidden = self(input_ids, attention_mask, pixel_values, image_grid_thw)
        keep = attention_mask.to(hidden.device).bool()
        rows = [hidden[b][keep[b]][drop:] for b in range(hidden.shape[0])]
        pads = [(input_ids[b].to(hidden.device)[keep[b]] == self.image_token_id)[drop:] for b in range(len(rows))]
        if min(r.shape[0] for r in rows) == 0:
            raise ValueError(f"text encoder: a prompt has no token after the {drop} of the system turn; build the "
                             "inputs with QwenImage21Processor (and drop its system_tokens)")
        longest = max(r.shape[0] for r in rows)
        embeds = torch.stack([torch.cat([r, r.new_zeros(longest - r.shape[0], r.shape[1])]) for r in rows])
        mask = torch.stack([torch.cat([torch.ones(r.shape[0], dtype=torch.long, device=r.device),
                                       torch.zeros(longest - r.shape[0], dtype=torch.long, device=r.device)])
                            for r in rows])
        image_pad_mask = torch.stack([torch.cat([p, p.new_zeros(longest - p.shape[0])]) for p in pads])
        return embeds, mask, image_pad_mask
