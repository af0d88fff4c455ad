"""Weights left in their safetensors files: where each parameter of a model lies on disk."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..shards import SAFETENSORS_SUFFIXES, MappedFile, expand_checkpoint_paths, read_header
from .settings import VramConfigError


@dataclass(frozen=True)
class DiskTensor:
    file: MappedFile
    dtype: torch.dtype
    offset: int
    length: int
    shape: tuple[int, ...]

    def read(self) -> torch.Tensor:
        """A CPU tensor over the file's pages (no copy; pages are read as they are touched)."""
        return self.file.view(self.dtype, self.offset, self.length, self.shape)

    def release(self) -> None:
        self.file.release(self.offset, self.length)


class DiskSource:
    """Where each parameter of a model lies in its safetensors files (state-dict key -> DiskTensor)."""

    def __init__(self, tensors: dict[str, DiskTensor]):
        self.tensors = tensors

    @classmethod
    def from_files(cls, paths: Sequence[Path], model_class: type) -> "DiskSource":
        files = expand_checkpoint_paths([Path(p) for p in paths])
        check_safetensors(files)
        tensors: dict[str, DiskTensor] = {}
        for header in (read_header(p) for p in files):
            mapped = MappedFile(header.path)
            for key, (dtype, offset, length) in header.layout.items():
                target = model_class.convert_checkpoint_key(key)
                if target is not None:
                    tensors[target] = DiskTensor(mapped, dtype, offset, length, tuple(header.shapes[key]))
        return cls(tensors)


def all_safetensors(files: Sequence[Path]) -> bool:
    return all(Path(p).suffix in SAFETENSORS_SUFFIXES for p in files)


def check_safetensors(files: Sequence[Path]) -> None:
    other = [str(p) for p in files if Path(p).suffix not in SAFETENSORS_SUFFIXES]
    if other:
        raise VramConfigError(
            f"disk offload needs .safetensors files (their tensors are read in place), but got "
            f"{', '.join(other[:4])}{' ...' if len(other) > 4 else ''}. Convert them to safetensors "
            "(safetensors.torch.save_file), or offload to the cpu instead (offload_device='cpu').")
