"""Output folders that are never shared, and the leftovers of interrupted writes.

`${unique_dir:outputs/multirun/<date>/<time>}` (conf/config.yaml) claims the folder by
creating it: `os.mkdir` either creates it or fails, so of two processes started in the same
second one gets `<time>` and the other `<time>-2` (then `-3`, ...). The claim is made once per
process and path; Hydra copies the resolver cache from the sweep's config to each job's, so
every job of a sweep sees the same folder.

A run or sweep then claims its folder (`claim_folder`) before writing anything into it, by
creating `.runner-claim` with O_EXCL: two commands given the same explicit folder
(`hydra.sweep.dir=...`) cannot both get it, and the one refused writes nothing there.

Temporary files of atomic writes are `.<name>.runner-tmp<pid>` beside their target
(runner.report.temp_path); `remove_stale_temp_files` deletes those whose process is gone, and
only in the runner's own folders (claimed, or holding its sweep.json / job.json) and stores.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Union

from . import failpoints
from .errors import EXIT_FAILED, EXIT_REFUSED, ConfigError, Stop, output_fix
from .owner import describe, owner_tags, pid_alive
from .report import TEMP_MARK

logger = logging.getLogger("runner")

TEMP_NAME = re.compile(r"^\..+" + re.escape(TEMP_MARK) + r"(\d+)$")  # runner.report.temp_path
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


CLAIM_FILE = ".runner-claim"  # a run or sweep folder's mark: created with O_EXCL before anything else


def holds_results(folder: Path) -> list[str]:
    """What in `folder` shows that a run or sweep already wrote there (empty: free to use)."""
    marks = (CLAIM_FILE, "image.png", "job.json", "jobs.csv", "sweep.json", "grid.png", "report.html")
    found = [m for m in marks if (folder / m).exists()]
    if folder.is_dir():
        found += sorted(p.name for p in folder.iterdir() if p.is_dir() and (p / "job.json").exists())[:3]
    return found


@dataclass
class Claim:
    folder: Path
    created: bool  # the folder did not exist before the claim

    def release(self) -> None:
        """Undo the claim of a run or sweep refused before it wrote anything."""
        (self.folder / CLAIM_FILE).unlink(missing_ok=True)
        if self.created:
            with contextlib.suppress(OSError):  # not empty: something was written after all
                self.folder.rmdir()


def claim_folder(folder: Path, key: str) -> Claim:
    """Make `folder` this command's, before anything is written into it: the claim file is
    created with O_EXCL, so of two commands given the same folder exactly one gets it; the
    other is refused (exit 2) having written nothing there. `key`: the config key that named
    the folder (hydra.sweep.dir / hydra.run.dir)."""
    folder = Path(folder)
    fix = f"give another {key}, or leave {key} at its default (a new folder each time)"
    used = holds_results(folder)
    if used:
        raise Stop(str(ConfigError(key, f"{folder} holds the results of an earlier run ({', '.join(used)})", fix)),
                   EXIT_REFUSED)
    failpoints.hold("claim")  # tests: two commands between the check above and the claim
    created = not folder.exists()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder / CLAIM_FILE, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        raise Stop(str(ConfigError(key, f"{folder} was claimed at the same moment by another command "
                                   f"({_claimant(folder)}): it was left untouched", fix)), EXIT_REFUSED) from None
    except OSError as error:
        raise Stop(f"cannot create the output folder {folder.resolve()}: {error.strerror or error}. "
                   f"Fix: {output_fix(folder.resolve().parent, error.errno, resume=False)}", EXIT_FAILED) from None
    with os.fdopen(fd, "w") as f:
        json.dump({"format": "runner.claim/1", **owner_tags()}, f)
    return Claim(folder, created)


def _claimant(folder: Path) -> str:
    try:
        return describe(json.loads((folder / CLAIM_FILE).read_text()))
    except (OSError, ValueError, AttributeError):
        return "its claim is being written"


def inside(root: Path, path: Union[str, Path], base: Optional[Path] = None) -> Optional[Path]:
    """`path` (relative to `base`, default `root`) resolved, symlinks included, if it lies in
    `root`; None when it lies outside (an absolute path elsewhere, `../`, a link out)."""
    root = Path(root).resolve()
    resolved = (Path(base if base is not None else root) / path).resolve()
    return resolved if resolved == root or root in resolved.parents else None


# ----------------------------------------------------------------- leftovers


def _record_kind(folder: Path) -> Optional[str]:
    """The kind of runner folder `folder` is by what it holds: its claim or sweep.json ("sweep":
    everything below is the runner's too), its job.json ("job"), or nothing of the runner (None)."""
    for name, kind in ((CLAIM_FILE, "claim"), ("sweep.json", "runner.sweep"), ("job.json", "runner.job")):
        path = folder / name
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and str(data.get("format", "")).startswith(("runner.claim", kind)):
            return "job" if kind == "runner.job" else "sweep"  # a claimed folder: all of it is ours
    return None


def _inside_a_sweep(folder: Path) -> bool:
    return any(_record_kind(p) == "sweep" for p in Path(folder).resolve().parents)


def _stale(folder: Path, names: Iterable[str]) -> list[Path]:
    out = []
    for name in names:
        m = TEMP_NAME.match(name)
        if m and not pid_alive(int(m.group(1))):
            out.append(folder / name)
    return out


def remove_stale_temp_files(folders: Iterable[Path], stores: Iterable[Path] = ()) -> list[Path]:
    """Delete the leftovers of interrupted writes (`.<name>.runner-tmp<pid>`, runner.report.temp_path)
    whose process no longer runs: under `folders`, only in folders that are the runner's (they hold
    its claim, sweep.json or job.json, or lie in a sweep folder); in `stores` (MLflow store
    folders holding mlflow.db), their top level. Nothing else is touched. Returns them."""
    found: list[Path] = []
    for store in {Path(s).resolve() for s in stores}:
        if (store / "mlflow.db").is_file() or (store / "fingerprints.json").is_file():
            found += _stale(store, (p.name for p in store.iterdir() if p.is_file()))
    for root in dict.fromkeys(Path(f).resolve() for f in folders if Path(f).is_dir()):
        in_sweep = {str(root)} if _inside_a_sweep(root) else set()
        for here, dirs, files in os.walk(root):
            kind = _record_kind(Path(here))
            if kind == "sweep" or here in in_sweep:
                in_sweep.update(os.path.join(here, d) for d in dirs)
            if kind is not None or here in in_sweep:
                found += _stale(Path(here), files)
    removed = []
    for path in dict.fromkeys(found):
        try:
            path.unlink()
            removed.append(path)
        except OSError as error:
            logger.warning("Could not remove the leftover %s: %s", path, error)
    return removed
