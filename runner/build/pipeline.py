"""Spec -> loaded pipeline: the computation device and dtype `auto` resolves to, the ModelConfigs
of the model's files, the demo's generated files (`model.build`, `${built_file:...}`), and a
process-wide cache that loads weights once for a sweep's jobs (docs/architecture.md).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import OmegaConf

from pipelines import VRAM_KEYS

from ..config.schema import DType, FileSpec, RunSpec
from ..errors import ConfigError, first_line
from ..files import locked
from .loras import lora_source

logger = logging.getLogger("runner.build")

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


def locate(dotted: str, key: str, callable_only: bool = False) -> Any:
    """The class (or with `callable_only` the function) a config key names as `module.Name`,
    found by Hydra's own lookup (hydra.utils.get_class / get_method), as `instantiate` finds a
    `_target_`; a ConfigError at `key` when it cannot be imported."""
    from hydra.utils import get_class, get_method

    hydra_log = logging.getLogger("hydra.utils")
    quiet, hydra_log.disabled = hydra_log.disabled, True  # Hydra logs the error before raising: ours says it
    try:
        return (get_method if callable_only else get_class)(dotted)
    except (ImportError, ValueError, AttributeError) as error:
        raise ConfigError(key, f"cannot import {dotted!r} ({first_line(error)})",
                          "give an importable `module.name`") from None
    finally:
        hydra_log.disabled = quiet


def pipeline_class(spec: RunSpec) -> Any:
    cls = locate(spec.model.pipeline, "model.pipeline")
    missing = [m for m in ("from_pretrained", "check_arguments", "load_lora", "clear_lora") if not hasattr(cls, m)]
    if missing:
        raise ConfigError("model.pipeline", f"{spec.model.pipeline} has no `{missing[0]}`",
                          "name a pipeline class of `pipelines` (a pipelines.Pipeline)")
    return cls


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


def file_config(f: FileSpec, download_source: Optional[str], skip_download: Optional[bool],
                vram: Optional[dict[str, Any]] = None) -> Any:
    """One ModelConfig: a hub id + pattern or a local path, where to fetch it from, the VRAM keys."""
    from pipelines import ModelConfig

    kwargs: dict[str, Any] = dict(download_source=download_source, skip_download=skip_download)
    if f.path is not None:
        kwargs["path"] = list(f.path) if isinstance(f.path, (list, tuple)) else f.path
    else:
        kwargs.update(model_id=f.model_id, origin_file_pattern=f.origin_file_pattern)
    return ModelConfig(**kwargs, **(vram or {}))


def model_configs(spec: RunSpec, rt: Runtime) -> tuple[list, Any, Any]:
    """The ModelConfigs of the model files and then the ControlNet files (each with the VRAM
    keys: the pipeline recognises which is which), the tokenizer and the processor."""
    vram = {k: _vram_value(k, getattr(spec.vram, k), rt) for k in VRAM_KEYS}
    vram = {k: v for k, v in vram.items() if v is not None}
    m, c = spec.model, spec.controlnet
    configs = [file_config(f, m.download_source, m.skip_download, vram) for f in m.files]
    source = c.download_source if c.download_source is not None else m.download_source
    skip = c.skip_download if c.skip_download is not None else m.skip_download
    configs += [file_config(f, source, skip, vram) for f in c.files]
    tokenizer = file_config(m.tokenizer, m.download_source, m.skip_download) if m.tokenizer else None
    processor = file_config(m.processor, m.download_source, m.skip_download) if m.processor else None
    return configs, tokenizer, processor


def loaded_files(spec: RunSpec) -> dict[str, Any]:
    """What the loaded pipeline is made of, beside the VRAM preset, dtype and device: the model
    and the ControlNet files (not a ControlNet's pictures or scale: those are call arguments)."""
    c = spec.controlnet
    return {"model": dataclasses.asdict(spec.model),
            "controlnet": {"files": [dataclasses.asdict(f) for f in c.files], "download_source": c.download_source,
                           "skip_download": c.skip_download}}


def ensure_built(spec: RunSpec) -> None:
    """Write a generated checkpoint (`model.build`) into the models folder if missing. A
    file lock keeps parallel jobs from building twice; the builder renames a complete folder
    into place, so a reader never sees a half-written one."""
    if spec.model.build is None:
        return
    from pipelines import ModelConfig, model_folder

    builder = locate(spec.model.build, "model.build", callable_only=True)
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
    """The loaded pipeline's identity: another model, ControlNet preset, VRAM preset, dtype or
    device is another pipeline; a ControlNet's scale or picture, a seed or a LoRA is not."""
    return json.dumps(
        {**loaded_files(spec), "vram": dataclasses.asdict(spec.vram), "dtype": rt.dtype, "device": rt.device},
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
    cls = pipeline_class(spec)
    configs, tokenizer, processor = model_configs(spec, rt)
    what = spec.model.name + (f" with the ControlNet {spec.controlnet.name}" if spec.controlnet.files else "")
    logger.info("Loading %s on %s in %s", what, rt.device, rt.dtype)
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
    logger.info("Loaded %s in %.2f s", what, load_s)
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


def file_locations(spec: RunSpec) -> dict[str, str]:
    """Where the files a job reads without hashing them are (checkpoints are tens of GB): the
    absolute folder of each hub model id (`<models folder>/<id>`, the models folder as this
    process's environment and working directory name it) and each model file given by path."""
    from pipelines import ModelConfig, model_folder

    found: dict[str, str] = {}
    named = [(f"model.files[{i}]", f) for i, f in enumerate(spec.model.files)]
    named += [(f"model.{k}", getattr(spec.model, k)) for k in ("tokenizer", "processor")]
    named += [(f"controlnet.files[{i}]", f) for i, f in enumerate(spec.controlnet.files)]
    named += [(where, item) for _, where, item in spec.lora.items() if item.path is None]
    for where, f in named:
        if f is None:
            continue
        if getattr(f, "path", None) is not None and where.startswith(("model.", "controlnet.")):
            paths = f.path if isinstance(f.path, (list, tuple)) else [f.path]
            found[where] = ", ".join(str(Path(p).resolve()) for p in paths)
        elif f.model_id is not None:
            found[where] = str(model_folder(ModelConfig(model_id=f.model_id)).resolve())
    return found


# ------------------------------------------------------------- generated files


def built_file(relative: str, builder: str) -> str:
    """`${built_file:'tiny/X/f.safetensors','module.function'}`: the file at that path in the
    models folder, written by `module.function(path)` on first use (a generated demo file, as
    `model.build` makes the demo model; conf/lora/tiny_demo.yaml)."""
    from pipelines import ModelConfig, model_folder

    repo, _, name = relative.rpartition("/")
    path = model_folder(ModelConfig(model_id=repo)) / name  # refuses paths that leave the models folder
    if not path.is_file():
        with locked(path):
            if not path.is_file():
                locate(builder, "built_file", callable_only=True)(path)
    return str(path)


def register_resolvers() -> None:
    """`${built_file:...}` for the configs composed in this process (idempotent)."""
    if not OmegaConf.has_resolver("built_file"):
        OmegaConf.register_new_resolver("built_file", built_file)


def fetch_all(spec: RunSpec) -> None:
    """Every file a run of `spec` needs, on disk: the model (built when generated), its tokenizer
    and processor, the hub LoRAs. Nothing is loaded; a config with skip_download (the built demo
    model) is only checked on disk. The library's fetch logs its own summary."""
    from pipelines import fetch

    ensure_built(spec)
    configs, tokenizer, processor = model_configs(spec, resolve_runtime(spec))
    loras = [lora_source(item, spec) for _, _, item in spec.lora.items()]
    fetch([*configs, tokenizer, processor, *[lora for lora in loras if not isinstance(lora, str)]])
