"""Apply LoRAs cold (fused into the weights) or hot (kept apart, added in the forward).

    handle = load_lora(pipe.dit, "lora.safetensors", alpha=0.8)           # cold
    handle = load_lora(pipe.dit, "other.safetensors", alpha=0.5, hot=True)
    handle.set_alpha(0.3)                                                 # in place
    clear_lora(pipe.dit)                                                  # base weights, bit for bit

Cold: `W <- cast(float32(W) + alpha * scale * B @ A)`. The first LoRA that touches a layer
keeps its original weight: on the CPU the original tensor itself (the fused weight goes into a
new tensor, so nothing is copied and the restore swaps it back), on an accelerator a copy in
CPU memory (device memory stays free). Either way `clear_lora` restores the weights bit for
bit, and an alpha change re-fuses from the originals (the same bits as a fresh load at the new
alpha). Memory: the touched weights are held twice (fused + original). Hot: a named forward
wrapper (pipelines.core.hooks) on each layer adds `alpha * scale * (x @ A.T) @ B.T` to its
output; the model's code, module names and state dict are untouched, an alpha change is a float
assignment. Cold and hot LoRAs stack in the order loaded. Nothing is applied unless the whole
LoRA fits (see `matching`).
"""
from __future__ import annotations

import contextlib
import logging
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ContextManager

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..hooks import add_forward_wrapper, remove_forward_wrapper
from ..parse import COMPUTE_DTYPES, finite
from ..weight_access import weight_access
from .formats import LoraSource
from .matching import LoraLayer, PreparedLora, linear_layers, prepare_lora

logger = logging.getLogger(__name__)

WRAPPER = "lora"  # the name of the hot LoRA's forward wrapper (pipelines.core.hooks)

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
    hot: dict[str, list[_HotEntry]] = field(default_factory=dict)  # layer -> its hot LoRAs, in order


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
        alpha = finite(alpha, f"LoRA {self.name!r} alpha")
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
    alpha = finite(alpha, "load_lora alpha")
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
    _warn_if_applied_before(module, state, handle)
    state.handles.append(handle)
    logger.info("LoRA %s (%s, %s) applied %s to %d layer(s) of %s at alpha %g", name, prepared.origin,
                prepared.format, "hot" if hot else "cold", len(prepared.layers), type(module).__name__, alpha)
    return handle


def _warn_if_applied_before(module: nn.Module, state: _ModuleLoras, handle: LoraHandle) -> None:
    """The same file(s) loaded again stack: allowed (as before), but said, since it is rarely meant."""
    files = handle.prepared.files
    earlier = [h for h in state.handles if files and h.prepared.files == files]
    if earlier:
        logger.warning(
            "LoRA %s (%s) is already applied to %s (as %s, alpha %g): it is now applied %d times, its effects "
            "added. To change its strength instead, call set_alpha on the handle load_lora returned (handle.alpha = "
            "...); to start over, clear_lora() and load it once.", ", ".join(files), handle.name,
            type(module).__name__, earlier[0].name, earlier[0].alpha, len(earlier) + 1)


def loaded_loras(module: nn.Module) -> list[LoraHandle]:
    state = _STATE.get(module)
    return list(state.handles) if state else []


def clear_lora(module: nn.Module) -> int:
    """Remove every LoRA from `module`: hooks detached, fused layers restored bit for bit.
    Returns how many LoRAs were removed."""
    state = _STATE.get(module)
    if state is None:
        return 0
    # a cold LoRA was fused into the stored weights (e.g. the offload storage of a managed model)
    with lora_context(module, hot=False) if state.originals else contextlib.nullcontext():
        del _STATE[module]
        targets = linear_layers(module)
        for name in state.hot:
            remove_forward_wrapper(targets[name], WRAPPER)
        for name in list(state.originals):
            _restore(targets[name].weight, state, name)
    for handle in state.handles:
        handle.active = False
    logger.info("Cleared %d LoRA(s) from %s", len(state.handles), type(module).__name__)
    return len(state.handles)


def lora_context(model: nn.Module, hot: bool) -> ContextManager[None]:
    """Around applying or changing a LoRA on `model`: a hot LoRA sees each weight in the dtype
    and on the device it computes in (so A and B go there); a cold one changes the stored
    weights for good. Whoever manages the model's storage decides what that means
    (pipelines.core.weight_access; VRAM management offloads first, and refuses disk storage)."""
    access = weight_access(model)
    return access.computation_view() if hot else access.editable()


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
        if name not in state.hot:
            state.hot[name] = []
            add_forward_wrapper(targets[name], WRAPPER, _hot_wrapper(state.hot[name]))
        state.hot[name].append(entry)


def _hot_wrapper(entries: list[_HotEntry]):
    def add_lora(forward: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        output = forward(*args, **kwargs)
        x = args[0] if args else next(iter(kwargs.values()))
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
