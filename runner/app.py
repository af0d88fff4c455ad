"""The Hydra app behind `python -m runner`: one job = one image.

    python -m runner model=qwen_image_tiny sampler=tiny
    python -m runner -m model=qwen_image_tiny sampler=tiny seed=0,1 lora=file lora.path=l.safetensors lora.alpha=0,1

A job never raises out of the task function: a failure (missing file, out of memory, a bad
value) is logged, its MLflow run ends FAILED, and the sweep goes on; `runner.__main__` exits
non-zero at the end listing the failed jobs. This matters because Hydra skips
`on_multirun_end` when a job raises, which would leave the sweep's parent run RUNNING.
Ctrl-C (or SIGTERM) ends the current job's run and the parent KILLED.
"""
from __future__ import annotations

import hashlib
import json
import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict

from . import build
from .report import METRICS, JobRecord, atomic_write, contact_sheet, save_png, swept_keys, write_table
from .spec import ConfigError, RunSpec, TrackingBackend, TrackingSpec, check_keys, register_configs, to_spec, validate
from .tracking import (
    CONFIG_HASH_TAG,
    FAILED,
    FINISHED,
    KILLED,
    Tracker,
    fingerprint_tags,
    flatten,
    provenance_tags,
    store_uri,
)

logger = logging.getLogger("runner")

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
SKIPPED = "SKIPPED"
# keys that do not change the image: left out of the resume fingerprint
_NOT_IN_HASH = ("resume", "tracking", "progress_bar", "run_name")

register_configs()


@dataclass
class Sweep:
    sweep_dir: Path
    overrides: list[str]
    tracker: Optional[Tracker]
    parent_id: Optional[str]
    tracking: TrackingSpec
    swept: list[str] = field(default_factory=list)  # keys with several values (seed, lora.alpha)
    records: list[JobRecord] = field(default_factory=list)
    logged_inputs: set[str] = field(default_factory=set)  # sha256 of the input pictures on the parent run

    def label(self, overrides: list[str], num: int) -> str:
        """A job's name: its values of the swept keys (`seed=1 lora.alpha=0.5`)."""
        mine = [o for o in overrides if _override_key(o) in self.swept]
        return " ".join(mine) or f"job {num}"


def _override_key(override: str) -> str:
    return override.partition("=")[0].lstrip("+~")


def _swept_keys(overrides: list[str]) -> list[str]:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
        return [o.key_or_group for o in parsed if o.is_sweep_override()]
    except Exception:  # noqa: BLE001 - a naming nicety only
        return [_override_key(o) for o in overrides if "," in o.partition("=")[2]]


@dataclass
class State:
    """Process-wide: Hydra's default launcher runs a sweep's jobs one after another in this
    process, so this (and build's pipeline cache) lives across jobs."""

    sweep: Optional[Sweep] = None
    failed: list[JobRecord] = field(default_factory=list)
    trackers: dict[tuple, Tracker] = field(default_factory=dict)


STATE = State()


def get_tracker(tracking: TrackingSpec, experiment: str) -> Optional[Tracker]:
    if tracking.backend is TrackingBackend.none:
        return None
    key = (store_uri(tracking), experiment, tracking.artifact_location)
    if key not in STATE.trackers:
        STATE.trackers[key] = Tracker(tracking, experiment)
    return STATE.trackers[key]


def _plain(cfg: DictConfig) -> dict:
    """The resolved config as plain data (enums as their names); unresolvable
    interpolations are kept as written."""
    cfg = cfg.copy()
    with open_dict(cfg):
        cfg.pop("hydra", None)
    try:
        return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    except Exception:  # noqa: BLE001 - a broken interpolation is reported by to_spec
        return OmegaConf.to_container(cfg, resolve=False, enum_to_str=True)


def config_hash(resolved: dict, rt: build.Runtime) -> str:
    """Identity of a job's result: the resolved config without run-control keys, plus the
    device and dtype that `auto` resolved to."""
    core = {k: v for k, v in resolved.items() if k not in _NOT_IN_HASH}
    blob = json.dumps({"config": core, "device": rt.device, "dtype": rt.dtype}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


# ------------------------------------------------------------------------ sweeps


def start_sweep(config: DictConfig) -> Sweep:
    """The parent run of a multirun (called from `on_multirun_start`)."""
    plain = config.copy()
    with open_dict(plain):
        plain.pop("hydra", None)
    overrides = [str(o) for o in config.hydra.overrides.task]
    try:
        check_keys(plain, RunSpec)  # a misspelt `+key` fails the sweep before any job
        tracking = OmegaConf.to_object(config.tracking)
        for key in _swept_keys(overrides):
            if key == "experiment" or key.startswith("tracking"):  # one parent run holds the jobs
                raise ConfigError(key, "cannot be swept: every job of a sweep logs under the sweep's parent run",
                                  f"run one sweep per value of {key}")
    except ConfigError as e:
        logger.error("%s", e)
        raise SystemExit(2) from None
    sweep_dir = Path(config.hydra.sweep.dir)
    experiment = str(config.experiment)
    tracker = get_tracker(tracking, experiment)
    parent_id = None
    if tracker is not None:
        name = config.get("run_name") or f"sweep {sweep_dir.parent.name} {sweep_dir.name}"
        tags = {"runner.kind": "sweep", "runner.sweep_dir": str(sweep_dir.resolve()),
                "runner.overrides": " ".join(overrides)}
        tags.update({k: v for k, v in provenance_tags("cpu").items() if not k.startswith("device.")})
        parent_id = tracker.start_run(name, tags)
        tracker.log_params(parent_id, {_override_key(o): o.partition("=")[2] for o in overrides})
        logger.info("Sweep %s: MLflow parent run %s in %s (experiment %r)", sweep_dir, parent_id, tracker.uri,
                    experiment)
    STATE.sweep = Sweep(sweep_dir, overrides, tracker, parent_id, tracking, swept=_swept_keys(overrides))
    return STATE.sweep


def finish_sweep(status: Optional[str] = None) -> None:
    """Contact sheet + job table into the sweep folder and onto the parent run, then end the
    parent: KILLED when interrupted, FAILED when a job failed, else FINISHED. Safe to call
    twice (the second call does nothing)."""
    sweep, STATE.sweep = STATE.sweep, None
    if sweep is None:
        return
    records = sweep.records
    if status is None:
        status = FAILED if any(r.status in (FAILED, KILLED) for r in records) else FINISHED
    try:
        if records:
            sweep.sweep_dir.mkdir(parents=True, exist_ok=True)
            sheet = contact_sheet(records, sweep.tracking.contact_sheet_thumb)
            sheet_path = sweep.sweep_dir / "contact_sheet.png"
            atomic_write(sheet_path, lambda tmp: sheet.save(tmp, format="PNG"))
            table_path = write_table(records, sweep.sweep_dir / "jobs.csv")
            logger.info("Sweep %s: contact sheet %s, table %s", status, sheet_path, table_path)
            if sweep.tracker is not None and sweep.parent_id is not None:
                t, pid = sweep.tracker, sweep.parent_id
                t.log_image(pid, sheet, key="contact_sheet")
                t.log_file(pid, sheet_path)
                t.log_file(pid, table_path)
                counts = {s: sum(r.status == s for r in records) for s in (FINISHED, FAILED, KILLED, SKIPPED)}
                t.log_metrics(pid, {f"jobs_{s.lower()}": n for s, n in counts.items()} | {"jobs": len(records)})
                t.set_tags(pid, {"runner.swept_keys": " ".join(swept_keys(records))})
    except Exception:  # noqa: BLE001 - the parent must still be ended
        logger.exception("Could not write the sweep's contact sheet / table")
        status = FAILED if status == FINISHED else status
    finally:
        if sweep.tracker is not None and sweep.parent_id is not None:
            sweep.tracker.end_run(sweep.parent_id, status)


def abort(status: str) -> None:
    """Exit path (Ctrl-C, a Hydra error between jobs): end the sweep and every run this
    process left open with `status`."""
    if STATE.sweep is not None:
        finish_sweep(status)
    for tracker in STATE.trackers.values():
        tracker.end_all(status)


class SweepCallback(Callback):
    """Registered in conf/config.yaml (hydra.callbacks.runner_sweep)."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        start_sweep(config)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        finish_sweep()


# -------------------------------------------------------------------------- jobs


def _job_context() -> tuple[bool, int, list[str], Path]:
    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    try:
        num = int(hc.job.num) if multirun else 0
    except Exception:  # noqa: BLE001 - job.num is ??? outside a sweep
        num = 0
    return multirun, num, [str(o) for o in hc.overrides.task], Path(hc.runtime.output_dir)


def _reset_peak_memory(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.reset_peak_memory_stats(device)
        return
    try:  # Linux: reset the process's peak RSS (VmHWM) so the peak is this job's
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _peak_memory_mb(device: str) -> float:
    if device.startswith("cuda"):
        import torch

        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def run_job(cfg: DictConfig) -> JobRecord:
    multirun, num, overrides, job_dir = _job_context()
    record = JobRecord(num=num, overrides=overrides, job_dir=job_dir)
    sweep = STATE.sweep if multirun else None
    if multirun and sweep is None:  # the callback was removed from the config: still track the sweep
        sweep = start_sweep(_sweep_config_fallback(cfg))
    if sweep is not None:
        sweep.records.append(record)
    started = time.perf_counter()
    label = sweep.label(overrides, num) if sweep is not None else (" ".join(overrides) or "defaults")
    tracker: Optional[Tracker] = None
    run_id: Optional[str] = None
    resolved = _plain(cfg)
    try:
        spec_error: Optional[Exception] = None
        spec: Optional[RunSpec] = None
        try:
            parsed = to_spec(cfg)
            validate(parsed)
            rt = build.resolve_runtime(parsed)
            spec = parsed
        except Exception as e:  # noqa: BLE001 - recorded as this job's failure below
            spec_error = e

        if sweep is not None:
            tracker = sweep.tracker
        elif spec is not None:
            tracker = get_tracker(spec.tracking, spec.experiment)
        else:
            tracker = _tracker_from_raw(cfg)
        chash = config_hash(resolved, rt) if spec is not None else None

        if spec is not None and spec.resume and tracker is not None:
            previous = tracker.find_finished(chash)
            if previous is not None:
                return _skip(record, tracker, previous, label)

        if tracker is not None:
            run_name = spec.run_name if spec is not None else None
            name = (f"{run_name} {label}" if sweep is not None else run_name) if run_name else label
            tags = {"runner.kind": "job", "runner.job_num": num, "runner.overrides": " ".join(overrides),
                    "runner.job_dir": str(job_dir.resolve()), CONFIG_HASH_TAG: chash}
            run_id = tracker.start_run(name, tags, parent_id=sweep.parent_id if sweep else None)
            record.run_id = run_id
            params = flatten(resolved)
            if spec is not None:
                params.update({"runtime.device": rt.device, "runtime.dtype": rt.dtype})
            tracker.log_params(run_id, params)
            tracker.log_text(run_id, OmegaConf.to_yaml(resolved), "config.yaml")

        if spec_error is not None:
            raise spec_error
        assert spec is not None
        seed = spec.seed if spec.seed is not None else random.randrange(2**31)
        arguments = build.preflight(spec, seed)
        _generate_and_log(spec, rt, arguments, record, tracker, run_id, job_dir, label)
    except KeyboardInterrupt:
        record.status, record.error = KILLED, "interrupted"
        build.forget_lora_state(build.current())
        if tracker is not None and run_id is not None:
            tracker.end_run(run_id, KILLED)
        logger.error("job %d [%s]: KILLED (interrupted)", num, label)
        raise
    except Exception as e:  # noqa: BLE001 - a failed job must not stop the sweep
        record.status, record.error = FAILED, f"{type(e).__name__}: {e}"
        record.metrics.setdefault("total_s", time.perf_counter() - started)
        STATE.failed.append(record)
        build.forget_lora_state(build.current())
        _free_after_failure(e)
        if isinstance(e, ConfigError):
            logger.error("job %d [%s]: FAILED: %s", num, label, e)
        else:
            logger.exception("job %d [%s]: FAILED: %s", num, label, record.error)
        if tracker is not None and run_id is not None:
            try:
                tracker.set_tags(run_id, {"runner.error": record.error})
                tracker.end_run(run_id, FAILED)
            except Exception:  # noqa: BLE001 - the store is unreachable: the exit path retries
                logger.exception("Could not record job %d as FAILED in MLflow", num)
    return record


def _generate_and_log(spec: RunSpec, rt: build.Runtime, arguments: dict[str, Any], record: JobRecord,
                      tracker: Optional[Tracker], run_id: Optional[str], job_dir: Path, label: str) -> None:
    started = time.perf_counter()  # the job's own time: load + LoRA + generate + save
    _reset_peak_memory(rt.device)
    entry, load_s = build.get_pipeline(spec, rt)
    lora_s = build.apply_loras(entry, spec)
    seed = arguments["seed"]
    image = build.generate(entry, arguments)
    timings = dict(getattr(entry.pipe, "timings", {}) or {})
    loras = [(lbl, float(item.alpha)) for lbl, _, item in spec.lora.items()]
    inputs = _input_pictures(entry, spec, arguments)
    gen = {
        "prompt": spec.prompt, "negative_prompt": spec.negative_prompt, "seed": seed,
        "steps": spec.sampler.steps, "cfg_scale": spec.sampler.cfg_scale,
        "height": image.height, "width": image.width, "sampler": spec.sampler.name,
        "scheduler": spec.sampler.scheduler, "call": dict(spec.call), "model": spec.model.name,
        "loras": loras, "dtype": rt.dtype, "device": rt.device,
        "inputs": {arg: [{"file": p.name, "sha256": h} for p, h in files] for arg, files in inputs.items()},
    }
    png = save_png(image, job_dir / "image.png", gen)
    denoise_s = timings.get("denoise_s")
    metrics = {
        "load_s": load_s, "lora_s": lora_s,
        "encode_s": timings.get("encode_s"), "denoise_s": denoise_s,
        "s_per_step": (denoise_s / (timings.get("denoise_steps") or spec.sampler.steps)
                       if denoise_s is not None else None),
        "decode_s": timings.get("decode_s"),
        "total_s": time.perf_counter() - started,
        "peak_mem_mb": _peak_memory_mb(rt.device),
    }
    metrics = {k: float(v) for k, v in metrics.items() if v is not None}
    record.metrics, record.image_path = metrics, png
    if tracker is not None and run_id is not None:
        tags = provenance_tags(rt.device)
        tags.update(_fingerprints(entry, spec))
        params = {f"inputs.{arg}.{i}.sha256": h for arg, files in inputs.items() for i, (_, h) in enumerate(files)}
        if spec.seed is None:
            params["runtime.seed"] = seed
        tracker.log_batch(run_id, metrics=metrics, tags=tags, params=params)
        tracker.log_image(run_id, image, key=spec.tracking.image_key)
        tracker.log_file(run_id, png)
        _log_input_pictures(tracker, run_id, inputs)
        tracker.end_run(run_id, FINISHED)
    record.status = FINISHED
    logger.info(
        "job %d [%s]: FINISHED in %.2f s (load %.2f, lora %.2f, encode %.2f, denoise %.2f = %.3f s/step, "
        "decode %.2f; peak %.0f MB) -> %s",
        record.num, label, metrics["total_s"], load_s, lora_s, metrics.get("encode_s", 0.0),
        metrics.get("denoise_s", 0.0), metrics.get("s_per_step", 0.0), metrics.get("decode_s", 0.0),
        metrics["peak_mem_mb"], png,
    )


def _fingerprints(entry: build.LoadedPipeline, spec: RunSpec) -> dict[str, str]:
    """Checkpoint (once per loaded pipeline) and LoRA fingerprints, through the on-disk cache."""
    from .provenance import FingerprintCache

    cache = FingerprintCache(Path(spec.tracking.store_dir) / "fingerprints.json")
    if entry.fingerprint is None:
        entry.fingerprint = cache.describe(build.checkpoint_files(entry))
    tags = fingerprint_tags("checkpoint", entry.fingerprint)
    for label, _, item in spec.lora.items():
        key = build.lora_state_key(item)
        if key not in entry.lora_fingerprints:
            entry.lora_fingerprints[key] = cache.describe(build.lora_files(item, spec, download=False))
        tags.update(fingerprint_tags(f"lora.{label}", entry.lora_fingerprints[key]))
    return tags


def _input_pictures(entry: build.LoadedPipeline, spec: RunSpec,
                    arguments: dict[str, Any]) -> dict[str, list[tuple[Path, str]]]:
    """The picture files the call read (the pipeline's image arguments given as paths), with
    their sha256, through the fingerprint cache."""
    from .provenance import FingerprintCache

    cache = FingerprintCache(Path(spec.tracking.store_dir) / "fingerprints.json")
    found = {}
    for arg in getattr(entry.pipe, "image_arguments", ()):
        value = arguments.get(arg)
        values = value if isinstance(value, (list, tuple)) else [value]
        paths = [Path(v) for v in values if isinstance(v, (str, Path))]
        if paths:
            found[arg] = [(p, cache.sha256(p)) for p in paths]
    return found


def _log_input_pictures(tracker: Tracker, run_id: str, inputs: dict[str, list[tuple[Path, str]]]) -> None:
    """The input pictures as artifacts under `inputs/`: on the sweep's parent run once per
    picture, on the run itself for a single run."""
    sweep = STATE.sweep
    target = sweep.parent_id if sweep is not None and sweep.parent_id else run_id
    for files in inputs.values():
        for path, digest in files:
            if sweep is not None and digest in sweep.logged_inputs:
                continue
            tracker.log_file(target, path, "inputs")
            if sweep is not None:
                sweep.logged_inputs.add(digest)


def _skip(record: JobRecord, tracker: Tracker, previous: Any, label: str) -> JobRecord:
    record.status = SKIPPED
    record.run_id = previous.info.run_id
    record.metrics = {k: v for k, v in previous.data.metrics.items() if k in METRICS}
    record.image_path = tracker.download(previous.info.run_id, "image.png", record.job_dir)
    logger.info("job %d [%s]: SKIPPED (resume): run %s already finished this config", record.num, label, record.run_id)
    return record


def _tracker_from_raw(cfg: DictConfig) -> Optional[Tracker]:
    """The tracker of a job whose full spec is invalid, if its tracking part is fine."""
    try:
        tracking = OmegaConf.to_object(cfg.tracking)
        return get_tracker(tracking, str(cfg.experiment))
    except Exception:  # noqa: BLE001 - then the failure is only logged
        return None


def _sweep_config_fallback(cfg: DictConfig) -> DictConfig:
    full = cfg.copy()
    with open_dict(full):
        full.hydra = HydraConfig.get()
    return full


def _free_after_failure(error: Exception) -> None:
    try:
        import torch

        if isinstance(error, torch.OutOfMemoryError) and torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # noqa: BLE001 - best effort
        pass


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def main(cfg: DictConfig) -> None:
    run_job(cfg)
