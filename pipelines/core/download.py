"""Resolve a ModelConfig to local files, fetching the missing ones from ModelScope or HuggingFace.

Layout: `model_id` + `origin_file_pattern` resolve as `<base>/<model_id>/<path in repo>`.
Patterns are globs over repo paths (`*` stays inside one folder, `**` crosses folders), a
trailing `/` names a whole folder (everything under it), and a list of patterns is their union.
Nothing resolves outside `<base>/<model_id>`: a model id (`owner/name`, or a bare `name`), a
pattern and every file path a hub lists are refused (`UnsafePathError`) when they hold a `..`
or `.` segment, start with `/`, `~` or a drive letter, or hold a backslash (`check_repo_path`).

Precedence (the first that is set wins):
- base folder: `ModelConfig.local_model_path` > `DIFFSYNTH_MODEL_BASE_PATH` > `./models`;
- source: `ModelConfig.download_source` > `DIFFSYNTH_DOWNLOAD_SOURCE` > `modelscope`
  (allowed: modelscope, huggingface);
- skip download: `ModelConfig.skip_download` (True or False) > `DIFFSYNTH_SKIP_DOWNLOAD`
  (true/false, 1/0, yes/no) > False;
- endpoint: the client's own variables, `MODELSCOPE_ENDPOINT` (or the deprecated
  `MODELSCOPE_DOMAIN`) and `HF_ENDPOINT` (`HF_HUB_DISABLE_XET=1` for a plain-HTTP mirror).

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
import json
import logging
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path

from filelock import FileLock, Timeout
from tqdm import tqdm

from .hubs import (
    FINAL_KINDS,
    HUBS,
    NOT_FOUND,
    SERVER_ERROR,
    UNAUTHORIZED,
    UNREACHABLE,
    Hub,
    Listing,
    RemoteFile,
    RemoteUnavailable,
)
from .model_config import ModelConfig
from .parse import SettingError
from .shards import SAFETENSORS_SUFFIXES, TORCH_SUFFIXES, CheckpointError, read_header

logger = logging.getLogger(__name__)

DEFAULT_BASE_PATH = "./models"
DEFAULT_SOURCE = "modelscope"
SOURCES = tuple(HUBS)
STATE_DIR = ".diffsynth"
RETRIES = 3  # whole-file retries on top of the client's own (HTTP errors, wrong size or hash)
RETRY_WAIT_S = 2.0  # before the first retry; doubled for each further one
LOCK_NOTICE_S = 5.0  # log that we wait for another process after this long
TRUE_WORDS, FALSE_WORDS = ("1", "true", "yes", "on"), ("", "0", "false", "no", "off")


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


# ---------------------------------------------------------------------- config -> settings


def model_base_path(config: ModelConfig) -> Path:
    if config.local_model_path is not None:
        return Path(config.local_model_path)
    return Path(os.environ.get("DIFFSYNTH_MODEL_BASE_PATH") or DEFAULT_BASE_PATH)


def parse_download_source(value: object, where: str) -> str:
    """`modelscope` or `huggingface` from `value`, in any case and with surrounding spaces
    (`HuggingFace` -> `huggingface`). Anything else raises ValueError naming `where` (the field
    or variable the value came from, e.g. `model.download_source`) and the allowed values."""
    source = value.strip().lower() if isinstance(value, str) else None
    if source not in SOURCES:
        raise ValueError(f"{where}={value!r} is not a download source; allowed: {', '.join(SOURCES)} "
                         "(in any case).")
    return source


def download_source(config: ModelConfig) -> str:
    if config.download_source is not None:
        value, origin = config.download_source, "ModelConfig.download_source"
    else:
        value, origin = os.environ.get("DIFFSYNTH_DOWNLOAD_SOURCE") or DEFAULT_SOURCE, "DIFFSYNTH_DOWNLOAD_SOURCE"
    try:
        return parse_download_source(value, origin)
    except ValueError as error:
        where = ""
        if config.model_id:
            where = f", models folder={model_base_path(config).absolute()}"
        raise ValueError(f"{error} Set it to one of them, or unset it (for {config.describe()}{where}).") from None


_DRIVE = re.compile(r"^[A-Za-z]:")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_WHAT = {"model_id": "model_id", "pattern": "origin_file_pattern", "file": "file path"}
_FIX = {
    "model_id": "A model id is the hub's owner/name (e.g. 'Qwen/Qwen-Image'), resolved as "
                "<models folder>/<owner>/<name>; to use files elsewhere, point ModelConfig.local_model_path / "
                "DIFFSYNTH_MODEL_BASE_PATH at the folder that holds <owner>/<name>, or give ModelConfig(path=...).",
    "pattern": "A pattern is a glob relative to the repo root (e.g. 'transformer/*.safetensors', "
               "'**/config.json', or 'tokenizer/' for a whole folder); to load a file from elsewhere, give "
               "ModelConfig(path=...).",
    "file": "Nothing was fetched: the hub (or a mirror or proxy in between) is broken or malicious. Check the "
            "endpoint (MODELSCOPE_ENDPOINT / HF_ENDPOINT) or use the other source.",
}


def path_problem(value: object, what: str) -> str | None:
    """What makes `value` unsafe as a `what` (model_id | pattern | file), or None when it is fine.
    See check_repo_path."""
    if what not in _FIX:
        raise ValueError(f"path_problem: what={what!r}; use model_id, pattern or file.")
    if not isinstance(value, str):
        return f"is a {type(value).__name__}, not a string"
    problem = _text_problem(value)
    if problem is not None:
        return problem
    parts = value.split("/")
    if what == "pattern" and len(parts) > 1 and parts[-1] == "":
        parts = parts[:-1]  # a trailing / names a folder
    for part in parts:
        if part == "":
            return "has an empty folder name (a // or a trailing /)"
        if part in (".", ".."):
            return f"has a {part!r} segment"
    if what == "model_id":
        if ":" in value:
            return "holds a ':'"
        if len(parts) > 2:
            return f"has {len(parts)} parts (a model id is owner/name)"
        if parts[0] == STATE_DIR:
            return f"is under {STATE_DIR}/, the folder where downloads keep their state"
    return None


def _text_problem(value: str) -> str | None:
    """What in the characters of a repo path could leave the repo folder."""
    if not value.strip():
        return "is empty"
    if _CONTROL.search(value):
        return "holds a control character"
    if "\\" in value:
        return "holds a backslash (use / between folders)"
    if value.startswith("/"):
        return "is an absolute path (it starts with /)"
    if value.startswith("~"):
        return "starts with ~ (a home folder)"
    if _DRIVE.match(value):
        return "starts with a drive letter"
    return None


def check_repo_path(value: object, what: str, where: str = "") -> str:
    """The one check that keeps everything inside `<base>/<model_id>`, for a model id (`what` =
    "model_id": `owner/name` or a bare `name`), an `origin_file_pattern` ("pattern": a glob relative
    to the repo root, a trailing / for a folder) and a path a hub lists ("file"). Refused: a `..` or
    `.` segment, a leading `/` or `~`, a drive letter (`C:`), a backslash, an empty folder name,
    a control character; for a model id also a `:`, more than two parts, or `.diffsynth/...`.
    Returns `value`; raises UnsafePathError saying what is wrong, `where` (appended as given) and
    how to write it instead."""
    problem = path_problem(value, what)
    if problem is None:
        return value
    raise UnsafePathError(f"{_WHAT[what]} {value!r} {problem}: refused, since it must name a place inside the "
                          f"models folder{where}. {_FIX[what]}", value, what, problem)


def model_folder(config: ModelConfig) -> Path:
    """`<base>/<model_id>` of a config, its model id checked (check_repo_path): the folder a
    builder of generated models (the runner's `model.build`) may write, and nothing outside it."""
    base = model_base_path(config)
    check_repo_path(config.model_id, "model_id", f" (models folder={base.absolute()})")
    return base / config.model_id


def _switch_source(source: str) -> str:
    other = _other(source)
    return (f"ModelConfig(download_source={other!r}) (runner: model.download_source={other}), or "
            f"DIFFSYNTH_DOWNLOAD_SOURCE={other} where that field is unset")


def skip_download(config: ModelConfig) -> bool:
    if config.skip_download is not None:
        return bool(config.skip_download)
    raw = os.environ.get("DIFFSYNTH_SKIP_DOWNLOAD", "")
    if raw.strip().lower() in TRUE_WORDS:
        return True
    if raw.strip().lower() in FALSE_WORDS:
        return False
    raise ValueError(f"DIFFSYNTH_SKIP_DOWNLOAD={raw!r} is not a yes/no value: set it to true or false "
                     "(1/0, yes/no, on/off), or unset it.")


def patterns_of(config: ModelConfig) -> list[str]:
    patterns = config.origin_file_pattern or "*"
    return [patterns] if isinstance(patterns, str) else list(patterns) or ["*"]


def matches(path: str, pattern: str) -> bool:
    """Whether a repo path matches a pattern, with the semantics of `Path.glob` (plus `dir/`)."""
    if pattern.endswith("/"):
        return path.startswith(pattern.lstrip("/"))
    return _match_parts(path.split("/"), [p for p in pattern.strip("/").split("/") if p])


def _match_parts(parts: list[str], pats: list[str]) -> bool:
    if not pats:
        return not parts
    if pats[0] == "**":
        return any(_match_parts(parts[i:], pats[1:]) for i in range(len(parts) + 1))
    return bool(parts) and fnmatchcase(parts[0], pats[0]) and _match_parts(parts[1:], pats[1:])


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
    request = _Request.of(config, download)
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
    groups: dict[tuple, tuple[_Request, list[str]]] = {}
    for config in configs:
        if config is None:
            continue
        if config.path is not None:
            _resolve_paths(config)
            continue
        request = _Request.of(config, download)
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


@dataclass
class _Request:
    model_id: str
    patterns: list[str]
    source: str
    base: Path
    skip: bool

    @classmethod
    def of(cls, config: ModelConfig, download: bool | None) -> "_Request":
        skip = skip_download(config) if download is None else not download
        source, base, patterns = download_source(config), model_base_path(config), patterns_of(config)
        pattern = patterns[0] if len(patterns) == 1 else patterns
        where = (f" (model_id={config.model_id!r}, origin_file_pattern={pattern!r}, source={source}, "
                 f"models folder={base.absolute()})")
        check_repo_path(config.model_id, "model_id", where)
        for p in patterns:
            check_repo_path(p, "pattern", where)
        return cls(config.model_id, patterns, source, base, skip)

    @property
    def root(self) -> Path:
        return self.base / self.model_id

    @property
    def state(self) -> Path:
        return self.base / STATE_DIR

    def where(self, patterns: Sequence[str], endpoint: str | None = None) -> str:
        pattern = patterns[0] if len(patterns) == 1 else list(patterns)
        source = f"{self.source} at {endpoint}" if endpoint else self.source
        if self.skip:
            source += ", skip_download so no network"
        return (f"(model_id={self.model_id!r}, origin_file_pattern={pattern!r}, source={source}, "
                f"folder={self.root.absolute()})")


def _ensure(request: _Request, patterns: list[str], summary: FetchSummary) -> dict[str, list[Path]]:
    """Make every file of `patterns` present and verified (with the config.json beside matched
    weights); return the local paths per pattern."""
    if request.skip:
        return _from_disk(request, patterns, None, None, summary)
    hub = HUBS[request.source]()
    endpoint = hub.endpoint
    try:
        listing = _list(hub, request.model_id)
    except RemoteUnavailable as error:
        return _from_disk(request, patterns, error, endpoint, summary)
    _check_listing(request, listing, patterns, endpoint)
    _save_manifest(request, listing, endpoint)

    wanted: dict[str, list[RemoteFile]] = {p: [f for f in listing.files if matches(f.path, p)] for p in patterns}
    for pattern, files in wanted.items():
        if not files and not _glob(request.root, pattern):
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
        local = _local_result(request.root, pattern, [f.path for f in files]) if files else _glob(request.root, pattern)
        result[pattern] = local
    _check_safetensors(request, patterns, result, endpoint)
    return result


CHECKPOINT_SUFFIXES = SAFETENSORS_SUFFIXES + TORCH_SUFFIXES + (".index.json",)


def companions(listed: Iterable[RemoteFile], matched: Iterable[RemoteFile]) -> list[RemoteFile]:
    """The `config.json` files the loader reads beside matched weights: for each folder of the
    repo (the root included) that holds a matched checkpoint file (.safetensors, .bin, .pt, .pth,
    .ckpt, *.index.json), its `<folder>/config.json` when the listing has one."""
    by_path = {f.path: f for f in listed}
    found: dict[str, RemoteFile] = {}
    for remote in matched:
        if not remote.path.endswith(CHECKPOINT_SUFFIXES):
            continue
        folder = remote.path.rpartition("/")[0]
        config = f"{folder}/config.json" if folder else "config.json"
        if config in by_path:
            found.setdefault(config, by_path[config])
    return list(found.values())


def _check_listing(request: _Request, listing: Listing, patterns: Sequence[str], endpoint: str) -> None:
    """Refuse a listing that names any file outside the repo (before anything is fetched or kept)."""
    for remote in listing.files:
        problem = path_problem(remote.path, "file")
        if problem is not None:
            raise UnsafeListingError(
                f"The listing of {request.model_id!r} from {request.source} at {endpoint} names the file "
                f"{remote.path!r}, which {problem}, so it could be written outside {request.root.absolute()} "
                f"{request.where(patterns, endpoint)}. {_FIX['file']} ({_switch_source(request.source)}).",
                remote.path, "file", problem)


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


def _missing(request: _Request, needed: list[RemoteFile], patterns: list[str], endpoint: str) -> list[RemoteFile]:
    """Files not on disk; a file on disk whose size differs from the listing is an error."""
    missing = []
    for remote in needed:
        local = request.root / remote.path
        if not local.is_file():
            missing.append(remote)
        elif local.stat().st_size != remote.size:
            _raise_corrupt(request, patterns, endpoint, local,
                           f"it is {local.stat().st_size} bytes but {request.source} lists {remote.size} bytes "
                           "(truncated, or out of date)")
    return missing


def _fetch_locked(request: _Request, hub: Hub, listing: Listing, needed: list[RemoteFile], patterns: list[str],
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


def _fetch(request: _Request, hub: Hub, listing: Listing, missing: list[RemoteFile], patterns: list[str],
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


def _keep_verified(request: _Request, remaining: list[RemoteFile], staging: Path,
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


def _fetch_error(request: _Request, missing: list[RemoteFile], remaining: list[RemoteFile],
                 problems: dict[str, RemoteUnavailable], attempts: int, patterns: list[str], endpoint: str,
                 staging: Path) -> DownloadError:
    kinds = {problems[f.path].kind for f in remaining}
    kind = kinds.pop() if len(kinds) == 1 else None
    first = problems[remaining[0].path]
    if kind == UNAUTHORIZED:
        how = (f"{request.source} refused the files (HTTP {first.status or '401/403'}): the repo is gated or "
               f"private. {_hub_advice(request, first, endpoint)}")
    elif kind == NOT_FOUND:
        how = (f"{request.source} lists these files but answers 404 for them: the repo may have changed since "
               f"it was listed. Load again; if it persists, try the other source: {_switch_source(request.source)}.")
    else:
        how = (f"Load again to fetch the rest (a partial file in {staging} is resumed where the client "
               f"supports it), or try the other source: {_switch_source(request.source)}.")
    return DownloadError(
        f"Could not fetch {len(remaining)} of {len(missing)} file(s) of {request.model_id!r} after "
        f"{attempts} attempt(s) {request.where(patterns, endpoint)}: "
        + "; ".join(f"{f.path}: {problems[f.path].reason.rstrip('.')}" for f in remaining)
        + f". Nothing incomplete was left under a final name; the files already fetched stay. {how}",
        kind,
    )


def _remove_staging(request: _Request, staging: Path) -> None:
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


def _other(source: str) -> str:
    return next(s for s in SOURCES if s != source)


# ---------------------------------------------------------------------- without the hub


def _hub_said(request: _Request, error: RemoteUnavailable, endpoint: str) -> str:
    """One sentence: what the hub answered, by kind."""
    at = f"{request.source} at {endpoint}"
    if error.kind == NOT_FOUND:
        return f"{at} has no model {request.model_id!r} (HTTP 404: {error.reason})."
    if error.kind == UNAUTHORIZED:
        return (f"{at} refused access to {request.model_id!r} (HTTP {error.status or '401/403'}: {error.reason}); "
                "the repo is gated or private.")
    if error.kind == SERVER_ERROR:
        return f"{at} answered with a server error ({error.reason})."
    if error.kind == UNREACHABLE:
        return f"The hub could not be asked ({at}: {error.reason})."
    return f"{at} gave an answer that could not be used ({error.reason})."


def _hub_advice(request: _Request, error: RemoteUnavailable, endpoint: str) -> str:
    """What to do about a hub's answer, by kind."""
    other = _other(request.source)
    if error.kind == NOT_FOUND:
        return (f"Check model_id (owner/name, as on the model's page on {request.source}; a private repo also "
                f"answers 404 without a token) and the source: the model may be on {other} only "
                f"({_switch_source(request.source)}); or put the files there.")
    if error.kind == UNAUTHORIZED:
        if request.source == "huggingface":
            login = ("log in to HuggingFace (set HF_TOKEN, or run `hf auth login`, formerly `huggingface-cli "
                     f"login`) and accept the licence / request access on {endpoint}/{request.model_id}")
            if error.status == 401 and not error.gated:
                login += " (HuggingFace also answers 401 to a client without a token for a repo that does not " \
                         "exist: check model_id too)"
        else:
            login = ("log in to ModelScope (set MODELSCOPE_API_TOKEN, or run `modelscope login --token <token>`) "
                     f"and accept the licence / request access on {endpoint}/models/{request.model_id}")
        return (f"The account of your token needs access: {login}; then load again. Or try the other source "
                f"({_switch_source(request.source)}), or put the files there.")
    if error.kind == SERVER_ERROR:
        return (f"This is on the hub's side: load again later, or try the other source "
                f"({_switch_source(request.source)}); or put the files there.")
    if error.kind == UNREACHABLE:
        return ("Check the network and the endpoint (MODELSCOPE_ENDPOINT / HF_ENDPOINT), or try the other source "
                f"({_switch_source(request.source)}), then load again; or put the files there.")
    return ("Check that the endpoint (MODELSCOPE_ENDPOINT / HF_ENDPOINT) is a model hub of this kind (a mirror "
            f"or proxy may answer otherwise), or try the other source ({_switch_source(request.source)}), then "
            "load again; or put the files there.")


def _from_disk(request: _Request, patterns: list[str], hub_error: RemoteUnavailable | None,
               endpoint: str | None, summary: FetchSummary) -> dict[str, list[Path]]:
    """Resolve from disk: skip-download (`hub_error` None), or the hub could not be asked or said
    no (`hub_error` says what it answered)."""
    manifest = _read_manifest(request)
    result: dict[str, list[Path]] = {}
    missing: list[str] = []
    for pattern in patterns:
        listed = [f for f in manifest if matches(f.path, pattern)] if manifest else []
        if listed:
            absent = [f.path for f in listed if not (request.root / f.path).is_file()]
            missing.extend(p for p in absent if p not in missing)
            result[pattern] = [] if absent else _local_result(request.root, pattern, [f.path for f in listed])
        else:
            result[pattern] = _glob(request.root, pattern)
            if not result[pattern]:
                literal = not pattern.endswith("/") and not any(c in pattern for c in "*?[")
                missing.append(pattern if literal else f"anything matching {pattern!r}")
        # every listed file on disk, and the config.json beside listed weights where present, has
        # the listed size (a config.json that is absent is fine: nothing can fetch it now)
        for remote in listed + companions(manifest, listed):
            local = request.root / remote.path
            if local.is_file() and local.stat().st_size != remote.size:
                _raise_corrupt(request, patterns, None, local,
                               f"it is {local.stat().st_size} bytes but the hub listed {remote.size} bytes "
                               "(truncated, or out of date)")
    if missing:
        shown = ", ".join(missing[:12]) + (f" and {len(missing) - 12} more" if len(missing) > 12 else "")
        if hub_error is None:
            how = ("Downloading is off (ModelConfig.skip_download / DIFFSYNTH_SKIP_DOWNLOAD=True): turn it off to "
                   "fetch them (or fetch ahead with the runner's download command), put the files there, or point "
                   "DIFFSYNTH_MODEL_BASE_PATH / ModelConfig.local_model_path at the folder that holds them.")
            said = ""
        else:
            how = _hub_advice(request, hub_error, endpoint)
            said = " " + _hub_said(request, hub_error, endpoint)
        pattern = patterns[0] if len(patterns) == 1 else patterns
        raise MissingModelFilesError(
            f"Missing files for pattern {pattern!r} in {request.root}: {shown} {request.where(patterns, endpoint)}."
            f"{said} {how}", hub_error.kind if hub_error is not None else None,
        )
    if hub_error is not None:
        if hub_error.kind in (NOT_FOUND, UNAUTHORIZED):
            logger.warning("%s Every needed file is already in %s, going on with them; a file missing later cannot "
                           "be fetched until this is fixed: %s", _hub_said(request, hub_error, endpoint),
                           request.root, _hub_advice(request, hub_error, endpoint))
        else:
            logger.warning("Could not ask %s at %s for %s (%s: %s); every needed file is already in %s, going on "
                           "with them.", request.source, endpoint, request.model_id, hub_error.kind,
                           hub_error.reason, request.root)
        summary.offline.append(f"{request.model_id}: {request.source} {hub_error.kind}: {hub_error.reason}")
    for paths in result.values():
        files = [f for p in paths for f in (sorted(p.rglob("*")) if p.is_dir() else [p]) if f.is_file()]
        summary.present += len(files)
        summary.present_bytes += sum(f.stat().st_size for f in files)
    _check_safetensors(request, patterns, result, None)
    return result


# ---------------------------------------------------------------------- local files


def _glob(root: Path, pattern: str) -> list[Path]:
    if pattern.endswith("/"):
        folder = root / pattern.rstrip("/")
        return [folder] if folder.is_dir() and any(folder.iterdir()) else []
    return sorted(p for p in root.glob(pattern) if p.is_file())


def _local_result(root: Path, pattern: str, paths: list[str]) -> list[Path]:
    if pattern.endswith("/"):
        return [root / pattern.rstrip("/")]
    return sorted(root / p for p in paths)


def _check_safetensors(request: _Request, patterns: list[str], result: dict[str, list[Path]],
                       endpoint: str | None) -> None:
    """Read the header of every safetensors file about to be loaded (cheap; catches truncation)."""
    for paths in result.values():
        for path in paths:
            files = sorted(path.rglob("*.safetensors")) if path.is_dir() else [path]
            for file in files:
                if file.suffix != ".safetensors":
                    continue
                try:
                    read_header(file)
                except CheckpointError as error:
                    cause = error.__cause__
                    why = f"{type(cause).__name__}: {cause}" if cause is not None else str(error)
                    _raise_corrupt(request, patterns, endpoint, file, f"cannot read it ({why})")


def _raise_corrupt(request: _Request, patterns: Sequence[str], endpoint: str | None, path: Path, why: str) -> None:
    raise CorruptModelFileError(
        f"{path} is truncated or corrupt: {why} {request.where(patterns, endpoint)}. Delete it and load again to "
        f"fetch it again from {request.source} (with downloading on), e.g. rm '{path}'."
    )


# ---------------------------------------------------------------------- manifest


def _manifest_path(request: _Request) -> Path:
    return request.state / "manifests" / f"{request.model_id}.json"


def _save_manifest(request: _Request, listing: Listing, endpoint: str) -> None:
    path = _manifest_path(request)
    files = {f.path: {"size": f.size, "sha256": f.sha256, "git_sha1": f.git_sha1} for f in listing.files}
    try:
        if path.is_file() and json.loads(path.read_text()).get("files") == files:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        tmp.write_text(json.dumps({"model_id": request.model_id, "source": request.source, "endpoint": endpoint,
                                   "revision": listing.revision, "files": files}, indent=1))
        os.replace(tmp, path)
    except (OSError, ValueError) as error:  # a read-only models folder still loads
        logger.debug("Could not write the listing of %s to %s: %s", request.model_id, path, error)


def _read_manifest(request: _Request) -> list[RemoteFile]:
    path = _manifest_path(request)
    try:
        files = json.loads(path.read_text())["files"]
        listed = [RemoteFile(p, int(v["size"]), v.get("sha256"), v.get("git_sha1")) for p, v in files.items()]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return []
    unsafe = [f.path for f in listed if path_problem(f.path, "file") is not None]
    if unsafe:  # not written by us (listings are checked before they are kept): do not trust it
        logger.warning("Ignoring the kept listing %s: it names files outside the repo (%s).", path, unsafe[:3])
        return []
    return listed
