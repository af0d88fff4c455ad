"""Where a ModelConfig's files are: the models folder, the source, skip download, the patterns,
and the one check that keeps every path inside `<base>/<model_id>`.

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
"""
from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path

from .download_errors import UnsafeListingError, UnsafePathError
from .hubs import HUBS, Listing, RemoteFile
from .model_config import ModelConfig
from .shards import SAFETENSORS_SUFFIXES, TORCH_SUFFIXES

DEFAULT_BASE_PATH = "./models"
DEFAULT_SOURCE = "modelscope"
SOURCES = tuple(HUBS)
STATE_DIR = ".diffsynth"
TRUE_WORDS, FALSE_WORDS = ("1", "true", "yes", "on"), ("", "0", "false", "no", "off")


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


# ---------------------------------------------------------------------- paths inside the repo

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


def other_source(source: str) -> str:
    return next(s for s in SOURCES if s != source)


def switch_source(source: str) -> str:
    other = other_source(source)
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


# ---------------------------------------------------------------------- what a pattern needs

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


# ---------------------------------------------------------------------- one model repo


@dataclass
class RepoRequest:
    """One model repo as a config names it: its id, patterns, source, models folder and whether
    downloading is off; built by `of`, which checks the id and the patterns."""

    model_id: str
    patterns: list[str]
    source: str
    base: Path
    skip: bool

    @classmethod
    def of(cls, config: ModelConfig, download: bool | None) -> "RepoRequest":
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


def check_listing(request: RepoRequest, listing: Listing, patterns: Sequence[str], endpoint: str) -> None:
    """Refuse a listing that names any file outside the repo (before anything is fetched or kept)."""
    for remote in listing.files:
        problem = path_problem(remote.path, "file")
        if problem is not None:
            raise UnsafeListingError(
                f"The listing of {request.model_id!r} from {request.source} at {endpoint} names the file "
                f"{remote.path!r}, which {problem}, so it could be written outside {request.root.absolute()} "
                f"{request.where(patterns, endpoint)}. {_FIX['file']} ({switch_source(request.source)}).",
                remote.path, "file", problem)
