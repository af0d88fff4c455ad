"""The one place where user-given dtypes, devices and numbers become checked values.

The library's public calls and the runner's config validation both use these, so a value is
accepted or refused the same way (and with the same words) wherever it is given.
"""
from __future__ import annotations

import math
from typing import Any

import torch

DISK = "disk"  # a storage place: weights left in their safetensors files

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "float64": torch.float64, "fp64": torch.float64, "double": torch.float64,
    "float8_e4m3fn": torch.float8_e4m3fn, "fp8": torch.float8_e4m3fn, "float8": torch.float8_e4m3fn,
    "fp8_e4m3fn": torch.float8_e4m3fn, "float8_e5m2": torch.float8_e5m2, "fp8_e5m2": torch.float8_e5m2,
}
FLOAT8 = (torch.float8_e4m3fn, torch.float8_e5m2)
COMPUTE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
SEED_RANGE = 2**64  # torch.Generator.manual_seed takes [0, 2**64); negative seeds would alias large ones


class SettingError(ValueError):
    """A value that cannot be used; the message names the key, the value and what is allowed."""


def parse_dtype(value: Any, key: str = "dtype", allow_disk: bool = False) -> torch.dtype | str:
    """A torch.dtype or a name ("bfloat16", "bf16", "fp8", "torch.float16", ...) -> torch.dtype;
    "disk" -> DISK where `allow_disk`."""
    if isinstance(value, torch.dtype):
        return value
    if isinstance(value, str):
        name = value.strip().lower().removeprefix("torch.")
        if name == DISK and allow_disk:
            return DISK
        if name in DTYPES:
            return DTYPES[name]
    known = "float32, bfloat16, float16, float8_e4m3fn, float8_e5m2 (or a torch.dtype)"
    known += ", disk" if allow_disk else ""
    raise SettingError(f"{key}={value!r} is not a dtype this library knows: use one of {known}.")


def parse_compute_dtype(value: Any, key: str = "torch_dtype") -> torch.dtype:
    """A dtype a forward can run in (float8 is a storage dtype only)."""
    dtype = parse_dtype(value, key)
    if dtype not in COMPUTE_DTYPES:
        raise SettingError(f"{key}={value!r} cannot run a forward; float8 is a storage dtype. Compute in "
                           "bfloat16, float16 or float32 (store weights in float8 with the VRAM keys).")
    return dtype


def parse_device(value: Any, key: str = "device", allow_disk: bool = False) -> torch.device | str:
    """A torch.device or a name ("cpu", "cuda", "cuda:1", "mps") -> torch.device (cuda with its
    index) that exists on this machine; "disk" -> DISK where `allow_disk`."""
    if allow_disk and isinstance(value, str) and value.strip().lower() == DISK:
        return DISK
    allowed = "cpu, cuda, cuda:N, mps" + (" or disk" if allow_disk else "")
    try:
        device = torch.device(value)
    except (RuntimeError, TypeError, ValueError):
        raise SettingError(f"{key}={value!r} is not a device: use {allowed}.") from None
    if device.type == "meta":
        raise SettingError(f"{key}='meta': the meta device holds no data. Use 'disk' to keep weights out of "
                           "memory (they are read from their safetensors files when needed).")
    if device.type == "cuda":
        return _cuda_device(device, key, value)
    if device.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise SettingError(f"{key}={value!r} but MPS is not available on this machine (it needs an Apple GPU "
                           "and a torch build with MPS): use cpu.")
    if device.type not in ("cpu", "cuda", "mps"):
        raise SettingError(f"{key}={value!r}: unsupported device type {device.type!r}; use {allowed}.")
    return device


def _cuda_device(device: torch.device, key: str, value: Any) -> torch.device:
    if not torch.cuda.is_available():
        raise SettingError(f"{key}={value!r} but CUDA is not available on this machine (no NVIDIA GPU, or a "
                           "CPU-only torch build): use cpu (and float32 for speed on a CPU).")
    count = torch.cuda.device_count()
    index = torch.cuda.current_device() if device.index is None else device.index
    if index >= count:
        raise SettingError(f"{key}={value!r}: this machine has {count} CUDA device(s); use one of cuda, "
                           f"{', '.join(f'cuda:{i}' for i in range(count))}.")
    return torch.device("cuda", index)


def finite(value: Any, key: str) -> float:
    """`value` as a float; NaN, an infinity or a non-number is an error naming `key`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise SettingError(f"{key}={value!r} is not a number.") from None
    if not math.isfinite(value):
        raise SettingError(f"{key}={value!r}: a finite number is needed (NaN or an infinity would silently "
                           "give a black or wrong image).")
    return float(value)


def check_seed(seed: Any, key: str = "seed") -> int:
    """A seed in [0, 2**64), the range torch's generators take (a negative seed would alias a large one)."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise SettingError(f"{key}={seed!r} must be an integer in [0, 2**64), or None for a random seed.")
    if not 0 <= seed < SEED_RANGE:
        raise SettingError(f"{key}={seed} is outside [0, 2**64): give a non-negative integer below 2**64 "
                           "(18446744073709551616), or None for a random seed.")
    return seed
