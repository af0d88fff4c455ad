"""Weights that stay warm across commands (opt-in: `keep_warm=15m`).

    python -m runner model=qwen_image keep_warm=15m "prompt=a fox"     # loads, leaves a worker
    python -m runner model=qwen_image keep_warm=15m "prompt=a cat"     # no load: about one image
    python -m runner.warm status | stop                                # (`python -m runner warm ...`)

With `keep_warm`, `runner.job.compute` hands its JobPlan to this user's warm worker for the
job's identity (below): a detached process (`python -m runner.warm serve`) that keeps
runner.build's pipeline cache and runs `runner.job.compute` itself, so the image, its PNG
text chunks and `job.json` land in the job folder exactly as in-process; the JobRecord comes
back and this process, the only MLflow writer, records it as usual. No worker answers: the
first command starts one (it loads the weights, then stays), the next ones reuse it.

Files, in a folder of this user (`$RUNNER_WARM_DIR`, else `$XDG_RUNTIME_DIR/qwen-image-runner`,
else `~/.cache/qwen-image-runner/warm`), per worker `<id>`: `<id>.sock` (its Unix socket),
`<id>.lock` (flocked by the worker while it lives), `<id>.json` (pid, what it holds, counters),
`<id>.log` (its own output), `<id>.beat` (its heartbeat); `<id>.spawn` is flocked by a client
while it decides to connect or start one, so two commands never start two workers of one
identity.

- Identity: runner.build.cache_key (model, VRAM preset, dtype, device), the Python
  executable, the sources of runner/ and pipelines/ (sizes and times: edited code gets a new
  worker), the working directory (relative paths, `./models`) and the environment variables
  that choose files or numerics (DIFFSYNTH_*, HF_*, MODELSCOPE_*, CUDA_*, OMP_*, MKL_*, ...).
- One warm worker per device: starting one stops the others on that device (SIGTERM: an idle
  worker exits at once, a busy one after its job), the cache's own rule (two 20B models do
  not fit side by side). A sweep over models with keep_warm leaves the last one warm.
- One request at a time: the worker serves one connection, then the next. A second command
  waits for it (it says so); it does not load a second copy beside it.
- Every wait on the other process is bounded. A thread of the worker touches `<id>.beat`
  every HEARTBEAT_S, busy or idle; a command waiting for a hello or a record watches it: a
  worker silent for FROZEN_S (SIGSTOP, a hang) is frozen: the command says so and runs the
  job itself, leaving the worker alone, or killing it when it holds this command's job or
  was started by it. Sends time out after SEND_TIMEOUT_S on both sides; the lock a command
  takes to start a worker is waited for at most START_TIMEOUT_S plus a margin.
- Idle exit: the worker exits when no command came for the latest command's keep_warm.
  `keep_warm=0` uses a running worker once and stops it after the job (no worker: the job
  runs in this process); `python -m runner warm stop` stops every worker of this user.
- Never a failed job because of the worker: a folder that is not private, a worker that
  does not start, a killed worker (its socket refuses: the files are removed, the job runs
  here, the next command starts a new worker), a worker that dies during the job (its
  complete job.json is used, else the job runs again here) all log a warning and go on.
- Ctrl-C: the client sends `cancel`; the worker interrupts `compute` in its main thread (the
  job ends KILLED as in-process, its LoRA state is forgotten and cleared by the next job) and
  stays usable. A client that dies has its job stopped the same way.
- State across commands: compute applies exactly the spec's LoRAs; the worker also forgets
  the LoRAs (and their cached sha256) whose files changed on disk since it applied them, and
  reloads a checkpoint whose files changed. The job's log records and stderr (progress bar)
  are forwarded to the command.

Security. The socket is a file in a folder of this user with mode 0700 (created so, checked
before every use: owned by this uid, not a link, no group or other bits; else no worker and a
warning), the socket itself 0600; no TCP, no abstract-namespace socket (those ignore file
permissions). Each side checks the other's uid with SO_PEERCRED and refuses another uid
before reading a byte from it. Messages are pickles (the JobPlan, the JobRecord): a pickle
runs code, so the peers must be trusted, and they are: only processes of this very user can
reach the socket, and such a process can already run any code as this user (edit the venv,
ptrace). The worker signals only pids it reads from this private folder, checked against
their start time.
"""
from __future__ import annotations

import _thread
import argparse
import contextlib
import fcntl
import functools
import hashlib
import io
import json
import logging
import os
import pickle
import select
import signal
import socket
import stat
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

from .build import loras
from .build import pipeline as build

logger = logging.getLogger("runner")

DIR_ENV = "RUNNER_WARM_DIR"
IN_WORKER = False  # True in the worker: runner.job.compute runs there, it never forwards
PACKAGE_ROOT = Path(__file__).resolve().parent.parent
# environment variables that choose which files load or how the numbers come out
IDENTITY_ENV = ("DIFFSYNTH_", "HF_", "HUGGINGFACE_", "MODELSCOPE_", "TRANSFORMERS_", "CUDA_", "OMP_", "MKL_",
                "OPENBLAS_", "PYTORCH_", "TORCH_", "PYTHON")
START_TIMEOUT_S = 300.0  # the worker's imports (torch), not the load: that happens in the job
BUSY_NOTICE_S = 2.0  # no hello within this: the worker serves another command; say so and wait
HEARTBEAT_S = 0.5  # the worker touches <id>.beat this often, idle or busy (a thread of its own)
FROZEN_ENV = "RUNNER_WARM_FROZEN_S"
FROZEN_S = 60.0  # no heartbeat for this long: the worker is frozen (stopped, hung); $RUNNER_WARM_FROZEN_S
SEND_TIMEOUT_S = 60.0  # a peer that takes nothing for this long is frozen: the send fails
ACCEPT_POLL_S = 1.0  # the idle worker's accept() waits at most this long at a time
REQUEST_TIMEOUT_S = 30.0  # a connected client sends its request at once
CANCEL_WAIT_S = 120.0  # after Ctrl-C: how long to wait for the worker's KILLED record
STOP_WAIT_S = 60.0  # how long to wait for a stopped worker to exit
LOCK_WAIT_S = 30.0  # a new worker waits this long for the previous one's lock (it is exiting)
MAX_FRAME = 1 << 30
_HEADER = struct.Struct("!Q")
_UNIX_PATH_MAX = 107


class WarmError(Exception):
    """The warm worker cannot be used; the message says why (the job then runs here)."""


class _Closed(Exception):
    """The worker closed the connection before taking the job (it was exiting)."""


class _Frozen(Exception):
    """The worker sent no heartbeat for `frozen_after()` seconds (stopped, hung)."""


# --------------------------------------------------------------------------- folder


def warm_dir(create: bool = True) -> Path:
    """This user's folder of warm workers, private (0700); WarmError if it is not."""
    if os.environ.get(DIR_ENV):
        folder = Path(os.environ[DIR_ENV])
    elif os.environ.get("XDG_RUNTIME_DIR"):
        folder = Path(os.environ["XDG_RUNTIME_DIR"]) / "qwen-image-runner"
    else:
        folder = Path.home() / ".cache" / "qwen-image-runner" / "warm"
    folder = folder.absolute()
    if create:
        folder.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):
            folder.mkdir(mode=0o700)
    check_private(folder)
    return folder


def check_private(folder: Path) -> None:
    try:
        st = os.lstat(folder)
    except FileNotFoundError:
        raise WarmError(f"{folder} does not exist") from None
    if not stat.S_ISDIR(st.st_mode):
        raise WarmError(f"{folder} is not a folder (a link?): remove it, or set {DIR_ENV} to a private folder")
    if st.st_uid != os.getuid():
        raise WarmError(f"{folder} belongs to uid {st.st_uid}, not to this user (uid {os.getuid()}): remove it, "
                        f"or set {DIR_ENV} to a folder of yours")
    if st.st_mode & 0o077:
        raise WarmError(f"{folder} is open to other users (mode {stat.S_IMODE(st.st_mode):o}): `chmod 700 {folder}`")


def _path(folder: Path, wid: str, ext: str) -> Path:
    return folder / f"{wid}.{ext}"


@contextlib.contextmanager
def _flock(path: Path, timeout: float, holder: str) -> Iterator[None]:
    """`path` flocked, waited for at most `timeout` seconds (saying so after BUSY_NOTICE_S);
    WarmError naming `holder` when it stays taken."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        started, said = time.monotonic(), False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                waited = time.monotonic() - started
                if waited > timeout:
                    raise WarmError(f"{holder} has held {path} for {waited:.0f} s") from None
                if not said and waited > BUSY_NOTICE_S:
                    said = True
                    logger.info("Waiting for %s (%s), at most %s", holder, path, duration(round(timeout)))
                time.sleep(0.05)
        yield
    finally:
        os.close(fd)


def frozen_after() -> float:
    """How long a worker may send no heartbeat before it counts as frozen ($RUNNER_WARM_FROZEN_S)."""
    try:
        value = float(os.environ.get(FROZEN_ENV) or FROZEN_S)
    except ValueError:
        return FROZEN_S
    return value if 0 < value < float("inf") else FROZEN_S


def silent_for(folder: Path, wid: str) -> float:
    """Seconds since the worker's last heartbeat (`<id>.beat` touched); inf without one."""
    try:
        return max(time.time() - os.stat(_path(folder, wid, "beat")).st_mtime, 0.0)
    except OSError:
        return float("inf")


def is_alive(folder: Path, wid: str) -> bool:
    """Whether the worker `wid` lives: it holds its lock file from start to exit."""
    try:
        fd = os.open(_path(folder, wid, "lock"), os.O_RDWR)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def _remove(folder: Path, wid: str, *exts: str) -> None:
    for ext in exts:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(_path(folder, wid, ext))


def _read_info(folder: Path, wid: str) -> dict[str, Any]:
    try:
        return json.loads(_path(folder, wid, "json").read_text())
    except (OSError, ValueError):
        return {}


def _write_private(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def workers(folder: Path) -> list[dict[str, Any]]:
    """The workers with a record in `folder`, each with `alive`."""
    found = []
    for info_file in sorted(folder.glob("*.json")):
        info = _read_info(folder, info_file.stem)
        if info:
            found.append(info | {"alive": is_alive(folder, info_file.stem)})
    return found


# ------------------------------------------------------------------------- identity


@dataclass
class Identity:
    digest: str  # sha256 of everything a worker must share with the command
    about: dict[str, Any]  # what it holds, for the logs and `warm status` (no environment values)

    @property
    def wid(self) -> str:
        return self.digest[:16]


@functools.lru_cache(maxsize=1)
def code_fingerprint() -> str:
    """The runner's and the library's sources, by path and stat (size, times, inode)."""
    import pipelines

    from .tracking.provenance import stat_key

    h = hashlib.sha256()
    for root in (Path(__file__).resolve().parent, Path(pipelines.__file__).resolve().parent):
        for path in sorted(root.rglob("*.py")):
            h.update(f"{path}:{stat_key(path.stat())}\n".encode())
    return h.hexdigest()


def identity(plan: Any) -> Identity:

    spec, rt = plan.spec, plan.runtime
    env = {k: v for k, v in os.environ.items() if k.startswith(IDENTITY_ENV)}
    whole = {"cache_key": build.cache_key(spec, rt), "python": sys.executable, "code": code_fingerprint(),
             "cwd": os.getcwd(), "env": env}
    digest = hashlib.sha256(json.dumps(whole, sort_keys=True, default=str).encode()).hexdigest()
    device = rt.device
    if device.startswith("cuda"):  # the physical device: cuda == cuda:0, under CUDA_VISIBLE_DEVICES
        device = f"{device if ':' in device else device + ':0'}@{os.environ.get('CUDA_VISIBLE_DEVICES', '')}"
    about = {"model": spec.model.name, "vram": spec.vram.name, "dtype": rt.dtype, "device": rt.device,
             "device_key": device, "cwd": os.getcwd()}
    return Identity(digest, about)


def describe(about: dict[str, Any]) -> str:
    return f"{about.get('model')} ({about.get('device')}, {about.get('dtype')}, vram={about.get('vram')})"


def duration(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


# -------------------------------------------------------------------------- framing


class Channel:
    """Length-prefixed pickles over a connected Unix socket. A read interrupted (Ctrl-C) keeps
    what it got: the next read goes on from there."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()
        self._sending = threading.Lock()

    def send(self, kind: str, body: Any = None) -> None:
        data = pickle.dumps((kind, body), protocol=pickle.HIGHEST_PROTOCOL)
        with self._sending:
            self.sock.sendall(_HEADER.pack(len(data)) + data)

    def read(self, timeout: Optional[float] = None) -> tuple[str, Any]:
        """The next message; TimeoutError when none began within `timeout`; EOFError when the
        other side closed."""
        if timeout is not None and not self.buf:
            ready, _, _ = select.select([self.sock], [], [], timeout)
            if not ready:
                raise TimeoutError(f"no message within {timeout:g} s")
        self._fill(_HEADER.size)
        (size,) = _HEADER.unpack_from(self.buf)
        if size > MAX_FRAME:
            raise WarmError(f"a message of {size} bytes: not from a warm worker of this runner")
        self._fill(_HEADER.size + size)
        data = bytes(self.buf[_HEADER.size:_HEADER.size + size])
        del self.buf[:_HEADER.size + size]
        return pickle.loads(data)

    def _fill(self, size: int) -> None:
        while len(self.buf) < size:
            chunk = self.sock.recv(max(1 << 16, size - len(self.buf)))
            if not chunk:
                raise EOFError("the connection was closed")
            self.buf += chunk


def peer(sock: socket.socket) -> tuple[int, int]:
    """(pid, uid) of the process at the other end of a Unix socket (Linux SO_PEERCRED)."""
    option = getattr(socket, "SO_PEERCRED", None)
    if option is None:
        raise WarmError("this system cannot tell who is at the other end of a socket (no SO_PEERCRED)")
    pid, uid, _ = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, option, struct.calcsize("3i")))
    return pid, uid


# --------------------------------------------------------------------------- client


def compute(plan: Any) -> Optional[Any]:
    """The job of `plan` in the warm worker: its JobRecord, or None when it is to run in this
    process (no worker for keep_warm=0, or the worker could not be used: a warning says why)."""
    if IN_WORKER:
        return None
    from .config.checks import keep_warm_seconds

    try:
        return _Client(plan, keep_warm_seconds(plan.spec.keep_warm)).run()
    except WarmError as error:
        logger.warning("Warm worker not used: %s. The job runs in this process (it loads the weights).", error)
    except Exception as error:  # noqa: BLE001 - never a failed job because of the worker
        logger.warning("Warm worker not used (%s: %s). The job runs in this process (it loads the weights).",
                       type(error).__name__, error)
    return None


def _killed(plan: Any) -> Any:
    """The record of a job interrupted before the worker took it (as compute's own)."""
    from . import job
    from .records import KILLED

    record = job.new_record(plan)
    record.status, record.error, record.error_kind = KILLED, "interrupted", "interrupted"
    record.ended = time.time()
    record.metrics.setdefault("total_s", record.ended - record.started)
    job._save_record(record)
    job._log_outcome(record, plan.label)
    return record


class _Client:
    def __init__(self, plan: Any, seconds: float) -> None:
        self.plan, self.seconds = plan, seconds
        self.ident = identity(plan)
        self.folder = warm_dir()
        self.wid = self.ident.wid
        self.started_here = False
        self.frozen_s = frozen_after()

    def path(self, ext: str) -> Path:
        return _path(self.folder, self.wid, ext)

    def run(self) -> Optional[Any]:
        for attempt in range(2):
            try:
                channel, hello = self.open()
            except KeyboardInterrupt:
                return _killed(self.plan)
            except _Closed:  # it was ending on its idle time as this one connected: once more
                if attempt:
                    raise WarmError("the warm worker closed the connection twice before taking the job") from None
                continue
            if channel is None:
                return None
            with contextlib.closing(channel.sock):
                return self.job(channel, hello)
        return None

    def open(self) -> tuple[Optional[Channel], Optional[dict]]:
        sock_path = self.path("sock")
        if len(os.fsencode(sock_path)) > _UNIX_PATH_MAX:
            raise WarmError(f"the socket path {sock_path} is too long for a Unix socket: set {DIR_ENV} to a "
                            "shorter folder")
        with _flock(self.path("spawn"), START_TIMEOUT_S + 60, "another command starting or reaching this warm worker"):
            sock = self.connect(sock_path)
            if sock is None:
                if self.seconds == 0:
                    logger.info("keep_warm=0 and no warm worker for %s: the job runs in this process",
                                describe(self.ident.about))
                    return None, None
                self.start()
                sock = self.connect(sock_path)
                if sock is None:
                    raise WarmError(f"the new warm worker does not listen on {sock_path}")
        channel = Channel(sock)
        try:
            return channel, self.hello(channel)
        except BaseException:
            sock.close()
            raise

    def connect(self, sock_path: Path) -> Optional[socket.socket]:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(SEND_TIMEOUT_S)  # no read or send waits for ever on a frozen worker (see `wait`)
        try:
            sock.connect(str(sock_path))
        except FileNotFoundError:
            sock.close()
            return None
        except ConnectionRefusedError:
            sock.close()
            self.gone()
        except (BlockingIOError, TimeoutError):
            sock.close()
            raise WarmError(f"the warm worker does not take connections on {sock_path} (its queue is full)") from None
        pid, uid = peer(sock)
        if uid != os.getuid():
            sock.close()
            raise WarmError(f"the process behind {sock_path} (pid {pid}) belongs to uid {uid}, not to this user")
        return sock

    def gone(self) -> None:
        """The socket refuses: its worker died without cleaning up (killed, crashed)."""
        info = _read_info(self.folder, self.wid)
        if is_alive(self.folder, self.wid):
            raise WarmError(f"the warm worker pid {info.get('pid')} holds its lock but refuses connections")
        _remove(self.folder, self.wid, "sock", "json", "beat")
        raise WarmError(f"the warm worker of {describe(self.ident.about)} (pid {info.get('pid', '?')}) is gone "
                        f"(killed or crashed; its log: {self.path('log')}); its socket is removed and the next "
                        "command starts a new one")

    def hello(self, channel: Channel) -> dict:
        try:
            try:
                kind, hello = channel.read(timeout=BUSY_NOTICE_S)
            except TimeoutError:
                pid = _read_info(self.folder, self.wid).get("pid", "?")
                if silent_for(self.folder, self.wid) < self.frozen_s:
                    logger.info("Warm worker pid %s is busy with another command: this one waits for it while "
                                "its heartbeat goes on (Ctrl-C stops waiting)", pid)
                kind, hello = self.wait(channel, "its hello")
        except (EOFError, ConnectionResetError):
            raise _Closed() from None
        except _Frozen as error:
            raise self.frozen(error, holds_job=False) from None
        if kind != "hello" or not isinstance(hello, dict) or hello.get("digest") != self.ident.digest:
            raise WarmError("the process behind the socket is not this identity's warm worker")
        return hello

    def start(self) -> None:
        """Start this identity's worker (detached, in its own session) and wait until it
        listens. Workers of other identities on the same device are stopped first."""
        stop_others(self.folder, self.ident)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PACKAGE_ROOT), env.get("PYTHONPATH")) if p)
        read_end, write_end = os.pipe()
        log_fd = os.open(self.path("log"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        argv = [sys.executable, "-m", "runner.warm", "serve", "--digest", self.ident.digest,
                "--idle", repr(self.seconds), "--ready-fd", str(write_end), "--about", json.dumps(self.ident.about)]
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log_fd, stderr=log_fd,
                                    pass_fds=(write_end,), start_new_session=True, env=env, cwd=os.getcwd())
        finally:
            os.close(write_end)
            os.close(log_fd)
        try:
            ready = _wait_ready(read_end, START_TIMEOUT_S)
        finally:
            os.close(read_end)
        if not ready:
            if proc.poll() is None:
                proc.kill()
            raise WarmError(f"the warm worker did not start (exit {proc.wait()}; its log: {self.path('log')}: "
                            f"{_last_line(self.path('log'))})")
        self.started_here = True
        logger.info("Warm worker pid %d started for %s: it loads the weights now and keeps them %s after the last "
                    "command (`python -m runner warm stop` ends it)", proc.pid, describe(self.ident.about),
                    duration(self.seconds))

    def job(self, channel: Channel, hello: dict) -> Optional[Any]:
        if not self.started_here:
            loaded = "weights loaded, no load" if hello.get("loaded") else "it loads the weights now"
            logger.info("Warm worker pid %s for %s: %s (%d job(s) served)", hello.get("pid"),
                        describe(self.ident.about), loaded, hello.get("jobs", 0))
        request = {"plan": self.plan, "env": dict(os.environ), "keep_warm_s": self.seconds}
        try:
            channel.send("job", request)
            return self.result(channel)
        except KeyboardInterrupt:
            return self.cancel(channel)
        except _Frozen as error:  # it holds the job: killed, then the job runs here
            logger.warning("Warm worker not used: %s. The job runs again in this process (it loads the weights).",
                           self.frozen(error, holds_job=True))
            _clear_job_folder(self.plan, hello.get("pid"))
            return None
        except Exception as error:  # noqa: BLE001 - the worker ended or failed: the job's folder tells
            return self.recover(error, hello)

    def result(self, channel: Channel) -> Any:
        while True:
            kind, body = self.wait(channel, "the job's record")
            if kind == "record":
                return body
            _relay(kind, body)

    def wait(self, channel: Channel, what: str) -> tuple[str, Any]:
        """The next message, waited for as long as the worker's heartbeat goes on (a busy
        worker); _Frozen once it has been silent for `frozen_s`."""
        while True:
            try:
                return channel.read(timeout=HEARTBEAT_S)
            except TimeoutError:
                silent = silent_for(self.folder, self.wid)
                if silent >= self.frozen_s:
                    raise _Frozen(f"no heartbeat for {silent:.0f} s while this command waited for {what}") from None

    def frozen(self, error: _Frozen, holds_job: bool) -> WarmError:
        """What to say of a frozen worker, which is killed when it holds this command's job or
        this command started it, else left alone (it may be stopped on purpose)."""
        info = _read_info(self.folder, self.wid)
        pid = info.get("pid", "?")
        if holds_job or self.started_here:
            fate = "stopped it (SIGKILL)" if _kill(self.folder, info) else "could not stop it (no such process)"
        else:
            fate = f"left it as it is (`kill -CONT {pid}` resumes a stopped worker, `kill -9 {pid}` ends it)"
        return WarmError(f"the warm worker pid {pid} does not answer ({error}: stopped or hung); this command {fate}")

    def cancel(self, channel: Channel) -> Any:
        """Ctrl-C while the worker computes: it stops the job (KILLED) and stays warm."""
        from .records import KILLED

        logger.info("Interrupted: the warm worker stops the job")
        deadline = time.monotonic() + CANCEL_WAIT_S
        try:
            channel.send("cancel")
            while time.monotonic() < deadline and not _hurry():
                try:
                    kind, body = channel.read(timeout=min(1.0, max(deadline - time.monotonic(), 0.01)))
                except TimeoutError:
                    continue
                if kind == "record":
                    if body.status != KILLED:  # it ended before the cancel: the Ctrl-C still stops the run
                        raise KeyboardInterrupt("interrupted after the job")
                    return body
                _relay(kind, body)
        except (OSError, EOFError, WarmError, pickle.UnpicklingError):
            pass
        return _killed(self.plan)

    def recover(self, error: BaseException, hello: dict) -> Optional[Any]:
        """The worker ended (or failed) during the job: its complete record if it wrote one,
        else a clean job folder and None (the job runs here)."""
        plan, pid = self.plan, hello.get("pid")
        record = _record_in_folder(plan)
        if record is not None:
            logger.warning("Warm worker pid %s ended after the job (%s: %s): its job.json is the record", pid,
                           type(error).__name__, error)
            return record
        _clear_job_folder(plan, pid)
        logger.warning("Warm worker pid %s ended during the job (%s: %s; its log: %s). The job runs again in this "
                       "process (it loads the weights).", pid, type(error).__name__, error, self.path("log"))
        return None


def _hurry() -> bool:
    """A second Ctrl-C during the shutdown (runner.state): stop waiting for the worker."""
    state = sys.modules.get("runner.state")
    return bool(state is not None and state.STATE.hurry)


def _relay(kind: str, body: Any) -> None:
    """A log record or stderr text of the job in the worker, re-emitted here."""
    if kind == "log":
        record = logging.makeLogRecord(body)
        logging.getLogger(record.name).handle(record)
    elif kind == "err":
        with contextlib.suppress(Exception):
            sys.stderr.write(body)
            sys.stderr.flush()


def _wait_ready(fd: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    data = b""
    while b"\n" not in data:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        ready, _, _ = select.select([fd], [], [], remaining)
        if ready:
            chunk = os.read(fd, 64)
            if not chunk:
                return False
            data += chunk
    return data.startswith(b"ready")


def _last_line(path: Path) -> str:
    try:
        lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    return lines[-1][-300:] if lines else "(empty)"


def _record_in_folder(plan: Any) -> Optional[Any]:
    """The finished record of this very job in its folder (job.json), if there is one."""
    from .records import FAILED, FINISHED, KILLED, JobRecord

    if plan.job_dir is None:
        return None
    try:
        record = JobRecord.read(Path(plan.job_dir) / "job.json")
    except (OSError, ValueError, TypeError):
        return None
    if record.record_id == plan.record_id and record.status in (FINISHED, FAILED, KILLED):
        return record
    return None


def _clear_job_folder(plan: Any, pid: Any) -> None:
    """What a dead worker left of this job: its image (the job's folder is its own) and its
    temporary files, so that the job can run again here."""
    if plan.job_dir is None:
        return
    folder = Path(plan.job_dir)
    for name in ("image.png", "job.json"):
        with contextlib.suppress(OSError):
            (folder / name).unlink()
    if isinstance(pid, int):
        from .files import TEMP_MARK

        for tmp in folder.glob(f".*{TEMP_MARK}{pid}"):
            with contextlib.suppress(OSError):
                tmp.unlink()


# ---------------------------------------------------------------- stopping workers


def terminate(folder: Path, info: dict[str, Any], wait: float = STOP_WAIT_S) -> bool:
    """SIGTERM to a worker (an idle one exits at once, a busy one after its job); True once it
    has exited within `wait` seconds. Only a pid whose start time matches its record."""
    from .owner import process_start

    wid, pid = info.get("wid", ""), info.get("pid")
    if not wid or not is_alive(folder, wid):
        return True
    if not isinstance(pid, int) or process_start(pid) != info.get("start"):
        logger.warning("Warm worker %s: its record does not match a live process; not signalled", wid)
        return False
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + wait
    while is_alive(folder, wid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _kill(folder: Path, info: dict[str, Any]) -> bool:
    """SIGKILL to a frozen worker (a stopped one cannot handle SIGTERM), only a pid whose start
    time matches its record; True once it has exited (within STOP_WAIT_S)."""
    from .owner import process_start

    wid, pid = info.get("wid", ""), info.get("pid")
    if not isinstance(pid, int) or process_start(pid) != info.get("start"):
        return False
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + STOP_WAIT_S
    while is_alive(folder, wid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if is_alive(folder, wid):
        return False
    _remove(folder, wid, "sock", "json", "beat")  # what it cannot clean itself: the next command starts anew
    return True


def stop_others(folder: Path, ident: Identity) -> None:
    """One warm worker per device: stop the others on this device."""
    for info in workers(folder):
        if not info["alive"] or info.get("wid") == ident.wid:
            continue
        if info.get("about", {}).get("device_key") != ident.about["device_key"]:
            continue
        logger.info("Stopping warm worker pid %s (%s): one warm worker per device", info.get("pid"),
                    describe(info.get("about", {})))
        if not terminate(folder, info):
            logger.warning("Warm worker pid %s is still busy with a job: the new one loads beside it",
                           info.get("pid"))


# --------------------------------------------------------------------------- worker


class _LogForward(logging.Handler):
    """The job's log records, to the command that sent it."""

    def __init__(self, channel: Channel) -> None:
        super().__init__(logging.INFO)
        self.channel = channel

    def emit(self, record: logging.LogRecord) -> None:
        try:
            data = dict(record.__dict__)
            data["msg"], data["args"] = record.getMessage(), None
            if record.exc_info:
                data["exc_text"] = logging.Formatter().formatException(record.exc_info)
            data["exc_info"] = None
            self.channel.send("log", data)
        except Exception:  # noqa: BLE001 - the client is gone: its job is being stopped
            pass


class _StderrForward(io.TextIOBase):
    """sys.stderr during a job (the progress bar, warnings), to the command that sent it."""

    def __init__(self, channel: Channel) -> None:
        super().__init__()
        self.channel = channel

    @property
    def encoding(self) -> str:
        return "utf-8"

    def write(self, text: str) -> int:
        if text:
            with contextlib.suppress(Exception):
                self.channel.send("err", text)
        return len(text)


@contextlib.contextmanager
def _as_client(channel: Channel, env: dict[str, str]) -> Iterator[None]:
    """The client's environment (RUNNER_HOLD, hydra.job.env_set, ...), its logs and stderr."""
    saved_env, saved_err = dict(os.environ), sys.stderr
    handler = _LogForward(channel)
    os.environ.clear()
    os.environ.update(env)
    logging.getLogger().addHandler(handler)
    sys.stderr = _StderrForward(channel)
    try:
        yield
    finally:
        sys.stderr = saved_err
        logging.getLogger().removeHandler(handler)
        os.environ.clear()
        os.environ.update(saved_env)


def _file_state(paths: list[Path]) -> tuple:
    """What tells that files changed without reading them (runner.provenance.stat_key: the
    change time included, which `cp -p` or `touch -r` cannot set back)."""
    from .tracking.provenance import stat_key

    out = []
    for path in paths:
        try:
            out.append((str(path), *stat_key(os.stat(path))))
        except OSError:
            out.append((str(path), None))
    return tuple(out)


def _lora_file_state(item: Any, spec: Any) -> Optional[tuple]:

    try:
        return _file_state(loras.lora_files(item, spec, download=False))
    except Exception:  # noqa: BLE001 - a hub LoRA not on disk: the job's own apply reports it
        return None


class Worker:
    """`python -m runner.warm serve`: one request at a time, until idle for keep_warm."""

    def __init__(self, folder: Path, digest: str, idle_s: float, about: dict[str, Any]) -> None:
        self.folder, self.digest, self.idle_s, self.about = folder, digest, idle_s, about
        self.wid = digest[:16]
        self.jobs = 0
        self.started = time.time()
        self.in_request = self.in_job = self.stopping = False
        self.base_files: Optional[tuple] = None  # the loaded checkpoint's files when it loaded
        self.lora_files: dict[str, tuple] = {}  # LoRA key -> its files when it was applied

    def path(self, ext: str) -> Path:
        return _path(self.folder, self.wid, ext)

    def info(self) -> dict[str, Any]:
        from .owner import process_start

        return {"wid": self.wid, "digest": self.digest, "pid": os.getpid(), "start": process_start(os.getpid()),
                "about": self.about, "keep_warm_s": self.idle_s, "jobs": self.jobs, "loads": build.LOAD_COUNT,
                "loaded": build.current() is not None, "started": self.started, "last_used": time.time()}

    def main(self, ready_fd: int) -> int:
        global IN_WORKER
        IN_WORKER = True
        check_private(self.folder)
        lock_fd = _take_lock(self.path("lock"))
        if lock_fd is None:
            logger.error("another warm worker of this identity holds %s: exiting", self.path("lock"))
            return 3
        listener = None
        try:
            import torch  # noqa: F401 - the imports are paid before the first command waits on them

            from . import job  # noqa: F401
            _write_private(self.path("beat"), "")
            threading.Thread(target=self.heartbeat, name="heartbeat", daemon=True).start()
            listener = self.listen()
            _write_private(self.path("json"), json.dumps(self.info(), indent=1))
            signal.signal(signal.SIGTERM, self.on_sigterm)
            signal.signal(signal.SIGINT, self.on_sigint)
            os.write(ready_fd, b"ready\n")
            os.close(ready_fd)
            logger.info("warm worker %s for %s: listening on %s", self.wid, describe(self.about), self.path("sock"))
            self.loop(listener)
        finally:
            _remove(self.folder, self.wid, "sock")  # first: a new command starts a new worker
            if listener is not None:
                listener.close()  # a connection still queued sees EOF and tries again
            _remove(self.folder, self.wid, "json", "beat")
            os.close(lock_fd)
        return 0

    def heartbeat(self) -> None:
        """`<id>.beat` touched every HEARTBEAT_S while this process runs, busy or idle: a command
        waiting for this worker tells a busy one from a frozen one (stopped, hung) by it."""
        path = self.path("beat")
        while True:
            with contextlib.suppress(OSError):
                os.utime(path)
            time.sleep(HEARTBEAT_S)

    def listen(self) -> socket.socket:
        sock_path = self.path("sock")
        _remove(self.folder, self.wid, "sock")  # a killed worker's (this one holds the lock)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        umask = os.umask(0o177)
        try:
            listener.bind(str(sock_path))
        finally:
            os.umask(umask)
        os.chmod(sock_path, 0o600)
        listener.listen(16)
        return listener

    def loop(self, listener: socket.socket) -> None:
        """Serve commands until none came for `idle_s` (the latest command's keep_warm). The
        accept waits ACCEPT_POLL_S at a time: no timeout to overflow, whatever keep_warm is."""
        last = time.monotonic()
        while not self.stopping:
            left = self.idle_s - (time.monotonic() - last)
            if left <= 0:
                logger.info("no command for %s: exiting", duration(self.idle_s))
                return
            listener.settimeout(min(left, ACCEPT_POLL_S))
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            conn.setblocking(True)
            _send_timeout(conn)
            with conn:
                self.serve(conn)
            last = time.monotonic()
        logger.info("stopped")

    def on_sigterm(self, signum: int, frame: Any) -> None:  # noqa: ARG002
        self.stopping = True
        if not self.in_request:
            raise SystemExit(0)
        logger.info("asked to stop: after this request")

    def on_sigint(self, signum: int, frame: Any) -> None:  # noqa: ARG002
        """Only a cancel of the job in progress (interrupt_main from the watcher) interrupts."""
        if self.in_job:
            raise KeyboardInterrupt("cancelled by the client")

    def serve(self, conn: socket.socket) -> None:
        self.in_request = True
        try:
            pid, uid = peer(conn)
            if uid != os.getuid():
                logger.warning("refused a connection from pid %d of uid %d (not this user)", pid, uid)
                return
            channel = Channel(conn)
            channel.send("hello", self.info())
            kind, body = channel.read(timeout=REQUEST_TIMEOUT_S)
            if kind == "job":
                self.job(channel, body)
        except (OSError, EOFError, WarmError, pickle.UnpicklingError) as error:
            logger.warning("a request ended early: %s: %s", type(error).__name__, error)
        finally:
            self.in_request = False

    def job(self, channel: Channel, request: dict[str, Any]) -> None:
        plan = request["plan"]
        self.idle_s = float(request["keep_warm_s"])
        with _as_client(channel, request["env"]):
            self.forget_changed(plan.spec)
            record = self.compute(channel, plan)
            self.remember_files(plan.spec)
        self.jobs += 1
        if self.idle_s <= 0:
            self.stopping = True
        _write_private(self.path("json"), json.dumps(self.info(), indent=1))
        channel.send("record", record)

    def compute(self, channel: Channel, plan: Any) -> Any:
        from . import job

        watcher = threading.Thread(target=self.watch, args=(channel,), daemon=True)
        self.in_job = True
        watcher.start()
        try:
            return job.compute(plan)
        except KeyboardInterrupt:  # landed after compute's own handler
            return _interrupted(plan)
        finally:
            self.in_job = False
            with contextlib.suppress(OSError):
                channel.sock.shutdown(socket.SHUT_RD)  # ends the watcher's read
            watcher.join()

    def watch(self, channel: Channel) -> None:
        """During the job: a `cancel` (Ctrl-C) or the client gone stops it."""
        try:
            kind, _ = channel.read()
        except Exception:  # noqa: BLE001 - closed: the client is gone
            kind = None
        if self.in_job:
            logger.warning("the command %s: stopping its job", "was interrupted" if kind == "cancel" else "went away")
            _thread.interrupt_main()

    def forget_changed(self, spec: Any) -> None:
        """Files changed on disk since they were loaded: reload the checkpoint, re-apply LoRAs."""
        entry = build.current()
        if entry is None:
            return
        try:
            base_changed = _file_state(build.checkpoint_files(entry)) != self.base_files
        except Exception as error:  # noqa: BLE001 - files gone or unreadable: the job's own load reports it
            logger.info("the checkpoint's files cannot be checked (%s): loading them again", error)
            base_changed = True
        if base_changed:
            if self.base_files is not None:
                logger.info("the checkpoint's files changed since they were loaded: loading them again")
            build.release()
            self.base_files, self.lora_files = None, {}
            return
        for label, _, item in spec.lora.items():
            key = loras.lora_state_key(item)
            if key in self.lora_files and _lora_file_state(item, spec) != self.lora_files[key]:
                logger.info("LoRA %s: its file changed since it was applied: applying it again", label)
                loras.forget_lora_state(entry)
                entry.lora_fingerprints.pop(key, None)
                self.lora_files.pop(key)

    def remember_files(self, spec: Any) -> None:
        entry = build.current()
        if entry is None:
            self.base_files, self.lora_files = None, {}
            return
        if self.base_files is None:
            with contextlib.suppress(Exception):  # unreadable: the next job loads again (forget_changed)
                self.base_files = _file_state(build.checkpoint_files(entry))
        for _, _, item in spec.lora.items():
            self.lora_files[loras.lora_state_key(item)] = _lora_file_state(item, spec)


def _send_timeout(conn: socket.socket) -> None:
    """A blocking socket whose sends fail after SEND_TIMEOUT_S (a frozen command takes nothing):
    the job's log and record are never what keeps the worker from its next command."""
    seconds = int(SEND_TIMEOUT_S)
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", seconds, 0))


def _interrupted(plan: Any) -> Any:
    loras.forget_lora_state(build.current())
    return _record_in_folder(plan) or _killed(plan)


def _take_lock(path: Path) -> Optional[int]:
    """This worker's lock, held until it exits; a previous worker may still be exiting."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    deadline = time.monotonic() + LOCK_WAIT_S
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.monotonic() > deadline:
                os.close(fd)
                return None
            time.sleep(0.02)


# ------------------------------------------------------------------------- commands


def status_lines(folder: Path) -> list[str]:
    lines = []
    for info in workers(folder):
        if not info["alive"]:
            continue
        about = info.get("about", {})
        left = info.get("last_used", 0) + info.get("keep_warm_s", 0) - time.time()
        lines.append(f"pid {info.get('pid')}  {describe(about)}  loads {info.get('loads')}  jobs {info.get('jobs')}  "
                     f"exits in {duration(max(round(left), 0))} without a command  (cwd {about.get('cwd')})")
    return lines


def stop_all(folder: Path, wait: float = STOP_WAIT_S) -> int:
    """Stop every warm worker in `folder` (a busy one after its job); remove what dead ones
    left. Returns how many did not exit within `wait`."""
    left = 0
    for info in workers(folder):
        wid = info.get("wid", "")
        if info["alive"]:
            print(f"stopping warm worker pid {info.get('pid')} ({describe(info.get('about', {}))})", flush=True)
            if not terminate(folder, info, wait):
                print(f"  pid {info.get('pid')} is still busy after {wait:g} s: it exits after its job")
                left += 1
                continue
        _remove(folder, wid, "sock", "json", "beat")
    return left


def warm_main(argv: list[str]) -> int:
    """`python -m runner warm status|stop` (also `python -m runner.warm ...`)."""
    parser = argparse.ArgumentParser(prog="python -m runner warm", description="This user's warm workers "
                                     "(keep_warm=...): list them, or stop them.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("status", help="list the running warm workers")
    sub.add_parser("stop", help="stop every warm worker of this user (a busy one after its job)")
    serve = sub.add_parser("serve", help=argparse.SUPPRESS)
    serve.add_argument("--digest", required=True)
    serve.add_argument("--idle", type=float, required=True)
    serve.add_argument("--ready-fd", type=int, required=True)
    serve.add_argument("--about", required=True)
    args = parser.parse_args(argv)
    try:
        folder = warm_dir(create=args.command == "serve")
    except WarmError as error:
        if args.command == "serve" or "does not exist" not in str(error):
            print(f"warm workers: {error}", file=sys.stderr)
            return 1
        print("no warm worker")
        return 0
    if args.command == "serve":
        logging.basicConfig(level=logging.INFO, stream=sys.__stderr__,
                            format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
        return Worker(folder, args.digest, args.idle, json.loads(args.about)).main(args.ready_fd)
    if args.command == "status":
        print("\n".join(status_lines(folder)) or "no warm worker")
        return 0
    return 1 if stop_all(folder) else 0


def _main() -> int:
    # run through the package module, so that runner.job's hook sees IN_WORKER of runner.warm
    from runner import warm

    return warm.warm_main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(_main())
