"""The reference Qwen-Image 2.1 in small: diffusers' QwenImage21Pipeline with tiny random parts, each written by
its library's own save_pretrained in the hub layout (transformer and text encoder sharded, the processor folder with
its chat template), and the pictures the tests feed it."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipelines.demo.processor import QWEN3_VL_PREPROCESSOR_CONFIG, build_qwen_image_21_processor_folder
from tests.support.weights import randomize_

TEXT_HIDDEN = 32
# a Qwen3-VL with 4 query heads on 2 key/value heads, interleaved M-RoPE, a vision tower of 3 blocks with 2
# DeepStack mergers
TINY_TEXT_CONFIG = dict(
    text_config=dict(vocab_size=151936, hidden_size=TEXT_HIDDEN, intermediate_size=64, num_hidden_layers=3,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6,
                     max_position_embeddings=4096,
                     rope_parameters=dict(rope_type="default", rope_theta=5e6, mrope_section=[2, 3, 3],
                                          mrope_interleaved=True)),
    vision_config=dict(depth=3, hidden_size=32, intermediate_size=48, num_heads=2, patch_size=16,
                       spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=TEXT_HIDDEN,
                       num_position_embeddings=16, deepstack_visual_indexes=[0, 2]),
)
TINY_DIT = dict(patch_size=1, in_channels=64, out_channels=64, num_layers=2, attention_head_dim=32,
                num_attention_heads=2, context_in_dim=TEXT_HIDDEN, mlp_ratio=3, axes_dims_rope=(4, 14, 14))
# the published layout (five stages: 16x, a wider decoder, z_dim 64 with the published latent statistics), narrow
TINY_VAE = dict(base_dim=4, decoder_base_dim=6, z_dim=64, dim_mult=[1, 2, 4, 8, 8], num_res_blocks=1,
                temperal_downsample=[False, True, True, True])
SCHEDULER = dict(base_image_seq_len=256, base_shift=0.5, max_image_seq_len=4096, max_shift=1.15,
                 num_train_timesteps=1000, shift=1.0, shift_terminal=None, time_shift_type="exponential",
                 use_dynamic_shifting=True)
# pictures of a few thousand pixels keep their size (the real minimum is 65536 pixels: 256 patches)
SMALL_SIZES = {"size": {"shortest_edge": 1024, "longest_edge": 65536}}


def qwen3_vl_processor(processor_dir: Path, sizes: dict = SMALL_SIZES):
    """transformers' Qwen3VLProcessor on the folder's tokenizer and chat template, with the PIL image processor (no
    torchvision here: its class check, which wants a torchvision video processor, is bypassed while it is built)."""
    from transformers import AutoTokenizer, Qwen2VLImageProcessorPil, Qwen3VLProcessor
    from transformers.processing_utils import ProcessorMixin

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ProcessorMixin, "check_argument_for_proper_class", lambda self, name, arg: None)
        return Qwen3VLProcessor(image_processor=Qwen2VLImageProcessorPil(**{**QWEN3_VL_PREPROCESSOR_CONFIG, **sizes}),
                                tokenizer=AutoTokenizer.from_pretrained(processor_dir), video_processor=None,
                                chat_template=(processor_dir / "chat_template.jinja").read_text())


def write_reference_repo(root: Path):
    """The tiny repo at `root` (transformer/, text_encoder/, vae/, scheduler/, processor/) and diffusers'
    QwenImage21Pipeline on the same parts."""
    import diffusers
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    transformer = randomize_(diffusers.QwenImage21Transformer2DModel(**TINY_DIT), seed=1).eval()
    text_encoder = randomize_(Qwen3VLForConditionalGeneration(Qwen3VLConfig(**TINY_TEXT_CONFIG)), seed=2).eval()
    vae = randomize_(diffusers.AutoencoderKLQwenImage21(**TINY_VAE), seed=3).eval()
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(**SCHEDULER)
    transformer.save_pretrained(root / "transformer", max_shard_size="100KB")
    text_encoder.save_pretrained(root / "text_encoder", max_shard_size="8MB")
    vae.save_pretrained(root / "vae")
    scheduler.save_pretrained(root / "scheduler")
    processor_dir = build_qwen_image_21_processor_folder(root / "processor", **SMALL_SIZES)
    for name in ("transformer", "text_encoder"):
        assert len(list((root / name).glob("*.safetensors"))) > 1, f"{name} is not sharded"
    pipe = diffusers.QwenImage21Pipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder,
                                         processor=qwen3_vl_processor(processor_dir), transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def picture(width: int, height: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    """A smooth random picture (noise on a coarse gradient: the VAE sees structure); RGBA ones have real
    transparency, alpha from 0 to 255."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray((rng.random((3, 3, 4)) * 255).astype(np.uint8), "RGBA").resize((width, height),
                                                                                              Image.BILINEAR)
    noisy = np.clip(np.asarray(coarse, dtype=np.float32) + rng.normal(0, 20, (height, width, 4)), 0, 255)
    rgba = Image.fromarray(noisy.astype(np.uint8), "RGBA")
    return rgba if mode == "RGBA" else rgba.convert(mode)
