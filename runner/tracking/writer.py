"""Recording jobs and sweeps in MLflow: while a run or sweep goes on, the only code that talks
to MLflow.

A `Recorder` starts one background process, the MLflow writer: one thread there owns the
MlflowClient (MLflow's fluent API is not thread-safe; one writer also keeps each run's writes
in order). A process, not a thread of the job loop: MLflow's SQLAlchemy and HTTP code is
Python-heavy, and a writer thread holding the GIL made the tiny model's inference 4x slower
(each of its many small torch ops waits for the GIL; bench/sweep_overhead.py). The job loop
hands it plain data and goes on with the next image:

    recorder.start_sweep(sweep)      # the parent run
    recorder.job_started(plan)       # the job's RUNNING run, with the owner tags
    recorder.job_done(record)        # config.yaml, image, inputs, then params, metrics, tags; ended
    recorder.finish_sweep(sweep, files)   # jobs.csv, grid(s), report.html
    recorder.close(status)           # waits for every write; ends what is still open

`job_done` ends a run only after its records are written, `drain` and `close` return only
when the writer has done everything asked before, so nothing is lost by going on early. A
job's run is created when the job starts, tagged with runner.owner (host, pid, process start
of the driver): a run left RUNNING by a process that died is recognised and ended KILLED by
`cleanup` or a sweep with resume=true. The writer ignores Ctrl-C (the driver decides) and
ends with the driver: told to, or on noticing that its parent is gone.

Importing MLflow and opening a SQLite store take ~5 s on a 2-core machine, so the writer starts
while the config is checked (`prestart_writer`: it imports MLflow while this process imports
torch) and opens the store while the run loads its weights. A deleted experiment of a SQLite
store is read beforehand with sqlite3 and refuses the run at once; any other store is waited
for, so that its deleted experiment too is refused before anything happens.

The first request that cannot reach the store (a dead or hung server, within
tracking.request_timeout_s x request_retries) marks it dead: nothing more is sent, no job waits
for it, and each job's record stays in its job.json with `tracked: false`; the log and jobs.csv
name those jobs, and `python -m runner sync DIR` logs them later. The same functions
(`log_job`, `log_sweep_end`) serve `sync`.
"""
from __future__ import annotations

import logging
import multiprocessing
import os
import queue
import signal
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, Iterable, Optional

from .. import failpoints
from ..errors import EXIT_REFUSED, ConfigError, Stop, first_line
from ..owner import owner_tags
from ..records import KILLED, JobRecord, SweepRecord
from .runs import checked_run, end_dead_runs, log_job, log_sweep_end, plain_run, start_sweep_run
from .store import Tracker, check_sqlite_experiment, is_unreachable, store_problem, store_uri

if TYPE_CHECKING:  # the writer process imports no torch
    from ..config.schema import TrackingSpec

logger = logging.getLogger("runner")

# ------------------------------------------------------- the writer process


class _Writer:
    """Runs in the writer process: every MLflow call of a run or sweep."""

    def __init__(self, outbox: Any, hurry: Any) -> None:
        self.outbox, self.hurry = outbox, hurry
        self.tracking: dict = {}
        self.experiment, self.owner = "", {}
        self.tracker: Optional[Tracker] = None
        self.dead: Optional[str] = None
        self.parent_id: Optional[str] = None
        self.runs: dict[str, str] = {}  # record_id -> the run started for it
        self.inputs: set[str] = set()
        self.failures = 0

    def log(self, level: int, text: str) -> None:
        self.outbox.put(("log", level, text))

    def connect(self, tracking: dict, experiment: str, owner: dict) -> dict:
        self.tracking, self.experiment, self.owner = tracking, experiment, owner
        failpoints.hold("writer_connect")

        try:
            self.tracker = Tracker(SimpleNamespace(**self.tracking), self.experiment)
        except ConfigError as error:
            return {"error": error}
        except Exception as error:  # noqa: BLE001 - an unreachable store: run untracked
            self._dead(error, "connect")
        return {"dead": self.dead}

    def _dead(self, error: BaseException, what: str) -> None:
        self.dead = f"{what}: {first_line(error, named=True)[:500]}"
        self.outbox.put(("dead", self.dead))
        store = self.tracking.get("uri") or self.tracking["store_dir"]
        problem, fix = store_problem(error, store)
        self.log(logging.ERROR, f"MLflow store {store} {problem} ({self.dead}). Tracking stops here: the images and "
                 f"each job's job.json are kept. Fix: {fix}; then log them with `python -m runner sync <sweep or run "
                 "folder>`")

    def _do(self, what: str, fn: Any, *args: Any) -> bool:
        """One MLflow operation; False (logged) when it failed or the store is dead."""
        if self.dead is not None or self.tracker is None:
            return False
        try:
            fn(*args)
        except Exception as error:  # noqa: BLE001 - tracking never costs an image
            self.failures += 1
            if is_unreachable(error) or self.failures >= 3:
                self._dead(error, what)
            else:
                self.log(logging.WARNING, f"MLflow: could not {what}: {first_line(error, named=True)[:500]}")
            return False
        self.failures = 0
        return True

    def ping(self) -> bool:
        return True

    def start_sweep(self, data: dict) -> None:
        sweep = SweepRecord.from_json(data)

        def start() -> None:
            self.parent_id = start_sweep_run(self.tracker, sweep, self.owner)

        ok = self._do("start the sweep's parent run", start)
        self.outbox.put(("sweep", sweep.sweep_id, self.parent_id, ok))

    def job_started(self, info: dict) -> None:
        def start() -> None:
            tags = {**info["tags"], **self.owner}
            # the job's own start: the writer may get to it late (niced), and a later start than
            # the job's end shows a negative duration in the UI
            self.runs[info["record_id"]] = self.tracker.start_run(info["name"], tags, parent_id=self.parent_id,
                                                                  start_time=info.get("started"))

        self._do(f"start the run of job {info['num']}", start)

    def job_done(self, data: dict) -> None:
        record = JobRecord.from_json(data)
        run_id = self.runs.pop(record.record_id, None)
        complete = [False]

        def log() -> None:
            nonlocal run_id
            if run_id is None:
                run_id = self.tracker.start_run(record.name, {**record.tags, **self.owner}, parent_id=self.parent_id,
                                                start_time=record.started)
            record.run_id = run_id
            if self.hurry.is_set():  # a second Ctrl-C: end it, upload nothing
                self.tracker.end_run(run_id, KILLED, end_time=record.ended, force=True)
                return
            log_job(self.tracker, record, run_id, self.parent_id, (), self.inputs)
            complete[0] = True

        record.tracked = self._do(f"log job {record.num}", log) and complete[0]
        self._rewrite(record)
        self.outbox.put(("job", record.record_id, record.run_id, record.tracked))

    def _rewrite(self, record: JobRecord) -> None:
        """job.json with its run and tracked flag (best effort: a worker's folder may not be here)."""
        path = Path(record.job_dir or "") / "job.json"
        try:
            if record.job_dir and path.is_file():
                record.write(path)
        except OSError as error:
            self.log(logging.WARNING, f"Could not update {path}: {error}")

    def finish_sweep(self, data: dict, files: list[str]) -> None:
        sweep = SweepRecord.from_json(data)
        if self.parent_id is None:
            return
        sweep.parent_run_id = self.parent_id
        if self.hurry.is_set():
            self._do("end the sweep's parent run", self.tracker.end_run, self.parent_id, sweep.status, sweep.ended,
                     True)
            ok = False
        else:
            ok = self._do("log the sweep's grid, report and table", log_sweep_end, self.tracker, sweep,
                          [Path(f) for f in files])
        self.outbox.put(("sweep", sweep.sweep_id, self.parent_id, ok))

    def end_open(self, status: str) -> None:
        if self.tracker is None or self.dead is not None:
            return
        for run_id in list(self.tracker.open_runs):
            self._do(f"end run {run_id}", self.tracker.end_run, run_id, status)

    def finished_runs(self, hashes: list[str], folder: str) -> Optional[dict]:
        found: dict[str, dict] = {}

        def find() -> None:
            for n, h in enumerate(hashes):
                run = self.tracker.find_finished(h)
                if run is not None:
                    found[h] = checked_run(self.tracker, run, Path(folder) / str(n))

        return found if self._do("look up finished runs", find) else None

    def end_dead_runs(self) -> Optional[tuple]:
        out: list = []

        def end() -> None:
            out.extend([plain_run(r) for r in group] for group in end_dead_runs(self.tracker))

        return (self.tracker.experiment_name, self.tracker.uri, *out) if self._do("end runs of dead processes",
                                                                                   end) else None

    def download(self, run_id: str, artifact: str, dst: str) -> Optional[str]:
        box: list = [None]

        def fetch() -> None:
            box[0] = self.tracker.download(run_id, artifact, Path(dst))

        self._do(f"fetch {artifact} of run {run_id}", fetch)
        return str(box[0]) if box[0] else None


def _serve(inbox: Any, outbox: Any, hurry: Any) -> None:
    """The writer process's loop: requests in order (the first one: connect) until told to stop
    or the driver is gone."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: the driver decides
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:  # background work: on a busy CPU the images come first, the writer catches up between them
        os.nice(10)
    except OSError:
        pass
    driver = os.getppid()
    try:  # while the driver imports torch and checks its config: MLflow's import takes seconds
        import mlflow.store.tracking.sqlalchemy_store  # noqa: F401
    except ImportError:  # pragma: no cover - an MLflow without it: the connection says what is missing
        pass
    writer = _Writer(outbox, hurry)
    while True:
        try:
            message = inbox.get(timeout=0.5)
        except queue.Empty:
            if os.getppid() != driver:  # the driver died (kill -9): its open runs stay RUNNING for cleanup
                return
            continue
        if message is None:  # every write is committed: end without the interpreter's teardown (~1.5 s
            outbox.put(("bye",))  # with MLflow loaded), which the driver would wait for
            outbox.close()
            outbox.join_thread()
            os._exit(0)
        seq, op, args = message
        try:
            result = getattr(writer, op)(*args)
        except Exception as error:  # noqa: BLE001 - a bug here must not stop the writer
            writer.log(logging.ERROR, f"MLflow writer: {op} failed: {first_line(error, named=True)[:500]}")
            result = None
        if seq is not None:
            outbox.put(("reply", seq, result))


# ---------------------------------------------------------- the driver's side


_started: list[tuple] = []  # a writer process started ahead (prestart_writer), not yet taken


def _new_writer() -> tuple:
    ctx = multiprocessing.get_context("spawn")  # a clean interpreter: no torch, no inherited locks
    inbox, outbox, hurry = ctx.Queue(), ctx.Queue(), ctx.Event()
    proc = ctx.Process(target=_serve, name="runner-mlflow-writer", daemon=True, args=(inbox, outbox, hurry))
    proc.start()
    return proc, inbox, outbox, hurry


def prestart_writer() -> None:
    """Start a writer process now, so that it imports MLflow (seconds) while this process
    imports torch and checks the config; the next Recorder takes it. Nothing is connected:
    a config refused meanwhile leaves no trace (`discard_prestarted_writer`)."""
    if not _started:
        _started.append(_new_writer())


def _take_writer() -> tuple:
    while _started:
        writer = _started.pop()
        if writer[0].is_alive():
            return writer
    return _new_writer()


def _close_queues(*queues: Any) -> None:
    for q in queues:
        q.close()
        q.join_thread()


def discard_prestarted_writer() -> None:
    """Stop a writer started ahead that no Recorder took (a refused config, an interruption):
    it has connected to nothing and written nothing, so it is killed, not waited for."""
    while _started:
        proc, inbox, outbox, _ = _started.pop()
        proc.kill()
        proc.join()
        _close_queues(inbox, outbox)


class Recorder:
    """MLflow logging for one experiment in one store, done by the writer process."""

    def __init__(self, tracking: TrackingSpec, experiment: str) -> None:
        """Starts the writer. With a SQLite store whose experiment can take runs (read here in
        milliseconds), the writer connects while the run goes on (loading weights); otherwise
        this waits for its connection, so that a deleted experiment refuses the run before
        anything happened. Raises ConfigError for a deleted experiment."""
        self.uri = store_uri(tracking)
        checked = check_sqlite_experiment(self.uri, experiment)
        self.experiment = experiment
        self.dead: Optional[str] = None  # why the store counts as unreachable
        self._jobs: dict[str, JobRecord] = {}  # records waiting for their run id / tracked flag
        self._sweeps: dict[str, SweepRecord] = {}
        self._replies: dict[int, Any] = {}
        self._seq = 0
        self._connecting: Optional[int] = None  # the connection request answered while the run goes on
        self._done = threading.Condition()
        self._gone = False
        self._proc, self._inbox, self._outbox, self._hurry = _take_writer()
        settings = {"uri": tracking.uri, "store_dir": str(Path(tracking.store_dir).resolve()),
                    "artifact_location": tracking.artifact_location, "request_timeout_s": tracking.request_timeout_s,
                    "request_retries": tracking.request_retries}
        self._reader = threading.Thread(target=self._read, name="runner-mlflow-results", daemon=True)
        self._reader.start()
        connect = (settings, experiment, owner_tags())
        if checked:  # the reply comes to _connected
            self._connecting = self._next_seq()
            self._inbox.put((self._connecting, "connect", connect))
            return
        reply = self._request("connect", *connect)
        if reply is not None and reply.get("error") is not None:
            self.close()
            raise reply["error"]
        self._connected(reply)

    def _connected(self, reply: Optional[dict]) -> None:
        if reply is None:
            reply = {"dead": "the MLflow writer process ended"}
        if reply.get("error") is not None:  # deleted meanwhile: like a store that cannot be reached
            self.dead = str(reply["error"])
            logger.error("MLflow: %s. Tracking stops here: the images and each job's job.json are kept; log them "
                         "later with `python -m runner sync <sweep or run folder>`", reply["error"])
        elif reply.get("dead"):
            self.dead = reply["dead"]

    @property
    def hurry(self) -> bool:
        return self._hurry.is_set()

    @hurry.setter
    def hurry(self, value: bool) -> None:
        if value:
            self._hurry.set()

    # ------------------------------------------------------------ results

    def _read(self) -> None:
        """The writer's results, as they come: log lines, run ids, tracked flags, replies."""
        while True:
            try:
                message = self._outbox.get(timeout=0.5)
            except queue.Empty:
                if self._proc.is_alive():
                    continue
                if self._proc.exitcode:  # killed (out of memory?): what it had not logged stays untracked
                    self.dead = f"the MLflow writer process ended (exit code {self._proc.exitcode})"
                    logger.error("%s: the jobs it had not logged are not tracked (python -m runner sync logs them)",
                                 self.dead)
                message = ("bye",)
            kind = message[0]
            if kind == "log":
                logger.log(message[1], "%s", message[2])
            elif kind == "dead":
                self.dead = message[1]
            elif kind == "job" and message[1] in self._jobs:
                record = self._jobs.pop(message[1])
                record.run_id, record.tracked = message[2] or record.run_id, bool(message[3])
            elif kind == "sweep" and message[1] in self._sweeps:
                sweep = self._sweeps[message[1]]
                sweep.parent_run_id, sweep.tracked = message[2], bool(message[3])
            elif kind == "reply" and message[1] == self._connecting:
                self._connected(message[2])
            elif kind in ("reply", "bye"):
                with self._done:
                    if kind == "reply":
                        self._replies[message[1]] = message[2]
                    else:
                        self._gone = True
                    self._done.notify_all()
                if kind == "bye":
                    return

    def _send(self, op: str, *args: Any) -> None:
        if not self._gone:
            self._inbox.put((None, op, args))

    def _next_seq(self) -> int:
        with self._done:
            self._seq += 1
            return self._seq

    def _request(self, op: str, *args: Any) -> Any:
        """Ask the writer and wait for its answer (None when it is gone)."""
        seq = self._next_seq()
        if self._gone:
            return None
        self._inbox.put((seq, op, args))
        with self._done:
            while seq not in self._replies and not self._gone:
                self._done.wait(0.5)
            return self._replies.pop(seq, None)

    # ------------------------------------------------------- the job loop's side

    def start_sweep(self, sweep: SweepRecord) -> None:
        self._sweeps[sweep.sweep_id] = sweep
        self._send("start_sweep", sweep.to_json())

    def job_started(self, plan: Any) -> None:
        """`plan`: a JobPlan (its record_id, num, name, tags())."""
        self._send("job_started", {"record_id": plan.record_id, "num": plan.num, "name": plan.name,
                                   "tags": plan.tags(), "started": time.time()})

    def job_done(self, record: JobRecord) -> None:
        self._jobs[record.record_id] = record
        self._send("job_done", record.to_json())

    def finish_sweep(self, sweep: SweepRecord, files: Iterable[Path]) -> None:
        self._sweeps[sweep.sweep_id] = sweep
        self._send("finish_sweep", sweep.to_json(), [str(f) for f in files])

    def drain(self) -> None:
        """Wait until the writer has done everything asked so far (and its results are in)."""
        self._request("ping")

    def close(self, status: str = KILLED) -> None:
        """Wait for every write, end the runs still open with `status`, stop the writer."""
        if self._proc.is_alive() and not self._gone:
            self._request("end_open", status)
            self._inbox.put(None)
        self._reader.join()
        self._proc.join()
        _close_queues(self._inbox, self._outbox)

    def finished_runs(self, hashes: Iterable[str], folder: Path) -> dict[str, dict]:
        """config hash -> what `checked_run` says of its newest FINISHED run (resume=true), its
        image fetched under `folder`. A store that cannot be reached refuses resume."""
        found = self._request("finished_runs", sorted(set(hashes)), str(folder))
        if found is None:
            raise Stop(f"resume=true needs the MLflow store {self.uri}, which cannot be reached ({self.dead}). "
                       f"Fix: start the tracking server (or fix tracking.uri), or run without resume", EXIT_REFUSED)
        return found

    def end_dead_runs(self) -> Optional[tuple]:
        """(experiment, uri, ended, left, unknown) as plain run dicts (runner.tracking.runs.plain_run)."""
        return self._request("end_dead_runs")

    def download(self, run_id: str, artifact: str, dst: Path) -> Optional[Path]:
        path = self._request("download", run_id, artifact, str(dst))
        return Path(path) if path else None
