"""Composing what a run IS: the config of `conf/` with a command line's overrides (Hydra's
compose), Hydra's composition errors as ConfigErrors at their key, and a sweep's per-job
configs composed the way Hydra composes them, once per combination of config groups
(`Composer`).
"""
from __future__ import annotations

import copy
import difflib
import re
from typing import Any, Optional, Sequence

from omegaconf import DictConfig, OmegaConf, open_dict

from ..errors import ConfigError
from . import CONF_DIR
from .schema import LITERAL_KEYS, register_configs, schema_fields


def compose(overrides: Sequence[str]) -> DictConfig:
    """The composed config of `conf/` with these overrides, outside a Hydra app (the download,
    sync and cleanup commands). Raises ConfigError naming the key (composition_error)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException

    register_configs()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
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


def task_overrides(config: DictConfig) -> list[str]:
    """The command line's overrides as typed (Hydra's hydra.overrides.task, not resolved: reading
    its items would resolve an interpolation they hold, `prompt=${oc.env:HOME}`)."""
    return [str(o) for o in OmegaConf.to_container(config.hydra.overrides.task, resolve=False)]


class Composer:
    """Each job's config as Hydra's launcher composes it (`load_sweep_config`: the sweep's
    hydra.* overrides first, Hydra's resolver cache copied, so the same `now` and the same
    claimed folder), with Hydra's composition run once per combination of config-group choices
    (`model=`, `lora=`, hydra.* ...). A job that differs from it only in values (`seed=1`,
    `lora.alpha=0.5`) gets a copy of that composition with its values applied by Hydra's own
    override code, and the fields Hydra derives from a job's overrides set the same way.
    Composing reads and merges every file of the defaults list again: ~250 ms a job on a
    2-core machine. Only the job's own keys are copied (~3 ms); Hydra's node (twice their size)
    is the composition's own, attached to the job's config with the job's fields set: it holds
    the last job's, so read it before composing the next job."""

    def __init__(self, config: DictConfig, loader: Any = None) -> None:
        if loader is None:  # the loader of the Hydra app running now
            from hydra.core.global_hydra import GlobalHydra

            loader = GlobalHydra.instance().hydra.config_loader
        self.config = config
        self.loader = loader  # a hydra.core.config_loader.ConfigLoader
        # the group overrides -> Hydra's composition, without its hydra node; that node
        self.bases: dict[tuple[str, ...], tuple[DictConfig, DictConfig]] = {}
        # each override as typed -> (Hydra's parse of it, whether it is a value): the jobs of a sweep
        # repeat the command line's overrides, and Hydra's parser takes ~0.5 ms for each
        self._parsed: dict[str, tuple[Any, bool]] = {}

    def _is_value(self, override: Any) -> bool:
        """An override Hydra applies to the composed config (not one that changes what is composed)."""
        if override.package is not None or override.is_hydra_override():
            return False
        return isinstance(override.value(), dict) or not self.loader.repository.group_exists(override.key_or_group)

    def _parse(self, overrides: Sequence[str]) -> list[tuple[Any, bool]]:
        """Each override parsed by Hydra (once per distinct text: a parsed Override is not changed
        by its use, its value() is a new object each time), and whether it is a value."""
        from hydra.core.override_parser.overrides_parser import OverridesParser

        new = [o for o in dict.fromkeys(overrides) if o not in self._parsed]
        if new:
            for text, override in zip(new, OverridesParser.create().parse_overrides(new)):
                self._parsed[text] = (override, self._is_value(override))
        return [self._parsed[o] for o in overrides]

    def __call__(self, overrides: list[str]) -> DictConfig:
        # Hydra has no public API for applying value overrides to a composed config nor for the
        # override_dirname it derives from a job's overrides: its own code is used, so that a
        # job's config stays equal to Hydra's composition (tests/test_runner_config.py holds it)
        from hydra._internal.config_loader_impl import ConfigLoaderImpl, get_overrides_dirname
        from omegaconf import flag_override

        parsed, values, chosen = [], [], []
        for override, is_value in self._parse(overrides):
            parsed.append(override)
            (values if is_value else chosen).append(override)
        groups = tuple(o.input_line for o in chosen)
        if groups not in self.bases:
            composed = self.loader.load_sweep_config(self.config, list(groups))
            hydra = composed.hydra
            with open_dict(composed):
                del composed["hydra"]
            self.bases[groups] = (composed, hydra)
        body, hydra = self.bases[groups]
        cfg = copy.deepcopy(body)
        ConfigLoaderImpl._apply_overrides_to_config(values, cfg)
        with open_dict(cfg), flag_override(cfg, "no_deepcopy_set_nodes", True):  # attached, not copied
            cfg.hydra = hydra
        OmegaConf.copy_cache(from_config=self.config, to_config=cfg)
        job_conf, task = cfg.hydra.job, [o for o in parsed if not o.is_hydra_override()]
        cfg.hydra.overrides.task = [o.input_line for o in task]
        job_conf.override_dirname = get_overrides_dirname(
            overrides=task, kv_sep=job_conf.config.override_dirname.kv_sep,
            item_sep=job_conf.config.override_dirname.item_sep,
            exclude_keys=job_conf.config.override_dirname.exclude_keys)
        return cfg
