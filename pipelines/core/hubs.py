"""Hub protocol adapters: list a model repo and fetch some of its files into a folder, through
each hub's own client (`modelscope`, `huggingface_hub`), so endpoints, mirrors, tokens, proxies,
retries and resume follow that client and its variables.

An adapter never writes outside the folder it is given (plus the client's own lock/cache
folders); `download.py` verifies what lands there and moves it into the models folder.
"""
from __future__ import annotations

import inspect
import os
import socket
import time
import urllib.request
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

PROBE_TIMEOUT_S = 5.0  # how long a first TCP connection to the endpoint may take
MAX_WORKERS = 4  # files fetched at once


@dataclass(frozen=True)
class RemoteFile:
    """One file of a hub repo: its path in the repo, size, and the hashes the hub gives."""

    path: str
    size: int
    sha256: str | None = None  # ModelScope: every file; HuggingFace: LFS files
    git_sha1: str | None = None  # HuggingFace: the git blob id of a non-LFS file


@dataclass(frozen=True)
class Listing:
    revision: str | None  # what downloads should ask for (HuggingFace: the resolved commit)
    files: tuple[RemoteFile, ...]


NOT_FOUND, UNAUTHORIZED, UNREACHABLE, SERVER_ERROR, OTHER = (
    "not_found", "unauthorized", "unreachable", "server_error", "other")
KINDS = (NOT_FOUND, UNAUTHORIZED, UNREACHABLE, SERVER_ERROR, OTHER)
FINAL_KINDS = (NOT_FOUND, UNAUTHORIZED)  # asking again gives the same answer: never retried

# the clients' exception classes for an answer that names the problem (checked along the cause chain)
_NOT_FOUND_CLASSES = ("RepositoryNotFoundError", "RevisionNotFoundError", "RemoteEntryNotFoundError",
                      "NotExistError")
_UNAUTHORIZED_CLASSES = ("GatedRepoError", "AuthenticationError", "PermissionDeniedError")


class RemoteUnavailable(Exception):
    """The hub could not be asked, or said no. `reason` says why (the client's error, shortened);
    `kind` what it is: `not_found` (HTTP 404: no such repo, revision or file), `unauthorized`
    (HTTP 401/403: gated or private, or no access with this token), `unreachable` (no connection,
    a timeout, a bad endpoint), `server_error` (HTTP 5xx, 408, 429) or `other` (any other answer
    that cannot be used); `status` the HTTP status when there was one; `retryable` when asking
    again may help (never for not_found / unauthorized)."""

    def __init__(self, reason: str, retryable: bool = False, kind: str = UNREACHABLE,
                 status: int | None = None) -> None:
        if kind not in KINDS:
            raise ValueError(f"RemoteUnavailable kind {kind!r}: use one of {', '.join(KINDS)}.")
        super().__init__(reason)
        self.reason = reason
        self.kind = kind
        self.status = status
        self.retryable = retryable and kind not in FINAL_KINDS

    @classmethod
    def from_error(cls, error: BaseException) -> "RemoteUnavailable":
        kind, status = classify(error)
        return cls(short_error(error), kind in (UNREACHABLE, SERVER_ERROR), kind, status)

    @property
    def gated(self) -> bool:
        """HuggingFace said the repo is gated (an access request / licence to accept)."""
        return "GatedRepo" in self.reason


def _chain(error: BaseException) -> list[BaseException]:
    found: list[BaseException] = []
    while error is not None and error not in found and len(found) < 8:
        found.append(error)
        error = error.__cause__ or error.__context__
    return found


def http_status(error: BaseException) -> int | None:
    """The HTTP status an exception of either client carries (on it, or its response)."""
    response = getattr(error, "response", None)
    for status in (getattr(error, "status_code", None), getattr(response, "status_code", None)):
        if isinstance(status, int) and not isinstance(status, bool):
            return status
    return None


def classify(error: BaseException) -> tuple[str, int | None]:
    """(kind, HTTP status or None) of an exception from `modelscope` or `huggingface_hub`: the
    status where one is known (also on a chained cause: huggingface_hub wraps a failed request in
    LocalEntryNotFoundError), else the class (NotExistError, GatedRepoError, ...), else a
    connection or timeout error is `unreachable` and anything else `other`."""
    chain = _chain(error)
    for item in chain:
        status = http_status(item)
        if status is None:
            continue
        if status == 404:
            return NOT_FOUND, status
        if status in (401, 403):
            return UNAUTHORIZED, status
        if status >= 500 or status in (408, 429):
            return SERVER_ERROR, status
        if status >= 400:
            return OTHER, status
    for item in chain:
        names = {t.__name__ for t in type(item).__mro__}
        if names & set(_UNAUTHORIZED_CLASSES):
            return UNAUTHORIZED, None
        if names & set(_NOT_FOUND_CLASSES):
            return NOT_FOUND, None
    if any(is_transient(item) for item in chain):
        return UNREACHABLE, None
    return OTHER, None


def is_transient(error: BaseException) -> bool:
    """An HTTP 5xx/408/429 or a connection or timeout error, from either client."""
    status = http_status(error)
    if isinstance(status, int):
        return status >= 500 or status in (408, 429)
    names = " ".join(t.__name__ for t in type(error).__mro__)
    return isinstance(error, (ConnectionError, TimeoutError)) or any(
        word in names for word in ("Connect", "Timeout", "Network", "Protocol"))


Progress = Callable[[int], None]  # called with a byte count (negative when a client rewinds)


class Hub:
    name: str
    lists_with_retries = False  # the client retries a failed listing itself

    @property
    def endpoint(self) -> str:
        raise NotImplementedError

    def list_files(self, model_id: str) -> Listing:
        raise NotImplementedError

    def download(self, model_id: str, listing: Listing, paths: list[str], folder: Path,
                 progress: Progress) -> dict[str, RemoteUnavailable]:
        """Fetch `paths` into `folder/<path>`; returns {path: error} for the files that failed
        (each a RemoteUnavailable: its `kind` tells a gated repo from a dropped connection)."""
        raise NotImplementedError

    def probe(self) -> None:
        """Fail fast (RemoteUnavailable) when no connection to the endpoint can be opened, instead
        of waiting through the client's retries; skipped when a proxy is configured."""
        probe_endpoint(self.endpoint)


_TIMED_OUT: dict[str, float] = {}  # endpoint -> until when a timed-out probe is remembered


def probe_endpoint(endpoint: str, timeout: float | None = None) -> None:
    parts = urlsplit(endpoint)
    host = parts.hostname
    if not host:
        raise RemoteUnavailable(f"the endpoint {endpoint!r} is not a URL (expected e.g. https://host)",
                                kind=UNREACHABLE)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    proxies = urllib.request.getproxies()
    if (proxies.get(parts.scheme) or proxies.get("all")) and not urllib.request.proxy_bypass(host):
        return  # the client goes through the proxy; let it decide
    if _TIMED_OUT.get(endpoint, 0.0) > time.monotonic():
        raise RemoteUnavailable(f"connecting to {host}:{port} timed out a moment ago", kind=UNREACHABLE)
    try:
        socket.create_connection((host, port), timeout=timeout or PROBE_TIMEOUT_S).close()
    except socket.timeout:
        _TIMED_OUT[endpoint] = time.monotonic() + 60.0
        raise RemoteUnavailable(f"connecting to {host}:{port} timed out", True, UNREACHABLE) from None
    except OSError as error:
        raise RemoteUnavailable(f"cannot connect to {host}:{port} ({error.strerror or error})", True,
                                UNREACHABLE) from None


def short_error(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return f"{type(error).__name__}: {text[:400]}"


# ---------------------------------------------------------------------- ModelScope


class ModelScopeHub(Hub):
    """`modelscope` (1.40: `modelscope_hub` underneath). Endpoint: `MODELSCOPE_ENDPOINT` (a full
    URL, http allowed), else the deprecated `MODELSCOPE_DOMAIN`, else https://modelscope.cn."""

    name = "modelscope"
    lists_with_retries = True  # 4 attempts, 1 + 2 + 4 s apart

    def _override(self) -> str | None:
        """The endpoint the variables ask for, read now: the client itself reads them once per
        process (a cached default config), so a change after the first use would be missed."""
        value = os.environ.get("MODELSCOPE_ENDPOINT", "").strip()
        if not value:
            value = os.environ.get("MODELSCOPE_DOMAIN", "").strip()
            if value:
                warnings.warn("MODELSCOPE_DOMAIN is deprecated (and https only); set MODELSCOPE_ENDPOINT to a "
                              "full URL instead.", FutureWarning, stacklevel=3)
        if not value:
            return None
        if not value.lower().startswith(("http://", "https://")):
            value = f"https://{value}"
        return value.rstrip("/")

    def _api(self):
        from modelscope.hub.api import HubApi

        return HubApi(endpoint=self._override())

    @property
    def endpoint(self) -> str:
        override = self._override()
        if override:
            return override
        try:
            return str(self._api().endpoint).rstrip("/")
        except Exception:  # the client could not even be configured
            return "https://modelscope.cn"

    def list_files(self, model_id: str) -> Listing:
        self.probe()
        try:
            api = self._api()
            if hasattr(api, "list_repo_files"):  # modelscope >= 1.38: entries with path, size, sha256
                entries = api.list_repo_files(model_id, "model", recursive=True)
            else:
                entries = api.get_model_files(model_id, recursive=True)
        except Exception as error:
            raise RemoteUnavailable.from_error(error) from error
        files = []
        for entry in entries:
            get = entry.get if isinstance(entry, dict) else lambda k, d=None: getattr(entry, k, d)
            if (get("type") or get("Type") or "blob") == "tree":
                continue
            path = get("path") or get("Path")
            size = get("size", None)
            size = get("Size", 0) if size is None else size
            files.append(RemoteFile(path, int(size or 0), (get("sha256") or get("Sha256") or None)))
        return Listing(None, tuple(files))

    def download(self, model_id: str, listing: Listing, paths: list[str], folder: Path,
                 progress: Progress) -> dict[str, RemoteUnavailable]:
        from modelscope.hub.callback import ProgressCallback
        from modelscope.hub.snapshot_download import snapshot_download

        class Report(ProgressCallback):
            def update(self, size: int) -> None:
                progress(size)

        try:
            snapshot_download(
                model_id, revision=listing.revision, local_dir=str(folder), endpoint=self._override(),
                cache_dir=str(folder / ".modelscope"),  # the client's file locks, not in ~/.cache
                allow_patterns=[_fnmatch_literal(p) for p in paths],
                max_workers=min(MAX_WORKERS, len(paths)), progress_callbacks=[Report],
            )
        except Exception as error:
            failed = getattr(error, "failed_files", None)
            if isinstance(failed, dict) and failed:
                return {path: RemoteUnavailable.from_error(err) if isinstance(err, BaseException)
                        else RemoteUnavailable(str(err), kind=OTHER) for path, err in failed.items()}
            return {path: RemoteUnavailable.from_error(error) for path in paths}
        return {}


def _fnmatch_literal(path: str) -> str:
    """A pattern that fnmatch matches with this exact path only."""
    return "".join(f"[{c}]" if c in "*?[" else c for c in path)


# ---------------------------------------------------------------------- HuggingFace


class HuggingFaceHub(Hub):
    """`huggingface_hub`. Endpoint: `HF_ENDPOINT` (read at each call, so a mirror set after
    import counts), else https://huggingface.co. Set `HF_HUB_DISABLE_XET=1` for a plain-HTTP mirror."""

    name = "huggingface"

    @property
    def endpoint(self) -> str:
        from huggingface_hub import constants

        return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")

    def list_files(self, model_id: str) -> Listing:
        from huggingface_hub import HfApi
        from huggingface_hub.hf_api import RepoFile as HfRepoFile

        self.probe()
        api = HfApi(endpoint=self.endpoint)
        try:
            commit = api.repo_info(model_id).sha
            entries = list(api.list_repo_tree(model_id, recursive=True, revision=commit))
        except Exception as error:
            raise RemoteUnavailable.from_error(error) from error
        files = []
        for entry in entries:
            if isinstance(entry, HfRepoFile):
                if entry.lfs is not None:
                    files.append(RemoteFile(entry.path, int(entry.size), sha256=entry.lfs.sha256))
                else:
                    files.append(RemoteFile(entry.path, int(entry.size), git_sha1=entry.blob_id))
        return Listing(commit, tuple(files))

    def download(self, model_id: str, listing: Listing, paths: list[str], folder: Path,
                 progress: Progress) -> dict[str, RemoteUnavailable]:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.utils import tqdm as hf_tqdm

        class FileBar(hf_tqdm):  # the client's per-file bar, also feeding our total
            def __init__(self, *args, **kwargs) -> None:
                super().__init__(*args, **kwargs)
                if self.n:
                    progress(self.n)

            def update(self, n: float | None = 1) -> bool | None:
                progress(int(n or 0))
                return super().update(n)

        bars = {"tqdm_class": FileBar} if "tqdm_class" in inspect.signature(hf_hub_download).parameters else {}

        def one(path: str) -> RemoteUnavailable | None:
            try:
                hf_hub_download(model_id, path, revision=listing.revision, local_dir=str(folder),
                                endpoint=self.endpoint, **bars)
            except Exception as error:
                return RemoteUnavailable.from_error(error)
            return None

        pool = ThreadPoolExecutor(max_workers=min(MAX_WORKERS, len(paths)))
        try:
            results = list(pool.map(one, paths))
        except BaseException:  # Ctrl-C: do not wait for the other multi-GB files in flight
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        pool.shutdown()
        return {path: error for path, error in zip(paths, results) if error is not None}


HUBS: dict[str, type[Hub]] = {"modelscope": ModelScopeHub, "huggingface": HuggingFaceHub}
