"""The errors of resolving and fetching model files (`download.py`, `repo_paths.py`,
`local_files.py`): each message says what, where (model id, pattern, source, folder) and how to fix."""
from __future__ import annotations

from .parse import SettingError
from .shards import CheckpointError


class DownloadError(OSError):
    """Files could not be fetched; the message names model id, pattern, source and folder.
    `kind`: what the hub answered (a `RemoteUnavailable.kind`: not_found, unauthorized,
    unreachable, server_error, other), or None when the hub was not the problem (or not asked)."""

    def __init__(self, message: str, kind: str | None = None) -> None:
        super().__init__(message)
        self.kind = kind


class MissingModelFilesError(DownloadError, FileNotFoundError):
    """Files a config needs are not on disk and could not (or may not) be fetched. `kind` as for
    DownloadError (None: downloading is off, or the hub answered but lacks the files)."""


class UnsafePathError(SettingError):
    """A model id, pattern or hub-listed file path that could resolve outside its folder.
    `value` is what was refused, `what` which kind of value it is (model_id, pattern, file) and
    `problem` what is wrong with it."""

    def __init__(self, message: str, value: object, what: str, problem: str) -> None:
        super().__init__(message)
        self.value = value
        self.what = what
        self.problem = problem


class UnsafeListingError(UnsafePathError, DownloadError):
    """A hub's listing names a file outside the repo (`../x`, `/etc/x`, ...): nothing is fetched."""

    def __init__(self, message: str, value: object, what: str, problem: str) -> None:
        UnsafePathError.__init__(self, message, value, what, problem)
        self.kind = None


class CorruptModelFileError(CheckpointError):
    """A file on disk is truncated or corrupt (or differs from the hub's listing)."""
