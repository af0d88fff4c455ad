"""The Ray worker: one actor, a process that keeps the pipeline cache across the jobs it is sent
and computes each with runner.execution.job.compute, as a sweep does in its own process, into a
temporary folder; it returns the PNG's bytes, the record and the job's log records.
"""
from __future__ import annotations

import copy
import logging
import os
import shutil
import socket
import tempfile
from pathlib import Path

from ...build import pipeline as build
from ...records import FINISHED
from .. import job
from ..job import JobPlan


class _Capture(logging.Handler):
    """A job's log records, made plain (message formatted, traceback as text) to travel."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        record = copy.copy(record)
        if record.exc_info:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        record.msg, record.args, record.exc_info = record.getMessage(), None, None
        self.records.append(record)


class Worker:
    """One Ray actor: a process that keeps the pipeline cache across jobs."""

    def __init__(self, cwd: str, threads: int) -> None:
        import torch

        if os.path.isdir(cwd):  # relative paths (./models, lora.path) mean what they mean to the driver
            os.chdir(cwd)
        torch.set_num_threads(threads)
        logging.getLogger().setLevel(logging.INFO)
        self.name = f"{socket.gethostname()}:{os.getpid()}"

    def ready(self) -> str:
        return self.name

    def compute(self, plan: JobPlan, env: dict[str, str]) -> tuple:
        """The job into a temporary folder; returns (record, PNG bytes or None, log records,
        the folder's name, which the driver replaces in the log by the job's folder)."""
        folder = tempfile.mkdtemp(prefix="runner-job-")
        plan.job_dir = folder
        capture = _Capture()
        logging.getLogger().addHandler(capture)
        try:
            with job.environment(env):
                record = job.compute(plan)
            image = Path(folder) / "image.png"
            data = image.read_bytes() if record.status == FINISHED and image.is_file() else None
        finally:
            logging.getLogger().removeHandler(capture)
            shutil.rmtree(folder, ignore_errors=True)
        record.tags.update({"runner.worker": self.name, "runner.worker_loads": str(build.LOAD_COUNT)})
        return record, data, capture.records, folder
