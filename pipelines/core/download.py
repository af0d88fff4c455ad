"""Resolve a ModelConfig to local files, fetching the missing ones from ModelScope or HuggingFace.

Where the files are and which settings apply is `repo_paths.py`'s; what is done with the files on
disk alone is `local_files.py`'s.

Each load lists the repo on the hub and fetches the matching files that are missing (present
files are only checked against the listed size, never fetched again). A checkpoint's
`config.json` (the one in the folder of the weights a pattern matches) is fetched with them,
since the loader reads it beside the weights; it is not added to the returned paths unless the
pattern matched it. With skip download there is no network call at all. When the hub cannot be
asked (or answers 404 / 401 / 403) but every needed file is on disk, loading goes on with a
warning; with files missing, the error says what the hub answered (`RemoteUnavailable.kind`:
no such model, gated or private, unreachable, a server error) and what to do about it.

Integrity: the client downloads into a staging folder (`<base>/.diffsynth/staging/...`, where
its partial files wait to be resumed); a file is checked there (size, and sha256 or git blob
id where the hub gives one) and only then renamed to its final name, so a final name always
holds a complete file. One process at a time fetches a given model (a file lock under
`<base>/.diffsynth/locks`); a process that waited finds the files there and fetches nothing.
Safetensors files are checked (header and size) before they are handed to the loader. The
last listing of each repo is kept in `<base>/.diffsynth/manifests` so offline loads can name
exactly which files are missing.
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from filelock import FileLock, Timeout
from tqdm import tqdm

from .download_errors import DownloadError, MissingModelFilesError
from .hubs import FINAL_KINDS, HUBS, NOT_FOUND, UNAUTHORIZED, Hub, Listing, RemoteFile, RemoteUnavailable
from .local_files import (
    check_safetensors,
    from_disk,
    glob_files,
    hub_advice,
    hub_said,
    local_result,
    raise_corrupt,
    save_manifest,
)
from .model_config import ModelConfig
from .repo_paths import RepoRequest, check_listing, companions, matches, switch_source

logger = logging.getLogger(__name__)

RETRIES = 3  # whole-file retries on top of the client's own (HTTP errors, wrong size or hash)
RETRY_WAIT_S = 2.0  # before the first retry; doubled for each further one
LOCK_NOTICE_S = 5.0  # log that we wait for another process after this long


# ---------------------------------------------------------------------- summary


@dataclass
class FetchedFile:
    model_id: str
    path: str  # in the repo
    size: int
    local: Path


@dataclass
class FetchSummary:
    """What a fetch did: files fetched, files already present, repos used offline."""

    fetched: list[FetchedFile] = field(default_factory=list)
    present: int = 0
    present_bytes: int = 0
    offline: list[str] = field(default_factory=list)  # "model_id: reason"
    seconds: float = 0.0

    @property
    def fetched_bytes(self) -> int:
        return sum(f.size for f in self.fetched)

    def __str__(self) -> str:
        text = (f"fetched {len(self.fetched)} file(s), {_size(self.fetched_bytes)}, in {self.seconds:.1f} s; "
                f"{self.present} file(s) ({_size(self.present_bytes)}) were already present")
        if self.offline:
            text += f"; used without the hub: {'; '.join(self.offline)}"
        return text

    def lines(self) -> list[str]:
        """A human summary, one line per fetched file then the totals."""
        return [f"  {f.model_id}/{f.path} ({_size(f.size)}) -> {f.local}" for f in self.fetched] + [str(self)]


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


# ---------------------------------------------------------------------- public entry points


def resolve_files(config: ModelConfig, download: bool | None = None) -> list[Path]:
    """The local files (for a folder pattern such as `tokenizer/`, the folder) of a config,
    fetching the missing ones first. `download=False` resolves from disk only (no network), as
    skip-download does; None follows the config and the variables."""
    if config.path is not None:
        return _resolve_paths(config)
    summary = FetchSummary()
    started = time.perf_counter()
    request = RepoRequest.of(config, download)
    by_pattern = _ensure(request, request.patterns, summary)
    summary.seconds = time.perf_counter() - started
    if summary.fetched:
        logger.info("%s from %s: %s", config.model_id, request.source, summary)
    found: list[Path] = []
    for pattern in request.patterns:
        found.extend(p for p in by_pattern[pattern] if p not in found)
    return found


def fetch(configs: Iterable[ModelConfig | None], download: bool | None = None) -> FetchSummary:
    """Fetch everything the configs need (what the runner's download command calls). Configs of
    the same model, source and folder share one listing and one lock. Path configs are checked
    for existence; `None` entries are skipped. Returns the summary (also logged)."""
    started = time.perf_counter()
    summary = FetchSummary()
    groups: dict[tuple, tuple[RepoRequest, list[str]]] = {}
    for config in configs:
        if config is None:
            continue
        if config.path is not None:
            _resolve_paths(config)
            continue
        request = RepoRequest.of(config, download)
        key = (request.base.resolve(), request.source, request.model_id, request.skip)
        if key not in groups:
            groups[key] = (request, [])
        groups[key][1].extend(p for p in request.patterns if p not in groups[key][1])
    for request, patterns in groups.values():
        _ensure(request, patterns, summary)
    summary.seconds = time.perf_counter() - started
    for line in summary.lines():
        logger.info(line)
    return summary


def _resolve_paths(config: ModelConfig) -> list[Path]:
    paths = config.path if isinstance(config.path, (list, tuple)) else [config.path]
    resolved = [Path(p) for p in paths]
    missing = [str(p) for p in resolved if not p.exists()]
    if missing:
        raise FileNotFoundError(
            f"ModelConfig(path=...) names files that do not exist: {', '.join(missing)}. "
            "Check the path, or use model_id=... to fetch the model."
        )
    return resolved


# ---------------------------------------------------------------------- one model repo


def _ensure(request: RepoRequest, patterns: list[str], summary: FetchSummary) -> dict[str, list[Path]]:
    """Make every file of `patterns` present and verified (with the config.json beside matched
    weights); return the local paths per pattern."""
    if request.skip:
        return _without_the_hub(request, patterns, None, None, summary)
    hub = HUBS[request.source]()
    endpoint = hub.endpoint
    try:
        listing = _list(hub, request.model_id)
    except RemoteUnavailable as error:
        return _without_the_hub(request, patterns, error, endpoint, summary)
    check_listing(request, listing, patterns, endpoint)
    save_manifest(request, listing, endpoint)

    wanted: dict[str, list[RemoteFile]] = {p: [f for f in listing.files if matches(f.path, p)] for p in patterns}
    for pattern, files in wanted.items():
        if not files and not glob_files(request.root, pattern):
            raise MissingModelFilesError(
                f"No file matches pattern {pattern!r} in {request.root} nor in the repo {request.model_id!r} on "
                f"{request.source} ({len(listing.files)} files there) {request.where([pattern], endpoint)}. "
                "Check the model id and the pattern (globs over paths in the repo; a trailing / names a folder)."
            )
    matched = {f.path: f for files in wanted.values() for f in files}
    needed = list(matched.values()) + [f for f in companions(listing.files, matched.values()) if f.path not in matched]
    already = len(summary.fetched)
    if _missing(request, needed, patterns, endpoint):
        _fetch_locked(request, hub, listing, needed, patterns, endpoint, summary)
    fetched_now = {f.path for f in summary.fetched[already:]}
    present = [f for f in needed if f.path not in fetched_now]
    summary.present += len(present)
    summary.present_bytes += sum(f.size for f in present)

    result = {}
    for pattern, files in wanted.items():
        paths = [f.path for f in files]
        result[pattern] = local_result(request.root, pattern, paths) if files else glob_files(request.root, pattern)
    check_safetensors(request, patterns, result, endpoint)
    return result


def _without_the_hub(request: RepoRequest, patterns: list[str], hub_error: RemoteUnavailable | None,
                     endpoint: str | None, summary: FetchSummary) -> dict[str, list[Path]]:
    """Resolve from disk (`local_files.from_disk`): skip-download (`hub_error` None), or the hub
    could not be asked or said no; then a warning saying so, and the files counted as present."""
    result = from_disk(request, patterns, hub_error, endpoint)
    if hub_error is not None:
        if hub_error.kind in (NOT_FOUND, UNAUTHORIZED):
            logger.warning("%s Every needed file is already in %s, going on with them; a file missing later cannot "
                           "be fetched until this is fixed: %s", hub_said(request, hub_error, endpoint),
                           request.root, hub_advice(request, hub_error, endpoint))
        else:
            logger.warning("Could not ask %s at %s for %s (%s: %s); every needed file is already in %s, going on "
                           "with them.", request.source, endpoint, request.model_id, hub_error.kind,
                           hub_error.reason, request.root)
        summary.offline.append(f"{request.model_id}: {request.source} {hub_error.kind}: {hub_error.reason}")
    for paths in result.values():
        files = [f for p in paths for f in (sorted(p.rglob("*")) if p.is_dir() else [p]) if f.is_file()]
        summary.present += len(files)
        summary.present_bytes += sum(f.stat().st_size for f in files)
    check_safetensors(request, patterns, result, None)
    return result


def _list(hub: Hub, model_id: str) -> Listing:
    for attempt in range(RETRIES + 1):
        try:
            return hub.list_files(model_id)
        except RemoteUnavailable as error:
            if not error.retryable or hub.lists_with_retries or attempt == RETRIES:
                raise
            wait = RETRY_WAIT_S * 2 ** attempt
            logger.warning("Listing %s on %s failed (%s); retrying in %.1f s", model_id, hub.name, error.reason, wait)
            time.sleep(wait)
    raise AssertionError("unreachable")


def _missing(request: RepoRequest, needed: list[RemoteFile], patterns: list[str], endpoint: str) -> list[RemoteFile]:
    """Files not on disk; a file on disk whose size differs from the listing is an error."""
    missing = []
    for remote in needed:
        local = request.root / remote.path
        if not local.is_file():
            missing.append(remote)
        elif local.stat().st_size != remote.size:
            raise_corrupt(request, patterns, endpoint, local,
                           f"it is {local.stat().st_size} bytes but {request.source} lists {remote.size} bytes "
                           "(truncated, or out of date)")
    return missing


def _fetch_locked(request: RepoRequest, hub: Hub, listing: Listing, needed: list[RemoteFile], patterns: list[str],
                  endpoint: str, summary: FetchSummary) -> None:
    locks = request.state / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(locks / (request.model_id.replace("/", "--") + ".lock")))
    waited = time.monotonic()
    timeout = 0.0
    while True:
        try:
            lock.acquire(timeout=timeout)
            break
        except Timeout:
            logger.info("Another process is fetching %s into %s; waiting for it (lock %s, %.0f s so far)",
                        request.model_id, request.root, lock.lock_file, time.monotonic() - waited)
            timeout = LOCK_NOTICE_S
    try:
        missing = _missing(request, needed, patterns, endpoint)  # another process may have fetched them
        if missing:
            _fetch(request, hub, listing, missing, patterns, endpoint, summary)
    finally:
        lock.release()


def _fetch(request: RepoRequest, hub: Hub, listing: Listing, missing: list[RemoteFile], patterns: list[str],
           endpoint: str, summary: FetchSummary) -> None:
    staging = request.state / "staging" / request.source / request.model_id
    staging.mkdir(parents=True, exist_ok=True)
    total = sum(f.size for f in missing)
    logger.info("Fetching %d file(s) (%s) of %s from %s into %s", len(missing), _size(total),
                request.model_id, endpoint, request.root)
    bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
               desc=f"{request.model_id} ({len(missing)} files from {request.source})")
    problems: dict[str, RemoteUnavailable] = {}
    remaining = list(missing)
    attempts = 0
    try:
        while remaining and attempts <= RETRIES:
            if attempts:
                if all(problems[f.path].kind in FINAL_KINDS for f in remaining):
                    break  # a 404 / 401 / 403 answers the same each time
                wait = RETRY_WAIT_S * 2 ** (attempts - 1)
                logger.warning("Retrying %d file(s) of %s in %.1f s (attempt %d of %d): %s", len(remaining),
                               request.model_id, wait, attempts + 1, RETRIES + 1,
                               "; ".join(f"{p}: {e.reason}" for p, e in problems.items()))
                time.sleep(wait)
            attempts += 1
            errors = hub.download(request.model_id, listing, [f.path for f in remaining], staging, bar.update)
            remaining = _keep_verified(request, remaining, staging, errors, problems, summary)
            bar.n = sum(f.size for f in summary.fetched if f.model_id == request.model_id)
            bar.refresh()
    finally:
        bar.close()
    if remaining:
        raise _fetch_error(request, missing, remaining, problems, attempts, patterns, endpoint, staging)
    _remove_staging(request, staging)


def _keep_verified(request: RepoRequest, remaining: list[RemoteFile], staging: Path,
                   errors: dict[str, RemoteUnavailable], problems: dict[str, RemoteUnavailable],
                   summary: FetchSummary) -> list[RemoteFile]:
    """Move the files that arrived whole and verified to their final names; return the others
    (`problems` says why each failed; a staged file that is wrong is deleted, never kept)."""
    still = []
    for remote in remaining:
        staged = staging / remote.path
        if staged.is_file():
            why = _verify(staged, remote)
            problem = None if why is None else RemoteUnavailable(why, True, "other")
        else:
            problem = errors.get(remote.path) or RemoteUnavailable("the client returned without the file", True,
                                                                   "other")
        if problem is None:
            final = request.root / remote.path
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(staged, final)
            summary.fetched.append(FetchedFile(request.model_id, remote.path, remote.size, final))
            problems.pop(remote.path, None)
            continue
        if staged.is_file():
            staged.unlink()  # complete in the client's eyes but wrong: never keep it
        problems[remote.path] = problem
        still.append(remote)
    return still


def _fetch_error(request: RepoRequest, missing: list[RemoteFile], remaining: list[RemoteFile],
                 problems: dict[str, RemoteUnavailable], attempts: int, patterns: list[str], endpoint: str,
                 staging: Path) -> DownloadError:
    kinds = {problems[f.path].kind for f in remaining}
    kind = kinds.pop() if len(kinds) == 1 else None
    first = problems[remaining[0].path]
    if kind == UNAUTHORIZED:
        how = (f"{request.source} refused the files (HTTP {first.status or '401/403'}): the repo is gated or "
               f"private. {hub_advice(request, first, endpoint)}")
    elif kind == NOT_FOUND:
        how = (f"{request.source} lists these files but answers 404 for them: the repo may have changed since "
               f"it was listed. Load again; if it persists, try the other source: {switch_source(request.source)}.")
    else:
        how = (f"Load again to fetch the rest (a partial file in {staging} is resumed where the client "
               f"supports it), or try the other source: {switch_source(request.source)}.")
    return DownloadError(
        f"Could not fetch {len(remaining)} of {len(missing)} file(s) of {request.model_id!r} after "
        f"{attempts} attempt(s) {request.where(patterns, endpoint)}: "
        + "; ".join(f"{f.path}: {problems[f.path].reason.rstrip('.')}" for f in remaining)
        + f". Nothing incomplete was left under a final name; the files already fetched stay. {how}",
        kind,
    )


def _remove_staging(request: RepoRequest, staging: Path) -> None:
    shutil.rmtree(staging, ignore_errors=True)
    for parent in staging.parents:  # drop the emptied <owner>/ and <source>/ folders too
        if parent == request.state or not parent.is_relative_to(request.state):
            break
        try:
            parent.rmdir()
        except OSError:
            break


def _verify(path: Path, remote: RemoteFile) -> str | None:
    size = path.stat().st_size
    if size != remote.size:
        return f"received {size} bytes but the hub lists {remote.size}"
    if remote.sha256:
        digest = hashlib.sha256()
    elif remote.git_sha1:
        digest = hashlib.sha1(b"blob %d\0" % size)
    else:
        return None
    with open(path, "rb") as f:
        while block := f.read(8 << 20):
            digest.update(block)
    expected = remote.sha256 or remote.git_sha1
    if digest.hexdigest() != expected.lower():
        kind = "sha256" if remote.sha256 else "git blob id"
        return f"{kind} {digest.hexdigest()[:16]}... differs from the hub's {expected[:16]}..."
    return None
