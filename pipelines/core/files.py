"""A file the user names is opened only when it is a regular file.

Opening a FIFO for reading waits for a writer (forever, and inside safetensors' Rust code even
SIGINT/SIGTERM do not end the wait); a character device may never end; a socket or a folder
cannot be read as a file. Every place the library opens a user-named file (pictures,
checkpoint shards and their index, config.json, LoRA files, tokenizer and processor files)
asks here first, with os.stat, before any open.
"""
from __future__ import annotations

import os
import stat
from pathlib import Path

from .parse import SettingError

_KINDS = (
    (stat.S_ISFIFO, "a FIFO (named pipe): reading it would wait for a writer, forever if none comes"),
    (stat.S_ISCHR, "a character device: reading it may never end"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISDIR, "a folder"),
)


def kind_of(mode: int) -> str:
    """What a stat mode names, in words (for messages)."""
    return next((words for test, words in _KINDS if test(mode)), "not a regular file")


def regular_file(path: str | os.PathLike, what: str, error: type[Exception] = SettingError) -> Path:
    """`path` when it is a regular file (a symbolic link to one counts). Missing: FileNotFoundError;
    anything else (FIFO, device, socket, folder): `error`, naming `what`, the path and what it is."""
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        raise FileNotFoundError(f"{what}: no such file {str(path)!r}. Check the path.") from None
    except OSError as failure:
        raise error(f"{what}: cannot inspect {str(path)!r} ({failure.strerror or failure}). Check the path and "
                    "its permissions.") from None
    if not stat.S_ISREG(mode):
        raise error(f"{what}: {str(path)!r} is {kind_of(mode)}; it is not a regular file and was not opened. "
                    "Give the path of a regular file.")
    return path


def is_regular_file(path: str | os.PathLike, what: str, error: type[Exception] = SettingError) -> bool:
    """For optional files (a config.json beside the weights): False when nothing is there, True
    for a regular file, `error` for anything else (which a plain `Path.is_file()` would skip
    silently, ignoring what the user put there)."""
    try:
        mode = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return False
    if not stat.S_ISREG(mode):
        regular_file(path, what, error)
    return True


def check_folder_files(folder: str | os.PathLike, what: str, error: type[Exception] = SettingError) -> None:
    """Every entry of `folder` (not recursive) is a regular file or a folder: a folder of files
    that a reader looks up by name (tokenizer, processor) holds no FIFO, device or socket."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    for entry in sorted(folder.iterdir()):
        try:
            mode = os.stat(entry).st_mode
        except OSError:
            continue  # a dangling link: the reader reports it as missing if it needs it
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            regular_file(entry, what, error)
