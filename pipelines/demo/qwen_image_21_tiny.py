"""A tiny random-weight Qwen-Image 2.1 repo in the hub layout, built offline.

    python -m pipelines.demo.qwen_image_21_tiny OUT_DIR

writes model_index.json, scheduler/, transformer/ (2 shards + index, config.json),
text_encoder/ (a Qwen3-VL with its vision tower: 2 shards + index, config.json in transformers'
layout), vae/ (RGBA, 16x, 64 latent channels) and processor/ (the real Qwen3-VL vocabulary and
chat template; pictures read from 32x32 up, so that small pictures keep their size). Weights are
seeded and deterministic; a 128x128 image in 2-4 steps takes a fraction of a second on a CPU.
`build(out_dir)` is what a runner's `model.build` calls.

`TinyQwenImage21Pipeline` is QwenImage21Pipeline with pictures and the default output at
128x128 (`output_resolution` 128 instead of 1024): the demo's size.
"""
from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from ..core.loader import parameters_on_meta
from ..models.qwen3_text import Qwen3TextParams
from ..models.qwen3_vl_encoder import IMAGE_TOKEN_ID, QwenImage21TextEncoder
from ..models.qwen3_vl_vision import Qwen3VisionParams
from ..models.qwen_image_21_dit import QwenImage21DiT, QwenImage21DiTParams
from ..models.qwen_image_21_vae import QwenImage21VAE, QwenImage21VAEParams
from ..qwen_image_2_1 import QwenImage21Pipeline
from .checkpoints import random_state_dict, save_sharded, write_folder, write_json
from .processor import build_qwen_image_21_processor_folder

logger = logging.getLogger(__name__)

TEXT_HIDDEN = 32
DIT = QwenImage21DiTParams(in_channels=64, out_channels=64, num_layers=2, attention_head_dim=32, num_attention_heads=2,
                           context_in_dim=TEXT_HIDDEN, mlp_ratio=3, axes_dims_rope=(4, 14, 14))
TEXT = Qwen3TextParams(hidden_size=TEXT_HIDDEN, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=16, mrope_section=[2, 3, 3])
VISION = Qwen3VisionParams(depth=2, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=TEXT_HIDDEN,
                           num_position_embeddings=16, deepstack_visual_indexes=[0, 1])
VAE = QwenImage21VAEParams(base_dim=4, decoder_base_dim=6, num_res_blocks=1)
# pictures of 32x32 (one vision token) and up keep their size in the image processor
PICTURE_SIZES = {"size": {"shortest_edge": 32 * 32, "longest_edge": 16777216}}
SCHEDULER_CONFIG = {
    "_class_name": "FlowMatchEulerDiscreteScheduler", "base_image_seq_len": 256, "base_shift": 0.5,
    "max_image_seq_len": 4096, "max_shift": 1.15, "num_train_timesteps": 1000, "shift": 1.0, "shift_terminal": None,
    "time_shift_type": "exponential", "use_dynamic_shifting": True,
}


class TinyQwenImage21Pipeline(QwenImage21Pipeline):
    """QwenImage21Pipeline for the tiny demo model: pictures and the default output at 128x128
    (the real model's 1024x1024 would hold 4096 tokens per picture instead of 64)."""

    default_resolution = 128


def dit_config(p: QwenImage21DiTParams) -> dict:
    return {"_class_name": "QwenImage21Transformer2DModel", "patch_size": p.patch_size, "in_channels": p.in_channels,
            "out_channels": p.out_channels, "num_layers": p.num_layers, "attention_head_dim": p.attention_head_dim,
            "num_attention_heads": p.num_attention_heads, "context_in_dim": p.context_in_dim,
            "mlp_ratio": p.mlp_ratio, "axes_dims_rope": list(p.axes_dims_rope), "eps": p.eps,
            "causal_condition": p.causal_condition}


def vae_config(p: QwenImage21VAEParams) -> dict:
    return {"_class_name": "AutoencoderKLQwenImage21", "base_dim": p.base_dim, "decoder_base_dim": p.decoder_base_dim,
            "z_dim": p.z_dim, "dim_mult": list(p.dim_mult), "num_res_blocks": p.num_res_blocks, "attn_scales": [],
            "temperal_downsample": list(p.temperal_downsample), "dropout": 0.0,
            "latents_mean": list(p.latents_mean), "latents_std": list(p.latents_std)}


def text_encoder_config(text: Qwen3TextParams, vision: Qwen3VisionParams) -> dict:
    """config.json as transformers writes it for Qwen3VLForConditionalGeneration."""
    return {
        "architectures": ["Qwen3VLForConditionalGeneration"], "model_type": "qwen3_vl", "dtype": "float32",
        "image_token_id": IMAGE_TOKEN_ID, "video_token_id": 151656, "vision_start_token_id": 151652,
        "vision_end_token_id": 151653, "tie_word_embeddings": False,
        "text_config": {
            "model_type": "qwen3_vl_text", "vocab_size": text.vocab_size, "hidden_size": text.hidden_size,
            "intermediate_size": text.intermediate_size, "num_hidden_layers": text.num_hidden_layers,
            "num_attention_heads": text.num_attention_heads, "num_key_value_heads": text.num_key_value_heads,
            "head_dim": text.head_dim, "hidden_act": text.hidden_act, "rms_norm_eps": text.rms_norm_eps,
            "attention_bias": text.attention_bias, "max_position_embeddings": 4096,
            "rope_parameters": {"rope_type": "default", "rope_theta": text.rope_theta,
                                "mrope_section": list(text.mrope_section), "mrope_interleaved": True}},
        "vision_config": {
            "model_type": "qwen3_vl_vision", "depth": vision.depth, "hidden_size": vision.hidden_size,
            "intermediate_size": vision.intermediate_size, "num_heads": vision.num_heads,
            "in_channels": vision.in_channels, "patch_size": vision.patch_size,
            "temporal_patch_size": vision.temporal_patch_size, "spatial_merge_size": vision.spatial_merge_size,
            "out_hidden_size": vision.out_hidden_size, "num_position_embeddings": vision.num_position_embeddings,
            "deepstack_visual_indexes": list(vision.deepstack_visual_indexes), "hidden_act": vision.hidden_act},
    }


def _shapes(build) -> dict[str, tuple[int, ...]]:
    with parameters_on_meta():
        module = build()
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def build(out_dir: str | Path, seed: int = 0) -> Path:
    """Write the tiny 2.1 repo into `out_dir` (created; must not exist or be empty): complete or
    not at all (written beside and renamed into place; a path with a `..` segment is refused)."""
    out_dir = write_folder(out_dir, lambda staging: _write_repo(staging, seed))
    logger.info("Wrote the tiny Qwen-Image 2.1 repo to %s", out_dir)
    return out_dir


def _write_repo(root: Path, seed: int) -> None:
    write_json(root / "model_index.json", {
        "_class_name": "QwenImage21Pipeline", "sample_sigmas": None,
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "Qwen3VLForConditionalGeneration"],
        "processor": ["transformers", "Qwen3VLProcessor"],
        "transformer": ["diffusers", "QwenImage21Transformer2DModel"],
        "vae": ["diffusers", "AutoencoderKLQwenImage21"],
    })
    write_json(root / "scheduler" / "scheduler_config.json", SCHEDULER_CONFIG)
    save_sharded(random_state_dict(_shapes(lambda: QwenImage21DiT(DIT)), seed), root / "transformer",
                 "diffusion_pytorch_model", 2)
    write_json(root / "transformer" / "config.json", dit_config(DIT))
    text_shapes = _shapes(lambda: QwenImage21TextEncoder(TEXT, VISION))
    text_shapes["lm_head.weight"] = (TEXT.vocab_size, TEXT.hidden_size)  # on the hub, unused
    save_sharded(random_state_dict(text_shapes, seed + 1), root / "text_encoder", "model", 2)
    write_json(root / "text_encoder" / "config.json", text_encoder_config(TEXT, VISION))
    save_sharded(random_state_dict(_shapes(lambda: QwenImage21VAE(VAE)), seed + 2), root / "vae",
                 "diffusion_pytorch_model", 1)
    write_json(root / "vae" / "config.json", vae_config(VAE))
    build_qwen_image_21_processor_folder(root / "processor", **PICTURE_SIZES)


def main() -> None:
    parser = argparse.ArgumentParser(description="Write a tiny random-weight Qwen-Image 2.1 repo.")
    parser.add_argument("out_dir", type=Path, help="the repo folder to write")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    build(os.path.abspath(args.out_dir), args.seed)


if __name__ == "__main__":
    main()
