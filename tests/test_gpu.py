"""The CUDA paths, on the tiny model: page-locked host buffers fed to the GPU with asynchronous
copies, side-stream prefetch, float8 storage on the device, and the runner's `device=auto` /
`dtype=auto` choosing cuda / bfloat16. On a machine with a GPU: `python -m pytest -m gpu`.
Without CUDA every test here is skipped (importing this file touches no device).

Image comparisons: the same values through the same kernels, so equal by construction; the CUDA
libraries do not promise bitwise determinism (GEMM algorithm choice, atomics), so one level in
255 is allowed on at most 1% of the values. Wrong runs move the image by 10 or more (tests/test_vram.py)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines.core import vram
from pipelines.qwen_image import ModelConfig, QwenImagePipeline, load_tokenizer

from .test_vram import FOLDERS, FP8, write_rounded_repo

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (a GPU build of torch and a GPU)")]

GEN = dict(prompt="A red fox sitting in fresh snow, soft morning light", negative_prompt="blurry", cfg_scale=4.0,
           seed=3, height=64, width=64, num_inference_steps=2, progress_bar=False)
BF16 = torch.bfloat16


@pytest.fixture(scope="module")
def tokenizer(tiny_repo):
    return load_tokenizer([tiny_repo / "tokenizer"])


def build(repo: Path, tokenizer, keys: dict | None = None, vram_limit=None,
          options: vram.VramOptions | None = None) -> QwenImagePipeline:
    pipe = QwenImagePipeline.from_pretrained(
        torch_dtype=BF16, device="cuda", model_configs=[ModelConfig(path=repo / f, **(keys or {}))
                                                        for f in FOLDERS.values()],
        vram_limit=vram_limit, vram_options=options)
    pipe.tokenizer = tokenizer
    return pipe


def pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def assert_same_image(image: np.ndarray, expected: np.ndarray) -> None:
    assert ((expected > 2) & (expected < 253)).mean() > 0.5 and expected.std() > 5  # a real image
    diff = np.abs(image - expected)
    assert diff.max() <= 1 and (diff > 0).mean() <= 0.01, f"max {diff.max()}, {(diff > 0).mean():.2%} differ"


@pytest.fixture(scope="module")
def reference(tiny_repo, tokenizer):
    return pixels(build(tiny_repo, tokenizer)(**GEN))


def test_host_storage_is_page_locked_and_copied_asynchronously(tiny_repo, tokenizer, reference, monkeypatch):
    pipe = build(tiny_repo, tokenizer, dict(offload_device="cpu", offload_dtype="bfloat16"))
    manager = pipe.vram["dit"]
    assert manager._arenas and all(arena.pinned_bytes > 0 for arena in manager._arenas)
    assert all(arena.buffer.is_pinned() for arena in manager._arenas)
    assert manager.stats()["pinned_gib"] > 0
    assert all(p.device.type == "cpu" and p.is_pinned() for p in pipe.dit.parameters())  # the offload storage

    moves = []  # (source page-locked, non_blocking) of every host-to-device copy during the onload
    original_to = torch.Tensor.to

    def to(self, *args, **kwargs):
        out = original_to(self, *args, **kwargs)
        if self.device.type == "cpu" and out.device.type == "cuda":
            moves.append((self.is_pinned(), bool(kwargs.get("non_blocking"))))
        return out

    monkeypatch.setattr(torch.Tensor, "to", to)
    manager.onload()
    monkeypatch.setattr(torch.Tensor, "to", original_to)
    assert moves and all(pinned and non_blocking for pinned, non_blocking in moves), moves[:5]
    assert all(p.device.type == "cuda" for p in pipe.dit.parameters())
    manager.offload()
    assert_same_image(pixels(pipe(**GEN)), reference)


def test_side_stream_prefetch_gives_the_same_image(tiny_repo, tokenizer):
    # weights stay on the host, every layer is copied at every use: the prefetcher copies ahead
    pipe = build(tiny_repo, tokenizer, dict(offload_device="cpu", onload_device="cpu"), vram_limit=0)
    for manager in pipe.vram.values():
        assert manager.prefetcher is not None and isinstance(manager.prefetcher.stream, torch.cuda.Stream)
    with_prefetch = pixels(pipe(**GEN))
    stats = pipe.vram["dit"].stats()
    assert stats["prefetch_hits"] > 2 * len(pipe.vram["dit"].layers)  # after the first forward recorded the order
    for manager in pipe.vram.values():
        manager.set_prefetch(False)
    assert_same_image(with_prefetch, pixels(pipe(**GEN)))


def test_float8_storage_on_the_device(tiny_repo, tokenizer, tmp_path):
    keys = dict(offload_dtype=FP8, offload_device="cpu", onload_dtype=FP8, onload_device="cuda",
                preparing_dtype=FP8, preparing_device="cuda")
    pipe = build(tiny_repo, tokenizer, keys)
    manager = pipe.vram["dit"]
    manager.onload()
    weight, bias = pipe.dit.img_in.weight, pipe.dit.img_in.bias
    assert weight.device.type == "cuda" and weight.dtype == torch.float8_e4m3fn
    assert bias.dtype == BF16  # vectors keep the computation dtype
    manager.offload()
    # the oracle: the unmanaged bf16 pipeline on the weights rounded through float8 (every float8
    # value is a bfloat16 value, so both compute on the same numbers)
    oracle = build(write_rounded_repo(tiny_repo, tmp_path / tiny_repo.name, "float8"), tokenizer)
    assert_same_image(pixels(pipe(**GEN)), pixels(oracle(**GEN)))


def test_runner_auto_device_and_dtype_choose_cuda_and_bfloat16(tiny_repo, monkeypatch):
    from runner.build import pipeline as runner_build
    from runner.config.checks import to_spec
    from runner.config.compose import compose

    monkeypatch.setenv("DIFFSYNTH_MODEL_BASE_PATH", str(tiny_repo.parent.parent))  # <base>/tiny/Qwen-Image-Tiny
    spec = to_spec(compose(["model=qwen_image_tiny", "sampler=tiny", "vram=fp8", "device=auto", "dtype=auto",
                            "tracking=none"]))
    runtime = runner_build.resolve_runtime(spec)
    assert (runtime.device, runtime.dtype) == ("cuda", "bfloat16")
    configs, _, _ = runner_build.model_configs(spec, runtime)
    assert all(c.vram_settings()["onload_device"] == "cuda" for c in configs)  # the preset's `auto`
    try:
        entry, _ = runner_build.get_pipeline(spec, runtime)
        pipe = entry.pipe
        assert pipe.device.type == "cuda" and pipe.torch_dtype == BF16
        settings = pipe.vram["dit"].settings
        assert settings.computation.device.type == "cuda" and settings.onload.dtype == torch.float8_e4m3fn
        image = pipe(**{**GEN, "progress_bar": False})
        assert image.size == (64, 64)
    finally:
        runner_build.release()
