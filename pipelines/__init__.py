"""The inference library: the one public surface users and the runner import.

    from pipelines import QwenImagePipeline, ModelConfig
    pipe = QwenImagePipeline.from_pretrained(torch_dtype=torch.bfloat16, device="cuda", model_configs=[...])
    # Qwen-Image 2.1: QwenImage21Pipeline.from_pretrained(..., processor_config=ModelConfig(...))

Names are imported on first use, so `import pipelines` costs nothing until a model is needed.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    # pipelines
    "Pipeline": "pipelines.core.pipeline",
    "QwenImagePipeline": "pipelines.qwen_image",
    "QwenImage21Pipeline": "pipelines.qwen_image_2_1",
    # loading and files
    "ModelConfig": "pipelines.core.model_config",
    "VRAM_KEYS": "pipelines.core.model_config",
    "fetch": "pipelines.core.download",
    "resolve_files": "pipelines.core.download",
    "regular_file": "pipelines.core.files",
    "model_base_path": "pipelines.core.repo_paths",
    "model_folder": "pipelines.core.repo_paths",
    "check_repo_path": "pipelines.core.repo_paths",
    "parse_download_source": "pipelines.core.repo_paths",
    # pictures: the one reader of every picture argument
    "open_picture": "pipelines.core.images",
    # values
    "parse_dtype": "pipelines.core.parse",
    "parse_compute_dtype": "pipelines.core.parse",
    "parse_device": "pipelines.core.parse",
    "finite": "pipelines.core.parse",
    "check_seed": "pipelines.core.parse",
    # sampling
    "FlowMatchScheduler": "pipelines.core.sampling",
    # ControlNets
    "ControlNetInput": "pipelines.core.control",
    # LoRA and VRAM
    "LoraHandle": "pipelines.core.lora",
    "VramSettings": "pipelines.core.vram",
    "check_vram_limit": "pipelines.core.vram.settings",
    # errors
    "SettingError": "pipelines.core.parse",
    "PictureError": "pipelines.core.images",
    "CheckpointError": "pipelines.core.shards",
    "DownloadError": "pipelines.core.download_errors",
    "UnsafePathError": "pipelines.core.download_errors",
    "MissingModelFilesError": "pipelines.core.download_errors",
    "LoraError": "pipelines.core.lora",
    "VramConfigError": "pipelines.core.vram",
    "NonFiniteError": "pipelines.core.sampling",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'pipelines' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
