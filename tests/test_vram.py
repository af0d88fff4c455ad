"""VRAM management on the CPU: every preset and a table of key combinations give, bit for bit,
the image of the unmanaged pipeline run on the weights the storage leaves (float32 storage: the
checkpoint itself; float8 or bfloat16 storage: the checkpoint rounded through that dtype by the
test, see `round_as_stored`), the weights are where the keys say after each stage, hot LoRA works
on wrapped layers, disk offload keeps host memory bounded, bad keys get clear errors. The CPU
stands in for the GPU: the places differ by dtype and by "disk" (weights left in the file show as
meta tensors on the module); the vram_limit stand-in counts the bytes prepared on the device.

Exact versus tolerance. A managed layer runs the computation-dtype copy of its stored tensor
through the same kernels as the unmanaged model: every host weight starts on
loader.HOST_ALIGNMENT whether it was read in place, copied or cast, so with the same values the
same kernels give the same bits. Storage in float8/bfloat16 changes the values, not the math:
casting back gives exactly the rounded weights of the oracle. So every image comparison against an
oracle is exact (max difference 0). The one stated tolerance is batched CFG
(`test_batched_cfg_matches_two_forwards`): a batch-2 forward with a padded, masked prompt runs
other kernels (other matmul shapes, masked softmax) than two batch-1 forwards."""
from __future__ import annotations

import gc
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from pipelines.core import vram
from pipelines.core.lora import apply as lora_apply
from pipelines.core.lora import clear_lora as core_clear_lora
from pipelines.core.lora import load_lora as core_load_lora
from pipelines.core.vram import VramConfigError, VramSettings
from pipelines.core.vram import host as vram_host
from pipelines.core.vram import layer as vram_layer
from pipelines.core.vram import settings as vram_settings
from pipelines.demo.checkpoints import random_state_dict, save_sharded
from pipelines.demo.lora import random_lora, save_lora
from pipelines.models.qwen_image_dit import QwenImageDiT, QwenImageDiTParams
from pipelines.qwen_image import ModelConfig, QwenImagePipeline, load_tokenizer

FOLDERS = {"dit": "transformer", "text_encoder": "text_encoder", "vae": "vae"}
GEN = dict(prompt="A red fox sitting in fresh snow, soft morning light", negative_prompt="blurry", cfg_scale=4.0,
           seed=3, height=64, width=64, num_inference_steps=2, progress_bar=False)
FP8 = "float8_e4m3fn"
# What the storage dtypes do to the image, measured on the tiny model (GEN, 64x64, 2 steps; |diff|
# in 0..255 against the float32 image): float8 storage mean 4.1 / max 30, bfloat16 storage mean
# 0.25 / max 2. Wrong runs differ from the right one by less than float8 does: no negative prompt
# mean 2.9 / max 27, cfg_scale 3.5 for 4.0 mean 0.9 / max 14, no CFG at all mean 5.6 / max 81,
# another prompt mean 8.4 / max 97. No tolerance on the float32 image tells float8 rounding from
# such a bug, hence the oracles on rounded weights, compared exactly.
STORAGE = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float8": torch.float8_e4m3fn}

# The presets of conf/vram/*.yaml with `auto` resolved as the runner does on a CPU run
# (dtype float32, device cpu); on a GPU run `auto` is bfloat16 / cuda. The last item: the storage
# whose rounding the image carries.
AUTO_DTYPE, AUTO_DEVICE = "float32", "cpu"
PRESETS = {
    "none": ({}, None, "float32"),
    "cpu_offload": (dict(offload_dtype=AUTO_DTYPE, offload_device="cpu", onload_dtype=AUTO_DTYPE,
                         onload_device=AUTO_DEVICE, preparing_dtype=AUTO_DTYPE, preparing_device=AUTO_DEVICE,
                         computation_dtype=AUTO_DTYPE, computation_device=AUTO_DEVICE), None, "float32"),
    "fp8": (dict(offload_dtype=FP8, offload_device="cpu", onload_dtype=FP8, onload_device=AUTO_DEVICE,
                 preparing_dtype=FP8, preparing_device=AUTO_DEVICE, computation_dtype=AUTO_DTYPE,
                 computation_device=AUTO_DEVICE), None, "float8"),
    "low_vram": (dict(offload_dtype=FP8, offload_device="cpu", onload_dtype=FP8, onload_device="cpu",
                      preparing_dtype=FP8, preparing_device=AUTO_DEVICE, computation_dtype=AUTO_DTYPE,
                      computation_device=AUTO_DEVICE), "auto", "float8"),
    "disk": (dict(offload_dtype="disk", offload_device="disk", onload_dtype=FP8, onload_device="cpu",
                  preparing_dtype=FP8, preparing_device=AUTO_DEVICE, computation_dtype=AUTO_DTYPE,
                  computation_device=AUTO_DEVICE), "auto", "float8"),
}


# ============================================================================ helpers


def round_as_stored(tensor: torch.Tensor, storage: str) -> torch.Tensor:
    """What storing a float32 weight in `storage` leaves of it, written from the documented rule
    (pipelines.core.vram: float8 applies to matrices and kernels, vectors keep the computation
    dtype; other storage dtypes apply to every floating-point tensor), not from the library's code."""
    if storage == "float32" or not tensor.is_floating_point() or (storage == "float8" and tensor.ndim < 2):
        return tensor
    return tensor.to(STORAGE[storage]).to(tensor.dtype)


def round_parameters_(module: torch.nn.Module, storage: str) -> None:
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(round_as_stored(param, storage))


@pytest.fixture(scope="module")
def tokenizer(tiny_repo):
    return load_tokenizer([tiny_repo / "tokenizer"])


def build(repo: Path, tokenizer, keys: dict | None = None, per_model: dict | None = None,
          vram_limit=None, options: vram.VramOptions | None = None) -> QwenImagePipeline:
    configs = [ModelConfig(path=repo / folder, **((per_model or {}).get(name, keys) or {}))
               for name, folder in FOLDERS.items()]
    pipe = QwenImagePipeline.from_pretrained(torch_dtype=torch.float32, device="cpu", model_configs=configs,
                                             vram_limit=vram_limit, vram_options=options)
    pipe.tokenizer = tokenizer
    return pipe


def write_rounded_repo(repo: Path, out: Path, storage: str) -> Path:
    """A copy of the model folder `repo` at `out` whose weights are rounded as `storage` rounds them:
    the unmanaged pipeline on it is the exact oracle of a run that stores the weights in `storage`."""
    shutil.copytree(repo, out)
    for file in out.rglob("*.safetensors"):
        state = load_file(str(file))
        save_file({k: round_as_stored(v, storage) for k, v in state.items()}, str(file), metadata={"format": "pt"})
    return out


@pytest.fixture(scope="module")
def rounded_repos(tiny_repo, tmp_path_factory) -> dict[str, Path]:
    """The tiny repo, and copies whose weights are rounded as float8 / bfloat16 storage rounds them."""
    return {"float32": tiny_repo, **{storage: write_rounded_repo(
        tiny_repo, tmp_path_factory.mktemp(f"rounded_{storage}") / tiny_repo.name, storage)
        for storage in ("float8", "bfloat16")}}


@pytest.fixture(scope="module")
def unmanaged(tiny_repo, tokenizer):
    return build(tiny_repo, tokenizer)


@pytest.fixture(scope="module")
def oracle(rounded_repos, tokenizer, unmanaged):
    """storage -> the unmanaged pipeline on the weights rounded as that storage rounds them."""
    pipes = {"float32": unmanaged}

    def get(storage: str) -> QwenImagePipeline:
        if storage not in pipes:
            pipes[storage] = build(rounded_repos[storage], tokenizer)
        return pipes[storage]

    return get


@pytest.fixture(scope="module")
def expected_images(oracle):
    """storage -> the oracle's image of GEN (computed once per storage, when first needed)."""
    images = {}

    def get(storage: str) -> np.ndarray:
        if storage not in images:
            images[storage] = pixels(oracle(storage)(**GEN))
        return images[storage]

    return get


@pytest.fixture(scope="module")
def reference(expected_images):
    return expected_images("float32")


def pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def assert_real_image(expected: np.ndarray) -> None:
    """A saturated or flat image would make any comparison with it empty."""
    assert ((expected > 2) & (expected < 253)).mean() > 0.5 and expected.std() > 5


def assert_same_image(image: np.ndarray, expected: np.ndarray) -> None:
    assert_real_image(expected)
    diff = np.abs(image - expected)
    assert diff.max() == 0, f"max pixel difference {diff.max()} (mean {diff.mean():.2f}), expected none"


class StageRecorder:
    """Wraps vram.use_stage: records (stage, placements before, placements after) per call, with
    the actual storage of every managed layer's largest parameter (read from the module)."""

    def __init__(self, pipe: QwenImagePipeline, monkeypatch):
        self.pipe, self.calls = pipe, []
        original = vram.use_stage

        def recording(managers, active, *stages):
            if managers is not pipe.vram:  # another pipeline
                return original(managers, active, *stages)
            before = self.snapshot()
            original(managers, active, *stages)
            self.calls.append((active, before, self.snapshot()))

        monkeypatch.setattr(vram, "use_stage", recording)

    def snapshot(self) -> dict:
        out = {}
        for name, manager in self.pipe.vram.items():
            model = getattr(self.pipe, name)
            states = manager.placements()
            layers = {}
            for layer, (state, where) in states.items():
                module = model.get_submodule(layer)
                param = max((p for p in module._parameters.values() if p is not None), key=torch.Tensor.numel)
                layers[layer] = (state, where, param.dtype, param.device.type, param.ndim)
            out[name] = layers
        return out


def storage_of(place: vram.Place, computation: vram.Place, ndim: int) -> tuple[str, torch.dtype | None]:
    """(device type, dtype) a layer's largest tensor has in `place` (dtype None: the file's)."""
    if place.is_disk:
        return "meta", None
    dtype = place.dtype
    if dtype in vram.FLOAT8 and ndim < 2:
        dtype = computation.dtype
    return place.device.type, dtype


def check_layers(pipe, snapshot: dict, active: str | None, states: set[str]) -> None:
    """Every managed model but `active` is offloaded; `active` is in one of `states`; each
    layer's weights are stored as its settings say."""
    for name, layers in snapshot.items():
        settings = pipe.vram[name].settings
        allowed = states if name == active else {"offload"}
        for layer, (state, where, dtype, device, ndim) in layers.items():
            assert state in allowed, f"{name}.{layer} is {state}, expected {allowed} (stage {active})"
            place = {"offload": settings.offload, "onload": settings.onload, "preparing": settings.preparing}[state]
            want_device, want_dtype = storage_of(place, settings.computation, ndim)
            assert device == want_device, f"{name}.{layer} ({state}) on {device}, expected {want_device}"
            if want_dtype is not None:
                assert dtype == want_dtype, f"{name}.{layer} ({state}) in {dtype}, expected {want_dtype}"
            assert where == str(place) or (place.dtype in vram.FLOAT8 and ndim < 2) or place.is_disk and where == "disk"


def check_stages(pipe, recorder: StageRecorder) -> None:
    """Text encoder, then DiT, then VAE, then everything offloaded; placements at each step."""
    assert [c[0] for c in recorder.calls] == ["text_encoder", "text_encoder", "dit", "vae", None]
    after_encode = recorder.calls[0][2]
    check_layers(pipe, after_encode, "text_encoder", {"onload"})
    end_of_encode = recorder.calls[2][1]  # just before the DiT stage: layers may have been prepared
    check_layers(pipe, end_of_encode, "text_encoder", {"onload", "preparing"})
    check_layers(pipe, recorder.calls[2][2], "dit", {"onload"})
    end_of_denoise = recorder.calls[3][1]
    check_layers(pipe, end_of_denoise, "dit", {"onload", "preparing"})
    check_layers(pipe, recorder.calls[4][1], "vae", {"onload", "preparing"})
    check_layers(pipe, recorder.calls[4][2], None, set())
    for manager in pipe.vram.values():
        assert manager.state == vram.OFFLOAD


def prepared(snapshot: dict, name: str) -> int:
    return sum(state == "preparing" for state, *_ in snapshot[name].values())


# ============================================================================ presets and combinations


@pytest.mark.parametrize("preset", list(PRESETS))
def test_presets_give_the_unmanaged_image(preset, tiny_repo, tokenizer, expected_images, monkeypatch):
    keys, vram_limit, storage = PRESETS[preset]
    pipe = build(tiny_repo, tokenizer, keys, vram_limit=vram_limit)
    assert set(pipe.vram) == (set() if preset == "none" else set(FOLDERS))
    recorder = StageRecorder(pipe, monkeypatch)
    assert_same_image(pixels(pipe(**GEN)), expected_images(storage))
    if preset != "none":
        check_stages(pipe, recorder)
    if preset == "disk":  # nothing of the weights stays in memory between calls
        assert all(p.device.type == "meta" for p in pipe.dit.parameters())


@pytest.fixture(scope="module")
def model_bytes(unmanaged):
    return {name: sum(p.numel() * 4 for p in getattr(unmanaged, name).parameters()) for name in FOLDERS}


# (id, keys for every model, vram_limit as a fraction of the DiT's float32 bytes, the storage whose
# rounding the image carries (its oracle, compared exactly), how many DiT layers are prepared at the
# end of the denoising: "all", "none" or "some")
COMBINATIONS = [
    ("offload_device only", dict(offload_device="cpu"), None, "float32", "none"),
    ("offload bf16, rest computation", dict(offload_dtype="bfloat16", offload_device="cpu"), None, "bfloat16",
     "none"),
    ("disk, read per layer", dict(offload_dtype="disk", offload_device="disk", onload_dtype="disk",
                                  onload_device="disk"), None, "float32", "all"),
    ("disk, onload cpu", dict(offload_dtype="disk", offload_device="disk", onload_device="cpu"), None, "float32",
     "none"),
    ("disk per layer, limit", dict(offload_device="disk", onload_device="disk", preparing_device="cpu"), 0.5,
     "float32", "some"),
    ("fp8 onload, fp32 preparing, no limit", dict(offload_dtype=FP8, offload_device="cpu", onload_dtype=FP8,
                                                   preparing_dtype="float32"), None, "float8", "all"),
    ("fp8 onload, fp32 preparing, limit 0", dict(offload_dtype=FP8, offload_device="cpu", onload_dtype=FP8,
                                                  preparing_dtype="float32"), 0.0, "float8", "none"),
    ("bf16 onload, fp32 preparing, limit", dict(offload_dtype="float32", offload_device="cpu",
                                                 onload_dtype="bfloat16", preparing_dtype="float32"), 0.4, "bfloat16",
     "some"),
    ("fp8 offload, fp32 onload", dict(offload_dtype=FP8, offload_device="cpu", onload_dtype="float32"), None,
     "float8", "none"),
    ("disk, fp8 onload, fp32 preparing, limit", dict(offload_device="disk", onload_dtype=FP8, onload_device="cpu",
                                                      preparing_dtype=torch.float32), 0.6, "float8", "some"),
]


@pytest.mark.parametrize("name,keys,limit,storage,dit_prepared", COMBINATIONS, ids=[c[0] for c in COMBINATIONS])
def test_key_combinations_give_the_unmanaged_image(name, keys, limit, storage, dit_prepared, tiny_repo, tokenizer,
                                                    expected_images, model_bytes, monkeypatch):
    vram_limit = None if limit is None else limit * model_bytes["dit"] / vram.GiB
    pipe = build(tiny_repo, tokenizer, keys, vram_limit=vram_limit)
    recorder = StageRecorder(pipe, monkeypatch)
    assert_same_image(pixels(pipe(**GEN)), expected_images(storage))
    check_stages(pipe, recorder)
    end_of_denoise = recorder.calls[3][1]
    count = prepared(end_of_denoise, "dit")
    total = sum(layer.preparable for layer in pipe.vram["dit"].layers)  # norms stay float32 under float8 keys
    expected = {"all": total, "none": 0}.get(dit_prepared)
    if expected is not None:
        assert count == expected, f"{count} of {total} DiT layers prepared, expected {dit_prepared}"
    else:
        assert 0 < count < total
        prepared_bytes = sum(pipe.vram["dit"].layers[i].nbytes[vram.PREPARED] for i, (state, *_) in
                             enumerate(end_of_denoise["dit"].values()) if state == "preparing")
        assert prepared_bytes <= vram_limit * vram.GiB
    meter = pipe.vram["dit"].meter
    assert all(m.meter is meter for m in pipe.vram.values())  # one meter for the pipeline's models
    assert not any(meter.counted.values()), "prepared bytes not given back at the end of the call"


def test_the_storage_dtypes_really_change_the_image(expected_images):
    """The oracles differ from each other, so an exact match with the float8 one shows the weights
    were stored in float8 (a run that kept float32 or rounded only some layers would not match)."""
    float32, float8, bfloat16 = (expected_images(s) for s in ("float32", "float8", "bfloat16"))
    assert np.abs(float8 - float32).mean() > 1 and np.abs(bfloat16 - float32).max() > 0
    assert np.abs(float8 - bfloat16).mean() > 1


@pytest.fixture(scope="module")
def fp8_pipe(tiny_repo, tokenizer):
    return build(tiny_repo, tokenizer, PRESETS["fp8"][0])


# the wrong runs of the module docstring's measurement: each moves the image by less than float8
# storage does (no negative prompt, a slightly wrong cfg_scale) or by about as much
WRONG_RUNS = {"no CFG": dict(cfg_scale=1.0), "no negative prompt": dict(negative_prompt=""),
              "cfg_scale 3.5": dict(cfg_scale=3.5), "another prompt": dict(prompt="a lighthouse on a cliff at night"),
              "another seed": dict(seed=4)}


@pytest.mark.parametrize("wrong", list(WRONG_RUNS))
def test_the_fp8_check_rejects_a_wrong_run(wrong, fp8_pipe, expected_images):
    image = pixels(fp8_pipe(**{**GEN, **WRONG_RUNS[wrong]}))
    with pytest.raises(AssertionError, match="max pixel difference"):
        assert_same_image(image, expected_images("float8"))


def test_models_with_different_settings_and_image_to_image(tiny_repo, tokenizer, unmanaged, monkeypatch):
    from PIL import Image

    per_model = {"dit": dict(offload_device="disk", onload_device="disk"),
                 "text_encoder": dict(offload_device="cpu", offload_dtype="float32", onload_dtype="float32"),
                 "vae": dict(offload_device="disk", onload_device="cpu")}
    pipe = build(tiny_repo, tokenizer, per_model=per_model)
    start = Image.fromarray(np.linspace(0, 255, 64 * 64 * 3).reshape(64, 64, 3).astype(np.uint8))
    args = dict(GEN, input_image=start, denoising_strength=0.6, num_inference_steps=4)
    recorder = StageRecorder(pipe, monkeypatch)
    image = pixels(pipe(**args))
    assert_same_image(image, pixels(unmanaged(**args)))  # float32 storage everywhere: exact
    assert [c[0] for c in recorder.calls] == ["text_encoder", "text_encoder", "vae", "dit", "vae", None]
    check_layers(pipe, recorder.calls[3][2], "dit", {"onload"})  # the VAE went back after encoding the image
    assert pipe.dit.img_in.weight.device.type == "meta" and pipe.vae.decoder.conv_in.weight.device.type == "meta"
    assert pipe.text_encoder.model.embed_tokens.weight.device.type == "cpu"


def test_encode_prompt_alone_onloads_the_text_encoder_and_a_failed_call_offloads(tiny_repo, tokenizer):
    pipe = build(tiny_repo, tokenizer, PRESETS["fp8"][0])
    hidden, _ = pipe.encode_prompt("a cat")
    assert pipe.vram["text_encoder"].state == vram.ONLOAD and pipe.vram["dit"].state == vram.OFFLOAD

    def broken(*args, **kwargs):
        assert pipe.vram["vae"].state == vram.ONLOAD
        raise RuntimeError("decode failed")

    pipe.vae.decode = broken
    with pytest.raises(RuntimeError, match="decode failed"):
        pipe(**GEN)
    assert all(m.state == vram.OFFLOAD for m in pipe.vram.values())


# ============================================================================ options


def assert_batched_close(batched: np.ndarray, two: np.ndarray) -> None:
    """Batched CFG against two forwards: a stated tolerance, not exactness (other kernels: batch-2
    matmuls, a masked softmax over the padded prompt). Measured on the tiny model, float32 and float8
    storage alike: one value of the 12,288 off by 1. Attending to the padding (the mask dropped)
    gives mean 8.8 / max 82. Bound: max 1 on under 1% of the values."""
    assert_real_image(two)
    diff = np.abs(batched - two)
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01, f"max {diff.max()}, {(diff > 0).mean():.2%} differ"


def test_batched_cfg_matches_two_forwards(tiny_repo, tokenizer, unmanaged, reference):
    # the negative prompt is shorter: the batch pads it and masks the padding
    assert_batched_close(pixels(unmanaged(**GEN, cfg_batch=True)), reference)
    pipe = build(tiny_repo, tokenizer, PRESETS["disk"][0])
    assert_batched_close(pixels(pipe(**GEN, cfg_batch=True)), pixels(pipe(**GEN)))


def test_prefetch_bookkeeping_on_the_cpu(tiny_repo, tokenizer, monkeypatch):
    """The CUDA prefetch logic, with synchronous copies: same image, copies used, a layer run out
    of order makes it record again."""
    keys = dict(offload_device="disk", onload_device="disk")  # vram_limit 0: every layer read at every use
    plain = build(tiny_repo, tokenizer, keys, vram_limit=0)
    expected = pixels(plain(**GEN, tiled=True, tile_size=4, tile_stride=2))
    pipe = build(tiny_repo, tokenizer, keys, vram_limit=0)
    for manager in pipe.vram.values():
        manager.set_prefetch(True, prefetch_bytes=64 << 10)
    assert np.array_equal(pixels(pipe(**GEN, tiled=True, tile_size=4, tile_stride=2)), expected)
    dit, vae = pipe.vram["dit"].stats(), pipe.vram["vae"].stats()
    # 2 steps x 2 forwards: the first forward records the order, the later ones are prefetched
    assert dit["prefetch_hits"] > 2 * len(pipe.vram["dit"].layers) and dit["prefetch_resets"] == 0
    assert vae["prefetch_hits"] > 0  # the VAE has no root forward: its cycle is one tile's layers
    # out of order: a layer called alone
    pipe.vram["dit"].onload()
    pipe.dit.proj_out(torch.zeros(1, pipe.dit.params.inner_dim))
    pipe.vram["dit"].offload()
    assert np.array_equal(pixels(pipe(**GEN, tiled=True, tile_size=4, tile_stride=2)), expected)
    assert pipe.vram["dit"].stats()["prefetch_resets"] >= 1


def test_host_arenas_hold_the_same_weights(tiny_repo, tokenizer, expected_images, monkeypatch):
    """The page-locked arena path (CUDA), without the page locking."""
    keys = dict(offload_dtype="float32", offload_device="cpu", onload_dtype="bfloat16", onload_device="cpu")
    pipe = build(tiny_repo, tokenizer, keys, options=vram.VramOptions(host_arenas=True))
    storages = {p.untyped_storage().data_ptr() for p in pipe.dit.parameters()}
    assert len(storages) == 1  # one buffer for the model
    recorder = StageRecorder(pipe, monkeypatch)
    assert_same_image(pixels(pipe(**GEN)), expected_images("bfloat16"))
    onloaded = recorder.calls[2][2]["dit"]
    assert all(dtype == torch.bfloat16 for _, _, dtype, _, _ in onloaded.values())


# ============================================================================ LoRA


def test_hot_lora_on_wrapped_layers(tiny_repo, tokenizer, unmanaged, reference, oracle, tmp_path):
    shapes = {k: tuple(v.shape) for k, v in unmanaged.dit.state_dict().items()}
    path = save_lora(tmp_path / "lora.safetensors", random_lora(shapes, rank=4, seed=7), "kohya", 2.0)
    expected = {}
    for storage in ("float32", "float8"):  # the same hot LoRA on the oracles: exact references
        pipe = oracle(storage)
        pipe.load_lora(pipe.dit, str(path), hotload=True)
        try:
            expected[storage] = pixels(pipe(**GEN))
        finally:
            pipe.clear_lora()
    assert np.abs(expected["float32"] - reference).mean() > 3  # the LoRA shows

    disk = build(tiny_repo, tokenizer, dict(offload_device="disk", onload_device="disk"))
    handle = disk.load_lora(disk.dit, str(path))
    assert handle.hot  # the default for a VRAM-managed model
    assert_same_image(pixels(disk(**GEN)), expected["float32"])
    with pytest.raises(VramConfigError, match="cold LoRA"):
        disk.load_lora(disk.dit, str(path), hotload=False)
    disk.clear_lora()
    assert_same_image(pixels(disk(**GEN)), reference)

    fp8 = build(tiny_repo, tokenizer, PRESETS["fp8"][0])
    fp8.load_lora(fp8.dit, str(path), alpha=1.0)
    entry = next(iter(lora_apply._STATE[fp8.dit].hot.values()))[0]
    assert entry.A.dtype == torch.float32 and entry.A.device.type == "cpu"  # computation, not float8 storage
    assert_same_image(pixels(fp8(**GEN)), expected["float8"])


def test_cold_lora_fuses_into_the_offload_storage(tiny_repo, tokenizer, tmp_path):
    # the oracle: fused in float32 into the float32 weights, then every weight rounded through
    # bfloat16, as the onload storage below holds them
    fused = build(tiny_repo, tokenizer)
    shapes = {k: tuple(v.shape) for k, v in fused.dit.state_dict().items()}
    path = save_lora(tmp_path / "lora.safetensors", random_lora(shapes, rank=4, seed=8), "kohya", 2.0)
    fused.load_lora(fused.dit, str(path))
    for name in FOLDERS:
        round_parameters_(getattr(fused, name), "bfloat16")
    expected = pixels(fused(**GEN))

    keys = dict(offload_device="cpu", offload_dtype="float32", onload_dtype="bfloat16", preparing_dtype="float32")
    pipe = build(tiny_repo, tokenizer, keys)
    base = pixels(pipe(**GEN))
    pipe.vram["dit"].onload()  # a cold LoRA goes into the offload storage, whatever the state
    handle = pipe.load_lora(pipe.dit, str(path), hotload=False)
    assert not handle.hot and pipe.vram["dit"].state == vram.OFFLOAD
    image = pixels(pipe(**GEN))
    assert_same_image(image, expected)
    assert np.abs(image - base).mean() > 3
    pipe.clear_lora()
    assert np.array_equal(pixels(pipe(**GEN)), base)


# ============================================================================ errors


@pytest.mark.parametrize("keys,match", [
    (dict(offload_device="gpu"), "offload_device='gpu' is not a device"),
    (dict(offload_device="cpu", offload_dtype="bf17"), "offload_dtype='bf17' is not a dtype"),
    (dict(offload_device="cuda"), "CUDA is not available"),
    (dict(offload_device="meta"), "meta device holds no data"),
    (dict(offload_device="cpu", computation_dtype=FP8), "float8 is a storage dtype"),
    (dict(offload_device="cpu", preparing_device="disk"), "preparing_\\* cannot be 'disk'"),
    (dict(offload_device="cpu", onload_device="disk"), "onload 'disk' needs offload 'disk'"),
    (dict(offload_device="disk", offload_dtype="bfloat16"), "set both offload_dtype and offload_device to 'disk'"),
    (dict(onload_device="cpu"), "neither offload_dtype nor offload_device"),
])
def test_bad_keys_are_clear_errors(keys, match, tiny_repo, tokenizer):
    with pytest.raises(VramConfigError, match=match) as info:
        build(tiny_repo, tokenizer, per_model={"dit": keys})
    assert "ModelConfig(path=" in str(info.value)  # says which model


def test_more_errors(tiny_repo, tokenizer, tmp_path, monkeypatch):
    with pytest.raises(VramConfigError, match="vram_limit=-1"):
        build(tiny_repo, tokenizer, dict(offload_device="cpu"), vram_limit=-1)
    with pytest.raises(VramConfigError, match="vram_limit='lots'"):
        build(tiny_repo, tokenizer, dict(offload_device="cpu"), vram_limit="lots")
    assert vram.resolve_vram_limit("auto", "cpu") is None
    # float8 where the device cannot store it (as on MPS): the probe fails
    def refuse(dtype, device):
        raise TypeError(f"{device} does not support {dtype}")
    monkeypatch.setattr(vram_settings, "_probe_float8", refuse)
    with pytest.raises(VramConfigError, match="cannot store float8"):
        build(tiny_repo, tokenizer, per_model={"vae": dict(offload_device="cpu", offload_dtype=FP8)})
    monkeypatch.undo()
    # disk offload of a file that is not safetensors: refused before anything is loaded
    from safetensors.torch import load_file
    folder = tmp_path / "vae_bin"
    folder.mkdir()
    torch.save(load_file(str(tiny_repo / "vae" / "diffusion_pytorch_model.safetensors")), folder / "vae.bin")
    with pytest.raises(VramConfigError, match="disk offload needs .safetensors files.*vae.bin"):
        QwenImagePipeline.from_pretrained(torch_dtype=torch.float32, device="cpu", model_configs=[
            ModelConfig(path=folder / "vae.bin", offload_device="disk")])
    pipe = QwenImagePipeline.from_pretrained(torch_dtype=torch.float32, device="cpu", model_configs=[
        ModelConfig(path=folder / "vae.bin", offload_device="cpu", offload_dtype="bfloat16")])  # cpu offload is fine
    assert pipe.vae.decoder.conv_in.weight.dtype == torch.bfloat16
    with pytest.raises(VramConfigError, match="computation_dtype/device cannot be 'disk'"):
        VramSettings.from_keys(dict(computation_device="disk"), torch.float32, "cpu")


# ============================================================================ host memory with disk offload


def _rss(collect: bool = False) -> int:
    import psutil

    if collect:
        gc.collect()
    return psutil.Process().memory_info().rss


@pytest.fixture(scope="module")
def mid_dit_file(tmp_path_factory) -> tuple[Path, int]:
    """A mid-size DiT (57 M parameters, 228 MB in float32) as one safetensors file."""
    params = QwenImageDiTParams(num_layers=6, attention_head_dim=64, num_attention_heads=8, joint_attention_dim=64,
                                axes_dims_rope=(8, 28, 28))
    from pipelines.core.loader import parameters_on_meta
    with parameters_on_meta():
        shapes = {k: tuple(v.shape) for k, v in QwenImageDiT(params).state_dict().items()}
    folder = tmp_path_factory.mktemp("mid_dit")
    state = random_state_dict(shapes, seed=0)
    save_sharded(state, folder, "diffusion_pytorch_model", 1)
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    del state
    return folder, nbytes


@pytest.mark.parametrize("onload", ["disk", "cpu"])
def test_disk_offload_keeps_host_memory_bounded(onload, mid_dit_file):
    folder, nbytes = mid_dit_file
    from pipelines.core.loader import load_model

    # vram_limit 0: no layer stays resident (preparing falls back to the computation place, the cpu)
    dit = vram.load_managed([folder], [QwenImageDiT], VramSettings.from_keys(
        dict(offload_device="disk", onload_device=onload), torch.float32, "cpu", vram_limit=0))
    manager = vram.manager_of(dit)
    g = torch.Generator().manual_seed(0)
    latents, text = torch.randn(1, 16, 64, generator=g), torch.randn(1, 4, 64, generator=g)
    rss = [_rss(collect=True)]
    manager.onload()
    with torch.inference_mode():
        outputs = []
        for step in range(12):
            outputs.append(dit(latents, torch.tensor([1.0 - step / 12]), text, None, 4, 4))
            rss.append(_rss())
    manager.offload()
    rss.append(_rss(collect=True))
    # Growth of the resident memory in units of the weights' bytes. Measured (this machine, glibc):
    # onload "disk": 0.15 at most (one layer's copies and the allocator's cache), where keeping the
    # pages read from the file (no release) gives 1.18; onload "cpu": 1.07 after the onload, +0.00
    # over the steps, 0.07 after the offload, where an onload buffer kept after the offload gives
    # 1.07 at the end and pages of the file kept after the copy 2.07 after the onload. The bounds
    # sit between, with room for another allocator's caching.
    growth = [(r - rss[0]) / nbytes for r in rss]
    if onload == "disk":  # read per layer, every step: the whole file went through 12 times
        assert max(growth) < 0.25, f"host memory grew by {max(growth):.0%} of the weights: {growth}"
    else:  # one copy at onload, none over the steps, none after the offload
        assert growth[1] < 1.5 and max(growth[2:-1]) - growth[1] < 0.05 and growth[-1] < 0.25, growth
    # exact: float32 storage, the same kernels on the same (aligned) values as the plain load
    reference = load_model([folder], [QwenImageDiT], torch.float32, "cpu")
    with torch.inference_mode():
        assert torch.equal(outputs[3], reference(latents, torch.tensor([1.0 - 3 / 12]), text, None, 4, 4))


# ============================================================================ failures midway (regressions)


def managed_mlp(keys: dict, seed: int = 0, options: vram.VramOptions | None = None
                ) -> tuple[torch.nn.Module, vram.VramManager]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8), torch.nn.Linear(8, 4))
    return model, vram.enable_vram_management(model, VramSettings.from_keys(keys, torch.float32, "cpu"),
                                              options=options)


BF16_ONLOAD = dict(offload_dtype="float32", offload_device="cpu", onload_dtype="bfloat16", preparing_dtype="bfloat16")


def test_a_failed_onload_offloads_every_layer(monkeypatch):
    model, manager = managed_mlp(BF16_ONLOAD)
    offloaded = dict(model.named_parameters())
    arenas = len(manager._arenas)
    original = vram_layer.Layer.onload

    def failing(layer, arena):
        if layer.name == "2":
            raise RuntimeError("simulated out of memory")
        original(layer, arena)

    monkeypatch.setattr(vram_layer.Layer, "onload", failing)
    with pytest.raises(RuntimeError, match="simulated"):
        manager.onload()
    assert manager.state == vram.OFFLOAD and all(layer.state == vram.OFFLOAD for layer in manager.layers)
    assert all(p is offloaded[n] for n, p in model.named_parameters())
    assert manager._onload_arena is None and len(manager._arenas) == arenas  # the onload buffer was let go
    monkeypatch.setattr(vram_layer.Layer, "onload", original)
    manager.onload()
    assert model[0].weight.dtype == torch.bfloat16
    manager.offload()
    assert all(p is offloaded[n] for n, p in model.named_parameters())


def test_a_failed_swap_in_the_forward_restores_the_stored_parameters(monkeypatch):
    model, manager = managed_mlp(BF16_ONLOAD)
    manager.onload()
    stored = {n: p for n, p in model[0]._parameters.items()}
    original, calls = vram_layer.convert, []

    def failing(t, dtype, device):
        calls.append(t)
        if len(calls) == 2:  # the bias, after the weight was swapped
            raise RuntimeError("simulated out of memory")
        return original(t, dtype, device)

    monkeypatch.setattr(vram_layer, "convert", failing)
    with pytest.raises(RuntimeError, match="simulated"):
        model(torch.zeros(1, 8))
    assert all(model[0]._parameters[n] is p for n, p in stored.items())
    monkeypatch.setattr(vram_layer, "convert", original)
    assert model(torch.zeros(1, 8)).dtype == torch.float32
    manager.offload()


def test_a_failed_init_closes_the_host_buffer(monkeypatch):
    closed = []
    monkeypatch.setattr(vram_host.HostArena, "close", lambda arena: closed.append(arena))

    def failing(layer, arena):
        raise RuntimeError("simulated")

    monkeypatch.setattr(vram_layer.Layer, "init_offload", failing)
    with pytest.raises(RuntimeError, match="simulated"):
        managed_mlp(BF16_ONLOAD, options=vram.VramOptions(host_arenas=True))
    assert len(closed) == 1


def mlp_lora(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"{name}.lora_{ab}.weight": torch.randn(shape, generator=g)
            for name in ("0", "2") for ab, shape in (("A", (2, 8)), ("B", (8, 2)))}


def test_core_lora_api_on_a_managed_model():
    fp8, _ = managed_mlp(dict(offload_dtype=FP8, offload_device="cpu", onload_dtype=FP8, preparing_dtype=FP8))
    core_load_lora(fp8, mlp_lora(), hot=True)
    entry = lora_apply._STATE[fp8].hot["0"][0]
    assert entry.A.dtype == torch.float32 and entry.A.device.type == "cpu"  # computation, not float8 storage

    meta = torch.nn.Sequential(torch.nn.Linear(8, 8, device="meta"))  # weights left on disk show as meta tensors
    core_load_lora(meta, {"0.lora_A.weight": torch.ones(2, 8), "0.lora_B.weight": torch.ones(8, 2)}, hot=True)
    assert lora_apply._STATE[meta].hot["0"][0].A.device.type == "cpu"

    model, manager = managed_mlp(BF16_ONLOAD)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    fresh, _ = managed_mlp(BF16_ONLOAD)
    core_load_lora(fresh, mlp_lora(), alpha=0.5)
    handle = core_load_lora(model, mlp_lora(), alpha=1.0)
    manager.onload()
    handle.set_alpha(0.5)  # into the offload storage, not the temporary onload copy
    manager.offload()
    assert all(torch.equal(p, dict(fresh.named_parameters())[n]) for n, p in model.named_parameters())
    manager.onload()
    core_clear_lora(model)
    manager.offload()
    assert all(torch.equal(p, base[n]) for n, p in model.named_parameters())
