"""Files and folders the runner writes, safely: locks, atomic and exclusive writes with marked
temporary names, output folders claimed so that two commands never share one, `inside` (a path
that stays in a folder), and the removal of leftovers of interrupted writes. How folders are
claimed and leftovers found: docs/folders.md.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Union

from . import failpoints
from .errors import EXIT_FAILED, EXIT_REFUSED, ConfigError, Stop, output_fix
from .owner import describe, owner_tags, pid_alive

logger = logging.getLogger("runner")

_NO_HARD_LINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK, errno.ENOSYS, errno.EXDEV}


# ------------------------------------------------------------------- writing

TEMP_MARK = ".runner-tmp"  # `.<name>.runner-tmp<pid>`: only the runner writes such names


def temp_path(path: Path, pid: Optional[int] = None) -> Path:
    """The temporary name of a write to `path`: hidden, beside it, marked as the runner's and
    carrying this process's pid (remove_stale_temp_files removes those of dead
    processes, in the runner's own folders only)."""
    return path.with_name(f".{path.name}{TEMP_MARK}{os.getpid() if pid is None else pid}")


@contextmanager
def locked(path: Path) -> Iterator[None]:
    """Exclusive use of `path` among processes (flock on a hidden `.NAME.lock` beside it), e.g. to
    create, migrate or build it once when several commands start together."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f".{path.name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def atomic_write(path: Path, write: Callable[[Path], None]) -> Path:
    """`write(tmp)` beside `path`, then rename: a crash never leaves a truncated file under
    the final name, and a failed write leaves no temporary file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def exclusive_write(path: Path, write: Callable[[Path], None]) -> Path:
    """Like `atomic_write`, but never replaces a file: FileExistsError when `path` exists.
    The complete file is hard-linked to its name (the link fails if the name is taken); on
    a file system without hard links the name is claimed with O_EXCL first."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        write(tmp)
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise FileExistsError(errno.EEXIST, "exists already (an output is never overwritten)", str(path)) from None
        except OSError as error:
            if error.errno not in _NO_HARD_LINKS:
                raise
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


# ------------------------------------------------------------------ claiming

TEMP_NAME = re.compile(r"^\..+" + re.escape(TEMP_MARK) + r"(\d+)$")  # temp_path's names
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
    """Delete the leftovers of interrupted writes (`.<name>.runner-tmp<pid>`, temp_path)
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
