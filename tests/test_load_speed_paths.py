"""The loader's reading path: positional reads into preallocated tensors (pieces, threads,
casts, short reads), zero-copy views where a tensor is aligned in its file, views over the file
for VRAM management, and the invariants: keys and shapes checked before any byte is read,
aligned host tensors, one resident copy, clear errors for files that go bad while loading."""
from __future__ import annotations

import errno
import json
import os
import shutil
import struct
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from pipelines.core import loader, reads, shards
from pipelines.core.loader import load_model
from pipelines.core.reads import HOST_ALIGNMENT
from pipelines.core.shards import CheckpointError
from pipelines.qwen_image import QwenImagePipeline

CANDIDATES = tuple(QwenImagePipeline.components.values())
REPO = Path(__file__).resolve().parents[1]
INTEGER_PREFIX = "i_"  # toy keys holding integer or boolean tensors (buffers)


class Toy(nn.Module):
    """A model whose checkpoint is any `toy.*` keys: one parameter (or integer buffer) per key."""

    CHECKPOINT_REQUIRED_KEYS = ("a",)

    def __init__(self, shapes):
        super().__init__()
        for name, shape in shapes.items():
            if name.startswith(INTEGER_PREFIX):
                self.register_buffer(name, torch.zeros(shape, dtype=torch.int64))
            else:
                setattr(self, name, nn.Parameter(torch.empty(shape)))

    @staticmethod
    def owns_checkpoint_key(key):
        return key.startswith("toy.")

    @staticmethod
    def convert_checkpoint_key(key):
        return None if key == "toy.skipped" else key.removeprefix("toy.")

    @classmethod
    def from_checkpoint(cls, shapes, config):
        return cls(shapes)


def toy_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """Every dtype, odd sizes (so most tensors start off HOST_ALIGNMENT in the file), one large
    tensor, a scalar, an empty tensor and a key that is not loaded."""
    g = torch.Generator().manual_seed(seed)
    return {
        "toy.a": torch.randn(300, 37, generator=g),
        "toy.b": torch.randn(333, generator=g).to(torch.bfloat16),
        "toy.c": torch.randn(5, 7, generator=g).to(torch.float16),
        "toy.d": torch.randn(17, generator=g).to(torch.float8_e4m3fn),
        "toy.e": torch.randn(3, generator=g).double(),
        "toy.s": torch.tensor(2.5),
        "toy.z": torch.empty(0, 4),
        "toy.i_n": torch.arange(11),
        "toy.i_m": torch.arange(5) % 2 == 0,
        "toy.skipped": torch.ones(9),
    }


def expected(state, dtype):
    return {k.removeprefix("toy."): (v.to(dtype) if v.is_floating_point() and dtype is not None else v)
            for k, v in state.items() if k != "toy.skipped"}


def check_loaded(model, reference):
    loaded = model.state_dict()
    assert set(loaded) == set(reference)
    for key, value in reference.items():
        assert loaded[key].dtype == value.dtype, key
        assert torch.equal(loaded[key], value), key
        if loaded[key].numel():
            assert loaded[key].data_ptr() % HOST_ALIGNMENT == 0, key


@pytest.fixture
def toy_files(tmp_path):
    """The toy checkpoint in two shards (read in parallel), and its tensors."""
    state = toy_state()
    keys = list(state)
    paths = []
    for i, part in enumerate((keys[:4], keys[4:])):
        path = tmp_path / f"toy-{i}.safetensors"
        save_file({k: state[k] for k in part}, str(path))
        paths.append(path)
    return paths, state


@pytest.fixture
def small_pieces(monkeypatch):
    """Pieces of 256 bytes, 3 buffers per read call, 4 threads: every split and join happens."""
    monkeypatch.setattr(reads, "READ_CHUNK", 256)
    monkeypatch.setattr(reads, "IOV_MAX", 3)
    monkeypatch.setattr(reads, "MAX_READ_THREADS", 4)
    monkeypatch.setattr(reads.os, "cpu_count", lambda: 4)


class ReadLog:
    """Records os.preadv calls; optionally returns fewer bytes than asked, or fails."""

    def __init__(self, monkeypatch, at_most: int | None = None, fail_at: int | None = None):
        self.calls = 0
        self.at_most, self.fail_at = at_most, fail_at
        self._preadv = os.preadv
        monkeypatch.setattr(reads.os, "preadv", self)

    def __call__(self, fd, buffers, offset):
        self.calls += 1
        if self.fail_at is not None and self.calls >= self.fail_at:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        if self.at_most is not None:
            buffers = [memoryview(buffers[0])[:self.at_most]]
        return self._preadv(fd, buffers, offset)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("pieces", ["default", "small"])
def test_every_dtype_is_read_and_cast_exactly(toy_files, dtype, pieces, request):
    if pieces == "small":
        request.getfixturevalue("small_pieces")
    paths, state = toy_files
    model = load_model(paths, [Toy], dtype, "cpu")
    check_loaded(model, expected(state, dtype))


def test_short_reads_are_completed(toy_files, small_pieces, monkeypatch):
    paths, state = toy_files
    log = ReadLog(monkeypatch, at_most=100)
    check_loaded(load_model(paths, [Toy], torch.float32, "cpu"), expected(state, torch.float32))
    assert log.calls > 20


def test_loading_inside_inference_mode(toy_files, small_pieces):
    """The reading threads make the same kind of tensors as the caller (a cast into an
    inference tensor outside inference mode would be refused)."""
    paths, state = toy_files
    with torch.inference_mode():
        model = load_model(paths, [Toy], torch.float32, "cpu")
    check_loaded(model, expected(state, torch.float32))


def test_a_failing_read_stops_the_load_with_the_file_named(toy_files, small_pieces, monkeypatch):
    paths, _ = toy_files
    ReadLog(monkeypatch, fail_at=3)
    with pytest.raises(CheckpointError, match=r"toy-\d\.safetensors: reading tensor data failed \(OSError: .*"
                                              r"truncated or corrupt"):
        load_model(paths, [Toy], torch.float32, "cpu")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_file_truncated_after_its_header_was_checked(tiny_repo, tmp_path, monkeypatch, dtype):
    """bfloat16: every tensor is cast (read); float32: tensors are read or mapped in place."""
    target = tmp_path / "diffusion_pytorch_model.safetensors"
    shutil.copy(tiny_repo / "vae" / "diffusion_pytorch_model.safetensors", target)
    read_header = loader.read_header

    def read_then_truncate(path):
        header = read_header(path)
        os.truncate(path, path.stat().st_size // 2)
        return header

    monkeypatch.setattr(loader, "read_header", read_then_truncate)
    with pytest.raises(CheckpointError, match=r"diffusion_pytorch_model\.safetensors: reading tensor.*failed.*"
                                              r"truncated or corrupt"):
        load_model([target], CANDIDATES, dtype, "cpu")


def test_every_key_and_shape_is_checked_before_any_byte_is_read(tiny_repo, tmp_path, monkeypatch):
    log = ReadLog(monkeypatch)
    mapped = []
    monkeypatch.setattr(shards.MappedFile, "view", lambda self, *a: mapped.append(a))
    folder = tmp_path / "vae"
    shutil.copytree(tiny_repo / "vae", folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "base_dim": 8}))
    with pytest.raises(CheckpointError, match="has shape"):
        load_model([folder], CANDIDATES, torch.float32, "cpu")
    state = load_file(tiny_repo / "vae" / "diffusion_pytorch_model.safetensors")
    del state["decoder.conv_out.bias"]
    save_file(state, str(tmp_path / "vae.safetensors"))
    with pytest.raises(CheckpointError, match="lacks 1 key"):
        load_model([tmp_path / "vae.safetensors"], CANDIDATES, torch.float32, "cpu")
    assert log.calls == 0 and not mapped


def test_views_for_vram_management_read_nothing(toy_files, monkeypatch):
    """torch_dtype=None on the CPU: views over the file, nothing read into memory."""
    paths, state = toy_files
    log = ReadLog(monkeypatch)
    model = load_model(paths, [Toy], None, "cpu")
    assert log.calls == 0
    loaded = model.state_dict()
    for key, value in expected(state, None).items():
        assert loaded[key].dtype == value.dtype and torch.equal(loaded[key], value), key


def aligned_file(path, state):
    """`state` saved so that every tensor starts on HOST_ALIGNMENT in the file (metadata pads
    the header), as some writers lay files out."""
    for pad in range(HOST_ALIGNMENT):
        save_file(state, str(path), metadata={"pad": "x" * pad})
        header_len = struct.unpack("<Q", path.read_bytes()[:8])[0]
        if (8 + header_len) % HOST_ALIGNMENT == 0:
            return path
    raise AssertionError("no padding aligns the header")


def test_aligned_tensors_are_mapped_not_copied(tmp_path, monkeypatch):
    g = torch.Generator().manual_seed(1)
    state = {"toy.a": torch.randn(64, 32, generator=g), "toy.b": torch.randn(48, generator=g),
             "toy.c": torch.randn(3, generator=g)}  # 12 bytes: ends off the boundary, so it is last
    path = aligned_file(tmp_path / "aligned.safetensors", state)
    offsets = {k: offset for k, (_, offset, _) in shards.safetensors_layout(path).items()}
    assert offsets["toy.a"] % HOST_ALIGNMENT == 0 and offsets["toy.b"] % HOST_ALIGNMENT == 0
    log = ReadLog(monkeypatch)
    model = load_model([path], [Toy], torch.float32, "cpu")
    check_loaded(model, expected(state, torch.float32))
    assert log.calls == 0  # mapped in place (toy.c too: it starts aligned)
    with torch.no_grad():
        model.a.add_(1.0)  # a private map: the file never changes
    assert torch.equal(load_file(path)["toy.a"], state["toy.a"])
    cast = load_model([path], [Toy], torch.bfloat16, "cpu")
    assert log.calls > 0  # a cast reads
    check_loaded(cast, expected(state, torch.bfloat16))


def peak_rss_since_reset() -> int:
    with open("/proc/self/status") as f:
        return int(next(row for row in f if row.startswith("VmHWM:")).split()[1]) * 1024


def test_resident_memory_holds_one_copy(tmp_path, monkeypatch):
    """Read into the model's own memory: the file's pages stay in the page cache, not in this
    process, also while it loads (pages of the file kept mapped until the end, or a second copy,
    would show as up to 1.75x here)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets the peak (VmHWM) to the current resident size
    except OSError:
        pytest.skip("needs Linux's /proc/self/clear_refs")
    n = 16 * 2**20 + 5  # 64 MiB of float32, off the boundary
    path = tmp_path / "big.safetensors"
    save_file({"toy.a": torch.randn(n).to(torch.bfloat16), "toy.b": torch.randn(n)}, str(path))
    path.read_bytes()  # in the page cache
    monkeypatch.setattr(reads, "MAX_READ_THREADS", 2)  # each thread has a staging buffer for its casts
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = peak_rss_since_reset()
    model = load_model([path], [Toy], torch.float32, "cpu")
    growth = peak_rss_since_reset() - before
    result = sum(t.nbytes for t in model.state_dict().values())
    staging = 2 * (reads.READ_CHUNK + reads.IOV_MAX * HOST_ALIGNMENT)
    assert growth < 1.05 * result + staging + (16 << 20), (growth, result)  # + the allocator's own


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_destination_matches_the_cpu_load(tiny_repo, toy_files, small_pieces, dtype):
    paths, state = toy_files
    model = load_model(paths, [Toy], dtype, "cuda")
    loaded = model.state_dict()
    for key, value in expected(state, dtype).items():
        assert loaded[key].device.type == "cuda" and torch.equal(loaded[key].cpu(), value), key
    dit_cpu = load_model([tiny_repo / "transformer"], CANDIDATES, dtype, "cpu").state_dict()
    dit_gpu = load_model([tiny_repo / "transformer"], CANDIDATES, dtype, "cuda").state_dict()
    assert all(torch.equal(dit_gpu[k].cpu(), v) for k, v in dit_cpu.items())
