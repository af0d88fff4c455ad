"""The warm worker: a detached process of this user (`python -m runner.execution.warm.worker
serve`) that keeps the loaded pipeline and computes one command's job at a time, here, with
runner.execution.job.compute; and `python -m runner warm status|stop`. docs/warm.md.
"""
from __future__ import annotations

import _thread
import argparse
import contextlib
import io
import json
import logging
import os
import pickle
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator, Optional

from ...build import loras
from ...build import pipeline as build
from ...owner import process_start
from ...tracking.provenance import stat_key
from .. import job
from .client import killed
from .folder import (
    HEARTBEAT_S,
    WarmError,
    check_private,
    describe,
    duration,
    path_of,
    record_in_folder,
    remove,
    status_lines,
    stop_all,
    take_lock,
    warm_dir,
    write_private,
)
from .protocol import Channel, peer, send_timeout

logger = logging.getLogger("runner")

ACCEPT_POLL_S = 1.0  # the idle worker's accept() waits at most this long at a time
REQUEST_TIMEOUT_S = 30.0  # a connected client sends its request at once


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
    """What tells that files changed without reading them (runner.tracking.provenance.stat_key: the
    change time included, which `cp -p` or `touch -r` cannot set back)."""
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
    """`python -m runner.execution.warm.worker serve`: one request at a time, until idle for keep_warm."""

    def __init__(self, folder: Path, digest: str, idle_s: float, about: dict[str, Any]) -> None:
        self.folder, self.digest, self.idle_s, self.about = folder, digest, idle_s, about
        self.wid = digest[:16]
        self.jobs = 0
        self.started = time.time()
        self.in_request = self.in_job = self.stopping = False
        self.base_files: Optional[tuple] = None  # the loaded checkpoint's files when it loaded
        self.lora_files: dict[str, tuple] = {}  # LoRA key -> its files when it was applied

    def path(self, ext: str) -> Path:
        return path_of(self.folder, self.wid, ext)

    def info(self) -> dict[str, Any]:
        return {"wid": self.wid, "digest": self.digest, "pid": os.getpid(), "start": process_start(os.getpid()),
                "about": self.about, "keep_warm_s": self.idle_s, "jobs": self.jobs, "loads": build.LOAD_COUNT,
                "loaded": build.current() is not None, "started": self.started, "last_used": time.time()}

    def main(self, ready_fd: int) -> int:
        check_private(self.folder)
        lock_fd = take_lock(self.path("lock"))
        if lock_fd is None:
            logger.error("another warm worker of this identity holds %s: exiting", self.path("lock"))
            return 3
        listener = None
        try:
            import torch  # noqa: F401 - the import is paid before the first command waits on it

            write_private(self.path("beat"), "")
            threading.Thread(target=self.heartbeat, name="heartbeat", daemon=True).start()
            listener = self.listen()
            write_private(self.path("json"), json.dumps(self.info(), indent=1))
            signal.signal(signal.SIGTERM, self.on_sigterm)
            signal.signal(signal.SIGINT, self.on_sigint)
            os.write(ready_fd, b"ready\n")
            os.close(ready_fd)
            logger.info("warm worker %s for %s: listening on %s", self.wid, describe(self.about), self.path("sock"))
            self.loop(listener)
        finally:
            remove(self.folder, self.wid, "sock")  # first: a new command starts a new worker
            if listener is not None:
                listener.close()  # a connection still queued sees EOF and tries again
            remove(self.folder, self.wid, "json", "beat")
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
        remove(self.folder, self.wid, "sock")  # a killed worker's (this one holds the lock)
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
            send_timeout(conn)
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
        write_private(self.path("json"), json.dumps(self.info(), indent=1))
        channel.send("record", record)

    def compute(self, channel: Channel, plan: Any) -> Any:
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


def _interrupted(plan: Any) -> Any:
    loras.forget_lora_state(build.current())
    return record_in_folder(plan) or killed(plan)


def warm_main(argv: list[str]) -> int:
    """`python -m runner warm status|stop`; `serve` starts a worker (what a command runs, detached)."""
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


if __name__ == "__main__":
    sys.exit(warm_main(sys.argv[1:]))
