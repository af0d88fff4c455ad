"""The Ray launcher's settings (hydra.launcher.*, docs/ray.md), written once: RaySettings is the
dataclass Hydra stores as `hydra/launcher=ray` (hydra_plugins/runner_ray_launcher adds its
`_target_`) and the one the pool reads; `settings_of` checks them before anything runs.
"""
# no `from __future__ import annotations`: Hydra's plugin scan builds its structured config from
# these fields, which needs their types as objects
import importlib.util
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

from omegaconf import DictConfig, OmegaConf

from ...errors import ConfigError


@dataclass
class RaySettings:
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


def settings_of(config: DictConfig) -> RaySettings:
    """The launcher's settings, checked before anything runs (ConfigError naming the key)."""
    node = OmegaConf.to_container(config.hydra.launcher, resolve=True)
    node.pop("_target_", None)
    settings = RaySettings(**node)
    for key, least in (("num_workers", 1), ("threads_per_worker", 1), ("num_gpus_per_worker", 0),
                       ("max_retries", 0), ("start_timeout_s", 1)):
        value = getattr(settings, key)
        if value is not None and value < least:
            default = key in ("num_workers", "threads_per_worker", "num_gpus_per_worker")
            raise ConfigError(f"hydra.launcher.{key}", f"{value} is below {least}",
                              f"give {least} or more{', or null for the default' if default else ''}")
    if settings.address is not None and not str(settings.address).strip():
        raise ConfigError("hydra.launcher.address", "is empty", "give `auto`, HOST:6379, ray://HOST:10001, or null")
    if importlib.util.find_spec("ray") is None:
        raise ConfigError("hydra/launcher", "ray is not installed in this environment",
                          'install it with `pip install -e ".[ray]"`, or leave hydra/launcher at its default')
    return settings
