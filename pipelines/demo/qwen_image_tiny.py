"""Tiny random-weight Qwen-Image repos in the exact hub layout.

    python -m pipelines.demo.qwen_image_tiny OUT_DIR [--edit]
    python -m pipelines.demo.qwen_image_tiny --lora OUT.safetensors

writes model_index.json, scheduler/, transformer/ (2 shards + index), text_encoder/
(2 shards + index), vae/diffusion_pytorch_model.safetensors and tokenizer/ (the real Qwen
vocabulary). `--edit` writes a Qwen-Image-Edit-2511 look-alike instead: the transformer's
config.json says `zero_cond_t: true`, the text encoder carries a vision tower (`visual.*`) and
a `processor/` folder is added. Weights are seeded and deterministic; a 128x128 image takes
about a second on a CPU. Tests, benchmarks and the runner's demo models use them. `--lora`
writes a LoRA for the tiny transformer instead (diffusers format, DiffSynth-Studio's targets,
seeded): strong enough that each alpha shows, the runner's `lora=tiny_demo` preset.

`TinyQwenImagePipeline` is the demo's pipeline (`model=qwen_image_edit_tiny`): QwenImagePipeline
with small picture areas, fitting pictures of the demo's size (`pictures/a.png`, `b.png`).
"""
from __future__ import annotations

import argparse
import logging
import os
import tempfile
from pathlib import Path

from ..core.loader import parameters_on_meta
from ..models.qwen2_5_text import QwenImageTextEncoder, QwenTextEncoderParams
from ..models.qwen2_5_vl_encoder import QwenImageVLEncoder, QwenVisionParams
from ..models.qwen_image_dit import QwenImageDiT, QwenImageDiTParams
from ..models.qwen_image_vae import QwenImageVAE, QwenImageVAEParams
from ..qwen_image import QwenImagePipeline
from .checkpoints import random_state_dict, save_sharded, write_folder, write_json
from .lora import write_dit_lora
from .processor import build_processor_folder
from .tokenizer import build_qwen_tokenizer

logger = logging.getLogger(__name__)

TEXT_HIDDEN = 32
DIT = QwenImageDiTParams(num_layers=2, attention_head_dim=32, num_attention_heads=2,
                         joint_attention_dim=TEXT_HIDDEN, axes_dims_rope=(4, 14, 14))
TEXT_ENCODER = QwenTextEncoderParams(hidden_size=TEXT_HIDDEN, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                     mrope_section=[2, 3, 3], max_window_layers=2)
VAE = QwenImageVAEParams(base_dim=16, num_res_blocks=1)
VISION = QwenVisionParams(depth=2, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=TEXT_HIDDEN,
                          fullatt_block_indexes=[1])

class TinyQwenImagePipeline(QwenImagePipeline):
    """QwenImagePipeline for the tiny demo models: an edit's pictures at about 96x96 for the
    vision-language encoder and 128x128 for the VAE (and the default output), instead of the
    real models' 384x384 and 1024x1024, so a step takes milliseconds on a CPU rather than seconds
    (the DiT's sequence holds 64 tokens per picture instead of 4096)."""

    condition_area = 96 * 96
    reference_area = 128 * 128
    output_area = 128 * 128


SCHEDULER_CONFIG = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "base_image_seq_len": 256, "base_shift": 0.5, "max_image_seq_len": 8192, "max_shift": 0.9,
    "num_train_timesteps": 1000, "shift": 1.0, "shift_terminal": 0.02,
    "time_shift_type": "exponential", "use_dynamic_shifting": True,
}


def dit_config(p: QwenImageDiTParams) -> dict:
    return {
        "_class_name": "QwenImageTransformer2DModel", "patch_size": p.patch_size,
        "in_channels": p.in_channels, "out_channels": p.out_channels, "num_layers": p.num_layers,
        "attention_head_dim": p.attention_head_dim, "num_attention_heads": p.num_attention_heads,
        "joint_attention_dim": p.joint_attention_dim, "guidance_embeds": False,
        "axes_dims_rope": list(p.axes_dims_rope),
    }


def vae_config(p: QwenImageVAEParams) -> dict:
    return {
        "_class_name": "AutoencoderKLQwenImage", "base_dim": p.base_dim, "z_dim": p.z_dim,
        "dim_mult": list(p.dim_mult), "num_res_blocks": p.num_res_blocks,
        "attn_scales": list(p.attn_scales), "temperal_downsample": list(p.temperal_downsample),
        "dropout": 0.0, "latents_mean": list(p.latents_mean), "latents_std": list(p.latents_std),
    }


def text_encoder_config(p: QwenTextEncoderParams) -> dict:
    # the flat layout of the hub's text_encoder/config.json
    return {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl",
        "vocab_size": p.vocab_size, "hidden_size": p.hidden_size,
        "intermediate_size": p.intermediate_size, "num_hidden_layers": p.num_hidden_layers,
        "num_attention_heads": p.num_attention_heads, "num_key_value_heads": p.num_key_value_heads,
        "head_dim": p.head_dim, "hidden_act": p.hidden_act, "rms_norm_eps": p.rms_norm_eps,
        "rope_theta": p.rope_theta, "max_position_embeddings": p.max_position_embeddings,
        "rope_scaling": {"type": "mrope", "mrope_section": list(p.mrope_section)},
        "tie_word_embeddings": False, "torch_dtype": "float32",
    }


def _shapes(build) -> dict[str, tuple[int, ...]]:
    with parameters_on_meta():
        module = build()
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def build_tiny_edit_repo(out_dir: str | Path, seed: int = 0) -> Path:
    """The tiny edit repo (see the module docstring) into `out_dir`, as build_tiny_repo."""
    return build_tiny_repo(out_dir, seed, edit=True)


def build_tiny_repo(out_dir: str | Path, seed: int = 0, edit: bool = False) -> Path:
    """Write the tiny repo into `out_dir` (created; must not exist or be empty). The folder
    appears complete or not at all: it is written beside and renamed into place. A path with a
    `..` segment is refused (the shape of `<models folder>/<model id>` for an id such as `../x`,
    which would land outside the models folder): pass a normalised path (os.path.abspath)."""
    out_dir = write_folder(out_dir, lambda staging: _write_repo(staging, seed, edit))
    logger.info("Wrote the tiny Qwen-Image%s repo to %s", "-Edit" if edit else "", out_dir)
    return out_dir


def _write_repo(root: Path, seed: int, edit: bool) -> None:
    write_json(root / "model_index.json", {
        "_class_name": "QwenImageEditPlusPipeline" if edit else "QwenImagePipeline",
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "Qwen2_5_VLForConditionalGeneration"],
        "tokenizer": ["transformers", "Qwen2Tokenizer"],
        "transformer": ["diffusers", "QwenImageTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKLQwenImage"],
        **({"processor": ["transformers", "Qwen2VLProcessor"]} if edit else {}),
    })
    write_json(root / "scheduler" / "scheduler_config.json", SCHEDULER_CONFIG)

    dit_shapes = _shapes(lambda: QwenImageDiT(DIT))
    save_sharded(random_state_dict(dit_shapes, seed), root / "transformer", "diffusion_pytorch_model", 2)
    write_json(root / "transformer" / "config.json", {**dit_config(DIT), **({"zero_cond_t": True} if edit else {})})

    encoder = (lambda: QwenImageVLEncoder(TEXT_ENCODER,
                                          VISION)) if edit else (lambda: QwenImageTextEncoder(TEXT_ENCODER))
    te_shapes = _shapes(encoder)
    te_shapes["lm_head.weight"] = (TEXT_ENCODER.vocab_size, TEXT_ENCODER.hidden_size)  # on the hub, unused
    save_sharded(random_state_dict(te_shapes, seed + 1), root / "text_encoder", "model", 2)
    te_config = text_encoder_config(TEXT_ENCODER)
    if edit:
        te_config["vision_config"] = vision_config(VISION)
    write_json(root / "text_encoder" / "config.json", te_config)

    vae_shapes = _shapes(lambda: QwenImageVAE(VAE))
    save_sharded(random_state_dict(vae_shapes, seed + 2), root / "vae", "diffusion_pytorch_model", 1)
    write_json(root / "vae" / "config.json", vae_config(VAE))

    build_qwen_tokenizer(root / "tokenizer")
    if edit:
        build_processor_folder(root / "processor")


def build_tiny_lora(out_file: str | Path, seed: int = 0, rank: int = 4) -> Path:
    """A LoRA for the tiny repo's transformer into `out_file` (written beside and renamed into
    place: complete or absent)."""
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    fd, staging = tempfile.mkstemp(prefix=f".{out_file.name}-", suffix=".safetensors", dir=out_file.parent)
    os.close(fd)
    try:
        write_dit_lora(staging, _shapes(lambda: QwenImageDiT(DIT)), rank=rank, seed=seed, magnitude=3.0)
        os.chmod(staging, 0o644)  # mkstemp made it private
        os.replace(staging, out_file)
    except BaseException:
        Path(staging).unlink(missing_ok=True)
        raise
    logger.info("Wrote the tiny LoRA to %s", out_file)
    return out_file


def vision_config(p: QwenVisionParams) -> dict:
    return {
        "depth": p.depth, "hidden_size": p.hidden_size, "intermediate_size": p.intermediate_size,
        "num_heads": p.num_heads, "out_hidden_size": p.out_hidden_size, "in_chans": p.in_channels,
        "patch_size": p.patch_size, "temporal_patch_size": p.temporal_patch_size,
        "spatial_merge_size": p.spatial_merge_size, "window_size": p.window_size,
        "fullatt_block_indexes": list(p.fullatt_block_indexes), "hidden_act": p.hidden_act,
        "tokens_per_second": p.tokens_per_second,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description="Write a tiny random-weight Qwen-Image repo (or a LoRA for it).")
    parser.add_argument("out_dir", type=Path, nargs="?", help="the repo folder to write")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--edit", action="store_true",
                        help="a Qwen-Image-Edit-2511 look-alike (vision tower, processor)")
    parser.add_argument("--lora", type=Path, metavar="OUT.safetensors",
                        help="write a LoRA for the tiny transformer to this file instead")
    args = parser.parse_args()
    if (args.out_dir is None) == (args.lora is None):
        parser.error("give either OUT_DIR (a repo) or --lora OUT.safetensors")
    logging.basicConfig(level=logging.INFO)
    if args.lora is not None:
        build_tiny_lora(os.path.abspath(args.lora), args.seed)
    else:
        build_tiny_repo(os.path.abspath(args.out_dir), args.seed, edit=args.edit)


if __name__ == "__main__":
    main()
