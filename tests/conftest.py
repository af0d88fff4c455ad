"""Session fixtures: the real-vocabulary tokenizer, a tiny repo written by diffusers'
own save_pretrained (the parity oracle), and the project's own tiny repo."""
from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

import pytest
import torch

torch.set_num_threads(2)


# ----------------------------------------------------------------- what a test needs

def chromium() -> str | None:
    """Debian's chromium (or $CHROMIUM), which playwright drives: a browser cannot be downloaded here."""
    found = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    return found or ("/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None)


# `@pytest.mark.needs("ray")`: name -> (whether this machine has it, what to install)
REQUIREMENTS = {
    "ray": (lambda: importlib.util.find_spec("ray") is not None, 'Ray: pip install -e ".[ray]"'),
    "chromium": (lambda: importlib.util.find_spec("playwright") is not None and chromium() is not None,
                 "playwright and a chromium: pip install -e \".[test]\" and apt-get install chromium "
                 "fonts-dejavu-core (Debian/Ubuntu)"),
}


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def pytest_configure(config):
    config.addinivalue_line("markers", "needs(*names): skipped without these (conftest.REQUIREMENTS); with CI=true "
                                       "they fail instead: CI runs every test it can")


def pytest_runtest_setup(item):
    for mark in item.iter_markers("needs"):
        for name in mark.args:
            present, what = REQUIREMENTS[name]
            if not present():
                if in_ci():
                    pytest.fail(f"CI=true, but this test needs {what}", pytrace=False)
                pytest.skip(f"needs {what}")

TINY_TEXT_HIDDEN = 32
LATENTS_MEAN = [-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921]
LATENTS_STD = [2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
               3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160]


@pytest.fixture(autouse=True)
def no_hub_access(monkeypatch):
    """Tests load by model_id from local folders: never query a real hub (test_download.py
    sets its own variables against a loopback hub)."""
    monkeypatch.setenv("DIFFSYNTH_SKIP_DOWNLOAD", "True")


@pytest.fixture(scope="session")
def qwen_tokenizer_dir(tmp_path_factory) -> Path:
    from pipelines.demo.tokenizer import build_qwen_tokenizer

    return build_qwen_tokenizer(tmp_path_factory.mktemp("qwen_tokenizer") / "tokenizer")


@pytest.fixture(scope="session")
def diffusers_repo(tmp_path_factory, qwen_tokenizer_dir):
    """(repo folder, diffusers QwenImagePipeline): tiny, every weight random and non-zero,
    written by diffusers/transformers save_pretrained in the hub layout."""
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImagePipeline,
        QwenImageTransformer2DModel,
    )
    from transformers import AutoTokenizer, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from tests.support.weights import randomize_

    transformer = randomize_(QwenImageTransformer2DModel(
        patch_size=2, in_channels=64, out_channels=16, num_layers=2, attention_head_dim=32,
        num_attention_heads=2, joint_attention_dim=TINY_TEXT_HIDDEN, axes_dims_rope=(4, 14, 14)), seed=1)
    vae = randomize_(AutoencoderKLQwenImage(
        base_dim=16, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=1, attn_scales=[],
        temperal_downsample=[False, True, True], latents_mean=LATENTS_MEAN, latents_std=LATENTS_STD), seed=2)
    text_config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=152064, hidden_size=TINY_TEXT_HIDDEN, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=1, head_dim=16, rms_norm_eps=1e-6,
            max_position_embeddings=2048, bos_token_id=None, eos_token_id=None,
            rope_parameters=dict(rope_type="default", rope_theta=1e6, mrope_section=[2, 3, 3])),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2,
                           out_hidden_size=TINY_TEXT_HIDDEN, fullatt_block_indexes=[0]),
    )
    text_encoder = randomize_(Qwen2_5_VLForConditionalGeneration(text_config), seed=3)
    scheduler = FlowMatchEulerDiscreteScheduler(
        base_image_seq_len=256, base_shift=0.5, max_image_seq_len=8192, max_shift=0.9,
        num_train_timesteps=1000, shift=1.0, shift_terminal=0.02, time_shift_type="exponential",
        use_dynamic_shifting=True)
    pipe = QwenImagePipeline(scheduler=scheduler, vae=vae.eval(), text_encoder=text_encoder.eval(),
                             tokenizer=AutoTokenizer.from_pretrained(qwen_tokenizer_dir),
                             transformer=transformer.eval())
    root = tmp_path_factory.mktemp("diffusers_repo") / "Qwen-Image-Tiny"
    pipe.save_pretrained(root)
    # shard the transformer and the text encoder as on the hub (the VAE stays one file)
    for name, module, shard in (("transformer", transformer, "150KB"), ("text_encoder", text_encoder, "2MB")):
        shutil.rmtree(root / name)
        module.save_pretrained(root / name, max_shard_size=shard)
    return root, pipe


@pytest.fixture(scope="session")
def tiny_repo(tmp_path_factory) -> Path:
    """The project's own tiny repo (pipelines.demo.qwen_image_tiny), as the demo model uses it."""
    from pipelines.demo.qwen_image_tiny import build_tiny_repo

    return build_tiny_repo(tmp_path_factory.mktemp("models") / "tiny" / "Qwen-Image-Tiny")


@pytest.fixture(scope="session")
def tiny_edit_repo(tmp_path_factory) -> Path:
    """The project's own tiny edit repo (a 2511 look-alike: zero_cond_t, vision tower, processor/)."""
    from pipelines.demo.qwen_image_tiny import build_tiny_edit_repo

    return build_tiny_edit_repo(tmp_path_factory.mktemp("models") / "tiny" / "Qwen-Image-Edit-Tiny")


@pytest.fixture(scope="session")
def diffusers_21_repo(tmp_path_factory):
    """(repo folder, diffusers QwenImage21Pipeline): tiny Qwen-Image 2.1 parts, every weight random and non-zero,
    written by diffusers/transformers save_pretrained in the hub layout (tests/support/qwen21.py)."""
    from tests.support.qwen21 import write_reference_repo

    root = tmp_path_factory.mktemp("diffusers_21_repo") / "Qwen-Image-2.1-Tiny"
    return root, write_reference_repo(root)


@pytest.fixture(scope="session")
def tiny_21_repo(tmp_path_factory) -> Path:
    """The project's own tiny Qwen-Image 2.1 repo (pipelines.demo.qwen_image_21_tiny), as the demo model uses it."""
    from pipelines.demo.qwen_image_21_tiny import build

    return build(tmp_path_factory.mktemp("models") / "tiny" / "Qwen-Image-2.1-Tiny")
