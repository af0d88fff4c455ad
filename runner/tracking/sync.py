"""`python -m runner sync DIR [overrides]` and `python -m runner cleanup [overrides] [--dir DIR]`.

sync: log a finished sweep folder (sweep.json + each `<job>/job.json`) or a single run folder
(job.json) into an MLflow store: the store of the command line (`tracking.*`), else the
config's default; never one the folder's records name. The experiment: `experiment=`, else the
recorded one. Idempotent: every record carries an id (tag runner.record_id) and a completely
logged run the tag runner.logged, so a second sync logs nothing twice; a run left incomplete
by a dead process is completed in place. Runs it creates or completes get the tag
runner.synced_from. The folder is read as if someone else wrote it: every record is checked
(a malformed one refuses the sync, naming the file and the key), no file outside the folder is
read (an image or a link leading out refuses the sync, exit 2, nothing logged; an input
picture outside it has only its sha256 logged).

cleanup: end the RUNNING runs of the experiment whose owner process is gone on this host as
KILLED (runs of other hosts are left alone, and listed), and remove the temporary files of
interrupted writes (`.<name>.runner-tmp<pid>` of dead pids) in the runner's own folders under
`outputs/` and the folders given with --dir, and in the store folder. The folders a run's tags
name are never searched (the log says how to clean them). A sweep with resume=true does the
same first, for the store folder.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional, Sequence

from ..errors import EXIT_FAILED, EXIT_OK, EXIT_REFUSED, ConfigError, first_line
from ..files import inside
from ..owner import ALIVE, DEAD, describe, owner_state
from ..records import FAILED, KILLED, RECORD_TAG, RUNNING, SKIPPED, JobRecord, SweepRecord, sweep_outputs
from .runs import (
    LOGGED_TAG,
    end_dead_runs,
    log_job,
    log_sweep_end,
    plain_run,
    remove_leftovers,
    report_dead_runs,
    start_sweep_run,
)
from .store import Tracker, is_unreachable

logger = logging.getLogger("runner")

SYNCED_TAG = "runner.synced_from"


def cleanup_main(argv: list[str]) -> int:
    dirs, overrides = _split_dirs(argv)
    try:
        tracking, experiment, source = _store_of(overrides)
        tracker = Tracker(tracking, experiment)
    except ConfigError as error:
        logger.error("%s", error)
        return EXIT_REFUSED
    except Exception as error:  # noqa: BLE001 - one line: the store cannot be reached
        logger.error("cleanup: cannot open the MLflow store: %s", first_line(error, named=True))
        return EXIT_FAILED
    logger.info("cleanup: experiment %r of %s (from %s)", experiment, tracker.uri, source)
    ended, left, unknown = ([plain_run(r) for r in group] for group in end_dead_runs(tracker))
    report_dead_runs(tracker.experiment_name, tracker.uri, ended, left, unknown)
    remove_leftovers([Path("outputs"), *dirs], [Path(tracking.store_dir)], ended)
    return EXIT_OK


def _split_dirs(argv: list[str]) -> tuple[list[Path], list[str]]:
    dirs, rest, it = [], [], iter(argv)
    for arg in it:
        if arg == "--dir":
            dirs.append(Path(next(it, ".")))
        elif arg.startswith("--dir="):
            dirs.append(Path(arg.partition("=")[2]))
        else:
            rest.append(arg)
    return dirs, rest


def _store_of(overrides: list[str], recorded_experiment: str = "") -> tuple[Any, str, str]:
    """The store (from the command line, else the config's defaults: never from a folder's
    records), the experiment (the command line's, else the one recorded, else the default) and
    where the store came from."""
    from omegaconf import OmegaConf

    from ..config.compose import compose
    from ..config.schema import TrackingBackend

    cfg = compose(overrides)
    keys = {o.lstrip("+~").partition("=")[0] for o in overrides}
    tracking = OmegaConf.to_object(cfg.tracking)
    if tracking.backend is TrackingBackend.none:
        raise ConfigError("tracking", "tracking=none names no store", "use tracking=mlflow (the default)")
    source = "the command line" if any(k == "tracking" or k.startswith("tracking.") for k in keys) else \
        "the config defaults"
    experiment = str(cfg.experiment) if "experiment" in keys or not recorded_experiment else recorded_experiment
    return tracking, experiment, source


# ------------------------------------------------------------------------- sync


def sync_main(argv: list[str]) -> int:
    if not argv or argv[0].startswith("-") or "=" in argv[0]:
        logger.error("usage: python -m runner sync DIR [tracking.uri=... | tracking.store_dir=...] [experiment=...]")
        return EXIT_REFUSED
    folder, overrides = Path(argv[0]), argv[1:]
    try:
        sweep, jobs = read_folder(folder)
        first = sweep if sweep is not None else jobs[0]
        tracking, experiment, source = _store_of(overrides, first.experiment)
        tracker = Tracker(tracking, experiment)
    except (ConfigError, ValueError, OSError) as error:
        logger.error("sync: %s", error)
        return EXIT_REFUSED
    except Exception as error:  # noqa: BLE001 - one line: the store cannot be reached
        logger.error("sync: cannot open the MLflow store: %s", first_line(error, named=True))
        return EXIT_FAILED
    _say_where(tracker, tracking, experiment, source, first)
    _say_inputs_outside(jobs)
    try:
        logged, present = Syncer(tracker, folder, tracking.image_key).run(sweep, jobs)
    except Exception as error:  # noqa: BLE001
        level = "cannot reach the MLflow store" if is_unreachable(error) else "failed"
        logger.error("sync: %s: %s (run sync again: what was logged is not logged twice)", level,
                     first_line(error, named=True))
        return EXIT_FAILED
    logger.info("sync %s: %d run(s) logged, %d already in experiment %r of %s", folder, logged, present, experiment,
                tracker.uri)
    return EXIT_OK


def _say_where(tracker: Tracker, tracking: Any, experiment: str, source: str, first: Any) -> None:
    logger.info("sync: logging into experiment %r of %s (from %s)", experiment, tracker.uri, source)
    named = first.tracking.get("uri") or first.tracking.get("store_dir")
    ours = {str(tracking.uri), str(Path(tracking.store_dir).resolve()), tracker.uri}
    if named and str(named) not in ours:
        logger.info("sync: the folder's records name the store %r: not used (the store comes from the command line "
                    "or the config; give tracking.uri=... / tracking.store_dir=... to log there)", str(named))


def _say_inputs_outside(jobs: Sequence[JobRecord]) -> None:
    outside: dict[str, list[str]] = {}
    for record in jobs:
        for item in record.inputs:
            if item.get("outside"):
                outside.setdefault(item["outside"], []).append(f"inputs.{item['arg']}.{item['index']}.sha256")
    for path, params in outside.items():
        logger.info("sync: the input picture %s lies outside the folder: not read, only its sha256 is logged "
                    "(param %s of %d run(s))", path, params[0], len(params))


# -------------------------------------------------------------- reading a folder


def read_folder(folder: Path) -> tuple[Optional[SweepRecord], list[JobRecord]]:
    """The sweep record (None for a single run) and the job records of a folder, checked: every
    record as the runner writes it, every file they name inside the folder (links resolved).
    ValueError naming the file and the key otherwise: a folder that names files elsewhere (a
    folder someone sent) is refused whole."""
    if not folder.is_dir():
        raise ValueError(f"no folder {folder}")
    root = folder.resolve()
    if (folder / "sweep.json").is_file():
        sweep = SweepRecord.read(_own(root, folder / "sweep.json"))
    elif (folder / "job.json").is_file():
        return None, [_checked_job(root, _own(root, folder / "job.json"), "run")]
    else:
        raise ValueError(f"{folder} holds neither sweep.json (a sweep) nor job.json (a run): nothing to sync")
    if sweep.status == RUNNING and owner_state(sweep.owner) == ALIVE:
        raise ValueError(f"the sweep in {folder} is still running ({describe(sweep.owner)}): sync it when it ended")
    for path in sweep_outputs(folder):
        _own(root, path)
    jobs = [_checked_job(root, _own(root, p), "sweep") for p in sorted(folder.glob("*/job.json"))]
    return sweep, sorted(jobs, key=lambda r: r.num)


_HOSTILE = ("Fix: sync only folders the runner wrote (a folder that names files elsewhere could make sync send "
            "your files to MLflow); restore the record if you edited it")


def _own(root: Path, path: Path) -> Path:
    """`path`, if it lies in the folder `root` (a link out of it is refused)."""
    if inside(root, path) is None:
        raise ValueError(f"{_where(root, path)} leads to {path.resolve()}, outside the folder {root}: refused. "
                         f"{_HOSTILE}")
    return path


def _where(root: Path, path: Path) -> str:
    """`path` as the message names it: relative to the folder synced (`3/job.json`)."""
    try:
        return str((path.parent.resolve() / path.name).relative_to(root))
    except ValueError:
        return str(path)


def _checked_job(root: Path, path: Path, kind: str) -> JobRecord:
    """A job's record with the files it names made safe: its image inside the folder (else
    refused), its input pictures kept only when inside (else only their sha256 is logged), no
    store of its own."""
    record = JobRecord.read(path)
    where, job_folder = _where(root, path), path.parent
    if record.image_path:
        image = Path(record.image_path)
        if not image.is_absolute():
            image = job_folder / image
        elif inside(root, image) is None and record.job_dir and image.is_relative_to(record.job_dir):
            image = job_folder / image.relative_to(record.job_dir)  # the folder was moved or copied here
        if inside(root, image) is None:
            leads = f", which leads to {image.resolve()}," if str(image.resolve()) != record.image_path else ""
            raise ValueError(f"{where}: image_path names {record.image_path}{leads} outside the {kind} folder {root}: "
                             f"refused. {_HOSTILE}")
        _check_picture(image, where)
        record.image_path = str(image)
    for item in record.inputs:
        picture = inside(root, item["path"], job_folder)
        item["outside"] = "" if picture is not None else item["path"]
        item["path"] = str(picture) if picture is not None else ""
    record.tracking = {}
    return record


def _check_picture(image: Path, where: str) -> None:
    """A job's image, read as the library reads every picture (the pixel limit checked before
    decoding): one that cannot be read refuses the sync before anything is logged."""
    if not image.is_file():
        return  # logged without its image, as a job that made none
    from pipelines import PictureError, open_picture  # imports torch: only a sync reads pictures

    try:
        open_picture(image, f"{where}: image_path")
    except (OSError, PictureError) as error:
        raise ValueError(f"{first_line(error).rstrip('.')}: refused, nothing logged. Fix: sync a folder whose "
                         "images the runner wrote, or remove the job's folder") from None


class Syncer:
    def __init__(self, tracker: Tracker, folder: Path, image_key: str = "image") -> None:
        self.tracker, self.folder, self.image_key = tracker, folder.resolve(), image_key
        self.logged = self.present = 0
        self.inputs: set[str] = set()
        self._parent_open = False

    def _existing(self, record_id: str) -> tuple[Optional[Any], bool]:
        """(the run logged completely, True) or (the run to complete or None, False)."""
        runs = self.tracker.runs_of_record(record_id)
        complete = [r for r in runs if r.data.tags.get(LOGGED_TAG)]
        if complete:
            return complete[0], True
        usable = [r for r in runs if r.info.status != RUNNING or owner_state(r.data.tags) == DEAD]
        busy = [r for r in runs if r not in usable]
        if busy and not usable:
            raise ValueError(f"run {busy[0].info.run_id} of this record is RUNNING, owned by "
                             f"{describe(busy[0].data.tags)}: end it first (python -m runner cleanup there)")
        return (max(usable, key=lambda r: r.info.start_time) if usable else None), False

    def run(self, sweep: Optional[SweepRecord], jobs: list[JobRecord]) -> tuple[int, int]:
        parent_id = self._parent(sweep) if sweep is not None else None
        try:
            for record in jobs:
                self._job(record, parent_id)
            if sweep is not None and parent_id is not None and self._parent_open:
                sweep.parent_run_id = parent_id
                if sweep.status == RUNNING:
                    sweep.status = KILLED
                self.tracker.set_tags(parent_id, {SYNCED_TAG: str(self.folder)})
                log_sweep_end(self.tracker, sweep, sweep_outputs(self.folder))
                self.logged += 1
        except Exception:  # the parent too, also when its own end failed
            if parent_id is not None and self._parent_open:
                self._end_failed(parent_id)
            raise
        return self.logged, self.present

    def _parent(self, sweep: SweepRecord) -> str:
        run, done = self._existing(sweep.sweep_id)
        self._parent_open = not done
        if done:
            self.present += 1
        if run is not None:
            return run.info.run_id
        # the record's id from the record itself, not from tags a folder may lack: a later sync finds the run
        return start_sweep_run(self.tracker, sweep, {SYNCED_TAG: str(self.folder), RECORD_TAG: sweep.sweep_id})

    def _job(self, record: JobRecord, parent_id: Optional[str]) -> None:
        if record.status in (SKIPPED, RUNNING):  # a skipped job's run exists; a running one has no result
            return
        run, done = self._existing(record.record_id)
        if done:
            self.present += 1
            return
        tags = {SYNCED_TAG: str(self.folder), RECORD_TAG: record.record_id}
        record.tracking = {"image_key": self.image_key}
        if run is None:
            run_id = self.tracker.start_run(record.name or f"job {record.num}", {**record.tags, **tags},
                                            parent_id=parent_id, start_time=record.started)
            present: set = set()
        else:
            run_id, present = run.info.run_id, set(run.data.params)
            self.tracker.set_tags(run_id, tags)
        try:
            log_job(self.tracker, record, run_id, parent_id, present, self.inputs)
        except Exception:
            self._end_failed(run_id)
            raise
        self.logged += 1

    def _end_failed(self, run_id: str) -> None:
        """A run this sync could not complete, ended FAILED rather than left RUNNING (which the next
        sync would refuse as someone else's): the next sync completes it."""
        try:
            self.tracker.end_run(run_id, FAILED, force=True)
        except Exception:  # noqa: BLE001 - the store is gone: the error that stopped the sync says so
            pass
