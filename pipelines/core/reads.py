"""Reading safetensors data into tensors that are already allocated (`read_tensors`): large
positional reads (`os.preadv`, up to READ_CHUNK bytes each) on up to MAX_READ_THREADS threads,
files and pieces of one file in parallel, straight into the destinations, so nothing is left to
page faults in the first forward. Host destinations come from PyTorch's allocator (aligned on
HOST_ALIGNMENT, each freed on its own); a cast goes through a small per-thread staging buffer and
overlaps the other threads' reads. GPU destinations are filled from pinned staging buffers, the
host-to-device copies (and casts, done on the device) queued on side streams while the next
pieces are read. The page cache keeps the file; the process holds one copy.
"""
from __future__ import annotations

import os
import queue
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

import torch

from .shards import CheckpointError, align_up

# CPU kernels (MKL/oneDNN GEMMs) choose their code path, and so their rounding order, by the
# address alignment of the operands: weights read in place from a file sit wherever the file
# put them, so the same weights would give other last bits than in ordinary memory. Every host
# tensor a model stores or computes with starts on this boundary (PyTorch's allocator's own).
HOST_ALIGNMENT = 64


def host_aligned(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` itself when its data starts on HOST_ALIGNMENT (or it is not in host memory),
    else a copy in freshly allocated, aligned memory."""
    if tensor.device.type != "cpu" or tensor.data_ptr() % HOST_ALIGNMENT == 0:
        return tensor
    return tensor.clone(memory_format=torch.contiguous_format)


READ_CHUNK = 16 << 20  # bytes per read call (and per staging buffer)
MAX_READ_THREADS = 8
IOV_MAX = 512  # buffers per os.preadv call (Linux takes 1024)


def _bytes_of(tensor: torch.Tensor) -> memoryview:
    """The bytes of a contiguous host tensor, writable (for os.preadv)."""
    return memoryview(tensor.reshape(-1).view(torch.uint8).numpy())


@dataclass
class Piece:
    """Bytes [offset, offset + nbytes) of a file, stored as `stored`, going to elements
    [first, first + nbytes / itemsize) of `target` (a flat destination; a cast when its
    dtype differs)."""

    fd: int
    path: Path
    offset: int
    nbytes: int
    stored: torch.dtype
    target: torch.Tensor
    first: int

    @property
    def cast(self) -> bool:
        return self.target.dtype != self.stored

    def destination(self) -> torch.Tensor:
        return self.target[self.first:self.first + self.nbytes // self.stored.itemsize]


def tensor_pieces(fd: int, path: Path, offset: int, nbytes: int, stored: torch.dtype,
            target: torch.Tensor) -> Iterator[Piece]:
    """A tensor's bytes in pieces of at most READ_CHUNK, cut between elements."""
    step = max(READ_CHUNK // stored.itemsize, 1) * stored.itemsize
    for start in range(0, nbytes, step):
        yield Piece(fd, path, offset + start, min(step, nbytes - start), stored, target, start // stored.itemsize)


def _chunks(pieces: Sequence[Piece]) -> list[list[Piece]]:
    """Runs of pieces contiguous in one file, up to READ_CHUNK bytes: one os.preadv each."""
    chunks: list[list[Piece]] = []
    size = 0
    for piece in pieces:
        last = chunks[-1][-1] if chunks else None
        if (last is None or last.fd != piece.fd or last.offset + last.nbytes != piece.offset
                or size + piece.nbytes > READ_CHUNK or len(chunks[-1]) >= IOV_MAX):
            chunks.append([])
            size = 0
        chunks[-1].append(piece)
        size += piece.nbytes
    return chunks


def _read_exactly(chunk: Sequence[Piece], buffers: list[memoryview]) -> None:
    """Fill `buffers` with the file bytes of `chunk` (contiguous), however the reads split."""
    first = chunk[0]
    offset, index = first.offset, 0
    try:
        while index < len(buffers):
            done = os.preadv(first.fd, buffers[index:index + IOV_MAX], offset)
            if done <= 0:
                raise EOFError(f"the file ends at byte {offset}, inside the tensor data")
            offset += done
            while done:
                size = buffers[index].nbytes
                if done < size:
                    buffers[index] = buffers[index][done:]
                    break
                done -= size
                index += 1
    except (OSError, EOFError) as error:
        raise CheckpointError(
            f"{first.path}: reading tensor data failed ({type(error).__name__}: {error}). The file is truncated "
            "or corrupt: delete it and fetch it again.") from error


class _Staging:
    """One worker's staging: a host buffer (pinned for a GPU) for pieces that are cast or go to
    the GPU, and on a GPU its stream, a device buffer for casts and an event marking when the
    last copies out of the host buffer are done."""

    def __init__(self, device: torch.device):
        self.device = device
        cuda = device.type == "cuda"
        self._host: torch.Tensor | None = None
        self._view: memoryview | None = None
        self.stream = torch.cuda.Stream(device) if cuda else None
        self.event = torch.cuda.Event() if cuda else None
        self.scratch: torch.Tensor | None = None

    def host(self) -> tuple[torch.Tensor, memoryview]:
        """The host buffer (made on first use: a load to the CPU without a cast needs none)."""
        if self._host is None:
            size = READ_CHUNK + IOV_MAX * HOST_ALIGNMENT  # pieces start on HOST_ALIGNMENT in it
            self._host = torch.empty(size, dtype=torch.uint8, pin_memory=self.stream is not None)
            self._view = _bytes_of(self._host)
        return self._host, self._view

    def synchronize(self) -> None:
        if self.stream is not None:
            self.stream.synchronize()

    def read_to_host(self, chunk: Sequence[Piece]) -> None:
        """Pieces in their host destination: read in place, or staged and cast."""
        buffers, staged, at = [], [], 0
        for piece in chunk:
            if piece.cast:
                buffers.append(self.host()[1][at:at + piece.nbytes])
                staged.append((piece, at))
                at = align_up(at + piece.nbytes, HOST_ALIGNMENT)
            else:
                buffers.append(_bytes_of(piece.destination()))
        _read_exactly(chunk, buffers)
        for piece, at in staged:
            piece.destination().copy_(self.host()[0][at:at + piece.nbytes].view(piece.stored))

    def read_to_device(self, chunk: Sequence[Piece]) -> None:
        """Pieces read into the pinned buffer, copied to the device on this staging's stream
        (cast there), while the worker goes on to read the next ones into another staging."""
        self.event.synchronize()  # the copies out of the buffer queued last time are done
        host, view = self.host()
        buffers, places, at = [], [], 0
        for piece in chunk:
            buffers.append(view[at:at + piece.nbytes])
            places.append(at)
            at = align_up(at + piece.nbytes, HOST_ALIGNMENT)
        _read_exactly(chunk, buffers)
        with torch.cuda.device(self.device), torch.cuda.stream(self.stream):
            for piece, at in zip(chunk, places):
                source = host[at:at + piece.nbytes]
                if piece.cast:
                    if self.scratch is None:
                        self.scratch = torch.empty(host.numel(), dtype=torch.uint8, device=self.device)
                    staged = self.scratch[at:at + piece.nbytes]
                    staged.copy_(source, non_blocking=True)
                    piece.destination().copy_(staged.view(piece.stored))
                else:
                    piece.destination().view(torch.uint8).copy_(source, non_blocking=True)
            self.event.record(self.stream)


def read_tensors(pieces: Sequence[Piece], device: torch.device,
                 progress: Callable[[int], None] = lambda nbytes: None) -> None:
    """Fill every piece's destination from its file: up to MAX_READ_THREADS workers, each
    reading runs of pieces with one os.preadv, files and parts of one file in parallel."""
    chunks = _chunks(pieces)
    if not chunks:
        return
    workers = max(1, min(MAX_READ_THREADS, os.cpu_count() or 1, len(chunks)))
    to_device = device.type == "cuda"
    stagings: queue.SimpleQueue[_Staging] = queue.SimpleQueue()
    created: list[_Staging] = []
    inference = torch.is_inference_mode_enabled()  # the workers make the same kind of tensors

    def work(chunk: list[Piece]) -> int:
        try:
            staging = stagings.get_nowait()
        except queue.Empty:
            staging = _Staging(device)
            created.append(staging)
        try:
            with torch.inference_mode(inference):
                if to_device:
                    staging.read_to_device(chunk)
                else:
                    staging.read_to_host(chunk)
        finally:
            stagings.put(staging)
        return sum(piece.nbytes for piece in chunk)

    try:
        if to_device:  # two stagings per worker: one is read into while the other's copies run
            current = torch.cuda.current_stream(device)  # where the destinations were allocated
            for _ in range(2 * workers):
                staging = _Staging(device)
                staging.stream.wait_stream(current)
                created.append(staging)
                stagings.put(staging)
        if workers == 1:
            for chunk in chunks:
                progress(work(chunk))
            return
        with ThreadPoolExecutor(workers, thread_name_prefix="read-weights") as pool:
            futures: list[Future] = [pool.submit(work, chunk) for chunk in chunks]
            pending = set(futures)
            while pending:
                done, pending = wait(pending, return_when=FIRST_EXCEPTION)
                for future in done:
                    if future.exception() is not None:
                        for other in pending:
                            other.cancel()
                        raise future.exception()
                    progress(future.result())
    finally:
        for staging in created:
            staging.synchronize()


def reads_in_place(torch_dtype: torch.dtype | None, device: torch.device) -> bool:
    """Whether load_model reads safetensors with read_tensors (else: views over a memory map,
    cast and moved one by one)."""
    if not hasattr(os, "preadv"):
        return False
    if device.type == "cpu":
        return torch_dtype is not None  # None: views over the file, for VRAM management
    return device.type == "cuda"
