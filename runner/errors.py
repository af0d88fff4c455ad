"""How the runner ends early, and the one-line form of an error.

`Stop` ends the process with one line and an exit status. It derives from BaseException on
purpose: Hydra catches `Exception` around each job and around the whole app (and would print
a traceback or go on with the next job), while a Stop must reach `runner.__main__` intact,
the way Ctrl-C does, so that the open MLflow runs and the sweep's files are finished first.
"""
from __future__ import annotations

import copy
import errno
import logging

# exit statuses of `python -m runner` (runner/__main__.py documents them)
EXIT_OK, EXIT_FAILED, EXIT_REFUSED, EXIT_UNTRACKED, EXIT_INTERRUPTED = 0, 1, 2, 3, 130

# a write that fails with one of these is about the output folder, not about the job
_STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG, errno.EIO}


class ConfigError(ValueError):
    """A run spec that cannot be run: the message names the config path and the fix."""

    def __init__(self, key: str, problem: str, fix: str) -> None:
        super().__init__(f"config `{key}`: {problem}. Fix: {fix}")
        self.key, self.problem, self.fix = key, problem, fix

    def __reduce__(self):  # crosses to and from the MLflow writer process
        return ConfigError, (self.key, self.problem, self.fix)


class Stop(BaseException):
    """End the run or sweep now: `message` is logged as one line, `code` is the exit status."""

    def __init__(self, message: str, code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


class OutputError(Exception):
    """A file of the job or sweep folder could not be written (full disk, read-only folder):
    no later job could write its image either."""

    def __init__(self, path: object, error: OSError) -> None:
        reason = error.strerror or str(error)
        super().__init__(f"cannot write {path}: {reason} (errno {error.errno})")
        self.path = path
        self.errno = error.errno


def first_line(error: BaseException | str, named: bool = False) -> str:
    """The first non-blank line of an error (its message, or its type's name when it has none):
    what a log line or a grid cell shows of it. `named`: prefixed with the error's type."""
    text = str(error)
    line = next((part.strip() for part in text.splitlines() if part.strip()), "")
    if isinstance(error, BaseException) and (named or not line):
        return f"{type(error).__name__}: {line}" if line else type(error).__name__
    return line


def is_storage_error(error: BaseException) -> bool:
    return isinstance(error, OSError) and error.errno in _STORAGE_ERRNOS


def output_fix(path: object, code: int | None = None, resume: bool = True) -> str:
    """How to get past a write that failed in `path` with errno `code`."""
    if code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        first = f"free space on the file system of {path}"
    elif code in (errno.EROFS, errno.EACCES, errno.EPERM):
        first = f"make {path} writable"
    else:
        first = f"check that {path} can be written (free space, permissions)"
    then = ", then run the same command again with resume=true" if resume else ""
    return f"{first}, or point hydra.sweep.dir / hydra.run.dir elsewhere{then}"


# --------------------------------------------------------------- known user errors

# a log record's attribute: its traceback is for the job's log file, not for the console
BRIEF = "runner_brief"
# the library's typed errors: what a user can cause (a setting, a checkpoint or LoRA file, a
# download), whose message says what and how to fix it; any other exception is a bug
USER_ERRORS = ("SettingError", "CheckpointError", "DownloadError", "LoraError", "NonFiniteError")


def brief(error: BaseException) -> dict[str, bool]:
    """`extra=` of a log call about `error`: a known user error is shown on the console as its
    one line (`brief_on_console`), its traceback kept in the log file."""
    import pipelines  # only where a job runs: the MLflow writer process never calls this

    return {BRIEF: True} if isinstance(error, tuple(getattr(pipelines, n) for n in USER_ERRORS)) else {}


class _BriefFormatter(logging.Formatter):
    """A console handler's formatter that leaves out the traceback of a record marked BRIEF."""

    def __init__(self, inner: logging.Formatter | None) -> None:
        super().__init__()
        self.inner = inner or logging.Formatter()

    def format(self, record: logging.LogRecord) -> str:
        if getattr(record, BRIEF, False):
            record = copy.copy(record)  # the log file's handler formats the same record, traceback included
            record.exc_info, record.exc_text, record.stack_info = None, None, None
        return self.inner.format(record)


def brief_on_console(logger: logging.Logger | None = None) -> None:
    """Let the console handlers of `logger` (the root logger) show a known user error as one
    line; file handlers keep every traceback. Called once Hydra's job logging is configured."""
    for handler in (logger or logging.getLogger()).handlers:
        console = isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler)
        if console and not isinstance(handler.formatter, _BriefFormatter):
            handler.setFormatter(_BriefFormatter(handler.formatter))

