"""LoRA files: read the common formats into one normalised view (keys, shapes, scaling config).

Formats (each key is normalised to `<layer name>` + A / B / alpha; the layer name is that of
the module's `named_modules()`):

    diffusers / peft  transformer.<layer>.lora_A.weight, .lora_B.weight
    peft (wrapped)    base_model.model.<layer>.lora_A.weight   (+ adapter_config.json beside)
    DiffSynth         <layer>.lora_A.default.weight             (any peft adapter name)
    ComfyUI           diffusion_model.<layer>.lora_A.weight     (lora_down/up + alpha too)
    kohya / musubi    lora_unet_<layer with . -> _>.lora_down.weight, .lora_up.weight, .alpha
    lightx2v          <layer>.lora_down.weight, .lora_up.weight, .alpha
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import torch
from safetensors import safe_open

from ..download import resolve_files
from ..files import is_regular_file
from ..model_config import ModelConfig
from ..shards import SAFETENSORS_SUFFIXES, CheckpointError, read_checkpoint

LoraSource = Union[str, Path, ModelConfig, Mapping[str, torch.Tensor], "LoraFile"]

# Prefixes tools put before the layer name, tried (repeatedly) when a name does not match.
KNOWN_PREFIXES = ("base_model.model.", "model.diffusion_model.", "diffusion_model.", "transformer.")
KOHYA_PREFIX = "lora_unet_"

WEIGHT_KEY = re.compile(
    r"^(?P<path>.+?)\.(?:(?P<a>lora_A|lora_down)|(?P<b>lora_B|lora_up))(?:\.(?P<adapter>[^.]+))?\.weight$")
ALPHA_KEY = re.compile(r"^(?P<path>.+)\.alpha$")
UNSUPPORTED_HINTS = {
    "dora_scale": "DoRA", "lora_magnitude_vector": "DoRA", "hada_": "LoHa", "lokr_": "LoKr",
    "lora_mid": "LoCon (conv)", ".diff": "full weight difference", "lora_B.bias": "LoRA bias",
    "lora_up.bias": "LoRA bias",
}


class LoraError(ValueError):
    """A LoRA that cannot be applied; the message says which key or layer and how to fix it."""


# ============================================================================ reading


@dataclass
class LoraFile:
    """A LoRA's tensors (read lazily from files, or held) with what its files say about scaling."""

    shapes: dict[str, tuple[int, ...]]
    read: Callable[[Sequence[str]], dict[str, torch.Tensor]]
    origin: str
    adapter_config: dict[str, Any] | None = None  # peft LoraConfig fields (lora_alpha, r, ...)
    files: tuple[str, ...] = ()  # the files read (real paths): the same LoRA loaded twice is told

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.read(list(self.shapes))

    def in_memory(self) -> "LoraFile":
        """The same LoRA with its tensors read once and held (a sweep re-applies it without
        reading the file again; unlike a plain state dict it keeps the file's scaling config)."""
        state = self.state_dict()
        return LoraFile(dict(self.shapes), lambda keys: {k: state[k] for k in keys}, self.origin,
                        self.adapter_config, self.files)


def read_lora(source: LoraSource) -> LoraFile:
    """A path (file or folder), a list of paths, a ModelConfig or a state dict -> LoraFile.
    Headers only: tensor data is read when the LoRA is applied. Bad files raise CheckpointError."""
    if isinstance(source, LoraFile):
        return source
    if isinstance(source, Mapping):
        state = dict(source)
        bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
        if bad:
            raise LoraError(f"The LoRA state dict holds non-tensor values for {', '.join(map(repr, bad[:5]))}: "
                            "pass a dict of key -> torch.Tensor.")
        if not state:
            raise LoraError("The LoRA state dict is empty.")
        return LoraFile({k: tuple(v.shape) for k, v in state.items()},
                        lambda keys: {k: state[k] for k in keys}, origin="the given state dict")
    if isinstance(source, ModelConfig):
        paths, origin = resolve_files(source), source.describe()
    elif isinstance(source, (str, Path)):
        paths, origin = [Path(source)], str(source)
    elif isinstance(source, Sequence) and source and all(isinstance(p, (str, Path)) for p in source):
        paths, origin = [Path(p) for p in source], ", ".join(map(str, source))
    else:
        raise TypeError(f"load_lora: `lora` must be a path, a ModelConfig or a state dict, "
                        f"got {type(source).__name__}.")
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise FileNotFoundError(f"LoRA file(s) not found: {', '.join(missing)}. Check the path.")

    files = read_checkpoint(paths)
    shapes: dict[str, tuple[int, ...]] = {}
    where: dict[str, int] = {}  # key -> index of its file
    for i, file in enumerate(files):
        for key, shape in file.shapes.items():
            if key in shapes:
                raise CheckpointError(f"{file.path}: LoRA key {key!r} appears twice across the files.")
            shapes[key], where[key] = shape, i

    def read(keys: Sequence[str]) -> dict[str, torch.Tensor]:
        by_file: dict[int, list[str]] = {}
        for key in keys:
            by_file.setdefault(where[key], []).append(key)
        return {k: t for i, ks in by_file.items() for k, t in _read_tensors(files[i].path, ks).items()}

    return LoraFile(shapes, read, origin, _adapter_config([f.path for f in files]),
                    tuple(os.path.realpath(f.path) for f in files))


def _read_tensors(path: Path, keys: Sequence[str]) -> dict[str, torch.Tensor]:
    """The named tensors as owned CPU tensors (a LoRA is small; it is kept for re-fusing)."""
    try:
        if path.suffix in SAFETENSORS_SUFFIXES:
            with safe_open(str(path), framework="pt") as f:
                return {key: f.get_tensor(key) for key in keys}
        state = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
        return {key: state[key] for key in keys}
    except Exception as error:
        raise CheckpointError(
            f"{path}: reading the LoRA's tensors failed ({type(error).__name__}: {error}). The file is "
            "truncated or corrupt: delete it and fetch it again."
        ) from error


def _adapter_config(paths: Sequence[Path]) -> dict[str, Any] | None:
    """peft's `adapter_config.json` beside the file, or diffusers' `lora_adapter_metadata`."""
    for path in paths:
        config_path = path.parent / "adapter_config.json"
        if is_regular_file(config_path, "adapter_config.json beside the LoRA", CheckpointError):
            try:
                return json.loads(config_path.read_text())
            except ValueError as error:
                raise CheckpointError(f"{config_path}: invalid JSON ({error}). Fix or delete it.") from error
        if path.suffix in SAFETENSORS_SUFFIXES:
            try:
                with safe_open(str(path), framework="pt") as f:
                    raw = (f.metadata() or {}).get("lora_adapter_metadata")
            except Exception:  # read_header already vouched for the file
                raw = None
            if raw:
                try:
                    packed = json.loads(raw)
                except ValueError as error:
                    raise CheckpointError(f"{path}: its lora_adapter_metadata is not valid JSON ({error}).") from error
                # diffusers packs the config per component: "transformer.lora_alpha", ...
                config = {k.split(".", 1)[1]: v for k, v in packed.items() if k.startswith("transformer.")}
                return config or packed
    return None


def lora_format(keys: Sequence[str]) -> str:
    """A name for the file format, for logs and messages."""
    keys = list(keys)
    has = lambda test: any(test(k) for k in keys)  # noqa: E731
    if has(lambda k: k.startswith(KOHYA_PREFIX)):
        return "kohya/musubi"
    if has(lambda k: k.startswith("base_model.model.")):
        return "peft"
    if has(lambda k: k.startswith(("diffusion_model.", "model.diffusion_model."))):
        return "ComfyUI"
    if has(lambda k: (m := WEIGHT_KEY.match(k)) is not None and m["adapter"] is not None):
        return "DiffSynth"
    if has(lambda k: ".lora_down." in k):
        return "lightx2v"
    if has(lambda k: k.startswith("transformer.")):
        return "diffusers"
    return "peft (no prefix)"


# ============================================================================ matching

