"""Comparing the jobs of a sweep: an X/Y(/Z) grid of their images and a self-contained HTML
report, rebuilt from a finished sweep folder (`jobs.csv`), from MLflow, or from the job records
of a running sweep.

    python -m runner report SWEEP_DIR [x=KEY] [y=KEY] [z=KEY] [thumb=N] [title=TEXT]

Axes
    Columns (x) are one swept key, rows (y) another, and each value of a third (z) gets its own
    page. By default x is the key with the most values, y the next and z the third (ties keep the
    sweep's order). Any axis can be named (`x=lora.alpha`) or switched off (`x=none`); the
    defaults then fill the axes left unnamed from the remaining keys. Keys with one value across
    all jobs are constants: they head the report, never an axis.

    A sweep of 4+ keys: every swept key that is not x or y makes pages, so each page is one
    combination of z and the remaining keys (only the combinations that ran). Each cell then
    holds exactly one job; showing several jobs per cell "compactly" would make a cell
    ambiguous, and page titles name every remaining value. (`z=none` keeps the fourth+ keys as
    pages; it only stops the default from picking a z.) Two jobs with identical values (a rerun)
    share a cell: the later job number is shown.

    Values sort numerically when every value of the key is a number, else they keep the order of
    the sweep. Labels are written once: column values on top, row values on the left, the page's
    values as its title. A label too long for its cell is shortened on the part it shares with
    its siblings (the left, then the middle), so the part that differs stays visible
    (`…/loras/style_v2.safetensors`). Failed / killed / never-finished jobs are grey cells with
    their status and the first line of their error; a combination without a job is an empty cell.

Output (in the sweep folder)
    `grid.png`, or `grid_<z>=<value>.png` per page (several page keys: joined by `_`), and
    `report.html`, written by the sweep. `python -m runner report` names its files by their axes
    (`grid_x=seed_y=lora.alpha[_<page>].png`, `report_x=seed_y=lora.alpha.html`): it never
    replaces or deletes the sweep's files or those of a rebuild with other axes (the same axes
    again replace their own files, atomically). The report page: one
    file with no external resources (a CSP forbids any), fine inside MLflow's sandboxed
    artifact viewer: the grids (click a thumbnail for the full-size image), plots as inline SVG
    (seconds per step vs steps, time per phase, peak memory), and a table of the jobs sortable
    by any column.

Mapping of `jobs.csv` / `runner.report.JobRecord` onto `GridJob`: job/num -> num, the swept-key
columns (between `run_id` and `overrides`) / the record's overrides of the swept keys -> values,
status, run_id, error, metrics (the METRICS columns, empty = absent), image / image_path ->
image_path (relative to the sweep folder; a path that no longer exists falls back to
`<sweep_dir>/<job>/image.png`, so a moved sweep folder still reports), overrides -> overrides
(text). Without a readable jobs.csv the job folders' job.json are read instead. No picture
outside the sweep folder is read (an absolute path elsewhere, `../`, a link out): such a cell
shows no image, and the command says so.
"""
from __future__ import annotations

import base64
import csv
import hashlib
import html
import io
import json
import math
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

from PIL import Image, ImageDraw, ImageFont, ImageOps

from .errors import first_line
from .files import atomic_write, inside
from .records import FAILED, FINISHED, GRID_PNG_LEVEL, KILLED, METRICS, OVERRIDES_JSON_TAG, SKIPPED, split_override

OK_STATUSES = (FINISHED, SKIPPED)  # a skipped job (resume) shows the image of its earlier run
NONE = "none"  # an axis switched off
ELLIPSIS = "…"
_FIXED_COLUMNS = {"job", "status", "run_id", "overrides", "image", "error", "tracked", *METRICS}
USAGE = ("usage: python -m runner report SWEEP_DIR|--run PARENT_RUN_ID [--tracking-uri URI] [--out DIR] "
         "[x=KEY|none] [y=KEY|none] [z=KEY|none] [thumb=N] [title=TEXT]")
DEFAULT_TRACKING_URI = "sqlite:///outputs/mlflow/mlflow.db"  # the runner's default store (conf/tracking/mlflow.yaml)


class ReportError(Exception):
    """A problem to report as one line (exit status 2 from the command)."""


class AxisError(ReportError):
    pass


# --------------------------------------------------------------------------- jobs


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
                    from .records import read_generation

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
        return _number(value)

    def label(self, keys: Sequence[str]) -> str:
        return " ".join(f"{k}={self.values.get(k, '')}" for k in keys) or f"job {self.num}"


class JobList(list):
    """A list of GridJob that also knows the sweep's swept keys (in order), title and overrides."""

    def __init__(self, jobs: Iterable[GridJob] = (), keys: Optional[Sequence[str]] = None,
                 title: str = "", overrides: Sequence[str] = ()) -> None:
        super().__init__(sorted(jobs, key=lambda j: j.num))
        self.keys = list(keys) if keys is not None else _keys_in_order(self)
        self.title = title
        self.overrides = list(overrides)


def _keys_in_order(jobs: Iterable[GridJob]) -> list[str]:
    keys: list[str] = []
    for job in jobs:
        keys.extend(k for k in job.values if k not in keys)
    return keys


def jobs_from_records(records: Sequence[Any], overrides: Sequence[str] = (), title: str = "") -> JobList:
    """From `runner.report.JobRecord`s (a sweep that just ended): the swept keys are
    `runner.report.swept_keys(records)`, the same columns as `jobs.csv`."""
    from .records import swept_keys

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
            value = _number(row.get(m))
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
    from .records import JobRecord, RecordError

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
        from omegaconf import OmegaConf

        cfg = OmegaConf.load(path / "multirun.yaml")
        # unresolved: a folder's `${oc.env:...}` must not pull this machine's variables into the report
        return [str(o) for o in OmegaConf.to_container(cfg.hydra.overrides.task, resolve=False)]
    except Exception:  # noqa: BLE001 - only the report's header misses them
        return []


_OVERRIDE_START = re.compile(r"^(\+{0,2}[A-Za-z_][\w.\-/@]*=|~[A-Za-z_][\w.\-/@]*(=|$))")


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


def jobs_from_mlflow(tracking_uri: str, parent_run_id: str, dst: Path) -> JobList:
    """The jobs of a sweep's MLflow parent run: its children (tag `mlflow.parentRunId`), their
    status, timing metrics, `runner.error` and `image.png` (downloaded to `dst/<job>/`). The swept
    keys are the parent's tag `runner.swept_keys`, else the override keys (tag `runner.overrides`)
    that differ between children, else the params that differ."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(tracking_uri=tracking_uri)
    try:
        parent = client.get_run(parent_run_id)
    except MlflowException as e:
        raise ReportError(f"no MLflow run {parent_run_id} in {tracking_uri}: {str(e).splitlines()[0]}") from None
    children = []
    token = None
    while True:
        page = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'",
                                  max_results=1000, page_token=token,
                                  order_by=["attributes.start_time ASC"])
        children.extend(page)
        token = page.token
        if not token:
            break
    overrides = [dict(split_override(o) for o in overrides_of(c.data.tags)) for c in children]
    keys = parent.data.tags.get("runner.swept_keys", "").split()
    if not keys:
        keys = _differing(overrides) or _differing([dict(c.data.params) for c in children])
    dst = Path(dst)
    jobs = []
    for i, (child, wanted) in enumerate(zip(children, overrides)):
        tags = child.data.tags
        try:
            num = int(tags.get("runner.job_num", i))
        except ValueError:
            num = i
        values = {k: wanted[k] if k in wanted else str(child.data.params.get(k, "")) for k in keys}
        image = None
        try:
            if any(a.path == "image.png" for a in client.list_artifacts(child.info.run_id)):
                image = Path(client.download_artifacts(child.info.run_id, "image.png", str(_mkdir(dst / str(num)))))
        except Exception as e:  # noqa: BLE001 - that cell shows no image
            print(f"report: could not fetch image.png of run {child.info.run_id}: {e}", file=sys.stderr)
        jobs.append(GridJob(
            num=num, values=values, status=child.info.status, image_path=image,
            metrics={k: float(v) for k, v in child.data.metrics.items() if k in METRICS},
            error=tags.get("runner.error", ""), run_id=child.info.run_id, overrides=tags.get("runner.overrides", "")))
    return JobList(jobs, keys, parent.info.run_name or f"Sweep {parent_run_id}", overrides_of(parent.data.tags))


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


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


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


# --------------------------------------------------------------------------- axes


def _number(value: Any) -> Optional[float]:
    if value is None or isinstance(value, bool):
        return None
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def axis_values(jobs: Sequence[GridJob], key: str) -> list[str]:
    """The distinct values of `key`: numerically sorted when all are numbers, else in the order
    of the sweep; an empty value (a job without the key) last."""
    seen: list[str] = []
    for job in jobs:
        v = job.values.get(key, "")
        if v not in seen:
            seen.append(v)
    present = [v for v in seen if v != ""]
    if present and all(_number(v) is not None for v in present):
        present.sort(key=lambda v: _number(v))
    return present + ([""] if "" in seen else [])


@dataclass
class Axes:
    x: Optional[str]
    y: Optional[str]
    pages: list[str]  # z first, then any further swept keys
    constants: list[str]  # keys with one value in every job

    @property
    def z(self) -> Optional[str]:
        return self.pages[0] if self.pages else None


def choose_axes(jobs: Sequence[GridJob], keys: Optional[Sequence[str]] = None, x: Optional[str] = None,
                y: Optional[str] = None, z: Optional[str] = None) -> Axes:
    """x / y / z: a swept key, "none" (no such axis) or None (the default from the sweep)."""
    keys = list(keys) if keys is not None else _keys_in_order(jobs)
    asked = {"x": x, "y": y, "z": z}
    named: list[str] = []
    for axis, key in asked.items():
        if key is None or key == NONE:
            continue
        if key not in keys:
            raise AxisError(f"unknown key {key!r} for {axis}=: {not_swept_hint(key, keys)}")
        if key in named:
            raise AxisError(f"{key!r} is on two axes: give each axis its own key (or none)")
        named.append(key)
    counts = {k: len(axis_values(jobs, k)) for k in keys}
    constants = [k for k in keys if counts[k] < 2 and k not in named]
    free = sorted((k for k in keys if k not in named and k not in constants), key=lambda k: -counts[k])
    chosen = {}
    for axis in ("x", "y", "z"):
        if asked[axis] is None:
            chosen[axis] = free.pop(0) if free else None
        else:
            chosen[axis] = None if asked[axis] == NONE else asked[axis]
    pages = ([chosen["z"]] if chosen["z"] else []) + free
    return Axes(chosen["x"], chosen["y"], pages, constants)


def not_swept_hint(key: str, keys: Sequence[str]) -> str:
    """`did you mean ...? the swept keys are ...` for an axis key the sweep does not sweep."""
    import difflib

    if not keys:
        return "the sweep sweeps no key (every job has the same overrides)"
    close = difflib.get_close_matches(key, list(keys), n=1)
    return (f"did you mean `{close[0]}`? " if close else "") + "the swept keys are " + ", ".join(keys)


@dataclass
class GridPage:
    values: list[tuple[str, str]]  # the page's (key, value)s: z first
    xs: list[str]  # column values ([""] when x is none)
    ys: list[str]  # row values ([""] when y is none)
    cells: dict[tuple[str, str], GridJob]  # (x value, y value) -> job
    filename: str
    boxes: dict[int, tuple[int, int, int, int]] = field(default_factory=dict)  # job -> cell box in the PNG

    @property
    def title(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.values)


def grid_pages(jobs: Sequence[GridJob], axes: Axes) -> list[GridPage]:
    """One page per combination (that ran) of the page keys; every page has the columns and
    rows of the whole sweep, so pages line up."""
    xs = axis_values(jobs, axes.x) if axes.x else [""]
    ys = axis_values(jobs, axes.y) if axes.y else [""]
    combos: list[tuple[str, ...]] = []
    by_page: dict[tuple[str, ...], list[GridJob]] = {}
    for job in jobs:
        combo = tuple(job.values.get(k, "") for k in axes.pages)
        if combo not in by_page:
            by_page[combo] = []
            combos.append(combo)
        by_page[combo].append(job)
    orders = [axis_values(jobs, k) for k in axes.pages]
    combos.sort(key=lambda c: tuple(order.index(v) for order, v in zip(orders, c)))
    pages, names = [], set()
    for combo in combos:
        cells = {}
        for job in sorted(by_page[combo], key=lambda j: j.num):  # a rerun: the later job wins
            cells[(job.values.get(axes.x, "") if axes.x else "", job.values.get(axes.y, "") if axes.y else "")] = job
        values = list(zip(axes.pages, combo))
        name = _page_filename(values, names)
        names.add(name)
        pages.append(GridPage(values, xs, ys, cells, name))
    return pages or [GridPage([], xs, ys, {}, "grid.png")]


def _page_filename(values: Sequence[tuple[str, str]], taken: set[str]) -> str:
    """`grid_<key>=<value>[_<key>=<value>...].png`, safe as a file name; a long or colliding name
    gets a short hash of the full one."""
    if not values:
        return "grid.png"
    raw = "_".join(f"{k}={v}" for k, v in values)
    safe = re.sub(r"[^A-Za-z0-9._=+,-]+", "-", raw).strip("-.") or "page"
    digest = hashlib.sha1(raw.encode()).hexdigest()[:8]
    if len(safe) > 100:
        safe = f"{safe[:90]}-{digest}"
    if f"grid_{safe}.png" in taken:
        safe = f"{safe}-{digest}"
    return f"grid_{safe}.png"


# ------------------------------------------------------------------------- labels


def shorten(text: str, fits: Callable[[str], bool], siblings: Sequence[str] = ()) -> str:
    """`text` if it fits, else shortened where it agrees with its siblings (the other values of
    the same axis), so what tells it apart stays visible: first the shared left part goes
    (`…/loras/style_v2.safetensors`, cut at a separator when possible), then the shared right
    part, then the middle of what is left."""
    if fits(text):
        return text
    others = [s for s in siblings if s != text]
    if others:
        start = min(_common_prefix(text, s) for s in others)
        tail = min(_common_prefix(text[::-1], s[::-1]) for s in others)
        end = max(start, len(text) - tail)
    else:  # alone: a path keeps its file name, anything else its two ends
        cut = max(text.rfind("/"), text.rfind("\\"))
        start, end = (cut + 1 if cut > 0 else 0), len(text)
    start = min(start, max(0, len(text) - 1))  # keep at least the last character
    # 1. drop the left, at most up to where the difference starts: the longest tail that fits,
    #    moved to a separator (before a slash, after a space/_/-/.) if one is near
    fitting = next((i for i in range(1, start + 1) if fits(ELLIPSIS + text[i:])), None)
    if fitting is not None:
        near = [i for i in range(fitting, min(start, fitting + 12) + 1)
                if text[i] in "/\\" or text[i - 1] in " _-.:,"]
        return ELLIPSIS + text[near[0] if near else fitting:]
    # 2. keep the differing part, drop from the right
    head = ELLIPSIS if start > 0 else ""
    for j in range(len(text) - 1, end - 1, -1):
        candidate = head + text[start:j] + ELLIPSIS
        if fits(candidate):
            return candidate
    # 3. the differing part alone is too long: its two ends, more of the end
    core = text[start:end]
    for keep in range(len(core) - 1, 0, -1):
        a = keep // 3
        b = keep - a
        candidate = head + core[:a] + ELLIPSIS + core[len(core) - b:] + (ELLIPSIS if end < len(text) else "")
        if fits(candidate):
            return candidate
    return ELLIPSIS


def _common_prefix(a: str, b: str) -> int:
    n = 0
    for ca, cb in zip(a, b):
        if ca != cb:
            break
        n += 1
    return n


# ---------------------------------------------------------------------- PNG grid

GREY, MISSING_EDGE, BACKDROP = (200, 200, 200), (215, 215, 215), (240, 240, 240)
STATUS_COLOURS = {FAILED: (170, 0, 0), KILLED: (170, 90, 0)}


def _font(size: int):
    """DejaVu Sans when the system has it (accents, symbols), else Pillow's own font."""
    for name in ("DejaVuSans.ttf", "LiberationSans-Regular.ttf"):
        try:
            return ImageFont.truetype(name, size)
        except OSError:
            continue
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def _wrap(draw: ImageDraw.ImageDraw, text: str, font, width: int, max_lines: int) -> list[str]:
    """Word-wrapped into at most `max_lines` lines (a word wider than a line is broken); a cut
    text ends with an ellipsis."""
    words = text.split()
    lines: list[str] = []
    line, i = "", 0
    while i < len(words) and len(lines) < max_lines:
        trial = f"{line} {words[i]}" if line else words[i]
        if draw.textlength(trial, font=font) <= width:
            line, i = trial, i + 1
        elif line:
            lines.append(line)
            line = ""
        else:  # a word wider than the line
            word = words[i]
            n = len(word) - 1
            while n > 1 and draw.textlength(word[:n], font=font) > width:
                n -= 1
            lines.append(word[:n])
            words[i] = word[n:]
    truncated = i < len(words) or (bool(line) and len(lines) >= max_lines)
    if line and len(lines) < max_lines:
        lines.append(line)
    if truncated and lines:
        last = lines[-1]
        while last and draw.textlength(last + ELLIPSIS, font=font) > width:
            last = last[:-1]
        lines[-1] = last + ELLIPSIS
    return lines


def render_page(page: GridPage, axes: Axes, thumb: int = 256, images: Optional["_Images"] = None) -> Image.Image:
    """One grid page as an image; fills `page.boxes` with each job's cell."""
    images = images or _Images()
    size = label_size(thumb)
    font, small, big = _font(size), _font(max(11, size - 3)), _font(round(size * 1.25))
    line_h = size + max(4, size // 3)
    pad = max(4, thumb // 32)
    gap = max(4, thumb // 40)
    ncols, nrows = len(page.xs), len(page.ys)
    grid_w = ncols * thumb + (ncols - 1) * gap
    row_w, y_title, y_labels = row_labels(page, axes, thumb)
    left = pad + (row_w + pad if axes.y else 0)
    width = left + grid_w + pad
    top = pad
    title = page.title
    title_h = round(size * 1.25) + pad if title else 0
    top += title_h
    key_line = line_h if axes.x else 0
    value_line = line_h if (axes.x or axes.y) else 0
    top += key_line + value_line
    height = top + nrows * thumb + (nrows - 1) * gap + pad
    sheet = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(sheet)
    fits = lambda f, w: (lambda s: draw.textlength(s, font=f) <= w)  # noqa: E731
    if title:
        draw.text((pad, pad), shorten(title, fits(big, width - 2 * pad)), fill="black", font=big)
    y_keys = pad + title_h
    if axes.x:
        label = shorten(axes.x, fits(font, grid_w))
        draw.text((left + (grid_w - draw.textlength(label, font=font)) / 2, y_keys), label, fill=(90, 90, 90),
                  font=font)
        for j, value in enumerate(page.xs):
            text = shorten(value or "(unset)", fits(font, thumb), page.xs)
            x0 = left + j * (thumb + gap)
            draw.text((x0 + (thumb - draw.textlength(text, font=font)) / 2, y_keys + key_line), text, fill="black",
                      font=font)
    if axes.y:
        draw.text((pad, y_keys + key_line), y_title, fill=(90, 90, 90), font=font)
        for i, text in enumerate(y_labels):
            y0 = top + i * (thumb + gap)
            draw.text((pad, y0 + (thumb - size) / 2), text, fill="black", font=font)
    page.boxes = {}
    for i, yv in enumerate(page.ys):
        for j, xv in enumerate(page.xs):
            x0, y0 = left + j * (thumb + gap), top + i * (thumb + gap)
            job = page.cells.get((xv, yv))
            if job is not None:
                page.boxes[job.num] = (x0, y0, x0 + thumb - 1, y0 + thumb - 1)
            _draw_cell(sheet, draw, job, (x0, y0), thumb, images, (font, small), size, pad, line_h)
    return sheet


def label_size(thumb: int) -> int:
    """The grid's text size for cells of `thumb` pixels."""
    return max(12, min(32, round(thumb / 14)))


def row_labels(page: GridPage, axes: Axes, thumb: int) -> tuple[int, str, list[str]]:
    """The grid's row header: its column's width (as wide as its longest label within bounds,
    rounded up: a label that fits is drawn whole), the rows' key and each row's value, shortened
    only where they do not fit."""
    if not axes.y:
        return 0, "", []
    size = label_size(thumb)
    font, draw = _font(size), ImageDraw.Draw(Image.new("RGB", (1, 1)))
    want = max([draw.textlength(v or "(unset)", font=font) for v in page.ys] + [draw.textlength(axes.y, font=font)])
    width = math.ceil(min(max(want, 3 * size), max(thumb, 12 * size)))
    fits = lambda s: draw.textlength(s, font=font) <= width  # noqa: E731
    return width, shorten(axes.y, fits), [shorten(v or "(unset)", fits, page.ys) for v in page.ys]


def _draw_cell(sheet: Image.Image, draw: ImageDraw.ImageDraw, job: Optional[GridJob], origin: tuple[int, int],
               thumb: int, images: "_Images", fonts: tuple, size: int, pad: int, line_h: int) -> None:
    """A job's thumbnail; a grey cell with the status and the error's first line; or an
    outline where the sweep had no job."""
    x0, y0 = origin
    box = (x0, y0, x0 + thumb - 1, y0 + thumb - 1)
    if job is None:
        draw.rectangle(box, outline=MISSING_EDGE)
        return
    im = images.thumb(job, thumb) if job.ok else None
    if im is not None:
        draw.rectangle(box, fill=BACKDROP)
        sheet.paste(im, (x0 + (thumb - im.width) // 2, y0 + (thumb - im.height) // 2))
        return
    font, small = fonts
    draw.rectangle(box, fill=GREY)
    status = job.status if job.status not in OK_STATUSES else f"{job.status}, no image"
    colour = STATUS_COLOURS.get(job.status, (70, 70, 70))
    width = thumb - 2 * pad
    draw.text((x0 + pad, y0 + pad), shorten(f"{status} (job {job.num})", lambda t: draw.textlength(t, font=font)
                                            <= width), fill=colour, font=font)
    small_h = max(11, size - 3) + 4
    room = max(1, (thumb - 2 * pad - line_h) // small_h)
    for k, line in enumerate(_wrap(draw, first_line(job.error), small, width, room)):
        draw.text((x0 + pad, y0 + pad + line_h + k * small_h), line, fill=(40, 40, 40), font=small)


@dataclass
class _Picture:
    """What the grid and the page show of one job's image, all made from one decode."""

    width: int
    height: int
    thumbs: dict[tuple[int, bool], Image.Image]  # (size, upscale) -> thumbnail
    jpegs: dict[tuple[int, int], tuple[str, int, int, int]]  # (longest side, quality) -> (URI, bytes, w, h)


class _Images:
    """Each job's image decoded once; the thumbnails and the page's JPEGs come from that decode
    and are kept, the full-size pixels are not (a big sweep does not pile up in memory).
    `prepare` makes them for many jobs on a few threads: Pillow's codecs release the GIL, and at
    a sweep's end the cores are otherwise idle."""

    def __init__(self) -> None:
        self._pictures: dict[int, Optional[_Picture]] = {}

    def prepare(self, jobs: Sequence[GridJob], thumbs: Sequence[tuple[int, bool]] = (),
                jpegs: Sequence[tuple[int, int]] = ()) -> None:
        from concurrent.futures import ThreadPoolExecutor

        todo = [j for j in jobs if j.ok]
        if not todo:
            return
        with ThreadPoolExecutor(max_workers=min(len(todo), os.cpu_count() or 1)) as pool:
            for job, picture in zip(todo, pool.map(lambda j: self._make(j, thumbs, jpegs), todo)):
                self._pictures[job.num] = picture

    def _make(self, job: GridJob, thumbs: Sequence[tuple[int, bool]], jpegs: Sequence[tuple[int, int]]
              ) -> Optional[_Picture]:
        picture = self._pictures.get(job.num)
        missing_thumbs = [t for t in thumbs if picture is None or t not in picture.thumbs]
        missing_jpegs = [j for j in jpegs if picture is None or j not in picture.jpegs]
        if job.num in self._pictures and not missing_thumbs and not missing_jpegs:
            return picture
        full = self._open(job)
        if full is None:
            return None
        picture = picture or _Picture(full.width, full.height, {}, {})
        for size, upscale in missing_thumbs:
            picture.thumbs[(size, upscale)] = (
                ImageOps.contain(full, (size, size), Image.Resampling.LANCZOS)
                if upscale or full.width > size or full.height > size else full)
        for longest, quality in missing_jpegs:
            shown = full if max(full.size) <= longest else ImageOps.contain(full, (longest, longest),
                                                                           Image.Resampling.LANCZOS)
            picture.jpegs[(longest, quality)] = (*_jpeg_uri(shown, quality), shown.width, shown.height)
        return picture

    @staticmethod
    def _open(job: GridJob) -> Optional[Image.Image]:
        if job.image_path is None or not Path(job.image_path).is_file():
            return None
        try:
            with Image.open(job.image_path) as f:
                return f.convert("RGB")
        except OSError:
            return None

    def picture(self, job: GridJob, thumbs: Sequence[tuple[int, bool]] = (),
                jpegs: Sequence[tuple[int, int]] = ()) -> Optional[_Picture]:
        picture = self._make(job, thumbs, jpegs)
        self._pictures[job.num] = picture
        return picture

    def thumb(self, job: GridJob, size: int, upscale: bool = True) -> Optional[Image.Image]:
        picture = self.picture(job, thumbs=[(size, upscale)])
        return picture.thumbs[(size, upscale)] if picture is not None else None


def write_grids(jobs: Sequence[GridJob], out_dir: Path, axes: Axes, thumb: int = 256,
                images: Optional[_Images] = None, name: str = "") -> list[Path]:
    """The grid page(s) as PNG files in `out_dir`: `grid.png` / `grid_<page>.png`, or with a
    `name` (a rebuild's axes, axes_name without the pages) `grid_x=X_y=Y.png` /
    `grid_x=X_y=Y_<page>.png` (the page names its keys). A file of the same name is replaced
    atomically; nothing else is touched."""
    out_dir = Path(out_dir)
    images = images or _Images()
    written = []
    for page in grid_pages(jobs, axes):
        filename = page.filename if not name else f"grid_{name}{page.filename[len('grid'):]}"
        sheet = render_page(page, axes, thumb, images)
        written.append(atomic_write(out_dir / filename,
                                    lambda tmp, s=sheet: s.save(tmp, format="PNG", compress_level=GRID_PNG_LEVEL)))
    return written


def axes_name(axes: Axes, pages: bool = True) -> str:
    """A rebuild's files are named by its axes: `x=seed_y=lora.alpha[_z=sampler.steps]`."""
    raw = f"x={axes.x or NONE}_y={axes.y or NONE}" + (f"_z={'+'.join(axes.pages)}" if axes.pages and pages else "")
    safe = re.sub(r"[^A-Za-z0-9._=+,-]+", "-", raw)
    return safe if len(safe) <= 100 else f"{safe[:90]}-{hashlib.sha1(raw.encode()).hexdigest()[:8]}"


# --------------------------------------------------------------------- SVG plots

_PALETTE = ["#3b6ea5", "#e07b39", "#4f9a5a", "#b8434a", "#8066a8", "#8c6d46", "#c763a6", "#6f6f6f"]
_W, _H, _ML, _MR, _MT, _MB = 720, 260, 64, 16, 34, 44


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0)
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.floor(lo / step) * step
    out = []
    v = first
    while v <= hi + step * 1e-9:
        out.append(round(v, 12))
        v += step
    if out[-1] < hi:
        out.append(round(out[-1] + step, 12))
    return out


def _fmt_tick(v: float) -> str:
    return f"{v:.6g}"


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _svg_frame(title: str, y_label: str, x_label: str, y_ticks: list[float], ymap: Callable[[float], float],
               body: list[str], legend: Sequence[tuple[str, str]] = ()) -> str:
    out = [f'<svg class="plot" viewBox="0 0 {_W} {_H}" width="{_W}" height="{_H}" role="img" '
           f'aria-label="{_e(title)}" xmlns="http://www.w3.org/2000/svg">',
           f'<text x="{_ML}" y="18" class="t">{_e(title)}</text>']
    for t in y_ticks:
        y = ymap(t)
        out.append(f'<line x1="{_ML}" x2="{_W - _MR}" y1="{y:.1f}" y2="{y:.1f}" class="g"/>'
                   f'<text x="{_ML - 6}" y="{y + 4:.1f}" text-anchor="end">{_e(_fmt_tick(t))}</text>')
    out.append(f'<text transform="translate(14 {(_MT + _H - _MB) / 2:.0f}) rotate(-90)" text-anchor="middle">'
               f'{_e(y_label)}</text>')
    out.append(f'<text x="{(_ML + _W - _MR) / 2:.0f}" y="{_H - 6}" text-anchor="middle">{_e(x_label)}</text>')
    lx = _W - _MR
    for name, colour in reversed(list(legend)):
        lx -= 8 + 7 * len(name) + 14
        out.append(f'<rect x="{lx}" y="9" width="10" height="10" fill="{colour}"/>'
                   f'<text x="{lx + 14}" y="18">{_e(name)}</text>')
    out.extend(body)
    out.append("</svg>")
    return "".join(out)


def svg_bars(title: str, y_label: str, bars: Sequence[tuple[str, Sequence[tuple[str, float]], str]],
             colours: Optional[Mapping[str, str]] = None, x_label: str = "job") -> str:
    """Bars (stacked when a bar has several parts): (label under the bar, [(part, value)], tooltip)."""
    colours = dict(colours or {})
    parts = [p for _, stack, _ in bars for p, _ in stack]
    for p in parts:
        colours.setdefault(p, _PALETTE[len(colours) % len(_PALETTE)])
    top = max([sum(max(v, 0.0) for _, v in stack) for _, stack, _ in bars] + [0.0])
    ticks = _ticks(0.0, top or 1.0)
    hi = ticks[-1]
    ph = _H - _MT - _MB
    ymap = lambda v: _MT + ph * (1 - v / hi)  # noqa: E731
    band = (_W - _ML - _MR) / max(1, len(bars))
    every = max(1, math.ceil(len(bars) / 40))
    body = []
    for i, (label, stack, tip) in enumerate(bars):
        x = _ML + i * band + band * 0.15
        w = max(1.0, band * 0.7)
        base = 0.0
        body.append(f'<g class="bar"><title>{_e(tip)}</title>')
        for part, value in stack:
            if value <= 0:
                continue
            y0, y1 = ymap(base + value), ymap(base)
            body.append(f'<rect x="{x:.1f}" y="{y0:.1f}" width="{w:.1f}" height="{max(0.5, y1 - y0):.1f}" '
                        f'fill="{colours[part]}"/>')
            base += value
        body.append("</g>")
        if i % every == 0:
            body.append(f'<text x="{x + w / 2:.1f}" y="{_H - _MB + 14}" text-anchor="middle">{_e(label)}</text>')
    legend = [(p, colours[p]) for p in dict.fromkeys(parts)] if len(set(parts)) > 1 else []
    return _svg_frame(title, y_label, x_label, ticks, ymap, body, legend)


def svg_scatter(title: str, x_label: str, y_label: str, points: Sequence[tuple[float, float, str]]) -> str:
    """Points (x, y, tooltip) and a line through the mean y of each x."""
    xs = [p[0] for p in points]
    ys = [p[1] for p in points]
    xt = _ticks(min(xs + [0.0]), max(xs) if xs else 1.0)
    yt = _ticks(0.0, max(ys) if ys else 1.0)
    pw, ph = _W - _ML - _MR, _H - _MT - _MB
    xmap = lambda v: _ML + pw * (v - xt[0]) / (xt[-1] - xt[0])  # noqa: E731
    ymap = lambda v: _MT + ph * (1 - (v - yt[0]) / (yt[-1] - yt[0]))  # noqa: E731
    body = [f'<text x="{xmap(t):.1f}" y="{_H - _MB + 14}" text-anchor="middle">{_e(_fmt_tick(t))}</text>' for t in xt]
    means: dict[float, list[float]] = {}
    for x, y, _ in points:
        means.setdefault(x, []).append(y)
    line = " ".join(f"{xmap(x):.1f},{ymap(sum(v) / len(v)):.1f}" for x, v in sorted(means.items()))
    body.append(f'<polyline points="{line}" fill="none" stroke="{_PALETTE[1]}" stroke-width="2"/>')
    for x, y, tip in points:
        body.append(f'<circle cx="{xmap(x):.1f}" cy="{ymap(y):.1f}" r="4.5" fill="{_PALETTE[0]}" fill-opacity="0.75">'
                    f'<title>{_e(tip)}</title></circle>')
    return _svg_frame(title, y_label, x_label, yt, ymap, body, [("job", _PALETTE[0]), ("mean", _PALETTE[1])])


def plots(jobs: Sequence[GridJob], keys: Sequence[str]) -> list[str]:
    """The report's SVG plots: s/step against steps (or per job), time per phase, peak memory."""
    out = []
    timed = [j for j in jobs if "s_per_step" in j.metrics]
    tip = lambda j, v: f"job {j.num}: {j.label(keys)}: {v}"  # noqa: E731
    steps = {j.steps for j in timed if j.steps is not None}
    if len(steps) > 1:
        points = [(j.steps, j.metrics["s_per_step"], tip(j, f"{j.steps:g} steps, {j.metrics['s_per_step']:.4g} s/step"))
                  for j in timed if j.steps is not None]
        out.append(svg_scatter("Seconds per denoising step vs steps", "steps", "s / step", points))
    elif timed:
        out.append(svg_bars("Seconds per denoising step, per job", "s / step",
                            [(str(j.num), [("s/step", j.metrics["s_per_step"])],
                              tip(j, f"{j.metrics['s_per_step']:.4g} s/step")) for j in timed]))
    phases = ("load_s", "lora_s", "encode_s", "denoise_s", "decode_s")
    if any(p in j.metrics for j in jobs for p in phases + ("total_s",)):
        bars = []
        for j in jobs:
            stack = [(p[:-2], j.metrics.get(p, 0.0)) for p in phases]
            other = j.metrics.get("total_s", 0.0) - sum(v for _, v in stack)
            stack.append(("other", other if other > 1e-3 else 0.0))
            detail = ", ".join(f"{n} {v:.3g}s" for n, v in stack if v > 0)
            total = j.metrics.get("total_s")
            bars.append((str(j.num), stack, tip(j, f"{j.status}, total {total:.3g} s ({detail})" if total is not None
                                                 else f"{j.status}, {detail or 'no timings'}")))
        out.append(svg_bars("Time per job, by phase", "seconds", bars))
    mem = [j for j in jobs if "peak_mem_mb" in j.metrics]
    if mem:
        colours = {FINISHED: _PALETTE[0], SKIPPED: _PALETTE[7], FAILED: _PALETTE[3], KILLED: _PALETTE[1]}
        out.append(svg_bars("Peak memory per job", "MB",
                            [(str(j.num), [(j.status, j.metrics["peak_mem_mb"])],
                              tip(j, f"{j.status}, peak {j.metrics['peak_mem_mb']:.0f} MB")) for j in mem], colours))
    return out


# --------------------------------------------------------------------------- HTML

_CSS = """
:root{font-family:system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;color:#1d1d1f;background:#fff}
body{margin:0 auto;padding:16px 24px 48px;max-width:none}
h1{font-size:1.5em;margin:.2em 0}h2{font-size:1.2em;margin:1.6em 0 .4em;border-bottom:1px solid #ddd}
h3{font-size:1em;margin:1.2em 0 .3em}
code{background:#f3f3f5;padding:1px 4px;border-radius:3px;font-size:.92em;overflow-wrap:anywhere}
.meta{margin:.3em 0;color:#444}.note{color:#666;font-size:.88em}
nav a{margin-right:1em}
.scroll{overflow-x:auto;max-width:100%}
table.grid{border-collapse:separate;border-spacing:4px}
table.grid th{font-weight:normal;font-size:.88em;vertical-align:bottom;overflow-wrap:anywhere}
table.grid thead th{text-align:center}
table.grid tbody th{text-align:right;vertical-align:middle;max-width:16em;padding-right:6px}
table.grid th.axis{color:#666;font-style:italic}
td.cell{width:var(--t);height:var(--t);padding:0;vertical-align:middle;text-align:center;background:#f0f0f0}
td.missing{background:none;outline:1px dashed #ccc;outline-offset:-1px}
button.thumb{all:unset;cursor:zoom-in;display:block;width:var(--t);height:var(--t)}
button.thumb:focus-visible{outline:3px solid #3b6ea5}
button.thumb img{width:100%;height:100%;object-fit:contain;display:block}
.fail{background:#c8c8c8;width:var(--t);height:var(--t);box-sizing:border-box;padding:8px;text-align:left;
 overflow:hidden;font-size:.82em;overflow-wrap:anywhere}
.fail b{display:block;color:#a00;margin-bottom:4px}.fail.KILLED b{color:#a85a00}
#jobs .scroll{overflow:auto;max-height:85vh}
table.jobs{border-collapse:collapse;font-size:.88em}
table.jobs th,table.jobs td{border:1px solid #ddd;padding:3px 7px;text-align:left;vertical-align:top}
table.jobs td.n{text-align:right;font-variant-numeric:tabular-nums}
table.jobs th{background:#f5f5f7;cursor:pointer;user-select:none;white-space:nowrap;position:sticky;top:0}
table.jobs th[aria-sort=ascending]::after{content:" \\25B2"}
table.jobs th[aria-sort=descending]::after{content:" \\25BC"}
table.jobs td.err{min-width:14em;max-width:36em;white-space:pre-wrap;overflow-wrap:anywhere;color:#900}
tr.FAILED td,tr.KILLED td{background:#fbf1f1}
button.view{font:inherit;cursor:zoom-in;padding:0 6px}
svg.plot{max-width:100%;height:auto;display:block;margin:8px 0 16px;font-size:11px}
svg.plot text{fill:#333}svg.plot text.t{font-size:13px;font-weight:600}svg.plot line.g{stroke:#e5e5e5}
svg.plot .bar:hover rect,svg.plot circle:hover{opacity:.7}
#viewer{position:fixed;inset:0;background:rgba(0,0,0,.86);display:flex;flex-direction:column;align-items:center;
 justify-content:center;z-index:10;cursor:zoom-out;margin:0;padding:12px;box-sizing:border-box}
#viewer[hidden]{display:none}
#viewer .frame img{max-width:96vw;max-height:86vh;display:block;object-fit:contain;image-rendering:auto}
#viewer .frame img.up{image-rendering:pixelated}
#viewer figcaption{color:#eee;margin-top:8px;font-size:.9em;text-align:center;overflow-wrap:anywhere;max-width:96vw}
"""

_JS = """
(function(){
  var viewer=document.getElementById('viewer'),frame=viewer.querySelector('.frame'),
      cap=viewer.querySelector('figcaption');
  function open(num){
    var t=document.getElementById('full-'+num);
    if(!t)return;
    frame.replaceChildren(t.content.cloneNode(true));
    cap.textContent=t.getAttribute('data-caption')||'';
    viewer.hidden=false;viewer.focus();
  }
  function close(){viewer.hidden=true;frame.replaceChildren();}
  document.addEventListener('click',function(e){
    var b=e.target.closest('[data-job]');
    if(b){e.preventDefault();open(b.getAttribute('data-job'));return;}
    if(!viewer.hidden&&viewer.contains(e.target))close();
  });
  document.addEventListener('keydown',function(e){if(e.key==='Escape'&&!viewer.hidden)close();});
  function value(row,i){var c=row.cells[i];var v=c.getAttribute('data-v');return v===null?c.textContent.trim():v;}
  function sortBy(table,th,i){
    var asc=th.getAttribute('aria-sort')!=='ascending',num=th.getAttribute('data-type')==='num';
    Array.prototype.forEach.call(table.tHead.rows[0].cells,function(h){h.removeAttribute('aria-sort');});
    th.setAttribute('aria-sort',asc?'ascending':'descending');
    var body=table.tBodies[0],rows=Array.prototype.slice.call(body.rows);
    rows.sort(function(a,b){
      var x=value(a,i),y=value(b,i);
      if(x===''||y==='')return (x==='')-(y==='');
      var d=num?parseFloat(x)-parseFloat(y):x.localeCompare(y,undefined,{numeric:true});
      return asc?d:-d;
    });
    rows.forEach(function(r){body.appendChild(r);});
  }
  document.querySelectorAll('table.sortable').forEach(function(table){
    Array.prototype.forEach.call(table.tHead.rows[0].cells,function(th,i){
      th.tabIndex=0;
      th.addEventListener('click',function(){sortBy(table,th,i);});
      th.addEventListener('keydown',function(e){
        if(e.key==='Enter'||e.key===' '){e.preventDefault();sortBy(table,th,i);}
      });
    });
  });
})();
"""

FULL_PIXELS = 200_000_000  # all full-size copies in report.html together
THUMB_QUALITY, FULL_QUALITY = 85, 90  # JPEG quality of the page's thumbnails and full-size copies
_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'"
_METRIC_FORMAT = {"s_per_step": "{:.4f}", "peak_mem_mb": "{:.0f}"}
_COMMON_GEN = (("prompt", "Prompt"), ("negative_prompt", "Negative prompt"), ("model", "Model"), ("steps", "Steps"),
               ("cfg_scale", "CFG"), ("schedule", "Schedule"), ("seed", "Seed"), ("dtype", "dtype"),
               ("device", "Device"))


def _jpeg_uri(im: Image.Image, quality: int) -> tuple[str, int]:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=quality)
    data = buf.getvalue()
    return "data:image/jpeg;base64," + base64.b64encode(data).decode("ascii"), len(data)


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MB" if n >= 2**20 else f"{max(1, round(n / 2**10))} KB"


def report_html(jobs: Sequence[GridJob], axes: Axes, *, keys: Optional[Sequence[str]] = None, title: str = "",
                overrides: Sequence[str] = (), thumb: int = 256, full_max: int = 2048, full_quality: int = FULL_QUALITY,
                images: Optional[_Images] = None) -> str:
    """The whole report as one HTML document."""
    images = images or _Images()
    keys = list(keys) if keys is not None else _keys_in_order(jobs)
    title = title or "Sweep report"
    # the full-size images, once each; thumbnails point at them by job number
    full_max = _full_max(jobs, full_max)
    embedded = _embed_images(jobs, keys, images, thumb, full_max, full_quality)
    out = ["<!doctype html>", '<html lang="en"><head><meta charset="utf-8">',
           f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">',
           '<meta name="viewport" content="width=device-width,initial-scale=1">',
           f"<title>{_e(title)}</title>", '<link rel="icon" href="data:,">',
           f"<style>{_CSS}</style></head>", f'<body style="--t:{thumb}px">']
    out += _header(jobs, axes, keys, title, overrides)
    note = _e(f". Click an image for its full size. This file embeds {len(embedded.templates)} images: thumbnails "
              f"(JPEG, at most {thumb} px) and full-size copies (JPEG quality {full_quality}, at most {full_max} px), "
              f"{_size(embedded.nbytes)} in all; the lossless PNGs are the jobs' image.png.")
    out += _grid_section(jobs, axes, keys, thumb, embedded.thumbs, note)
    svgs = plots(jobs, keys)
    out.append('<section id="plots"><h2>Plots</h2>'
               + ("".join(svgs) if svgs else '<p class="note">No timings recorded.</p>')
               + '<p class="note">Hover a bar or point for its job.</p></section>')
    out += _jobs_table(jobs, keys, embedded.thumbs)
    out.append('<figure id="viewer" hidden tabindex="-1" role="dialog" aria-label="full-size image">'
               '<div class="frame"></div><figcaption></figcaption></figure>')
    out.extend(embedded.templates)
    out.append(f"<script>{_JS}</script></body></html>")
    return "\n".join(out)


@dataclass
class _Embedded:
    templates: list[str]  # <template> holding each full-size image
    thumbs: dict[int, tuple[str, int, int]]  # job number -> (data URI, width, height)
    nbytes: int


def _embed_images(jobs: Sequence[GridJob], keys: Sequence[str], images: _Images, thumb: int, full_max: int,
                  full_quality: int) -> _Embedded:
    embedded = _Embedded([], {}, 0)
    for job in jobs:
        picture = images.picture(job, jpegs=_page_jpegs(thumb, full_max, full_quality)) if job.ok else None
        if picture is None:
            continue
        uri, size, width, height = picture.jpegs[(full_max, full_quality)]
        turi, tsize, twidth, theight = picture.jpegs[(thumb, THUMB_QUALITY)]
        embedded.thumbs[job.num] = (turi, twidth, theight)
        embedded.nbytes += size + tsize
        caption = f"job {job.num}: {job.label(keys)} ({job.status}, {picture.width}x{picture.height})"
        embedded.templates.append(
            f'<template id="full-{job.num}" data-caption="{_e(caption)}">'
            f'<img src="{uri}" alt="{_e(caption)}" {_shown_size(width, height, thumb)}></template>')
    return embedded


def _shown_size(width: int, height: int, thumb: int) -> str:
    """The full-size view's size: the image's own, but never smaller than its thumbnail (a small
    image is enlarged with its pixels kept sharp, class `up`); the viewport still limits it."""
    scale = max(1.0, thumb / max(width, height))
    size = f'width="{round(width * scale)}" height="{round(height * scale)}"'
    return size + (' class="up"' if scale > 1 else "")


def _page_jpegs(thumb: int, full_max: int, full_quality: int) -> list[tuple[int, int]]:
    """The JPEGs the page embeds of each image: the thumbnail and the full-size copy."""
    return [(thumb, THUMB_QUALITY), (full_max, full_quality)]


def _full_max(jobs: Sequence[GridJob], full_max: int) -> int:
    """The full-size copies' longest side: all of them stay within FULL_PIXELS (about 50 MB of JPEG)."""
    n_ok = sum(1 for j in jobs if j.ok)
    return min(full_max, max(512, int(math.sqrt(FULL_PIXELS / max(1, n_ok)))))


def _header(jobs: Sequence[GridJob], axes: Axes, keys: Sequence[str], title: str,
            overrides: Sequence[str]) -> list[str]:
    counts: dict[str, int] = {}
    for j in jobs:
        counts[j.status] = counts.get(j.status, 0) + 1
    out = [f"<header><h1>{_e(title)}</h1>"]
    if overrides:
        out.append('<p class="meta">Overrides: ' + " ".join(f"<code>{_e(o)}</code>" for o in overrides) + "</p>")
    out.append('<p class="meta">' + _e(f"{len(jobs)} job{'s' if len(jobs) != 1 else ''}: "
                                        + ", ".join(f"{n} {s.lower()}" for s, n in counts.items())) + "</p>")
    swept = [k for k in keys if k not in axes.constants]
    if swept:
        out.append('<p class="meta">Swept: ' + " ".join(
            f"<code>{_e(k)}={_e(','.join(axis_values(jobs, k)))}</code>" for k in swept) + "</p>")
    if axes.constants:
        first = jobs[0].values if jobs else {}
        out.append('<p class="meta">Same in every job: ' + " ".join(
            f"<code>{_e(k)}={_e(first.get(k, ''))}</code>" for k in axes.constants) + "</p>")
    common = _common_generation(jobs)
    if common:
        out.append('<p class="meta">' + " &nbsp;·&nbsp; ".join(common) + "</p>")
    out.append('<nav><a href="#grid">Grid</a><a href="#plots">Plots</a><a href="#jobs">Jobs</a></nav></header>')
    return out


def _common_generation(jobs: Sequence[GridJob]) -> list[str]:
    """The generation parameters every finished job shares (from the PNGs), as HTML snippets."""
    gens = [j.gen() for j in jobs if j.ok]
    common = []
    for name, label in _COMMON_GEN:
        seen = {str(g.get(name)) for g in gens if name in g}
        if len(seen) == 1 and all(name in g for g in gens):
            value = seen.pop()
            if value:
                common.append(f"<b>{_e(label)}:</b> {_e(value)}")
    return common


def _grid_section(jobs: Sequence[GridJob], axes: Axes, keys: Sequence[str], thumb: int,
                  thumbs: dict[int, tuple[str, int, int]], note: str) -> list[str]:
    axis_text = [f"columns: <code>{_e(axes.x)}</code>" if axes.x else "columns: none",
                 f"rows: <code>{_e(axes.y)}</code>" if axes.y else "rows: none"]
    if axes.pages:
        axis_text.append("one grid per " + ", ".join(f"<code>{_e(k)}</code>" for k in axes.pages))
    out = ['<section id="grid"><h2>Grid</h2><p class="note">' + "; ".join(axis_text) + note + "</p>"]
    for page in grid_pages(jobs, axes):
        if page.values:
            out.append("<h3>" + ", ".join(f"{_e(k)} = {_e(v) or '(unset)'}" for k, v in page.values) + "</h3>")
        out += _grid_table(page, axes, keys, thumb, thumbs)
    out.append("</section>")
    return out


def _grid_table(page: GridPage, axes: Axes, keys: Sequence[str], thumb: int,
                thumbs: dict[int, tuple[str, int, int]]) -> list[str]:
    budget = max(12, thumb // 7)  # characters of a column header (CSS wraps it onto up to 3 lines)
    out = ['<div class="scroll"><table class="grid">']
    if axes.x or axes.y:
        out.append("<thead>")
        if axes.x:
            out.append(f'<tr><th></th><th class="axis" colspan="{len(page.xs)}">{_e(axes.x)}</th></tr>')
        out.append(f'<tr><th class="axis">{_e(axes.y or "")}</th>' + "".join(
            f'<th title="{_e(v)}">{_e(shorten(v, lambda s: len(s) <= 3 * budget, page.xs)) if v else "(unset)"}</th>'
            if axes.x else "<th></th>" for v in page.xs) + "</tr></thead>")
    out.append("<tbody>")
    for yv in page.ys:
        label = _e(shorten(yv, lambda s: len(s) <= 60, page.ys)) if yv else ("(unset)" if axes.y else "")
        row = [f'<th title="{_e(yv)}">{label}</th>']
        row += [_grid_cell(page.cells.get((xv, yv)), keys, thumbs) for xv in page.xs]
        out.append("<tr>" + "".join(row) + "</tr>")
    out.append("</tbody></table></div>")
    return out


def _grid_cell(job: Optional[GridJob], keys: Sequence[str], thumbs: dict[int, tuple[str, int, int]]) -> str:
    if job is None:
        return '<td class="cell missing" title="no job for this combination"></td>'
    if job.num in thumbs:
        uri, w, h = thumbs[job.num]
        tip = f"job {job.num}: {job.label(keys)} ({job.status}"
        tip += f", {job.metrics['total_s']:.2f} s)" if "total_s" in job.metrics else ")"
        return (f'<td class="cell ok"><button type="button" class="thumb" data-job="{job.num}" '
                f'title="{_e(tip)}"><img src="{uri}" alt="{_e(tip)}" width="{w}" height="{h}"></button></td>')
    status = job.status if job.status not in OK_STATUSES else f"{job.status}, no image"
    return (f'<td class="cell bad"><div class="fail {_e(job.status)}" title="{_e(job.error)}">'
            f"<b>{_e(status)} (job {job.num})</b>{_e(first_line(job.error))}</div></td>")


def _jobs_table(jobs: Sequence[GridJob], keys: Sequence[str], thumbs: dict[int, tuple[str, int, int]]) -> list[str]:
    numeric_keys = {k for k in keys if all(_number(v) is not None for v in axis_values(jobs, k) if v)}
    show_seed = "seed" not in keys and any(j.seed for j in jobs)
    cols = [("job", "num"), ("status", "text")] + [(k, "num" if k in numeric_keys else "text") for k in keys]
    if show_seed:
        cols.append(("seed", "num"))
    cols += [(m, "num") for m in METRICS] + [("image", "text"), ("error", "text"), ("run_id", "text")]
    out = ['<section id="jobs"><h2>Jobs</h2><p class="note">Click a column to sort by it, again to reverse.</p>'
           '<div class="scroll"><table class="jobs sortable"><thead><tr>'
           + "".join(f'<th data-type="{t}" data-col="{_e(c)}">{_e(c)}</th>' for c, t in cols)
           + "</tr></thead><tbody>"]
    for j in jobs:
        out.append(f'<tr class="job {_e(j.status)}">' + "".join(_job_cells(j, keys, numeric_keys, show_seed, thumbs))
                   + "</tr>")
    out.append("</tbody></table></div></section>")
    return out


def _job_cells(j: GridJob, keys: Sequence[str], numeric_keys: set[str], show_seed: bool,
               thumbs: dict[int, tuple[str, int, int]]) -> list[str]:
    cells = [f'<td class="n" data-v="{j.num}">{j.num}</td>', f"<td>{_e(j.status)}</td>"]
    for k in keys:
        v = j.values.get(k, "")
        cells.append(f'<td class="n" data-v="{_e(v)}">{_e(v)}</td>' if k in numeric_keys else f"<td>{_e(v)}</td>")
    if show_seed:
        cells.append(f'<td class="n" data-v="{_e(j.seed if _number(j.seed) is not None else "")}">{_e(j.seed)}</td>')
    for m in METRICS:
        v = j.metrics.get(m)
        shown = "" if v is None else _METRIC_FORMAT.get(m, "{:.2f}").format(v)
        cells.append(f'<td class="n" data-v="{"" if v is None else repr(float(v))}">{shown}</td>')
    cells.append(f'<td><button type="button" class="view" data-job="{j.num}">view</button></td>'
                 if j.num in thumbs else "<td></td>")
    cells.append(f'<td class="err" title="{_e(j.error)}">{_e(j.error)}</td>')
    cells.append(f"<td><code>{_e(j.run_id)}</code></td>" if j.run_id else "<td></td>")
    return cells


# ------------------------------------------------------------------- the report


@dataclass
class ReportFiles:
    html: Path
    grids: list[Path]

    @property
    def all(self) -> list[Path]:
        return [*self.grids, self.html]


def write_report(jobs: Sequence[GridJob], out_dir: Path, *, keys: Optional[Sequence[str]] = None,
                 x: Optional[str] = None, y: Optional[str] = None, z: Optional[str] = None, thumb: int = 256,
                 title: Optional[str] = None, overrides: Optional[Sequence[str]] = None,
                 full_max: int = 2048, by_axes: bool = False) -> ReportFiles:
    """The grid PNG(s) and report.html in `out_dir`. x/y/z: a swept key, "none" or None (default).
    `by_axes` (a rebuild): the files are named by the axes (`report_x=seed_y=lora.alpha.html`),
    so that a rebuild with other axes leaves the sweep's own and earlier rebuilds' files alone.
    Raises AxisError for an unknown or repeated axis key."""
    pending = PendingReport(jobs, out_dir, keys=keys, x=x, y=y, z=z, thumb=thumb, full_max=full_max,
                            by_axes=by_axes)
    return pending.finish(jobs, title=title, overrides=overrides)


class PendingReport:
    """A report in two steps: the grid PNG(s) when made, report.html by `finish(jobs)`. A sweep
    draws its grid while MLflow still records its last job, and writes the page, which shows
    each job's run, once that is done. The jobs given to `finish` are the same jobs (their runs
    and tracked flags may have changed)."""

    def __init__(self, jobs: Sequence[GridJob], out_dir: Path, *, keys: Optional[Sequence[str]] = None,
                 x: Optional[str] = None, y: Optional[str] = None, z: Optional[str] = None, thumb: int = 256,
                 full_max: int = 2048, by_axes: bool = False) -> None:
        self.keys = list(keys) if keys is not None else getattr(jobs, "keys", None)
        self.out_dir, self.thumb, self.full_max = Path(out_dir), thumb, full_max
        jobs = sorted(jobs, key=lambda j: j.num)
        self.axes = choose_axes(jobs, self.keys, x, y, z)
        self.name = axes_name(self.axes) if by_axes else ""
        self.images = _Images()
        self.images.prepare(jobs, thumbs=[(thumb, True)],
                            jpegs=_page_jpegs(thumb, _full_max(jobs, full_max), FULL_QUALITY))
        self.grids = write_grids(jobs, self.out_dir, self.axes, thumb, self.images,
                                 axes_name(self.axes, pages=False) if by_axes else "")

    def finish(self, jobs: Sequence[GridJob], title: Optional[str] = None,
               overrides: Optional[Sequence[str]] = None) -> ReportFiles:
        title = title if title is not None else getattr(jobs, "title", "")
        overrides = overrides if overrides is not None else getattr(jobs, "overrides", [])
        text = report_html(sorted(jobs, key=lambda j: j.num), self.axes, keys=self.keys, title=title or "",
                           overrides=overrides, thumb=self.thumb, full_max=self.full_max, images=self.images)
        html_name = f"report_{self.name}.html" if self.name else "report.html"
        page = atomic_write(self.out_dir / html_name, lambda tmp: tmp.write_text(text, encoding="utf-8"))
        return ReportFiles(page, self.grids)


@dataclass
class _ReportArgs:
    folder: Optional[str] = None
    run: Optional[str] = None
    tracking_uri: str = DEFAULT_TRACKING_URI
    out: Optional[str] = None
    options: dict[str, str] = field(default_factory=dict)


def _parse_report_args(argv: Sequence[str]) -> _ReportArgs:
    args = _ReportArgs()
    flags = {"--run": "run", "--tracking-uri": "tracking_uri", "--out": "out"}
    argv = list(argv)
    while argv:
        arg = argv.pop(0)
        flag, eq, inline = arg.partition("=")
        if flag in flags:
            if not eq and not argv:
                raise ReportError(f"{flag} needs a value ({USAGE[7:]})")
            setattr(args, flags[flag], inline if eq else argv.pop(0))
            continue
        key, eq, value = arg.partition("=")
        if eq and key in ("x", "y", "z", "thumb", "title"):
            args.options[key] = value
        elif args.folder is None and not arg.startswith("-") and not (eq and key.isidentifier()):
            args.folder = arg
        else:
            raise ReportError(f"unexpected argument {arg!r} ({USAGE[7:]})")
    if (args.folder is None) == (args.run is None):
        raise ReportError(f"give a sweep folder or --run PARENT_RUN_ID, not {'both' if args.folder else 'neither'} "
                          f"({USAGE[7:]})")
    return args


def _thumb(options: Mapping[str, str]) -> int:
    try:
        thumb = int(options.get("thumb", "256"))
    except ValueError:
        raise ReportError(f"thumb={options['thumb']!r}: give a size in pixels, e.g. thumb=256") from None
    if not 32 <= thumb <= 2048:
        raise ReportError(f"thumb={thumb}: choose between 32 and 2048 pixels")
    return thumb


def _report_jobs(args: _ReportArgs) -> tuple[JobList, Path]:
    """The jobs to report and the folder the report goes to."""
    if args.folder is not None:
        jobs, out = jobs_from_sweep_dir(Path(args.folder)), Path(args.folder)
        if not jobs:
            raise ReportError(f"{out / 'jobs.csv'} lists no jobs")
        return jobs, out
    out = Path(args.out or Path("outputs") / "reports" / str(args.run))
    from .tracking.store import sqlite_path

    db = sqlite_path(args.tracking_uri)
    if db is not None and not db.is_file():  # MLflow would create an empty store there
        raise ReportError(f"no MLflow store {db}: give the store of the sweep with --tracking-uri sqlite:///PATH "
                          "(a sweep prints it when it starts)")
    jobs = jobs_from_mlflow(args.tracking_uri, str(args.run), out)
    if not jobs:
        raise ReportError(f"MLflow run {args.run} in {args.tracking_uri} has no child runs: give the parent run of "
                          "a sweep (the run named `sweep ...`)")
    return jobs, out


def report_main(argv: Sequence[str]) -> int:
    """`python -m runner report SWEEP_DIR [x=KEY] [y=KEY] [z=KEY] [thumb=N] [title=TEXT]`: rebuild
    the grid(s) and the report of a sweep folder from its jobs.csv (or its job folders); with
    `--run PARENT_RUN_ID [--tracking-uri URI] [--out DIR]` from a sweep's MLflow parent run (its
    children's images are downloaded into DIR, default outputs/reports/<run id>), and the new
    files are logged to that parent run. The files are named by their axes
    (`grid_x=seed_y=lora.alpha.png`, `report_x=seed_y=lora.alpha.html`): a rebuild never
    replaces the sweep's own grid.png and report.html, nor a rebuild with other axes. 0 when
    written, 2 (one line on stderr) for a missing folder or run, no jobs, an unknown axis key
    or a bad argument, 1 when the files could not be logged to the parent run."""
    argv = list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    try:
        args = _parse_report_args(argv)
        thumb = _thumb(args.options)
        jobs, out = _report_jobs(args)
        files = write_report(jobs, out, x=args.options.get("x") or None, y=args.options.get("y") or None,
                             z=args.options.get("z") or None, thumb=thumb, title=args.options.get("title"),
                             by_axes=True)
    except ReportError as e:
        print(f"report: {e}", file=sys.stderr)
        return 2
    for path in files.all:
        print(path)
    if args.run is not None:
        return _log_to_parent(args, files)
    return 0


def _log_to_parent(args: _ReportArgs, files: ReportFiles) -> int:
    """The rebuilt files onto the sweep's parent run, beside its own (never over them)."""
    from mlflow import MlflowClient

    try:
        client = MlflowClient(tracking_uri=args.tracking_uri)
        for path in files.all:
            client.log_artifact(str(args.run), str(path))
    except Exception as e:  # noqa: BLE001 - one line: the files are written, only their upload failed
        print(f"report: could not log {', '.join(p.name for p in files.all)} to run {args.run} in "
              f"{args.tracking_uri}: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return 1
    print(f"report: logged {', '.join(p.name for p in files.all)} to run {args.run} in {args.tracking_uri}",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(report_main(sys.argv[1:]))
