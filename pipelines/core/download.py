"""Resolve a ModelConfig to local files.

`model_id` + `origin_file_pattern` resolve as `<base>/<model_id>/<pattern>`, base being
`ModelConfig.local_model_path`, else `DIFFSYNTH_MODEL_BASE_PATH`, else `./models`.
Fetching missing files from ModelScope / HuggingFace is the download issue's seam: today a
pattern that matches nothing locally is an error that names the folder and pattern.
"""
from __future__ import annotations

import os
from pathlib import Path

from .model_config import ModelConfig

DEFAULT_BASE_PATH = "./models"


def model_base_path(config: ModelConfig) -> Path:
    if config.local_model_path is not None:
        return Path(config.local_model_path)
    return Path(os.environ.get("DIFFSYNTH_MODEL_BASE_PATH", DEFAULT_BASE_PATH))


def resolve_files(config: ModelConfig) -> list[Path]:
    """The local files (or, for a folder pattern such as `tokenizer/`, the folder) of a config."""
    if config.path is not None:
        paths = config.path if isinstance(config.path, (list, tuple)) else [config.path]
        resolved = [Path(p) for p in paths]
        missing = [str(p) for p in resolved if not p.exists()]
        if missing:
            raise FileNotFoundError(
                f"ModelConfig(path=...) names files that do not exist: {', '.join(missing)}. "
                "Check the path, or use model_id=... to fetch the model."
            )
        return resolved

    root = model_base_path(config) / config.model_id
    patterns = config.origin_file_pattern or "*"
    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    found: list[Path] = []
    for pattern in patterns:
        matches = _match(root, pattern)
        if not matches:
            raise FileNotFoundError(
                f"No file matches pattern {pattern!r} in {root} (model_id={config.model_id!r}). "
                "Downloading from ModelScope/HuggingFace is not available yet: put the model's files "
                f"there, set DIFFSYNTH_MODEL_BASE_PATH or ModelConfig.local_model_path to the folder "
                "that holds them, or use ModelConfig(path=...)."
            )
        found.extend(m for m in matches if m not in found)
    return found


def _match(root: Path, pattern: str) -> list[Path]:
    if pattern.endswith("/"):
        folder = root / pattern.rstrip("/")
        return [folder] if folder.is_dir() and any(folder.iterdir()) else []
    return sorted(p for p in root.glob(pattern) if p.is_file())
