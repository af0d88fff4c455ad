"""Sweeps on Ray (`hydra/launcher=ray`): the checked jobs of runner.execution.sweep computed by a
pool of long-lived Ray actors (worker.py), while this process stays the only writer of MLflow and
of the sweep folder. Routing, files, placement and faults: docs/ray.md. Nothing here imports Ray
before a pool starts: the default sweep needs no Ray.
"""
from __future__ import annotations

import logging
import os
import signal
import socket
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from ...errors import EXIT_FAILED, OutputError, Stop, first_line
from ...files import exclusive_write
from ...records import FAILED, KILLED, JobRecord
from .. import job
from ..sweep import Sweep, Task, job_log
from .settings import RaySettings
from .worker import Worker

logger = logging.getLogger("runner")

# what a job's files and numerics depend on besides its config: sent along to the workers
FORWARDED_ENV = ("DIFFSYNTH_", "MODELSCOPE_", "HF_", "HUGGINGFACE_", "TRANSFORMERS_", "RUNNER_HOLD")
WAIT_S = 0.5  # the longest one wait for results blocks: a Ctrl-C is handled in between
WAITING_LOG_S = 30.0  # how often a pool with no worker started says it is waiting
PROBE_TIMEOUT_S = 10.0  # a cluster's address that does not answer a TCP connection within this is refused
_FIX_CLUSTER = ("start the cluster first (`ray start --head --port=6379` on its head), check "
                "hydra.launcher.address, or leave it null to start a Ray runtime on this machine")


@dataclass
class Member:
    actor: Any
    starting: Any = None  # its `ready` call until the worker has started: no job is sent before
    name: str = ""  # host:pid, once started
    since: float = field(default_factory=time.monotonic)  # when it was asked for
    key: Optional[str] = None  # the weights it holds, or loads for its job in flight
    task: Optional[Task] = None
    ref: Any = None  # the result of that job


class WorkerLost(Exception):
    """The worker running a job is gone (killed, out of memory, its node lost)."""


def pick(member: Member, pending: list[Task], members: list[Member]) -> int:
    """The waiting job `member` takes: one whose weights it holds, else one whose weights no
    other worker holds (it loads them), else the first."""
    for i, task in enumerate(pending):
        if task.key == member.key:
            return i
    held = {m.key for m in members if m is not member}
    return next((i for i, task in enumerate(pending) if task.key not in held), 0)


class Workers:
    """The actors: asked for, started, sent jobs, replaced when one dies, killed at the end."""

    def __init__(self, settings: RaySettings) -> None:
        self.settings = settings
        self.members: list[Member] = []
        self.ray: Any = None
        self.options: dict[str, Any] = {}
        self.threads, self.gpus = 1, 0.0
        self.running = False  # the sweep has begun: a worker starting now joins it
        self.said_slow = False

    def start(self) -> None:
        """Ask for the workers; return once one has started (Stop if none does within
        start_timeout_s, or none can start at all)."""
        self.ray = _connect(self.settings)
        workers, self.gpus, self.threads = _sizes(self.settings, self.ray.cluster_resources())
        env = {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENV)}
        env.update(OMP_NUM_THREADS=str(self.threads), MKL_NUM_THREADS=str(self.threads))
        self.options = {"num_cpus": self.threads, "num_gpus": self.gpus, "max_restarts": 0,
                        "runtime_env": {"env_vars": env}}
        self.remote = self.ray.remote(Worker)
        self.members = [self._member() for _ in range(workers)]
        said = time.monotonic()
        while not self._started():
            self._note_starts(self._wait([m.starting for m in self.members]))
            self._check_placement()
            if time.monotonic() - said >= WAITING_LOG_S:
                said = time.monotonic()
                logger.info("Ray: waiting for the workers to start (%s)", self._needs())
        names = [m.name for m in self._started()]
        logger.info("Ray: %d of %d workers started (%d threads, %g GPUs each): %s", len(names), workers,
                    self.threads, self.gpus, ", ".join(names))
        self.running = True

    def _member(self) -> Member:
        actor = self.remote.options(**self.options).remote(os.getcwd(), self.threads)
        return Member(actor, starting=actor.ready.remote())

    def _started(self) -> list[Member]:
        return [m for m in self.members if m.starting is None]

    def _wait(self, refs: list[Any]) -> set:
        """The refs that are ready, after waiting up to WAIT_S for the first."""
        if not refs:
            return set()
        self.ray.wait(refs, num_returns=1, timeout=WAIT_S)
        return set(self.ray.wait(refs, num_returns=len(refs), timeout=0)[0])

    def _note_starts(self, done: set) -> None:
        """Members whose `ready` returned become workers; one that failed to start is dropped."""
        for member in [m for m in self.members if m.starting is not None and m.starting in done]:
            try:
                member.name = self.ray.get(member.starting)
                member.starting = None
                if self.running:
                    logger.info("Ray: worker %s joined the sweep", member.name)
            except self.ray.exceptions.RayError as error:
                self.members.remove(member)
                logger.warning("Ray: a worker could not start: %s", first_line(error))
                if not self.members:
                    raise Stop(f"the Ray workers could not start: {first_line(error)}. Fix: install this project "
                               'with its ray extra (`pip install -e ".[ray]"`) and the models on every node of the '
                               "cluster", EXIT_FAILED) from None

    def _check_placement(self) -> None:
        """Stop when no worker has started for start_timeout_s; say once when some wait that long
        while others work."""
        waiting = [m for m in self.members if m.starting is not None]
        if not waiting:
            return
        waited = time.monotonic() - min(m.since for m in waiting)
        if waited < self.settings.start_timeout_s:
            return
        if not self._started():
            raise Stop(f"no Ray worker started within {self.settings.start_timeout_s:g} s: {self._needs()}. Fix: "
                       "free those resources (`ray status` shows them), lower hydra.launcher.num_workers, "
                       "threads_per_worker or num_gpus_per_worker, or wait longer with "
                       "hydra.launcher.start_timeout_s", EXIT_FAILED)
        if not self.said_slow:
            self.said_slow = True
            logger.warning("Ray: %d worker(s) not started after %.0f s (%s); the sweep goes on with %d, and they "
                           "join when placed", len(waiting), waited, self._needs(), len(self._started()))

    def _needs(self) -> str:
        free = self.ray.available_resources()
        return (f"each worker needs {self.threads} CPU(s) and {self.gpus:g} GPU(s); free in the cluster: "
                f"{free.get('CPU', 0):g} CPU(s), {free.get('GPU', 0):g} GPU(s)")

    def busy(self) -> bool:
        return any(m.task is not None for m in self.members)

    def dispatch(self, pending: list[Task], started: Callable[[Task], None]) -> None:
        for member in self._started():
            if member.task is None and pending:
                task = pending.pop(pick(member, pending, self.members))
                task.attempts += 1
                if task.attempts == 1:
                    started(task)
                member.task, member.key = task, task.key
                member.ref = member.actor.compute.remote(task.launch.plan, task.launch.env)

    def collect(self) -> list[tuple[Task, Any, Optional[BaseException]]]:
        """The jobs that ended within WAIT_S: (task, what the worker returned, or the error);
        workers that started meanwhile join."""
        done = self._wait([m.ref for m in self.members if m.ref is not None] +
                          [m.starting for m in self.members if m.starting is not None])
        self._note_starts(done)
        ended = []
        for member in [m for m in self.members if m.ref is not None and m.ref in done]:
            task, ref = member.task, member.ref
            member.task = member.ref = None
            try:
                ended.append((task, self.ray.get(ref), None))
            except self.ray.exceptions.RayTaskError as error:  # the worker's method raised; the worker lives
                ended.append((task, None, error))
            except self.ray.exceptions.RayError as error:
                self.kill(member)
                self.members[self.members.index(member)] = self._member()  # a fresh worker in its place
                ended.append((task, None, WorkerLost(first_line(error))))
        self._check_placement()
        return ended

    def in_flight(self) -> list[Task]:
        return [m.task for m in self.members if m.task is not None]

    def kill(self, member: Member) -> None:
        try:
            self.ray.kill(member.actor, no_restart=True)
        except Exception:  # noqa: BLE001 - already gone
            pass

    def close(self) -> None:
        """Kill the workers; stop a runtime started here (a cluster keeps running)."""
        if self.ray is None:
            return
        for member in self.members:
            self.kill(member)
        self.members = []
        self.ray.shutdown()
        self.ray = None


def _connect(settings: RaySettings) -> Any:
    """ray.init: a runtime of this sweep alone (address null), or join a cluster."""
    local = settings.address is None
    if local or _loopback(settings.address):
        # Ray otherwise binds (and rewrites 127.0.0.1 into) the machine's network address: this
        # keeps a runtime of this machine alone on loopback, and lets a driver join one there
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    if local:
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no usage report sent
    import ray

    if not local:
        _probe(settings.address)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    arguments = {"address": "local", "include_dashboard": False} if local else {"address": settings.address}
    try:
        ray.init(**{**arguments, **settings.init})
    except Exception as error:  # noqa: BLE001 - reported in one line with the fix
        what = "start a Ray runtime on this machine" if local else f"join the Ray cluster at {settings.address}"
        fix = "check hydra.launcher.init" if local else _FIX_CLUSTER
        raise Stop(f"cannot {what}: {first_line(error)}. Fix: {fix}", EXIT_FAILED) from None
    finally:  # Ray's SIGTERM handler would exit without ending the MLflow runs: the runner's own stay
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    return ray


def _probe(address: str) -> None:
    """Stop at once when nothing answers at a cluster's HOST:PORT: Ray's own join retries for
    minutes before it gives up. `auto` is Ray's to find (it says at once when there is none)."""
    rest = address.removeprefix("ray://")
    host, colon, port = rest.rpartition(":")
    if not colon and rest != address:  # ray://HOST: Ray Client's default port
        host, port = rest, "10001"
    if not host or not port.isdigit():  # `auto`, or a form Ray reads itself
        return
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=PROBE_TIMEOUT_S):
            pass
    except OSError as error:
        why = error.strerror or str(error) or "no answer"
        raise Stop(f"cannot join the Ray cluster at {address}: nothing answers at {host}:{port} ({why}). "
                   f"Fix: {_FIX_CLUSTER}", EXIT_FAILED) from None


def _loopback(address: str) -> bool:
    host = address.removeprefix("ray://").rpartition(":")[0].strip("[]") or address
    return host == "localhost" or host == "::1" or host.startswith("127.")


def _sizes(settings: RaySettings, resources: dict) -> tuple[int, float, int]:
    """(workers, GPUs per worker, threads per worker), defaults filled in from the cluster."""
    cpus, gpus_total = float(resources.get("CPU", 0)), float(resources.get("GPU", 0))
    gpus = settings.num_gpus_per_worker
    if gpus is None:
        gpus = 1.0 if gpus_total else 0.0
    workers = settings.num_workers or (max(1, int(gpus_total // gpus)) if gpus else 1)
    threads = settings.threads_per_worker or max(1, int(cpus // workers))
    if workers * threads > cpus or workers * gpus > gpus_total:
        raise Stop(f"the Ray cluster has {cpus:g} CPUs and {gpus_total:g} GPUs: {workers} workers of {threads} "
                   f"threads and {gpus:g} GPUs each do not fit. Fix: lower hydra.launcher.num_workers, "
                   "threads_per_worker or num_gpus_per_worker, or add nodes (`ray start --address=HEAD:6379`)",
                   EXIT_FAILED)
    return workers, float(gpus), threads


# ------------------------------------------------------------ the sweep's side


class RayPool:
    """The sweep loop's pool (runner.execution.sweep.Pool) on Ray: the same folders, records,
    MLflow runs and outcomes as the jobs computed in this process."""

    where, parallel = "on Ray", True

    def __init__(self, settings: RaySettings) -> None:
        self.settings = settings
        self.workers = Workers(settings)
        self.sweep: Optional[Sweep] = None

    def start(self, sweep: Sweep) -> None:
        self.sweep = sweep
        self.workers.start()

    def busy(self) -> bool:
        return self.workers.busy()

    def take(self, pending: list[Task], started: Callable[[Task], None]) -> None:
        self.workers.dispatch(pending, started)

    def results(self, pending: list[Task]) -> list[tuple[Task, JobRecord]]:
        ended = []
        for task, result, error in self.workers.collect():
            record = self._outcome(task, result, error, pending)
            if record is not None:
                ended.append((task, record))
        return ended

    def abandon(self) -> list[JobRecord]:
        """Leaving early (Ctrl-C, a Stop): the workers killed, the jobs in flight recorded KILLED."""
        tasks = self.workers.in_flight()
        for member in self.workers.members:
            self.workers.kill(member)
            member.task = member.ref = None
        return [_failed(task, KILLED, "interrupted") for task in tasks]

    def close(self) -> None:
        self.workers.close()

    def _outcome(self, task: Task, result: Any, error: Optional[BaseException],
                 pending: list[Task]) -> Optional[JobRecord]:
        """The record of an ended job, or None when it waits for another try."""
        plan = task.launch.plan
        if isinstance(error, WorkerLost):
            if task.attempts <= self.settings.max_retries:
                logger.warning("job %d [%s]: its Ray worker died (%s); running it again (attempt %d)", plan.num,
                               plan.label, error, task.attempts + 1)
                pending.insert(0, task)
                return None
            return _failed(task, FAILED, f"WorkerDied: its Ray worker died {task.attempts} times, last: {error}. Fix: "
                           "check the workers' memory (out of memory?) and the Ray logs "
                           "(/tmp/ray/session_latest/logs on each node), then run again with resume=true")
        if error is not None:
            return _failed(task, FAILED, f"{type(error).__name__}: the Ray worker failed: {first_line(error)}")
        return _land(self.sweep, task, *result)


def _failed(task: Task, status: str, error: str) -> JobRecord:
    """The record of a job whose worker returned none (died, or interrupted), in its folder."""
    plan = task.launch.plan
    record = job.ended_record(plan, status, error, "interrupted" if status == KILLED else "runtime")
    job.save_record(record)
    logger.error("job %d [%s]: %s%s", plan.num, plan.label, status, f": {error}" if status == FAILED else "")
    return record


def _land(sweep: Sweep, task: Task, record: JobRecord, image: Optional[bytes], logs: list[logging.LogRecord],
          worker_folder: str) -> JobRecord:
    """A worker's result into the job's folder: its log, image.png, job.json."""
    job_dir = task.job_dir
    record.job_dir = record.tags["runner.job_dir"] = str(job_dir)
    record.image_path = None
    if record.error_kind == "output":  # the worker's own disk, not the sweep folder
        record.error_kind = "runtime"
    with job_log(sweep, job_dir):
        for entry in logs:
            entry.msg = str(entry.msg).replace(worker_folder, str(job_dir))
            logging.getLogger(entry.name).handle(entry)
        if image is not None:
            path = job_dir / "image.png"
            try:
                job.write_output(path, lambda: exclusive_write(path, lambda tmp: tmp.write_bytes(image)))
                record.image_path = str(path)
            except OutputError as error:
                record.status, record.error, record.error_kind = FAILED, f"OutputError: {error}", "output"
        job.save_record(record)
    return record
