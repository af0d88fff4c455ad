"""A sweep (`python -m runner -m ...`), the same for every launcher of ours (hydra_plugins/
runner_ray_launcher): `launch` claims its folder, checks every job before the first one loads a
weight (`start`), runs them through a pool (here one after another, or on Ray actors) in one
loop (`run`), and writes jobs.csv, the grid(s) and report.html and ends the parent run
(`finish`). docs/architecture.md.
"""
from __future__ import annotations

import hashlib
import json
import logging
import logging.config
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Protocol, Sequence

from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf, open_dict

from .. import failpoints
from ..build import pipeline as build
from ..config.checks import check_keys
from ..config.compose import Composer, composition_error, task_overrides
from ..config.schema import RunSpec, TrackingBackend
from ..errors import EXIT_FAILED, EXIT_REFUSED, ConfigError, Stop, brief_on_console, output_fix
from ..files import atomic_write, claim_folder, release_claim
from ..owner import owner_tags
from ..records import (
    FAILED,
    FINISHED,
    INPUTS_DIR,
    KILLED,
    OVERRIDES_JSON_TAG,
    RECORD_TAG,
    SKIPPED,
    JobRecord,
    SweepRecord,
    input_copy_name,
    split_override,
    status_of,
    write_table,
)
from ..records import swept_keys as record_swept_keys
from ..reporting.axes import not_swept_hint
from ..reporting.html import PendingReport, Pictures
from ..reporting.jobs import ReportError, jobs_from_records
from ..tracking.provenance import provenance_tags
from ..tracking.store import ui_hint
from ..tracking.writer import Recorder
from . import job
from . import run as one
from .job import JobPlan
from .state import STATE, open_recorder, prestart_recorder, shield

logger = logging.getLogger("runner")


@dataclass
class Launch:
    plan: JobPlan
    subdir: str  # hydra.sweep.subdir of this job
    env: dict[str, str]  # hydra.job.env_set


@dataclass
class Sweep:
    record: SweepRecord
    folder: Path
    launches: list[Launch]
    recorder: Optional[Recorder]
    resume: dict[str, Any]  # config hash -> {run_id, metrics} of its FINISHED run (resume=true)
    report: Any  # config.schema.ReportSpec: the grid's axes and thumbnail size
    log_name: str  # each job's log file: <job folder>/<log_name>.log
    logging: Optional[dict]  # hydra.job_logging without its file handler
    log_format: Optional[str]
    records: list[JobRecord] = field(default_factory=list)
    pictures: Optional[Pictures] = None  # the report's pictures, made as the jobs end


def launch(config: DictConfig, loader: Any, jobs: Sequence[Sequence[str]], first_num: int,
           pool: Pool) -> list[JobRecord]:
    """A whole sweep: `jobs` (each job's overrides, as Hydra's sweeper expanded them) checked, run by
    `pool` and finished; their records, in job order. A Stop or Ctrl-C leaves the end to
    runner.app.abort."""
    sweep = start(config, loader, jobs, first_num)
    run(sweep, pool)
    records = list(sweep.records)
    finish()
    return records


def override_key(override: str) -> str:
    return split_override(override)[0]


def sweep_keys(overrides: list[str]) -> list[str]:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
        return [o.key_or_group for o in parsed if o.is_sweep_override()]
    except Exception:  # noqa: BLE001 - a naming nicety only
        return [override_key(o) for o in overrides if "," in o.partition("=")[2]]


def label(overrides: list[str], swept: list[str], num: int) -> str:
    """A job's name: its values of the swept keys (`seed=1 lora.alpha=0.5`)."""
    mine = [o for o in overrides if override_key(o) in swept]
    return " ".join(mine) or f"job {num}"


# ------------------------------------------------------------------------- start


def _refuse(problem: ConfigError) -> Stop:
    return Stop(str(problem), EXIT_REFUSED)


def start(config: DictConfig, loader: Any, jobs: Sequence[Sequence[str]], first_num: int = 0) -> Sweep:
    """Claim the folder, check every job, open the parent run. A refused sweep leaves no folder
    and no MLflow run (Stop, exit 2)."""
    overrides = task_overrides(config)
    plain = config.copy()
    with open_dict(plain):
        plain.pop("hydra", None)
    try:
        check_keys(plain, RunSpec)  # a misspelt `+key` fails the sweep before any job
    except ConfigError as error:
        raise _refuse(error) from None
    swept = sweep_keys(overrides)
    for key in swept:
        if key == "experiment" or key.startswith("tracking"):  # one parent run holds the jobs
            raise _refuse(ConfigError(key, "cannot be swept: every job of a sweep logs under the sweep's parent "
                                      "run", f"run one sweep per value of {key}"))
    folder = Path(str(config.hydra.sweep.dir))  # unique_dir claims a new folder
    claim = None
    try:
        claim = claim_folder(folder, "hydra.sweep.dir")  # before anything is written into it
        prestart_recorder(config)
        launches = precheck(config, loader, jobs, first_num, swept)
        return _start(config, overrides, swept, folder, launches)
    except BaseException:
        if claim is not None:
            claim.release()
        release_claim(folder)  # a refused sweep leaves no folder
        raise


def precheck(config: DictConfig, loader: Any, jobs: Sequence[Sequence[str]], first_num: int,
             swept: list[str]) -> list[Launch]:
    """Compose (with Hydra's config `loader`) and check every job of the sweep before the first one
    loads weights: a Stop naming the job and the key (exit 2) for the first that cannot run."""
    launches = []
    began = time.perf_counter()
    compose = Composer(config, loader)
    for num, overrides in enumerate((list(o) for o in jobs), start=first_num):
        name = label(overrides, swept, num)
        try:
            cfg = compose(overrides)
            with open_dict(cfg):
                cfg.hydra.job.num = num
                cfg.hydra.job.id = num
                env = {str(k): str(v) for k, v in (cfg.hydra.job.get("env_set") or {}).items()}
                subdir = str(OmegaConf.select(cfg, "hydra.sweep.subdir"))
                cfg.pop("hydra")  # the job's own copy: what follows reads the job's keys only
            plan = job.prepare(cfg, num, overrides, label=name, in_sweep=True)
        except ConfigError as error:
            raise Stop(f"job {num} [{name}]: {error}", EXIT_REFUSED) from None
        except HydraException as error:
            raise Stop(f"job {num} [{name}]: {composition_error(error, overrides)}", EXIT_REFUSED) from None
        launches.append(Launch(plan, subdir, env))
    logger.info("Checked the configs of the %d jobs in %.2f s (no weights read)", len(jobs),
                time.perf_counter() - began)
    return launches


def _start(config: DictConfig, overrides: list[str], swept: list[str], folder: Path, launches: list[Launch]) -> Sweep:
    spec = launches[0].plan.spec
    check_report_axes(spec.report, swept)
    recorder = open_recorder(spec)
    resume = one.find_resumable(spec, recorder, [la.plan for la in launches])
    folder = folder.resolve()
    record = _sweep_record(config, overrides, swept, folder, spec, len(launches))
    try:
        folder.mkdir(parents=True, exist_ok=True)
        record.write(folder / "sweep.json")
        OmegaConf.save(config, folder / "multirun.yaml")  # Hydra's record of the sweep's command line
    except OSError as error:
        raise Stop(f"cannot write into {folder}: {error.strerror or error}. "
                   f"Fix: {output_fix(folder, error.errno, resume=False)}", EXIT_FAILED) from None
    for each in launches:
        each.plan.sweep_id = record.sweep_id
    if recorder is not None and all("image" in resume.get(la.plan.config_hash, {}) for la in launches):
        logger.info("Sweep %s: every job already has a FINISHED run (resume=true): no new MLflow run", folder)
    elif recorder is not None:
        recorder.start_sweep(record)
        logger.info("Sweep %s: MLflow experiment %r in %s", folder, spec.experiment, recorder.uri)
    log_config, log_format = _job_logging(config)
    STATE.sweep = Sweep(record, folder, launches, recorder, resume, spec.report,
                        str(config.hydra.job.name), log_config, log_format,
                        pictures=Pictures(len(launches), thumb=spec.report.thumb))
    return STATE.sweep


def sweep_name(overrides: list[str], folder: Path, keys: Optional[Sequence[str]] = None) -> str:
    """The parent run's name: the sweep folder's time (unique; the date is the run's start) first,
    so a narrow column still tells sweeps apart, then the swept overrides:
    `sweep 14-03-22 lora.alpha=0,0.5,1 seed=0,1`. `keys`: the swept keys (sweep_keys), when known."""
    keys = set(sweep_keys(overrides) if keys is None else keys)
    swept = " ".join(o for o in overrides if override_key(o) in keys)
    if len(swept) > 60:
        swept = swept[:59] + "…"
    return " ".join(p for p in ("sweep", folder.name, swept) if p)


def check_report_axes(report: Any, swept: list[str]) -> None:
    """report.x/y/z name keys this sweep sweeps (or none): refused before any job otherwise."""
    for axis in ("x", "y", "z"):
        key = getattr(report, axis)
        if key not in (None, "none") and key not in swept:
            raise _refuse(ConfigError(f"report.{axis}", f"{key!r} is not swept by this sweep",
                                      not_swept_hint(key, swept) + " (or none)"))


def _sweep_record(config: DictConfig, overrides: list[str], swept: list[str], folder: Path, spec: RunSpec,
                  jobs: int) -> SweepRecord:
    tags = {"runner.kind": "sweep", "runner.sweep_dir": str(folder), "runner.overrides": " ".join(overrides),
            OVERRIDES_JSON_TAG: json.dumps(overrides)}  # the list itself: a value may hold ` key=value`
    tags.update({k: v for k, v in provenance_tags("cpu").items() if not k.startswith("device.")})
    record = SweepRecord(sweep_dir=str(folder), overrides=overrides, experiment=spec.experiment,
                         tracking=job.tracking_of(spec), jobs=jobs, started=time.time(), owner=owner_tags(),
                         params={override_key(o): o.partition("=")[2] for o in overrides},
                         name=config.get("run_name") or sweep_name(overrides, folder, swept))
    record.tags = tags | {RECORD_TAG: record.sweep_id}
    record.tracked = None if spec.tracking.backend is TrackingBackend.none else False
    return record


# --------------------------------------------------------------------------- run


@dataclass
class Task:
    """A job waiting for, or running in, a pool."""

    launch: Launch
    job_dir: Path
    key: str  # runner.build.pipeline.cache_key: the weights it needs
    attempts: int = 0


class Pool(Protocol):
    """Where a sweep's jobs are computed (LocalPool; ray/pool.py's RayPool)."""

    where: str  # for the log: `Launching 6 jobs <where>`
    parallel: bool  # jobs run side by side (the progress line counts the jobs done)

    def start(self, sweep: Sweep) -> None: ...
    def busy(self) -> bool: ...
    def take(self, pending: list[Task], started: Callable[[Task], None]) -> None: ...
    def results(self, pending: list[Task]) -> list[tuple[Task, JobRecord]]: ...
    def abandon(self) -> list[JobRecord]: ...
    def close(self) -> None: ...


def run(sweep: Sweep, pool: Pool) -> None:
    """The jobs of the sweep through `pool`, the same loop for every pool: each job's folder and
    log file, its skip (resume=true), its MLflow run started and ended, its outcome. A failed job
    is recorded and the sweep goes on; Ctrl-C ends the jobs in progress KILLED
    (KeyboardInterrupt); a job that cannot write into its folder stops the sweep (Stop): no
    later one could. The records end in job order."""
    if sweep.logging is not None:
        logging.config.dictConfig(sweep.logging)
    brief_on_console()  # a job's known user error: one line here, its traceback in the job's log
    pending = _tasks(sweep)
    if not pending:
        return
    pace = Pace(len(pending), parallel=pool.parallel)
    try:
        pool.start(sweep)
        logger.info("Launching %d jobs %s", len(pending), pool.where)
        while pending or pool.busy():
            pool.take(pending, lambda task: _started(sweep, task, pace))
            for _, record in pool.results(pending):
                pace.finished.append(time.perf_counter())
                _done(sweep, record)
    except BaseException:
        for record in pool.abandon():  # the jobs in flight, KILLED
            _recorded(sweep, record)
        raise
    finally:
        pool.close()
        sweep.records.sort(key=lambda r: r.num)


class LocalPool:
    """hydra/launcher=local: the jobs one after another in this process (or each in this user's
    warm worker, with keep_warm); the weights load once per (model, vram, dtype, device)."""

    where, parallel = "locally", False

    def __init__(self) -> None:
        self.sweep: Optional[Sweep] = None
        self.task: Optional[Task] = None

    def start(self, sweep: Sweep) -> None:
        self.sweep = sweep

    def busy(self) -> bool:
        return self.task is not None

    def take(self, pending: list[Task], started: Callable[[Task], None]) -> None:
        """The next job, when none is in progress: `started(task)` says it begins."""
        if self.task is None and pending:
            self.task = pending.pop(0)
            started(self.task)

    def results(self, pending: list[Task]) -> list[tuple[Task, JobRecord]]:
        task, self.task = self.task, None
        if task is None or self.sweep is None:
            return []
        with job_log(self.sweep, task.job_dir), job.environment(task.launch.env):
            return [(task, one.compute(task.launch.plan))]

    def abandon(self) -> list[JobRecord]:
        return []  # the job in progress ended KILLED by itself (job.compute)

    def close(self) -> None:
        self.sweep = None


def _tasks(sweep: Sweep) -> list[Task]:
    """The jobs to compute; those resume=true skips are recorded here (in their folders)."""
    pending = []
    for each in sweep.launches:
        plan = each.plan
        job_dir = (sweep.folder / each.subdir).resolve()
        plan.job_dir = str(job_dir)
        previous = one.resumed(plan, sweep.resume)
        if previous is None:
            pending.append(Task(each, job_dir, build.cache_key(plan.spec, plan.runtime)))
            continue
        job_folder(sweep, job_dir)
        with job_log(sweep, job_dir):
            _done(sweep, one.skip(plan, previous))
    return pending


def _started(sweep: Sweep, task: Task, pace: Pace) -> None:
    plan = task.launch.plan
    job_folder(sweep, task.job_dir)
    logger.info("job %d (%s): %s", plan.num, pace.launch(), plan.label)
    if sweep.recorder is not None:
        sweep.recorder.job_started(plan)


def _recorded(sweep: Sweep, record: JobRecord) -> None:
    if sweep.recorder is not None and record.status != SKIPPED:  # a skipped job's run exists already
        sweep.recorder.job_done(record)
    sweep.records.append(record)
    if sweep.pictures is not None and record.status in (FINISHED, SKIPPED):  # while the next job runs
        sweep.pictures.add(record.num, record.image_path)


def _done(sweep: Sweep, record: JobRecord) -> None:
    _recorded(sweep, record)
    one.after(record)


@dataclass
class Pace:
    """`job 5 (6/16, ETA 0:01:10)`: the jobs launched (and with a parallel pool, done), and the
    time left at the pace since the first job ended (that one also loaded the weights); before
    that, with one job at a time, at the first job's own pace."""

    total: int
    parallel: bool = True
    launched: int = 0
    began: float = field(default_factory=time.perf_counter)
    finished: list[float] = field(default_factory=list)  # perf_counter() of each job's end

    def launch(self) -> str:
        self.launched += 1
        text = f"{self.launched}/{self.total}" + (f", {len(self.finished)} done" if self.parallel else "")
        done = len(self.finished)
        if done >= 2:
            per_job = (self.finished[-1] - self.finished[0]) / (done - 1)
        elif done == 1 and not self.parallel:
            per_job = self.finished[0] - self.began
        else:
            return text
        return f"{text}, ETA {clock(per_job * (self.total - done))}"


def clock(seconds: float) -> str:
    """`1:02:03` for 3723 seconds."""
    left = round(seconds)
    return f"{left // 3600}:{left // 60 % 60:02d}:{left % 60:02d}"


def _job_logging(config: DictConfig) -> tuple[Optional[dict], Optional[str]]:
    """hydra.job_logging for the whole sweep, its file handler taken out (one per job folder)."""
    node = config.hydra.get("job_logging")
    if node is None:
        return None, None
    conf = OmegaConf.to_container(node, resolve=False)
    if not conf.get("root"):
        return None, None
    files = [name for name, h in (conf.get("handlers") or {}).items() if "filename" in h]
    log_format = None
    for name in files:
        handler = conf["handlers"].pop(name)
        log_format = ((conf.get("formatters") or {}).get(handler.get("formatter"), {}) or {}).get("format")
    conf["root"]["handlers"] = [h for h in conf["root"].get("handlers", []) if h not in files]
    return conf, log_format


@contextmanager
def job_log(sweep: Sweep, job_dir: Path) -> Iterator[None]:
    """`<job folder>/<name>.log` for the duration of the job."""
    handler = logging.FileHandler(Path(job_dir) / f"{sweep.log_name}.log")
    handler.setFormatter(logging.Formatter(sweep.log_format or "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)
        handler.close()


def job_folder(sweep: Sweep, job_dir: Path) -> Path:
    """The job's folder made (Stop naming it and the fix when it cannot be)."""
    try:
        Path(job_dir).mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise Stop(f"cannot create {job_dir}: {error.strerror or error}. "
                   f"Fix: {output_fix(sweep.folder, error.errno)}", EXIT_FAILED) from None
    return Path(job_dir)


# ------------------------------------------------------------------------ finish


def finish(status: Optional[str] = None) -> None:
    """Job table, grid(s) and report.html into the sweep folder and onto the parent run, then end the
    parent: KILLED when interrupted, FAILED when a job failed or a file could not be
    written, else FINISHED. A Ctrl-C meanwhile does not cut it (state.shield)."""
    sweep = STATE.sweep
    if sweep is None:
        return
    shield()
    failpoints.hold("sweep_end")
    recorder, records = sweep.recorder, sweep.records
    report = _start_report(sweep)  # the grid while MLflow still records the last job
    if recorder is not None:
        recorder.drain()  # every job's run logged: its run and tracked flag are known
    status = status or status_of(records)
    _keep_inputs(records, sweep.folder)
    files, complete = _sweep_files(sweep, report)
    if not complete and status == FINISHED:
        status = FAILED
    counts = {s: sum(r.status == s for r in records) for s in (FINISHED, FAILED, KILLED, SKIPPED)}
    record = sweep.record
    record.status, record.ended = status, time.time()
    record.metrics = {f"jobs_{s.lower()}": float(n) for s, n in counts.items()} | {"jobs": float(len(records))}
    record.tags["runner.swept_keys"] = " ".join(record_swept_keys(records))
    if recorder is not None:
        recorder.finish_sweep(record, files)
        recorder.drain()
    try:
        record.write(sweep.folder / "sweep.json")
    except OSError:
        STATE.problems.append("sweep.json")
    STATE.sweep = None
    _report_untracked(records, sweep.folder)
    logger.info("Sweep %s: %s (%s)", status, sweep.folder,
                ", ".join(f"{n} {s.lower()}" for s, n in counts.items() if n) or "no job ran")
    if recorder is not None and record.parent_run_id:
        logger.info("MLflow: parent run %r (%s), one child per job, in %s. Compare them: %s", record.name,
                    record.parent_run_id, recorder.uri, ui_hint(recorder.uri))


def _start_report(sweep: Sweep) -> Any:
    """The report's grid(s) written (a reporting.html.PendingReport), or the error that stopped them."""
    if not sweep.records:
        return None
    jobs = jobs_from_records(sweep.records, sweep.record.overrides, sweep.record.name)
    report = sweep.report
    images = sweep.pictures.made() if sweep.pictures is not None else None
    try:
        return PendingReport(jobs, sweep.folder, x=report.x, y=report.y, z=report.z, thumb=report.thumb,
                             images=images)
    except Exception as error:  # noqa: BLE001 - the parent run must still be ended
        return error


def _sweep_files(sweep: Sweep, report: Any) -> tuple[list[Path], bool]:
    """jobs.csv, the grid(s) and report.html: those written, and whether all were (what could
    not be is logged and listed in STATE.problems)."""
    if not sweep.records:
        return [], True
    written: list[Path] = []
    complete = True
    for name, write in (("jobs.csv", lambda p: [write_table(sweep.records, p)]),
                        ("report.html", lambda p: _finish_report(sweep, report))):
        path = sweep.folder / name
        try:
            written += write(path)
        except Exception as error:  # noqa: BLE001 - the parent run must still be ended
            if not STATE.stopping:  # else the stop's own line names these files
                logger.error("Sweep: cannot write %s: %s. Fix: %s", path, getattr(error, "strerror", None) or error,
                             _report_fix(error, sweep.folder))
            STATE.problems.append("grid and report.html" if name == "report.html" else name)
            complete = False
    return written, complete


def _keep_inputs(records: Sequence[JobRecord], folder: Path) -> None:
    """One copy of each picture the jobs read (a control picture, a mask, an edit picture) in the
    sweep folder's inputs/, named by its sha256, for the report to show beside the results (the
    parent run holds them too). A picture changed since its job read it is not copied."""
    done: set[str] = set()
    for item in (item for record in records for item in record.inputs):
        sha, source = item["sha256"], item.get("path")
        target = folder / INPUTS_DIR / input_copy_name(sha, source or "")
        if sha in done or not source or target.is_file():
            continue
        done.add(sha)
        try:
            data = Path(source).read_bytes()
            if hashlib.sha256(data).hexdigest() != sha:
                logger.warning("Sweep: %s changed since a job read it: no copy in %s", source, target.parent)
                continue
            target.parent.mkdir(exist_ok=True)
            atomic_write(target, lambda tmp, data=data: tmp.write_bytes(data))
        except OSError as error:
            logger.warning("Sweep: cannot keep a copy of %s in %s: %s", source, target.parent,
                           error.strerror or error)


def _finish_report(sweep: Sweep, report: Any) -> list[Path]:
    if isinstance(report, BaseException):
        raise report
    files = report.finish(jobs_from_records(sweep.records, sweep.record.overrides, sweep.record.name))
    logger.info("Sweep report: %s (grid: %s)", files.html, ", ".join(p.name for p in files.grids))
    return files.all


def _report_fix(error: BaseException, folder: Path) -> str:
    if isinstance(error, ReportError):
        return f"rebuild it with other axes: python -m runner report {folder} x=KEY y=KEY"
    return output_fix(folder, getattr(error, "errno", None))


def _report_untracked(records: list[JobRecord], folder: Path) -> None:
    missing = [r for r in records if r.tracked is False]
    if missing:
        STATE.untracked.extend(missing)
        logger.error("%d job(s) not tracked in MLflow (their images and job.json are in place): %s. "
                     "Log them with `python -m runner sync %s`", len(missing),
                     ", ".join(str(r.num) for r in missing), folder)
