"""VramManager: the layers of one model, their storage, and the stage moves."""
from __future__ import annotations

import contextlib
import logging
import weakref
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..hooks import add_forward_wrapper, remove_forward_wrapper
from ..loader import load_model
from ..shards import expand_checkpoint_paths
from ..weight_access import register_weight_access
from .disk import DiskSource, all_safetensors, check_safetensors
from .host import HostArena, arena_size
from .layer import Layer, State, normal_mode
from .prefetch import Prefetcher
from .settings import GiB, VramConfigError, VramSettings

logger = logging.getLogger(__name__)

DEFAULT_PREFETCH_BYTES = 1 * GiB  # copied ahead of the running layer on the side stream
WRAPPER = "vram"  # the name of the forward wrapper (pipelines.core.hooks)


class MemoryMeter:
    """Device memory in use, for `vram_limit`: on CUDA the bytes PyTorch has allocated plus what
    other processes and contexts hold (measured when a model is onloaded); on other devices
    (tests) the bytes of the layers prepared there. One meter per pipeline: its models share
    the device and the limit."""

    def __init__(self) -> None:
        self.counted: dict[torch.device, int] = {}
        self.external: dict[torch.device, int] = {}

    def measure_external(self, device: torch.device) -> None:
        if device.type == "cuda":
            free, total = torch.cuda.mem_get_info(device)
            self.external[device] = max(total - free - torch.cuda.memory_reserved(device), 0)

    def used(self, device: torch.device) -> int:
        if device.type == "cuda":
            return torch.cuda.memory_allocated(device) + self.external.get(device, 0)
        return self.counted.get(device, 0)

    def add(self, device: torch.device, nbytes: int) -> None:
        if device.type != "cuda":
            self.counted[device] = self.counted.get(device, 0) + nbytes


@dataclass
class VramOptions:
    prefetch: bool | None = None  # None: on for a CUDA computation (elsewhere it only exercises the logic)
    prefetch_bytes: int = DEFAULT_PREFETCH_BYTES
    pin_host_memory: bool = True  # page-lock host storage that feeds a CUDA computation
    host_arenas: bool | None = None  # gather host storage in one buffer; None: where it is page-locked
    meter: MemoryMeter = field(default_factory=MemoryMeter)


_MANAGERS: "weakref.WeakKeyDictionary[nn.Module, VramManager]" = weakref.WeakKeyDictionary()


class VramManager:
    """VRAM management of one model: its layers, their storage and the stage moves. It also
    answers for the model's weights to outside code (pipelines.core.weight_access)."""

    def __init__(self, model: nn.Module, settings: VramSettings, source: DiskSource | None = None,
                 options: VramOptions | None = None):
        if model in _MANAGERS:
            raise ValueError(f"{type(model).__name__} is already VRAM-managed: change its settings by loading it "
                             "again with the new ones (from_pretrained / load_managed); use vram.manager_of(model) "
                             "to reach its manager.")
        if settings.uses_disk and source is None:
            raise VramConfigError(f"{type(model).__name__}: disk offload needs the model loaded from safetensors "
                                  "files (from_pretrained / load_managed), not a model in memory.")
        self.settings = settings
        self.options = options or VramOptions()
        self.meter = self.options.meter
        self.model_name = type(model).__name__
        self.cuda = settings.computation.device.type == "cuda"
        self.full = False  # a layer found no room below vram_limit during this stage
        self._onload_arena: HostArena | None = None
        self._arenas: list[HostArena] = []
        # registered before any arena exists: a pinned buffer is unregistered however init ends
        self._close_arenas = weakref.finalize(self, _close_all, self._arenas)
        self.layers = [Layer(self, name, module, disk) for name, module, disk in _own_parameters(model, settings,
                                                                                                 source)]
        self._init_storage(model)
        for attr, value in (("compute_dtype", settings.computation.dtype), ("compute_device",
                                                                            settings.computation.device)):
            if hasattr(model, attr):
                setattr(model, attr, value)
        prefetch = self.cuda if self.options.prefetch is None else self.options.prefetch
        self.prefetcher = Prefetcher(settings.computation.device, self.options.prefetch_bytes, self.cuda) \
            if prefetch else None
        for layer in self.layers:
            add_forward_wrapper(layer.module, WRAPPER, layer.run)
        self._model = weakref.ref(model)
        _MANAGERS[model] = self
        register_weight_access(model, self)
        logger.info("VRAM management of %s (%d layers): %s", self.model_name, len(self.layers), settings.describe())

    def _init_storage(self, model: nn.Module) -> None:
        comp = self.settings.computation.device
        with torch.no_grad(), normal_mode():
            try:
                arena = self._arena_for(State.OFFLOAD, persistent=True)
                for layer in self.layers:
                    layer.init_offload(arena)
            except BaseException:
                self._close_arenas()
                raise
            for module in model.modules():  # buffers (RoPE tables...) are small: they live where we compute
                for key, buffer in module._buffers.items():
                    if buffer is not None and buffer.device != comp:
                        module._buffers[key] = buffer.to(comp)

    def close(self) -> None:
        """Stop managing: offload, remove the forward wrappers and the weight-access entry (the
        model keeps its offload storage as ordinary parameters)."""
        self.offload()
        for layer in self.layers:
            remove_forward_wrapper(layer.module, WRAPPER)
        model = self._model()
        if model is not None:
            _MANAGERS.pop(model, None)
            register_weight_access(model, None)

    # -- stages -------------------------------------------------------------------------

    @property
    def state(self) -> State:
        """ONLOAD while any layer is out of its offload storage, else OFFLOAD (read from the
        layers, so it cannot disagree with them)."""
        return State.ONLOAD if any(layer.state != State.OFFLOAD for layer in self.layers) else State.OFFLOAD

    @torch.no_grad()
    def onload(self) -> None:
        """The stage that uses this model begins: layers to their onload storage. On an error
        midway every layer goes back to its offload storage before the error propagates."""
        if self.state == State.ONLOAD:
            return
        try:
            with normal_mode():
                self._onload_arena = self._arena_for(State.ONLOAD, persistent=False)
                for layer in self.layers:
                    layer.onload(self._onload_arena)
        except BaseException:
            self.offload()
            raise
        self.full = False
        self.meter.measure_external(self.settings.computation.device)

    @torch.no_grad()
    def offload(self) -> None:
        """The stage is over: layers back to their offload storage (prepared copies dropped).
        Every layer is visited (offloading one is idempotent), so a half-done onload is undone."""
        if self.prefetcher is not None:
            self.prefetcher.drop()
        with normal_mode():
            for layer in self.layers:
                layer.offload()
        if self._onload_arena is not None:
            self._onload_arena.close()
            self._arenas.remove(self._onload_arena)
            self._onload_arena = None

    def _arena_for(self, state: State, persistent: bool) -> HostArena | None:
        """One buffer for the host storage of `state`: page-locked when it feeds a CUDA
        computation. The onload storage always gets one (one allocation, handed back whole at
        offload: host memory really goes down); the offload storage only to be page-locked
        (else the loader's zero-copy map of the file is kept where the dtype matches)."""
        pin = self.cuda and self.options.pin_host_memory
        gather = pin if self.options.host_arenas is None else self.options.host_arenas
        if persistent and not gather:
            return None
        items = []
        for layer in self.layers:
            current, target = layer.targets[layer.state], layer.targets[state]
            for n in layer.names:
                dtype, device = target[n]
                if device is not None and device.type == "cpu" and (persistent or current[n] != target[n]):
                    items.append((layer.stored[n].shape, dtype))
        if not items:
            return None
        arena = HostArena(arena_size(items), pin=pin)
        self._arenas.append(arena)
        return arena

    # -- preparing ----------------------------------------------------------------------

    def room_for(self, nbytes: int) -> bool:
        if self.full:
            return False
        limit = self.settings.vram_limit
        if limit is None or self.meter.used(self.settings.preparing.device) + nbytes <= limit * GiB:
            return True
        self.full = True
        return False

    # -- introspection and options --------------------------------------------------------

    def placements(self) -> dict[str, tuple[str, str]]:
        """layer name -> (state, where its weights are: "cpu/float8_e4m3fn", "cuda:0/bfloat16", "disk")."""
        return {layer.name: layer.placement() for layer in self.layers}

    def stats(self) -> dict[str, Any]:
        prepared = [layer for layer in self.layers if layer.state == State.PREPARED]
        p = self.prefetcher
        return dict(layers=len(self.layers), prepared_layers=len(prepared),
                    prepared_gib=sum(layer.nbytes[State.PREPARED] for layer in prepared) / GiB,
                    prefetch_hits=p.hits if p else 0, prefetch_misses=p.misses if p else 0,
                    prefetch_resets=p.resets if p else 0,
                    pinned_gib=sum(a.pinned_bytes for a in self._arenas) / GiB)

    def set_prefetch(self, enabled: bool, prefetch_bytes: int | None = None) -> None:
        """Switch prefetching on or off (on a CPU computation device it only exercises the logic)."""
        if self.prefetcher is not None:
            self.prefetcher.drop()
        window = prefetch_bytes or (self.prefetcher.window if self.prefetcher else self.options.prefetch_bytes)
        self.prefetcher = Prefetcher(self.settings.computation.device, window, self.cuda) if enabled else None

    # -- weight access (pipelines.core.weight_access) ------------------------------------

    @contextlib.contextmanager
    def computation_view(self) -> Iterator[None]:
        """Within: each managed parameter reads as an empty tensor of its computation dtype on
        the computation device (shapes kept), so code that sizes or places things after the
        weights (hot LoRA's A and B) places them where the forward runs."""
        swapped = []
        try:
            for layer in self.layers:
                for n in layer.names:
                    dtype, device = layer.targets[State.COMPUTATION][n]
                    layer.module._parameters[n] = torch.empty((), dtype=dtype, device=device).expand(
                        layer.stored[n].shape)
                    swapped.append(layer)
            yield
        finally:
            for layer in dict.fromkeys(swapped):
                for n in layer.names:
                    layer.module._parameters[n] = layer.stored[n]

    @contextlib.contextmanager
    def editable(self) -> Iterator[None]:
        """Within: the parameters are the offload storage (the model is offloaded first, so no
        change lands in a temporary onload copy); impossible when that storage is the file."""
        if self.settings.uses_disk:
            raise VramConfigError(
                f"{self.model_name} is offloaded to disk: its weights stay in their files and cannot be changed in "
                "place, so a cold LoRA cannot be fused into them. Load the LoRA hot (hot=True; the pipeline's "
                "hotload=None picks it for VRAM-managed models).")
        self.offload()
        yield


def _own_parameters(model: nn.Module, settings: VramSettings,
                    source: DiskSource | None) -> Iterator[tuple[str, nn.Module, dict | None]]:
    """(name, module, where its parameters lie on disk) for every module with parameters of its own."""
    seen: dict[int, str] = {}
    name_of_model = type(model).__name__
    for name, module in model.named_modules():
        own = [(n, p) for n, p in module._parameters.items() if p is not None]
        if not own:
            continue
        for n, p in own:
            if id(p) in seen:
                raise ValueError(f"{name_of_model}: parameter {name}.{n} is shared with {seen[id(p)]}; VRAM "
                                 "management needs every parameter to belong to one module. Untie them (give "
                                 f"{name}.{n} its own copy: nn.Parameter(p.clone())) before enabling VRAM "
                                 "management, or load this model without offload_*.")
            seen[id(p)] = f"{name}.{n}"
        yield name, module, _disk_of(name, own, settings, source, name_of_model)


def _disk_of(name: str, own: list, settings: VramSettings, source: DiskSource | None, model_name: str) -> dict | None:
    if source is None:
        return None
    disk = {}
    for n, _ in own:
        key = f"{name}.{n}" if name else n
        if key not in source.tensors:
            if settings.uses_disk:
                raise VramConfigError(f"{model_name}: parameter {key!r} is not in the safetensors files, so it "
                                      "cannot stay on disk. Offload to the cpu instead (offload_device='cpu', no "
                                      "'disk' in onload_*), or use a checkpoint that holds every parameter.")
            return None
        disk[n] = source.tensors[key]
    return disk


def _close_all(arenas: list[HostArena]) -> None:
    for arena in arenas:
        arena.close()


# ============================================================================ entry points


def enable_vram_management(model: nn.Module, settings: VramSettings, source: DiskSource | None = None,
                           options: VramOptions | None = None) -> VramManager:
    """Manage a model already in memory (or loaded by `load_managed`); returns its manager."""
    return VramManager(model, settings, source, options)


def load_managed(paths: Sequence[Path], candidates: Sequence[type], settings: VramSettings,
                 options: VramOptions | None = None) -> nn.Module:
    """Load a checkpoint straight into VRAM management: the loader builds the model over a
    memory map of the files (no copy), then each tensor goes to its offload storage."""
    files = expand_checkpoint_paths([Path(p) for p in paths])
    if settings.uses_disk:
        check_safetensors(files)
    model = load_model(files, candidates, None, "cpu")  # None: the files' dtypes, views over the files
    source = DiskSource.from_files(files, type(model)) if all_safetensors(files) else None
    enable_vram_management(model, settings, source, options)
    return model


def manager_of(model: Any) -> VramManager | None:
    return _MANAGERS.get(model) if isinstance(model, nn.Module) else None


def use_stage(managers: Mapping[str, VramManager], active: str | None,
              stages: Mapping[str, str] | None = None) -> None:
    """Offload every managed model not of stage `active`, then onload those of it (None: offload
    all). `stages`: a model's stage by its key in `managers` (default: the key itself)."""
    stage = {key: (stages or {}).get(key, key) for key in managers}
    for key, manager in managers.items():
        if stage[key] != active:
            manager.offload()
    for key, manager in managers.items():
        if active is not None and stage[key] == active:
            manager.onload()


def offload_model(model: Any) -> None:
    manager = manager_of(model)
    if manager is not None:
        manager.offload()
