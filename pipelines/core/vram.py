"""VRAM management: keep each layer's weights where they are stored, compute where asked.

A VRAM-managed model (REFERENCE.md section 1) has four places for its weights, each a dtype
and a device (or "disk"):

    offload      where the weights wait while the pipeline stage does not use the model
    onload       where they are when the stage that uses the model begins
    preparing    where a layer moves on its first forward and stays, while the device memory
                 in use is below `vram_limit` (GiB; None = no limit)
    computation  the dtype/device each forward runs in; a layer stored elsewhere gets a
                 temporary copy for its forward, dropped right after

Unset keys fall back to the computation values. "disk" (offload and onload only) leaves the
weights in their safetensors files: a layer stored there is read (memory-mapped) when needed
and its pages are handed back after use, so host memory does not grow over the steps.

Mechanism: every module with parameters of its own (Linear, Conv, Embedding, norms, ...) gets
its `forward` wrapped from outside (`module.forward` is an instance attribute; the model code
and its state-dict names are untouched). The wrapper swaps the computation copies into the
module's parameter slots, calls the module's own forward, and swaps the stored parameters
back, so hooks (hot LoRA) and modules with unusual forwards (the VAE's causal convolutions)
compose. A layer already stored in the computation place runs with a one-branch fast path.

Storage rules:
- float8 storage (`float8_e4m3fn`, `float8_e5m2`) applies to weight matrices and kernels
  (ndim >= 2); vectors (biases, norm scales, < 0.1% of the bytes) stay in the computation
  dtype, where FP8 would cost them their precision. The cast is a plain one, as the anchor's.
- Host (CPU) storage that feeds a CUDA computation is gathered in one page-locked arena per
  model (cudaHostRegister, no power-of-two rounding), so copies to the GPU run asynchronously
  at full PCIe speed; when registering fails the copies are ordinary (slower, still correct).

Prefetch (CUDA computation): the manager records the order in which layers that need a copy
run (one forward, or one cycle of layer calls for models without a root forward such as the
VAE) and, while one layer computes, copies the next layers' weights on a side CUDA stream, up
to `prefetch_bytes` ahead. A layer that runs out of the recorded order makes the manager drop
what it copied ahead and record again. On a CPU computation device nothing is prefetched
unless asked (tests use it to check the bookkeeping).

Memory in use for `vram_limit`: on CUDA, the bytes PyTorch has allocated on the device plus
what other processes and contexts hold (measured when the model is onloaded); on other devices
(tests), the bytes of prepared layers on that device.
"""
from __future__ import annotations

import contextlib
import logging
import os
import weakref
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .loader import (SAFETENSORS_SUFFIXES, MappedFile, expand_checkpoint_paths, host_aligned, load_model,
                     read_header)
from .model_config import VRAM_KEYS

logger = logging.getLogger(__name__)

__all__ = [
    "DISK", "GiB", "VramConfigError", "Place", "VramSettings", "VramManager", "DiskSource",
    "parse_dtype", "parse_device", "settings_for", "resolve_vram_limit", "load_managed",
    "enable_vram_management", "manager_of", "use_stage", "offload_model",
]

DISK = "disk"
GiB = 1 << 30
FLOAT8 = (torch.float8_e4m3fn, torch.float8_e5m2)
COMPUTE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
AUTO_MARGIN_GIB = 3.0  # vram_limit="auto": total device memory minus this (activations, prefetch)
DEFAULT_PREFETCH_BYTES = 1 * GiB  # copied ahead of the running layer on the side stream
PIN_HOST_MEMORY = True  # page-lock host storage that feeds a CUDA computation
PIN_MAX_FRACTION = 0.6  # of physical memory, over all arenas of the process
ARENA_ALIGN = 512
_ARENAS_WITHOUT_CUDA = False  # tests: gather host storage in arenas on a CPU computation device too

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "float64": torch.float64, "fp64": torch.float64, "double": torch.float64,
    "float8_e4m3fn": torch.float8_e4m3fn, "fp8": torch.float8_e4m3fn, "float8": torch.float8_e4m3fn,
    "fp8_e4m3fn": torch.float8_e4m3fn, "float8_e5m2": torch.float8_e5m2, "fp8_e5m2": torch.float8_e5m2,
}
_STATES = ("offload", "onload", "preparing", "computation")
OFFLOAD, ONLOAD, PREPARED, COMPUTE = range(4)


class VramConfigError(ValueError):
    """Bad VRAM settings; the message names the key, the value and the fix."""


# ============================================================================ settings


def parse_dtype(value: Any, key: str = "dtype") -> torch.dtype | str:
    """A torch.dtype, a name ("bfloat16", "bf16", "float8_e4m3fn", "torch.float16", ...) or
    "disk" -> torch.dtype or DISK."""
    if isinstance(value, torch.dtype):
        return value
    if isinstance(value, str):
        name = value.strip().lower().removeprefix("torch.")
        if name == DISK:
            return DISK
        if name in _DTYPES:
            return _DTYPES[name]
    known = "float32, bfloat16, float16, float8_e4m3fn, float8_e5m2 (or a torch.dtype), disk"
    raise VramConfigError(f"{key}={value!r} is not a dtype this library knows: use one of {known}.")


def parse_device(value: Any, key: str = "device") -> torch.device | str:
    """A torch.device or a name ("cpu", "cuda", "cuda:1", "disk") -> torch.device (cuda with
    its index) or DISK; the device must exist on this machine."""
    if isinstance(value, str) and value.strip().lower() == DISK:
        return DISK
    try:
        device = torch.device(value)
    except (RuntimeError, TypeError, ValueError):
        raise VramConfigError(f"{key}={value!r} is not a device: use cpu, cuda, cuda:N or disk.") from None
    if device.type == "meta":
        raise VramConfigError(f"{key}='meta': the meta device holds no data. Use 'disk' to keep weights out "
                              "of memory (they are read from their safetensors files when needed).")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise VramConfigError(f"{key}={value!r} but CUDA is not available on this machine: use cpu or disk.")
        index = torch.cuda.current_device() if device.index is None else device.index
        if index >= torch.cuda.device_count():
            count = torch.cuda.device_count()
            raise VramConfigError(f"{key}={value!r}: this machine has {count} CUDA device(s); use one of cpu, disk, "
                                  f"cuda, {', '.join(f'cuda:{i}' for i in range(count))}.")
        return torch.device("cuda", index)
    if device.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise VramConfigError(f"{key}={value!r} but MPS is not available on this machine.")
    if device.type not in ("cpu", "cuda", "mps", "xpu"):
        raise VramConfigError(f"{key}={value!r}: unsupported device type {device.type!r}; use cpu, cuda or disk.")
    return device


@dataclass(frozen=True)
class Place:
    """A storage place: dtype and device; both None for "disk" (the dtype is the file's)."""

    dtype: torch.dtype | None
    device: torch.device | None

    @property
    def is_disk(self) -> bool:
        return self.device is None

    def __str__(self) -> str:
        return DISK if self.is_disk else f"{self.device}/{str(self.dtype).removeprefix('torch.')}"


DISK_PLACE = Place(None, None)


@dataclass(frozen=True)
class VramSettings:
    """The four places of a managed model and the pipeline's vram_limit (GiB, None = none)."""

    offload: Place
    onload: Place
    preparing: Place
    computation: Place
    vram_limit: float | None = None

    @classmethod
    def from_keys(cls, keys: Mapping[str, Any], torch_dtype: torch.dtype, device: Any,
                  vram_limit: float | None = None, where: str = "ModelConfig") -> "VramSettings":
        """Resolve the eight keys (any may be missing or None) against the computation
        defaults `torch_dtype`/`device`; every error names `where` and the key."""
        unknown = set(keys) - set(VRAM_KEYS)
        if unknown:
            raise VramConfigError(f"{where}: unknown VRAM key(s) {sorted(unknown)}; the keys are "
                                  f"{', '.join(VRAM_KEYS)}.")
        get = keys.get
        comp_dtype = parse_dtype(get("computation_dtype") if get("computation_dtype") is not None else torch_dtype,
                                 f"{where}: computation_dtype")
        comp_device = parse_device(get("computation_device") if get("computation_device") is not None else device,
                                   f"{where}: computation_device")
        if comp_dtype == DISK or comp_device == DISK:
            raise VramConfigError(f"{where}: computation_dtype/device cannot be 'disk': a layer computes on a "
                                  "device. Use disk for offload_* (and onload_*).")
        if comp_dtype not in COMPUTE_DTYPES:
            raise VramConfigError(
                f"{where}: computation_dtype={comp_dtype} cannot run a forward; float8 is a storage dtype. "
                "Compute in bfloat16, float16 or float32 (and store in float8 with offload/onload/preparing_dtype).")
        computation = Place(comp_dtype, comp_device)
        places = {}
        for state in _STATES[:3]:
            dtype_key, device_key = f"{state}_dtype", f"{state}_device"
            dtype = None if get(dtype_key) is None else parse_dtype(get(dtype_key), f"{where}: {dtype_key}")
            dev = None if get(device_key) is None else parse_device(get(device_key), f"{where}: {device_key}")
            if DISK in (dtype, dev):
                if state == "preparing":
                    raise VramConfigError(f"{where}: preparing_* cannot be 'disk': preparing is where a layer stays "
                                          "resident once it has run (e.g. the GPU).")
                if dtype not in (None, DISK) or dev not in (None, DISK):
                    raise VramConfigError(
                        f"{where}: {dtype_key}={get(dtype_key)!r} with {device_key}={get(device_key)!r}: weights left "
                        f"on disk keep the file's dtype; set both {dtype_key} and {device_key} to 'disk'.")
                places[state] = DISK_PLACE
            else:
                places[state] = Place(dtype or comp_dtype, dev or comp_device)
        if places["onload"].is_disk and not places["offload"].is_disk:
            raise VramConfigError(f"{where}: onload 'disk' needs offload 'disk' too (weights stay in their file only "
                                  "if they were never taken out of it).")
        for state, place in places.items():
            if not place.is_disk and place.dtype in FLOAT8:
                _check_float8_storage(place.dtype, place.device, f"{where}: {state}_dtype")
        return cls(places["offload"], places["onload"], places["preparing"], computation,
                   _check_limit(vram_limit))

    @property
    def uses_disk(self) -> bool:
        return self.offload.is_disk

    def describe(self) -> str:
        limit = "none" if self.vram_limit is None else f"{self.vram_limit:g} GiB"
        return (f"offload {self.offload}, onload {self.onload}, preparing {self.preparing}, "
                f"computation {self.computation}, vram_limit {limit}")


def _probe_float8(dtype: torch.dtype, device: torch.device) -> None:
    """Store and read back a float8 value on `device` (raises where it cannot)."""
    torch.ones(2, device=device).to(dtype).to(torch.float32).sum().item()


def _check_float8_storage(dtype: torch.dtype, device: torch.device, key: str) -> None:
    try:
        _probe_float8(dtype, device)
    except Exception as error:  # the backends raise various types
        raise VramConfigError(
            f"{key}={str(dtype).removeprefix('torch.')}: the device {device} cannot store float8 "
            f"({type(error).__name__}: {error}). Store in bfloat16/float16 there, or keep float8 weights on the cpu."
        ) from error


def _check_limit(vram_limit: Any) -> float | None:
    if vram_limit is None:
        return None
    if isinstance(vram_limit, bool) or not isinstance(vram_limit, (int, float)) or vram_limit < 0:
        raise VramConfigError(f"vram_limit={vram_limit!r}: give GiB of device memory (a number >= 0), "
                              "'auto', or None for no limit, in from_pretrained(vram_limit=...) or the config key "
                              "`vram.vram_limit`.")
    return float(vram_limit)


def resolve_vram_limit(vram_limit: Any, device: Any, margin_gib: float = AUTO_MARGIN_GIB) -> float | None:
    """`vram_limit` as GiB: a number as is, None as None, "auto" = the device's total memory
    minus `margin_gib` (None on a device without memory statistics, e.g. the cpu)."""
    if isinstance(vram_limit, str):
        if vram_limit.strip().lower() != "auto":
            raise VramConfigError(f"vram_limit={vram_limit!r}: give GiB (a number), 'auto' or None, in "
                                  "from_pretrained(vram_limit=...) or the config key `vram.vram_limit`.")
        device = torch.device(device)
        if device.type != "cuda" or not torch.cuda.is_available():
            logger.info("vram_limit='auto' on %s: no limit (only CUDA devices report their memory)", device)
            return None
        total = torch.cuda.mem_get_info(device)[1] / GiB
        limit = max(total - margin_gib, 0.0)
        logger.info("vram_limit='auto': %.2f GiB (%.2f GiB on %s minus a %.1f GiB margin)", limit, total, device,
                    margin_gib)
        return limit
    return _check_limit(vram_limit)


def settings_for(config: Any, torch_dtype: torch.dtype, device: Any, vram_limit: float | None) -> VramSettings | None:
    """The VramSettings of a ModelConfig, or None when it asks for no VRAM management."""
    keys = config.vram_settings()
    if not keys:
        return None
    if not config.vram_managed:
        raise VramConfigError(
            f"ModelConfig({config.describe()}) sets {', '.join(sorted(keys))} but neither offload_dtype nor "
            "offload_device: VRAM management is enabled by offload_*. Add them (e.g. offload_device='cpu'), or "
            "remove the other keys.")
    settings = VramSettings.from_keys(keys, torch_dtype, device, vram_limit, where=f"ModelConfig({config.describe()})")
    pipeline_device = parse_device(device, "device")
    if settings.computation.device != pipeline_device:
        raise VramConfigError(
            f"ModelConfig({config.describe()}): computation_device={settings.computation.device} differs from the "
            f"pipeline's device {pipeline_device}; the pipeline hands every model its inputs there. Leave "
            "computation_device unset.")
    return settings


# ============================================================================ disk


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
    """Where each parameter of a model lies in its safetensors files."""

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


def check_safetensors(files: Sequence[Path]) -> None:
    other = [str(p) for p in files if p.suffix not in SAFETENSORS_SUFFIXES]
    if other:
        raise VramConfigError(
            f"disk offload needs .safetensors files (their tensors are read in place), but got "
            f"{', '.join(other[:4])}{' ...' if len(other) > 4 else ''}. Convert them to safetensors "
            "(safetensors.torch.save_file), or offload to the cpu instead (offload_device='cpu').")


# ============================================================================ host arenas


_PINNED_BYTES = 0


class _HostArena:
    """One CPU buffer handing out aligned tensors; page-locked for CUDA when `pin`."""

    def __init__(self, nbytes: int, pin: bool):
        global _PINNED_BYTES
        self.buffer = torch.empty(max(nbytes, 1), dtype=torch.uint8)
        self.used = 0
        self.pinned = False
        if pin and nbytes > 0:
            if _PINNED_BYTES + nbytes > PIN_MAX_FRACTION * _physical_memory():
                logger.warning("Not page-locking %.1f GiB of host storage (the process already holds %.1f GiB, "
                               "the cap is %.0f%% of memory): copies to the GPU will be slower.",
                               nbytes / GiB, _PINNED_BYTES / GiB, PIN_MAX_FRACTION * 100)
            else:
                code = int(torch.cuda.cudart().cudaHostRegister(self.buffer.data_ptr(), nbytes, 0))
                if code == 0:
                    self.pinned = True
                    _PINNED_BYTES += nbytes
                    self.nbytes = nbytes
                else:
                    _reset_cuda_error()
                    logger.warning("cudaHostRegister of %.1f GiB failed (error %d): copies to the GPU will be "
                                   "slower.", nbytes / GiB, code)

    def take(self, shape: Sequence[int], dtype: torch.dtype, what: str = "a tensor") -> torch.Tensor:
        """Room for `what` (its name, for the error message)."""
        size = _nbytes(shape, dtype)
        start = -(-self.used // ARENA_ALIGN) * ARENA_ALIGN
        self.used = start + size
        if self.used > self.buffer.numel():
            raise RuntimeError(
                f"internal error: the host buffer ({self.buffer.numel()} bytes) has no room for {what} "
                f"({list(shape)}, {str(dtype).removeprefix('torch.')}); its size was computed for other storage. "
                "This is a bug: please report it with the model's VRAM settings. Offloading that model to the "
                "GPU or to disk avoids the buffer.")
        return self.buffer[start:start + size].view(dtype).view(tuple(shape))

    def close(self) -> None:
        """Unregister (after the device finished reading it); the memory itself goes when the
        last tensor using it does."""
        global _PINNED_BYTES
        if self.pinned:
            self.pinned = False
            _PINNED_BYTES -= self.nbytes
            try:
                torch.cuda.synchronize()
                torch.cuda.cudart().cudaHostUnregister(self.buffer.data_ptr())
            except Exception:  # interpreter shutdown
                pass


def _reset_cuda_error() -> None:
    """A failed CUDA runtime call stays this thread's "last error", which PyTorch's check after
    its next kernel launch would raise in unrelated code. torch exposes no cudaGetLastError
    (and a ctypes handle may reach another copy of the runtime), so launch a tiny kernel: its
    check reads the error, which resets it, and raises it here, where it is expected."""
    with contextlib.suppress(RuntimeError):
        torch.zeros(1, device="cuda")


def _physical_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 1 << 62


def _nbytes(shape: Sequence[int], dtype: torch.dtype) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n * dtype.itemsize


def _arena_size(items: Sequence[tuple[Sequence[int], torch.dtype]]) -> int:
    return sum(-(-_nbytes(s, d) // ARENA_ALIGN) * ARENA_ALIGN for s, d in items) + ARENA_ALIGN


# ============================================================================ moving tensors


def _convert(t: torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """`t` in `dtype` on `device`, the cast done on the GPU side of a host/GPU copy (fewer bytes
    over PCIe when storage is narrower, and GPU casts are fast). Returns `t` itself when it is
    already there (a host tensor only when aligned: see loader.HOST_ALIGNMENT). Host-to-device
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
def _normal_mode() -> Iterator[None]:
    """State changes make ordinary tensors (not inference tensors), also inside an
    inference_mode call: a cold LoRA may later fuse into them."""
    with torch.inference_mode(False), torch.no_grad():
        yield


# ============================================================================ layers


class _Layer:
    """The direct parameters of one module and where they are stored."""

    __slots__ = ("manager", "name", "module", "names", "stored", "held", "disk", "placeholders", "targets",
                 "nbytes", "state", "ready", "version", "swapped", "read_disk", "preparable", "__weakref__")

    def __init__(self, manager: "VramManager", name: str, module: nn.Module, disk: dict[str, DiskTensor] | None):
        self.manager, self.name, self.module = manager, name, module
        self.names = [n for n, p in module._parameters.items() if p is not None]
        self.stored: dict[str, nn.Parameter] = {n: module._parameters[n] for n in self.names}
        self.held: dict[str, nn.Parameter] | None = None  # the offload-state parameters while onloaded
        self.disk = disk
        self.placeholders = None
        s = manager.settings
        comp_dtype = s.computation.dtype
        self.targets: list[dict[str, tuple[torch.dtype, torch.device | None]]] = []
        for place in (s.offload, s.onload, s.preparing, s.computation):
            target = {}
            for n in self.names:
                original = disk[n].dtype if disk is not None else self.stored[n].dtype
                ndim = self.stored[n].ndim
                target[n] = (_storage_dtype(place.dtype, original, ndim, comp_dtype), place.device)
            self.targets.append(target)
        self.nbytes = [sum(_nbytes(self.stored[n].shape, t[n][0]) for n in self.names) for t in self.targets]
        self.preparable = self.targets[PREPARED] != self.targets[ONLOAD]
        self.state = OFFLOAD
        self.version = 0
        self.swapped = False
        self.read_disk = False
        self.ready = False

    # -- placement ------------------------------------------------------------------------

    def _update(self) -> None:
        self.version += 1
        self.ready = self.targets[self.state] == self.targets[COMPUTE]

    def _set(self, tensors: Mapping[str, torch.Tensor]) -> None:
        for n, t in tensors.items():
            p = t if isinstance(t, nn.Parameter) else nn.Parameter(t, requires_grad=False)
            self.stored[n] = p
            self.module._parameters[n] = p

    def _source(self, n: str) -> torch.Tensor:
        """The stored tensor of `n` (a view over the file when stored on disk)."""
        if self.targets[self.state][n][1] is None:
            return self.disk[n].read()
        return self.stored[n]

    def _place(self, state: int, arena: _HostArena | None) -> None:
        """Move every parameter from the current storage to the storage of `state`."""
        current, target = self.targets[self.state], self.targets[state]
        new = {}
        for n in self.names:
            dtype, device = target[n]
            if device is None:  # to disk: nothing to copy
                new[n] = self._placeholder(n)
                continue
            if current[n] == target[n]:
                continue
            from_disk = current[n][1] is None
            src = self._source(n)
            if arena is not None and device.type == "cpu":
                out = arena.take(src.shape, dtype, self._what(n))
                out.copy_(src)
            else:
                out = _convert(src.detach(), dtype, device)
                if from_disk and out is src:  # keep no view over the file as storage
                    out = src.clone()
            if from_disk:
                self.disk[n].release()
            new[n] = out
        self._set(new)

    def _what(self, n: str) -> str:
        return f"{self.manager.model_name} parameter {f'{self.name}.{n}' if self.name else n!r}"

    def _placeholder(self, n: str) -> nn.Parameter:
        if self.placeholders is None:
            self.placeholders = {}
        if n not in self.placeholders:
            d = self.disk[n]
            self.placeholders[n] = nn.Parameter(torch.empty(d.shape, dtype=d.dtype, device="meta"), requires_grad=False)
        return self.placeholders[n]

    def init_offload(self, arena: _HostArena | None) -> None:
        """From the loaded tensors (or the file) to the offload storage."""
        target = self.targets[OFFLOAD]
        new = {}
        for n in self.names:
            dtype, device = target[n]
            if device is None:
                new[n] = self._placeholder(n)
                continue
            current = self.stored[n].detach()
            if arena is None and current.device == device and current.dtype == dtype \
                    and host_aligned(current) is current:
                continue  # zero-copy (e.g. the loader's memory map of the file)
            src = self.disk[n].read() if self.disk is not None else current
            if arena is not None and device.type == "cpu":
                out = arena.take(src.shape, dtype, self._what(n))
                out.copy_(src)
            else:
                out = _convert(src, dtype, device)
                if out.data_ptr() == src.data_ptr() and self.disk is not None:
                    out = src.clone()
            if self.disk is not None:
                self.disk[n].release()
            new[n] = out
        self._set(new)
        self.state = OFFLOAD
        self._update()

    def onload(self, arena: _HostArena | None) -> None:
        if self.state != OFFLOAD:
            return
        self.held = dict(self.stored)
        self._place(ONLOAD, arena)
        self.state = ONLOAD
        self._update()

    def prepare(self) -> None:
        self._place(PREPARED, None)
        self.state = PREPARED
        self.manager._count_prepared(self, +1)
        self._update()

    def offload(self) -> None:
        if self.state == OFFLOAD:
            return
        if self.state == PREPARED:
            self.manager._count_prepared(self, -1)
        if self.held is not None:
            self._set(self.held)
        else:
            self._set({n: self._placeholder(n) for n in self.names})
        self.held = None
        self.state = OFFLOAD
        self._update()

    def staging_bytes(self) -> int:
        """Bytes a prefetch copies for this layer (0: nothing to copy ahead)."""
        current, comp = self.targets[self.state], self.targets[COMPUTE]
        if self.manager.cuda:
            return sum(_nbytes(self.stored[n].shape, current[n][0]) for n in self.names if current[n][1] != comp[n][1])
        return sum(_nbytes(self.stored[n].shape, current[n][0]) for n in self.names if current[n] != comp[n])

    def stage(self, stream: Any) -> dict[str, torch.Tensor]:
        """Copies for a coming forward: on CUDA the stored tensors on the computation device
        (cast later, on the main stream); elsewhere the computation tensors themselves."""
        current, comp = self.targets[self.state], self.targets[COMPUTE]
        out = {}
        for n in self.names:
            if current[n] == comp[n]:
                continue
            src = self._source(n)
            dtype, device = comp[n]
            if stream is not None:
                out[n] = src.to(device, non_blocking=True) if current[n][1] != device else src
            else:
                out[n] = _convert(src, dtype, device)
                if out[n] is src and current[n][1] is None:
                    out[n] = src.clone()
            if current[n][1] is None:
                self.disk[n].release()  # staged above (pageable copies are staged before returning)
        return out

    # -- forward ------------------------------------------------------------------------

    def enter(self) -> None:
        m = self.manager
        if self.state == ONLOAD and self.preparable and m._room_for(self.nbytes[PREPARED]):
            with _normal_mode():
                self.prepare()
            if self.ready:
                return
        staged = m.prefetcher.visit(self) if m.prefetcher is not None else None
        comp = self.targets[COMPUTE]
        params = self.module._parameters
        self.read_disk = False
        self.swapped = True  # before the first swap: exit() restores whatever was swapped
        for n in self.names:
            dtype, device = comp[n]
            if staged is not None and n in staged:
                t = staged[n]
            else:
                t = self._source(n)
                if self.targets[self.state][n][1] is None:
                    self.read_disk = True
            params[n] = _convert(t, dtype, device)

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
                if self.targets[self.state][n][1] is None:
                    self.disk[n].release()

    def placement(self) -> tuple[str, str]:
        """(state, "device/dtype" of the layer's largest tensor, or "disk")."""
        largest = max(self.names, key=lambda n: self.stored[n].numel())
        dtype, device = self.targets[self.state][largest]
        return _STATES[self.state], DISK if device is None else f"{device}/{str(dtype).removeprefix('torch.')}"


def _storage_dtype(place_dtype: torch.dtype | None, original: torch.dtype, ndim: int, comp: torch.dtype) -> torch.dtype:
    if place_dtype is None or not original.is_floating_point:
        return original  # disk keeps the file's dtype; integer tensors are never cast
    if place_dtype in FLOAT8 and ndim < 2:
        return comp  # vectors keep their precision (see the module docstring)
    return place_dtype


def _install(layer: _Layer) -> None:
    original = layer.module.forward

    def forward(*args: Any, **kwargs: Any) -> Any:
        if layer.ready:
            return original(*args, **kwargs)
        try:
            layer.enter()
            return original(*args, **kwargs)
        finally:
            layer.exit()

    forward.__wrapped__ = original  # type: ignore[attr-defined]
    layer.module.forward = forward


# ============================================================================ prefetch


@dataclass
class _Staged:
    tensors: dict[str, torch.Tensor]
    event: Any
    nbytes: int
    version: int


class _Prefetcher:
    """Copies the next layers' weights while the current one computes (see the module docstring)."""

    def __init__(self, device: torch.device, window_bytes: int, cuda: bool):
        self.device = device
        self.window = window_bytes
        self.stream = torch.cuda.Stream(device) if cuda else None
        self.order: list[_Layer] = []
        self.recording = True
        self.cursor = 0  # absolute position of the next expected layer (order index = cursor % len)
        self.next_issue = 0
        self.staged: dict[int, _Staged] = {}
        self.inflight = 0
        self.hits = self.misses = self.resets = 0

    def visit(self, layer: _Layer) -> dict[str, torch.Tensor] | None:
        """`layer` is about to run: its staged copies (None: copy it now)."""
        if self.recording:
            if self.order and layer is self.order[0]:  # the cycle closed: predict from now on
                self.recording = False
                self.cursor = self.next_issue = 1
                self._issue()
            else:
                self.order.append(layer)
            self.misses += 1
            return None
        if self.order[self.cursor % len(self.order)] is not layer:
            self.reset(layer)
            self.misses += 1
            return None
        staged = self.staged.pop(self.cursor, None)
        self.cursor += 1
        self.next_issue = max(self.next_issue, self.cursor)
        tensors = None
        if staged is not None:
            self.inflight -= staged.nbytes
            if staged.version == layer.version:
                tensors = staged.tensors
                if staged.event is not None:
                    main = torch.cuda.current_stream(self.device)
                    main.wait_event(staged.event)
                    for t in tensors.values():
                        t.record_stream(main)
        self.hits += tensors is not None
        self.misses += tensors is None
        self._issue()
        return tensors

    def _issue(self) -> None:
        n = len(self.order)
        while self.next_issue < self.cursor + n:
            layer = self.order[self.next_issue % n]
            nbytes = layer.staging_bytes()
            if nbytes and self.inflight and self.inflight + nbytes > self.window:
                break
            if nbytes:
                if self.stream is not None:
                    with torch.cuda.stream(self.stream):
                        tensors = layer.stage(self.stream)
                        event = torch.cuda.Event()
                        event.record(self.stream)
                else:
                    tensors, event = layer.stage(None), None
                self.staged[self.next_issue] = _Staged(tensors, event, nbytes, layer.version)
                self.inflight += nbytes
            self.next_issue += 1

    def drop(self) -> None:
        """Forget what was copied ahead (keeps the recorded order)."""
        if self.stream is not None and self.staged:
            self.stream.synchronize()
        self.staged.clear()
        self.inflight = 0
        if not self.recording:  # still expect the layer that comes next in the cycle
            self.cursor = self.next_issue = self.cursor % len(self.order)

    def reset(self, first: _Layer | None = None) -> None:
        """Record the order again, starting with `first`."""
        self.drop()
        self.resets += 1
        self.order = [first] if first is not None else []
        self.recording = True
        self.cursor = self.next_issue = 0


# ============================================================================ the manager


_MANAGERS: "weakref.WeakKeyDictionary[nn.Module, VramManager]" = weakref.WeakKeyDictionary()
_PREPARED: dict[torch.device, int] = {}  # bytes of prepared layers per non-CUDA device (the tests' stand-in)


class VramManager:
    """VRAM management of one model: its layers, their storage and the stage moves."""

    def __init__(self, model: nn.Module, settings: VramSettings, source: DiskSource | None = None,
                 prefetch: bool | None = None, prefetch_bytes: int = DEFAULT_PREFETCH_BYTES):
        if model in _MANAGERS:
            raise ValueError(f"{type(model).__name__} is already VRAM-managed: change its settings by loading it "
                             "again with the new ones (from_pretrained / load_managed); use vram.manager_of(model) "
                             "to reach its manager.")
        if settings.uses_disk and source is None:
            raise VramConfigError(f"{type(model).__name__}: disk offload needs the model loaded from safetensors "
                                  "files (from_pretrained / load_managed), not a model in memory.")
        self.settings = settings
        self.model_name = type(model).__name__
        comp = settings.computation.device
        self.cuda = comp.type == "cuda"
        self.full = False  # a layer found no room below vram_limit during this stage
        self.external = 0  # CUDA bytes held outside this process's allocator, measured at onload
        self._onload_arena: _HostArena | None = None
        self._arenas: list[_HostArena] = []
        # registered before any arena exists: a pinned buffer is unregistered however init ends
        self._close = weakref.finalize(self, _close_arenas, self._arenas)
        self.layers: list[_Layer] = []
        seen: dict[int, str] = {}
        for name, module in model.named_modules():
            own = [(n, p) for n, p in module._parameters.items() if p is not None]
            if not own:
                continue
            for n, p in own:
                if id(p) in seen:
                    raise ValueError(f"{self.model_name}: parameter {name}.{n} is shared with {seen[id(p)]}; "
                                     "VRAM management needs every parameter to belong to one module. Untie them "
                                     f"(give {name}.{n} its own copy: nn.Parameter(p.clone())) before enabling VRAM "
                                     "management, or load this model without offload_*.")
                seen[id(p)] = f"{name}.{n}"
            disk = None
            if source is not None:
                disk = {}
                for n, p in own:
                    key = f"{name}.{n}" if name else n
                    if key not in source.tensors:
                        if settings.uses_disk:
                            raise VramConfigError(f"{self.model_name}: parameter {key!r} is not in the safetensors "
                                                  "files, so it cannot stay on disk. Offload to the cpu instead "
                                                  "(offload_device='cpu', no 'disk' in onload_*), or use a "
                                                  "checkpoint that holds every parameter.")
                        disk = None
                        break
                    disk[n] = source.tensors[key]
            self.layers.append(_Layer(self, name, module, disk))

        with torch.no_grad(), _normal_mode():
            try:
                arena = self._arena_for(OFFLOAD, persistent=True)
                for layer in self.layers:
                    layer.init_offload(arena)
            except BaseException:
                self._close()
                raise
            for module in model.modules():  # buffers (RoPE tables...) are small: they live where we compute
                for key, buffer in module._buffers.items():
                    if buffer is not None and buffer.device != comp:
                        module._buffers[key] = buffer.to(comp)
        for attr, value in (("compute_dtype", settings.computation.dtype), ("compute_device", comp)):
            if hasattr(model, attr):
                setattr(model, attr, value)
        if prefetch is None:
            prefetch = self.cuda
        self.prefetcher = _Prefetcher(comp, prefetch_bytes, self.cuda) if prefetch else None
        for layer in self.layers:
            _install(layer)
        _MANAGERS[model] = self
        logger.info("VRAM management of %s (%d layers): %s", self.model_name, len(self.layers), settings.describe())

    # -- stages -------------------------------------------------------------------------

    @property
    def state(self) -> int:
        """ONLOAD while any layer is out of its offload storage, else OFFLOAD (read from the
        layers, so it cannot disagree with them)."""
        return ONLOAD if any(layer.state != OFFLOAD for layer in self.layers) else OFFLOAD

    @torch.no_grad()
    def onload(self) -> None:
        """The stage that uses this model begins: layers to their onload storage. On an error
        midway every layer goes back to its offload storage before the error propagates."""
        if self.state == ONLOAD:
            return
        try:
            with _normal_mode():
                self._onload_arena = self._arena_for(ONLOAD, persistent=False)
                for layer in self.layers:
                    layer.onload(self._onload_arena)
        except BaseException:
            self.offload()
            raise
        self.full = False
        if self.cuda:
            device = self.settings.computation.device
            free, total = torch.cuda.mem_get_info(device)
            self.external = max(total - free - torch.cuda.memory_reserved(device), 0)

    @torch.no_grad()
    def offload(self) -> None:
        """The stage is over: layers back to their offload storage (prepared copies dropped).
        Every layer is visited (offloading one is idempotent), so a half-done onload is undone."""
        if self.prefetcher is not None:
            self.prefetcher.drop()
        with _normal_mode():
            for layer in self.layers:
                layer.offload()
        if self._onload_arena is not None:
            self._onload_arena.close()
            self._arenas.remove(self._onload_arena)
            self._onload_arena = None

    def _arena_for(self, state: int, persistent: bool) -> _HostArena | None:
        """One buffer for the host storage of `state`: page-locked when it feeds a CUDA
        computation. The onload storage always gets one (one allocation, handed back whole at
        offload: host memory really goes down); the offload storage only to be page-locked
        (else the loader's zero-copy map of the file is kept where the dtype matches)."""
        pin = self.cuda and PIN_HOST_MEMORY
        if persistent and not (pin or _ARENAS_WITHOUT_CUDA):
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
        arena = _HostArena(_arena_size(items), pin=pin)
        self._arenas.append(arena)
        return arena

    # -- preparing ----------------------------------------------------------------------

    def _room_for(self, nbytes: int) -> bool:
        if self.full:
            return False
        limit = self.settings.vram_limit
        if limit is None:
            return True
        device = self.settings.preparing.device
        if device.type == "cuda":
            used = torch.cuda.memory_allocated(device) + self.external
        else:
            used = _PREPARED.get(device, 0)
        if used + nbytes <= limit * GiB:
            return True
        self.full = True
        return False

    def _count_prepared(self, layer: _Layer, sign: int) -> None:
        device = self.settings.preparing.device
        if device.type != "cuda":
            _PREPARED[device] = _PREPARED.get(device, 0) + sign * layer.nbytes[PREPARED]

    # -- introspection and options --------------------------------------------------------

    def placements(self) -> dict[str, tuple[str, str]]:
        """layer name -> (state, where its weights are: "cpu/float8_e4m3fn", "cuda:0/bfloat16", "disk")."""
        return {layer.name: layer.placement() for layer in self.layers}

    def stats(self) -> dict[str, Any]:
        prepared = [layer for layer in self.layers if layer.state == PREPARED]
        p = self.prefetcher
        return dict(layers=len(self.layers), prepared_layers=len(prepared),
                    prepared_gib=sum(layer.nbytes[PREPARED] for layer in prepared) / GiB,
                    prefetch_hits=p.hits if p else 0, prefetch_misses=p.misses if p else 0,
                    prefetch_resets=p.resets if p else 0,
                    pinned_gib=sum(a.buffer.numel() for a in self._arenas if a.pinned) / GiB)

    def set_prefetch(self, enabled: bool, prefetch_bytes: int | None = None) -> None:
        """Switch prefetching on or off (on a CPU computation device it only exercises the logic)."""
        if self.prefetcher is not None:
            self.prefetcher.drop()
        window = prefetch_bytes or (self.prefetcher.window if self.prefetcher else DEFAULT_PREFETCH_BYTES)
        self.prefetcher = _Prefetcher(self.settings.computation.device, window, self.cuda) if enabled else None

    @contextlib.contextmanager
    def computation_view(self) -> Iterator[None]:
        """Within: each managed parameter reads as an empty tensor of its computation dtype on
        the computation device (shapes kept), so code that sizes or places things after the
        weights (hot LoRA's A and B) places them where the forward runs."""
        swapped = []
        try:
            for layer in self.layers:
                for n in layer.names:
                    dtype, device = layer.targets[COMPUTE][n]
                    layer.module._parameters[n] = torch.empty((), dtype=dtype, device=device).expand(
                        layer.stored[n].shape)
                    swapped.append(layer)
            yield
        finally:
            for layer in dict.fromkeys(swapped):
                for n in layer.names:
                    layer.module._parameters[n] = layer.stored[n]


def _close_arenas(arenas: list[_HostArena]) -> None:
    for arena in arenas:
        arena.close()


# ============================================================================ entry points


def enable_vram_management(model: nn.Module, settings: VramSettings, source: DiskSource | None = None,
                           **options: Any) -> VramManager:
    """Manage a model already in memory (or loaded by `load_managed`); returns its manager.
    `options`: prefetch (None = on for a CUDA computation), prefetch_bytes."""
    return VramManager(model, settings, source, **options)


def load_managed(paths: Sequence[Path], candidates: Sequence[type], settings: VramSettings,
                 **options: Any) -> nn.Module:
    """Load a checkpoint straight into VRAM management: the loader builds the model over a
    memory map of the files (no copy), then each tensor goes to its offload storage."""
    files = expand_checkpoint_paths([Path(p) for p in paths])
    if settings.uses_disk:
        check_safetensors(files)
    model = load_model(files, candidates, None, "cpu")  # None: keep the files' dtypes, zero-copy
    source = None
    if all(p.suffix in SAFETENSORS_SUFFIXES for p in files):
        source = DiskSource.from_files(files, type(model))
    enable_vram_management(model, settings, source, **options)
    return model


def manager_of(model: Any) -> VramManager | None:
    return _MANAGERS.get(model) if isinstance(model, nn.Module) else None


def use_stage(managers: Mapping[str, VramManager], active: str | None) -> None:
    """Offload every managed model but `active`, then onload `active` (None: offload all)."""
    for name, manager in managers.items():
        if name != active:
            manager.offload()
    if active is not None and active in managers:
        managers[active].onload()


def offload_model(model: Any) -> None:
    manager = manager_of(model)
    if manager is not None:
        manager.offload()
