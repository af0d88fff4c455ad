"""One job, placed: skipped (resume=true found its result: `skip`), computed in this user's warm
worker (keep_warm: warm/client.py), or computed here (job.py); and what its outcome means for the
rest of the command (`after`).
"""
from __future__ import annotations

import atexit
import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

from ..config.schema import RunSpec
from ..errors import EXIT_FAILED, Stop, output_fix
from ..records import FAILED, KILLED, METRICS, SKIPPED, JobRecord
from ..tracking.runs import remove_leftovers, report_dead_runs
from ..tracking.writer import Recorder
from . import job
from .job import JobPlan
from .state import STATE
from .warm import client as warm

logger = logging.getLogger("runner")


def compute(plan: JobPlan) -> JobRecord:
    """Where a job runs: with keep_warm in this user's warm worker (None from it: no worker to
    use, or it could not be used; a warning said why), else here."""
    if plan.spec.keep_warm is not None:
        record = warm.compute(plan)
        if record is not None:
            return record
    return job.compute(plan)


def run_plan(plan: JobPlan, job_dir: Path, recorder: Optional[Recorder], resume: dict[str, Any]) -> JobRecord:
    """A single run's job: skipped (resume), or computed (`compute`) and handed to the recorder."""
    plan.job_dir = str(job_dir.resolve())
    previous = resumed(plan, resume)
    if previous is not None:
        return skip(plan, previous)
    if recorder is not None:
        recorder.job_started(plan)
    record = compute(plan)
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


def find_resumable(spec: RunSpec, recorder: Optional[Recorder], plans: list[JobPlan]) -> dict[str, Any]:
    """resume=true: end the runs of dead processes (and their leftovers), then find the
    configs that have a FINISHED run: config hash -> what recorder.checked_run says of it
    (its image fetched and checked), or {run_id, rerun: why} when the job must run again."""
    if not spec.resume or recorder is None:
        return {}
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
