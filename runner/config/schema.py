"""What a run IS, as types: the dataclasses every config group is merged onto (Hydra's
ConfigStore holds them as `schema`), so that a misspelt key or a wrong type fails at composition
with its config path (docs/config.md).
"""
from __future__ import annotations

import dataclasses
import functools
import typing
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Dict, List, Optional

from omegaconf import MISSING, OmegaConf

from pipelines import VRAM_KEYS  # the eight keys VramSpec mirrors


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


# ------------------------------------------------------------------------ controlnet


@dataclass
class ControlInputSpec:
    """One condition for one loaded ControlNet (the fields of `pipelines.ControlNetInput`)."""

    # the ControlNet's position in `controlnet.files` (0 = the first)
    controlnet_id: int = 0
    # the control picture (an edge, depth or pose map), or the picture an inpainting net repaints
    image: Optional[str] = None
    scale: float = 1.0
    # the part of the run it acts in: 1.0 = the first step, 0.0 = the last (start >= end)
    start: float = 1.0
    end: float = 0.0
    # an inpainting net's mask: white = repaint, black = keep (`inpaint_mask`)
    mask: Optional[str] = None
    # an inpainting net's picture to repaint, when `image` is not it
    inpaint_image: Optional[str] = None


@dataclass
class ControlNetSpec(ControlInputSpec):
    """No ControlNet (`none`), or ControlNet checkpoints: each entry of `files` is one more
    model file of the pipeline (with the VRAM preset's keys), a condition's `controlnet_id` is
    its position there. The condition of the first net is given by this node's own keys
    (`controlnet.image`, `controlnet.scale`, ...; `controlnet_id` as above); more conditions,
    for any of the nets, in `inputs` (docs/controlnet.md)."""

    name: str = "none"
    files: List[FileSpec] = field(default_factory=list)
    # modelscope | huggingface, and true = never ask the hub; null: the model's own setting
    download_source: Optional[str] = None
    skip_download: Optional[bool] = None
    inputs: List[ControlInputSpec] = field(default_factory=list)

    def conditions(self) -> list[tuple[str, ControlInputSpec]]:
        """The conditions, in order, as (config path, condition): this node's own when it names
        a picture, then each of `inputs`."""
        own = [("controlnet", self)] if any(v is not None for v in (self.image, self.mask, self.inpaint_image)) else []
        return own + [(f"controlnet.inputs.{i}", item) for i, item in enumerate(self.inputs)]


# map of a condition's keys onto pipelines.ControlNetInput's fields
CONTROL_FIELDS = {"controlnet_id": "controlnet_id", "image": "image", "scale": "scale", "start": "start",
                  "end": "end", "mask": "inpaint_mask", "inpaint_image": "inpaint_image"}
CONTROL_ARGUMENT = "controlnet_inputs"  # the pipeline call argument the conditions become


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
# text for the model, not config: taken as typed, `${...}` in it is not resolved (docs/config.md)
LITERAL_KEYS = ("prompt", "negative_prompt")


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
    """The sweep's X/Y grid and report.html (runner/reporting): each axis a swept key, `none`,
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
    controlnet: ControlNetSpec = field(default_factory=ControlNetSpec)
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
    # and device skips the load (runner/execution/warm). 0 = use a running worker once, then stop it;
    # null = load in this process, as always
    keep_warm: Optional[str] = None


def register_configs() -> None:
    """Put the schema into Hydra's ConfigStore (idempotent). `call` takes any key without a
    `+` (the pipeline's signature, not the schema, says which are valid)."""
    from hydra.core.config_store import ConfigStore

    node = OmegaConf.structured(RunSpec)
    OmegaConf.set_struct(node.call, False)
    ConfigStore.instance().store(name="schema", node=node)


@functools.lru_cache(maxsize=None)
def type_hints(schema: type) -> dict[str, Any]:
    """A dataclass's field types, evaluated once (typing.get_type_hints evaluates every
    annotation again on each call: a sweep checks every job's keys against the schema)."""
    return typing.get_type_hints(schema)


def dataclass_in(tp: Any) -> Optional[type]:
    """The dataclass in `tp`, `Optional[tp]`, or None."""
    if dataclasses.is_dataclass(tp):
        return tp
    for arg in typing.get_args(tp):
        if dataclasses.is_dataclass(arg):
            return arg
    return None


def schema_fields(path: str) -> list[str]:
    """The field names of the schema node at a dotted config path ("" = the root)."""
    node: Any = RunSpec
    entry = False  # the part is a list index or a dict key: the node stays the entry's type
    for part in [p for p in path.split(".") if p]:
        if entry:
            entry = False
            continue
        hints = type_hints(node) if dataclasses.is_dataclass(node) else {}
        if part not in hints:
            return []
        tp = hints[part]
        entry = typing.get_origin(tp) in (dict, list)
        node = dataclass_in(typing.get_args(tp)[-1] if entry else tp) or Any
    return [f.name for f in dataclasses.fields(node)] if dataclasses.is_dataclass(node) else []
