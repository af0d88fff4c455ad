"""Where a result came from: git commit, package versions, device name, file fingerprints.

Fingerprints (name, size, sha256) are cached in a JSON file keyed by the file's absolute path
and its `stat_key` (size, modification and change times, inode, device), so a 50 GB checkpoint
is hashed once, not once per job or per process. The change time (st_ctime) is what makes the
key safe: every write of the content moves it, and neither `cp -p`, `rsync -t` nor `touch -r`
can set it back, while they do keep a rewritten file's size and modification time.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable, Mapping

from ..files import atomic_write, locked

logger = logging.getLogger(__name__)

PACKAGES = (
    "torch", "safetensors", "transformers", "diffusers", "peft", "hydra-core", "omegaconf",
    "mlflow", "numpy", "pillow", "modelscope", "huggingface_hub",
)
REPO_ROOT = Path(__file__).resolve().parent.parent.parent
_HASH_CHUNK = 16 << 20


@lru_cache(maxsize=1)
def git_commit(root: Path = REPO_ROOT) -> str | None:
    """HEAD's commit, read from .git without running git; None outside a checkout."""
    git = root / ".git"
    if git.is_file():  # a worktree or submodule: "gitdir: <path>"
        text = git.read_text().strip()
        if text.startswith("gitdir:"):
            git = (root / text.split(":", 1)[1].strip()).resolve()
    head = git / "HEAD"
    if not head.is_file():
        return None
    ref = head.read_text().strip()
    if not ref.startswith("ref:"):
        return ref or None
    ref = ref.split(":", 1)[1].strip()
    for base in (git, _common_dir(git)):
        loose = base / ref
        if loose.is_file():
            return loose.read_text().strip() or None
        packed = base / "packed-refs"
        if packed.is_file():
            for line in packed.read_text().splitlines():
                if line.endswith(" " + ref) and not line.startswith("#"):
                    return line.split(" ", 1)[0]
    return None  # a branch without commits yet


def _common_dir(git: Path) -> Path:
    common = git / "commondir"
    return (git / common.read_text().strip()).resolve() if common.is_file() else git


@lru_cache(maxsize=1)
def package_versions() -> dict[str, str]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


def provenance_tags(device: str) -> dict[str, str]:
    """Package versions, git commit and device name, as MLflow tags."""
    tags = {f"versions.{k}": v for k, v in package_versions().items()}
    commit = git_commit()
    if commit:
        tags["git.commit"] = commit
        tags["mlflow.source.git.commit"] = commit
    tags["device.name"] = device_name(device)
    return tags


def fingerprint_tags(prefix: str, description: Mapping[str, Any]) -> dict[str, str]:
    files = "; ".join(f"{f['name']}:{f['size']}:{f['sha256'][:16]}" for f in description["files"])
    return {
        f"{prefix}.sha256": description["sha256"],
        f"{prefix}.bytes": str(description["bytes"]),
        f"{prefix}.files": files,
    }


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        import torch

        return torch.cuda.get_device_name(torch.device(device))
    return _cpu_name()


@lru_cache(maxsize=1)
def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"cpu: {line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"cpu: {platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


# ------------------------------------------------------------------ fingerprints


def stat_key(st: os.stat_result) -> tuple[int, ...]:
    """What tells a file's content changed without reading it: size, modification and change
    times, inode and device. The change time moves on every write and cannot be set by a
    user (`cp -p`, `rsync -t`, `touch -r` restore the modification time only); a file replaced
    by another (`os.replace`, `mv`) has another inode."""
    return st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev


class FingerprintCache:
    """sha256 of files, cached on disk by (absolute path, `stat_key`)."""

    _shared: dict[str, "FingerprintCache"] = {}

    def __init__(self, cache_file: Path | None) -> None:
        self.cache_file = cache_file
        self._memory: dict[str, str] = {}
        self._unsaved: set[str] = set()  # hashed with store=False, not yet in the file
        self.hashed: list[Path] = []  # files actually read (for tests and logs)

    @classmethod
    def shared(cls, cache_file: Path | None) -> "FingerprintCache":
        """One cache per file and process: a sweep's jobs do not read the JSON file again for
        every job (each lookup still checks the file's `stat_key`)."""
        key = str(Path(cache_file).absolute()) if cache_file is not None else ""
        if key not in cls._shared:
            cls._shared[key] = cls(cache_file)
        return cls._shared[key]

    def _key(self, path: Path) -> str:
        st = path.stat()
        return f"{path.resolve()}|" + "|".join(str(v) for v in stat_key(st))

    def _load(self) -> dict[str, str]:
        if self.cache_file is None or not self.cache_file.is_file():
            return {}
        try:
            return json.loads(self.cache_file.read_text())
        except (OSError, ValueError):
            logger.warning("Ignoring an unreadable fingerprint cache %s", self.cache_file)
            return {}

    def sha256(self, path: Path, store: bool = True) -> str:
        """The file's sha256, hashed only when no entry has its path and `stat_key`. With
        store=False a new hash is kept in memory only (written by a later call with store)."""
        key = self._key(path)
        if key not in self._memory:
            stored = self._load()
            if key in stored:
                self._memory[key] = stored[key]
            else:
                logger.info("Hashing %s (%.1f MB), once", path, path.stat().st_size / 2**20)
                digest = hashlib.sha256()
                with open(path, "rb") as f:
                    while chunk := f.read(_HASH_CHUNK):
                        digest.update(chunk)
                self.hashed.append(path)
                self._memory[key] = digest.hexdigest()
                self._unsaved.add(key)
        if store and key in self._unsaved:
            self._unsaved.discard(key)
            self._store({key: self._memory[key]})
        return self._memory[key]

    def save(self) -> None:
        """Write what was hashed with store=False (once the job is accepted and has run)."""
        if self._unsaved:
            entries = {key: self._memory[key] for key in self._unsaved}
            self._unsaved.clear()
            self._store(entries)

    def _store(self, entries: dict[str, str]) -> None:
        """Add entries to the file; a cache that cannot be written (read-only or full store
        folder) only costs hashing again next time."""
        if self.cache_file is None:
            return
        try:
            with locked(self.cache_file):
                stored = self._load()
                stored.update(entries)
                text = json.dumps(stored, indent=0, sort_keys=True)
                atomic_write(self.cache_file, lambda tmp: tmp.write_text(text))
        except OSError as error:
            logger.warning("Could not update the fingerprint cache %s: %s", self.cache_file, error)

    def describe(self, paths: Iterable[Path]) -> dict:
        """{"sha256": combined hash, "files": [{name, size, sha256}], "bytes": total} over the
        files (folders expanded)."""
        files: list[Path] = []
        for p in paths:
            p = Path(p)
            files.extend(sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else [p])
        entries = []
        combined = hashlib.sha256()
        for f in files:
            h = self.sha256(f)
            size = f.stat().st_size
            entries.append({"name": _short_name(f), "size": size, "sha256": h})
            combined.update(f"{f.name}:{size}:{h}\n".encode())
        return {"sha256": combined.hexdigest(), "files": entries, "bytes": sum(e["size"] for e in entries)}


def _short_name(path: Path) -> str:
    """`<parent>/<file>`: enough to tell transformer shards from text-encoder shards."""
    return f"{path.parent.name}/{path.name}"
