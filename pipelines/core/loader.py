"""Checkpoint files -> nn.Module.

Recognise which model a checkpoint holds from its key names and shapes, build the module
with its parameters on the meta device, check every key and shape, then fill them: no random
initialisation, no second full copy. Everything model-specific comes from the model classes
(`checkpoint.CheckpointModel`).

Reading safetensors (`read_tensors`): every destination tensor is allocated first, then the
files are read with large positional reads (`os.preadv`, up to READ_CHUNK bytes each, several
threads, files and pieces of one file in parallel) straight into them, so nothing is left to
page faults in the first forward. Host destinations come from PyTorch's allocator (aligned on
HOST_ALIGNMENT, each freed on its own); a cast goes through a small per-thread staging buffer
and overlaps the other threads' reads. GPU destinations are filled from pinned
staging buffers, the host-to-device copies (and casts, done on the device) queued on side
streams while the next pieces are read. The page cache keeps the file; the process holds one
copy. `torch_dtype=None` on the CPU (VRAM management) instead gives views over a memory map of
the files: nothing is read until used.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import mmap
import os
import queue
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import safe_open
from tqdm import tqdm

from .checkpoint import CheckpointModel
from .files import is_regular_file, regular_file

logger = logging.getLogger(__name__)

SAFETENSORS_SUFFIXES = (".safetensors",)
# CPU kernels (MKL/oneDNN GEMMs) choose their code path, and so their rounding order, by the
# address alignment of the operands: weights read in place from a file sit wherever the file
# put them, so the same weights would give other last bits than in ordinary memory. Every host
# tensor a model stores or computes with starts on this boundary (PyTorch's allocator's own).
HOST_ALIGNMENT = 64
TORCH_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file and the fix."""


SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64,
    "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}


@dataclass
class CheckpointFile:
    path: Path
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # on-disk key -> shape
    # safetensors only: key -> (dtype, absolute byte offset, byte length)
    layout: dict[str, tuple[torch.dtype, int, int]] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)  # safetensors' __metadata__ (format, ...)


# ---------------------------------------------------------------- files and headers


def expand_checkpoint_paths(paths: Sequence[Path]) -> list[Path]:
    """Files, shard lists and folders -> the list of weight files, checking indexes."""
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files.extend(_files_in_folder(path))
        elif path.name.endswith(".index.json"):
            files.extend(_files_of_index(path))
        elif path.suffix in SAFETENSORS_SUFFIXES + TORCH_SUFFIXES:
            files.append(path)
        elif path.name == "config.json":
            continue  # read from beside the weights by read_config
        else:
            raise CheckpointError(
                f"{path}: not a checkpoint file (expected .safetensors, .bin, .pt, .pth, .ckpt, "
                "a *.index.json or a folder of them)."
            )
    for index in {p.parent / name for p in files for name in _index_names(p)}:
        if is_regular_file(index, "shard index", CheckpointError):
            _check_index_shards_present(index)
    unique = list(dict.fromkeys(files))
    if not unique:
        raise CheckpointError(f"No weight files found in {', '.join(str(p) for p in paths)}.")
    return unique


def _index_names(path: Path) -> list[str]:
    # shards `model-00001-of-00004.safetensors` sit beside `model.safetensors.index.json`
    stem = path.name.split("-0")[0] if "-of-" in path.name else None
    return [f"{stem}{path.suffix}.index.json"] if stem else []


def _files_in_folder(folder: Path) -> list[Path]:
    indexes = sorted(folder.glob("*.safetensors.index.json")) or sorted(folder.glob("*.bin.index.json"))
    if indexes:
        return [f for index in indexes for f in _files_of_index(index)]
    for suffixes in (SAFETENSORS_SUFFIXES, TORCH_SUFFIXES):
        found = sorted(p for p in folder.iterdir() if p.suffix in suffixes)
        if found:
            return found
    raise CheckpointError(f"{folder}: the folder holds no .safetensors/.bin/.pt/.pth weight file.")


def _files_of_index(index: Path) -> list[Path]:
    weight_map = _read_index(index)
    return [index.parent / name for name in dict.fromkeys(weight_map.values())]


def _read_index(index: Path) -> dict[str, str]:
    regular_file(index, "shard index", CheckpointError)
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CheckpointError(
            f"{index}: cannot read the shard index ({error}). Delete it and fetch it again."
        ) from error
    return weight_map


def _check_index_shards_present(index: Path) -> None:
    missing = sorted({name for name in _read_index(index).values()
                      if not is_regular_file(index.parent / name, "checkpoint shard", CheckpointError)})
    if missing:
        raise CheckpointError(
            f"{index} lists shard(s) that are not on disk: {', '.join(missing)}. "
            "The download is incomplete: fetch the missing shard(s) again."
        )


def read_header(path: Path) -> CheckpointFile:
    """Key names and shapes, without reading tensor data (safetensors) or with mmap (torch).
    Only a regular file is opened (a FIFO would block the read forever)."""
    regular_file(path, "checkpoint file", CheckpointError)
    layout, metadata = {}, {}
    try:
        if path.suffix in SAFETENSORS_SUFFIXES:
            with safe_open(str(path), framework="pt") as f:  # validates header and file size
                shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
                metadata = dict(f.metadata() or {})
            layout = _safetensors_layout(path)
        else:
            shapes = {k: tuple(t.shape) for k, t in _torch_state_dict(path).items()}
    except CheckpointError:
        raise
    except Exception as error:  # safetensors and torch raise many types for bad files
        raise CheckpointError(
            f"{path}: cannot read this checkpoint ({type(error).__name__}: {error}). The file is "
            "truncated or corrupt: delete it and fetch it again."
        ) from error
    if not shapes:
        raise CheckpointError(f"{path}: the checkpoint holds no tensor.")
    return CheckpointFile(path, shapes, layout, metadata)


def read_checkpoint(paths: Sequence[Path]) -> list[CheckpointFile]:
    """The headers of every weight file of `paths` (files, folders, indexes), checked to be the
    shards of one checkpoint (`check_one_checkpoint`)."""
    files = [read_header(p) for p in expand_checkpoint_paths(paths)]
    check_one_checkpoint(files)
    return files


def check_one_checkpoint(files: Sequence[CheckpointFile]) -> None:
    """Shards given together are one checkpoint, as far as the files can tell:
    - a shard with an index beside it (`model-00001-of-00002.safetensors` and
      `model.safetensors.index.json`) is listed there and holds exactly the keys the index puts
      in it; every file given with it belongs to the same index (same folder);
    - safetensors metadata the shards share (`format`, a training tool's fields) is equal.
    Shards of two checkpoints of one architecture written the same way, without an index or
    each copied under the other's name, cannot be told apart: same keys, same shapes."""
    indexes: dict[Path, list[CheckpointFile]] = {}
    for file in files:
        index = _index_beside(file.path)
        if index is not None:
            indexes.setdefault(index, []).append(file)
    if indexes:
        _check_against_index(files, indexes)
    for file in files[1:]:
        for key in sorted(set(file.metadata) & set(files[0].metadata)):
            if file.metadata[key] != files[0].metadata[key]:
                raise CheckpointError(
                    f"{files[0].path} and {file.path} disagree on their metadata {key!r} "
                    f"({files[0].metadata[key]!r} vs {file.metadata[key]!r}): shards of one checkpoint carry the "
                    "same, so these come from two checkpoints. Give the shards of one of them.")


def _index_beside(path: Path) -> Path | None:
    for name in _index_names(path):
        if is_regular_file(path.parent / name, "shard index", CheckpointError):
            return path.parent / name
    return None


def _check_against_index(files: Sequence[CheckpointFile], indexes: dict[Path, list[CheckpointFile]]) -> None:
    if len(indexes) > 1:
        (first, a), (second, b) = list(indexes.items())[:2]
        raise CheckpointError(
            f"{a[0].path} and {b[0].path} are shards of two checkpoints (indexed by {first} and {second}). Give the "
            "shards of one checkpoint: its folder, or its index.")
    [(index, indexed)] = indexes.items()
    weight_map = _read_index(index)
    outside = [file for file in files if not any(file is f for f in indexed)]
    if outside:
        raise CheckpointError(
            f"{outside[0].path} is given with the shards of {index}, which does not list it: it belongs to another "
            "checkpoint. Give the shards of one checkpoint: its folder, or its index.")
    for file in indexed:
        listed = {key for key, name in weight_map.items() if name == file.path.name}
        if not listed:
            raise CheckpointError(
                f"{file.path} is not listed in the shard index {index} (it lists "
                f"{', '.join(sorted(set(weight_map.values())))}): a shard of another checkpoint or of an older "
                "download. Remove it, or fetch the model again.")
        extra, lacking = sorted(set(file.shapes) - listed), sorted(listed - set(file.shapes))
        if extra or lacking:
            said = (f"holds {extra[0]!r}, which the index puts in {weight_map.get(extra[0], 'no shard')}" if extra
                    else f"lacks {lacking[0]!r}, which the index puts in it")
            raise CheckpointError(
                f"{file.path} {said} ({len(extra)} key(s) the index does not put there, {len(lacking)} it lacks): "
                f"the shard and {index} belong to different checkpoints. Fetch the model again (or remove the "
                "stray shard).")


def _safetensors_layout(path: Path) -> dict[str, tuple[torch.dtype, int, int]]:
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(header_len))
    start = 8 + header_len
    layout = {}
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        if entry["dtype"] not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"{path}: tensor {key!r} has dtype {entry['dtype']}, which this loader cannot read.")
        begin, end = entry["data_offsets"]
        layout[key] = (SAFETENSORS_DTYPES[entry["dtype"]], start + begin, end - begin)
    return layout


def _torch_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # files from before torch's zip format cannot be memory-mapped
        state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: expected a dict of tensors (a state dict).")
    return state


def host_aligned(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` itself when its data starts on HOST_ALIGNMENT (or it is not in host memory),
    else a copy in freshly allocated, aligned memory."""
    if tensor.device.type != "cpu" or tensor.data_ptr() % HOST_ALIGNMENT == 0:
        return tensor
    return tensor.clone(memory_format=torch.contiguous_format)


MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)  # Linux >= 5.14


def _align(n: int, to: int) -> int:
    return -(-n // to) * to


class MappedFile:
    """A private (copy-on-write) memory map of one file, opened on first use: tensors over it
    copy nothing until cast or moved, and writes never reach the file."""

    def __init__(self, path: Path):
        self.path = path
        self._map: mmap.mmap | None = None

    def view(self, dtype: torch.dtype, offset: int, length: int, shape: Sequence[int]) -> torch.Tensor:
        """A CPU tensor over bytes [offset, offset + length) (pages are read as they are touched)."""
        if length == 0:
            return torch.empty(tuple(shape), dtype=dtype)
        if self._map is None:
            with open(self.path, "rb") as f:
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        count = length // dtype.itemsize
        return torch.frombuffer(self._map, dtype=dtype, count=count, offset=offset).view(tuple(shape))

    def populate(self, offset: int, length: int) -> None:
        """Map the pages of [offset, offset + length) now, with one call, instead of page fault by
        page fault when they are first read (no copy: a private map shares the page cache's pages
        until written); only readahead on kernels before 5.14."""
        if self._map is None or length == 0:
            return
        start = offset // mmap.PAGESIZE * mmap.PAGESIZE
        length = min(_align(offset + length, mmap.PAGESIZE), len(self._map)) - start
        try:
            self._map.madvise(MADV_POPULATE_READ, start, length)
        except OSError:
            with contextlib.suppress(OSError):
                self._map.madvise(mmap.MADV_WILLNEED, start, length)

    def release(self, offset: int, length: int) -> None:
        """Hand the pages of [offset, offset + length) back (they stay in the page cache; a
        later read faults them in again). Only whole pages; neighbours may share the edges."""
        if self._map is None:
            return
        start = -(-offset // mmap.PAGESIZE) * mmap.PAGESIZE
        end = (offset + length) // mmap.PAGESIZE * mmap.PAGESIZE
        if end > start:
            self._map.madvise(mmap.MADV_DONTNEED, start, end - start)


def _iter_tensors(file: CheckpointFile, keys: Sequence[str]) -> Iterator[tuple[str, torch.Tensor, Callable[[], None]]]:
    """(key, tensor, release): tensors backed by a private (copy-on-write) memory map of the
    file, so nothing is copied until the caller casts or moves them, and writes never reach
    the file. `release()` drops the tensor's pages from this process once it has been copied
    elsewhere (they stay in the page cache), keeping resident memory to one copy."""
    path = file.path
    try:
        if file.layout:
            mapped = MappedFile(path)
            for key in keys:
                dtype, offset, length = file.layout[key]
                yield key, mapped.view(dtype, offset, length, file.shapes[key]), partial(mapped.release, offset, length)
        else:
            state = _torch_state_dict(path)
            for key in keys:
                yield key, state[key], lambda: None
    except Exception as error:
        raise CheckpointError(
            f"{path}: reading tensor data failed ({type(error).__name__}: {error}). The file is "
            "truncated or corrupt: delete it and fetch it again."
        ) from error


# ---------------------------------------------------------------- reading safetensors into tensors

READ_CHUNK = 16 << 20  # bytes per read call (and per staging buffer)
MAX_READ_THREADS = 8
IOV_MAX = 512  # buffers per os.preadv call (Linux takes 1024)


def _bytes_of(tensor: torch.Tensor) -> memoryview:
    """The bytes of a contiguous host tensor, writable (for os.preadv)."""
    return memoryview(tensor.reshape(-1).view(torch.uint8).numpy())


@dataclass
class _Piece:
    """Bytes [offset, offset + nbytes) of a file, stored as `stored`, going to elements
    [first, first + nbytes / itemsize) of `target` (a flat destination; a cast when its
    dtype differs)."""

    fd: int
    path: Path
    offset: int
    nbytes: int
    stored: torch.dtype
    target: torch.Tensor
    first: int

    @property
    def cast(self) -> bool:
        return self.target.dtype != self.stored

    def destination(self) -> torch.Tensor:
        return self.target[self.first:self.first + self.nbytes // self.stored.itemsize]


def _pieces(fd: int, path: Path, offset: int, nbytes: int, stored: torch.dtype,
            target: torch.Tensor) -> Iterator[_Piece]:
    """A tensor's bytes in pieces of at most READ_CHUNK, cut between elements."""
    step = max(READ_CHUNK // stored.itemsize, 1) * stored.itemsize
    for start in range(0, nbytes, step):
        yield _Piece(fd, path, offset + start, min(step, nbytes - start), stored, target, start // stored.itemsize)


def _chunks(pieces: Sequence[_Piece]) -> list[list[_Piece]]:
    """Runs of pieces contiguous in one file, up to READ_CHUNK bytes: one os.preadv each."""
    chunks: list[list[_Piece]] = []
    size = 0
    for piece in pieces:
        last = chunks[-1][-1] if chunks else None
        if (last is None or last.fd != piece.fd or last.offset + last.nbytes != piece.offset
                or size + piece.nbytes > READ_CHUNK or len(chunks[-1]) >= IOV_MAX):
            chunks.append([])
            size = 0
        chunks[-1].append(piece)
        size += piece.nbytes
    return chunks


def _read_exactly(chunk: Sequence[_Piece], buffers: list[memoryview]) -> None:
    """Fill `buffers` with the file bytes of `chunk` (contiguous), however the reads split."""
    first = chunk[0]
    offset, index = first.offset, 0
    try:
        while index < len(buffers):
            done = os.preadv(first.fd, buffers[index:index + IOV_MAX], offset)
            if done <= 0:
                raise EOFError(f"the file ends at byte {offset}, inside the tensor data")
            offset += done
            while done:
                size = buffers[index].nbytes
                if done < size:
                    buffers[index] = buffers[index][done:]
                    break
                done -= size
                index += 1
    except (OSError, EOFError) as error:
        raise CheckpointError(
            f"{first.path}: reading tensor data failed ({type(error).__name__}: {error}). The file is truncated "
            "or corrupt: delete it and fetch it again.") from error


class _Staging:
    """One worker's staging: a host buffer (pinned for a GPU) for pieces that are cast or go to
    the GPU, and on a GPU its stream, a device buffer for casts and an event marking when the
    last copies out of the host buffer are done."""

    def __init__(self, device: torch.device):
        self.device = device
        cuda = device.type == "cuda"
        self._host: torch.Tensor | None = None
        self._view: memoryview | None = None
        self.stream = torch.cuda.Stream(device) if cuda else None
        self.event = torch.cuda.Event() if cuda else None
        self.scratch: torch.Tensor | None = None

    def host(self) -> tuple[torch.Tensor, memoryview]:
        """The host buffer (made on first use: a load to the CPU without a cast needs none)."""
        if self._host is None:
            size = READ_CHUNK + IOV_MAX * HOST_ALIGNMENT  # pieces start on HOST_ALIGNMENT in it
            self._host = torch.empty(size, dtype=torch.uint8, pin_memory=self.stream is not None)
            self._view = _bytes_of(self._host)
        return self._host, self._view

    def synchronize(self) -> None:
        if self.stream is not None:
            self.stream.synchronize()

    def read_to_host(self, chunk: Sequence[_Piece]) -> None:
        """Pieces in their host destination: read in place, or staged and cast."""
        buffers, staged, at = [], [], 0
        for piece in chunk:
            if piece.cast:
                buffers.append(self.host()[1][at:at + piece.nbytes])
                staged.append((piece, at))
                at = _align(at + piece.nbytes, HOST_ALIGNMENT)
            else:
                buffers.append(_bytes_of(piece.destination()))
        _read_exactly(chunk, buffers)
        for piece, at in staged:
            piece.destination().copy_(self.host()[0][at:at + piece.nbytes].view(piece.stored))

    def read_to_device(self, chunk: Sequence[_Piece]) -> None:
        """Pieces read into the pinned buffer, copied to the device on this staging's stream
        (cast there), while the worker goes on to read the next ones into another staging."""
        self.event.synchronize()  # the copies out of the buffer queued last time are done
        host, view = self.host()
        buffers, places, at = [], [], 0
        for piece in chunk:
            buffers.append(view[at:at + piece.nbytes])
            places.append(at)
            at = _align(at + piece.nbytes, HOST_ALIGNMENT)
        _read_exactly(chunk, buffers)
        with torch.cuda.device(self.device), torch.cuda.stream(self.stream):
            for piece, at in zip(chunk, places):
                source = host[at:at + piece.nbytes]
                if piece.cast:
                    if self.scratch is None:
                        self.scratch = torch.empty(host.numel(), dtype=torch.uint8, device=self.device)
                    staged = self.scratch[at:at + piece.nbytes]
                    staged.copy_(source, non_blocking=True)
                    piece.destination().copy_(staged.view(piece.stored))
                else:
                    piece.destination().view(torch.uint8).copy_(source, non_blocking=True)
            self.event.record(self.stream)


def read_tensors(pieces: Sequence[_Piece], device: torch.device,
                 progress: Callable[[int], None] = lambda nbytes: None) -> None:
    """Fill every piece's destination from its file: up to MAX_READ_THREADS workers, each
    reading runs of pieces with one os.preadv, files and parts of one file in parallel."""
    chunks = _chunks(pieces)
    if not chunks:
        return
    workers = max(1, min(MAX_READ_THREADS, os.cpu_count() or 1, len(chunks)))
    to_device = device.type == "cuda"
    stagings: queue.SimpleQueue[_Staging] = queue.SimpleQueue()
    created: list[_Staging] = []
    inference = torch.is_inference_mode_enabled()  # the workers make the same kind of tensors

    def work(chunk: list[_Piece]) -> int:
        try:
            staging = stagings.get_nowait()
        except queue.Empty:
            staging = _Staging(device)
            created.append(staging)
        try:
            with torch.inference_mode(inference):
                if to_device:
                    staging.read_to_device(chunk)
                else:
                    staging.read_to_host(chunk)
        finally:
            stagings.put(staging)
        return sum(piece.nbytes for piece in chunk)

    try:
        if to_device:  # two stagings per worker: one is read into while the other's copies run
            current = torch.cuda.current_stream(device)  # where the destinations were allocated
            for _ in range(2 * workers):
                staging = _Staging(device)
                staging.stream.wait_stream(current)
                created.append(staging)
                stagings.put(staging)
        if workers == 1:
            for chunk in chunks:
                progress(work(chunk))
            return
        with ThreadPoolExecutor(workers, thread_name_prefix="read-weights") as pool:
            futures: list[Future] = [pool.submit(work, chunk) for chunk in chunks]
            pending = set(futures)
            while pending:
                done, pending = wait(pending, return_when=FIRST_EXCEPTION)
                for future in done:
                    if future.exception() is not None:
                        for other in pending:
                            other.cancel()
                        raise future.exception()
                    progress(future.result())
    finally:
        for staging in created:
            staging.synchronize()


def _reads_in_place(torch_dtype: torch.dtype | None, device: torch.device) -> bool:
    """Whether load_model reads safetensors with read_tensors (else: views over a memory map,
    cast and moved one by one)."""
    if not hasattr(os, "preadv"):
        return False
    if device.type == "cpu":
        return torch_dtype is not None  # None: views over the file, for VRAM management
    return device.type == "cuda"


# ---------------------------------------------------------------- recognition


def _owner(key: str, candidates: Sequence[type]) -> type | None:
    return next((c for c in candidates if c.owns_checkpoint_key(key)), None)


def recognise(files: Sequence[CheckpointFile], candidates: Sequence[type[CheckpointModel]]) -> type:
    """The one candidate class whose checkpoint these files hold."""
    owners_per_file = []
    for file in files:
        owners = {_owner(k, candidates) for k in file.shapes}
        owners_per_file.append(owners)
    all_owners = set().union(*owners_per_file) - {None}
    if not all_owners:
        sample = ", ".join(list(files[0].shapes)[:6])
        known = ", ".join(c.__name__ for c in candidates)
        raise CheckpointError(
            f"{files[0].path}: unknown checkpoint: its keys ({sample}, ...) belong to none of the "
            f"models this pipeline knows ({known}). Check that the file is the right model."
        )
    if len(all_owners) > 1:
        where = "; ".join(
            f"{file.path.name}: {', '.join(sorted(o.__name__ for o in owners if o))}"
            for file, owners in zip(files, owners_per_file)
        )
        raise CheckpointError(
            f"Files of different models were given as one model ({where}). "
            "Give each model its own ModelConfig."
        )
    model_class = all_owners.pop()
    converted = {model_class.convert_checkpoint_key(k) for f in files for k in f.shapes
                 if model_class.owns_checkpoint_key(k)}
    absent = [k for k in model_class.CHECKPOINT_REQUIRED_KEYS if k not in converted]
    if absent:
        raise CheckpointError(
            f"{files[0].path}: looks like a {model_class.__name__} checkpoint but lacks "
            f"{', '.join(absent)}. The files are incomplete: pass all shards, or fetch them again."
        )
    return model_class


# ---------------------------------------------------------------- building and assigning


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Create parameters on the meta device; buffers (RoPE tables...) stay real and small."""
    original = nn.Module.register_parameter

    def register_parameter(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=False)

    nn.Module.register_parameter = register_parameter
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def read_config(files: Sequence[CheckpointFile]) -> dict | None:
    config_path = files[0].path.parent / "config.json"
    if not is_regular_file(config_path, "config.json beside the weights", CheckpointError):
        return None
    try:
        return json.loads(config_path.read_text())
    except ValueError as error:
        raise CheckpointError(f"{config_path}: invalid JSON ({error}). Fix or delete the file.") from error


def load_model(
    paths: Sequence[Path],
    candidates: Sequence[type[CheckpointModel]],
    torch_dtype: torch.dtype | None,
    device: str | torch.device,
) -> nn.Module:
    """Recognise, build on meta, check every key and shape, then fill the parameters: safetensors
    on the CPU or a CUDA device with `read_tensors` (allocated first, then read in parallel),
    anything else tensor by tensor. `torch_dtype=None` on the CPU keeps each tensor as stored,
    as a view over the file where possible: for VRAM management, which moves every tensor on
    to its storage itself."""
    files = [read_header(p) for p in expand_checkpoint_paths(paths)]
    model_class = recognise(files, candidates)  # files of two different models: named as such first
    check_one_checkpoint(files)

    # on-disk key -> (file, converted key); None converted keys are deliberately not loaded
    plan: dict[str, tuple[CheckpointFile, str]] = {}
    targets: set[str] = set()
    foreign = [(file, key) for file in files for key in file.shapes if not model_class.owns_checkpoint_key(key)]
    if foreign:
        shown = ", ".join(f"{key} ({file.path.name})" for file, key in foreign[:8])
        raise CheckpointError(
            f"{files[0].path.parent}: {len(foreign)} key(s) do not belong to {model_class.__name__}: "
            f"{shown}{' ...' if len(foreign) > 8 else ''}. The file is not a plain "
            f"{model_class.__name__} checkpoint."
        )
    for file in files:
        for key in file.shapes:
            target = model_class.convert_checkpoint_key(key)
            if target is None:
                continue
            if target in targets:
                raise CheckpointError(f"{file.path}: key {key!r} appears twice across the files.")
            targets.add(target)
            plan[key] = (file, target)
    shapes = {target: file.shapes[key] for key, (file, target) in plan.items()}

    try:
        with parameters_on_meta():
            model = model_class.from_checkpoint(shapes, read_config(files))
    except (ValueError, KeyError) as error:  # the sizes the model infers do not fit together
        raise CheckpointError(f"{files[0].path.parent}: {error}") from error
    _check_against_module(model, plan, files[0].path.parent)

    device = torch.device(device)
    read = [file for file in files if file.layout] if _reads_in_place(torch_dtype, device) else []
    rest = [file for file in files if not any(file is r for r in read)]
    with tqdm(total=sum(f.layout[key][2] for key, (f, _) in plan.items() if f.layout), unit="B", unit_scale=True,
              desc=f"Loading {model_class.__name__}", disable=len(plan) < 200) as bar:
        if read:
            _read_files(model, plan, read, torch_dtype, device, bar.update)
        for file in rest:
            _assign_one_by_one(model, plan, file, torch_dtype, device, bar.update)
    for module in model.modules():  # buffers were built on the CPU
        for name, buffer in module._buffers.items():
            if buffer is not None and buffer.device != device:
                module._buffers[name] = buffer.to(device)
    model.eval().requires_grad_(False)
    logger.info("Loaded %s from %d file(s) (%s, %s)", model_class.__name__, len(files), torch_dtype, device)
    return model


def _read_files(model: nn.Module, plan: dict[str, tuple[CheckpointFile, str]], files: Sequence[CheckpointFile],
                torch_dtype: torch.dtype | None, device: torch.device, progress: Callable[[int], None]) -> None:
    """Allocate every destination, assign it, then fill them all with read_tensors. On the CPU a
    tensor kept in its stored dtype that starts on HOST_ALIGNMENT in its file is not copied: it
    stays a view over a private memory map of the file, mapped at once (`MappedFile.populate`)."""
    wanted = []
    for file in files:
        keys = [key for key, (owner, _) in plan.items() if owner is file]
        wanted.extend((file, key) for key in sorted(keys, key=lambda key: file.layout[key][1]))

    def target_dtype(stored: torch.dtype) -> torch.dtype:
        return torch_dtype if torch_dtype is not None and stored.is_floating_point else stored

    descriptors = {file.path: os.open(file.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0)) for file in files}
    maps: dict[Path, MappedFile] = {}
    try:
        pieces: list[_Piece] = []
        for file, key in wanted:
            stored, offset, length = file.layout[key]
            shape, dtype = file.shapes[key], target_dtype(stored)
            if math.prod(shape) * stored.itemsize != length:
                raise CheckpointError(
                    f"{file.path}: the header gives {key!r} {length} bytes, but its shape {list(shape)} in "
                    f"{str(stored).removeprefix('torch.')} takes {math.prod(shape) * stored.itemsize}. The file is "
                    "corrupt: delete it and fetch it again.")
            if device.type == "cpu" and dtype == stored and offset % HOST_ALIGNMENT == 0:
                mapped = maps.setdefault(file.path, MappedFile(file.path))
                _assign(model, plan[key][1], _view(mapped, key, stored, offset, length, shape))
                mapped.populate(offset, length)
                progress(length)
                continue
            tensor = torch.empty(shape, dtype=dtype, device=device)
            _assign(model, plan[key][1], tensor)
            pieces.extend(_pieces(descriptors[file.path], file.path, offset, length, stored, tensor.reshape(-1)))
        read_tensors(pieces, device, progress)
    finally:
        for descriptor in descriptors.values():
            os.close(descriptor)


def _view(mapped: MappedFile, key: str, dtype: torch.dtype, offset: int, length: int,
          shape: Sequence[int]) -> torch.Tensor:
    try:
        return mapped.view(dtype, offset, length, shape)
    except (ValueError, OSError) as error:  # the file got shorter since its header was read
        raise CheckpointError(
            f"{mapped.path}: reading tensor {key!r} failed ({type(error).__name__}: {error}). The file is truncated "
            "or corrupt: delete it and fetch it again.") from error


def _assign_one_by_one(model: nn.Module, plan: dict[str, tuple[CheckpointFile, str]], file: CheckpointFile,
                       torch_dtype: torch.dtype | None, device: torch.device, progress: Callable[[int], None]) -> None:
    """Views over the file (a memory map, or torch.load's), each cast and moved where asked."""
    keys = [key for key, (owner, _) in plan.items() if owner is file]
    for key, stored, release in _iter_tensors(file, keys):
        progress(file.layout[key][2] if file.layout else 0)
        dtype = torch_dtype if stored.is_floating_point() else stored.dtype
        tensor = stored.to(device=device, dtype=dtype)
        if torch_dtype is not None:
            tensor = host_aligned(tensor)
        if tensor.data_ptr() != stored.data_ptr():
            release()
        _assign(model, plan[key][1], tensor)


def _check_against_module(model: nn.Module, plan: dict[str, tuple[CheckpointFile, str]], where: Path) -> None:
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    provided = {target: (file, key) for key, (file, target) in plan.items()}
    missing = sorted(set(expected) - set(provided))
    unexpected = sorted(set(provided) - set(expected))
    name = type(model).__name__
    if missing:
        raise CheckpointError(
            f"{where}: the {name} checkpoint lacks {len(missing)} key(s): {', '.join(missing[:8])}"
            f"{' ...' if len(missing) > 8 else ''}. Pass all shards, or fetch the files again."
        )
    if unexpected:
        shown = ", ".join(f"{provided[k][1]} ({provided[k][0].path.name})" for k in unexpected[:8])
        raise CheckpointError(
            f"{where}: {len(unexpected)} key(s) do not belong to {name}: {shown}"
            f"{' ...' if len(unexpected) > 8 else ''}. The file is not a plain {name} checkpoint."
        )
    for target, (file, key) in provided.items():
        if file.shapes[key] != expected[target]:
            raise CheckpointError(
                f"{file.path}: {key!r} has shape {list(file.shapes[key])} but {name} expects "
                f"{list(expected[target])}. The files mix different model sizes, or a config.json "
                "beside them does not match the weights."
            )


def _assign(model: nn.Module, key: str, tensor: torch.Tensor) -> None:
    module_name, _, name = key.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    if name in module._parameters:
        module._parameters[name] = nn.Parameter(tensor, requires_grad=False)
    else:
        module._buffers[name] = tensor
