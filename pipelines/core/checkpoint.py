"""The contract between model files and the loader.

A model class declares how its checkpoint is recognised and converted; the loader
(`pipelines.core.loader`) holds no per-model special case. Model files implement this
protocol without importing anything from `core`.
"""
from __future__ import annotations

from typing import Any, Mapping, Protocol

import torch.nn as nn

Shapes = Mapping[str, tuple[int, ...]]


class CheckpointModel(Protocol):
    # Converted keys whose presence identifies this model's checkpoint.
    CHECKPOINT_REQUIRED_KEYS: tuple[str, ...]

    @staticmethod
    def owns_checkpoint_key(key: str) -> bool:
        """Whether an on-disk key belongs to this model's checkpoint."""

    @staticmethod
    def convert_checkpoint_key(key: str) -> str | None:
        """On-disk key -> state-dict key of the module; None for a key of this checkpoint
        that is deliberately not loaded (for example `lm_head` of the text encoder)."""

    @classmethod
    def from_checkpoint(cls, shapes: Shapes, config: dict[str, Any] | None) -> nn.Module:
        """Build the module from converted-key shapes; `config` (a diffusers/transformers
        config.json beside the weights) wins over what the shapes tell. Called with
        parameters created on the meta device: no initialisation work."""
