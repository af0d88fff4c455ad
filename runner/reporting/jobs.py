"""The jobs a report shows (GridJob), read from a sweep folder (its jobs.csv, else its job
folders' job.json) or from the records of a sweep that just ended; how a folder maps onto them:
docs/report.md.
"""
from __future__ import annotations

import csv
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

from omegaconf import OmegaConf

from ..files import inside
from ..records import FINISHED, METRICS, SKIPPED, JobRecord, RecordError, read_generation, split_override, swept_keys

OK_STATUSES = (FINISHED, SKIPPED)  # a skipped job (resume) shows the image of its earlier run
_FIXED_COLUMNS = {"job", "status", "run_id", "overrides", "image", "error", "tracked", *METRICS}


class ReportError(Exception):
    """A problem to report as one line (exit status 2 from the command)."""


def number(value: Any) -> Optional[float]:
    """`value` as a finite float, or None (not a number, bool, inf or nan)."""
    if value is None or isinstance(value, bool):
        return None
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


@dataclass
class GridJob:
    num: int
    values: dict[str, str]  # swept key -> value as written in the override
    status: str = FINISHED
    image_path: Optional[Path] = None
    metrics: dict[str, float] = field(default_factory=dict)
    error: str = ""
    run_id: str = ""
    overrides: str = ""
    generation: Optional[dict[str, Any]] = None  # the PNG's `generation` chunk; read on demand

    def gen(self) -> dict[str, Any]:
        """The image's generation parameters (prompt, seed, steps, ...), {} without an image."""
        if self.generation is None:
            self.generation = {}
            if self.image_path is not None and Path(self.image_path).is_file():
                try:
                    self.generation = read_generation(Path(self.image_path))
                except Exception:  # noqa: BLE001 - not our PNG, or no chunk: only the header misses it
                    pass
        return self.generation

    @property
    def ok(self) -> bool:
        return self.status in OK_STATUSES and self.image_path is not None and Path(self.image_path).is_file()

    @property
    def seed(self) -> str:
        if "seed" in self.values and self.values["seed"] not in ("", "null"):
            return self.values["seed"]
        value = self.gen().get("seed")
        return "" if value is None else str(value)

    @property
    def steps(self) -> Optional[float]:
        value = self.gen().get("steps")
        if value is None:
            for key, v in self.values.items():
                if key.rsplit(".", 1)[-1] == "steps":
                    value = v
                    break
        return number(value)

    def label(self, keys: Sequence[str]) -> str:
        return " ".join(f"{k}={self.values.get(k, '')}" for k in keys) or f"job {self.num}"


class JobList(list):
    """A list of GridJob that also knows the sweep's swept keys (in order), title and overrides."""

    def __init__(self, jobs: Iterable[GridJob] = (), keys: Optional[Sequence[str]] = None,
                 title: str = "", overrides: Sequence[str] = ()) -> None:
        super().__init__(sorted(jobs, key=lambda j: j.num))
        self.keys = list(keys) if keys is not None else keys_in_order(self)
        self.title = title
        self.overrides = list(overrides)


def keys_in_order(jobs: Iterable[GridJob]) -> list[str]:
    keys: list[str] = []
    for job in jobs:
        keys.extend(k for k in job.values if k not in keys)
    return keys


def jobs_from_records(records: Sequence[Any], overrides: Sequence[str] = (), title: str = "") -> JobList:
    """From JobRecords (a sweep that just ended): the swept keys are `swept_keys(records)`, the
    same columns as `jobs.csv`."""
    keys = swept_keys(records)
    jobs = []
    for r in records:
        wanted = dict(split_override(o) for o in r.overrides)
        jobs.append(GridJob(
            num=int(r.num), values={k: wanted.get(k, "") for k in keys}, status=r.status,
            image_path=Path(r.image_path) if r.image_path else None, metrics=dict(r.metrics),
            error=r.error or "", run_id=r.run_id or "", overrides=" ".join(r.overrides)))
    return JobList(jobs, keys, title, overrides)


def _say(text: str) -> None:
    print(f"report: {text}", file=sys.stderr)


def jobs_from_sweep_dir(path: Path) -> JobList:
    """A sweep folder: its `jobs.csv` and each job's `image.png`; without a readable jobs.csv
    (missing: a full disk at the sweep's end; not UTF-8), its job folders' job.json and
    image.png. Nothing outside the folder is read (a picture named elsewhere is left out, and
    said)."""
    path = Path(path)
    if not path.is_dir():
        raise ReportError(f"no sweep folder {path}")
    table = path / "jobs.csv"
    if not table.is_file():
        jobs = _jobs_from_job_folders(path)
        if not jobs:
            raise ReportError(f"{path} has no jobs.csv (a sweep writes it into its folder when it ends) and no job "
                              "folder with a job.json")
        _say(f"{table} is missing: rebuilt from the {len(jobs)} job folders' job.json and image.png")
        return jobs
    _own(path, table)
    try:
        with open(table, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            header = list(reader.fieldnames or [])
            rows = list(reader)
    except UnicodeDecodeError as error:
        jobs = _jobs_from_job_folders(path)
        if not jobs:
            raise ReportError(f"{table} is not UTF-8 text (byte {error.start}) and {path} has no job folder with a "
                              "job.json to rebuild it from") from None
        _say(f"{table} is not UTF-8 text (byte {error.start}): rebuilt from the job folders' job.json instead")
        return jobs
    return _jobs_from_table(path, table, header, rows)


def _jobs_from_table(path: Path, table: Path, header: list[str], rows: list[dict]) -> JobList:
    if "job" not in header or "status" not in header:
        raise ReportError(f"{table} is not a sweep's job table (no job/status columns)")
    keys = [c for c in header if c not in _FIXED_COLUMNS]
    jobs, outside = [], []
    for i, row in enumerate(rows):
        try:
            num = int(row["job"])
        except (TypeError, ValueError):
            raise ReportError(f"{table}, row {i + 2}: job number {row.get('job')!r} is not a number") from None
        metrics = {}
        for m in METRICS:
            value = number(row.get(m))
            if value is not None:
                metrics[m] = value
        jobs.append(GridJob(
            num=num, values={k: row.get(k) or "" for k in keys}, status=row.get("status") or "",
            image_path=_find_image(path, row.get("image") or "", path / str(num) / "image.png", outside),
            metrics=metrics,
            error=row.get("error") or "", run_id=row.get("run_id") or "", overrides=row.get("overrides") or ""))
    _say_outside(table, outside)
    return JobList(jobs, keys, _title_of_dir(path), _sweep_overrides(path))


def _jobs_from_job_folders(path: Path) -> JobList:
    """The jobs of a sweep folder from `<job>/job.json` (a malformed one: ReportError naming it)."""
    records, outside = [], []
    for record_file in sorted(path.glob("*/job.json")):
        _own(path, record_file)
        try:
            record = JobRecord.read(record_file)
        except RecordError as error:
            raise ReportError(str(error)) from None
        recorded = record.image_path or ""
        if recorded and record.job_dir and Path(recorded).is_relative_to(record.job_dir):
            recorded = str(record_file.parent / Path(recorded).relative_to(record.job_dir))  # a moved folder
        image = _find_image(path, recorded, record_file.parent / "image.png", outside, base=record_file.parent)
        record.image_path = str(image) if image is not None else None
        records.append(record)
    _say_outside(path / "*/job.json", outside)
    return jobs_from_records(records, _sweep_overrides(path), _title_of_dir(path))


def _own(path: Path, file: Path) -> None:
    if inside(path, file) is None:
        raise ReportError(f"{file} leads to {file.resolve()}, outside the sweep folder: refused")


def _find_image(root: Path, recorded: str, fallback: Path, outside: list[str],
                base: Optional[Path] = None) -> Optional[Path]:
    """A job's picture: the one recorded (relative to `base`, default `root`) when it lies in the
    sweep folder `root` (links resolved), else `fallback` (its folder's image.png) when that does;
    a recorded picture outside is never read (it is listed in `outside`)."""
    if recorded:
        p = inside(root, recorded, base)
        if p is None:
            outside.append(recorded)
        elif p.is_file():
            return p
    p = inside(root, fallback)
    return p if p is not None and p.is_file() else None


def _say_outside(where: Path, outside: list[str]) -> None:
    if outside:
        _say(f"{where} names {len(outside)} picture(s) outside the sweep folder ({outside[0]!r}"
             f"{', ...' if len(outside) > 1 else ''}): not read; a job folder's own image.png is shown instead "
             "where there is one")


def _title_of_dir(path: Path) -> str:
    path = path.resolve()
    return f"Sweep {path.parent.name}/{path.name}" if path.parent.name else f"Sweep {path.name}"


def _sweep_overrides(path: Path) -> list[str]:
    """The sweep's command-line overrides, from Hydra's `multirun.yaml` when it is there."""
    if inside(path, "multirun.yaml") is None:  # a link out of the folder: not read
        return []
    try:
        cfg = OmegaConf.load(path / "multirun.yaml")
        # unresolved: a folder's `${oc.env:...}` must not pull this machine's variables into the report
        return [str(o) for o in OmegaConf.to_container(cfg.hydra.overrides.task, resolve=False)]
    except Exception:  # noqa: BLE001 - only the report's header misses them
        return []
