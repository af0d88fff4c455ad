"""Writing random-weight checkpoints in the hub layout: the demo models (and tests, benchmarks)."""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file


def random_tensor(name: str, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """Non-zero random values that keep activations of order one: norm scales near 1,
    small biases, weights with a 1/sqrt(fan-in) spread."""
    if len(shape) == 1:
        values = torch.randn(shape, generator=generator)
        if "norm" in name or name.endswith("gamma"):
            return 1.0 + 0.1 * values
        return 0.1 * values
    fan_in = math.prod(shape[1:])
    return torch.randn(shape, generator=generator) / math.sqrt(fan_in)


def random_state_dict(shapes: Mapping[str, tuple[int, ...]], seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {name: random_tensor(name, shape, generator) for name, shape in shapes.items()}


def save_sharded(state: Mapping[str, torch.Tensor], folder: Path, basename: str, num_shards: int) -> list[Path]:
    """Write `basename.safetensors` (one shard) or `basename-0000i-of-0000n.safetensors` plus
    `basename.safetensors.index.json`, the way the hub repos are laid out."""
    folder.mkdir(parents=True, exist_ok=True)
    keys = list(state)
    if num_shards == 1:
        path = folder / f"{basename}.safetensors"
        save_file(dict(state), str(path), metadata={"format": "pt"})
        return [path]
    per_shard = math.ceil(len(keys) / num_shards)
    weight_map, paths = {}, []
    for i in range(num_shards):
        name = f"{basename}-{i + 1:05d}-of-{num_shards:05d}.safetensors"
        chunk = {k: state[k].contiguous() for k in keys[i * per_shard : (i + 1) * per_shard]}
        save_file(chunk, str(folder / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in chunk})
        paths.append(folder / name)
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / f"{basename}.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return paths


def write_json(path: Path, data: Mapping) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


def write_folder(out_dir: str | Path, write: Callable[[Path], None]) -> Path:
    """Run `write(folder)` in a staging folder beside `out_dir` (which must not exist or be
    empty), then rename it into place: the folder appears complete or not at all. A path with a
    `..` segment is refused (the shape of `<models folder>/<model id>` for an id such as `../x`,
    which would land outside the models folder): pass a normalised path (os.path.abspath)."""
    if ".." in Path(out_dir).parts or ".." in str(out_dir).replace("\\", "/").split("/"):
        raise ValueError(f"{str(out_dir)!r}: the output folder has a '..' segment, so it may lie outside the folder "
                         "it seems to be in (a model id such as '../x' joined to the models folder?); nothing was "
                         "written. Give a normalised path (os.path.abspath), or a model id of the form owner/name.")
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} already exists and is not empty; choose an empty folder.")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        write(staging)
        if out_dir.exists():
            out_dir.rmdir()
        os.replace(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir
