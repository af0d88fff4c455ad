"""One layer's parameters and where they are stored: the state machine of VRAM management.

    OFFLOAD --onload()--> ONLOAD --first forward, room below vram_limit--> PREPARED
       ^                     |                                               |
       +------offload()------+-----------------offload()--------------------+

In any state a forward runs with the computation copies swapped into the module's parameter
slots (`enter`), then the stored tensors back (`exit`); a layer whose storage already is the
computation place (`ready`) runs untouched.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from enum import IntEnum
from typing import Any, Protocol

import torch
import torch.nn as nn

from ..parse import DISK, FLOAT8
from ..reads import host_aligned
from .disk import DiskTensor
from .host import HostArena, nbytes_of
from .settings import VramSettings


class LayerOwner(Protocol):
    """What a Layer asks of the VramManager that owns it (manager.py builds the layers; this
    module does not import it back)."""

    settings: VramSettings
    meter: Any  # the memory meter of the manager's options
    model_name: str
    cuda: bool
    prefetcher: Any  # a prefetch.Prefetcher, or None

    def room_for(self, nbytes: int) -> bool: ...


class State(IntEnum):
    OFFLOAD = 0
    ONLOAD = 1
    PREPARED = 2
    COMPUTATION = 3  # not a storage state: the place a forward runs in

    @property
    def label(self) -> str:
        return "preparing" if self is State.PREPARED else self.name.lower()


Target = tuple[torch.dtype, "torch.device | None"]  # device None: on disk


def convert(t: torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """`t` in `dtype` on `device`, the cast done on the GPU side of a host/GPU copy (fewer bytes
    over PCIe when storage is narrower, and GPU casts are fast). Returns `t` itself when it is
    already there (a host tensor only when aligned: see reads.HOST_ALIGNMENT). Host-to-device
    copies are asynchronous (safe: pageable sources are staged before the call returns, pinned
    ones are never freed while in use)."""
    if t.device == device:
        return host_aligned(t if t.dtype == dtype else t.to(dtype))
    if device.type == "cuda" and t.device.type == "cpu":
        t = t.to(device, non_blocking=True)
        return t if t.dtype == dtype else t.to(dtype)
    if t.device.type == "cuda" and device.type == "cpu":
        return (t if t.dtype == dtype else t.to(dtype)).to(device)
    return host_aligned(t.to(device=device, dtype=dtype))


@contextlib.contextmanager
def normal_mode() -> Iterator[None]:
    """State changes make ordinary tensors (not inference tensors), also inside an
    inference_mode call: a cold LoRA may later fuse into them."""
    with torch.inference_mode(False), torch.no_grad():
        yield


def storage_dtype(place_dtype: torch.dtype | None, original: torch.dtype, ndim: int, comp: torch.dtype) -> torch.dtype:
    """float8 storage applies to matrices and kernels; vectors (biases, norm scales: < 0.1% of
    the bytes) keep the computation dtype, where float8 would cost them their precision."""
    if place_dtype is None or not original.is_floating_point:
        return original  # disk keeps the file's dtype; integer tensors are never cast
    if place_dtype in FLOAT8 and ndim < 2:
        return comp
    return place_dtype


class Layer:
    """The direct parameters of one module and where they are stored."""

    __slots__ = ("manager", "name", "module", "names", "stored", "held", "disk", "placeholders", "targets",
                 "nbytes", "state", "ready", "version", "swapped", "read_disk", "preparable", "__weakref__")

    def __init__(self, manager: LayerOwner, name: str, module: nn.Module, disk: dict[str, DiskTensor] | None):
        self.manager, self.name, self.module = manager, name, module
        self.names = [n for n, p in module._parameters.items() if p is not None]
        self.stored: dict[str, nn.Parameter] = {n: module._parameters[n] for n in self.names}
        self.held: dict[str, nn.Parameter] | None = None  # the offload-state parameters while onloaded
        self.disk = disk
        self.placeholders: dict[str, nn.Parameter] = {}
        s = manager.settings
        self.targets: list[dict[str, Target]] = [self._targets_for(place, s.computation.dtype)
                                                 for place in (s.offload, s.onload, s.preparing, s.computation)]
        self.nbytes = [sum(nbytes_of(self.stored[n].shape, t[n][0]) for n in self.names) for t in self.targets]
        self.preparable = self.targets[State.PREPARED] != self.targets[State.ONLOAD]
        self.state = State.OFFLOAD
        self.version = 0
        self.swapped = False
        self.read_disk = False
        self.ready = False

    def _targets_for(self, place: Any, comp_dtype: torch.dtype) -> dict[str, Target]:
        target = {}
        for n in self.names:
            original = self.disk[n].dtype if self.disk is not None else self.stored[n].dtype
            target[n] = (storage_dtype(place.dtype, original, self.stored[n].ndim, comp_dtype), place.device)
        return target

    # -- placement ------------------------------------------------------------------------

    def _enter_state(self, state: State) -> None:
        self.state = state
        self.version += 1
        self.ready = self.targets[state] == self.targets[State.COMPUTATION]

    def _set(self, tensors: Mapping[str, torch.Tensor]) -> None:
        for n, t in tensors.items():
            p = t if isinstance(t, nn.Parameter) else nn.Parameter(t, requires_grad=False)
            self.stored[n] = p
            self.module._parameters[n] = p

    def on_disk(self, n: str, state: State | None = None) -> bool:
        return self.targets[self.state if state is None else state][n][1] is None

    def source(self, n: str) -> torch.Tensor:
        """The stored tensor of `n` (a view over the file when stored on disk)."""
        return self.disk[n].read() if self.on_disk(n) else self.stored[n]

    def _copy(self, n: str, src: torch.Tensor, target: Target, arena: HostArena | None,
              from_disk: bool) -> torch.Tensor:
        """`src` into the storage `target`, never keeping a view over the file as storage."""
        dtype, device = target
        if arena is not None and device.type == "cpu":
            out = arena.take(src.shape, dtype, self.describe(n))
            out.copy_(src)
        else:
            out = convert(src.detach(), dtype, device)
            if from_disk and out.data_ptr() == src.data_ptr():
                out = src.clone()
        if from_disk:
            self.disk[n].release()
        return out

    def _place(self, state: State, arena: HostArena | None) -> None:
        """Move every parameter from the current storage to the storage of `state`."""
        current, target = self.targets[self.state], self.targets[state]
        new = {}
        for n in self.names:
            if target[n][1] is None:  # to disk: nothing to copy
                new[n] = self._placeholder(n)
            elif current[n] != target[n]:
                new[n] = self._copy(n, self.source(n), target[n], arena, from_disk=self.on_disk(n))
        self._set(new)

    def describe(self, n: str) -> str:
        return f"{self.manager.model_name} parameter {f'{self.name}.{n}' if self.name else n!r}"

    def _placeholder(self, n: str) -> nn.Parameter:
        if n not in self.placeholders:
            d = self.disk[n]
            self.placeholders[n] = nn.Parameter(torch.empty(d.shape, dtype=d.dtype, device="meta"), requires_grad=False)
        return self.placeholders[n]

    def init_offload(self, arena: HostArena | None) -> None:
        """From the loaded tensors (or the file) to the offload storage."""
        target = self.targets[State.OFFLOAD]
        new = {}
        for n in self.names:
            if target[n][1] is None:
                new[n] = self._placeholder(n)
                continue
            current = self.stored[n].detach()
            if arena is None and (current.dtype, current.device) == target[n] and host_aligned(current) is current:
                continue  # zero copy (e.g. the loader's memory map of the file)
            src = self.disk[n].read() if self.disk is not None else current
            new[n] = self._copy(n, src, target[n], arena, from_disk=self.disk is not None)
        self._set(new)
        self._enter_state(State.OFFLOAD)

    def onload(self, arena: HostArena | None) -> None:
        if self.state != State.OFFLOAD:
            return
        self.held = dict(self.stored)
        self._place(State.ONLOAD, arena)
        self._enter_state(State.ONLOAD)

    def prepare(self) -> None:
        self._place(State.PREPARED, None)
        self.manager.meter.add(self.manager.settings.preparing.device, self.nbytes[State.PREPARED])
        self._enter_state(State.PREPARED)

    def offload(self) -> None:
        if self.state == State.OFFLOAD:
            return
        if self.state == State.PREPARED:
            self.manager.meter.add(self.manager.settings.preparing.device, -self.nbytes[State.PREPARED])
        self._set(self.held if self.held is not None else {n: self._placeholder(n) for n in self.names})
        self.held = None
        self._enter_state(State.OFFLOAD)

    # -- prefetch -------------------------------------------------------------------------

    def staging_bytes(self) -> int:
        """Bytes a prefetch copies for this layer (0: nothing to copy ahead)."""
        current, comp = self.targets[self.state], self.targets[State.COMPUTATION]
        moved = [n for n in self.names if (current[n][1] != comp[n][1] if self.manager.cuda else current[n] != comp[n])]
        return sum(nbytes_of(self.stored[n].shape, current[n][0]) for n in moved)

    def stage(self, stream: Any) -> dict[str, torch.Tensor]:
        """Copies for a coming forward: on CUDA the stored tensors on the computation device
        (cast later, on the main stream); elsewhere the computation tensors themselves."""
        current, comp = self.targets[self.state], self.targets[State.COMPUTATION]
        out = {}
        for n in self.names:
            if current[n] == comp[n]:
                continue
            src = self.source(n)
            dtype, device = comp[n]
            if stream is not None:
                out[n] = src.to(device, non_blocking=True) if current[n][1] != device else src
            else:
                out[n] = convert(src, dtype, device)
                if out[n] is src and current[n][1] is None:
                    out[n] = src.clone()
            if current[n][1] is None:
                self.disk[n].release()  # staged above (pageable copies are staged before returning)
        return out

    # -- forward --------------------------------------------------------------------------

    def run(self, forward: Any, *args: Any, **kwargs: Any) -> Any:
        """The forward wrapper (see pipelines.core.hooks)."""
        if self.ready:
            return forward(*args, **kwargs)
        try:
            self.enter()
            return forward(*args, **kwargs)
        finally:
            self.exit()

    def enter(self) -> None:
        m = self.manager
        if self.state == State.ONLOAD and self.preparable and m.room_for(self.nbytes[State.PREPARED]):
            with normal_mode():
                self.prepare()
            if self.ready:
                return
        staged = m.prefetcher.visit(self) if m.prefetcher is not None else None
        comp = self.targets[State.COMPUTATION]
        params = self.module._parameters
        self.read_disk = False
        self.swapped = True  # before the first swap: exit() restores whatever was swapped
        for n in self.names:
            if staged is not None and n in staged:
                t = staged[n]
            else:
                t = self.source(n)
                self.read_disk |= self.on_disk(n)
            params[n] = convert(t, *comp[n])

    def exit(self) -> None:
        if not self.swapped:
            return
        self.swapped = False
        params = self.module._parameters
        for n in self.names:
            params[n] = self.stored[n]
        if self.read_disk:
            self.read_disk = False
            for n in self.names:
                if self.on_disk(n):
                    self.disk[n].release()

    def placement(self) -> tuple[str, str]:
        """(state, "device/dtype" of the layer's largest tensor, or "disk")."""
        largest = max(self.names, key=lambda n: self.stored[n].numel())
        dtype, device = self.targets[self.state][largest]
        return self.state.label, DISK if device is None else f"{device}/{str(dtype).removeprefix('torch.')}"
