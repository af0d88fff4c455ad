"""Host (CPU) buffers for a model's storage: one allocation per model and state, page-locked
when it feeds a CUDA computation, so copies to the GPU run asynchronously at full PCIe speed."""
from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Sequence

import torch

from .settings import GiB

logger = logging.getLogger(__name__)

ARENA_ALIGN = 512  # bytes between tensors in a buffer (a multiple of reads.HOST_ALIGNMENT)
PIN_MAX_FRACTION = 0.6  # of physical memory, over all page-locked buffers of the process


class _PinBudget:
    """Page-locked bytes of the whole process: locking most of the memory starves the OS."""

    def __init__(self) -> None:
        self.used = 0
        self._lock = threading.Lock()

    def take(self, nbytes: int) -> bool:
        with self._lock:
            if self.used + nbytes > PIN_MAX_FRACTION * _physical_memory():
                return False
            self.used += nbytes
            return True

    def give(self, nbytes: int) -> None:
        with self._lock:
            self.used -= nbytes


PIN_BUDGET = _PinBudget()


class HostArena:
    """One CPU buffer handing out aligned tensors; page-locked for CUDA when `pin`."""

    def __init__(self, nbytes: int, pin: bool):
        self.buffer = torch.empty(max(nbytes, 1), dtype=torch.uint8)
        self.used = 0
        self.pinned_bytes = 0
        if pin and nbytes > 0:
            self._pin(nbytes)

    @property
    def pinned(self) -> bool:
        return self.pinned_bytes > 0

    def _pin(self, nbytes: int) -> None:
        if not PIN_BUDGET.take(nbytes):
            logger.warning("Not page-locking %.1f GiB of host storage (the process already holds %.1f GiB, the cap is "
                           "%.0f%% of memory): copies to the GPU will be slower.", nbytes / GiB,
                           PIN_BUDGET.used / GiB, PIN_MAX_FRACTION * 100)
            return
        code = int(torch.cuda.cudart().cudaHostRegister(self.buffer.data_ptr(), nbytes, 0))
        if code == 0:
            self.pinned_bytes = nbytes
            return
        PIN_BUDGET.give(nbytes)
        _reset_cuda_error()
        logger.warning("cudaHostRegister of %.1f GiB failed (error %d): copies to the GPU will be slower.",
                       nbytes / GiB, code)

    def take(self, shape: Sequence[int], dtype: torch.dtype, what: str = "a tensor") -> torch.Tensor:
        """Room for `what` (its name, for the error message)."""
        size = nbytes_of(shape, dtype)
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
        if not self.pinned:
            return
        nbytes, self.pinned_bytes = self.pinned_bytes, 0
        PIN_BUDGET.give(nbytes)
        with contextlib.suppress(Exception):  # interpreter shutdown
            torch.cuda.synchronize()
            torch.cuda.cudart().cudaHostUnregister(self.buffer.data_ptr())


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


def nbytes_of(shape: Sequence[int], dtype: torch.dtype) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n * dtype.itemsize


def arena_size(items: Sequence[tuple[Sequence[int], torch.dtype]]) -> int:
    return sum(-(-nbytes_of(s, d) // ARENA_ALIGN) * ARENA_ALIGN for s, d in items) + ARENA_ALIGN
