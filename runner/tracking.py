"""MLflow tracking: one run per job; a parent run per sweep with a nested child per job.

Everything goes through an explicit `MlflowClient` (no fluent active-run stack), so runs
opened in Hydra callbacks, in jobs and in the exit path cannot get mixed up, and every run
is ended with an explicit status: FINISHED, FAILED or KILLED.

The default store is SQLite, `<store_dir>/mlflow.db`, with the experiment's artifact
location set explicitly to `<store_dir>/artifacts/<experiment>` (MLflow 3 refuses the plain
file store, and a SQLite store would otherwise put artifacts in ./mlruns of whatever folder
the run started from).
"""
from __future__ import annotations

import logging
import re
import time
from pathlib import Path
from typing import Any, Mapping, Optional

from .spec import TrackingSpec

logger = logging.getLogger(__name__)

FINISHED, FAILED, KILLED = "FINISHED", "FAILED", "KILLED"
CONFIG_HASH_TAG = "runner.config_hash"
MAX_PARAM_LEN = 6000
MAX_TAG_LEN = 5000
_BATCH = 100


def store_uri(spec: TrackingSpec) -> str:
    if spec.uri:
        return spec.uri
    db = Path(spec.store_dir).resolve() / "mlflow.db"
    return f"sqlite:///{db}"


def default_artifact_location(spec: TrackingSpec, experiment: str) -> Optional[str]:
    """Beside the store for SQLite; None (the server decides) for a tracking server."""
    if spec.artifact_location:
        loc = spec.artifact_location
        return loc if "://" in loc or loc.startswith("mlflow-artifacts:") else Path(loc).resolve().as_uri()
    uri = store_uri(spec)
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):])
        safe = re.sub(r"[^A-Za-z0-9._-]+", "_", experiment) or "experiment"
        return (db.parent / "artifacts" / safe).resolve().as_uri()
    return None


class Tracker:
    """An MLflow experiment in one store."""

    def __init__(self, spec: TrackingSpec, experiment: str) -> None:
        from mlflow import MlflowClient

        self.spec = spec
        self.uri = store_uri(spec)
        if self.uri.startswith("sqlite:///"):
            Path(self.uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
        self.client = MlflowClient(tracking_uri=self.uri)
        self.experiment_name = experiment
        self.experiment_id = self._experiment(experiment)
        self.open_runs: set[str] = set()

    def _experiment(self, name: str) -> str:
        from mlflow.exceptions import MlflowException

        found = self.client.get_experiment_by_name(name)
        if found is not None:
            if found.lifecycle_stage == "deleted":
                raise RuntimeError(
                    f"The MLflow experiment {name!r} in {self.uri} is deleted: restore it in the UI, "
                    f"or pick another name with experiment=..."
                )
            return found.experiment_id
        location = default_artifact_location(self.spec, name)
        try:
            return self.client.create_experiment(name, artifact_location=location)
        except MlflowException:  # created meanwhile by a parallel job
            found = self.client.get_experiment_by_name(name)
            if found is None:
                raise
            return found.experiment_id

    # ---------------------------------------------------------------- runs

    def start_run(self, name: str, tags: Mapping[str, Any], parent_id: Optional[str] = None) -> str:
        tags = {k: _clip(str(v), MAX_TAG_LEN) for k, v in tags.items() if v is not None}
        if parent_id:
            tags["mlflow.parentRunId"] = parent_id
        run = self.client.create_run(self.experiment_id, tags=tags, run_name=name)
        run_id = run.info.run_id
        self.open_runs.add(run_id)
        return run_id

    def end_run(self, run_id: str, status: str) -> None:
        if run_id not in self.open_runs:
            return
        self.client.set_terminated(run_id, status=status)
        self.open_runs.discard(run_id)

    def end_all(self, status: str) -> None:
        """Safety net: end every run this process opened and did not end."""
        for run_id in list(self.open_runs):
            try:
                self.end_run(run_id, status)
            except Exception:  # noqa: BLE001 - keep ending the others
                logger.exception("Could not end MLflow run %s", run_id)

    def log_batch(self, run_id: str, metrics: Optional[Mapping[str, float]] = None,
                  params: Optional[Mapping[str, Any]] = None, tags: Optional[Mapping[str, Any]] = None,
                  step: int = 0) -> None:
        """Metrics, params and tags in as few store round trips as MLflow allows (100 params,
        100 tags, 1000 metrics per call)."""
        from mlflow.entities import Metric, Param, RunTag

        now = int(time.time() * 1000)
        m = [Metric(k, float(v), now, step) for k, v in (metrics or {}).items() if v is not None]
        p = [Param(k, _clip(_param_str(v), MAX_PARAM_LEN)) for k, v in (params or {}).items()]
        t = [RunTag(k, _clip(str(v), MAX_TAG_LEN)) for k, v in (tags or {}).items() if v is not None]
        while m or p or t:
            self.client.log_batch(run_id, metrics=m[:1000], params=p[:_BATCH], tags=t[:_BATCH])
            m, p, t = m[1000:], p[_BATCH:], t[_BATCH:]

    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        self.log_batch(run_id, params=params)

    def log_metrics(self, run_id: str, metrics: Mapping[str, float], step: int = 0) -> None:
        self.log_batch(run_id, metrics=metrics, step=step)

    def set_tags(self, run_id: str, tags: Mapping[str, Any]) -> None:
        self.log_batch(run_id, tags=tags)

    def log_image(self, run_id: str, image: Any, key: str) -> None:
        self.client.log_image(run_id, image, key=key, step=0, synchronous=True)

    def log_file(self, run_id: str, path: Path, artifact_path: Optional[str] = None) -> None:
        self.client.log_artifact(run_id, str(path), artifact_path)

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        self.client.log_text(run_id, text, artifact_file)

    # ---------------------------------------------------------------- queries

    def find_finished(self, config_hash: str) -> Optional[Any]:
        """The newest FINISHED run of this experiment with this config hash, or None."""
        runs = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`{CONFIG_HASH_TAG}` = '{config_hash}' and attributes.status = 'FINISHED'",
            max_results=1,
            order_by=["attributes.start_time DESC"],
        )
        return runs[0] if runs else None

    def download(self, run_id: str, artifact: str, dst: Path) -> Optional[Path]:
        try:
            dst.mkdir(parents=True, exist_ok=True)
            return Path(self.client.download_artifacts(run_id, artifact, str(dst)))
        except Exception as e:  # noqa: BLE001 - an image for the contact sheet is optional
            logger.warning("Could not fetch %s of run %s: %s", artifact, run_id, e)
            return None


def _param_str(value: Any) -> str:
    if hasattr(value, "value") and not isinstance(value, (str, int, float, bool)):
        value = value.value  # an Enum
    return "null" if value is None else str(value)


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}, "c": [x, y]} -> {"a.b": 1, "c.0": x, "c.1": y} (empty containers kept
    as "{}" / "[]" so a key never vanishes)."""
    out: dict[str, Any] = {}
    if isinstance(tree, Mapping):
        if not tree and prefix:
            out[prefix[:-1]] = "{}"
        for k, v in tree.items():
            out.update(flatten(v, f"{prefix}{k}."))
    elif isinstance(tree, (list, tuple)):
        if not tree and prefix:
            out[prefix[:-1]] = "[]"
        for i, v in enumerate(tree):
            out.update(flatten(v, f"{prefix}{i}."))
    else:
        out[prefix[:-1]] = tree
    return out


def provenance_tags(device: str) -> dict[str, str]:
    from .provenance import device_name, git_commit, package_versions

    tags = {f"versions.{k}": v for k, v in package_versions().items()}
    commit = git_commit()
    if commit:
        tags["git.commit"] = commit
        tags["mlflow.source.git.commit"] = commit
    tags["device.name"] = device_name(device)
    return tags


def fingerprint_tags(prefix: str, description: Mapping[str, Any]) -> dict[str, str]:
    files = "; ".join(f"{f['name']}:{f['size']}:{f['sha256'][:16]}" for f in description["files"])
    return {
        f"{prefix}.sha256": description["sha256"],
        f"{prefix}.bytes": str(description["bytes"]),
        f"{prefix}.files": files,
    }
