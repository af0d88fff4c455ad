"""A job of a command with `keep_warm` run in this user's warm worker: found or started, sent
the JobPlan, its log and record relayed back; never a failed job because of the worker (the job
then runs in the command). docs/warm.md.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
import select
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

from ...config.checks import keep_warm_seconds
from ...files import TEMP_MARK
from ...records import KILLED
from .. import job
from ..state import STATE
from .folder import (
    BUSY_NOTICE_S,
    DIR_ENV,
    HEARTBEAT_S,
    WarmError,
    describe,
    duration,
    flocked,
    frozen_after,
    identity,
    is_alive,
    kill,
    path_of,
    read_info,
    record_in_folder,
    remove,
    silent_for,
    stop_others,
    warm_dir,
)
from .protocol import SEND_TIMEOUT_S, Channel, peer

logger = logging.getLogger("runner")

REPO_ROOT = Path(__file__).resolve().parents[3]  # importable as the worker's `runner` package
START_TIMEOUT_S = 300.0  # the worker's imports (torch), not the load: that happens in the job
CANCEL_WAIT_S = 120.0  # after Ctrl-C: how long to wait for the worker's KILLED record
_UNIX_PATH_MAX = 107


class _Closed(Exception):
    """The worker closed the connection before taking the job (it was exiting)."""


class _Frozen(Exception):
    """The worker sent no heartbeat for `frozen_after()` seconds (stopped, hung)."""


def compute(plan: Any) -> Optional[Any]:
    """The job of `plan` in the warm worker: its JobRecord, or None when it is to run in this
    process (no worker for keep_warm=0, or the worker could not be used: a warning says why)."""
    try:
        return _Client(plan, keep_warm_seconds(plan.spec.keep_warm)).run()
    except WarmError as error:
        logger.warning("Warm worker not used: %s. The job runs in this process (it loads the weights).", error)
    except Exception as error:  # noqa: BLE001 - never a failed job because of the worker
        logger.warning("Warm worker not used (%s: %s). The job runs in this process (it loads the weights).",
                       type(error).__name__, error)
    return None


def killed(plan: Any) -> Any:
    """The record of a job interrupted before the worker took it (as compute's own)."""
    record = job.ended_record(plan, KILLED, "interrupted", "interrupted")
    record.metrics.setdefault("total_s", record.ended - record.started)
    job.save_record(record)
    job.log_outcome(record, plan.label)
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
        return path_of(self.folder, self.wid, ext)

    def run(self) -> Optional[Any]:
        for attempt in range(2):
            try:
                channel, hello = self.open()
            except KeyboardInterrupt:
                return killed(self.plan)
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
        with flocked(self.path("spawn"), START_TIMEOUT_S + 60, "another command starting or reaching this warm worker"):
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
        info = read_info(self.folder, self.wid)
        if is_alive(self.folder, self.wid):
            raise WarmError(f"the warm worker pid {info.get('pid')} holds its lock but refuses connections")
        remove(self.folder, self.wid, "sock", "json", "beat")
        raise WarmError(f"the warm worker of {describe(self.ident.about)} (pid {info.get('pid', '?')}) is gone "
                        f"(killed or crashed; its log: {self.path('log')}); its socket is removed and the next "
                        "command starts a new one")

    def hello(self, channel: Channel) -> dict:
        try:
            try:
                kind, hello = channel.read(timeout=BUSY_NOTICE_S)
            except TimeoutError:
                pid = read_info(self.folder, self.wid).get("pid", "?")
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
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
        read_end, write_end = os.pipe()
        log_fd = os.open(self.path("log"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        argv = [sys.executable, "-m", "runner.execution.warm.worker", "serve", "--digest", self.ident.digest,
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
        info = read_info(self.folder, self.wid)
        pid = info.get("pid", "?")
        if holds_job or self.started_here:
            fate = "stopped it (SIGKILL)" if kill(self.folder, info) else "could not stop it (no such process)"
        else:
            fate = f"left it as it is (`kill -CONT {pid}` resumes a stopped worker, `kill -9 {pid}` ends it)"
        return WarmError(f"the warm worker pid {pid} does not answer ({error}: stopped or hung); this command {fate}")

    def cancel(self, channel: Channel) -> Any:
        """Ctrl-C while the worker computes: it stops the job (KILLED) and stays warm."""
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
        return killed(self.plan)

    def recover(self, error: BaseException, hello: dict) -> Optional[Any]:
        """The worker ended (or failed) during the job: its complete record if it wrote one,
        else a clean job folder and None (the job runs here)."""
        plan, pid = self.plan, hello.get("pid")
        record = record_in_folder(plan)
        if record is not None:
            logger.warning("Warm worker pid %s ended after the job (%s: %s): its job.json is the record", pid,
                           type(error).__name__, error)
            return record
        _clear_job_folder(plan, pid)
        logger.warning("Warm worker pid %s ended during the job (%s: %s; its log: %s). The job runs again in this "
                       "process (it loads the weights).", pid, type(error).__name__, error, self.path("log"))
        return None


def _hurry() -> bool:
    """A second Ctrl-C during the shutdown (runner.execution.state): stop waiting for the worker."""
    return STATE.hurry


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
        for tmp in folder.glob(f".*{TEMP_MARK}{pid}"):
            with contextlib.suppress(OSError):
                tmp.unlink()
