"""A model hub on loopback, for tests: enough of the HuggingFace Hub HTTP API and of the
ModelScope HTTP API that the real clients (`huggingface_hub.snapshot_download` /
`hf_hub_download`, `modelscope.snapshot_download`) fetch local folders from it, with faults
injected on demand.

    with HubServer({"Qwen/Qwen-Image-Tiny": folder}) as hub:
        os.environ["MODELSCOPE_ENDPOINT"] = hub.url      # ModelScope client
        os.environ["HF_ENDPOINT"] = hub.url              # HuggingFace client (HF_HUB_DISABLE_XET=1)
        hub.add_fault(Fault("drop", "vae/*", after_bytes=4096))   # next GET of a vae file breaks
        ...
        hub.file_requests("vae/diffusion_pytorch_model.safetensors")  # what the clients asked for

    python -m tests.support.hub_server Qwen/Qwen-Image-Tiny=/path/to/folder [--port 8000]

Endpoints served (one server speaks both protocols; their paths do not overlap):
- ModelScope: `GET /api/v1/models/{id}` (repo info), `GET /api/v1/models/{id}/repo/files?Revision=
  &Recursive=&Root=` (listing with Size and Sha256), `GET|HEAD /api/v1/models/{id}/repo?Revision=
  &FilePath=` (file content, `Range` honoured).
- HuggingFace: `GET /api/models/{id}[/revision/{rev}]` (repo info with the commit sha),
  `GET /api/models/{id}/tree/{rev}[/{path}]?recursive=` (listing with git blob ids and LFS sha256),
  `HEAD|GET /{id}/resolve/{rev}/{path}` (X-Repo-Commit, ETag / X-Linked-Etag, X-Linked-Size, Range).

Repos can be gated (`gate(model_id, 401 | 403, token=None, files_only=False)`: every request for it,
or with `files_only` every file download (as huggingface.co does for a gated repo, whose listing is
public), is answered with that status and the client's "gated" error; a request with
`Authorization: Bearer <token>` goes through), and a file can be added under any path, even one
outside the repo such as `../x` (`add_file`), to play a broken or malicious hub. An unknown repo
is a 404 in both protocols.

Faults (`Fault`): `drop` closes the connection after `after_bytes` bytes of a file body;
`status` answers with an HTTP error instead; `short` serves a body `delta` bytes shorter than the
listing says (a wrong size); `corrupt` serves the right size with altered bytes (a wrong hash);
`slow` sleeps between chunks. Each applies to `times` matching requests (None: all of them).
The server binds 127.0.0.1 only, its handler threads are daemons with a socket timeout, and
`stop()` (or leaving the `with` block) shuts it down.
"""
from __future__ import annotations

import argparse
import fnmatch
import hashlib
import json
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".onnx")
LFS_MIN_SIZE = 10 * 1024 * 1024
CHUNK = 64 * 1024
DATE = "2025-08-04T00:00:00.000Z"


@dataclass
class RepoFile:
    path: str  # in repo, with "/"
    local: Path
    size: int
    sha256: str
    git_sha1: str

    @property
    def lfs(self) -> bool:
        return self.path.endswith(LFS_SUFFIXES) or self.size >= LFS_MIN_SIZE


@dataclass
class Repo:
    model_id: str
    folder: Path
    files: dict[str, RepoFile]
    commit: str
    gated: int | None = None  # 401 or 403: answered to every request without the token
    token: str | None = None
    gated_files_only: bool = False  # the listing stays open, file downloads are refused

    @classmethod
    def scan(cls, model_id: str, folder: str | Path) -> "Repo":
        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"HubServer: {folder} (for {model_id}) is not a folder.")
        files = {}
        for local in sorted(p for p in folder.rglob("*") if p.is_file()):
            data = local.read_bytes()
            rel = local.relative_to(folder).as_posix()
            files[rel] = RepoFile(rel, local, len(data), hashlib.sha256(data).hexdigest(), git_blob_sha1(data))
        commit = hashlib.sha1("".join(f"{f.path}:{f.sha256}\n" for f in files.values()).encode()).hexdigest()
        return cls(model_id, folder, files, commit)

    def dirs(self) -> list[str]:
        found = set()
        for path in self.files:
            parts = path.split("/")[:-1]
            found.update("/".join(parts[: i + 1]) for i in range(len(parts)))
        return sorted(found)


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a file's content (HuggingFace's `oid` of a non-LFS file)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Fault:
    """A fault injected into matching requests. `kind`: drop | status | short | corrupt | slow.
    `pattern` matches the file path in the repo (fnmatch); `on` = "file" (content downloads),
    "listing" (file listings and repo info) or "any"; `protocol` = None (both), "modelscope" or
    "huggingface"; `times` = how many matching requests it hits (None: every one)."""

    kind: str
    pattern: str = "*"
    on: str = "file"
    protocol: str | None = None
    times: int | None = 1
    status: int = 500
    after_bytes: int = 4096
    delta: int = 1000
    delay: float = 0.05
    hits: int = 0

    def __post_init__(self) -> None:
        if self.kind not in ("drop", "status", "short", "corrupt", "slow"):
            raise ValueError(f"Fault kind {self.kind!r}: use drop, status, short, corrupt or slow.")
        if self.on not in ("file", "listing", "any"):
            raise ValueError(f"Fault on={self.on!r}: use file, listing or any.")


@dataclass
class Request:
    method: str
    protocol: str  # modelscope | huggingface | other
    kind: str  # file | head | listing | info | unknown
    model_id: str | None
    path: str | None  # file path in the repo
    range_start: int | None
    status: int = 0
    fault: str | None = None


@dataclass
class _State:
    repos: dict[str, Repo]
    faults: list[Fault] = field(default_factory=list)
    requests: list[Request] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


class HubServer:
    """Serve `{model_id: folder}` on http://127.0.0.1:<free port> in a background thread."""

    def __init__(self, repos: dict[str, str | Path], port: int = 0) -> None:
        self.state = _State({mid: Repo.scan(mid, folder) for mid, folder in repos.items()})
        self._port = port
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> "HubServer":
        handler = type("BoundHandler", (_Handler,), {"state": self.state})
        self._server = ThreadingHTTPServer(("127.0.0.1", self._port), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="hub-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=5)
            self._server = None

    def __enter__(self) -> "HubServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("HubServer is not running: call start() first.")
        return self._server.server_address[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # ------------------------------------------------------------------ faults and log

    def add_fault(self, fault: Fault) -> Fault:
        with self.state.lock:
            self.state.faults.append(fault)
        return fault

    def clear_faults(self) -> None:
        with self.state.lock:
            self.state.faults.clear()

    @property
    def requests(self) -> list[Request]:
        with self.state.lock:
            return list(self.state.requests)

    def clear_requests(self) -> None:
        with self.state.lock:
            self.state.requests.clear()

    def file_requests(self, path: str | None = None, method: str = "GET") -> list[Request]:
        """Content requests (GET by default) for one repo file, or for every file."""
        return [r for r in self.requests
                if r.kind == "file" and r.method == method and (path is None or r.path == path)]

    def repo(self, model_id: str) -> Repo:
        return self.state.repos[model_id]

    def gate(self, model_id: str, status: int | None = 401, token: str | None = None,
             files_only: bool = False) -> None:
        """Answer every request for `model_id` (with `files_only`, every file download) with
        `status` (401: not logged in, 403: no access, None: open again), unless it carries
        `Authorization: Bearer <token>`."""
        if status not in (None, 401, 403):
            raise ValueError(f"HubServer.gate: status {status!r}; use 401, 403 or None.")
        with self.state.lock:
            repo = self.state.repos[model_id]
            repo.gated, repo.token, repo.gated_files_only = status, token, files_only

    def add_file(self, model_id: str, path: str, data: bytes, folder: str | Path) -> RepoFile:
        """List and serve `data` as `path` in the repo; `path` is taken as is (`../x` included).
        The content is written to a new file in `folder` (outside the served repo folder)."""
        local = Path(folder) / hashlib.sha256(path.encode()).hexdigest()
        local.parent.mkdir(parents=True, exist_ok=True)
        local.write_bytes(data)
        file = RepoFile(path, local, len(data), hashlib.sha256(data).hexdigest(), git_blob_sha1(data))
        with self.state.lock:
            repo = self.state.repos[model_id]
            repo.files[path] = file
            repo.commit = hashlib.sha1(repo.commit.encode() + path.encode() + file.sha256.encode()).hexdigest()
        return file


# ---------------------------------------------------------------------- the handler


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "TestHub/1.0"
    timeout = 15  # an idle keep-alive connection ends after this
    state: _State

    def log_message(self, format: str, *args) -> None:  # keep test output quiet
        pass

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_GET(self) -> None:
        self._dispatch("GET")

    # ------------------------------------------------------------------ routing

    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        path, query = unquote(url.path), {k: v[-1] for k, v in parse_qs(url.query).items()}
        self._record = Request(method, "other", "unknown", None, None, None)
        with self.state.lock:  # logged when it starts, so a clear_requests() also drops a transfer still running
            self.state.requests.append(self._record)
        try:
            if path.startswith("/api/v1/models/"):
                self._record.protocol = "modelscope"
                self._modelscope(method, path[len("/api/v1/models/"):], query)
            elif path.startswith("/api/models/"):
                self._record.protocol = "huggingface"
                self._hf_api(path[len("/api/models/"):], query)
            elif "/resolve/" in path:
                self._record.protocol = "huggingface"
                self._hf_resolve(method, path.lstrip("/"))
            else:
                self._error(404, "not found")
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def _gated(self, repo: Repo, protocol: str, file: bool) -> bool:
        """Answer 401/403 for a gated repo (unless the request has its token); True when answered."""
        status = repo.gated
        if status is None or (repo.token and self.headers.get("Authorization") == f"Bearer {repo.token}"):
            return False
        if repo.gated_files_only and not file:
            return False
        self._record.kind = ("file" if self.command == "GET" else "head") if file else "listing"
        if protocol == "modelscope":
            message = ("Unauthorized: log in to access this model" if status == 401 else
                       f"Forbidden: no permission to access model {repo.model_id!r}")
            self._ms_error(status, message)
        else:  # as huggingface.co answers for a gated repo
            message = (f"Access to model {repo.model_id} is restricted. You must have access to it and be "
                       "authenticated to access it. Please log in." if status == 401 else
                       f"Access to model {repo.model_id} is restricted and you are not in the authorized list.")
            self._hf_error(status, "GatedRepo", message)
        return True

    def _split_repo(self, rest: str) -> tuple[Repo | None, str]:
        for model_id, repo in self.state.repos.items():
            if rest == model_id or rest.startswith(model_id + "/"):
                return repo, rest[len(model_id):].lstrip("/")
        return None, rest

    # ------------------------------------------------------------------ ModelScope

    def _modelscope(self, method: str, rest: str, query: dict[str, str]) -> None:
        repo, tail = self._split_repo(rest)
        if repo is None:
            self._ms_error(404, f"model {rest.split('/repo')[0]!r} does not exist")
            return
        self._record.model_id = repo.model_id
        if self._gated(repo, "modelscope", tail == "repo"):
            return
        revision = query.get("Revision") or "master"
        if revision not in ("master", "main", repo.commit):
            self._ms_error(404, f"revision {revision!r} does not exist")
            return
        if tail == "":
            self._record.kind = "info"
            if self._listing_fault(repo):
                return
            owner, _, name = repo.model_id.partition("/")
            self._json({"Code": 200, "Success": True, "Message": "success",
                        "Data": {"Id": 1, "Name": name, "Path": owner, "ChineseName": name, "Revision": "master"}})
        elif tail == "repo/files":
            self._record.kind = "listing"
            if self._listing_fault(repo):
                return
            root = (query.get("Root") or "").strip("/")
            recursive = query.get("Recursive", "True").lower() == "true"
            self._json({"Code": 200, "Success": True, "Message": "success",
                        "Data": {"Files": self._ms_entries(repo, root, recursive)}})
        elif tail == "repo":
            file = repo.files.get(query.get("FilePath", "").lstrip("/"))
            self._record.path = query.get("FilePath")
            if file is None:
                self._record.kind = "file"
                self._ms_error(404, f"file {query.get('FilePath')!r} does not exist")
                return
            self._serve_file(method, file, {}, "modelscope")
        else:
            self._ms_error(404, f"unknown endpoint {tail!r}")

    def _ms_entries(self, repo: Repo, root: str, recursive: bool) -> list[dict]:
        def under(path: str) -> bool:
            if root and not path.startswith(root + "/"):
                return False
            rel = path[len(root) + 1:] if root else path
            return recursive or "/" not in rel

        entries = [{"Name": d.rsplit("/", 1)[-1], "Path": d, "Type": "tree", "Size": 0, "Revision": repo.commit}
                   for d in repo.dirs() if under(d)]
        entries += [{"Name": f.path.rsplit("/", 1)[-1], "Path": f.path, "Type": "blob", "Size": f.size,
                     "Sha256": f.sha256, "IsLFS": f.lfs, "Revision": repo.commit, "CommitMessage": "upload",
                     "CommittedDate": 1754265600, "CommitterName": "test"}
                    for f in repo.files.values() if under(f.path)]
        return entries

    def _ms_error(self, status: int, message: str) -> None:
        self._json({"Code": status, "Success": False, "Message": message, "RequestId": "test"}, status)

    # ------------------------------------------------------------------ HuggingFace

    def _hf_api(self, rest: str, query: dict[str, str]) -> None:
        repo, tail = self._split_repo(rest)
        if repo is None:
            self._hf_error(404, "RepoNotFound", f"Repository {rest!r} not found")
            return
        self._record.model_id = repo.model_id
        if self._gated(repo, "huggingface", False):
            return
        if tail == "" or tail.startswith("revision/"):
            self._record.kind = "info"
            revision = tail[len("revision/"):] or "main"
            if not self._hf_revision_ok(repo, revision) or self._listing_fault(repo):
                return
            blobs = query.get("blobs", "").lower() == "true"
            self._json(self._hf_info(repo, blobs))
        elif tail.startswith("tree/"):
            self._record.kind = "listing"
            revision, _, sub = tail[len("tree/"):].partition("/")
            if not self._hf_revision_ok(repo, revision) or self._listing_fault(repo):
                return
            recursive = query.get("recursive", "false").lower() == "true"
            self._json(self._hf_tree(repo, sub.strip("/"), recursive))
        else:
            self._hf_error(404, "EntryNotFound", f"unknown endpoint {tail!r}")

    def _hf_revision_ok(self, repo: Repo, revision: str) -> bool:
        if revision in ("main", repo.commit):
            return True
        self._hf_error(404, "RevisionNotFound", f"Invalid rev id: {revision}", repo)
        return False

    def _hf_info(self, repo: Repo, blobs: bool) -> dict:
        siblings = []
        for f in repo.files.values():
            sibling = {"rfilename": f.path}
            if blobs:
                sibling.update(size=f.size, blobId=f.git_sha1)
                if f.lfs:
                    sibling["lfs"] = {"size": f.size, "sha256": f.sha256, "pointerSize": 134}
            siblings.append(sibling)
        return {"_id": repo.commit[:24], "id": repo.model_id, "modelId": repo.model_id, "sha": repo.commit,
                "private": False, "disabled": False, "gated": False, "downloads": 0, "likes": 0, "tags": [],
                "lastModified": DATE, "createdAt": DATE, "siblings": siblings}

    def _hf_tree(self, repo: Repo, sub: str, recursive: bool) -> list[dict]:
        def under(path: str) -> bool:
            if sub and not path.startswith(sub + "/"):
                return False
            rel = path[len(sub) + 1:] if sub else path
            return recursive or "/" not in rel

        entries: list[dict] = [{"type": "directory", "oid": hashlib.sha1(d.encode()).hexdigest(), "size": 0,
                                "path": d} for d in repo.dirs() if under(d)]
        for f in repo.files.values():
            if under(f.path):
                entry = {"type": "file", "oid": f.git_sha1, "size": f.size, "path": f.path}
                if f.lfs:
                    entry["lfs"] = {"oid": f.sha256, "size": f.size, "pointerSize": 134}
                entries.append(entry)
        return entries

    def _hf_resolve(self, method: str, rest: str) -> None:
        head, _, tail = rest.partition("/resolve/")
        repo = self.state.repos.get(head)
        if repo is None:
            self._hf_error(404, "RepoNotFound", f"Repository {head!r} not found")
            return
        self._record.model_id = repo.model_id
        revision, _, path = tail.partition("/")
        self._record.path = path
        if self._gated(repo, "huggingface", True):
            return
        if not self._hf_revision_ok(repo, revision):
            return
        file = repo.files.get(path)
        if file is None:
            self._record.kind = "file" if method == "GET" else "head"
            self._hf_error(404, "EntryNotFound", f"{path} does not exist on {revision}", repo)
            return
        headers = {"X-Repo-Commit": repo.commit}
        if file.lfs:
            headers.update({"ETag": f'"{file.sha256}"', "X-Linked-Etag": f'"{file.sha256}"',
                            "X-Linked-Size": str(file.size)})
        else:
            headers["ETag"] = f'"{file.git_sha1}"'
        self._serve_file(method, file, headers, "huggingface")

    def _hf_error(self, status: int, code: str, message: str, repo: Repo | None = None) -> None:
        headers = {"X-Error-Code": code, "X-Error-Message": message}
        if repo is not None:
            headers["X-Repo-Commit"] = repo.commit
        self._json({"error": message}, status, headers)

    # ------------------------------------------------------------------ content and faults

    def _take_fault(self, kinds: tuple[str, ...], on: str, path: str | None, protocol: str) -> Fault | None:
        with self.state.lock:
            for fault in self.state.faults:
                if fault.kind not in kinds or fault.on not in (on, "any"):
                    continue
                if fault.protocol not in (None, protocol):
                    continue
                if path is not None and not fnmatch.fnmatchcase(path, fault.pattern):
                    continue
                if fault.times is not None and fault.hits >= fault.times:
                    continue
                fault.hits += 1
                self._record.fault = fault.kind
                return fault
        return None

    def _listing_fault(self, repo: Repo) -> bool:
        fault = self._take_fault(("status",), "listing", None, self._record.protocol)
        if fault is None:
            return False
        self._error(fault.status, f"injected fault: HTTP {fault.status}")
        return True

    def _serve_file(self, method: str, file: RepoFile, headers: dict[str, str], protocol: str) -> None:
        self._record.kind = "file" if method == "GET" else "head"
        self._record.path = file.path
        total = file.size
        if method == "HEAD":
            self._send(200, {**headers, "Content-Length": str(total), "Accept-Ranges": "bytes",
                             "Content-Type": "application/octet-stream"})
            return
        fault = self._take_fault(("drop", "status", "short", "corrupt", "slow"), "file", file.path, protocol)
        if fault is not None and fault.kind == "status":
            self._error(fault.status, f"injected fault: HTTP {fault.status}")
            return
        served_size = total - fault.delta if fault is not None and fault.kind == "short" else total
        start, end = 0, served_size - 1
        status = 200
        requested = self.headers.get("Range")
        if requested:
            parsed = _parse_range(requested, served_size)
            if parsed is None:
                self._send(416, {**headers, "Content-Range": f"bytes */{served_size}", "Content-Length": "0"})
                return
            start, end = parsed
            self._record.range_start = start
            status = 206
            headers = {**headers, "Content-Range": f"bytes {start}-{end}/{served_size}"}
        length = end - start + 1
        self._send(status, {**headers, "Content-Length": str(length), "Accept-Ranges": "bytes",
                            "Content-Type": "application/octet-stream"})
        sent = 0
        with open(file.local, "rb") as f:
            f.seek(start)
            while sent < length:
                chunk = f.read(min(CHUNK, length - sent))
                if fault is not None and fault.kind == "drop" and sent + len(chunk) >= fault.after_bytes:
                    self.wfile.write(chunk[: max(0, fault.after_bytes - sent)])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if fault is not None and fault.kind == "corrupt" and sent == 0:
                    chunk = bytes(b ^ 0xFF for b in chunk[:16]) + chunk[16:]
                if fault is not None and fault.kind == "slow":
                    time.sleep(fault.delay)
                self.wfile.write(chunk)
                sent += len(chunk)
        self._record.status = status

    # ------------------------------------------------------------------ responses

    def _send(self, status: int, headers: dict[str, str]) -> None:
        self._record.status = status
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()

    def _json(self, body: object, status: int = 200, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body).encode()
        self._send(status, {**(headers or {}), "Content-Type": "application/json", "Content-Length": str(len(data))})
        if self.command != "HEAD":
            self.wfile.write(data)

    def _error(self, status: int, message: str) -> None:
        self._json({"error": message, "Code": status, "Success": False, "Message": message}, status)


def _parse_range(value: str, total: int) -> tuple[int, int] | None:
    unit, _, spec = value.partition("=")
    if unit.strip() != "bytes" or "," in spec:
        return None
    first, _, last = spec.strip().partition("-")
    if not first:  # suffix range: the last N bytes
        n = int(last)
        return (max(0, total - n), total - 1) if n > 0 and total > 0 else None
    start = int(first)
    end = min(int(last), total - 1) if last else total - 1
    if start >= total or end < start:
        return None
    return start, end


def main() -> None:
    parser = argparse.ArgumentParser(description="Serve local folders as a ModelScope / HuggingFace hub.")
    parser.add_argument("repos", nargs="+", metavar="MODEL_ID=FOLDER")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    repos = dict(item.split("=", 1) for item in args.repos)
    with HubServer(repos, port=args.port) as hub:
        print(f"Serving {', '.join(repos)} at {hub.url} (MODELSCOPE_ENDPOINT / HF_ENDPOINT); Ctrl-C stops.",
              flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
