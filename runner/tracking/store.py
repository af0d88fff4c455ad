"""MLflow tracking: one run per job; a parent run per sweep with a nested child per job.

Everything goes through an explicit `MlflowClient` (no fluent active-run stack), so runs
opened in Hydra callbacks, in jobs and in the exit path cannot get mixed up, and every run
is ended with an explicit status: FINISHED, FAILED or KILLED. During a run or sweep one
process of runner.tracking.writer owns the Tracker; `sync` and `cleanup` use it directly.

The default store is SQLite, `<store_dir>/mlflow.db`, with the experiment's artifact
location set explicitly to `<store_dir>/artifacts/<experiment>` (MLflow 3 refuses the plain
file store, and a SQLite store would otherwise put artifacts in ./mlruns of whatever folder
the run started from). Creating or migrating the SQLite store happens under a file lock
(`mlflow.db.lock`), so sweeps started together on a fresh store do not race MLflow's schema
migration. A tracking server is asked with a bounded timeout and few retries
(`tracking.request_timeout_s`, `tracking.request_retries`; MLflow's MLFLOW_HTTP_REQUEST_*
variables win when set), so an unreachable server costs seconds, not minutes.
"""
from __future__ import annotations

import errno
import logging
import os
import re
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Optional

from ..errors import ConfigError
from ..files import locked
from ..records import CONFIG_HASH_TAG, RECORD_TAG

if TYPE_CHECKING:  # no torch in the MLflow writer process: a TrackingSpec or any object with its fields
    from ..config.schema import TrackingSpec

logger = logging.getLogger(__name__)

MAX_PARAM_LEN = 6000
MAX_TAG_LEN = 5000
_BATCH = 100
# the kind MLflow gives training experiments; its 3.17 UI still opens on the GenAI pages (the mode
# comes from the URL or the browser's last choice), hence the "Model training" click in ui_hint
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"
_UNREACHABLE = re.compile(r"failed with (timeout )?exception|Max retries exceeded|Connection (refused|reset|aborted)|"
                          r"timed out|Name or service not known|Temporary failure in name resolution", re.I)


def store_uri(spec: TrackingSpec) -> str:
    if spec.uri:
        return spec.uri
    db = Path(spec.store_dir).resolve() / "mlflow.db"
    return f"sqlite:///{db}"


def ui_hint(uri: str) -> str:
    """How to look at a store's runs in MLflow's UI (the runs view, not the GenAI overview)."""
    clicks = "click Model training (top left), Experiments, the experiment"
    if uri.startswith(("http://", "https://")):
        return f"open {uri.rstrip('/')}, {clicks}"
    return f"mlflow ui --backend-store-uri {uri}, open http://127.0.0.1:5000, {clicks}"


def is_unreachable(error: BaseException) -> bool:
    """A failure to reach the store at all (a dead or hung server), as opposed to one request
    the store refused."""
    try:
        import requests

        if isinstance(error, (requests.ConnectionError, requests.Timeout)):
            return True
    except ImportError:  # pragma: no cover - mlflow depends on requests
        pass
    return bool(_UNREACHABLE.search(str(error)))


_READ_ONLY = re.compile(r"readonly database|read-only file system|permission denied|\[errno (1|13|30)\]", re.I)
_FULL = re.compile(r"database or disk is full|no space left on device|disk quota exceeded|\[errno (28|122)\]", re.I)


def store_problem(error: BaseException, store: str) -> tuple[str, str]:
    """(what is wrong with the MLflow store `store`, how to fix it), for an error MLflow raised
    (its SQLAlchemy or OS error is the message, or the cause)."""
    text = f"{error} {error.__cause__ or ''}"
    code = getattr(error, "errno", None)
    elsewhere = "or point tracking.store_dir (or tracking.uri) elsewhere"
    if code in (errno.EROFS, errno.EACCES, errno.EPERM) or _READ_ONLY.search(text):
        return "cannot be written (read-only)", f"make {store} writable, {elsewhere}"
    if code in (errno.ENOSPC, errno.EDQUOT) or _FULL.search(text):
        return "is full", f"free space on the file system of {store}, {elsewhere}"
    if is_unreachable(error):
        return "cannot be reached", "start the tracking server (or fix tracking.uri), or use tracking=none"
    return "refused a request", f"check the store with `mlflow ui`, {elsewhere}"


class _NoStoreTraceback(logging.Filter):
    """MLflow logs a SQLAlchemy error's whole traceback before raising it (a read-only or full
    SQLite store); the runner reports the error it raises, in one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("SQLAlchemy database error")


def quiet_store_errors() -> None:
    db_log = logging.getLogger("mlflow.store.db.utils")
    if not any(isinstance(f, _NoStoreTraceback) for f in db_log.filters):
        db_log.addFilter(_NoStoreTraceback())


def configure_http(spec: TrackingSpec) -> None:
    """Bound the time MLflow's HTTP client spends on one request (its defaults: 120 s timeout,
    7 retries with exponential backoff: minutes on a dead server)."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(int(max(1, spec.request_timeout_s))))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", str(max(0, spec.request_retries)))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_JITTER", "0.2")
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # the runner logs its own lines


def sqlite_path(uri: str) -> Optional[Path]:
    """The database file of a `sqlite:///PATH` store, None for any other store."""
    return Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None


@contextmanager
def store_lock(uri: str) -> Iterator[None]:
    """Exclusive access to a SQLite store's file while it is created or migrated."""
    db = sqlite_path(uri)
    if db is None:
        yield
        return
    with locked(db):
        yield


def deleted_experiment(name: str, experiment_id: str, uri: str) -> ConfigError:
    return ConfigError("experiment", f"the MLflow experiment {name!r} (id {experiment_id}) in {uri} is deleted",
                       f"restore it with `MLFLOW_TRACKING_URI={uri} mlflow experiments restore --experiment-id "
                       f"{experiment_id}`, or pick another name with experiment=...")


def check_sqlite_experiment(uri: str, name: str) -> Optional[bool]:
    """Whether a SQLite store can take runs of experiment `name` (False: it is deleted, raised as
    ConfigError), read with Python's sqlite3 in milliseconds; None when this cannot tell (another
    store, no database yet, another schema): the MLflow writer decides. Importing MLflow and
    opening its store takes ~5 s here, which a run spends loading its weights meanwhile."""
    db = sqlite_path(uri)
    if db is None:
        return None
    import sqlite3
    from contextlib import closing

    if not db.is_file():
        return True
    try:
        with closing(sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True, timeout=10)) as con:
            row = con.execute("SELECT experiment_id, lifecycle_stage FROM experiments WHERE name = ?",
                              (name,)).fetchone()
    except sqlite3.Error:
        return None
    if row is not None and row[1] == "deleted":
        raise deleted_experiment(name, str(row[0]), uri)
    return True


def default_artifact_location(spec: TrackingSpec, experiment: str) -> Optional[str]:
    """Beside the store for SQLite; None (the server decides) for a tracking server."""
    if spec.artifact_location:
        loc = spec.artifact_location
        return loc if "://" in loc or loc.startswith("mlflow-artifacts:") else Path(loc).resolve().as_uri()
    db = sqlite_path(store_uri(spec))
    if db is not None:
        safe = re.sub(r"[^A-Za-z0-9._-]+", "_", experiment) or "experiment"
        return (db.parent / "artifacts" / safe).resolve().as_uri()
    return None


class Tracker:
    """An MLflow experiment in one store. Raises ConfigError for a deleted experiment, and
    whatever MLflow raises when the store cannot be reached (see `is_unreachable`)."""

    def __init__(self, spec: TrackingSpec, experiment: str) -> None:
        from mlflow import MlflowClient

        self.spec = spec
        self.uri = store_uri(spec)
        if self.uri.startswith(("http://", "https://")):
            configure_http(spec)
        self.experiment_name = experiment
        quiet_store_errors()
        with store_lock(self.uri):  # the first request creates or migrates a SQLite store
            self.client = MlflowClient(tracking_uri=self.uri)
            self.experiment_id = self._experiment(experiment)
            self._mark_kind()
        self.open_runs: set[str] = set()
        self._artifact_uris: dict[str, str] = {}  # run -> its artifact location, from the run's creation

    def _experiment(self, name: str) -> str:
        from mlflow.exceptions import MlflowException

        found = self.client.get_experiment_by_name(name)
        if found is not None:
            if found.lifecycle_stage == "deleted":
                raise deleted_experiment(name, found.experiment_id, self.uri)
            return found.experiment_id
        location = default_artifact_location(self.spec, name)
        try:
            return self.client.create_experiment(name, artifact_location=location)
        except MlflowException:  # created meanwhile by another process
            found = self.client.get_experiment_by_name(name)
            if found is None:
                raise
            return found.experiment_id

    def _mark_kind(self) -> None:
        """Tag the experiment as model development unless someone chose its kind in the UI."""
        tags = self.client.get_experiment(self.experiment_id).tags
        if EXPERIMENT_KIND_TAG not in tags:
            self.client.set_experiment_tag(self.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)

    # ---------------------------------------------------------------- runs

    def start_run(self, name: str, tags: Mapping[str, Any], parent_id: Optional[str] = None,
                  start_time: Optional[float] = None) -> str:
        """A new RUNNING run; `start_time` in epoch seconds (default: now)."""
        tags = {k: _clip(str(v), MAX_TAG_LEN) for k, v in tags.items() if v is not None}
        if parent_id:
            tags["mlflow.parentRunId"] = parent_id
        start_ms = int(start_time * 1000) if start_time is not None else None
        run = self.client.create_run(self.experiment_id, tags=tags, run_name=name, start_time=start_ms)
        run_id = run.info.run_id
        self.open_runs.add(run_id)
        self._artifact_uris[run_id] = run.info.artifact_uri
        return run_id

    def end_run(self, run_id: str, status: str, end_time: Optional[float] = None, force: bool = False) -> None:
        """End a run this tracker opened (or any run, with force=True); `end_time` in epoch seconds."""
        if run_id not in self.open_runs and not force:
            return
        end_ms = int(end_time * 1000) if end_time is not None else None
        self.client.set_terminated(run_id, status=status, end_time=end_ms)
        self.open_runs.discard(run_id)

    def end_all(self, status: str) -> None:
        """Safety net: end every run this process opened and did not end."""
        for run_id in list(self.open_runs):
            try:
                self.end_run(run_id, status)
            except Exception as error:  # noqa: BLE001 - keep ending the others
                logger.error("Could not end MLflow run %s: %s", run_id, error)

    def log_batch(self, run_id: str, metrics: Optional[Mapping[str, float]] = None,
                  params: Optional[Mapping[str, Any]] = None, tags: Optional[Mapping[str, Any]] = None,
                  step: int = 0) -> None:
        """Metrics, params and tags in as few store round trips as MLflow allows (100 params,
        100 tags, 1000 metrics per call)."""
        from mlflow.entities import Metric, Param, RunTag

        now = int(time.time() * 1000)
        m = [Metric(k, float(v), now, step) for k, v in (metrics or {}).items() if v is not None]
        p = [Param(k, clip_param(_param_str(v))) for k, v in (params or {}).items()]
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

    def _artifact_repo(self, run_id: str) -> Any:
        """The run's artifact store; for a run this tracker created, without the store lookup
        MlflowClient makes for each run it has not seen (~6 ms of a job's ~80 on SQLite)."""
        uri = self._artifact_uris.get(run_id)
        if uri is None:
            return None
        from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

        return get_artifact_repository(uri, tracking_uri=self.uri)

    def log_file(self, run_id: str, path: Path, artifact_path: Optional[str] = None) -> None:
        repo = self._artifact_repo(run_id)
        if repo is None:
            self.client.log_artifact(run_id, str(path), artifact_path)
        else:
            repo.log_artifact(str(path), artifact_path)

    def log_dir(self, run_id: str, folder: Path, artifact_path: Optional[str] = None) -> None:
        """Every file under `folder`, in one request to the artifact store."""
        repo = self._artifact_repo(run_id)
        if repo is None:
            self.client.log_artifacts(run_id, str(folder), artifact_path)
        else:
            repo.log_artifacts(str(folder), artifact_path)

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

    def runs_of_record(self, record_id: str) -> list[Any]:
        """The runs logged for one job or sweep record (tag runner.record_id)."""
        return list(self.client.search_runs([self.experiment_id], filter_string=f"tags.`{RECORD_TAG}` = '{record_id}'",
                                            max_results=100))

    def running_runs(self) -> list[Any]:
        """Every RUNNING run of the experiment."""
        found, token = [], None
        while True:
            page = self.client.search_runs([self.experiment_id], filter_string="attributes.status = 'RUNNING'",
                                           max_results=1000, page_token=token)
            found.extend(page)
            token = page.token
            if not token:
                return found

    def download(self, run_id: str, artifact: str, dst: Path) -> Optional[Path]:
        try:
            dst.mkdir(parents=True, exist_ok=True)
            return Path(self.client.download_artifacts(run_id, artifact, str(dst)))
        except Exception as e:  # noqa: BLE001 - an image for the grid is optional (its cell is marked)
            logger.warning("Could not fetch %s of run %s: %s", artifact, run_id, e)
            return None


def _param_str(value: Any) -> str:
    if hasattr(value, "value") and not isinstance(value, (str, int, float, bool)):
        value = value.value  # an Enum
    return "null" if value is None else str(value)


def clip_param(text: str) -> str:
    """A param's value within MLflow's limit (MAX_PARAM_LEN characters); a longer one (a long
    prompt) is cut with a note saying so and where the whole text is."""
    if len(text) <= MAX_PARAM_LEN:
        return text
    note = (f" … (cut: {len(text)} characters, MLflow keeps {MAX_PARAM_LEN}; the whole text is in the job's "
            "config.yaml and its image.png)")
    return text[: MAX_PARAM_LEN - len(note)] + note


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
