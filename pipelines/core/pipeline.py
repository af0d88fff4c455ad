"""The generic part of every family pipeline: loading components, moving them by stage,
LoRA, timings. A family pipeline (e.g. `pipelines.qwen_image`) declares only what is its own:

    class MyPipeline(Pipeline):
        components = {"dit": MyDiT, "text_encoder": MyTextEncoder, "vae": MyVAE}
        lora_target = "dit"                 # where the runner applies LoRAs
        image_arguments = ("input_image",)  # call arguments that take pictures

        @generation
        def __call__(self, prompt, ...): encode -> denoise (core.sampling.denoise) -> decode

plus, where it has them, `component_lists` (components of which any number may be loaded, e.g.
ControlNets: a list attribute in the order given), `stage_of` (a component that computes on another
one's stage, e.g. ControlNets on the DiT's), `component_classes`, `load_tokenizer`,
`load_processor`, `check_arguments` and `on_loaded`.
"""
from __future__ import annotations

import contextlib
import difflib
import functools
import inspect
import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn as nn

from . import vram
from .download import resolve_files
from .loader import load_model, recognise_checkpoint
from .lora import LoraHandle, LoraSource, clear_lora, load_lora
from .model_config import ModelConfig
from .parse import SettingError, parse_compute_dtype, parse_device
from .shards import CheckpointError

logger = logging.getLogger(__name__)


def generation(call: Callable) -> Callable:
    """For a family's `__call__`: inference mode, fresh timings, and every VRAM-managed model
    back in its offload storage when the call ends, also when it fails."""
    @functools.wraps(call)
    def wrapper(self: "Pipeline", *args: Any, **kwargs: Any) -> Any:
        self.timings = {}
        try:
            with torch.inference_mode():
                return call(self, *args, **kwargs)
        finally:
            self.use_stage(None)
    return wrapper


class Pipeline:
    components: ClassVar[dict[str, type]] = {}  # pipeline attribute -> model class
    # pipeline attribute -> model classes of which any number may be loaded (a list, in the order given)
    component_lists: ClassVar[dict[str, tuple[type, ...]]] = {}
    stage_of: ClassVar[dict[str, str]] = {}  # component -> the stage it computes on (default: its own)
    lora_target: ClassVar[str] = "dit"
    image_arguments: ClassVar[tuple[str, ...]] = ()
    supports_vram_management: ClassVar[bool] = True
    family: ClassVar[str] = ""  # the models the pipeline loads, as messages name them ("Qwen-Image 2.1")
    # Model classes of related families whose checkpoints share key names with ours: recognised from
    # their keys only to be refused by name before any weight loads.
    # class -> (component, its family, the pipeline that loads it)
    foreign_components: ClassVar[dict[type, tuple[str, str, str]]] = {}

    def __init__(self, torch_dtype: torch.dtype, device: str | torch.device):
        self.torch_dtype = torch_dtype
        self.device = torch.device(device)
        for name in self.components:
            setattr(self, name, None)
        for name in self.component_lists:
            setattr(self, name, [])
        self.sources: dict[str, ModelConfig] = {}  # "dit", "controlnets.1"... -> the config it came from
        self.tokenizer: Any = None
        self.processor: Any = None
        self.vram: dict[str, vram.VramManager] = {}  # component name -> its VRAM manager
        self.timings: dict[str, float] = {}

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_pretrained(
        cls,
        torch_dtype: torch.dtype | str = torch.bfloat16,
        device: str | torch.device = "cuda",
        model_configs: Sequence[ModelConfig] = (),
        tokenizer_config: ModelConfig | None = None,
        processor_config: ModelConfig | None = None,
        vram_limit: float | str | None = None,
        vram_options: vram.VramOptions | None = None,
    ) -> "Pipeline":
        """Load the models named by `model_configs` (each recognised from its keys) and the
        tokenizer/processor. `torch_dtype`/`device` are the computation precision and device. A
        ModelConfig with offload_dtype/offload_device gets VRAM management; `vram_limit`: GiB of
        device memory below which layers stay on the preparing device, None for no limit,
        "auto" for the total minus a margin. Everything is checked before any weight is read."""
        torch_dtype = parse_compute_dtype(torch_dtype)
        device = parse_device(device)
        vram_limit = vram.resolve_vram_limit(vram_limit, device)
        settings = [vram.settings_for(c, torch_dtype, device, vram_limit) for c in model_configs]
        if vram_limit is not None and not any(settings):
            logger.warning("vram_limit=%s has no effect: no ModelConfig enables VRAM management (offload_*).",
                           vram_limit)
        pipe = cls(torch_dtype, device)
        options = vram_options or vram.VramOptions()  # one memory meter for all the pipeline's models
        classes = cls.component_classes(with_processor=processor_config is not None)
        files = [resolve_files(config) for config in model_configs]
        names = cls.recognise_components(model_configs, files, classes)  # headers only: nothing loaded yet
        # the small files first: a tokenizer or processor that cannot be read is refused before any weight loads
        if tokenizer_config is not None:
            pipe.tokenizer = cls.load_tokenizer(resolve_files(tokenizer_config))
        if processor_config is not None:
            pipe.processor = cls.load_processor(resolve_files(processor_config))
        for config, paths, name, managed in zip(model_configs, files, names, settings):
            pipe._load_component(name, config, paths, managed, classes, options)
        pipe.on_loaded()
        return pipe

    @classmethod
    def component_classes(cls, with_processor: bool) -> dict[str, type]:
        """The classes the loader may recognise, per component (a family may pick other
        classes when a processor is given)."""
        return dict(cls.components)

    @classmethod
    def recognise_components(cls, configs: Sequence[ModelConfig], files: Sequence[Sequence[Path]],
                             classes: Mapping[str, type]) -> list[str]:
        """The component each config holds (a list component: its group's name), recognised from
        its files' headers before any weight is read. Refused here: a part of a related family
        (`foreign_components`), named beside the parts given, and a single component given twice."""
        owners = {c: n for n, c in classes.items()}
        owners.update({c: group for group, listed in cls.component_lists.items() for c in listed})
        candidates = (*owners, *(c for c in cls.foreign_components if c not in owners))
        found = [recognise_checkpoint(paths, candidates) for paths in files]
        cls._refuse_foreign(configs, found, owners)
        names: list[str] = []
        for config, model in zip(configs, found):
            name = owners[model]
            if name in names and name not in cls.component_lists:
                raise ValueError(
                    f"Two model configs hold the {name}: {configs[names.index(name)].describe()} and "
                    f"{config.describe()}. Give each component once: drop one of them from model_configs.")
            names.append(name)
        return names

    @classmethod
    def _refuse_foreign(cls, configs: Sequence[ModelConfig], found: Sequence[type],
                        owners: Mapping[type, str]) -> None:
        foreign = [(config, model) for config, model in zip(configs, found) if model in cls.foreign_components]
        if not foreign:
            return
        config, model = foreign[0]
        component, family, pipeline = cls.foreign_components[model]
        own = [f"the {owners[m]} ({m.__name__}, {c.describe()})"
               for c, m in zip(configs, found) if m not in cls.foreign_components]
        given = f" (given: {'; '.join(own)})" if own else ""
        raise CheckpointError(
            f"{config.describe()} holds the {family} {component} ({model.__name__}), but {cls.__name__} loads "
            f"{cls.family} models{given}; parts of the two families do not fit together. Give the {cls.family} "
            f"{component} instead, or load {family} models with {pipeline}.")

    def _load_component(self, name: str, config: ModelConfig, files: Sequence[Path],
                        managed: vram.VramSettings | None, classes: Mapping[str, type],
                        options: vram.VramOptions) -> None:
        candidates = self.component_lists[name] if name in self.component_lists else tuple(classes.values())
        if managed is None:
            model = load_model(files, candidates, self.torch_dtype, self.device)
        else:
            model = vram.load_managed(files, candidates, managed, options)
        if name in self.component_lists:  # one more of a list component
            getattr(self, name).append(model)
            name = f"{name}.{len(getattr(self, name)) - 1}"
        else:
            setattr(self, name, model)
        self.sources[name] = config
        if managed is not None:
            self.vram[name] = vram.manager_of(model)

    @classmethod
    def load_tokenizer(cls, paths: Sequence[Path]) -> Any:
        raise ValueError(f"{cls.__name__} takes no tokenizer_config.")

    @classmethod
    def load_processor(cls, paths: Sequence[Path]) -> Any:
        raise ValueError(f"{cls.__name__} takes no processor_config.")

    def on_loaded(self) -> None:
        """Called once everything is loaded: check that the components fit together (raise,
        naming both, when they do not) and derive what can be derived."""

    # ------------------------------------------------------------------ calls

    @classmethod
    def call_parameters(cls) -> dict[str, inspect.Parameter]:
        """The arguments `__call__` takes, by name (what a config may set)."""
        parameters = dict(inspect.signature(inspect.unwrap(cls.__call__)).parameters)
        parameters.pop("self", None)
        return parameters

    @classmethod
    def check_arguments(cls, arguments: Mapping[str, Any]) -> dict[str, Any]:
        """Check (and normalise) call arguments without any model: every name is one of
        `__call__`'s, missing ones get their defaults. A family adds its value checks; the
        runner calls this before loading weights, `__call__` first thing."""
        parameters = cls.call_parameters()
        unknown = [name for name in arguments if name not in parameters]
        if unknown:
            close = difflib.get_close_matches(unknown[0], list(parameters), n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"it takes {', '.join(parameters)}"
            raise SettingError(f"{cls.__name__} takes no argument {unknown[0]!r}: {hint}")
        checked = {name: p.default for name, p in parameters.items() if p.default is not inspect.Parameter.empty}
        checked.update(arguments)
        missing = [name for name in parameters if name not in checked]
        if missing:
            raise SettingError(f"{cls.__name__} needs the argument(s) {', '.join(missing)}.")
        return checked

    def use_stage(self, name: str | None) -> None:
        """Offload every VRAM-managed model but those of stage `name`, onload those (None: offload
        all). A model's stage is its component's name, or what `stage_of` says for it."""
        stages = {key: self.stage_of.get(key.split(".")[0], key.split(".")[0]) for key in self.vram}
        vram.use_stage(self.vram, name, stages)

    @contextlib.contextmanager
    def timed(self, key: str) -> Iterator[None]:
        """Seconds spent in the block, into `self.timings[key]` (waiting for the GPU to finish)."""
        start = self._now()
        try:
            yield
        finally:
            self.timings[key] = self._now() - start

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def _require(self, *names: str) -> None:
        missing = [n for n in names if getattr(self, n, None) is None]
        if missing:
            raise RuntimeError(
                f"The pipeline has no {', '.join(missing)}: add a ModelConfig for {' and '.join(missing)} to "
                "from_pretrained (tokenizer: tokenizer_config=..., processor: processor_config=...).")

    # ------------------------------------------------------------------ LoRA

    @property
    def lora_module(self) -> nn.Module | None:
        """The model LoRAs apply to by default (`lora_target`)."""
        return getattr(self, self.lora_target)

    def load_lora(self, module: nn.Module, lora: LoraSource, alpha: float = 1.0, hotload: bool | None = None,
                  strict: bool = True) -> LoraHandle:
        """Apply a LoRA to `module` (e.g. `pipe.dit`). `lora`: a ModelConfig, a path, or a state
        dict, in any format of `pipelines.core.lora`. Cold (fused, no speed cost) unless
        `hotload=True` (kept apart, added in the forward); the default (None) is hot for a
        VRAM-managed model. Returns a handle whose alpha can be changed in place:
        `handle.set_alpha(0.5)`. `pipe.clear_lora()` removes it exactly."""
        if module is None or not isinstance(module, nn.Module):
            raise TypeError(f"load_lora: `module` must be a loaded model such as pipe.{self.lora_target}, "
                            f"got {module!r}.")
        if hotload is None:  # hot for VRAM-managed models: their weights have several copies (or stay on disk)
            hotload = vram.manager_of(module) is not None
        return load_lora(module, lora, alpha=alpha, hot=hotload, strict=strict)

    def clear_lora(self) -> None:
        """Remove every LoRA (cold or hot) from every model: the base weights come back bit for bit."""
        models = [getattr(self, name) for name in self.components]
        models += [model for name in self.component_lists for model in getattr(self, name)]
        for model in models:
            if model is not None:
                clear_lora(model)
