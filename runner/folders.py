"""Output folders that are never shared, and the leftovers of interrupted writes.

`${unique_dir:outputs/multirun/<date>/<time>}` (conf/config.yaml) claims the folder by
creating it: `os.mkdir` either creates it or fails, so of two processes started in the same
second one gets `<time>` and the other `<time>-2` (then `-3`, ...). The claim is made once per
process and path; Hydra copies the resolver cache from the sweep's config to each job's, so
every job of a sweep sees the same folder.

Temporary files of atomic writes are `.<name>.tmp<pid>` beside their target
(runner.report.temp_path); `remove_stale_temp_files` deletes those whose process is gone.
"""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Iterable

from .errors import EXIT_FAILED, Stop, output_fix
from .owner import pid_alive

logger = logging.getLogger("runner")

TEMP_NAME = re.compile(r"^\..+\.tmp(\d+)$")
_CLAIMED: dict[str, str] = {}


def claim_dir(base: str) -> str:
    """A new folder `base`, or `base-2`, `base-3`, ... when taken; created before returning."""
    if base in _CLAIMED:
        return _CLAIMED[base]
    path = Path(base)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        for n in range(1, 10_000):
            name = base if n == 1 else f"{base}-{n}"
            try:
                os.mkdir(name)
            except FileExistsError:
                continue
            _CLAIMED[base] = name
            return name
    except OSError as error:
        raise Stop(f"cannot create the output folder {path.resolve()}: {error.strerror or error}. "
                   f"Fix: {output_fix(path.parent.resolve(), error.errno, resume=False)}", EXIT_FAILED) from None
    raise Stop(f"{base}: 10000 folders of that name exist. Fix: clean up {path.parent}", EXIT_FAILED)


def release_claim(folder: Path) -> None:
    """Remove a folder this process claimed, if it is still empty (a refused run leaves none)."""
    claimed = {Path(p).resolve() for p in _CLAIMED.values()}
    folder = Path(folder).resolve()
    if folder in claimed:
        try:
            folder.rmdir()
        except OSError:  # not empty, or gone
            pass


def register_resolvers() -> None:
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("unique_dir"):
        OmegaConf.register_new_resolver("unique_dir", claim_dir, use_cache=True)


def holds_results(folder: Path) -> list[str]:
    """What in `folder` shows that a run or sweep already wrote there (empty: free to use)."""
    marks = ("image.png", "job.json", "jobs.csv", "sweep.json", "grid.png", "report.html")
    found = [m for m in marks if (folder / m).exists()]
    if folder.is_dir():
        found += sorted(p.name for p in folder.iterdir() if p.is_dir() and (p / "job.json").exists())[:3]
    return found


def remove_stale_temp_files(folders: Iterable[Path]) -> list[Path]:
    """Delete `.<name>.tmp<pid>` files under `folders` whose process no longer runs; returns them."""
    removed = []
    seen: set[Path] = set()
    for folder in folders:
        folder = Path(folder)
        if not folder.is_dir() or folder.resolve() in seen:
            continue
        seen.add(folder.resolve())
        for root, _dirs, files in os.walk(folder):
            for name in files:
                m = TEMP_NAME.match(name)
                if m and not pid_alive(int(m.group(1))):
                    path = Path(root) / name
                    try:
                        path.unlink()
                        removed.append(path)
                    except OSError as error:
                        logger.warning("Could not remove the leftover %s: %s", path, error)
    return removed
