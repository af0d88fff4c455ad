"""The pipeline call a spec makes, checked before any weight is read: the run's keys, the
sampler's under the pipeline's argument names and `call.*`, each name checked against the
pipeline's signature and each value by the pipeline itself (`preflight`); a refusal is a
ConfigError at the config key that set the argument.
"""
from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any, Optional

from ..config.schema import CONTROL_ARGUMENT, CONTROL_FIELDS, RUN_ARGUMENTS, SAMPLER_ARGUMENTS, RunSpec
from ..errors import ConfigError
from .pipeline import pipeline_class


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
        raise refusal(spec, error, arguments) from None
    return arguments


def refusal(spec: RunSpec, error: Exception, arguments: dict[str, Any]) -> ConfigError:
    """The pipeline's refusal of an argument as a ConfigError at the config key that set it (an
    item of a list at `call.edit_image[1]`, a ControlNet condition's field at `controlnet.image`,
    `controlnet.inputs.1.scale`, ...)."""
    message = str(error).strip().rstrip(".")
    name = argument_named(message, arguments)
    key = config_key(name) if name else "call"
    value = arguments.get(name)
    item = re.search(rf"\b{re.escape(name)}\[(\d+)\]", message) if name and name != CONTROL_ARGUMENT else None
    if item and isinstance(value, (list, tuple)) and int(item.group(1)) < len(value):  # `edit_image[1]: ...`
        key, value = f"{key}[{item.group(1)}]", value[int(item.group(1))]
    control = re.search(rf"\b{CONTROL_ARGUMENT}\[(\d+)\](?:\.(\w+))?", message) if name == CONTROL_ARGUMENT else None
    conditions = spec.controlnet.conditions()
    if control and int(control.group(1)) < len(conditions):  # `controlnet_inputs[1].scale` -> its condition's key
        where, condition = conditions[int(control.group(1))]
        field = {argument: k for k, argument in CONTROL_FIELDS.items()}.get(control.group(2) or "")
        key = f"{where}.{field}" if field else where
        value = getattr(condition, field) if field else None
    return ConfigError(key, message, _argument_fix(error, key, value))


# what a pipeline's `check_arguments` raises for a value a user gave (a SettingError is a ValueError)
ARGUMENT_ERRORS = (ValueError, TypeError, ArithmeticError, FileNotFoundError)


def _argument_fix(error: Exception, key: str, value: Any) -> str:
    if isinstance(error, FileNotFoundError):
        return "give an existing file"
    if isinstance(value, (bool, int, float)) and "path" in str(error):
        base, item, _ = key.partition("[")  # an item of a list (`call.edit_image[0]`): quoted in the list
        example = f"{base}=['5']" if item else f"{key}='5'"
        return f"give the path of a picture file; quote a name YAML would read as a number or a boolean ({example})"
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
    _add_controls(spec, cls, parameters, arguments)
    missing = [name for name in arguments if name not in parameters]
    if missing:
        name = missing[0]
        raise ConfigError(config_key(name), f"{cls.__name__} takes no argument {name!r}",
                          _closest_key(name, parameters))
    return arguments


def _add_controls(spec: RunSpec, cls: Any, parameters: Any, arguments: dict[str, Any]) -> None:
    """The `controlnet` group's conditions as the call's `controlnet_inputs`: one
    pipelines.ControlNetInput each (their pictures as paths: the pipeline reads them)."""
    conditions = spec.controlnet.conditions()
    if not conditions:
        return
    if CONTROL_ARGUMENT not in parameters:
        raise ConfigError("controlnet", f"{cls.__name__} takes no ControlNet ({CONTROL_ARGUMENT})",
                          f"use controlnet=none with model={spec.model.name}")
    taken = [name for name in spec.call if name.endswith(CONTROL_ARGUMENT)]  # DiffSynth's other name too
    if taken:
        raise ConfigError(f"call.{taken[0]}", "the ControlNet conditions are set by the `controlnet` group",
                          "give them as controlnet.image=... or controlnet.inputs=[...] instead")
    from pipelines import ControlNetInput

    arguments[CONTROL_ARGUMENT] = [
        ControlNetInput(**{argument: getattr(item, key) for key, argument in CONTROL_FIELDS.items()})
        for _, item in conditions]


def _closest_key(name: str, parameters: Any) -> str:
    """`did you mean` with the config key that sets the closest argument (`call.cfg_sclae` ->
    `sampler.cfg_scale`, `call.steps` -> `sampler.steps`), else the arguments there are."""
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
    found = [(m.start(), name) for name in arguments if (m := re.search(rf"\b{re.escape(name)}\b", message))]
    return min(found)[1] if found else None


def read_files(spec: RunSpec, arguments: dict[str, Any]) -> dict[str, Path]:
    """The local files a job reads that its config names by path, by config path: each LoRA's
    `path` (`lora.path`, `lora.stack.NAME.path`) and each picture of the call (`call.input_image`,
    `call.edit_image[1]`, `controlnet.image`, `controlnet.inputs.1.mask`). Relative paths are
    this process's."""
    files = {f"{where}.path": Path(item.path) for _, where, item in spec.lora.items() if item.path is not None}
    files.update({key: path for _, _, key, path in pictures(spec, arguments)})
    return files


def pictures(spec: RunSpec, arguments: dict[str, Any]) -> list[tuple[str, int, str, Path]]:
    """The picture files the call reads, as (argument, index, config key, path): the pipeline's
    image arguments given as paths (`edit_image`, 1, `call.edit_image[1]`), and each ControlNet
    condition's pictures (`controlnet_inputs.image`, 0, `controlnet.image`): the argument names
    a field of the i-th ControlNetInput."""
    found = []
    for arg in getattr(pipeline_class(spec), "image_arguments", ()):
        value = arguments.get(arg)
        many = isinstance(value, (list, tuple))
        found += [(arg, i, config_key(arg) + (f"[{i}]" if many else ""), Path(v))
                  for i, v in enumerate(value if many else [value]) if isinstance(v, (str, Path))]
    controls = arguments.get(CONTROL_ARGUMENT) or []
    for i, (where, _) in enumerate(spec.controlnet.conditions()[:len(controls)]):
        for key, argument in CONTROL_FIELDS.items():
            value = getattr(controls[i], argument, None)
            if isinstance(value, (str, Path)):
                found.append((f"{CONTROL_ARGUMENT}.{argument}", i, f"{where}.{key}", Path(value)))
    return found
