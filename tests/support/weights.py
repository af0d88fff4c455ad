"""Random weights for modules built by the reference implementations (diffusers, transformers),
with the same values the demo checkpoints get (`pipelines.demo.checkpoints.random_tensor`)."""
from __future__ import annotations

import torch
import torch.nn as nn

from pipelines.demo.checkpoints import random_tensor


def randomize_(module: nn.Module, seed: int) -> nn.Module:
    """Fill every parameter of `module` in place (deterministic in `seed`)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            param.copy_(random_tensor(name, tuple(param.shape), generator))
    return module
