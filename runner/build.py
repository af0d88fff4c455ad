"""Spec -> pipeline, with a process-wide cache so that a sweep loads weights once.

The cache holds the pipeline of the last (model, vram, dtype, device) asked for: jobs that
change seed, steps, size, prompt, cfg or LoRAs reuse it. A different key drops the old
pipeline first (two 20B models do not fit side by side), so order a sweep with the model
override first (`python -m runner -m model=a,b seed=0,1`) to load each model once.

LoRAs are applied per job on top of the cached base model: when only alphas change, each
LoRA handle's `set_alpha` (re-fused from the original weights by the library); when the set
of LoRAs changes, `clear_lora()` then `load_lora()` for each. The base weights are never
reloaded and no LoRA of an earlier job stays applied.
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from pipelines import VRAM_KEYS

from .config.schema import RUN_ARGUMENTS, SAMPLER_ARGUMENTS, DType, FileSpec, LoraItem, RunSpec
from .errors import ConfigError
from .files import locked

logger = logging.getLogger(__name__)

# How many times weights were loaded in this process (tests and the benchmark read it).
LOAD_COUNT = 0


@dataclass
class Runtime:
    device: str  # resolved: cpu, cuda, cuda:1
    dtype: str  # resolved: float32, bfloat16, float16


@dataclass
class LoadedPipeline:
    key: str
    pipe: Any
    model_configs: list
    other_configs: list  # tokenizer, processor
    load_s: float
    # what LoRAs are applied now: a tuple of (label, source, alpha); None = unknown (after
    # a failure) -> cleared before the next job
    lora_state: Optional[tuple] = ()
    fingerprint: Optional[dict] = None
    lora_fingerprints: dict = field(default_factory=dict)  # source -> fingerprint
    lora_handles: list = field(default_factory=list)  # what load_lora returned, in order


_CACHE: dict[str, LoadedPipeline] = {}


def resolve_runtime(spec: RunSpec) -> Runtime:
    import torch

    device = spec.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = spec.dtype.value if isinstance(spec.dtype, DType) else str(spec.dtype)
    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") else "float32"
    return Runtime(device=device, dtype=dtype)


def import_object(dotted: str, where: str) -> Any:
    module_name, _, attr = dotted.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as e:
        raise ConfigError(where, f"cannot import {dotted!r} ({e})", "give an importable `module.name`") from None


def pipeline_class(spec: RunSpec) -> Any:
    cls = import_object(spec.model.pipeline, "model.pipeline")
    missing = [m for m in ("from_pretrained", "check_arguments", "load_lora", "clear_lora") if not hasattr(cls, m)]
    if missing:
        raise ConfigError("model.pipeline", f"{spec.model.pipeline} has no `{missing[0]}`",
                          "name a pipeline class of `pipelines` (a pipelines.Pipeline)")
    return cls


def preflight(spec: RunSpec, seed: Optional[int] = None) -> dict[str, Any]:
    """What can be refused before any weight is read: the pipeline, the VRAM preset it must
    support, and every call argument, checked by the pipeline itself. Returns the arguments."""
    cls = pipeline_class(spec)
    if spec.vram.enabled() and not getattr(cls, "supports_vram_management", False):
        raise ConfigError(
            "vram",
            f"the preset {spec.vram.name!r} needs VRAM management (offload/onload/preparing keys or vram_limit), "
            f"which {spec.model.pipeline} does not implement yet",
            "use vram=none (every model resident on the device)",
        )
    arguments = call_arguments(spec, cls, seed)
    try:
        cls.check_arguments(arguments)
    except ARGUMENT_ERRORS as error:  # the library's checks: SettingError, a picture that cannot be read, ...
        name = argument_named(str(error), arguments)
        key = config_key(name) if name else "call"
        raise ConfigError(key, str(error).strip().rstrip("."), _argument_fix(error, key, arguments.get(name))) from None
    return arguments


# what a pipeline's `check_arguments` raises for a value a user gave (a SettingError is a ValueError)
ARGUMENT_ERRORS = (ValueError, TypeError, ArithmeticError, FileNotFoundError)


def _argument_fix(error: Exception, key: str, value: Any) -> str:
    if isinstance(error, FileNotFoundError):
        return "give an existing file"
    if isinstance(value, (bool, int, float)) and "path" in str(error):
        return (f"give the path of a picture file; quote a name YAML would read as a number or a boolean "
                f"({key}='5')")
    if isinstance(error, TypeError):
        return f"give `{key}` a value of the type the pipeline takes"
    if isinstance(error, ArithmeticError):
        return f"give `{key}` a smaller value"
    return f"change `{key}`"


def call_arguments(spec: RunSpec, cls: Any, seed: Optional[int] = None) -> dict[str, Any]:
    """The pipeline call of this spec: the run keys, the sampler's (under the pipeline's names)
    and `call.*`, every name checked against the pipeline's signature."""
    parameters = cls.call_parameters()
    arguments: dict[str, Any] = {"prompt": spec.prompt, "negative_prompt": spec.negative_prompt,
                                 "seed": spec.seed if seed is None else seed, "progress_bar": spec.progress_bar}
    for key, name in SAMPLER_ARGUMENTS.items():
        value = getattr(spec.sampler, key)
        arguments[name] = instantiate_scheduler(value) if key == "scheduler" and value is not None else value
    for name, value in spec.call.items():
        if name in arguments:
            owner = next((f"sampler.{k}" for k, n in SAMPLER_ARGUMENTS.items() if n == name), name)
            raise ConfigError(f"call.{name}", f"{name} is set by `{owner}`", f"use {owner}=... instead")
        arguments[name] = value
    missing = [name for name in arguments if name not in parameters]
    if missing:
        name = missing[0]
        raise ConfigError(config_key(name), f"{cls.__name__} takes no argument {name!r}",
                          _closest_key(name, parameters))
    return arguments


def _closest_key(name: str, parameters: Any) -> str:
    """`did you mean` with the config key that sets the closest argument (`call.cfg_sclae` ->
    `sampler.cfg_scale`, `call.steps` -> `sampler.steps`), else the arguments there are."""
    import difflib

    keys = {config_key(p): p for p in parameters} | {f"sampler.{k}": n for k, n in SAMPLER_ARGUMENTS.items()}
    by_name = {}
    for key, argument in keys.items():
        by_name.setdefault(argument, key)
        by_name.setdefault(key.rpartition(".")[2], key)
    close = difflib.get_close_matches(name, list(by_name), n=1)
    return f"did you mean `{by_name[close[0]]}`?" if close else f"its arguments are {', '.join(parameters)}"


def instantiate_scheduler(node: Any) -> Any:
    from hydra.utils import instantiate

    try:
        return instantiate(node)
    except Exception as error:  # noqa: BLE001 - hydra wraps import and argument errors
        import re

        # the library names the field it refused (`FlowMatchScheduler.base_shift=nan: ...`)
        field = re.search(r"FlowMatchScheduler\.(\w+)", f"{error} {error.__cause__ or ''}")
        key = f"sampler.scheduler.{field.group(1)}" if field and field.group(1) in (node or {}) else "sampler.scheduler"
        raise ConfigError(key, f"cannot build the scheduler ({error})",
                          "give `_target_: pipelines.FlowMatchScheduler` and finite values of its fields, or null"
                          ) from None


def config_key(argument: str) -> str:
    """The config path that sets a call argument."""
    sampler = {name: key for key, name in SAMPLER_ARGUMENTS.items()}
    if argument in sampler:
        return f"sampler.{sampler[argument]}"
    return argument if argument in RUN_ARGUMENTS else f"call.{argument}"


def argument_named(message: str, arguments: dict[str, Any]) -> Optional[str]:
    """The argument an error message names first, or None."""
    import re

    found = [(m.start(), name) for name in arguments if (m := re.search(rf"\b{re.escape(name)}\b", message))]
    return min(found)[1] if found else None


# ------------------------------------------------------------------ model configs


def _torch_dtype(name: str):
    import torch

    value = getattr(torch, name, None)
    if not isinstance(value, torch.dtype):
        raise ConfigError("dtype", f"unknown torch dtype {name!r}", "use float32, bfloat16 or float16")
    return value


def _vram_value(key: str, value: Optional[str], rt: Runtime):
    if value is None:
        return None
    if value == "auto":
        value = rt.dtype if key.endswith("_dtype") else rt.device
    if key.endswith("_dtype") and value != "disk":
        return _torch_dtype(value)
    return value


def model_configs(spec: RunSpec, rt: Runtime) -> tuple[list, Any, Any]:
    """The ModelConfigs of the model files (with the VRAM keys), the tokenizer and the processor."""
    from pipelines import ModelConfig

    vram = {k: _vram_value(k, getattr(spec.vram, k), rt) for k in VRAM_KEYS}
    vram = {k: v for k, v in vram.items() if v is not None}

    def make(f: FileSpec, with_vram: bool) -> Any:
        kwargs: dict[str, Any] = dict(download_source=spec.model.download_source,
                                      skip_download=spec.model.skip_download)
        if f.path is not None:
            kwargs["path"] = list(f.path) if isinstance(f.path, (list, tuple)) else f.path
        else:
            kwargs.update(model_id=f.model_id, origin_file_pattern=f.origin_file_pattern)
        if with_vram:
            kwargs.update(vram)
        return ModelConfig(**kwargs)

    configs = [make(f, True) for f in spec.model.files]
    tokenizer = make(spec.model.tokenizer, False) if spec.model.tokenizer else None
    processor = make(spec.model.processor, False) if spec.model.processor else None
    return configs, tokenizer, processor


def ensure_built(spec: RunSpec) -> None:
    """Write a generated checkpoint (`model.build`) into the models folder if missing. A
    file lock keeps parallel jobs from building twice; the builder renames a complete folder
    into place, so a reader never sees a half-written one."""
    if spec.model.build is None:
        return
    from pipelines import ModelConfig, model_folder

    builder = import_object(spec.model.build, "model.build")
    files = spec.model.files + [spec.model.tokenizer, spec.model.processor]
    for model_id in sorted({f.model_id for f in files if f and f.model_id}):
        target = model_folder(ModelConfig(model_id=model_id))  # refuses ids that leave the models folder
        if target.is_dir() and any(target.iterdir()):
            continue
        with locked(target):
            if target.is_dir() and any(target.iterdir()):
                continue
            logger.info("Building %s into %s (first use; later runs reuse it)", model_id, target)
            started = time.perf_counter()
            builder(target)
            logger.info("Built %s in %.1f s", model_id, time.perf_counter() - started)


def cache_key(spec: RunSpec, rt: Runtime) -> str:
    return json.dumps(
        {"model": dataclasses.asdict(spec.model), "vram": dataclasses.asdict(spec.vram), "dtype": rt.dtype,
         "device": rt.device},
        sort_keys=True,
        default=str,
    )


def get_pipeline(spec: RunSpec, rt: Runtime) -> tuple[LoadedPipeline, float]:
    """The cached pipeline for this spec, loading it if needed; returns it and the seconds
    spent loading in this call (0.0 when reused)."""
    global LOAD_COUNT
    key = cache_key(spec, rt)
    if key in _CACHE:
        return _CACHE[key], 0.0
    release()
    started = time.perf_counter()
    ensure_built(spec)
    cls = import_object(spec.model.pipeline, "model.pipeline")
    configs, tokenizer, processor = model_configs(spec, rt)
    logger.info("Loading %s on %s in %s", spec.model.name, rt.device, rt.dtype)
    pipe = cls.from_pretrained(
        torch_dtype=_torch_dtype(rt.dtype),
        device=rt.device,
        model_configs=configs,
        tokenizer_config=tokenizer,
        **({"processor_config": processor} if processor is not None else {}),
        vram_limit=spec.vram.vram_limit,
    )
    load_s = time.perf_counter() - started
    LOAD_COUNT += 1
    logger.info("Loaded %s in %.2f s", spec.model.name, load_s)
    entry = LoadedPipeline(key=key, pipe=pipe, model_configs=configs,
                           other_configs=[c for c in (tokenizer, processor) if c is not None], load_s=load_s)
    _CACHE[key] = entry
    return entry, load_s


def release() -> None:
    """Drop the cached pipeline (and free its memory)."""
    if not _CACHE:
        return
    _CACHE.clear()
    import gc

    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # pragma: no cover - best effort
        pass


# --------------------------------------------------------------------------- LoRA


def lora_source(item: LoraItem, spec: RunSpec) -> Any:
    """What `load_lora` gets: a path, or a ModelConfig for a hub file."""
    if item.path is not None:
        return str(item.path)
    from pipelines import ModelConfig

    return ModelConfig(
        model_id=item.model_id,
        origin_file_pattern=item.origin_file_pattern,
        download_source=spec.model.download_source,
        skip_download=spec.model.skip_download,
    )


def lora_files(item: LoraItem, spec: RunSpec, download: Optional[bool] = None) -> list[Path]:
    """The LoRA's local files (fetched first if missing, unless download=False)."""
    if item.path is not None:
        return [Path(item.path)]
    from pipelines import resolve_files

    return list(resolve_files(lora_source(item, spec), download=download))


def lora_state_key(item: LoraItem) -> str:
    return item.path if item.path is not None else f"{item.model_id}::{item.origin_file_pattern}"


def apply_loras(entry: LoadedPipeline, spec: RunSpec) -> float:
    """Make the pipeline carry exactly this job's LoRAs; returns the seconds it took.

    Same LoRAs, other alphas: each handle's `set_alpha` (the library re-fuses from the
    original weights: the same result as a fresh load). Another set: `clear_lora()`, then
    `load_lora()` for each. The base model is never reloaded."""
    items = [(label, item) for label, _, item in spec.lora.items()]
    wanted = tuple((label, lora_state_key(item), float(item.alpha)) for label, item in items)
    state = entry.lora_state
    if state == wanted:
        return 0.0
    started = time.perf_counter()
    pipe = entry.pipe
    same_set = state is not None and [s[:2] for s in state] == [w[:2] for w in wanted]
    if same_set and entry.lora_handles and all(hasattr(h, "set_alpha") for h in entry.lora_handles):
        entry.lora_state = None  # unknown until every alpha is set
        for handle, (label, _, alpha) in zip(entry.lora_handles, wanted):
            logger.info("LoRA %s: alpha %g", label, alpha)
            handle.set_alpha(alpha)
        entry.lora_state = wanted
        return time.perf_counter() - started
    if state != ():
        pipe.clear_lora()
    entry.lora_state, entry.lora_handles = None, []
    for label, item in items:
        logger.info("Applying LoRA %s (alpha %g)", label, item.alpha)
        # the source itself (path or ModelConfig), so the library's messages name the file
        entry.lora_handles.append(pipe.load_lora(pipe.lora_module, lora_source(item, spec), alpha=float(item.alpha)))
    entry.lora_state = wanted
    return time.perf_counter() - started


def forget_lora_state(entry: Optional[LoadedPipeline]) -> None:
    """After a failed job the applied LoRAs are unknown: clear before the next job."""
    if entry is not None:
        entry.lora_state = None


def current() -> Optional[LoadedPipeline]:
    return next(iter(_CACHE.values()), None)


# -------------------------------------------------------------------------- generate


def generate(entry: LoadedPipeline, arguments: dict[str, Any]):
    """One image: the call the README shows in plain Python, with the spec's arguments."""
    return entry.pipe(**arguments)


def checkpoint_files(entry: LoadedPipeline) -> list[Path]:
    """The files the pipeline was loaded from (local: no hub query)."""
    return _local_files(entry.model_configs + entry.other_configs)


def spec_checkpoint_files(spec: RunSpec, rt: Runtime) -> list[Path]:
    """The files this spec's pipeline loads, as they are on disk now (no hub query, nothing
    built); an error when they are not all here."""
    configs, tokenizer, processor = model_configs(spec, rt)
    return _local_files(configs + [c for c in (tokenizer, processor) if c is not None])


def _local_files(configs: list) -> list[Path]:
    from pipelines import resolve_files

    files: list[Path] = []
    for config in configs:
        files.extend(resolve_files(config, download=False))
    return files


# ------------------------------------------------------------------ what a job reads


def read_files(spec: RunSpec, arguments: dict[str, Any]) -> dict[str, Path]:
    """The local files a job reads that its config names by path, by config path: each LoRA's
    `path` (`lora.path`, `lora.stack.NAME.path`) and each picture of the pipeline's image
    arguments (`call.input_image`, `call.edit_image[1]`). Relative paths are this process's."""
    files = {f"{where}.path": Path(item.path) for _, where, item in spec.lora.items() if item.path is not None}
    for arg in getattr(pipeline_class(spec), "image_arguments", ()):
        value = arguments.get(arg)
        many = isinstance(value, (list, tuple))
        for i, v in enumerate(value if many else [value]):
            if isinstance(v, (str, Path)):
                files[config_key(arg) + (f"[{i}]" if many else "")] = Path(v)
    return files


def file_locations(spec: RunSpec) -> dict[str, str]:
    """Where the files a job reads without hashing them are (checkpoints are tens of GB): the
    absolute folder of each hub model id (`<models folder>/<id>`, the models folder as this
    process's environment and working directory name it) and each model file given by path."""
    from pipelines import ModelConfig, model_folder

    found: dict[str, str] = {}
    named = [(f"model.files[{i}]", f) for i, f in enumerate(spec.model.files)]
    named += [(f"model.{k}", getattr(spec.model, k)) for k in ("tokenizer", "processor")]
    named += [(where, item) for _, where, item in spec.lora.items() if item.path is None]
    for where, f in named:
        if f is None:
            continue
        if getattr(f, "path", None) is not None and where.startswith("model."):
            paths = f.path if isinstance(f.path, (list, tuple)) else [f.path]
            found[where] = ", ".join(str(Path(p).resolve()) for p in paths)
        elif f.model_id is not None:
            found[where] = str(model_folder(ModelConfig(model_id=f.model_id)).resolve())
    return found


