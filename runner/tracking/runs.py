"""What an MLflow run of the runner holds, and the operations on runs that the MLflow writer,
`sync` and `cleanup` share: a job's record logged into its run (`log_job`), a sweep's parent run
started and ended with its comparison files, the finished run resume=true may take
(`checked_run`), and the runs of dead processes ended KILLED.
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
import shlex
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

from ..files import remove_stale_temp_files
from ..owner import ALIVE, DEAD, OTHER_HOST, describe, owner_state, owner_tags
from ..records import FINISHED, IMAGE_SHA256_TAG, KILLED, OVERRIDES_JSON_TAG, SKIPPED, JobRecord, SweepRecord
from .store import Tracker

logger = logging.getLogger("runner")

LOGGED_TAG = "runner.logged"  # set in a run's last write before it is ended: its record is complete
LOGGED_IMAGES_TAG = "mlflow.loggedImages"  # what MlflowClient.log_image sets: the UI shows the image grid


def image_artifacts(folder: Path, image: Path, key: str, step: int = 0) -> dict[str, str]:
    """Lay `image` out in `folder` as MlflowClient.log_image(key=key, step=step) stores it (the
    UI's image grid reads these names and the tag returned), without re-encoding the PNG:
    the PNG is copied, only the small webp preview is encoded."""
    from mlflow.tracking.multimedia import compress_image_size
    from PIL import Image

    stem = f"{key.replace('/', '~')}+step+{step}+timestamp+{int(time.time() * 1000)}+{uuid.uuid4()}"
    (folder / "images").mkdir(exist_ok=True)
    shutil.copyfile(image, folder / "images" / f"{stem}.png")
    with Image.open(image) as im:
        # method 0: Pillow's default (4) takes ~6x longer for a preview the UI shows at 256 px
        compress_image_size(im).save(folder / "images" / f"{stem}+compressed.webp", method=0)
    return {LOGGED_IMAGES_TAG: "True"}


def log_job(tracker: Tracker, record: JobRecord, run_id: str, parent_id: Optional[str], present: Iterable[str] = (),
            logged_inputs: Optional[set] = None) -> None:
    """Log a job's record into its run, then end the run with the record's status and end
    time: the artifacts (config.yaml, image.png, the image for the UI's grid) in one request,
    then params, metrics and tags in one batch that carries runner.logged (the record is
    complete), then the end. `present`: params the run has already (MLflow params are
    write-once)."""
    tags = {**record.tags, LOGGED_TAG: "true", OVERRIDES_JSON_TAG: json.dumps(record.overrides)}
    if record.error:
        tags["runner.error"] = record.error
    with tempfile.TemporaryDirectory(prefix="runner-artifacts-") as tmp:
        folder = Path(tmp)
        (folder / "config.yaml").write_text(_yaml(record.config), encoding="utf-8")
        image = Path(record.image_path) if record.image_path else None
        if image is not None and image.is_file():
            shutil.copyfile(image, folder / "image.png")
            tags.update(image_artifacts(folder, image, record.tracking.get("image_key") or "image"))
        tracker.log_dir(run_id, folder)
    _log_inputs(tracker, record, parent_id or run_id, logged_inputs if logged_inputs is not None else set())
    params = {k: v for k, v in logged_params(record).items() if k not in set(present)}
    tracker.log_batch(run_id, metrics=record.metrics, params=params, tags=tags)
    tracker.end_run(run_id, record.status if record.status != SKIPPED else FINISHED, end_time=record.ended,
                    force=True)


# the params of a job's run: what a user filters and compares runs by (the run's card and the
# Compare page stay readable); the whole config is the run's config.yaml artifact
LOGGED_PARAMS = ("model.name", "prompt", "negative_prompt", "seed", "sampler.name", "sampler.steps",
                 "sampler.cfg_scale", "sampler.height", "sampler.width", "lora.name", "vram.name", "controlnet.name",
                 "dtype", "device")
# call arguments, what `auto` resolved to and a drawn seed, the input pictures' sha256
LOGGED_PREFIXES = ("call.", "runtime.", "inputs.")
_LORA_PARAM = re.compile(r"lora\.(stack\.[^.]+\.)?(alpha|path|model_id)")  # each LoRA and its strength
# each ControlNet condition: its net, pictures, strength and window (when a ControlNet is used)
_CONTROL_PARAM = re.compile(r"controlnet\.(inputs\.\d+\.)?(controlnet_id|image|mask|inpaint_image|scale|start|end)")


def logged_params(record: JobRecord) -> dict[str, Any]:
    """The record's params that its run gets: LOGGED_PARAMS, the LoRAs, every key the job's
    overrides set (a preset choice `vram=low_vram` as its `vram.name`)."""
    params = record.params
    chosen = set(LOGGED_PARAMS)
    for override in record.overrides:
        key = override.partition("=")[0].lstrip("+~")
        if key in params or f"{key}.name" in params:
            chosen.add(key if key in params else f"{key}.name")
        else:  # a mapping given whole (`call={...}`, `+lora.stack.mine={...}`): its keys
            chosen.update(k for k in params if k.startswith(key + "."))

    controlnet = params.get("controlnet.name") not in (None, "none")

    def wanted(key: str, value: Any) -> bool:
        lora = _LORA_PARAM.fullmatch(key)
        control = controlnet and value is not None and _CONTROL_PARAM.fullmatch(key) is not None
        return key in chosen or key.startswith(LOGGED_PREFIXES) or control or bool(
            lora and (value is not None or lora.group(2) == "alpha"))

    return {k: v for k, v in params.items() if wanted(k, v)}


def _log_inputs(tracker: Tracker, record: JobRecord, target: str, logged: set) -> None:
    """The input pictures as artifacts under `inputs/`: on the sweep's parent run once per
    picture, on the run itself for a single run. An input without a path (sync: a picture
    outside the folder, never read) has only its sha256, a param of the run."""
    for item in record.inputs:
        path = Path(item["path"]) if item.get("path") else None
        if item["sha256"] in logged or path is None or not path.is_file():
            continue
        tracker.log_file(target, path, "inputs")
        logged.add(item["sha256"])


def log_sweep_end(tracker: Tracker, sweep: SweepRecord, files: Iterable[Path]) -> None:
    """The parent run's end: the sweep's comparison files (jobs.csv, report.html, the grid
    PNGs, which also go into the UI's image grid under the key `grid`, one step per page), job
    counts; then ended."""
    run_id = sweep.parent_run_id
    assert run_id is not None
    tags = {**sweep.tags, LOGGED_TAG: "true"}
    with tempfile.TemporaryDirectory(prefix="runner-artifacts-") as tmp:
        folder = Path(tmp)
        grids = 0
        for path in files:
            if not path.is_file():
                continue
            shutil.copyfile(path, folder / path.name)
            if path.suffix == ".png":
                tags.update(image_artifacts(folder, path, "grid", step=grids))
                grids += 1
        if any(folder.iterdir()):
            tracker.log_dir(run_id, folder)
    tracker.log_batch(run_id, metrics=sweep.metrics, tags=tags)
    tracker.end_run(run_id, sweep.status, end_time=sweep.ended, force=True)


def checked_run(tracker: Tracker, run: Any, folder: Path) -> dict[str, Any]:
    """What resume=true may take from a FINISHED run: {run_id, metrics, tags (its files'
    sha256), image (its image.png, fetched into `folder` and equal to the sha256 the run
    recorded)}; or {run_id, rerun: why not} when its image is missing, another, or unknown."""
    run_id, tags = run.info.run_id, run.data.tags
    recorded = tags.get(IMAGE_SHA256_TAG)
    if not recorded:
        return {"run_id": run_id, "rerun": f"the earlier run {run_id} recorded no sha256 of its image (an older "
                                           "runner logged it)"}
    image = tracker.download(run_id, "image.png", folder)
    if image is None or not image.is_file():
        return {"run_id": run_id, "rerun": f"the earlier run's image is missing (run {run_id} has no image.png)"}
    found = hashlib.sha256(image.read_bytes()).hexdigest()
    if found != recorded:
        image.unlink()
        return {"run_id": run_id, "rerun": f"the earlier run's image is not the one it recorded (run {run_id}: "
                                           f"sha256 {found[:12]}, recorded {recorded[:12]})"}
    return {"run_id": run_id, "metrics": dict(run.data.metrics), "image": str(image),
            "tags": {k: v for k, v in tags.items() if k.endswith(".sha256")}}


def start_sweep_run(tracker: Tracker, sweep: SweepRecord, extra_tags: Mapping[str, str]) -> str:
    run_id = tracker.start_run(sweep.name, {**sweep.tags, **extra_tags}, start_time=sweep.started)
    tracker.log_params(run_id, sweep.params)
    return run_id


def _yaml(config: Mapping[str, Any]) -> str:
    import yaml  # PyYAML (Hydra's own dependency): 20x faster than a round trip through OmegaConf

    dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)  # libyaml's, where PyYAML has it: ~10x faster
    return yaml.dump(dict(config), Dumper=dumper, sort_keys=False, default_flow_style=False, allow_unicode=True)


# ------------------------------------------------------------------- dead runs


def end_dead_runs(tracker: Tracker) -> tuple[list[Any], list[Any], list[Any]]:
    """End as KILLED the RUNNING runs whose owner process is gone on this host. Returns
    (ended, left: of another host or still alive, unknown: without owner tags)."""
    ended, left, unknown = [], [], []
    for run in tracker.running_runs():
        state = owner_state(run.data.tags)
        if state == DEAD:
            tracker.set_tags(run.info.run_id, {"runner.ended_by": f"cleanup by {describe(owner_tags())}"})
            tracker.end_run(run.info.run_id, KILLED, force=True)
            ended.append(run)
        elif state in (OTHER_HOST, ALIVE):
            left.append(run)
        else:
            unknown.append(run)
    return ended, left, unknown


def plain_run(run: Any) -> dict[str, Any]:
    """What the reports below need of an MLflow run, as plain data."""
    keep = ("runner.owner.host", "runner.owner.pid", "runner.owner.start", "runner.job_dir", "runner.sweep_dir")
    return {"run_id": run.info.run_id, "name": run.info.run_name,
            "tags": {k: v for k, v in run.data.tags.items() if k in keep}}


def report_dead_runs(experiment: str, uri: str, ended: list[dict], left: list[dict], unknown: list[dict]) -> None:
    for run in ended:
        logger.info("Ended run %s (%s) as KILLED: its process (%s) is gone", run["run_id"], run["name"],
                    describe(run["tags"]))
    for run in left:
        tags = run["tags"]
        why = "its process still runs" if owner_state(tags) == ALIVE else \
            f"owned by {describe(tags)}, another host: run `python -m runner cleanup` there"
        logger.warning("Left run %s (%s) RUNNING: %s", run["run_id"], run["name"], why)
    for run in unknown:
        logger.warning("Left run %s (%s) RUNNING: it has no owner tags (not started by this runner); end it in "
                       "the MLflow UI if its process is gone", run["run_id"], run["name"])
    if not (ended or left or unknown):
        logger.info("No RUNNING run in experiment %r of %s", experiment, uri)


def folders_of(runs: Sequence[dict]) -> set[Path]:
    out = set()
    for run in runs:
        for key in ("runner.job_dir", "runner.sweep_dir"):
            value = run["tags"].get(key)
            if value:
                out.add(Path(value))
    return out


def remove_leftovers(folders: Sequence[Path], stores: Sequence[Path], ended: Sequence[dict]) -> None:
    """Remove the leftovers of interrupted writes of dead processes in the runner's folders
    under `folders` and in `stores` (runner.files.remove_stale_temp_files). The folders the
    `ended` runs' tags name are not searched: a store's tags never choose what is deleted;
    the log says how to clean them."""
    for path in remove_stale_temp_files(folders, stores):
        logger.info("Removed %s (an interrupted write of a process that is gone)", path)
    roots = [Path(f).resolve() for f in folders]
    named = sorted(p for p in folders_of(ended) if not any(p == r or r in p.parents for r in roots))
    if named:
        logger.info("Not searched for leftovers of interrupted writes: %s (named by the ended runs' tags, which "
                    "never choose what is deleted). To clean them: python -m runner cleanup %s",
                    ", ".join(map(str, named)), " ".join(f"--dir {shlex.quote(str(p))}" for p in named))


