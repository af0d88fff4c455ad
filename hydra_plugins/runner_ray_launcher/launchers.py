"""How the runner's sweeps run, as Hydra plugins (selected in conf/config.yaml's defaults):

    hydra/sweeper=runner    every combination of the sweep's values, as one batch
    hydra/launcher=local    the default: the jobs one after another in this process
    hydra/launcher=ray      the jobs on a pool of long-lived Ray actors (docs/ray.md)

    python -m runner -m seed=0:8 lora.alpha=0,0.5,1
    python -m runner -m hydra/launcher=ray hydra.launcher.address=auto seed=0,1

Both launchers hand the whole batch to runner.execution.sweep.launch (one loop; only the pool
differs), which checks every job before the first one loads a weight, and return a JobReturn per
job that Hydra never raises for: the runner's exit status is its own. Registered the Hydra way:
this namespace package (`hydra_plugins`, no __init__.py there) is scanned by Hydra, which stores
the configs below. Nothing here imports Ray: only a sweep on hydra/launcher=ray does.
"""
# no `from __future__ import annotations`: Hydra runs this module before it is in sys.modules,
# where dataclasses cannot resolve string annotations
import itertools
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

from hydra.core.config_store import ConfigStore
from hydra.core.utils import JobReturn, JobStatus
from hydra.plugins.launcher import Launcher
from hydra.plugins.sweeper import Sweeper
from omegaconf import DictConfig, OmegaConf

from runner.errors import EXIT_REFUSED, ConfigError, Stop
from runner.execution.ray.settings import RaySettings

HERE = "hydra_plugins.runner_ray_launcher.launchers"
FIXES = {"launcher": "leave hydra/launcher at its default or use hydra/launcher=ray",
         "sweeper": "leave hydra/sweeper at its default"}


@dataclass
class RunnerSweeperConf:
    _target_: str = f"{HERE}.RunnerSweeper"
    # the sweep is one batch (every job is checked before the first runs): only null is taken
    max_batch_size: Optional[int] = None
    # overrides swept as if given on the command line, e.g. {seed: "0,1,2"}
    params: Optional[Dict[str, str]] = None


@dataclass
class LocalLauncherConf:
    _target_: str = f"{HERE}.LocalLauncher"


@dataclass
class RayLauncherConf(RaySettings):  # the settings themselves: runner/execution/ray/settings.py
    _target_: str = f"{HERE}.RayLauncher"


store = ConfigStore.instance()
store.store(group="hydra/sweeper", name="runner", node=RunnerSweeperConf, provider="runner")
store.store(group="hydra/launcher", name="local", node=LocalLauncherConf, provider="runner")
store.store(group="hydra/launcher", name="ray", node=RayLauncherConf, provider="runner")


def refuse_others(config: DictConfig) -> None:
    """A sweeper or launcher not of the runner is refused before anything is written (exit 2):
    the runner launches a sweep's jobs itself (weights loaded once per process)."""
    for what in ("sweeper", "launcher"):
        target = str(OmegaConf.select(config, f"hydra.{what}._target_", default=""))
        if not target.startswith(f"{HERE}."):
            raise Stop(str(ConfigError(f"hydra/{what}", f"{target} is not supported: the runner launches the jobs "
                                       "of a sweep itself (weights loaded once per process)", FIXES[what])),
                       EXIT_REFUSED)


def expand(overrides: Sequence[Any]) -> List[List[str]]:
    """Every job's overrides (parsed overrides in, strings out), in the order of Hydra's basic
    sweeper: the product of each key's values, the last key changing fastest."""
    values: Dict[str, List[str]] = {}
    for override in overrides:
        key = override.get_key_element()
        if not override.is_sweep_override():
            values[key] = [f"{key}={override.get_value_element_as_str()}"]
        elif override.is_discrete_sweep():
            values[key] = [f"{key}={value}" for value in override.sweep_string_iterator()]
        else:
            raise Stop(str(ConfigError(key, f"a {override.value_type.name} sweep has no list of values to run",
                                       "give the values (a,b,c), range(start,stop,step) or choice(...)")),
                       EXIT_REFUSED)
    return [list(job) for job in itertools.product(*values.values())]


class RunnerSweeper(Sweeper):
    """hydra/sweeper=runner: the jobs of the command line's sweep (and hydra.sweeper.params) to the
    launcher in one batch. Hydra's basic sweeper expands them the same way, but first composes
    every job once more to validate it: ~150 ms a job here (2 shared cores), against the 30 ms a
    job the runner allows itself beyond inference (bench/sweep_overhead.py); the runner's
    launchers check every job themselves, composing once per combination of config groups."""

    def __init__(self, max_batch_size: Optional[int] = None, params: Optional[Dict[str, str]] = None) -> None:
        self.max_batch_size, self.params = max_batch_size, dict(params or {})
        self.config: Optional[DictConfig] = None
        self.hydra_context: Any = None
        self.launcher: Optional[Launcher] = None

    def setup(self, *, hydra_context: Any, task_function: Any, config: DictConfig) -> None:
        from hydra.core.plugins import Plugins

        refuse_others(config)
        if self.max_batch_size is not None:
            raise Stop(str(ConfigError("hydra.sweeper.max_batch_size", "a sweep of the runner is one batch (every "
                                       "job is checked before the first one runs)", "leave it null")), EXIT_REFUSED)
        self.config, self.hydra_context = config, hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(hydra_context=hydra_context,
                                                                task_function=task_function, config=config)

    def sweep(self, arguments: List[str]) -> Any:
        from hydra.core.override_parser.overrides_parser import OverridesParser

        assert self.launcher is not None and self.hydra_context is not None
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        overrides = parser.parse_overrides([f"{k}={v}" for k, v in self.params.items()] + list(arguments))
        return [self.launcher.launch(expand(overrides), initial_job_idx=0)]


class _RunnerLauncher(Launcher):
    def setup(self, *, hydra_context: Any, task_function: Any, config: DictConfig) -> None:
        refuse_others(config)
        self.hydra_context, self.config = hydra_context, config

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from runner.execution import sweep

        records = sweep.launch(self.config, self.hydra_context.config_loader, job_overrides, initial_job_idx,
                               self.pool())
        return [_returned(record, str(self.config.hydra.job.name)) for record in records]

    def pool(self) -> Any:
        raise NotImplementedError


class LocalLauncher(_RunnerLauncher):
    """hydra/launcher=local (the default): the jobs one after another in this process, weights
    loaded once per (model, VRAM preset, dtype, device)."""

    def pool(self) -> Any:
        from runner.execution.sweep import LocalPool

        return LocalPool()


class RayLauncher(_RunnerLauncher):
    """hydra/launcher=ray: the jobs on a pool of long-lived Ray actors; its settings are checked
    before the sweep's folder is claimed."""

    def __init__(self, **settings: Any) -> None:  # Hydra passes hydra.launcher's keys: settings_of reads them
        super().__init__()

    def setup(self, *, hydra_context: Any, task_function: Any, config: DictConfig) -> None:
        from runner.execution.ray.settings import settings_of

        super().setup(hydra_context=hydra_context, task_function=task_function, config=config)
        try:
            self.settings = settings_of(config)
        except ConfigError as error:
            raise Stop(str(error), EXIT_REFUSED) from None

    def pool(self) -> Any:
        from runner.execution.ray.pool import RayPool

        return RayPool(self.settings)


def _returned(record: Any, task_name: str) -> JobReturn:
    """A job's JobReturn: completed, whatever its status (a failed job is the runner's to report)."""
    returned = JobReturn(overrides=list(record.overrides), working_dir=record.job_dir, task_name=task_name)
    returned.return_value = record
    returned.status = JobStatus.COMPLETED
    return returned
