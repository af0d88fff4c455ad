"""What a run IS, checked: a composed config read as the runner reads it (`job_config`: Hydra's
node left out, the prompts as typed), turned into typed objects (`to_spec`), and checked with the
library's own parsers where types cannot say enough (`validate`); each refusal a ConfigError at
its config path, with the fix.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import re
import typing
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

from pipelines import VRAM_KEYS

from ..errors import ConfigError
from .schema import (
    LITERAL_KEYS,
    ControlNetSpec,
    FileSpec,
    LoraItem,
    LoraSpec,
    ModelSpec,
    ReportSpec,
    RunSpec,
    TrackingBackend,
    VramSpec,
    dataclass_in,
    type_hints,
)

TRACKING_SCHEMES = ("http", "https", "sqlite", "postgresql", "mysql", "mssql", "databricks")


def check_keys(cfg: DictConfig, schema: type = None, prefix: str = "") -> None:
    """Every key of `cfg` must be a field of its dataclass. Hydra's `+key=value` adds keys
    even to a structured node, and `OmegaConf.to_object` would drop them silently."""
    schema = schema or OmegaConf.get_type(cfg)
    if not dataclasses.is_dataclass(schema):
        return
    hints = type_hints(schema)
    for key in cfg.keys():
        path = f"{prefix}{key}"
        if key not in hints:
            close = difflib.get_close_matches(str(key), list(hints), n=1)
            hint = f"did you mean `{prefix}{close[0]}`?" if close else f"the keys are {', '.join(hints)}"
            raise ConfigError(path, f"unknown key (not in {schema.__name__})", hint)
        node = cfg._get_node(key)
        if isinstance(node, DictConfig) and not node._is_missing() and not node._is_none():
            if typing.get_origin(hints[key]) is dict:
                item_type = dataclass_in(typing.get_args(hints[key])[1])
                if item_type is not None:
                    for k in node.keys():
                        check_keys(node[k], item_type, f"{path}.{k}.")
            elif (sub := dataclass_in(hints[key])) is not None:
                check_keys(node, sub, path + ".")
        elif isinstance(node, ListConfig):
            args = typing.get_args(hints[key])
            item_type = dataclass_in(args[0]) if args else None
            if item_type is not None:
                for i, item in enumerate(node):
                    check_keys(item, item_type, f"{path}.{i}.")


def without_hydra(cfg: DictConfig) -> DictConfig:
    """The config without Hydra's node: `cfg` itself when it has none (a sweep's jobs), else a
    copy (~14 ms for the runner's config)."""
    if "hydra" not in cfg:
        return cfg
    cfg = cfg.copy()
    with open_dict(cfg):
        cfg.pop("hydra")
    return cfg


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
    fix. The pipeline's call arguments are checked by runner.build.arguments.preflight."""
    _check_run(spec)
    _check_model(spec.model)
    _check_controlnet(spec.controlnet)
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
    _check_files(named)
    _check_download_source("model.download_source", m.download_source)


def _check_files(named: list[tuple[str, FileSpec]]) -> None:
    """Each file: a hub id + pattern that stay in the models folder, or a local path that is there."""
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
        paths = [f.path] if isinstance(f.path, str) else f.path or []
        for i, path in enumerate(paths):
            _check_local_file(f"{where}.path" + (f".{i}" if isinstance(f.path, list) else ""), path, folder_ok=True)


def _check_download_source(key: str, value: Optional[str]) -> None:
    if value is not None:
        from pipelines import parse_download_source

        try:
            parse_download_source(value, key)
        except ValueError as error:
            raise ConfigError(key, str(error).rstrip("."), "use modelscope or huggingface") from None


def _check_controlnet(c: ControlNetSpec) -> None:
    """The ControlNet files as the model's; conditions exactly when nets are loaded, each for one
    of them. Pictures and numbers are the pipeline's to check (runner.build.arguments.preflight)."""
    _check_files([(f"controlnet.files.{i}", f) for i, f in enumerate(c.files)])
    _check_download_source("controlnet.download_source", c.download_source)
    conditions = c.conditions()
    if c.files and not conditions:
        raise ConfigError("controlnet.image", f"the ControlNet preset {c.name!r} is given no control picture",
                          "set controlnet.image=PATH (and controlnet.mask=PATH for an inpainting net), list "
                          "conditions in controlnet.inputs=[{image:PATH}], or use controlnet=none")
    if conditions and not c.files:
        where = conditions[0][0]
        raise ConfigError(f"{where}.image" if where == "controlnet" else where,
                          "a ControlNet condition is given but no ControlNet is loaded (controlnet.files is empty)",
                          "choose a ControlNet preset (controlnet=union, blockwise_canny, ...; conf/controlnet/), or "
                          "drop the condition")
    for where, item in conditions:
        if not 0 <= item.controlnet_id < len(c.files):
            raise ConfigError(f"{where}.controlnet_id", f"{item.controlnet_id} names no ControlNet: "
                              f"{len(c.files)} are loaded (ids are positions in controlnet.files, from 0)",
                              f"give 0 to {len(c.files) - 1}, or add the ControlNet's file to controlnet.files")


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
        if item.path is not None:
            _check_local_file(f"{where}.path", item.path, folder_ok=False)


def _check_local_file(key: str, path: str, folder_ok: bool) -> None:
    """A local file a run names is there and is a regular file (a FIFO or a device would block
    whoever reads it), or a folder where one is taken (a tokenizer folder)."""
    from pipelines import SettingError, regular_file

    if folder_ok and Path(path).is_dir():
        return
    try:
        regular_file(path, "file")
    except FileNotFoundError:
        raise ConfigError(key, f"no such file: {path}", "give the path of an existing file") from None
    except SettingError as error:
        problem = str(error).removeprefix("file: ").rsplit(". Give ", 1)[0]  # the fix is ours
        raise ConfigError(key, problem, "give the path of a regular file") from None


def _check_report(report: ReportSpec) -> None:
    """The axes' keys are checked against the sweep's swept keys when it starts (runner.execution.sweep)."""
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


