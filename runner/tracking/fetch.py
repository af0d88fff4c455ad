"""A sweep's jobs fetched back from MLflow for `report --run`: the parent run's children written
into a folder laid out as a sweep leaves it (each job's image.png and job.json, the jobs.csv
a report reads), so that the report is made from the folder like `report DIR`; and the rebuilt
files logged back onto the parent run, beside its own.
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

from ..errors import first_line
from ..files import atomic_write
from ..records import (
    INPUTS_DIR,
    METRICS,
    OVERRIDES_JSON_TAG,
    RECORD_TAG,
    JobRecord,
    input_copy_name,
    split_override,
    write_table,
)
from .store import sqlite_path

logger = logging.getLogger("runner")

_OVERRIDE_START = re.compile(r"^(\+{0,2}[A-Za-z_][\w.\-/@]*=|~[A-Za-z_][\w.\-/@]*(=|$))")


class FetchError(Exception):
    """No such store, run or sweep: the message says which and what to give instead."""


@dataclass
class FetchedSweep:
    folder: Path  # the jobs as a sweep folder: <job>/image.png, <job>/job.json, jobs.csv
    title: str  # the parent run's name
    overrides: list[str]  # the sweep's command-line overrides


def fetch_sweep(tracking_uri: str, parent_run_id: str, dst: Path) -> FetchedSweep:
    """The children of a sweep's parent run (tag `mlflow.parentRunId`) into `dst`: their status,
    timing metrics, `runner.error` and image.png. The swept keys (the columns of jobs.csv) are the
    parent's tag `runner.swept_keys`, else the override keys (tag `runner.overrides`) that differ
    between children, else the params that differ. FetchError when there is no such run or it
    has no children."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    db = sqlite_path(tracking_uri)
    if db is not None and not db.is_file():  # MLflow would create an empty store there
        raise FetchError(f"no MLflow store {db}: give the store of the sweep with --tracking-uri sqlite:///PATH "
                         "(a sweep prints it when it starts)")
    client = MlflowClient(tracking_uri=tracking_uri)
    try:
        parent = client.get_run(parent_run_id)
    except MlflowException as e:
        raise FetchError(f"no MLflow run {parent_run_id} in {tracking_uri}: {first_line(e)}") from None
    children = _children(client, parent)
    if not children:
        raise FetchError(f"MLflow run {parent_run_id} in {tracking_uri} has no child runs: give the parent run of "
                         "a sweep (the run named `sweep ...`)")
    overrides = [dict(split_override(o) for o in overrides_of(c.data.tags)) for c in children]
    keys = parent.data.tags.get("runner.swept_keys", "").split()
    if not keys:
        keys = _differing(overrides) or _differing([dict(c.data.params) for c in children])
    dst = Path(dst)
    records = [_record(client, child, i, keys, dst) for i, child in enumerate(children)]
    write_table(records, dst / "jobs.csv", keys)
    _fetch_inputs(client, parent.info.run_id, dst)
    return FetchedSweep(dst, parent.info.run_name or f"Sweep {parent_run_id}", overrides_of(parent.data.tags))


def _children(client: Any, parent: Any) -> list[Any]:
    children, token = [], None
    while True:
        page = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'",
                                  max_results=1000, page_token=token, order_by=["attributes.start_time ASC"])
        children.extend(page)
        token = page.token
        if not token:
            return children


def _record(client: Any, child: Any, index: int, keys: Sequence[str], dst: Path) -> JobRecord:
    """A child run as the job record a sweep would have left, its image fetched into `dst/<job>/`."""
    tags = child.data.tags
    try:
        num = int(tags.get("runner.job_num", index))
    except ValueError:
        num = index
    folder = dst / str(num)
    folder.mkdir(parents=True, exist_ok=True)
    record = JobRecord(num=num, overrides=overrides_of(tags), status=child.info.status, run_id=child.info.run_id,
                       metrics={k: float(v) for k, v in child.data.metrics.items() if k in METRICS},
                       error=tags.get("runner.error", ""), job_dir=str(folder), name=child.info.run_name or "",
                       params={k: v for k, v in child.data.params.items() if k in keys})
    if tags.get(RECORD_TAG):
        record.record_id = tags[RECORD_TAG]
    try:
        if any(a.path == "image.png" for a in client.list_artifacts(child.info.run_id)):
            record.image_path = client.download_artifacts(child.info.run_id, "image.png", str(folder))
    except Exception as e:  # noqa: BLE001 - that cell shows no image
        logger.warning("report: could not fetch image.png of run %s: %s", child.info.run_id, e)
    record.write(folder / "job.json")
    return record


def _fetch_inputs(client: Any, run_id: str, dst: Path) -> None:
    """The pictures the jobs read, from the parent run's `inputs/`, into `dst/inputs/` named by
    their sha256 as a sweep keeps them (the report shows them beside the results)."""
    try:
        artifacts = [a for a in client.list_artifacts(run_id, INPUTS_DIR) if not a.is_dir]
        with tempfile.TemporaryDirectory(prefix="runner-inputs-") as tmp:
            for artifact in artifacts:
                data = Path(client.download_artifacts(run_id, artifact.path, tmp)).read_bytes()
                target = dst / INPUTS_DIR / input_copy_name(hashlib.sha256(data).hexdigest(), artifact.path)
                target.parent.mkdir(parents=True, exist_ok=True)
                atomic_write(target, lambda path, data=data: path.write_bytes(data))
    except Exception as e:  # noqa: BLE001 - the page only misses the input pictures
        logger.warning("report: could not fetch the input pictures of run %s: %s", run_id, first_line(e))


def split_overrides(text: str) -> list[str]:
    """`runner.overrides` tags are the overrides joined by spaces; a value may hold spaces
    (`prompt=a red fox`): a word that does not start like `key=` continues the one before."""
    out: list[str] = []
    for word in text.split(" "):
        if out and not _OVERRIDE_START.match(word):
            out[-1] += " " + word
        elif word:
            out.append(word)
    return out


def overrides_of(tags: Mapping[str, str]) -> list[str]:
    """A run's overrides: the JSON list of its tag runner.overrides_json, else (a run logged
    before it existed) its tag runner.overrides split where a word starts like `key=`."""
    try:
        found = json.loads(tags[OVERRIDES_JSON_TAG])
        if isinstance(found, list) and all(isinstance(o, str) for o in found):
            return found
    except (KeyError, ValueError):
        pass
    return split_overrides(tags.get("runner.overrides", ""))


def _differing(dicts: Sequence[Mapping[str, Any]]) -> list[str]:
    order: list[str] = []
    seen: dict[str, set] = {}
    for d in dicts:
        for k, v in d.items():
            if k not in seen:
                seen[k] = set()
                order.append(k)
            seen[k].add(str(v))
    for d in dicts:  # absent in some = a different value too
        for k in order:
            if k not in d:
                seen[k].add("\0absent")
    return [k for k in order if len(seen[k]) > 1]


def log_files(tracking_uri: str, run_id: str, files: Iterable[Path]) -> Optional[str]:
    """`files` onto the run `run_id`, beside its own artifacts (never over them: a rebuild's files are
    named by their axes). None when logged, else what went wrong, in one line."""
    from mlflow import MlflowClient

    try:
        client = MlflowClient(tracking_uri=tracking_uri)
        for path in files:
            client.log_artifact(run_id, str(path))
    except Exception as e:  # noqa: BLE001 - one line: the files are written, only their upload failed
        return first_line(e)
    return None
