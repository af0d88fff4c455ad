"""Who decides how a model's weights may be read and changed from outside.

Code that works on a model's layers from outside (LoRA) needs two things from whoever manages
the weights' storage (VRAM management): where a layer computes (so a hot LoRA's A and B go
there) and how to change the stored weights for good (a cold LoRA fuses into the storage the
weights return to, or cannot fuse at all). This registry lets the storage manager answer without
LoRA importing it; an unregistered model is an ordinary one: its parameters are what it
computes with, and changing them in place is permanent.
"""
from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator
from typing import ContextManager, Protocol

import torch.nn as nn


class WeightAccess(Protocol):
    def computation_view(self) -> ContextManager[None]:
        """Within: each parameter reads as (an empty tensor of) its computation dtype on its
        computation device, shapes kept."""

    def editable(self) -> ContextManager[None]:
        """Within: the parameters are the stored weights, and in-place changes persist. Raises
        (with the fix in the message) where the storage cannot be changed."""


class _Plain:
    @contextlib.contextmanager
    def computation_view(self) -> Iterator[None]:
        yield

    @contextlib.contextmanager
    def editable(self) -> Iterator[None]:
        yield


_PLAIN = _Plain()
_REGISTRY: "weakref.WeakKeyDictionary[nn.Module, WeightAccess]" = weakref.WeakKeyDictionary()


def register_weight_access(model: nn.Module, access: WeightAccess | None) -> None:
    """Make `access` answer for `model` (None: back to an ordinary model)."""
    if access is None:
        _REGISTRY.pop(model, None)
    else:
        _REGISTRY[model] = access


def weight_access(model: nn.Module) -> WeightAccess:
    return _REGISTRY.get(model, _PLAIN)
