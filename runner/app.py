"""The Hydra app behind `python -m runner`: one job = one image.

    python -m runner model=qwen_image_tiny sampler=tiny
    python -m runner -m model=qwen_image_tiny sampler=tiny seed=0,1 lora=file lora.path=l.safetensors lora.alpha=0,1

This module connects Hydra to the runner; the work is elsewhere: a job is computed by
runner.job (`prepare`, then `compute`: no MLflow), recorded by runner.recorder (the MLflow
writer process), and a sweep is checked, run and finished by runner.sweep. The callbacks
(conf/config.yaml, hydra.callbacks.runner_sweep):

- on_run_start: a single run's config is checked (composed, typed, validated, its call
  arguments checked by the pipeline: no weight read) before any folder or MLflow run
  exists; Hydra then runs `main` in the run's folder;
- on_multirun_start: the whole sweep (runner.sweep.start, run, finish); it ends Hydra's
  multirun with runner.errors.SweepDone, since there is nothing left to launch.

Exceptions raised in a callback are only warnings to Hydra: ours become runner.errors.Stop,
which reaches runner.__main__ (exit status, one line), as Ctrl-C does.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from . import job, sweep
from .build import pipeline as build
from .config import CONF_DIR
from .config.compose import task_overrides
from .config.schema import register_configs
from .errors import EXIT_FAILED, EXIT_REFUSED, ConfigError, Stop, SweepDone, brief_on_console, output_fix
from .files import claim_folder, register_resolvers
from .job import JobPlan
from .records import JobRecord
from .state import STATE, close_recorders, open_recorder, prestart_recorder, shield
from .tracking.writer import Recorder

logger = logging.getLogger("runner")

register_configs()
register_resolvers()  # ${unique_dir:...}
build.register_resolvers()  # ${built_file:...}

__all__ = ["STATE", "abort", "finish_sweep", "main", "SweepCallback"]


@dataclass
class Single:
    plan: JobPlan
    recorder: Optional[Recorder]
    resume: dict[str, Any]


def finish_sweep(status: Optional[str] = None) -> None:
    sweep.finish(status)


def abort(status: str) -> None:
    """Exit path (Ctrl-C, a Stop, an error between jobs): finish the sweep and end every run
    this process left open with `status`, after the MLflow writer's last writes."""
    shield()
    try:
        sweep.finish(status)
    finally:
        close_recorders(status)


def _guarded(step: Callable[[DictConfig], Any], config: DictConfig) -> None:
    """Hydra turns an exception of a callback into a warning and goes on: ours end the run."""
    try:
        step(config)
    except OSError as error:
        where = error.filename or "the output folder"
        raise Stop(f"cannot write {where}: {error.strerror or error}. Fix: {output_fix(where, error.errno)}",
                   EXIT_FAILED) from None
    except Exception as error:  # noqa: BLE001 - a bug: its traceback, then the end
        logger.exception("The runner failed in %s", getattr(step, "__name__", step))
        raise Stop(f"internal error: {type(error).__name__}: {error}", EXIT_FAILED) from None


def _sweep(config: DictConfig) -> None:
    sweep.run(sweep.start(config))
    sweep.finish()
    raise SweepDone()


class SweepCallback(Callback):
    """Registered in conf/config.yaml (hydra.callbacks.runner_sweep)."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        _guarded(start_single, config)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        _guarded(_sweep, config)


def start_single(config: DictConfig) -> None:
    """`on_run_start`: refuse a bad config before any folder or MLflow run exists."""
    overrides = task_overrides(config)
    prestart_recorder(config)
    try:
        plan = job.prepare(config, 0, overrides)
    except ConfigError as error:
        raise Stop(str(error), EXIT_REFUSED) from None
    recorder = open_recorder(plan.spec)
    STATE.single = Single(plan, recorder, sweep._resume(plan.spec, recorder, [plan]))


def run_single(cfg: DictConfig) -> JobRecord:
    """Hydra's task function: the single run, in the folder Hydra made for it."""
    hc = HydraConfig.get()
    brief_on_console()  # Hydra's job logging is configured now: a known user error is one line on the console
    job_dir = Path(hc.runtime.output_dir)
    single = STATE.single
    if single is None:  # the callback was removed from the config
        raise Stop(str(ConfigError("hydra.callbacks.runner_sweep", "the runner's callback is missing",
                                   "keep hydra.callbacks.runner_sweep of conf/config.yaml")), EXIT_REFUSED)
    claim_folder(job_dir, "hydra.run.dir")  # refused (exit 2) when used or claimed by another command
    record = sweep.run_plan(single.plan, job_dir, single.recorder, single.resume)
    if single.recorder is not None:
        shield()
        single.recorder.drain()
        if record.tracked is False:
            STATE.untracked.append(record)
            logger.error("The run was not tracked in MLflow (image and job.json in place). Log it with "
                         "`python -m runner sync %s`", record.job_dir)
        elif record.run_id:
            from .tracking.store import ui_hint

            logger.info("MLflow run %s (experiment %r) in %s. See it: %s", record.run_id, single.recorder.experiment,
                        single.recorder.uri, ui_hint(single.recorder.uri))
    sweep.after(record)
    return record


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def main(cfg: DictConfig) -> None:
    if HydraConfig.get().mode.name == "MULTIRUN":  # the sweep callback runs the jobs itself
        raise Stop(str(ConfigError("hydra.callbacks.runner_sweep", "the runner's sweep callback is missing",
                                   "keep hydra.callbacks.runner_sweep of conf/config.yaml")), EXIT_REFUSED)
    run_single(cfg)
