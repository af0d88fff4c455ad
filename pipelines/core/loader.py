"""Checkpoint files -> nn.Module.

Recognise which model a checkpoint holds from its key names and shapes, build the module
with its parameters on the meta device, check every key and shape, then fill them: no random
initialisation, no second full copy. Everything model-specific comes from the model classes
(`checkpoint.CheckpointModel`). The files and their headers are `shards.py`'s; safetensors are
read into the allocated parameters by `reads.read_tensors` (parallel positional reads).
`torch_dtype=None` on the CPU (VRAM management) instead gives views over a memory map of the
files: nothing is read until used.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
import torch.nn as nn
from tqdm import tqdm

from .checkpoint import CheckpointModel
from .files import is_regular_file
from .reads import HOST_ALIGNMENT, Piece, host_aligned, read_tensors, reads_in_place, tensor_pieces
from .shards import (
    CheckpointError,
    CheckpointFile,
    MappedFile,
    check_one_checkpoint,
    expand_checkpoint_paths,
    iter_tensors,
    read_header,
)

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------- recognition


def _owner(key: str, candidates: Sequence[type]) -> type | None:
    return next((c for c in candidates if c.owns_checkpoint_key(key)), None)


def _absent_required(model_class: type, files: Sequence[CheckpointFile]) -> list[str]:
    converted = {model_class.convert_checkpoint_key(k) for f in files for k in f.shapes
                 if model_class.owns_checkpoint_key(k)}
    return [k for k in model_class.CHECKPOINT_REQUIRED_KEYS if k not in converted]


def _loading_owner(key: str, candidates: Sequence[type]) -> type | None:
    """The candidate that owns `key` and loads it. A key its owner skips (the `lm_head` a text
    encoder does not use) says nothing about which model the files hold: families share such keys."""
    owner = _owner(key, candidates)
    return owner if owner is not None and owner.convert_checkpoint_key(key) is not None else None


def recognise(files: Sequence[CheckpointFile], candidates: Sequence[type[CheckpointModel]]) -> type:
    """The one candidate class whose checkpoint these files hold. Related architectures share key
    names (`encoder.conv_in.weight` of two VAEs): a candidate that owns every key and finds its
    required keys wins before keys are attributed one by one, by the keys each model loads."""
    whole = next((c for c in candidates if all(c.owns_checkpoint_key(k) for f in files for k in f.shapes)
                  and not _absent_required(c, files)), None)
    if whole is not None:
        return whole
    owners_per_file = []
    for file in files:
        owners = {_loading_owner(k, candidates) for k in file.shapes}
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
    _check_required(model_class, files)
    return model_class


def recognise_checkpoint(paths: Sequence[Path], candidates: Sequence[type[CheckpointModel]]) -> type:
    """The candidate class whose checkpoint the files hold, from their headers alone (no tensor
    is read): what `load_model` will build, known before any weight loads."""
    return recognise([read_header(p) for p in expand_checkpoint_paths(paths)], candidates)


def _check_required(model_class: type, files: Sequence[CheckpointFile]) -> None:
    """Required keys absent: incomplete files, or (keys this model does not own beside them) the
    checkpoint of another model that shares some key names with this one."""
    absent = _absent_required(model_class, files)
    if not absent:
        return
    foreign = [k for f in files for k in f.shapes if not model_class.owns_checkpoint_key(k)]
    if foreign:
        raise CheckpointError(
            f"{files[0].path.parent}: not a {model_class.__name__} checkpoint: it lacks {', '.join(absent[:4])}"
            f"{' ...' if len(absent) > 4 else ''} and holds {len(foreign)} key(s) of another model "
            f"({', '.join(foreign[:4])}{' ...' if len(foreign) > 4 else ''}). Check that the files are the right "
            "model for this component."
        )
    raise CheckpointError(
        f"{files[0].path}: looks like a {model_class.__name__} checkpoint but lacks "
        f"{', '.join(absent)}. The files are incomplete: pass all shards, or fetch them again."
    )


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
    read = [file for file in files if file.layout] if reads_in_place(torch_dtype, device) else []
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
        pieces: list[Piece] = []
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
            pieces.extend(tensor_pieces(descriptors[file.path], file.path, offset, length, stored, tensor.reshape(-1)))
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
    for key, stored, release in iter_tensors(file, keys):
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
