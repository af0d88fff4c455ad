"""The run spec: structured-config dataclasses that validate every config group.

Hydra merges the YAML files of `conf/` onto these dataclasses (registered in its
ConfigStore as `schema`), so a misspelt key or a value of the wrong type fails at
composition time, before any weight is loaded, with the config path in the message
(`full_key: sampler.steps`). What types cannot express (a LoRA file that exists, a device
this machine has, a finite number) is checked by `validate` with the library's own parsers,
and the call arguments by `build.preflight` against the pipeline's signature; both raise
`ConfigError` naming the config path and the fix.
"""
from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf, open_dict

from pipelines import VRAM_KEYS  # the eight keys VramSpec mirrors

from .errors import ConfigError

__all__ = ["ConfigError"]  # defined in runner.errors (no torch there: the MLflow writer process imports it)


class DType(str, Enum):
    auto = "auto"  # bfloat16 on a GPU, float32 on the CPU
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


class TrackingBackend(str, Enum):
    mlflow = "mlflow"
    none = "none"


# ---------------------------------------------------------------------------- model


@dataclass
class FileSpec:
    """One `ModelConfig`: a hub `model_id` + `origin_file_pattern`, or a local `path`."""

    model_id: Optional[str] = None
    origin_file_pattern: Optional[str] = None
    # one file, or a list of shard files (ModelConfig(path=...))
    path: Any = None


@dataclass
class ModelSpec:
    name: str = MISSING
    # the pipeline class, as `module.Class` (a `pipelines.core.pipeline.Pipeline`)
    pipeline: str = "pipelines.QwenImagePipeline"
    files: List[FileSpec] = field(default_factory=list)
    tokenizer: Optional[FileSpec] = None
    # the processor folder of models that read pictures (Qwen-Image-Edit: `processor/`)
    processor: Optional[FileSpec] = None
    # modelscope | huggingface; null = the library's default (DIFFSYNTH_DOWNLOAD_SOURCE)
    download_source: Optional[str] = None
    # true = load from the models folder only, never ask the hub
    skip_download: Optional[bool] = None  # null: DIFFSYNTH_SKIP_DOWNLOAD decides
    # `module.function(out_dir) -> Path` that writes the checkpoint into
    # <models folder>/<model_id> when it is missing (the embedded demo model); null = none
    build: Optional[str] = None


# ----------------------------------------------------------------------------- vram


@dataclass
class VramSpec:
    """How the weights are stored while loaded: the VRAM-management keys of every model's
    ModelConfig. A dtype is `float32 | bfloat16 | float16 | float8_e4m3fn | float8_e5m2 | disk`,
    a device `cpu | cuda | cuda:N | disk`; `auto` means the run's computation dtype/device.
    Keys left null fall back to the computation values in the library (leave computation_*
    null: the pipeline computes on the run's device). All null = no VRAM management.
    (Call-time options such as tiling and batched CFG are `call.*` keys.)
    """

    name: str = "none"
    offload_dtype: Optional[str] = None
    offload_device: Optional[str] = None
    onload_dtype: Optional[str] = None
    onload_device: Optional[str] = None
    preparing_dtype: Optional[str] = None
    preparing_device: Optional[str] = None
    computation_dtype: Optional[str] = None
    computation_device: Optional[str] = None
    # GiB of device memory below which layers stay on the preparing device: a number, `auto`
    # (the GPU's memory minus a margin) or null (no limit)
    vram_limit: Any = None

    def enabled(self) -> bool:
        return any(getattr(self, k) is not None for k in VRAM_KEYS) or self.vram_limit is not None


# ----------------------------------------------------------------------------- lora


@dataclass
class LoraItem:
    """One LoRA of a stack: a hub file or a local path, with its own strength."""

    model_id: Optional[str] = None
    origin_file_pattern: Optional[str] = None
    path: Optional[str] = None
    alpha: float = 1.0


@dataclass
class LoraSpec:
    """No LoRA, one LoRA (`model_id`+`origin_file_pattern` or `path`, strength `alpha`), or
    several at once in `stack` (name -> LoraItem, each with its own alpha), or both."""

    name: str = "none"
    model_id: Optional[str] = None
    origin_file_pattern: Optional[str] = None
    path: Optional[str] = None
    alpha: float = 1.0
    # name -> LoraItem fields. Typed as Any so that `+lora.stack.mine.path=...` works on the
    # command line (OmegaConf cannot add entries to a Dict of dataclasses); `to_spec` checks
    # each entry against LoraItem.
    stack: Dict[str, Any] = field(default_factory=dict)

    def items(self) -> list[tuple[str, str, LoraItem]]:
        """The LoRAs to apply, in order, as (label, config path, item)."""
        out: list[tuple[str, str, LoraItem]] = []
        if self.model_id is not None or self.path is not None or (self.name != "none" and not self.stack):
            single = LoraItem(self.model_id, self.origin_file_pattern, self.path, self.alpha)
            out.append((self.name, "lora", single))
        out.extend((label, f"lora.stack.{label}", item) for label, item in self.stack.items())
        return out


# -------------------------------------------------------------------------- sampler


@dataclass
class SamplerSpec:
    """The call arguments every pipeline of the house takes (see docs/adding-a-model.md)."""

    name: str = "default"
    steps: int = 30  # num_inference_steps
    cfg_scale: float = 4.0
    # pixels; null = the pipeline's own default (an edit model: from the last input picture)
    height: Optional[int] = 1328
    width: Optional[int] = 1328
    # the sigma schedule: null = the model's own; or `_target_: pipelines.FlowMatchScheduler`
    # with its fields (conf/sampler/lightning.yaml)
    scheduler: Optional[Dict[str, Any]] = None


# map of sampler keys onto call arguments
SAMPLER_ARGUMENTS = {"steps": "num_inference_steps", "cfg_scale": "cfg_scale", "height": "height",
                     "width": "width", "scheduler": "scheduler"}
RUN_ARGUMENTS = ("prompt", "negative_prompt", "seed", "progress_bar")  # top-level keys that are call arguments


# ------------------------------------------------------------------------- tracking


@dataclass
class TrackingSpec:
    backend: TrackingBackend = TrackingBackend.mlflow
    # null = the embedded SQLite store `<store_dir>/mlflow.db`; or any MLflow tracking URI
    # (`http://127.0.0.1:5000`, `sqlite:////abs/path.db`)
    uri: Optional[str] = None
    # where the embedded store and its artifacts live (relative to the launch folder)
    store_dir: str = "outputs/mlflow"
    # artifact location of a newly created experiment; null = `<store_dir>/artifacts` for a
    # SQLite store, the server's default for a tracking server
    artifact_location: Optional[str] = None
    # the key of `mlflow.log_image`, the name compared in the UI's image grid
    image_key: str = "image"
    # a tracking server: seconds one request may wait, and retries before the server counts as
    # unreachable (then the rest of the sweep runs untracked: `python -m runner sync DIR` logs it
    # later). MLflow's MLFLOW_HTTP_REQUEST_TIMEOUT / _MAX_RETRIES variables win when set.
    request_timeout_s: float = 10.0
    request_retries: int = 2


# --------------------------------------------------------------------------- report


@dataclass
class ReportSpec:
    """The sweep's X/Y grid and report.html (runner/compare.py): each axis a swept key, `none`,
    or null (the default: the key with the most values for x, the next for y, then z)."""

    x: Optional[str] = None  # columns
    y: Optional[str] = None  # rows
    z: Optional[str] = None  # one grid page per value
    thumb: int = 256  # pixels, longer side of a grid cell


# ----------------------------------------------------------------------------- root


@dataclass
class RunSpec:
    model: ModelSpec = MISSING
    vram: VramSpec = MISSING
    lora: LoraSpec = MISSING
    sampler: SamplerSpec = MISSING
    tracking: TrackingSpec = MISSING
    report: ReportSpec = field(default_factory=ReportSpec)
    # any other argument of the pipeline's __call__ (`call.input_image=cat.png`,
    # `call.tiled=true`, `call.cfg_batch=true`); names are checked against the pipeline
    call: Dict[str, Any] = field(default_factory=dict)
    prompt: str = MISSING
    negative_prompt: str = ""
    # null = a random seed, drawn per job and logged
    seed: Optional[int] = 0
    # auto = cuda when available, else cpu
    device: str = "auto"
    dtype: DType = DType.auto
    # the MLflow experiment
    experiment: str = "qwen-image"
    # MLflow run name; null = the job's overrides
    run_name: Optional[str] = None
    # skip jobs whose identical resolved config already has a FINISHED run
    resume: bool = False
    progress_bar: bool = True
    # keep the loaded pipeline in a resident worker of this user for this long after the last
    # command (`15m`, `2h`, `1h30m`): the next command with the same model, VRAM preset, dtype
    # and device skips the load (runner/warm.py). 0 = use a running worker once, then stop it;
    # null = load in this process, as always
    keep_warm: Optional[str] = None


def register_configs() -> None:
    """Put the schema into Hydra's ConfigStore (idempotent). `call` takes any key without a
    `+` (the pipeline's signature, not the schema, says which are valid)."""
    from hydra.core.config_store import ConfigStore

    node = OmegaConf.structured(RunSpec)
    OmegaConf.set_struct(node.call, False)
    ConfigStore.instance().store(name="schema", node=node)
    if not OmegaConf.has_resolver("built_file"):
        OmegaConf.register_new_resolver("built_file", built_file)


def built_file(relative: str, builder: str) -> str:
    """`${built_file:'tiny/X/f.safetensors','module.function'}`: the file at that path in the
    models folder, written by `module.function(path)` on first use (a generated demo file, as
    `model.build` makes the demo model; conf/lora/tiny_demo.yaml)."""
    from pipelines import ModelConfig, model_folder

    repo, _, name = relative.rpartition("/")
    path = model_folder(ModelConfig(model_id=repo)) / name  # refuses paths that leave the models folder
    if not path.is_file():
        from .build import import_object
        from .files import locked

        with locked(path):
            if not path.is_file():
                import_object(builder, "built_file")(path)
    return str(path)


# --------------------------------------------------------------------------- checks

TRACKING_SCHEMES = ("http", "https", "sqlite", "postgresql", "mysql", "mssql", "databricks")


def check_keys(cfg: DictConfig, schema: type = None, prefix: str = "") -> None:
    """Every key of `cfg` must be a field of its dataclass. Hydra's `+key=value` adds keys
    even to a structured node, and `OmegaConf.to_object` would drop them silently."""
    import dataclasses
    import difflib
    import typing

    schema = schema or OmegaConf.get_type(cfg)
    if not dataclasses.is_dataclass(schema):
        return
    hints = typing.get_type_hints(schema)
    for key in cfg.keys():
        path = f"{prefix}{key}"
        if key not in hints:
            close = difflib.get_close_matches(str(key), list(hints), n=1)
            hint = f"did you mean `{prefix}{close[0]}`?" if close else f"the keys are {', '.join(hints)}"
            raise ConfigError(path, f"unknown key (not in {schema.__name__})", hint)
        node = cfg._get_node(key)
        if isinstance(node, DictConfig) and not node._is_missing() and not node._is_none():
            if typing.get_origin(hints[key]) is dict:
                item_type = _dataclass_in(typing.get_args(hints[key])[1])
                if item_type is not None:
                    for k in node.keys():
                        check_keys(node[k], item_type, f"{path}.{k}.")
            elif (sub := _dataclass_in(hints[key])) is not None:
                check_keys(node, sub, path + ".")
        elif isinstance(node, ListConfig):
            args = typing.get_args(hints[key])
            item_type = _dataclass_in(args[0]) if args else None
            if item_type is not None:
                for i, item in enumerate(node):
                    check_keys(item, item_type, f"{path}.{i}.")


def _dataclass_in(tp: Any) -> Optional[type]:
    """The dataclass in `tp`, `Optional[tp]`, or None."""
    import dataclasses
    import typing

    if dataclasses.is_dataclass(tp):
        return tp
    for arg in typing.get_args(tp):
        if dataclasses.is_dataclass(arg):
            return arg
    return None


def without_hydra(cfg: DictConfig) -> DictConfig:
    """The config without Hydra's node: `cfg` itself when it has none (a sweep's jobs), else a
    copy (~14 ms for the runner's config)."""
    if "hydra" not in cfg:
        return cfg
    cfg = cfg.copy()
    with open_dict(cfg):
        cfg.pop("hydra")
    return cfg


def task_overrides(config: DictConfig) -> list[str]:
    """The command line's overrides as typed (Hydra's hydra.overrides.task, not resolved: reading
    its items would resolve an interpolation they hold, `prompt=${oc.env:HOME}`)."""
    return [str(o) for o in OmegaConf.to_container(config.hydra.overrides.task, resolve=False)]


# text for the model, not config: taken as typed, `${...}` in it is not resolved (docs/config.md)
LITERAL_KEYS = ("prompt", "negative_prompt")


def job_config(cfg: DictConfig) -> DictConfig:
    """A job's config as the runner reads it: without Hydra's node, and with the LITERAL_KEYS
    as typed. An OmegaConf interpolation written in a prompt (`${oc.env:HOME}`, `${x}`) is
    escaped (in a copy), so that resolving the config gives the prompt's text unchanged."""
    cfg = without_hydra(cfg)
    typed = {}
    for key in LITERAL_KEYS:
        node = cfg._get_node(key, throw_on_missing_key=False) if key in cfg else None
        if node is not None and node._is_interpolation():
            typed[key] = str(node._value())
    if not typed:
        return cfg
    import copy

    cfg = copy.deepcopy(cfg)
    with open_dict(cfg):
        for key, text in typed.items():
            cfg[key] = literal(text)
    return cfg


def literal(text: str) -> str:
    """The OmegaConf string that resolves to `text` itself: each `${` escaped (the backslashes
    before it doubled, as OmegaConf's grammar halves them)."""
    return re.sub(r"(\\*)\$\{", lambda m: m.group(1) * 2 + "\\${", text)


def to_spec(cfg: DictConfig) -> RunSpec:
    """The composed config as typed objects. Raises ConfigError (with the config path) for
    a key the schema lacks, a value left `???` or an interpolation that does not resolve."""
    from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

    cfg = job_config(cfg)
    check_keys(cfg, RunSpec)
    try:
        spec = OmegaConf.to_object(cfg)
    except MissingMandatoryValue as e:
        key = getattr(e, "full_key", None) or "?"
        raise ConfigError(
            key, "no value given (it is `???` in the config)", f"set it on the command line: {key}=..."
        ) from None
    except OmegaConfBaseException as e:
        raise omegaconf_error(e) from None
    assert isinstance(spec, RunSpec), type(spec)
    spec.lora.stack = {str(k): _lora_item(v, f"lora.stack.{k}") for k, v in spec.lora.stack.items()}
    return spec


def omegaconf_error(error: BaseException) -> ConfigError:
    """An OmegaConf error of a composed config (an interpolation that does not resolve, a value
    of the wrong type) as a ConfigError at its key."""
    from omegaconf.errors import InterpolationKeyError, InterpolationResolutionError, ValidationError

    key = re.sub(r"\[(\w+)\]", r".\1", str(getattr(error, "full_key", None) or "config"))
    problem = (str(error).strip().splitlines() or [type(error).__name__])[0].rstrip(".")
    if isinstance(error, ValidationError):
        fix = "give a value of the key's type (`python -m runner --cfg job` shows them)"
    elif "Environment variable" in problem:
        fix = "set that environment variable, or give a default: ${oc.env:NAME,default}"
    elif isinstance(error, InterpolationKeyError):
        fix = "name a key the config has (`python -m runner --cfg job` lists them), or give the value itself"
    elif isinstance(error, InterpolationResolutionError):
        fix = "give the value itself, or an interpolation that resolves (`python -m runner --cfg job --resolve`)"
    else:
        fix = "check the value against `python -m runner --cfg job`"
    return ConfigError(key, problem, fix)


def _lora_item(value: Any, where: str) -> LoraItem:
    from omegaconf.errors import OmegaConfBaseException

    if isinstance(value, LoraItem):
        return value
    if not isinstance(value, dict):
        raise ConfigError(where, f"must be a mapping of LoraItem fields, got {value!r}",
                          f"use {where}.path=... {where}.alpha=...")
    try:
        node = OmegaConf.merge(OmegaConf.structured(LoraItem), value)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or getattr(e, "key", None)
        msg = str(e).splitlines()[0]
        from omegaconf.errors import ConfigKeyError

        fix = "the keys are model_id, origin_file_pattern, path, alpha" if isinstance(e, ConfigKeyError) \
            else "give a value of the field's type"
        raise ConfigError(f"{where}.{key}" if key else where, msg, fix) from None
    item = OmegaConf.to_object(node)
    assert isinstance(item, LoraItem)
    return item


def validate(spec: RunSpec) -> None:
    """What the schema's types cannot express, checked with the library's own parsers (so the
    runner and the library accept the same values); raises ConfigError naming the path and the
    fix. The pipeline's call arguments are checked by `build.preflight` against the pipeline."""
    _check_run(spec)
    _check_model(spec.model)
    _check_vram(spec.vram)
    _check_loras(spec.lora)
    _check_tracking(spec)
    _check_report(spec.report)
    keep_warm_seconds(spec.keep_warm)


_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhd])")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
KEEP_WARM_MAX = "365d"  # the longest keep_warm (a worker's idle time); more is refused


def keep_warm_seconds(value: Optional[str]) -> Optional[float]:
    """`keep_warm` in seconds: `90s`, `15m`, `2h`, `1d`, `1h30m`, `1.5h`, at most KEEP_WARM_MAX;
    `0` (use a running worker once, then stop it); None (no worker). Raises ConfigError at
    `keep_warm`."""
    if value is None:
        return None
    text = str(value).strip().lower()
    if text in ("0", "0.0"):
        return 0.0
    parts = _DURATION.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ConfigError("keep_warm", f"{value!r} is not a duration",
                          "give a number with a unit s, m, h or d (keep_warm=15m, keep_warm=2h, keep_warm=1h30m), "
                          "0 to stop a running warm worker after this command, or null for no worker")
    seconds = float(sum(float(n) * _UNIT_SECONDS[u] for n, u in parts))
    if seconds > 365 * 86400:
        raise ConfigError("keep_warm", f"{value!r} is longer than the maximum, {KEEP_WARM_MAX}",
                          f"give at most keep_warm={KEEP_WARM_MAX} (a warm worker exits after that long without a "
                          "command; `python -m runner warm stop` ends it sooner)")
    return seconds


def _setting(key: str, check: Any, *args: Any, fix: str) -> Any:
    """`check(*args)` from the library, its error as a ConfigError at `key`."""
    from pipelines import SettingError

    try:
        return check(*args)
    except SettingError as error:
        raise ConfigError(key, str(error).rstrip("."), fix) from None


def _check_run(spec: RunSpec) -> None:
    from pipelines import check_seed, parse_device

    if spec.device != "auto":
        _setting("device", parse_device, spec.device, "device", fix="use auto, cpu, cuda, cuda:N or mps")
    if spec.seed is not None:
        _setting("seed", check_seed, spec.seed, "seed", fix="give a seed in [0, 2**64), or null for a random one")
    if not isinstance(spec.call, dict):
        raise ConfigError("call", f"must be a mapping of call arguments, got {spec.call!r}", "use call.NAME=value")


def _check_model(m: ModelSpec) -> None:
    if not m.files:
        raise ConfigError("model.files", "the model lists no files",
                          "list its checkpoint files in conf/model/<name>.yaml")
    named = [(f"model.files.{i}", f) for i, f in enumerate(m.files)]
    named += [(key, f) for key, f in (("model.tokenizer", m.tokenizer), ("model.processor", m.processor)) if f]
    for where, f in named:
        _check_repo_paths(where, f.model_id, f.origin_file_pattern)
        if (f.path is None) == (f.model_id is None):
            raise ConfigError(where, "give exactly one of `model_id` (+ origin_file_pattern) or `path`",
                              "set one of them")
        if f.path is not None and not (
            isinstance(f.path, str) or (isinstance(f.path, list) and all(isinstance(p, str) for p in f.path))
        ):
            raise ConfigError(f"{where}.path", f"must be a file path or a list of them, got {f.path!r}",
                              "give path strings")
    if m.download_source is not None:
        from pipelines import parse_download_source

        try:
            parse_download_source(m.download_source, "model.download_source")
        except ValueError as error:
            raise ConfigError("model.download_source", str(error).rstrip("."),
                              "use modelscope or huggingface") from None


def _check_repo_paths(where: str, model_id: Optional[str], pattern: Optional[str]) -> None:
    """Ids and patterns that would resolve outside the models folder are refused before any file access."""
    from pipelines import check_repo_path

    for key, value, what in (("model_id", model_id, "model_id"), ("origin_file_pattern", pattern, "pattern")):
        if value is not None:
            _setting(f"{where}.{key}", check_repo_path, value, what, fix="give a hub id `owner/name` and a pattern "
                     "relative to the repo (no `..`, leading `/` or `~`, drive letter or backslash)")


def _check_vram(v: VramSpec) -> None:
    from pipelines import check_vram_limit, parse_device, parse_dtype

    limit = v.vram_limit
    if limit is not None and limit != "auto":
        _setting("vram.vram_limit", check_vram_limit, limit, fix="e.g. vram.vram_limit=12 (GiB), auto, or null")
    for key in VRAM_KEYS:
        value = getattr(v, key)
        if value is None or value == "auto":
            continue
        parse = parse_dtype if key.endswith("_dtype") else parse_device
        _setting(f"vram.{key}", parse, value, key, True,
                 fix="a dtype float32|bfloat16|float16|float8_e4m3fn|float8_e5m2|disk|auto, a device cpu|cuda|cuda:N|"
                     "disk|auto (see docs/vram.md)")


def _check_loras(lora: LoraSpec) -> None:
    from pipelines import finite

    labels = set()
    for label, where, item in lora.items():
        if label in labels:
            raise ConfigError(where, f"two LoRAs are labelled {label!r}", "rename one stack entry")
        labels.add(label)
        _setting(f"{where}.alpha", finite, item.alpha, f"{where}.alpha", fix="give a finite strength, e.g. 0.8")
        _check_repo_paths(where, item.model_id, item.origin_file_pattern)
        if item.path is None and item.model_id is None:
            raise ConfigError(f"{where}.path", f"the LoRA {label!r} names no file",
                              f"set {where}.path=/path/to/lora.safetensors")
        if item.path is not None and item.model_id is not None:
            raise ConfigError(where, "give exactly one of `model_id` (+ origin_file_pattern) or `path`",
                              "set one of them")
        if item.path is not None and not Path(item.path).is_file():
            raise ConfigError(f"{where}.path", f"LoRA file not found: {item.path}",
                              "give an existing .safetensors file")


def _check_report(report: ReportSpec) -> None:
    """The axes' keys are checked against the sweep's swept keys when it starts (runner.sweep)."""
    if not 32 <= report.thumb <= 2048:
        raise ConfigError("report.thumb", f"{report.thumb} pixels is not a thumbnail size",
                          "give 32 to 2048 (default 256)")
    axes = [(a, getattr(report, a)) for a in ("x", "y", "z") if getattr(report, a) not in (None, "none")]
    for i, (axis, key) in enumerate(axes):
        if any(key == other for _, other in axes[:i]):
            raise ConfigError(f"report.{axis}", f"{key!r} is on two axes", "give each axis its own key (or none)")


def _check_tracking(spec: RunSpec) -> None:
    from pipelines import finite

    t = spec.tracking
    timeout = _setting("tracking.request_timeout_s", finite, t.request_timeout_s, "tracking.request_timeout_s",
                       fix="give seconds, e.g. 10")
    if timeout <= 0:
        raise ConfigError("tracking.request_timeout_s", f"{timeout} is not a positive number of seconds", "e.g. 10")
    if not re.fullmatch(r"[A-Za-z0-9_\-./ ]+", t.image_key or ""):
        raise ConfigError("tracking.image_key", f"{t.image_key!r} is not an MLflow image key",
                          "use letters, digits, _ - . / and spaces (default: image)")
    if not 0 <= t.request_retries <= 10:
        raise ConfigError("tracking.request_retries", f"{t.request_retries} retries", "give 0 to 10 (MLflow's limit)")
    if spec.resume and spec.tracking.backend is TrackingBackend.none:
        raise ConfigError("resume", "resume looks up finished runs in MLflow, but tracking=none", "use tracking=mlflow")
    if spec.tracking.backend is not TrackingBackend.none:
        _check_store(spec)


MAX_EXPERIMENT_NAME = 500  # MLflow's limit


def _check_store(spec: RunSpec) -> None:
    """The experiment's name and the store's place, which MLflow would refuse only once the
    weights are loaded (and then as "cannot be reached")."""
    name = spec.experiment
    if not name.strip() or len(name) > MAX_EXPERIMENT_NAME:
        raise ConfigError("experiment", f"{name!r} is not an MLflow experiment name",
                          f"give a name of 1 to {MAX_EXPERIMENT_NAME} characters, e.g. experiment=qwen-image")
    uri = spec.tracking.uri
    if uri is not None and uri.partition(":")[0].split("+")[0].lower() not in TRACKING_SCHEMES:
        raise ConfigError("tracking.uri", f"{uri!r} is not an MLflow tracking URI this runner can use",
                          "use http://HOST:PORT for a tracking server, sqlite:////abs/path.db, or null for the "
                          "embedded store under tracking.store_dir")
    if uri is None:
        folder = Path(spec.tracking.store_dir)
        blocked = next((p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()), None)
        if blocked is not None:
            raise ConfigError("tracking.store_dir", f"{blocked} is a file, not a folder, so the store "
                              f"{folder / 'mlflow.db'} cannot be made there",
                              "give a folder (it is created if missing), e.g. tracking.store_dir=outputs/mlflow")


# ---------------------------------------------------------------------- composing


def compose(overrides: Sequence[str]) -> DictConfig:
    """The composed config of `conf/` with these overrides, outside a Hydra app (the download,
    sync and cleanup commands). Raises ConfigError naming the key (composition_error)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException

    register_configs()
    conf = Path(__file__).resolve().parent.parent / "conf"
    try:
        with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
            return hydra_compose("config", overrides=list(overrides))
    except HydraException as error:
        raise composition_error(error, overrides) from None


def composition_error(error: BaseException, overrides: Sequence[str] = ()) -> ConfigError:
    """Hydra's composition or override-parsing error as a ConfigError: the config key, what is
    wrong with it and the fix (Hydra's own text echoes the override, but names no fix)."""
    cause = error.__cause__
    key = getattr(cause, "full_key", None)
    if key:
        key = re.sub(r"\[(\w+)\]", r".\1", str(key))  # model.files[0].pth -> model.files.0.pth
        problem = str(cause).strip().splitlines()[0].rstrip(".")
        return ConfigError(key, problem, _fix_for(cause, key))
    missing = getattr(error, "missing_cfg_file", None)
    if missing:
        group, _, name = str(missing).rpartition("/")
        options = list(getattr(error, "options", None) or [])
        close = difflib.get_close_matches(name, options, n=1)
        fix = (f"did you mean {group}={close[0]}? " if close else "") + f"the presets of `{group}` are " + \
            ", ".join(options)
        return ConfigError(group or "config", f"no preset {name!r} in conf/{group}", fix)
    from hydra.errors import OverrideParseException

    lines = str(error).strip().splitlines() or [type(error).__name__]
    if isinstance(error, OverrideParseException):
        bad = _unparsable(overrides)
        return ConfigError(_key_of(bad) if bad else "overrides", f"cannot parse `{bad or ' '.join(overrides)}` "
                           f"({lines[0]})", "quote a value holding , [ ] { } ( ) = or spaces, e.g. "
                           "'prompt=\"a, b\"' (Hydra's override grammar)")
    quoted = re.search(r"'([A-Za-z_+~][\w.\-/@]*)'", lines[0])
    fix = " ".join(line.strip() for line in lines[1:]) or "check the override against `python -m runner --cfg job`"
    return ConfigError(quoted.group(1).lstrip("+~") if quoted else "overrides", lines[0].rstrip("."), fix)


def _key_of(override: str) -> str:
    return override.partition("=")[0].lstrip("+~")


def _unparsable(overrides: Sequence[str]) -> Optional[str]:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    for override in overrides:
        try:
            parser.parse_overrides([override])
        except Exception:  # noqa: BLE001 - this is the one
            return override
    return None


def _fix_for(cause: BaseException, key: str) -> str:
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, GrammarParseError

    text = str(cause)
    if isinstance(cause, GrammarParseError):
        kept = " (in a prompt a whole `${...}` is kept as typed)" if key in LITERAL_KEYS else ""
        return f"close each `${{` with `}}`: Hydra's parser reads `${{` as the start of an interpolation{kept}"
    if isinstance(cause, (ConfigAttributeError, ConfigKeyError)):
        parent, _, name = key.rpartition(".")
        fields = schema_fields(parent)
        close = difflib.get_close_matches(name, fields, n=1)
        where = f"{parent}." if parent else ""
        if close:
            return f"did you mean `{where}{close[0]}`?"
        return f"the keys of `{parent or 'the config'}` are {', '.join(fields)}" if fields else "check the key"
    choices = re.search(r"expected one of \[([^\]]*)\]", text)
    if choices:
        return f"use one of {choices.group(1)}"
    for kind, fix in (("Integer", "give an integer"), ("Float", "give a number"), ("Boolean", "give true or false"),
                      ("Dict", f"give a mapping ({key}.NAME=value) or null"), ("List", f"give a list: {key}=[a,b]")):
        if kind in text:
            return fix
    return "give a value of the key's type (`python -m runner --cfg job` shows them)"


def schema_fields(path: str) -> list[str]:
    """The field names of the schema node at a dotted config path ("" = the root)."""
    import dataclasses
    import typing

    node: Any = RunSpec
    entry = False  # the part is a list index or a dict key: the node stays the entry's type
    for part in [p for p in path.split(".") if p]:
        if entry:
            entry = False
            continue
        hints = typing.get_type_hints(node) if dataclasses.is_dataclass(node) else {}
        if part not in hints:
            return []
        tp = hints[part]
        entry = typing.get_origin(tp) in (dict, list)
        node = _dataclass_in(typing.get_args(tp)[-1] if entry else tp) or Any
    return [f.name for f in dataclasses.fields(node)] if dataclasses.is_dataclass(node) else []
