"""VRAM management of the Qwen-Image 2.1 pipeline on the CPU, as tests/test_vram.py does it for 1.x: every preset and
some key combinations (vram_limit included) give, bit for bit, the image of the unmanaged pipeline on the weights the
storage leaves (float8 / bfloat16 storage: the checkpoint rounded through that dtype by the test); every part is
managed (the vision tower and the VAE's encoder included: the call reads a picture), each stage onloads its model
and the call ends with all offloaded; hot LoRA on wrapped 2.1 layers, cold LoRA fused into the offload storage.
The model: the project's tiny 2.1 repo (pipelines.demo.qwen_image_21_tiny)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pipelines.core import vram
from pipelines.core.lora import apply as lora_apply
from pipelines.core.vram import VramConfigError
from pipelines.demo.lora import random_lora, save_lora
from pipelines.demo.qwen_image_21_tiny import TinyQwenImage21Pipeline
from pipelines.qwen_image import ModelConfig
from tests.support.qwen21 import picture
from tests.test_vram import PRESETS, StageRecorder, assert_same_image, check_layers, pixels, write_rounded_repo

FOLDERS = {"dit": "transformer", "text_encoder": "text_encoder", "vae": "vae"}
GEN = dict(prompt="A red fox sitting in fresh snow", negative_prompt="blurry", cfg_scale=4.0, seed=3, height=64,
           width=96, num_inference_steps=2, edit_image=[picture(64, 64, "RGBA", seed=1)], output_resolution=64,
           progress_bar=False)


def build(repo, keys: dict | None = None, vram_limit=None) -> TinyQwenImage21Pipeline:
    return TinyQwenImage21Pipeline.from_pretrained(
        torch_dtype=torch.float32, device="cpu", vram_limit=vram_limit,
        model_configs=[ModelConfig(path=repo / folder, **(keys or {})) for folder in FOLDERS.values()],
        processor_config=ModelConfig(path=repo / "processor"))


@pytest.fixture(scope="module")
def expected_images(tiny_21_repo, tmp_path_factory):
    """storage -> the unmanaged pipeline's image of GEN on the weights rounded as that storage rounds them."""
    images = {}

    def get(storage: str) -> np.ndarray:
        if storage not in images:
            repo = tiny_21_repo if storage == "float32" else write_rounded_repo(
                tiny_21_repo, tmp_path_factory.mktemp(f"rounded_21_{storage}") / tiny_21_repo.name, storage)
            images[storage] = pixels(build(repo)(**GEN))
        return images[storage]

    return get


def check_stages(pipe, recorder: StageRecorder) -> None:
    """The prompt and the negative prompt (text encoder), the picture (VAE), the denoising (DiT), the decoding
    (VAE), then everything offloaded; each model's layers where its settings say at each step."""
    assert [c[0] for c in recorder.calls] == ["text_encoder", "text_encoder", "vae", "dit", "vae", None]
    check_layers(pipe, recorder.calls[0][2], "text_encoder", {"onload"})
    check_layers(pipe, recorder.calls[2][1], "text_encoder", {"onload", "preparing"})
    check_layers(pipe, recorder.calls[2][2], "vae", {"onload"})
    check_layers(pipe, recorder.calls[3][2], "dit", {"onload"})
    check_layers(pipe, recorder.calls[4][1], "dit", {"onload", "preparing"})
    check_layers(pipe, recorder.calls[5][1], "vae", {"onload", "preparing"})
    check_layers(pipe, recorder.calls[5][2], None, set())
    assert all(manager.state == vram.OFFLOAD for manager in pipe.vram.values())


@pytest.mark.parametrize("preset", list(PRESETS))
def test_presets_give_the_unmanaged_image(preset, tiny_21_repo, expected_images, monkeypatch):
    keys, vram_limit, storage = PRESETS[preset]
    pipe = build(tiny_21_repo, keys, vram_limit)
    assert set(pipe.vram) == (set() if preset == "none" else set(FOLDERS))
    recorder = StageRecorder(pipe, monkeypatch)
    assert_same_image(pixels(pipe(**GEN)), expected_images(storage))
    if preset != "none":
        check_stages(pipe, recorder)
    if preset == "disk":  # nothing of the weights stays in memory between calls
        assert all(p.device.type == "meta" for name in FOLDERS for p in getattr(pipe, name).parameters())


# (id, keys for every model, vram_limit as a fraction of the DiT's float32 bytes, the storage whose rounding the
# image carries)
COMBINATIONS = [
    ("offload bf16", dict(offload_dtype="bfloat16", offload_device="cpu"), None, "bfloat16"),
    ("disk per layer, limit", dict(offload_device="disk", onload_device="disk", preparing_device="cpu"), 0.5,
     "float32"),
    ("fp8 onload, fp32 preparing, limit", dict(offload_dtype="float8_e4m3fn", offload_device="cpu",
                                               onload_dtype="float8_e4m3fn", preparing_dtype="float32"), 0.4,
     "float8"),
]


@pytest.mark.parametrize("name,keys,limit,storage", COMBINATIONS, ids=[c[0] for c in COMBINATIONS])
def test_key_combinations_give_the_unmanaged_image(name, keys, limit, storage, tiny_21_repo, expected_images,
                                                    monkeypatch):
    dit_bytes = sum(p.numel() * 4 for p in build(tiny_21_repo).dit.parameters())
    vram_limit = None if limit is None else limit * dit_bytes / vram.GiB
    pipe = build(tiny_21_repo, keys, vram_limit)
    recorder = StageRecorder(pipe, monkeypatch)
    assert_same_image(pixels(pipe(**GEN)), expected_images(storage))
    check_stages(pipe, recorder)
    if limit is not None:  # the limit took effect: some of the DiT's layers prepared, not all
        prepared = sum(state == "preparing" for state, *_ in recorder.calls[4][1]["dit"].values())
        assert 0 < prepared < sum(layer.preparable for layer in pipe.vram["dit"].layers)


def test_the_storage_dtypes_really_change_the_image(expected_images):
    """The oracles differ, so an exact match with the float8 one shows the weights were stored in float8."""
    float32, float8, bfloat16 = (expected_images(s) for s in ("float32", "float8", "bfloat16"))
    assert np.abs(float8 - float32).mean() > 1 and np.abs(bfloat16 - float32).max() > 0


def test_lora_on_managed_2_1_models(tiny_21_repo, expected_images, tmp_path):
    """Hot on the disk-offloaded DiT (cold is refused there), cold fused into a bfloat16 offload storage: the
    images of the unmanaged pipeline with the same LoRA (exact), and the base image back after clear."""
    unmanaged = build(tiny_21_repo)
    shapes = {k: tuple(v.shape) for k, v in unmanaged.dit.state_dict().items()}
    path = save_lora(tmp_path / "lora.safetensors", random_lora(shapes, rank=4, seed=7), "kohya", 2.0)
    unmanaged.load_lora(unmanaged.dit, str(path), hotload=True)
    expected = pixels(unmanaged(**GEN))
    assert np.abs(expected - expected_images("float32")).mean() > 3  # the LoRA shows

    disk = build(tiny_21_repo, dict(offload_device="disk", onload_device="disk"))
    handle = disk.load_lora(disk.dit, str(path))
    assert handle.hot and lora_apply._STATE[disk.dit].hot  # the default for a VRAM-managed model
    assert_same_image(pixels(disk(**GEN)), expected)
    with pytest.raises(VramConfigError, match="cold LoRA"):
        disk.load_lora(disk.dit, str(path), hotload=False)
    disk.clear_lora()
    assert_same_image(pixels(disk(**GEN)), expected_images("float32"))

    fused = build(tiny_21_repo)  # the oracle of the cold case: fused in float32, every weight rounded to bfloat16
    fused.load_lora(fused.dit, str(path))
    with torch.no_grad():
        for name in FOLDERS:
            for param in getattr(fused, name).parameters():
                param.copy_(param.to(torch.bfloat16).float())
    pipe = build(tiny_21_repo, dict(offload_device="cpu", offload_dtype="float32", onload_dtype="bfloat16",
                                    preparing_dtype="float32"))
    base = pixels(pipe(**GEN))
    assert not pipe.load_lora(pipe.dit, str(path), hotload=False).hot
    assert_same_image(pixels(pipe(**GEN)), pixels(fused(**GEN)))
    pipe.clear_lora()
    assert np.array_equal(pixels(pipe(**GEN)), base)
