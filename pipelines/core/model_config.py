"""ModelConfig: where a model's files come from, and how its memory is managed."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

VRAM_KEYS = (
    "offload_dtype", "offload_device",
    "onload_dtype", "onload_device",
    "preparing_dtype", "preparing_device",
    "computation_dtype", "computation_device",
)


@dataclass
class ModelConfig:
    """One model's files: either `path` (a file, a list of shard files, or a folder) or
    `model_id` + `origin_file_pattern` resolved under the models folder.

    The eight VRAM keys enable layer-wise memory management when `offload_dtype` and
    `offload_device` are given (docs/vram.md).
    """

    path: str | Path | list[str | Path] | None = None
    model_id: str | None = None
    origin_file_pattern: str | list[str] | None = None
    download_source: str | None = None
    local_model_path: str | Path | None = None
    skip_download: bool | None = None
    offload_dtype: object = None
    offload_device: object = None
    onload_dtype: object = None
    onload_device: object = None
    preparing_dtype: object = None
    preparing_device: object = None
    computation_dtype: object = None
    computation_device: object = None

    def __post_init__(self) -> None:
        if self.path is None and self.model_id is None:
            raise ValueError(
                "ModelConfig needs either path=... (a file, a list of files or a folder) "
                "or model_id=... with origin_file_pattern=..."
            )
        if self.path is not None and self.model_id is not None:
            raise ValueError(
                f"ModelConfig got both path={self.path!r} and model_id={self.model_id!r}: give one of them."
            )

    @property
    def vram_managed(self) -> bool:
        return self.offload_dtype is not None or self.offload_device is not None

    def vram_settings(self) -> dict[str, object]:
        return {name: getattr(self, name) for name in VRAM_KEYS if getattr(self, name) is not None}

    def describe(self) -> str:
        """A short human description for error messages and logs."""
        if self.path is not None:
            return f"path={self.path!r}"
        return f"model_id={self.model_id!r}, origin_file_pattern={self.origin_file_pattern!r}"
