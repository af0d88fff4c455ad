"""One job, computed in this process: `prepare` checks it before any weight is read (a JobPlan,
or a ConfigError naming the key), `compute` makes its image, PNG and job.json in its folder and
returns its record (a failure is recorded, never raised). No MLflow, no launcher: where a job
runs is runner.execution.run's choice; plans and records are plain data that cross processes.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

from omegaconf import DictConfig, OmegaConf

from .. import failpoints
from ..build import pipeline as build
from ..build.arguments import pictures, preflight, read_files, refusal
from ..build.loras import apply_loras, forget_lora_state, lora_files, lora_state_key
from ..config.checks import job_config, to_spec, validate
from ..config.schema import RunSpec, TrackingBackend
from ..errors import ConfigError, OutputError, brief, is_storage_error
from ..records import (
    CONFIG_HASH_TAG,
    FAILED,
    FINISHED,
    IMAGE_SHA256_TAG,
    KILLED,
    RECORD_TAG,
    JobRecord,
    flatten,
    save_png,
)
from ..tracking.provenance import fingerprint_tags, provenance_tags

logger = logging.getLogger("runner")
# keys that do not change the image: left out of the resume fingerprint
_NOT_IN_HASH = ("resume", "tracking", "progress_bar", "run_name", "keep_warm", "report")


@dataclass
class JobPlan:
    """A validated job, ready to compute anywhere: what `compute` needs and nothing of Hydra."""

    num: int
    overrides: list[str]
    spec: RunSpec
    config: dict[str, Any]  # the resolved config, plain data
    runtime: build.Runtime
    config_hash: str
    label: str = ""  # for the log: the swept values (`seed=1 lora.alpha=0.5`)
    name: str = ""  # the MLflow run name
    job_dir: Optional[str] = None  # set by the launcher
    sweep_id: Optional[str] = None
    record_id: str = field(default_factory=lambda: uuid.uuid4().hex)

    def params(self) -> dict[str, Any]:
        return flatten(self.config) | {"runtime.device": self.runtime.device, "runtime.dtype": self.runtime.dtype}

    def tags(self) -> dict[str, str]:
        tags = {"runner.kind": "job", "runner.job_num": str(self.num), "runner.overrides": " ".join(self.overrides),
                "runner.job_dir": str(self.job_dir or ""), CONFIG_HASH_TAG: self.config_hash,
                RECORD_TAG: self.record_id}
        if self.sweep_id:
            tags["runner.sweep_id"] = self.sweep_id
        return tags


def plain_config(cfg: DictConfig) -> dict:
    """The resolved config as plain data (enums as their names), without Hydra's node, the
    prompts as typed."""
    cfg = job_config(cfg)
    try:
        return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    except Exception:  # noqa: BLE001 - a broken interpolation is reported by to_spec
        return OmegaConf.to_container(cfg, resolve=False, enum_to_str=True)


def config_hash(resolved: dict, rt: build.Runtime, files: Optional[dict[str, Any]] = None) -> str:
    """Identity of a job's result: the resolved config without run-control keys, the device and
    dtype that `auto` resolved to, and what `file_identity` says of the files the job reads."""
    core = {k: v for k, v in resolved.items() if k not in _NOT_IN_HASH}
    blob = json.dumps({"config": core, "device": rt.device, "dtype": rt.dtype, "files": files or {}},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def fingerprint_cache(spec: RunSpec):
    """This process's fingerprint cache of the run's store folder (runner.tracking.provenance)."""
    from ..tracking.provenance import FingerprintCache

    return FingerprintCache.shared(Path(spec.tracking.store_dir) / "fingerprints.json")


def file_identity(spec: RunSpec, arguments: dict[str, Any]) -> dict[str, Any]:
    """The files a job reads, for its identity: the sha256 of every file its config names by
    path (LoRAs, input pictures: the same relative path read from another working directory,
    or a file rewritten in place, is another job), and the absolute folders of its checkpoint
    and hub LoRAs (not hashed here: tens of GB; `changed_since` compares their fingerprints
    when resume=true finds an earlier run). Hashes go through the fingerprint cache: a big
    LoRA is read once, not once per job or command."""
    cache = fingerprint_cache(spec)
    content = {}
    for key, path in read_files(spec, arguments).items():
        try:
            content[key] = cache.sha256(path, store=False)  # refused configs leave no cache file behind
        except OSError as error:
            raise ConfigError(key, f"cannot read {path}: {error.strerror or error}",
                              "give a readable file") from None
    return {"sha256": content, "at": build.file_locations(spec)}


def changed_since(plan: JobPlan, tags: dict[str, str]) -> Optional[str]:
    """Why an earlier run with this job's config hash is not this job's result (its checkpoint
    or hub LoRA files were others than those here now), or None. Files not on this machine
    (a Ray cluster's own) are known by their model id and folder only."""
    spec = plan.spec
    wanted: list[tuple[str, str, Callable[[], list]]] = [
        ("checkpoint", "the checkpoint", lambda: build.spec_checkpoint_files(spec, plan.runtime))]
    for label, _, item in spec.lora.items():
        if item.path is None:
            wanted.append((f"lora.{label}", f"LoRA {label}",
                           lambda item=item: lora_files(item, spec, download=False)))
    cache = fingerprint_cache(spec)
    for prefix, what, files in wanted:
        recorded = tags.get(f"{prefix}.sha256")
        if recorded is None:
            return f"the earlier run recorded no sha256 of {what}"
        try:
            paths = files()
            current = cache.describe(paths)["sha256"] if paths else None
        except Exception:  # noqa: BLE001 - not here (a cluster's files, or gone): the id is the identity
            continue
        if current is not None and current != recorded:
            return f"the files of {what} changed since the earlier run (sha256 {recorded[:12]}, now {current[:12]})"
    return None


def prepare(cfg: DictConfig, num: int = 0, overrides: Sequence[str] = (), label: str = "",
            in_sweep: bool = False) -> JobPlan:
    """Everything that can be refused before a weight is read: the schema, the values (the
    library's own parsers: devices, seeds, finite numbers, files), the pipeline's call
    arguments. Raises ConfigError naming the config path and the fix."""
    spec = to_spec(cfg)
    validate(spec)
    runtime = build.resolve_runtime(spec)
    arguments = preflight(spec)
    resolved = plain_config(cfg)
    label = label or " ".join(overrides) or "defaults"
    name = (f"{spec.run_name} {label}" if in_sweep else spec.run_name) if spec.run_name else label
    identity = config_hash(resolved, runtime, file_identity(spec, arguments))
    return JobPlan(num, list(overrides), spec, resolved, runtime, identity, label, name)


def tracking_of(spec: RunSpec) -> dict[str, Any]:
    t = spec.tracking
    return {"backend": t.backend.value, "uri": t.uri, "store_dir": str(Path(t.store_dir).resolve()),
            "artifact_location": t.artifact_location, "image_key": t.image_key}


def new_record(plan: JobPlan) -> JobRecord:
    spec = plan.spec
    return JobRecord(
        num=plan.num, overrides=list(plan.overrides), job_dir=plan.job_dir, record_id=plan.record_id,
        name=plan.name, params=plan.params(), tags=plan.tags(), config=plan.config, config_hash=plan.config_hash,
        started=time.time(), experiment=spec.experiment, tracking=tracking_of(spec), sweep_id=plan.sweep_id,
        tracked=None if spec.tracking.backend is TrackingBackend.none else False)


# ------------------------------------------------------------------------ compute


def compute(plan: JobPlan) -> JobRecord:
    """Run one planned job in this process: the image and `job.json` land in `plan.job_dir`.
    A failure is recorded in the returned record (status FAILED, `error`, `error_kind`);
    Ctrl-C during the job gives status KILLED (the caller re-raises it)."""
    record = new_record(plan)
    started = time.perf_counter()
    try:
        failpoints.hold(f"job{plan.num}")
        _generate(plan, record)
        record.status = FINISHED
    except KeyboardInterrupt:
        _fail(record, KILLED, "interrupted", "interrupted")
    except OutputError as error:
        _fail(record, FAILED, f"OutputError: {error}", "output")
    except ConfigError as error:
        _fail(record, FAILED, f"ConfigError: {error}", "config")
    except Exception as error:  # noqa: BLE001 - a failed job must not stop the sweep
        _fail(record, FAILED, f"{type(error).__name__}: {error}", "runtime")
        logger.exception("job %d [%s]: FAILED: %s", plan.num, plan.label, record.error, extra=brief(error))
        _free_after_failure(error)
    record.ended = time.time()
    record.metrics.setdefault("total_s", time.perf_counter() - started)
    save_record(record)
    log_outcome(record, plan.label)
    return record


def _fail(record: JobRecord, status: str, error: str, kind: str) -> None:
    record.status, record.error, record.error_kind = status, error, kind
    forget_lora_state(build.current())  # the applied LoRAs are unknown now


def write_output(path: Path, write: Callable[[], Any]) -> Any:
    """`write()`, with a storage failure (full disk, read-only folder, a name taken) as an
    OutputError naming the file."""
    try:
        return write()
    except FileExistsError as error:
        raise OutputError(path, error) from None
    except OSError as error:
        if is_storage_error(error):
            raise OutputError(path, error) from None
        raise


def _generate(plan: JobPlan, record: JobRecord) -> None:
    spec, rt = plan.spec, plan.runtime
    if plan.job_dir is None:
        raise ValueError("the plan has no job_dir: set it to the job's output folder")
    seed = spec.seed if spec.seed is not None else random.randrange(2**31)
    arguments = preflight(spec, seed)
    started = time.perf_counter()  # the job's own time: load + LoRA + generate + save
    _reset_peak_memory(rt.device)
    entry, load_s = build.get_pipeline(spec, rt)
    lora_s = apply_loras(entry, spec)
    image = _call(entry, spec, arguments)
    timings = dict(getattr(entry.pipe, "timings", {}) or {})
    inputs = _input_pictures(spec, arguments)
    gen = {
        "prompt": spec.prompt, "negative_prompt": spec.negative_prompt, "seed": seed,
        "steps": spec.sampler.steps, "cfg_scale": spec.sampler.cfg_scale,
        "height": image.height, "width": image.width, "sampler": spec.sampler.name,
        "scheduler": spec.sampler.scheduler, "call": dict(spec.call), "model": spec.model.name,
        "loras": [(label, float(item.alpha)) for label, _, item in spec.lora.items()], "dtype": rt.dtype,
        "device": rt.device, "inputs": {arg: [{"file": Path(i["path"]).name, "sha256": i["sha256"]} for i in files]
                                        for arg, files in _by_argument(inputs).items()},
    }
    if spec.controlnet.conditions():
        gen["controlnet"] = _controlnet_summary(spec)
    path = Path(plan.job_dir) / "image.png"
    png = write_output(path, lambda: save_png(image, path, gen))
    record.metrics = _metrics(timings, spec, load_s, lora_s, started, rt.device)
    record.image_path = str(png)
    record.tags[IMAGE_SHA256_TAG] = hashlib.sha256(Path(png).read_bytes()).hexdigest()  # resume checks the artifact
    record.inputs = inputs
    fingerprint_cache(spec).save()  # the hashes of the job's identity (file_identity), for the next command
    record.params.update({f"inputs.{i['arg']}.{i['index']}.sha256": i["sha256"] for i in inputs})
    if spec.seed is None:
        record.params["runtime.seed"] = seed
    if spec.tracking.backend is not TrackingBackend.none:
        record.tags.update(provenance_tags(rt.device))
        record.tags.update(_fingerprints(entry, spec))


def _metrics(timings: dict, spec: RunSpec, load_s: float, lora_s: float, started: float,
             device: str) -> dict[str, float]:
    denoise_s = timings.get("denoise_s")
    metrics = {
        "load_s": load_s, "lora_s": lora_s, "encode_s": timings.get("encode_s"), "denoise_s": denoise_s,
        "s_per_step": (denoise_s / (timings.get("denoise_steps") or spec.sampler.steps)
                       if denoise_s is not None else None),
        "decode_s": timings.get("decode_s"), "total_s": time.perf_counter() - started,
        "peak_mem_mb": _peak_memory_mb(device),
    }
    return {k: float(v) for k, v in metrics.items() if v is not None}


def ended_record(plan: JobPlan, status: str, error: str, kind: str) -> JobRecord:
    """The record of a job that ended without a result of its own (interrupted before its worker
    took it, its worker gone): status, error and end time set; `save_record` writes it."""
    record = new_record(plan)
    record.status, record.error, record.error_kind, record.ended = status, error, kind, time.time()
    return record


@contextmanager
def environment(values: dict[str, str]) -> Iterator[None]:
    """os.environ with `values` (a job's hydra.job.env_set) for the time of the job."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def save_record(record: JobRecord) -> None:
    """job.json into the job's folder; a storage failure makes the job FAILED (an OutputError)."""
    if record.job_dir is None:
        return
    path = Path(record.job_dir) / "job.json"
    try:
        write_output(path, lambda: record.write(path))
    except OutputError as error:
        if record.error_kind != "output":
            record.status, record.error, record.error_kind = FAILED, f"OutputError: {error}", "output"


def log_outcome(record: JobRecord, label: str) -> None:
    if record.status == KILLED:
        logger.error("job %d [%s]: KILLED (interrupted)", record.num, label)
        return
    if record.status != FINISHED:
        if record.error_kind not in ("runtime", "output"):  # logged with its traceback / by the driver
            logger.error("job %d [%s]: FAILED: %s", record.num, label, record.error)
        return
    m = record.metrics
    logger.info(
        "job %d [%s]: FINISHED in %.2f s (load %.2f, lora %.2f, encode %.2f, denoise %.2f = %.3f s/step, "
        "decode %.2f; peak %.0f MB) -> %s",
        record.num, label, m["total_s"], m.get("load_s", 0.0), m.get("lora_s", 0.0), m.get("encode_s", 0.0),
        m.get("denoise_s", 0.0), m.get("s_per_step", 0.0), m.get("decode_s", 0.0), m.get("peak_mem_mb", 0.0),
        record.image_path,
    )


def _by_argument(inputs: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for item in inputs:
        out.setdefault(item["arg"], []).append(item)
    return out


def _fingerprints(entry: build.LoadedPipeline, spec: RunSpec) -> dict[str, str]:
    """Checkpoint (once per loaded pipeline) and LoRA fingerprints, through the on-disk cache."""
    cache = fingerprint_cache(spec)
    if entry.fingerprint is None:
        entry.fingerprint = cache.describe(build.checkpoint_files(entry))
    tags = fingerprint_tags("checkpoint", entry.fingerprint)
    for label, _, item in spec.lora.items():
        key = lora_state_key(item)
        if key not in entry.lora_fingerprints:
            entry.lora_fingerprints[key] = cache.describe(lora_files(item, spec, download=False))
        tags.update(fingerprint_tags(f"lora.{label}", entry.lora_fingerprints[key]))
    return tags


def _call(entry: build.LoadedPipeline, spec: RunSpec, arguments: dict[str, Any]) -> Any:
    """The pipeline call; a setting it refuses only once the models are known (a mask for a
    ControlNet that takes none) is a ConfigError at the key that set it."""
    from pipelines import SettingError

    try:
        return build.generate(entry, arguments)
    except SettingError as error:
        raise refusal(spec, error, arguments) from None


def _input_pictures(spec: RunSpec, arguments: dict[str, Any]) -> list[dict[str, Any]]:
    """The picture files the call read (the pipeline's image arguments given as paths, the
    ControlNet conditions' pictures), with their sha256, through the fingerprint cache."""
    cache = fingerprint_cache(spec)
    return [{"arg": arg, "index": i, "path": str(p.resolve()), "sha256": cache.sha256(p)}
            for arg, i, _, p in pictures(spec, arguments)]


def _controlnet_summary(spec: RunSpec) -> dict[str, Any]:
    """The ControlNet preset and each condition's numbers and picture names (their sha256 are in `inputs`)."""
    c = spec.controlnet
    conditions = [{"controlnet_id": item.controlnet_id, "scale": item.scale, "start": item.start, "end": item.end,
                   **{key: Path(getattr(item, key)).name for key in ("image", "mask", "inpaint_image")
                      if getattr(item, key) is not None}} for _, item in c.conditions()]
    return {"name": c.name, "conditions": conditions}


def _reset_peak_memory(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        if torch.cuda.is_available():
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

        return torch.cuda.max_memory_allocated(device) / 2**20 if torch.cuda.is_available() else 0.0
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def _free_after_failure(error: Exception) -> None:
    try:
        import torch

        if isinstance(error, torch.OutOfMemoryError) and torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # noqa: BLE001 - best effort
        pass
