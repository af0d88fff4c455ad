"""The records a job and a sweep leave beside their images, MLflow or not: the statuses, the
run tags that name a record, the PNG with its generation parameters in text chunks, `job.json`
and `sweep.json` (JobRecord, SweepRecord), the sweep's `jobs.csv`, and which files of a sweep
folder are its own outputs. Plain data: a record crosses processes by pickle or JSON, and
`python -m runner sync DIR` logs a folder into a store from these files alone.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence, Union, get_args, get_origin, get_type_hints

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from .files import atomic_write, exclusive_write

METRICS = ("load_s", "lora_s", "encode_s", "denoise_s", "s_per_step", "decode_s", "total_s", "peak_mem_mb")
RUNNING, FINISHED, FAILED, KILLED, SKIPPED = "RUNNING", "FINISHED", "FAILED", "KILLED", "SKIPPED"
STATUSES = (RUNNING, FINISHED, FAILED, KILLED, SKIPPED)
JOB_FORMAT, SWEEP_FORMAT = "runner.job/1", "runner.sweep/1"
CONFIG_HASH_TAG = "runner.config_hash"  # the identity of a job's result (resume=true)
IMAGE_SHA256_TAG = "runner.image_sha256"  # the sha256 of the run's image.png (resume=true checks the artifact)
RECORD_TAG = "runner.record_id"  # the record a run was logged from (sync is idempotent)
OVERRIDES_JSON_TAG = "runner.overrides_json"  # a run's overrides as a JSON list (runner.overrides: joined by spaces)
# zlib level of the PNGs written: 4 instead of Pillow's 6 writes a 1328x1328 image ~2.5x faster
# for ~4% more bytes (level 1: ~4x faster, ~25% more bytes)
PNG_LEVEL = 4
# the sweep's grid: a sheet `runner report` rebuilds from the images, which the sweep's end waits
# for: level 1 (a 32-cell grid of 256 px cells 0.6 -> 0.26 s, ~15 % more bytes)
GRID_PNG_LEVEL = 1
# a sweep folder's copy of each picture its jobs read (control pictures, masks, edit pictures),
# `inputs/<sha256[:12]>-<file name>`: the report shows them beside the results
INPUTS_DIR = "inputs"


def input_copy_name(sha256: str, file: str) -> str:
    """The name of a picture's copy in a sweep folder's INPUTS_DIR."""
    return f"{sha256[:12]}-{Path(file).name}"


# ------------------------------------------------------------------------ the PNG


def parameters_text(gen: dict[str, Any]) -> str:
    """The A1111-style `parameters` text that image viewers and tools read: the prompt, a
    `Negative prompt:` line, a line of settings. The format has no escaping, so every value is
    put on one line (its line breaks as spaces): a prompt holding a line `Negative prompt: x`
    or `Steps: 9` cannot be read as another field. The `generation` chunk keeps the exact text."""
    loras = ", ".join(f"{_one_line(label)}:{alpha:g}" for label, alpha in gen.get("loras", [])) or "none"
    control = gen.get("controlnet")
    controls = "" if not control else f", ControlNet: {_one_line(control['name'])} " + " ".join(
        f"{_one_line(c.get('image') or c.get('inpaint_image'))}:{c['scale']:g}" for c in control["conditions"])
    return (
        f"{_one_line(gen['prompt'])}\n"
        f"Negative prompt: {_one_line(gen['negative_prompt'])}\n"
        f"Steps: {gen['steps']}, CFG scale: {gen['cfg_scale']}, Seed: {gen['seed']}, "
        f"Size: {gen['width']}x{gen['height']}, Sampler: {_one_line(gen.get('sampler'))}, "
        f"Model: {_one_line(gen['model'])}, LoRAs: {loras}{controls}"
    )


def _one_line(value: Any) -> str:
    return " ".join(str(value).splitlines())


def save_png(image: Image.Image, path: Path, gen: dict[str, Any]) -> Path:
    """Save with two text chunks: `parameters` (human-readable) and `generation` (JSON).
    Never over an existing file."""
    info = PngInfo()
    info.add_text("parameters", parameters_text(gen))
    info.add_text("generation", json.dumps(gen, sort_keys=True))
    return exclusive_write(Path(path), lambda tmp: image.save(tmp, format="PNG", pnginfo=info,
                                                                 compress_level=PNG_LEVEL))


def read_generation(path: Path) -> dict[str, Any]:
    with Image.open(path) as im:  # save_png's chunks precede the pixels: `info` has them without a decode
        return json.loads(im.info["generation"] if "generation" in im.info else im.text["generation"])


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


# ------------------------------------------------------------------------ records


def _new_id() -> str:
    return uuid.uuid4().hex


def _plain(value: Any) -> Any:
    """JSON-ready: paths as strings, enums as their values, containers recursively."""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "value") and not isinstance(value, (str, int, float, bool)):
        return value.value
    return value


class RecordError(ValueError):
    """A record file (job.json, sweep.json) that is not as the runner writes it: bad JSON, a
    key missing or of the wrong type. The message names the file and the key."""


def _type_problem(value: Any, hint: Any, key: str) -> Optional[str]:
    """Why `value` does not fit the type `hint` (None: it fits), naming the key inside it."""
    origin, args = get_origin(hint), get_args(hint)
    if hint is Any:
        return None
    if origin is Union:
        if value is None and type(None) in args:
            return None
        return _type_problem(value, next(a for a in args if a is not type(None)), key)
    if origin in (list, dict):
        if not isinstance(value, origin):
            return f"`{key}` is {_shown(value)}, not a {'list' if origin is list else 'mapping'}"
        items = enumerate(value) if origin is list else value.items()
        for k, v in items:
            inner = f"{key}[{k}]" if origin is list else f"{key}.{k}"
            problem = _type_problem(v, args[-1], inner) if args else None
            if problem:
                return problem
        return None
    names = {str: "a string", int: "an integer", float: "a number", bool: "true or false"}
    ok = isinstance(value, (int, float) if hint is float else hint) and (hint is bool or not isinstance(value, bool))
    return None if ok else f"`{key}` is {_shown(value)}, not {names.get(hint, hint)}"


def _shown(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


class _Record:
    """JSON round trip of a record dataclass; unknown keys of a newer format are ignored."""

    def to_json(self) -> dict[str, Any]:
        return {"format": self.FORMAT, **{f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]):
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def write(self, path: Path) -> Path:
        text = json.dumps(self.to_json(), indent=1, sort_keys=True, default=str)
        return atomic_write(Path(path), lambda tmp: tmp.write_text(text, encoding="utf-8"))

    @classmethod
    def problems(cls, data: Any) -> Optional[str]:
        """What makes `data` not a record of this kind (None: it is one)."""
        if not isinstance(data, dict):
            return f"it holds {_shown(data)}, not a {cls.FORMAT} record"
        if not str(data.get("format", "")).startswith(cls.FORMAT.split("/")[0]):
            return f"`format` is {_shown(data.get('format'))}: not a {cls.FORMAT} record"
        hints = get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.name not in data:
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                    return f"`{f.name}` is missing"
                continue
            problem = _type_problem(data[f.name], hints[f.name], f.name)
            if problem:
                return problem
        return cls._value_problems(data)

    @classmethod
    def _value_problems(cls, data: dict) -> Optional[str]:
        status = data.get("status", RUNNING)
        if status not in STATUSES:
            return f"`status` is {_shown(status)}, not one of {', '.join(STATUSES)}"
        return None

    @classmethod
    def read(cls, path: Path):
        """The record in `path`; RecordError naming the file and the key when it is not one."""
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as error:
            raise RecordError(f"{path}: not UTF-8 text (byte {error.start}): {_NOT_OURS}") from None
        except json.JSONDecodeError as error:
            raise RecordError(f"{path}: not valid JSON ({error.msg} at line {error.lineno}, column "
                              f"{error.colno}): {_NOT_OURS}") from None
        problem = cls.problems(data)
        if problem:
            raise RecordError(f"{path}: {problem}: {_NOT_OURS}")
        return cls.from_json(data)


_NOT_OURS = ("the runner did not write it so (damaged or edited). Fix: restore the file, or move its folder "
             "out of the way")


@dataclass
class JobRecord(_Record):
    """Everything about one job that outlives its process, written as `<job folder>/job.json`:
    enough for a recorder to log the job into any MLflow store later. Plain data only (it
    crosses process boundaries by pickle or JSON)."""

    FORMAT = JOB_FORMAT

    num: int
    overrides: list[str]
    status: str = RUNNING  # FINISHED | FAILED | KILLED | SKIPPED
    run_id: Optional[str] = None  # the MLflow run, once a recorder logged it
    metrics: dict[str, float] = field(default_factory=dict)
    image_path: Optional[str] = None
    error: str = ""
    job_dir: Optional[str] = None
    record_id: str = field(default_factory=_new_id)  # tag runner.record_id of its run: sync is idempotent
    name: str = ""  # the run name
    error_kind: str = ""  # "" | config | output | runtime | interrupted
    params: dict[str, Any] = field(default_factory=dict)  # the flattened config + what was drawn
    tags: dict[str, str] = field(default_factory=dict)  # provenance, fingerprints, the job's identity
    config: dict[str, Any] = field(default_factory=dict)  # the resolved config (config.yaml)
    config_hash: str = ""
    inputs: list[dict[str, Any]] = field(default_factory=list)  # {arg, index, path, sha256}
    started: Optional[float] = None  # epoch seconds
    ended: Optional[float] = None
    experiment: str = ""
    tracking: dict[str, Any] = field(default_factory=dict)  # where it was meant to be logged
    sweep_id: Optional[str] = None
    tracked: Optional[bool] = None  # None: tracking off; False: not (fully) in MLflow

    @classmethod
    def _value_problems(cls, data: dict) -> Optional[str]:
        for i, item in enumerate(data.get("inputs", [])):
            for key, kind in (("arg", str), ("index", int), ("path", str), ("sha256", str)):
                problem = _type_problem(item.get(key), kind, f"inputs[{i}].{key}")
                if problem:
                    return problem
        return super()._value_problems(data)


@dataclass
class SweepRecord(_Record):
    """A sweep, written as `<sweep folder>/sweep.json` when it starts and when it ends."""

    FORMAT = SWEEP_FORMAT

    sweep_id: str = field(default_factory=_new_id)
    sweep_dir: str = ""
    overrides: list[str] = field(default_factory=list)
    name: str = ""
    status: str = RUNNING
    params: dict[str, Any] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    experiment: str = ""
    tracking: dict[str, Any] = field(default_factory=dict)
    jobs: int = 0
    started: Optional[float] = None
    ended: Optional[float] = None
    parent_run_id: Optional[str] = None
    tracked: Optional[bool] = None
    owner: dict[str, str] = field(default_factory=dict)


def swept_keys(records: Sequence[JobRecord]) -> list[str]:
    """Override keys whose value differs between jobs, in the order of the first job."""
    values: dict[str, set[str]] = {}
    order: list[str] = []
    for r in records:
        for key, value in (split_override(o) for o in r.overrides):
            if key not in values:
                values[key] = set()
                order.append(key)
            values[key].add(value)
    return [k for k in order if len(values[k]) > 1] if len(records) > 1 else order


def split_override(override: str) -> tuple[str, str]:
    """`+lora.alpha=0.5` -> ("lora.alpha", "0.5"): the key as the config names it, the value as typed."""
    key, _, value = override.partition("=")
    return key.lstrip("+~"), value


def status_of(records: Iterable[JobRecord]) -> str:
    """A sweep's status from its jobs': FAILED when one failed or was killed, else FINISHED."""
    return FAILED if any(r.status in (FAILED, KILLED) for r in records) else FINISHED


def write_table(records: Sequence[JobRecord], path: Path, keys: Optional[Sequence[str]] = None) -> Path:
    """A CSV row per job: number, status, MLflow run, swept values, overrides, metrics,
    image (relative to the table's folder), error, and (when the sweep tracked to MLflow)
    `tracked`: yes, or no for a job whose record did not reach the store (`python -m runner sync` logs it later).
    The swept keys: `keys`, default `swept_keys(records)`; a job's value is its override's, else its param's."""
    keys = list(keys) if keys is not None else swept_keys(records)
    with_tracked = any(getattr(r, "tracked", None) is not None for r in records)
    header = ["job", "status", "run_id", *keys, "overrides", *METRICS, "image", "error"]
    header += ["tracked"] if with_tracked else []

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(header)
            for r in records:
                row = ([r.num, r.status, r.run_id or "", *_values(r, keys), " ".join(r.overrides)]
                       + [_fmt(r.metrics.get(m)) for m in METRICS] + [_relative(r.image_path, path.parent), r.error])
                if with_tracked:
                    row.append("yes" if getattr(r, "tracked", None) else "no")
                writer.writerow(row)

    return atomic_write(path, write)


def _values(record: JobRecord, keys: Sequence[str]) -> list[str]:
    """The job's value of each swept key: as its override wrote it, else its param's (a run logged without
    overrides), else empty."""
    wanted = dict(split_override(o) for o in record.overrides)
    return [wanted[k] if k in wanted else str(record.params[k]) if k in record.params else "" for k in keys]


def _relative(image: Optional[str], folder: Path) -> str:
    """An image's path as jobs.csv holds it: relative to the table's folder when inside it (the
    folder can move; `runner report` reads no picture outside it)."""
    if not image:
        return ""
    try:
        return Path(image).resolve().relative_to(Path(folder).resolve()).as_posix()
    except ValueError:
        return str(image)


def _fmt(value: Optional[float]) -> str:
    return "" if value is None else f"{value:.6g}"


REPORT_FILES = ("report.html", "jobs.csv")  # beside the grid PNG(s)


def sweep_outputs(folder: Path) -> list[Path]:
    """The comparison files the sweep itself wrote into its folder (grid PNGs, report.html,
    jobs.csv; not the rebuilds named by their axes): what goes onto the sweep's parent run."""
    folder = Path(folder)
    grids = [p for p in folder.glob("grid*.png") if p.name == "grid.png" or not p.name.startswith("grid_x=")]
    return sorted(grids) + [folder / n for n in REPORT_FILES if (folder / n).is_file()]
