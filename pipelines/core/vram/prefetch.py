"""Copy the next layers' weights while the current one computes (CUDA: on a side stream).

The prefetcher records the order in which layers that need a copy run (one forward, or one
cycle of layer calls for models without a root forward such as the VAE), then, while one layer
computes, copies the next layers' weights, up to `window` bytes ahead. A layer that runs out
of the recorded order makes it drop what it copied ahead and record again.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from .layer import Layer


@dataclass
class Staged:
    tensors: dict[str, torch.Tensor]
    event: Any
    nbytes: int
    version: int


class Prefetcher:
    def __init__(self, device: torch.device, window_bytes: int, cuda: bool):
        self.device = device
        self.window = window_bytes
        self.stream = torch.cuda.Stream(device) if cuda else None
        self.order: list[Layer] = []
        self.recording = True
        self.cursor = 0  # absolute position of the next expected layer (order index = cursor % len)
        self.next_issue = 0
        self.staged: dict[int, Staged] = {}
        self.inflight = 0
        self.hits = self.misses = self.resets = 0

    def visit(self, layer: "Layer") -> dict[str, torch.Tensor] | None:
        """`layer` is about to run: its staged copies (None: copy it now)."""
        if self.recording:
            return self._record(layer)
        if self.order[self.cursor % len(self.order)] is not layer:
            self.reset(layer)
            self.misses += 1
            return None
        staged = self.staged.pop(self.cursor, None)
        self.cursor += 1
        self.next_issue = max(self.next_issue, self.cursor)
        tensors = self._take(staged, layer) if staged is not None else None
        self.hits += tensors is not None
        self.misses += tensors is None
        self._issue()
        return tensors

    def _record(self, layer: "Layer") -> None:
        if self.order and layer is self.order[0]:  # the cycle closed: predict from now on
            self.recording = False
            self.cursor = self.next_issue = 1
            self._issue()
        else:
            self.order.append(layer)
        self.misses += 1
        return None

    def _take(self, staged: Staged, layer: "Layer") -> dict[str, torch.Tensor] | None:
        self.inflight -= staged.nbytes
        if staged.version != layer.version:  # the layer moved since: the copy is stale
            return None
        if staged.event is not None:
            main = torch.cuda.current_stream(self.device)
            main.wait_event(staged.event)
            for t in staged.tensors.values():
                t.record_stream(main)
        return staged.tensors

    def _issue(self) -> None:
        n = len(self.order)
        while self.next_issue < self.cursor + n:
            layer = self.order[self.next_issue % n]
            nbytes = layer.staging_bytes()
            if nbytes and self.inflight and self.inflight + nbytes > self.window:
                break
            if nbytes:
                self.staged[self.next_issue] = self._stage(layer, nbytes)
                self.inflight += nbytes
            self.next_issue += 1

    def _stage(self, layer: "Layer", nbytes: int) -> Staged:
        if self.stream is None:
            return Staged(layer.stage(None), None, nbytes, layer.version)
        with torch.cuda.stream(self.stream):
            tensors = layer.stage(self.stream)
            event = torch.cuda.Event()
            event.record(self.stream)
        return Staged(tensors, event, nbytes, layer.version)

    def drop(self) -> None:
        """Forget what was copied ahead (keeps the recorded order)."""
        if self.stream is not None and self.staged:
            self.stream.synchronize()
        self.staged.clear()
        self.inflight = 0
        if not self.recording:  # still expect the layer that comes next in the cycle
            self.cursor = self.next_issue = self.cursor % len(self.order)

    def reset(self, first: "Layer | None" = None) -> None:
        """Record the order again, starting with `first`."""
        self.drop()
        self.resets += 1
        self.order = [first] if first is not None else []
        self.recording = True
        self.cursor = self.next_issue = 0
