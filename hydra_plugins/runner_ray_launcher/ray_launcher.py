"""`hydra/launcher=ray`: the runner's sweeps on a pool of long-lived Ray actors.

    python -m runner -m hydra/launcher=ray seed=0:8 lora.alpha=0,0.5,1
    python -m runner -m hydra/launcher=ray hydra.launcher.address=auto ...   # join a running cluster

Registered the Hydra way: this namespace package (`hydra_plugins`, no __init__.py there) is
scanned by Hydra, which stores `RayLauncherConf` as option `ray` of group `hydra/launcher`.
Hydra never calls `launch` for the runner: the runner's sweep callback (runner.sweep) runs the
whole sweep and hands its checked JobPlans to runner.ray_pool when this launcher is selected.
Nothing here imports Ray: only a sweep that uses this launcher does (`pip install -e ".[ray]"`).
The keys are documented in docs/ray.md.
"""
# no `from __future__ import annotations`: Hydra runs this module before it is in sys.modules,
# where dataclasses cannot resolve string annotations
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Sequence

from hydra.core.config_store import ConfigStore
from hydra.plugins.launcher import Launcher


@dataclass
class RayLauncherConf:
    _target_: str = "hydra_plugins.runner_ray_launcher.ray_launcher.RunnerRayLauncher"
    # null: start a Ray runtime on this machine for the sweep (loopback only); `auto`: join the
    # cluster `ray start` runs here; `HOST:6379` or `ray://HOST:10001`: join that cluster
    address: Optional[str] = None
    # null: one per GPU (num_gpus_per_worker each) when the cluster has GPUs, else 1
    num_workers: Optional[int] = None
    # null: 1 when the cluster has GPUs, else 0 (CPU workers)
    num_gpus_per_worker: Optional[float] = None
    # torch threads of a worker, and the CPUs it reserves in Ray; null: the cluster's CPUs / num_workers
    threads_per_worker: Optional[int] = None
    # a job whose worker died (killed, out of memory, node lost) runs again this many times, then FAILED
    max_retries: int = 1
    # seconds to wait for a first worker to start (placed by Ray, torch imported); others join later
    start_timeout_s: float = 300.0
    # further keyword arguments of ray.init, e.g. {num_cpus: 8, object_store_memory: 2000000000}
    init: Dict[str, Any] = field(default_factory=dict)


ConfigStore.instance().store(group="hydra/launcher", name="ray", node=RayLauncherConf, provider="runner")


class RunnerRayLauncher(Launcher):
    """Selectable by name; the jobs are run by the runner's sweep loop (runner.ray_pool)."""

    def setup(self, *, hydra_context: Any, task_function: Any, config: Any) -> None:
        self.config = config

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Any:
        raise RuntimeError("hydra/launcher=ray runs the sweeps of `python -m runner` only: the runner's sweep "
                           "callback (hydra.callbacks.runner_sweep of conf/config.yaml) launches the jobs. Fix: keep "
                           "that callback, or use another launcher for other Hydra apps")
