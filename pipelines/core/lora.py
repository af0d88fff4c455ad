"""LoRA: read the common file formats, match them to a model's linear layers, and apply them
cold (fused into the weights) or hot (kept apart and added in the forward).

    handle = load_lora(pipe.dit, "lora.safetensors", alpha=0.8)           # cold
    handle = load_lora(pipe.dit, "other.safetensors", alpha=0.5, hot=True)
    handle.set_alpha(0.3)                                                 # in place
    clear_lora(pipe.dit)                                                  # base weights, bit for bit

Formats (each key is normalised to `<layer name>` + A / B / alpha; the layer name is that of
the module's `named_modules()`):

    diffusers / peft  transformer.<layer>.lora_A.weight, .lora_B.weight
    peft (wrapped)    base_model.model.<layer>.lora_A.weight   (+ adapter_config.json beside)
    DiffSynth         <layer>.lora_A.default.weight             (any peft adapter name)
    ComfyUI           diffusion_model.<layer>.lora_A.weight     (lora_down/up + alpha too)
    kohya / musubi    lora_unet_<layer with . -> _>.lora_down.weight, .lora_up.weight, .alpha
    lightx2v          <layer>.lora_down.weight, .lora_up.weight, .alpha

Scaling of each layer: `alpha / rank` when the file holds an `.alpha` tensor for it (kohya,
lightx2v, ComfyUI); else peft's `lora_alpha / r` (or `/ sqrt(r)` with rsLoRA) when the file
carries its adapter config (diffusers' `lora_adapter_metadata` safetensors metadata, or
peft's `adapter_config.json` beside the file); else 1.

Cold: `W <- cast(float32(W) + alpha * scale * B @ A)`. The first LoRA that touches a layer
keeps its original weight: on the CPU the original tensor itself (the fused weight goes into a
new tensor, so nothing is copied and the restore swaps it back), on an accelerator a copy in
CPU memory (device memory stays free). Either way `clear_lora` restores the weights bit for
bit, and an alpha change re-fuses from the originals (the same bits as a fresh load at the new
alpha). Memory: the touched weights are held twice (fused + original). Hot: a forward hook on each layer adds `alpha * scale * (x @ A.T) @ B.T` to its output;
the model's code, module names and state dict are untouched, an alpha change is a float
assignment. Cold and hot LoRAs stack in the order loaded.

Nothing is applied unless the whole LoRA fits: every key must name a linear layer
(`strict=False` skips the others with a warning) with matching shapes.
"""
from __future__ import annotations

import contextlib
import difflib
import json
import logging
import math
import re
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open

from .download import resolve_files
from .loader import SAFETENSORS_SUFFIXES, CheckpointError, expand_checkpoint_paths, read_header
from .model_config import ModelConfig
from .vram import COMPUTE_DTYPES, VramConfigError, manager_of

logger = logging.getLogger(__name__)

__all__ = [
    "LoraError", "LoraFile", "LoraHandle", "LoraLayer", "PreparedLora",
    "read_lora", "prepare_lora", "load_lora", "clear_lora", "loaded_loras", "lora_format", "lora_context",
]

LoraSource = Union[str, Path, ModelConfig, Mapping[str, torch.Tensor], "LoraFile"]

# Prefixes tools put before the layer name, tried (repeatedly) when a name does not match.
KNOWN_PREFIXES = ("base_model.model.", "model.diffusion_model.", "diffusion_model.", "transformer.")
KOHYA_PREFIX = "lora_unet_"

_WEIGHT_KEY = re.compile(
    r"^(?P<path>.+?)\.(?:(?P<a>lora_A|lora_down)|(?P<b>lora_B|lora_up))(?:\.(?P<adapter>[^.]+))?\.weight$")
_ALPHA_KEY = re.compile(r"^(?P<path>.+)\.alpha$")
_UNSUPPORTED_HINTS = {
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

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.read(list(self.shapes))

    def in_memory(self) -> "LoraFile":
        """The same LoRA with its tensors read once and held (a sweep re-applies it without
        reading the file again; unlike a plain state dict it keeps the file's scaling config)."""
        state = self.state_dict()
        return LoraFile(dict(self.shapes), lambda keys: {k: state[k] for k in keys}, self.origin,
                        self.adapter_config)


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
        raise TypeError(f"load_lora: `lora` must be a path, a ModelConfig or a state dict, got {type(source).__name__}.")
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise FileNotFoundError(f"LoRA file(s) not found: {', '.join(missing)}. Check the path.")

    files = [read_header(p) for p in expand_checkpoint_paths(paths)]
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

    return LoraFile(shapes, read, origin, _adapter_config([f.path for f in files]))


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
        if config_path.is_file():
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
    if has(lambda k: (m := _WEIGHT_KEY.match(k)) is not None and m["adapter"] is not None):
        return "DiffSynth"
    if has(lambda k: ".lora_down." in k):
        return "lightx2v"
    if has(lambda k: k.startswith("transformer.")):
        return "diffusers"
    return "peft (no prefix)"


# ============================================================================ matching


@dataclass
class LoraLayer:
    """One layer's low-rank update: `scale * B @ A`, A (rank, in), B (out, rank)."""

    name: str
    A: torch.Tensor
    B: torch.Tensor
    scale: float

    @property
    def rank(self) -> int:
        return self.A.shape[0]


@dataclass
class PreparedLora:
    """A LoRA matched and checked against one module; applying it cannot fail on its content."""

    layers: list[LoraLayer]  # in the module's order
    format: str
    origin: str
    skipped_keys: list[str] = field(default_factory=list)


def linear_layers(module: nn.Module) -> dict[str, nn.Module]:
    """The layers a LoRA can target: nn.Linear (and wrappers that subclass it or look like it)."""
    found = {}
    for name, child in module.named_modules():
        if isinstance(child, nn.Linear) or (
                hasattr(child, "in_features") and hasattr(child, "out_features")
                and isinstance(getattr(child, "weight", None), torch.Tensor) and child.weight.ndim == 2):
            found[name] = child
    return found


def prepare_lora(module: nn.Module, lora: LoraSource, strict: bool = True) -> PreparedLora:
    """Read, normalise and check a LoRA against `module` without changing anything."""
    source = read_lora(lora)
    targets = linear_layers(module)
    fmt = lora_format(source.shapes)
    model_name = type(module).__name__

    # 1. key -> (path, role)
    groups: dict[str, dict[str, str]] = {}  # path -> {"A"|"B"|"alpha": key}
    not_lora: list[str] = []
    for key in source.shapes:
        if (m := _WEIGHT_KEY.match(key)) is not None:
            path, role = m["path"], "A" if m["a"] else "B"
        elif (m := _ALPHA_KEY.match(key)) is not None:
            path, role = m["path"], "alpha"
        else:
            not_lora.append(key)
            continue
        if role in groups.setdefault(path, {}):
            raise LoraError(f"{source.origin}: keys {groups[path][role]!r} and {key!r} give the same layer's "
                            f"{role} twice (two adapters in one file?). Keep one adapter per file.")
        groups[path][role] = key

    # 2. path -> layer name
    flat = _flat_names(targets)
    matched: dict[str, str] = {}  # layer -> path
    unmatched: list[str] = []
    for path, roles in groups.items():
        layer = _resolve(path, targets, flat)
        if layer is None:
            unmatched.extend(roles.values())
        elif layer in matched:
            raise LoraError(f"{source.origin}: {path!r} and {matched[layer]!r} both target layer {layer!r}. "
                            "The file mixes two LoRAs; split it.")
        else:
            matched[layer] = path
    incomplete = [(p, r) for p, r in groups.items() if ("A" in r) != ("B" in r) and p in matched.values()]
    if incomplete:
        path, roles = incomplete[0]
        raise LoraError(f"{source.origin}: layer {path!r} has {'lora_A' if 'A' in roles else 'lora_B'} but no "
                        f"{'lora_B' if 'A' in roles else 'lora_A'} ({len(incomplete)} layer(s) like this). "
                        "The file is incomplete or not a LoRA.")
    alpha_only = [p for p in matched.values() if "A" not in groups[p]]
    unmatched.extend(groups[p]["alpha"] for p in alpha_only)
    for path in alpha_only:
        matched = {layer: p for layer, p in matched.items() if p != path}

    # 3. unknown or unmatched keys
    if not matched:
        raise LoraError(_unmatched_message(source.origin, fmt, model_name, not_lora + unmatched, targets, flat,
                                           none_matched=True))
    if not_lora or unmatched:
        message = _unmatched_message(source.origin, fmt, model_name, not_lora + unmatched, targets, flat)
        if strict:
            raise LoraError(message + " Pass strict=False to load the matching layers anyway.")
        logger.warning("%s Skipping them (strict=False).", message)

    # 4. shapes, in the module's order: the first mismatching layer is named
    order = {name: i for i, name in enumerate(targets)}
    layers_paths = sorted(matched.items(), key=lambda item: order[item[0]])
    for layer, path in layers_paths:
        a_shape, b_shape = source.shapes[groups[path]["A"]], source.shapes[groups[path]["B"]]
        target = targets[layer]
        out_f, in_f = target.weight.shape
        if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[1] != in_f or b_shape[0] != out_f \
                or a_shape[0] != b_shape[1]:
            raise LoraError(
                f"{source.origin}: the LoRA does not fit {model_name} at layer {layer!r}: lora_A "
                f"{list(a_shape)} and lora_B {list(b_shape)}, but the layer is Linear({in_f} -> {out_f}) "
                f"(expects A [rank, {in_f}], B [{out_f}, rank]). The LoRA was made for another model or "
                "model size; nothing was applied.")
        if "alpha" in groups[path] and math.prod(source.shapes[groups[path]["alpha"]]) != 1:
            raise LoraError(f"{source.origin}: {groups[path]['alpha']!r} should be a single number, has shape "
                            f"{list(source.shapes[groups[path]['alpha']])}.")

    # 5. read the tensors and work out the scales
    keys = [k for _, path in layers_paths for k in groups[path].values()]
    tensors = source.read(keys)
    layers = []
    for layer, path in layers_paths:
        roles = groups[path]
        A, B = tensors[roles["A"]], tensors[roles["B"]]
        if not (A.is_floating_point() and B.is_floating_point()):
            raise LoraError(f"{source.origin}: {roles['A']!r} / {roles['B']!r} are not floating-point tensors.")
        rank = A.shape[0]
        if "alpha" in roles:
            scale = float(tensors[roles["alpha"]].float().item()) / rank
        else:
            scale = _config_scale(source.adapter_config, layer, rank, source.origin)
        layers.append(LoraLayer(layer, A, B, scale))
    return PreparedLora(layers, fmt, source.origin, skipped_keys=not_lora + unmatched)


def _flat_names(targets: Mapping[str, nn.Module]) -> dict[str, str | None]:
    """kohya's flattened names (`.` -> `_`); None marks a flattening two layers share."""
    flat: dict[str, str | None] = {}
    for name in targets:
        key = name.replace(".", "_")
        flat[key] = None if key in flat else name
    return flat


def _resolve(path: str, targets: Mapping[str, nn.Module], flat: Mapping[str, str | None]) -> str | None:
    candidate = path
    while True:
        if candidate in targets:
            return candidate
        if candidate.startswith(KOHYA_PREFIX):
            return flat.get(candidate[len(KOHYA_PREFIX):])
        prefix = next((p for p in KNOWN_PREFIXES if candidate.startswith(p)), None)
        if prefix is None:
            return None
        candidate = candidate[len(prefix):]


def _strip(path: str) -> str:
    """The layer-name part of a path, for suggestions."""
    changed = True
    while changed:
        changed = False
        for prefix in KNOWN_PREFIXES + (KOHYA_PREFIX,):
            if path.startswith(prefix):
                path, changed = path[len(prefix):], True
    return path


def _key_path(key: str) -> str:
    for pattern in (_WEIGHT_KEY, _ALPHA_KEY):
        if (m := pattern.match(key)) is not None:
            return m["path"]
    return key


def _unmatched_message(origin: str, fmt: str, model_name: str, keys: list[str], targets: Mapping[str, nn.Module],
                       flat: Mapping[str, str | None], none_matched: bool = False) -> str:
    shown = keys[:5]
    lines = []
    for key in shown:
        hint = next((v for k, v in _UNSUPPORTED_HINTS.items() if k in key), None)
        if hint is not None:
            lines.append(f"{key!r} ({hint} is not supported)")
            continue
        path = _strip(_key_path(key))
        names = list(flat) if _key_path(key).startswith(KOHYA_PREFIX) else list(targets)
        near = difflib.get_close_matches(path, names, n=2, cutoff=0.5)
        if _key_path(key).startswith(KOHYA_PREFIX):
            near = [flat[n] or n for n in near]
        lines.append(f"{key!r} (nearest layers: {', '.join(near) if near else 'none close'})")
    more = f" and {len(keys) - len(shown)} more" if len(keys) > len(shown) else ""
    head = (f"{origin}: no key of this {fmt} LoRA matches a linear layer of {model_name}; is it for another model?"
            if none_matched else
            f"{origin}: {len(keys)} key(s) of this {fmt} LoRA match no linear layer of {model_name}:")
    example = next(iter(targets), "")
    return (f"{head} {'; '.join(lines)}{more}. Layer names look like {example!r} (optionally prefixed "
            f"{', '.join(repr(p) for p in KNOWN_PREFIXES)}, or kohya's {KOHYA_PREFIX!r} with '_' for '.').")


def _config_scale(config: Mapping[str, Any] | None, layer: str, rank: int, origin: str) -> float:
    """peft's scaling from its LoraConfig fields: lora_alpha / r (rsLoRA: / sqrt(r))."""
    if not config or config.get("lora_alpha") is None:
        return 1.0
    if config.get("use_dora"):
        raise LoraError(f"{origin}: a DoRA adapter (use_dora=True); DoRA is not supported.")
    alpha = float(config["lora_alpha"])
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", layer):
            alpha = float(value)
            break
    return alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)


# ============================================================================ applying

# state kept beside each module (from outside the model code): module -> _ModuleLoras
_STATE: "weakref.WeakKeyDictionary[nn.Module, _ModuleLoras]" = weakref.WeakKeyDictionary()


@dataclass
class _HotEntry:
    A: torch.Tensor
    B: torch.Tensor
    scale: float
    handle: "LoraHandle"


@dataclass
class _Original:
    tensor: torch.Tensor
    swapped: bool  # True: `tensor` was the parameter's data; False: a CPU copy of it


@dataclass
class _ModuleLoras:
    handles: list["LoraHandle"] = field(default_factory=list)
    # layer -> its weight before any cold LoRA: the very tensor (CPU weights, swapped out so
    # the fused weight lives in a new one) or a CPU copy (weights on an accelerator)
    originals: dict[str, _Original] = field(default_factory=dict)
    hot: dict[str, list[_HotEntry]] = field(default_factory=dict)
    hooks: dict[str, Any] = field(default_factory=dict)


class LoraHandle:
    """A LoRA applied to a module. `alpha` can be changed in place (`set_alpha`)."""

    def __init__(self, module: nn.Module, prepared: PreparedLora, alpha: float, hot: bool, name: str):
        self._module = weakref.ref(module)
        self.prepared = prepared
        self._alpha = float(alpha)
        self.hot = hot
        self.name = name
        self.active = True

    @property
    def alpha(self) -> float:
        return self._alpha

    @alpha.setter
    def alpha(self, value: float) -> None:
        self.set_alpha(value)

    @property
    def layers(self) -> list[str]:
        return [layer.name for layer in self.prepared.layers]

    def set_alpha(self, alpha: float) -> None:
        """Change the strength in place: hot, a float; cold, the touched layers are re-fused from
        their originals (the same weights as a fresh load at this alpha)."""
        if not self.active:
            raise RuntimeError(f"LoRA {self.name!r} was cleared; load it again.")
        alpha = float(alpha)
        if alpha == self._alpha:
            return
        old, self._alpha = self._alpha, alpha
        if not self.hot:
            module = self._module()
            with lora_context(module, hot=False):
                try:
                    _rebuild(module, _STATE[module], self.layers)
                except BaseException:  # back to the old alpha everywhere, then report
                    self._alpha = old
                    _rebuild(module, _STATE[module], self.layers)
                    raise

    def __repr__(self) -> str:
        mode = "hot" if self.hot else "cold"
        return (f"LoraHandle({self.name!r}, {mode}, alpha={self._alpha:g}, {len(self.prepared.layers)} layers, "
                f"{self.prepared.format})")


def load_lora(module: nn.Module, lora: LoraSource, alpha: float = 1.0, hot: bool = False, strict: bool = True,
              name: str | None = None) -> LoraHandle:
    """Apply a LoRA to `module` (for example `pipe.dit`); see the module docstring."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"load_lora: `module` must be a loaded model (e.g. pipe.dit), got {module!r}.")
    with lora_context(module, hot):
        return _apply(module, lora, alpha, hot, strict, name)


def _apply(module: nn.Module, lora: LoraSource, alpha: float, hot: bool, strict: bool,
           name: str | None) -> LoraHandle:
    prepared = prepare_lora(module, lora, strict=strict)
    state = _STATE.setdefault(module, _ModuleLoras())
    if name is None:
        stem = Path(prepared.origin).stem if isinstance(lora, (str, Path)) else "lora"
        name = f"{stem}#{len(state.handles)}"
    handle = LoraHandle(module, prepared, alpha, hot, name)
    targets = linear_layers(module)
    if hot:
        _attach_hot(targets, state, handle)
    else:
        touched = []
        try:
            for layer in prepared.layers:
                weight = targets[layer.name].weight
                source = _keep_original(weight, state, layer.name)
                touched.append(layer.name)
                _fuse(weight, source, layer, handle.alpha)
        except BaseException:  # all or nothing, even on an out-of-memory error
            _rebuild(module, state, touched)  # the original + the LoRAs loaded before this one
            raise
    state.handles.append(handle)
    logger.info("LoRA %s (%s, %s) applied %s to %d layer(s) of %s at alpha %g", name, prepared.origin,
                prepared.format, "hot" if hot else "cold", len(prepared.layers), type(module).__name__, alpha)
    return handle


def loaded_loras(module: nn.Module) -> list[LoraHandle]:
    state = _STATE.get(module)
    return list(state.handles) if state else []


def clear_lora(module: nn.Module) -> int:
    """Remove every LoRA from `module`: hooks detached, fused layers restored bit for bit.
    Returns how many LoRAs were removed."""
    state = _STATE.get(module)
    if state is None:
        return 0
    # a cold LoRA was fused into the offload storage of a VRAM-managed model
    with lora_context(module, hot=False) if state.originals else contextlib.nullcontext():
        del _STATE[module]
        for hook in state.hooks.values():
            hook.remove()
        targets = linear_layers(module)
        for name in list(state.originals):
            _restore(targets[name].weight, state, name)
    for handle in state.handles:
        handle.active = False
    logger.info("Cleared %d LoRA(s) from %s", len(state.handles), type(module).__name__)
    return len(state.handles)


@contextlib.contextmanager
def lora_context(model: nn.Module, hot: bool) -> Iterator[None]:
    """Around applying or changing a LoRA on `model`: for a VRAM-managed model, a hot LoRA
    sees the weights in the computation dtype on the computation device (so A and B go there);
    a cold one is fused into the offload storage (the model is offloaded first, so no change
    lands in a temporary onload copy), which is impossible when that storage is the file."""
    manager = manager_of(model)
    if manager is None:
        yield
    elif hot:
        with manager.computation_view():
            yield
    else:
        if manager.settings.uses_disk:
            raise VramConfigError(
                f"{manager.model_name} is offloaded to disk: a cold LoRA cannot be fused into weights that stay "
                "in their file. Load it hot (hot=True; the pipeline's hotload=None picks it for VRAM-managed "
                "models).")
        manager.offload()
        yield


@torch.no_grad()
def _keep_original(weight: torch.Tensor, state: _ModuleLoras, name: str) -> torch.Tensor:
    """Keep the layer's weight before its first cold LoRA; returns what to fuse onto. A CPU
    weight is swapped out whole (no copy: the fused weight goes into a new tensor, and the
    restore swaps back); a weight elsewhere is copied to the CPU, keeping device memory free."""
    if name in state.originals:
        return weight.data
    if weight.device.type == "cpu":
        original = weight.data
        state.originals[name] = _Original(original, swapped=True)
        weight.data = torch.empty_like(original)
        return original
    state.originals[name] = _Original(weight.detach().to("cpu", copy=True), swapped=False)
    return weight.data


@torch.no_grad()
def _fuse(weight: torch.Tensor, source: torch.Tensor, layer: LoraLayer, alpha: float) -> None:
    """weight <- cast(float32(source) + alpha * scale * B @ A); `source` may be `weight` itself."""
    A = layer.A.to(device=weight.device, dtype=torch.float32)
    B = layer.B.to(device=weight.device, dtype=torch.float32)
    s = alpha * layer.scale
    target = weight.data
    if target.dtype == torch.float32 and source.device == target.device:  # no temporary
        if source.data_ptr() == target.data_ptr():
            target.addmm_(B, A, alpha=s)
        else:
            torch.addmm(source, B, A, alpha=s, out=target)
    else:
        target.copy_(torch.addmm(source.to(target.device, torch.float32), B, A, alpha=s))


@torch.no_grad()
def _restore(weight: torch.Tensor, state: _ModuleLoras, name: str) -> None:
    original = state.originals.pop(name)
    if original.swapped:
        weight.data = original.tensor
    else:
        weight.data.copy_(original.tensor)


def _rebuild(module: nn.Module, state: _ModuleLoras, names: Sequence[str]) -> None:
    """Recompute the named layers from their originals with the cold LoRAs now registered, in
    load order (the same bits as loading them afresh); a layer none of them touches is restored."""
    targets = linear_layers(module)
    cold = [{layer.name: layer for layer in h.prepared.layers} for h in state.handles if not h.hot]
    alphas = [h.alpha for h in state.handles if not h.hot]
    for name in dict.fromkeys(names):
        if name not in state.originals:
            continue
        weight = targets[name].weight
        fuses = [(layers[name], alpha) for layers, alpha in zip(cold, alphas) if name in layers]
        if not fuses:
            _restore(weight, state, name)
            continue
        source = state.originals[name].tensor
        for layer, alpha in fuses:
            _fuse(weight, source, layer, alpha)
            source = weight.data


def _attach_hot(targets: Mapping[str, nn.Module], state: _ModuleLoras, handle: LoraHandle) -> None:
    entries = []
    for layer in handle.prepared.layers:
        weight = targets[layer.name].weight
        # A and B where the weight computes: not in a storage dtype (float8) nor on meta (disk)
        dtype = weight.dtype if weight.dtype in COMPUTE_DTYPES else torch.float32
        device = torch.device("cpu") if weight.device.type == "meta" else weight.device
        entries.append((layer.name, _HotEntry(layer.A.to(device, dtype).contiguous(),
                                              layer.B.to(device, dtype).contiguous(), layer.scale, handle)))
    for name, entry in entries:  # nothing above changed the model; from here nothing can fail
        if name not in state.hooks:
            state.hot[name] = []
            state.hooks[name] = targets[name].register_forward_hook(_make_hook(state.hot[name]))
        state.hot[name].append(entry)


def _make_hook(entries: list[_HotEntry]):
    def add_lora(layer: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        x = args[0]
        in_place = not (torch.is_grad_enabled() and (output.requires_grad or x.requires_grad)) \
            and output.is_contiguous()
        flat_out = output.view(-1, output.shape[-1]) if in_place else None
        for entry in entries:
            s = entry.handle.alpha * entry.scale
            if s == 0.0:
                continue
            A, B = entry.A, entry.B
            if A.dtype != x.dtype or A.device != x.device:  # VRAM-managed layers compute elsewhere
                A, B = A.to(x.device, x.dtype), B.to(x.device, x.dtype)
            h = F.linear(x, A)
            if in_place:  # out += s * h @ B.T in one GEMM, no extra pass over the output
                flat_out.addmm_(h.view(-1, h.shape[-1]), B.t(), alpha=s)
            else:
                output = output + F.linear(h, B) * s
        return output

    return add_lora
