"""LoRAs on a cached pipeline: what `load_lora` gets for a config's LoRA (a path or a hub
ModelConfig), its local files, and `apply_loras`, which makes the pipeline carry exactly a job's
LoRAs without reloading the base weights (docs/lora.md).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from ..config.schema import LoraItem, RunSpec

if TYPE_CHECKING:
    from .pipeline import LoadedPipeline

logger = logging.getLogger("runner.build")


def lora_source(item: LoraItem, spec: RunSpec) -> Any:
    """What `load_lora` gets: a path, or a ModelConfig for a hub file."""
    if item.path is not None:
        return str(item.path)
    from pipelines import ModelConfig

    return ModelConfig(
        model_id=item.model_id,
        origin_file_pattern=item.origin_file_pattern,
        download_source=spec.model.download_source,
        skip_download=spec.model.skip_download,
    )


def lora_files(item: LoraItem, spec: RunSpec, download: Optional[bool] = None) -> list[Path]:
    """The LoRA's local files (fetched first if missing, unless download=False)."""
    if item.path is not None:
        return [Path(item.path)]
    from pipelines import resolve_files

    return list(resolve_files(lora_source(item, spec), download=download))


def lora_state_key(item: LoraItem) -> str:
    return item.path if item.path is not None else f"{item.model_id}::{item.origin_file_pattern}"


def apply_loras(entry: LoadedPipeline, spec: RunSpec) -> float:
    """Make the pipeline carry exactly this job's LoRAs; returns the seconds it took.

    Same LoRAs, other alphas: each handle's `set_alpha` (the library re-fuses from the
    original weights: the same result as a fresh load). Another set: `clear_lora()`, then
    `load_lora()` for each. The base model is never reloaded."""
    items = [(label, item) for label, _, item in spec.lora.items()]
    wanted = tuple((label, lora_state_key(item), float(item.alpha)) for label, item in items)
    state = entry.lora_state
    if state == wanted:
        return 0.0
    started = time.perf_counter()
    pipe = entry.pipe
    same_set = state is not None and [s[:2] for s in state] == [w[:2] for w in wanted]
    if same_set and entry.lora_handles and all(hasattr(h, "set_alpha") for h in entry.lora_handles):
        entry.lora_state = None  # unknown until every alpha is set
        for handle, (label, _, alpha) in zip(entry.lora_handles, wanted):
            logger.info("LoRA %s: alpha %g", label, alpha)
            handle.set_alpha(alpha)
        entry.lora_state = wanted
        return time.perf_counter() - started
    if state != ():
        pipe.clear_lora()
    entry.lora_state, entry.lora_handles = None, []
    for label, item in items:
        logger.info("Applying LoRA %s (alpha %g)", label, item.alpha)
        # the source itself (path or ModelConfig), so the library's messages name the file
        entry.lora_handles.append(pipe.load_lora(pipe.lora_module, lora_source(item, spec), alpha=float(item.alpha)))
    entry.lora_state = wanted
    return time.perf_counter() - started


def forget_lora_state(entry: Optional[LoadedPipeline]) -> None:
    """After a failed job the applied LoRAs are unknown: clear before the next job."""
    if entry is not None:
        entry.lora_state = None
