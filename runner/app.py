"""The Hydra app behind `python -m runner`: one job = one image.

    python -m runner model=qwen_image_tiny sampler=tiny                  # a single run: `main`
    python -m runner -m model=qwen_image_tiny sampler=tiny seed=0,1      # a sweep: our Hydra launcher

A single run is checked by `SingleRunCheck.on_run_start` before any folder or MLflow run exists,
then computed by `main` in the folder Hydra made for it. A sweep never reaches `main`: the
runner's sweeper and launchers (hydra_plugins/runner_ray_launcher) run it through
runner.execution.sweep. How a run ends early (Stop, Ctrl-C): `abort`; docs/architecture.md.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from .build import pipeline as build
from .config import CONF_DIR
from .config.compose import task_overrides
from .config.schema import register_configs
from .errors import EXIT_FAILED, EXIT_REFUSED, ConfigError, Stop, brief_on_console, output_fix
from .execution import job, run, sweep
from .execution.job import JobPlan
from .execution.state import STATE, close_recorders, open_recorder, prestart_recorder, shield
from .files import claim_folder, register_resolvers
from .records import JobRecord
from .tracking.store import ui_hint
from .tracking.writer import Recorder

logger = logging.getLogger("runner")

register_configs()
register_resolvers()  # ${unique_dir:...}
build.register_resolvers()  # ${built_file:...}

CHECK_KEY = "hydra.callbacks.runner_check"  # conf/config.yaml
LAUNCHERS_FIX = "leave hydra/launcher at its default or use hydra/launcher=ray"


@dataclass
class Single:
    plan: JobPlan
    recorder: Optional[Recorder]
    resume: dict[str, Any]


def abort(status: str) -> None:
    """Exit path (Ctrl-C, a Stop, an error between jobs): finish the sweep and end every run
    this process left open with `status`, after the MLflow writer's last writes."""
    shield()
    try:
        sweep.finish(status)
    finally:
        close_recorders(status)


class SingleRunCheck(Callback):
    """A single run's config checked up front (conf/config.yaml, hydra.callbacks.runner_check).

    A callback, not the task function: Hydra calls `on_run_start` before it makes the run's
    folder (`hydra.run.dir`, claimed by `${unique_dir:...}` as soon as it is read), so a refused
    run leaves no folder and no MLflow run; the task function runs inside that folder. Sweeps
    are checked by the launcher (runner.execution.sweep.start), before their first job."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        # Hydra turns an exception of a callback into a warning and goes on: ours end the run
        try:
            start_single(config)
        except OSError as error:
            where = error.filename or "the output folder"
            raise Stop(f"cannot write {where}: {error.strerror or error}. Fix: {output_fix(where, error.errno)}",
                       EXIT_FAILED) from None
        except Exception as error:  # noqa: BLE001 - a bug: its traceback, then the end
            logger.exception("The runner failed in start_single")
            raise Stop(f"internal error: {type(error).__name__}: {error}", EXIT_FAILED) from None


def start_single(config: DictConfig) -> None:
    """Refuse a bad config before any folder or MLflow run exists."""
    overrides = task_overrides(config)
    prestart_recorder(config)
    try:
        plan = job.prepare(config, 0, overrides)
    except ConfigError as error:
        raise Stop(str(error), EXIT_REFUSED) from None
    recorder = open_recorder(plan.spec)
    STATE.single = Single(plan, recorder, run.find_resumable(plan.spec, recorder, [plan]))


def run_single(cfg: DictConfig) -> JobRecord:
    """Hydra's task function: the single run, in the folder Hydra made for it."""
    hc = HydraConfig.get()
    brief_on_console()  # Hydra's job logging is configured now: a known user error is one line on the console
    job_dir = Path(hc.runtime.output_dir)
    single = STATE.single
    if single is None:  # the callback was removed from the config
        raise Stop(str(ConfigError(CHECK_KEY, "the runner's check of a run is missing",
                                   f"keep {CHECK_KEY} of conf/config.yaml")), EXIT_REFUSED)
    claim_folder(job_dir, "hydra.run.dir")  # refused (exit 2) when used or claimed by another command
    record = run.run_plan(single.plan, job_dir, single.recorder, single.resume)
    if single.recorder is not None:
        shield()
        single.recorder.drain()
        if record.tracked is False:
            STATE.untracked.append(record)
            logger.error("The run was not tracked in MLflow (image and job.json in place). Log it with "
                         "`python -m runner sync %s`", record.job_dir)
        elif record.run_id:
            logger.info("MLflow run %s (experiment %r) in %s. See it: %s", record.run_id, single.recorder.experiment,
                        single.recorder.uri, ui_hint(single.recorder.uri))
    run.after(record)
    return record


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def main(cfg: DictConfig) -> None:
    if HydraConfig.get().mode.name == "MULTIRUN":  # a launcher of Hydra's, not ours, runs the sweep's jobs
        raise Stop(str(ConfigError("hydra/launcher", f"{HydraConfig.get().launcher._target_} is not supported: the "
                                   "runner launches the jobs of a sweep itself (weights loaded once per process)",
                                   LAUNCHERS_FIX)), EXIT_REFUSED)
    run_single(cfg)
