"""Model files already on disk: resolving a repo's patterns without the hub (downloading is off, or
the hub could not be asked or said no), what the hub answered and what to do about it, checking
safetensors before the loader gets them, and the kept listing of each repo
(`<base>/.diffsynth/manifests`), so that an offline load can name exactly which files are missing.
"""
from __future__ import annotations

import json
import logging
import os
import uuid
from collections.abc import Sequence
from pathlib import Path

from .download_errors import CorruptModelFileError, MissingModelFilesError
from .hubs import NOT_FOUND, SERVER_ERROR, UNAUTHORIZED, UNREACHABLE, Listing, RemoteFile, RemoteUnavailable
from .repo_paths import RepoRequest, companions, matches, other_source, path_problem, switch_source
from .shards import CheckpointError, read_header

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------- without the hub


def hub_said(request: RepoRequest, error: RemoteUnavailable, endpoint: str) -> str:
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


def hub_advice(request: RepoRequest, error: RemoteUnavailable, endpoint: str) -> str:
    """What to do about a hub's answer, by kind."""
    other = other_source(request.source)
    if error.kind == NOT_FOUND:
        return (f"Check model_id (owner/name, as on the model's page on {request.source}; a private repo also "
                f"answers 404 without a token) and the source: the model may be on {other} only "
                f"({switch_source(request.source)}); or put the files there.")
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
                f"({switch_source(request.source)}), or put the files there.")
    if error.kind == SERVER_ERROR:
        return (f"This is on the hub's side: load again later, or try the other source "
                f"({switch_source(request.source)}); or put the files there.")
    if error.kind == UNREACHABLE:
        return ("Check the network and the endpoint (MODELSCOPE_ENDPOINT / HF_ENDPOINT), or try the other source "
                f"({switch_source(request.source)}), then load again; or put the files there.")
    return ("Check that the endpoint (MODELSCOPE_ENDPOINT / HF_ENDPOINT) is a model hub of this kind (a mirror "
            f"or proxy may answer otherwise), or try the other source ({switch_source(request.source)}), then "
            "load again; or put the files there.")


def from_disk(request: RepoRequest, patterns: list[str], hub_error: RemoteUnavailable | None,
              endpoint: str | None) -> dict[str, list[Path]]:
    """The local paths per pattern, resolved from disk alone: skip-download (`hub_error` None), or
    the hub could not be asked or said no (`hub_error` says what it answered). Files the kept
    listing names must be there with their listed size; MissingModelFilesError names the ones
    that are not, with what the hub answered and what to do."""
    manifest = read_manifest(request)
    result: dict[str, list[Path]] = {}
    missing: list[str] = []
    for pattern in patterns:
        listed = [f for f in manifest if matches(f.path, pattern)] if manifest else []
        if listed:
            absent = [f.path for f in listed if not (request.root / f.path).is_file()]
            missing.extend(p for p in absent if p not in missing)
            result[pattern] = [] if absent else local_result(request.root, pattern, [f.path for f in listed])
        else:
            result[pattern] = glob_files(request.root, pattern)
            if not result[pattern]:
                literal = not pattern.endswith("/") and not any(c in pattern for c in "*?[")
                missing.append(pattern if literal else f"anything matching {pattern!r}")
        # every listed file on disk, and the config.json beside listed weights where present, has
        # the listed size (a config.json that is absent is fine: nothing can fetch it now)
        for remote in listed + companions(manifest, listed):
            local = request.root / remote.path
            if local.is_file() and local.stat().st_size != remote.size:
                raise_corrupt(request, patterns, None, local,
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
            how = hub_advice(request, hub_error, endpoint)
            said = " " + hub_said(request, hub_error, endpoint)
        pattern = patterns[0] if len(patterns) == 1 else patterns
        raise MissingModelFilesError(
            f"Missing files for pattern {pattern!r} in {request.root}: {shown} {request.where(patterns, endpoint)}."
            f"{said} {how}", hub_error.kind if hub_error is not None else None,
        )
    return result


# ---------------------------------------------------------------------- local files


def glob_files(root: Path, pattern: str) -> list[Path]:
    if pattern.endswith("/"):
        folder = root / pattern.rstrip("/")
        return [folder] if folder.is_dir() and any(folder.iterdir()) else []
    return sorted(p for p in root.glob(pattern) if p.is_file())


def local_result(root: Path, pattern: str, paths: list[str]) -> list[Path]:
    if pattern.endswith("/"):
        return [root / pattern.rstrip("/")]
    return sorted(root / p for p in paths)


def check_safetensors(request: RepoRequest, patterns: list[str], result: dict[str, list[Path]],
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
                    raise_corrupt(request, patterns, endpoint, file, f"cannot read it ({why})")


def raise_corrupt(request: RepoRequest, patterns: Sequence[str], endpoint: str | None, path: Path, why: str) -> None:
    raise CorruptModelFileError(
        f"{path} is truncated or corrupt: {why} {request.where(patterns, endpoint)}. Delete it and load again to "
        f"fetch it again from {request.source} (with downloading on), e.g. rm '{path}'."
    )


# ---------------------------------------------------------------------- manifest


def _manifest_path(request: RepoRequest) -> Path:
    return request.state / "manifests" / f"{request.model_id}.json"


def save_manifest(request: RepoRequest, listing: Listing, endpoint: str) -> None:
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


def read_manifest(request: RepoRequest) -> list[RemoteFile]:
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
