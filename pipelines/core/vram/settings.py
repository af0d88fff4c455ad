"""The eight VRAM keys of a ModelConfig -> four checked storage places, and `vram_limit`."""
from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ..model_config import VRAM_KEYS
from ..parse import COMPUTE_DTYPES, DISK, FLOAT8, SettingError, finite, parse_device, parse_dtype

logger = logging.getLogger(__name__)

GiB = 1 << 30
AUTO_MARGIN_GIB = 3.0  # vram_limit="auto": total device memory minus this (activations, prefetch)
STORAGE_STATES = ("offload", "onload", "preparing")


class VramConfigError(SettingError):
    """Bad VRAM settings; the message names the key, the value and the fix."""


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
        try:
            computation = _computation_place(keys, torch_dtype, device, where)
            places = {state: _storage_place(keys, state, computation, where) for state in STORAGE_STATES}
        except VramConfigError:
            raise
        except SettingError as error:
            raise VramConfigError(f"{where}: {error}") from None
        if places["onload"].is_disk and not places["offload"].is_disk:
            raise VramConfigError(f"{where}: onload 'disk' needs offload 'disk' too (weights stay in their file only "
                                  "if they were never taken out of it).")
        for state, place in places.items():
            if not place.is_disk and place.dtype in FLOAT8:
                _check_float8_storage(place.dtype, place.device, f"{where}: {state}_dtype")
        return cls(places["offload"], places["onload"], places["preparing"], computation, check_vram_limit(vram_limit))

    @property
    def uses_disk(self) -> bool:
        return self.offload.is_disk

    def describe(self) -> str:
        limit = "none" if self.vram_limit is None else f"{self.vram_limit:g} GiB"
        return (f"offload {self.offload}, onload {self.onload}, preparing {self.preparing}, "
                f"computation {self.computation}, vram_limit {limit}")


def _computation_place(keys: Mapping[str, Any], torch_dtype: torch.dtype, device: Any, where: str) -> Place:
    dtype_value = keys.get("computation_dtype")
    device_value = keys.get("computation_device")
    if DISK in (str(dtype_value).lower(), str(device_value).lower()):
        raise VramConfigError(f"{where}: computation_dtype/device cannot be 'disk': a layer computes on a "
                              "device. Use disk for offload_* (and onload_*).")
    dtype = parse_dtype(torch_dtype if dtype_value is None else dtype_value, "computation_dtype")
    if dtype not in COMPUTE_DTYPES:
        raise VramConfigError(
            f"{where}: computation_dtype={dtype} cannot run a forward; float8 is a storage dtype. "
            "Compute in bfloat16, float16 or float32 (and store in float8 with offload/onload/preparing_dtype).")
    return Place(dtype, parse_device(device if device_value is None else device_value, "computation_device"))


def _storage_place(keys: Mapping[str, Any], state: str, computation: Place, where: str) -> Place:
    dtype_key, device_key = f"{state}_dtype", f"{state}_device"
    raw_dtype, raw_device = keys.get(dtype_key), keys.get(device_key)
    dtype = None if raw_dtype is None else parse_dtype(raw_dtype, dtype_key, allow_disk=True)
    dev = None if raw_device is None else parse_device(raw_device, device_key, allow_disk=True)
    if DISK not in (dtype, dev):
        return Place(dtype or computation.dtype, dev or computation.device)
    if state == "preparing":
        raise VramConfigError(f"{where}: preparing_* cannot be 'disk': preparing is where a layer stays "
                              "resident once it has run (e.g. the GPU).")
    if dtype not in (None, DISK) or dev not in (None, DISK):
        raise VramConfigError(
            f"{where}: {dtype_key}={raw_dtype!r} with {device_key}={raw_device!r}: weights left on disk keep the "
            f"file's dtype; set both {dtype_key} and {device_key} to 'disk'.")
    return DISK_PLACE


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


def check_vram_limit(vram_limit: Any) -> float | None:
    if vram_limit is None:
        return None
    if isinstance(vram_limit, bool) or not isinstance(vram_limit, (int, float)) or not vram_limit >= 0:
        raise VramConfigError(f"vram_limit={vram_limit!r}: give GiB of device memory (a number >= 0), "
                              "'auto', or None for no limit, in from_pretrained(vram_limit=...) or the config key "
                              "`vram.vram_limit`.")
    return finite(vram_limit, "vram_limit")


def resolve_vram_limit(vram_limit: Any, device: Any, margin_gib: float = AUTO_MARGIN_GIB) -> float | None:
    """`vram_limit` as GiB: a number as is, None as None, "auto" = the device's total memory
    minus `margin_gib` (None on a device without memory statistics, e.g. the cpu)."""
    if not isinstance(vram_limit, str):
        return check_vram_limit(vram_limit)
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
