"""VRAM management: keep each layer's weights where they are stored, compute where asked.

A VRAM-managed model has four places for its weights, each a dtype and a device (or "disk"):

    offload      where the weights wait while the pipeline stage does not use the model
    onload       where they are when the stage that uses the model begins
    preparing    where a layer moves on its first forward and stays, while the device memory
                 in use is below `vram_limit` (GiB; None = no limit)
    computation  the dtype/device each forward runs in; a layer stored elsewhere gets a
                 temporary copy for its forward, dropped right after

Unset keys fall back to the computation values. "disk" (offload and onload only) leaves the
weights in their safetensors files: a layer stored there is read (memory-mapped) when needed
and its pages are handed back after use, so host memory does not grow over the steps.

Every module with parameters of its own gets a named forward wrapper (pipelines.core.hooks)
that swaps the computation copies into its parameter slots for its own forward and swaps the
stored ones back; the model code and its state-dict names are untouched. float8 storage
applies to matrices and kernels; vectors keep the computation dtype. Host storage feeding a
CUDA computation is one page-locked buffer per model; on CUDA the next layers are copied on a
side stream while the current one computes (`prefetch`).

Files: settings (keys -> places), host (buffers), disk (weights left in files), layer (the
state machine), prefetch, manager (a model's layers and stages, entry points).
"""
from ..parse import COMPUTE_DTYPES, DISK, FLOAT8
from .disk import DiskSource, DiskTensor, check_safetensors
from .layer import State
from .manager import (
    DEFAULT_PREFETCH_BYTES,
    MemoryMeter,
    VramManager,
    VramOptions,
    enable_vram_management,
    load_managed,
    manager_of,
    offload_model,
    use_stage,
)
from .settings import DISK_PLACE, GiB, Place, VramConfigError, VramSettings, resolve_vram_limit, settings_for

OFFLOAD, ONLOAD, PREPARED, COMPUTATION = State.OFFLOAD, State.ONLOAD, State.PREPARED, State.COMPUTATION

__all__ = [
    "COMPUTE_DTYPES", "DISK", "DISK_PLACE", "FLOAT8", "DEFAULT_PREFETCH_BYTES", "GiB", "COMPUTATION", "OFFLOAD",
    "ONLOAD", "PREPARED", "DiskSource", "DiskTensor", "MemoryMeter", "Place", "State", "VramConfigError",
    "VramManager", "VramOptions", "VramSettings", "check_safetensors", "enable_vram_management", "load_managed",
    "manager_of", "offload_model", "resolve_vram_limit", "settings_for", "use_stage",
]
