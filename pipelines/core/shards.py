"""Checkpoint files on disk, before any tensor data is read: which weight files a path names
(files, folders, shard lists, `*.index.json`), their headers (key names, shapes, dtypes and byte
layout), checks that shards given together are one checkpoint, and private memory maps over
them (`MappedFile`, `iter_tensors`). Only regular files are opened.
"""
from __future__ import annotations

import contextlib
import json
import mmap
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from safetensors import safe_open

from .files import is_regular_file, regular_file

SAFETENSORS_SUFFIXES = (".safetensors",)
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
            layout = safetensors_layout(path)
        else:
            shapes = {k: tuple(t.shape) for k, t in torch_state_dict(path).items()}
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


def safetensors_layout(path: Path) -> dict[str, tuple[torch.dtype, int, int]]:
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


def torch_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # files from before torch's zip format cannot be memory-mapped
        state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: expected a dict of tensors (a state dict).")
    return state


MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)  # Linux >= 5.14


def align_up(n: int, to: int) -> int:
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
        length = min(align_up(offset + length, mmap.PAGESIZE), len(self._map)) - start
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


def iter_tensors(file: CheckpointFile, keys: Sequence[str]) -> Iterator[tuple[str, torch.Tensor, Callable[[], None]]]:
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
            state = torch_state_dict(path)
            for key in keys:
                yield key, state[key], lambda: None
    except Exception as error:
        raise CheckpointError(
            f"{path}: reading tensor data failed ({type(error).__name__}: {error}). The file is "
            "truncated or corrupt: delete it and fetch it again."
        ) from error
