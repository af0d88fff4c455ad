"""Qwen-Image-Edit's prompt encoder: the Qwen2.5-VL language model (`qwen2_5_text.py`) with its
vision tower, encoding prompts with pictures.

`QwenImageVLEncoder` recognises the keys `QwenImageTextEncoder` recognises and also loads the
vision tower under `visual.*` (transformers' module, imported only when the class is built). The
processor side (pictures -> patches, placeholders -> tokens) is `qwen_image_vision.py`.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

from .qwen2_5_text import QwenImageTextEncoder, QwenTextEncoderParams, Shapes

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
