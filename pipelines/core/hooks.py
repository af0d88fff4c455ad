"""Named, removable forward wrappers: how code outside a model (VRAM management, hot LoRA)
acts on its layers without touching the model's code, module names or state dict.

    add_forward_wrapper(layer, "vram", lambda forward, *args, **kwargs: ...)
    remove_forward_wrapper(layer, "vram")

A wrapper receives the next forward in the chain and the call's arguments. Wrappers run in the
order they were added (the first added is the outermost). With no wrapper left the module's own
forward is back, exactly as before. Unlike torch's forward hooks, a wrapper sees the call whole,
so it can undo its changes in a `finally` even on KeyboardInterrupt.
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch.nn as nn

ForwardWrapper = Callable[..., Any]  # (forward, *args, **kwargs) -> output
_ATTRIBUTE = "_forward_wrappers"  # module instance attribute: {name: wrapper}, in order


def add_forward_wrapper(module: nn.Module, name: str, wrapper: ForwardWrapper) -> None:
    wrappers: dict[str, ForwardWrapper] = module.__dict__.get(_ATTRIBUTE, {})
    if name in wrappers:
        raise ValueError(f"{type(module).__name__} already has a forward wrapper named {name!r}; remove it first.")
    wrappers[name] = wrapper
    _install(module, wrappers)


def remove_forward_wrapper(module: nn.Module, name: str) -> bool:
    """Remove the wrapper `name`; returns whether there was one."""
    wrappers: dict[str, ForwardWrapper] = module.__dict__.get(_ATTRIBUTE, {})
    if wrappers.pop(name, None) is None:
        return False
    _install(module, wrappers)
    return True


def _install(module: nn.Module, wrappers: dict[str, ForwardWrapper]) -> None:
    module.__dict__.pop("forward", None)  # back to the class's forward
    module.__dict__.pop(_ATTRIBUTE, None)
    if not wrappers:
        return
    forward = module.forward  # the bound forward of the module's class
    for wrapper in reversed(list(wrappers.values())):
        forward = functools.partial(wrapper, forward)
    module.__dict__[_ATTRIBUTE] = wrappers
    module.__dict__["forward"] = forward
