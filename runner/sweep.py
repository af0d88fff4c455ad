"""A sweep (`python -m runner -m ...`): checked whole, then run by the runner's own loop.

    start(config)   claim the folder, compose and check every job (no weight read: a bad one
                    refuses the sweep, exit 2, naming the job and the key; no MLflow run, no
                    folder left), open the recorder and the parent run, write sweep.json
    run(sweep)      the jobs one after another in this process: job.compute, then the
                    recorder; weights load once per (model, vram, dtype, device)
    finish()        jobs.csv, the X/Y grid(s) and report.html (runner.reporting), the parent run
                    ended with them, sweep.json again

Hydra composes the configs and owns the command line; the launching is ours: Hydra's basic
launcher would compose each job twice more and deep-copy its config twice per job, which cost
more than the tiny model's whole image. `run` is the place a Ray launcher replaces: compute
the plans in workers (runner.job.compute), hand each record to `recorder.job_done` here.
"""
from __future__ import annotations

import json
import logging
import logging.config
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

from omegaconf import DictConfig, OmegaConf, open_dict

from . import failpoints, job
from .config.checks import check_keys
from .config.compose import Composer, composition_error, task_overrides
from .config.schema import RunSpec, TrackingBackend
from .errors import EXIT_FAILED, EXIT_REFUSED, ConfigError, Stop, brief_on_console, output_fix
from .files import claim_folder, release_claim
from .job import JobPlan
from .owner import owner_tags
from .records import (
    FAILED,
    FINISHED,
    KILLED,
    METRICS,
    OVERRIDES_JSON_TAG,
    SKIPPED,
    JobRecord,
    SweepRecord,
    status_of,
    write_table,
)
from .records import swept_keys as record_swept_keys
from .state import STATE, open_recorder, prestart_recorder, shield
from .tracking.provenance import provenance_tags
from .tracking.writer import Recorder

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
    report: Any  # spec.ReportSpec: the grid's axes and thumbnail size
    log_name: str  # each job's log file: <job folder>/<log_name>.log
    logging: Optional[dict]  # hydra.job_logging without its file handler
    log_format: Optional[str]
    records: list[JobRecord] = field(default_factory=list)
    pool: Optional[Any] = None  # hydra/launcher=ray: its settings (runner.ray_pool); None: jobs run here


def override_key(override: str) -> str:
    return override.partition("=")[0].lstrip("+~")


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


def _check_plugins(config: DictConfig) -> Any:
    """The launcher's settings: None for the basic launcher (jobs in this process), those of
    runner.ray_pool for hydra/launcher=ray."""
    from . import ray_pool

    launcher = str(config.hydra.launcher.get("_target_", ""))
    for what, name in (("launcher", "BasicLauncher"), ("sweeper", "BasicSweeper")):
        target = str(config.hydra[what].get("_target_", ""))
        if not target.endswith(name) and target != ray_pool.LAUNCHER:
            raise _refuse(ConfigError(f"hydra/{what}", f"{target} is not supported: the runner launches the jobs "
                                      "of a sweep itself (weights loaded once per process)",
                                      f"leave hydra/{what} at its default"
                                      + (" or use hydra/launcher=ray" if what == "launcher" else "")))
    try:
        return ray_pool.settings_of(config) if launcher == ray_pool.LAUNCHER else None
    except ConfigError as error:
        raise _refuse(error) from None


def _job_overrides(config: DictConfig, overrides: list[str]) -> list[list[str]]:
    """Every job's overrides, in the order Hydra's basic sweeper expands them."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    params = [f"{k}={v}" for k, v in (config.hydra.sweeper.get("params") or {}).items()]
    parsed = OverridesParser.create().parse_overrides(params + overrides)
    return [o for batch in BasicSweeper.split_arguments(parsed, None) for o in batch]


def precheck(config: DictConfig, jobs: list[list[str]], swept: list[str]) -> list[Launch]:
    """Compose and check every job of the sweep before the first one loads weights."""
    from hydra.errors import HydraException

    launches = []
    compose = Composer(config)
    for num, overrides in enumerate(jobs):
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
    logger.info("Checked the configs of the %d jobs (no weights read)", len(jobs))
    return launches


def _resume(spec: RunSpec, recorder: Optional[Recorder], plans: list[JobPlan]) -> dict[str, Any]:
    """resume=true: end the runs of dead processes (and their leftovers), then find the
    configs that have a FINISHED run: config hash -> what recorder.checked_run says of it
    (its image fetched and checked), or {run_id, rerun: why} when the job must run again."""
    if not spec.resume or recorder is None:
        return {}
    import atexit
    import shutil
    import tempfile

    from .tracking.runs import remove_leftovers, report_dead_runs

    found = recorder.end_dead_runs()
    if found is not None:
        report_dead_runs(*found)
        remove_leftovers([], [Path(spec.tracking.store_dir)], found[2])
    images = Path(tempfile.mkdtemp(prefix="runner-resume-"))  # the earlier runs' images, checked
    atexit.register(shutil.rmtree, images, True)
    resume = recorder.finished_runs([plan.config_hash for plan in plans], images)
    for plan in plans:
        previous = resume.get(plan.config_hash)
        if previous is not None and "rerun" not in previous:
            why = job.changed_since(plan, previous["tags"])
            if why is not None:
                resume[plan.config_hash] = {"run_id": previous["run_id"], "rerun": why}
    return resume


def resumed(plan: JobPlan, resume: dict[str, Any]) -> Optional[dict[str, Any]]:
    """The earlier run that resume=true takes for this job, or None (the job runs; when an
    earlier run was found but cannot be taken, the log says why)."""
    previous = resume.get(plan.config_hash)
    if previous is None:
        return None
    if "rerun" in previous:
        logger.info("job %d [%s]: rerun: %s", plan.num, plan.label, previous["rerun"])
        return None
    return previous


def start(config: DictConfig) -> Sweep:
    """`on_multirun_start`: claim the folder, check every job, open the parent run."""
    overrides = task_overrides(config)
    plain = config.copy()
    with open_dict(plain):
        plain.pop("hydra", None)
    try:
        check_keys(plain, RunSpec)  # a misspelt `+key` fails the sweep before any job
    except ConfigError as error:
        raise _refuse(error) from None
    pool = _check_plugins(config)
    swept = sweep_keys(overrides)
    for key in swept:
        if key == "experiment" or key.startswith("tracking"):  # one parent run holds the jobs
            raise _refuse(ConfigError(key, "cannot be swept: every job of a sweep logs under the sweep's parent "
                                      "run", f"run one sweep per value of {key}"))
    folder = Path(str(config.hydra.sweep.dir))  # unique_dir claims a new folder
    claim = None
    try:
        claim = claim_folder(folder, "hydra.sweep.dir")  # before anything is written into it
        sweep = _start(config, overrides, swept, folder)
    except BaseException:
        if claim is not None:
            claim.release()
        release_claim(folder)  # a refused sweep leaves no folder
        raise
    sweep.pool = pool
    return sweep


def _start(config: DictConfig, overrides: list[str], swept: list[str], folder: Path) -> Sweep:
    prestart_recorder(config)
    launches = precheck(config, _job_overrides(config, overrides), swept)
    spec = launches[0].plan.spec
    check_report_axes(spec.report, swept)
    recorder = open_recorder(spec)
    resume = _resume(spec, recorder, [la.plan for la in launches])
    folder = folder.resolve()
    record = _sweep_record(config, overrides, folder, spec, len(launches))
    try:
        folder.mkdir(parents=True, exist_ok=True)
        record.write(folder / "sweep.json")
        OmegaConf.save(config, folder / "multirun.yaml")  # Hydra's record of the sweep's command line
    except OSError as error:
        raise Stop(f"cannot write into {folder}: {error.strerror or error}. "
                   f"Fix: {output_fix(folder, error.errno, resume=False)}", EXIT_FAILED) from None
    for launch in launches:
        launch.plan.sweep_id = record.sweep_id
    if recorder is not None and all("image" in resume.get(la.plan.config_hash, {}) for la in launches):
        logger.info("Sweep %s: every job already has a FINISHED run (resume=true): no new MLflow run", folder)
    elif recorder is not None:
        recorder.start_sweep(record)
        logger.info("Sweep %s: MLflow experiment %r in %s", folder, spec.experiment, recorder.uri)
    log_config, log_format = _job_logging(config)
    STATE.sweep = Sweep(record, folder, launches, recorder, resume, spec.report,
                        str(config.hydra.job.name), log_config, log_format)
    return STATE.sweep


def sweep_name(overrides: list[str], folder: Path) -> str:
    """The parent run's name: the sweep folder's time (unique; the date is the run's start) first,
    so a narrow column still tells sweeps apart, then the swept overrides:
    `sweep 14-03-22 lora.alpha=0,0.5,1 seed=0,1`."""
    swept = " ".join(o for o in overrides if override_key(o) in sweep_keys(overrides))
    if len(swept) > 60:
        swept = swept[:59] + "…"
    return " ".join(p for p in ("sweep", folder.name, swept) if p)


def check_report_axes(report: Any, swept: list[str]) -> None:
    """report.x/y/z name keys this sweep sweeps (or none): refused before any job otherwise."""
    from .reporting.axes import not_swept_hint

    for axis in ("x", "y", "z"):
        key = getattr(report, axis)
        if key not in (None, "none") and key not in swept:
            raise _refuse(ConfigError(f"report.{axis}", f"{key!r} is not swept by this sweep",
                                      not_swept_hint(key, swept) + " (or none)"))


def _sweep_record(config: DictConfig, overrides: list[str], folder: Path, spec: RunSpec, jobs: int) -> SweepRecord:
    tags = {"runner.kind": "sweep", "runner.sweep_dir": str(folder), "runner.overrides": " ".join(overrides),
            OVERRIDES_JSON_TAG: json.dumps(overrides)}  # the list itself: a value may hold ` key=value`
    tags.update({k: v for k, v in provenance_tags("cpu").items() if not k.startswith("device.")})
    record = SweepRecord(sweep_dir=str(folder), overrides=overrides, experiment=spec.experiment,
                         tracking=job.tracking_of(spec), jobs=jobs, started=time.time(), owner=owner_tags(),
                         params={override_key(o): o.partition("=")[2] for o in overrides},
                         name=config.get("run_name") or sweep_name(overrides, folder))
    record.tags = tags | {job.RECORD_TAG: record.sweep_id}
    record.tracked = None if spec.tracking.backend is TrackingBackend.none else False
    return record


# --------------------------------------------------------------------------- run


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
def _job_log(sweep: Sweep, job_dir: Path) -> Iterator[None]:
    """`<job folder>/<name>.log` for the duration of the job."""
    handler = logging.FileHandler(job_dir / f"{sweep.log_name}.log")
    handler.setFormatter(logging.Formatter(sweep.log_format or "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)
        handler.close()


@contextmanager
def _env(values: dict[str, str]) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def run(sweep: Sweep) -> None:
    """The jobs, one after another in this process. A failed job is recorded and the sweep
    goes on; Ctrl-C ends the job in progress KILLED (KeyboardInterrupt); a job that cannot
    write into its folder stops the sweep (Stop): no later one could."""
    if sweep.logging is not None:
        logging.config.dictConfig(sweep.logging)
    brief_on_console()  # a job's known user error: one line here, its traceback in the job's log
    if sweep.pool is not None:  # hydra/launcher=ray: the same jobs, computed by a pool of Ray actors
        from .ray_pool import run_pool

        return run_pool(sweep)
    logger.info("Launching %d jobs locally", len(sweep.launches))
    started = time.perf_counter()
    for i, launch in enumerate(sweep.launches):
        plan = launch.plan
        logger.info("job %d (%s): %s", plan.num, progress(i, len(sweep.launches), started, sweep.records), plan.label)
        job_dir = job_folder(sweep, launch)
        with _job_log(sweep, job_dir), _env(launch.env):
            record = run_plan(plan, job_dir, sweep.recorder, sweep.resume)
        sweep.records.append(record)
        after(record)


def progress(done: int, total: int, started: float, records: list[JobRecord]) -> str:
    """`3/6, ETA 0:00:12`: the next job's number and the time left at the pace of the jobs
    after the first (which also loaded the weights)."""
    text = f"{done + 1}/{total}"
    if done == 0:
        return text
    elapsed = time.perf_counter() - started
    first = records[0].metrics.get("total_s", 0.0) if records and done > 1 else 0.0
    per_job = (elapsed - first) / (done - 1) if done > 1 and elapsed > first else elapsed / done
    return f"{text}, ETA {clock(per_job * (total - done))}"


def clock(seconds: float) -> str:
    """`1:02:03` for 3723 seconds."""
    left = round(seconds)
    return f"{left // 3600}:{left // 60 % 60:02d}:{left % 60:02d}"


def job_folder(sweep: Sweep, launch: Launch) -> Path:
    job_dir = sweep.folder / launch.subdir
    try:
        job_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise Stop(f"cannot create {job_dir}: {error.strerror or error}. "
                   f"Fix: {output_fix(sweep.folder, error.errno)}", EXIT_FAILED) from None
    return job_dir.resolve()


def run_plan(plan: JobPlan, job_dir: Path, recorder: Optional[Recorder], resume: dict[str, Any]) -> JobRecord:
    """One job: skipped (resume), or computed here and handed to the recorder."""
    plan.job_dir = str(job_dir.resolve())
    previous = resumed(plan, resume)
    if previous is not None:
        return skip(plan, previous)
    if recorder is not None:
        recorder.job_started(plan)
    record = job.compute(plan)
    if recorder is not None:
        recorder.job_done(record)
    return record


def after(record: JobRecord) -> None:
    """What a job's outcome means for the rest: Ctrl-C and unwritable folders end it."""
    if record.status == FAILED:
        STATE.failed.append(record)
    if record.status == KILLED:
        raise KeyboardInterrupt("interrupted during a job")
    if record.error_kind == "output":
        folder = Path(record.job_dir or ".").parent
        code = int(record.error.rpartition("errno ")[2].rstrip(")") or 0) if "errno " in record.error else None
        raise Stop(f"job {record.num}: {record.error.removeprefix('OutputError: ')}. Fix: {output_fix(folder, code)}",
                   EXIT_FAILED)


def skip(plan: JobPlan, previous: dict[str, Any]) -> JobRecord:
    """The job's record when resume=true takes an earlier run: SKIPPED, that run's metrics, and
    its image (fetched and checked by `_resume`) copied into the job's folder."""
    import shutil

    record = job.new_record(plan)
    record.status, record.run_id, record.ended, record.tracked = SKIPPED, previous["run_id"], time.time(), True
    record.metrics = {k: v for k, v in previous["metrics"].items() if k in METRICS}
    image = Path(plan.job_dir) / "image.png"
    try:
        shutil.copyfile(previous["image"], image)
        record.image_path = str(image)
    except OSError as error:
        logger.warning("Could not copy the image of run %s into %s: %s", record.run_id, image, error)
    try:
        record.write(Path(plan.job_dir) / "job.json")
    except OSError as error:
        logger.warning("Could not write %s/job.json: %s", plan.job_dir, error)
    logger.info("job %d [%s]: SKIPPED (resume): run %s already finished this config", record.num, plan.label,
                record.run_id)
    return record


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
        from .tracking.store import ui_hint

        logger.info("MLflow: parent run %r (%s), one child per job, in %s. Compare them: %s", record.name,
                    record.parent_run_id, recorder.uri, ui_hint(recorder.uri))


def _start_report(sweep: Sweep) -> Any:
    """The report's grid(s) written (a reporting.html.PendingReport), or the error that stopped them."""
    if not sweep.records:
        return None
    from .reporting.html import PendingReport
    from .reporting.jobs import jobs_from_records

    jobs = jobs_from_records(sweep.records, sweep.record.overrides, sweep.record.name)
    report = sweep.report
    try:
        return PendingReport(jobs, sweep.folder, x=report.x, y=report.y, z=report.z, thumb=report.thumb)
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


def _finish_report(sweep: Sweep, report: Any) -> list[Path]:
    from .reporting.jobs import jobs_from_records

    if isinstance(report, BaseException):
        raise report
    files = report.finish(jobs_from_records(sweep.records, sweep.record.overrides, sweep.record.name))
    logger.info("Sweep report: %s (grid: %s)", files.html, ", ".join(p.name for p in files.grids))
    return files.all


def _report_fix(error: BaseException, folder: Path) -> str:
    from .reporting.jobs import ReportError

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
