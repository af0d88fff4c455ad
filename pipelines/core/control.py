"""ControlNet inputs as DiffSynth-Studio takes them (`ControlNetInput`), their checks, and the rule
of the steps at which one acts.

    ControlNetInput(image=edges, scale=0.8)                      # a control picture, the whole schedule
    ControlNetInput(controlnet_id=1, image=photo, inpaint_mask=mask, start=1.0, end=0.3)

`start` and `end` are DiffSynth's: positions in the run of denoising steps, 1.0 at the first step
and 0.0 at the last (`progress = (steps - 1 - step) / (steps - 1)`); an input acts at the steps
with end <= progress <= start (1e-4 slack), so start >= end, and the default (1.0, 0.0) is every
step. diffusers' `control_guidance_start/end` count the other way, as fractions of the steps done:
an input acts at step i when start_d <= i / steps and (i + 1) / steps <= end_d. Roughly
start = 1 - control_guidance_start and end = 1 - control_guidance_end; `from_diffusers_window`
gives the exact values for a number of steps.
"""
from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .images import ImageInput, open_picture
from .parse import SettingError, finite

SLACK = 1e-4  # DiffSynth's tolerance on start/end


@dataclass
class ControlNetInput:
    """One condition for one loaded ControlNet (DiffSynth-Studio's fields).

    controlnet_id: the ControlNet's position among the ControlNets given to from_pretrained (0 = the first)
    scale:         multiplies what the ControlNet adds to the DiT
    start, end:    the part of the run it acts in: 1.0 = the first step, 0.0 = the last (start >= end)
    image:         the control picture (edges, depth, pose...), or the picture an inpainting net repaints
    inpaint_image: the picture an inpainting net repaints, when `image` is not it
    inpaint_mask:  for an inpainting net: white = repaint, black = keep
    processor_id:  DiffSynth's preprocessor name (e.g. "canny"); none is built in: give the processed picture
    """

    controlnet_id: int = 0
    scale: float = 1.0
    start: float = 1.0
    end: float = 0.0
    image: ImageInput | None = None
    inpaint_image: ImageInput | None = None
    inpaint_mask: ImageInput | None = None
    processor_id: str | None = None


def progress(step: int, steps: int) -> float:
    """DiffSynth's position of `step` (0-based) in a run of `steps`: 1.0 at the first, 0.0 at the last."""
    return (steps - 1 - step) / max(steps - 1, 1)


def acts_at(control: ControlNetInput, step: int, steps: int) -> bool:
    """Whether `control` acts at `step` of a run of `steps` denoising steps (DiffSynth's rule)."""
    where = progress(step, steps)
    return control.end - SLACK <= where <= control.start + SLACK


def diffusers_steps(control_guidance_start: float, control_guidance_end: float, steps: int) -> list[int]:
    """The steps at which diffusers' ControlNet pipelines apply a ControlNet (their `controlnet_keep`)."""
    return [i for i in range(steps)
            if not (i / steps < control_guidance_start or (i + 1) / steps > control_guidance_end)]


def from_diffusers_window(control_guidance_start: float, control_guidance_end: float,
                          steps: int) -> tuple[float, float]:
    """(start, end) in DiffSynth's convention that act at exactly the steps where diffusers'
    `control_guidance_start/end` do in a run of `steps` steps."""
    kept = diffusers_steps(control_guidance_start, control_guidance_end, steps)
    if not kept:
        raise ValueError(f"control_guidance_start={control_guidance_start}, control_guidance_end="
                         f"{control_guidance_end} leave no step of {steps}: use scale=0 for a ControlNet that "
                         "never acts.")
    return progress(kept[0], steps), progress(kept[-1], steps)


def check_controlnet_inputs(value: Any, what: str = "controlnet_inputs") -> list[ControlNetInput]:
    """The inputs as given (a list of ControlNetInput or of mappings with its fields; one alone is
    taken as a list of one), checked, with their pictures read: new ControlNetInput objects."""
    if value is None:
        return []
    if isinstance(value, (ControlNetInput, Mapping)):
        value = [value]
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise SettingError(f"{what} must be a list of pipelines.ControlNetInput, got {type(value).__name__}.")
    return [check_controlnet_input(item, f"{what}[{i}]") for i, item in enumerate(value)]


def check_controlnet_input(item: Any, where: str) -> ControlNetInput:
    item = _as_input(item, where)
    cid = item.controlnet_id
    if isinstance(cid, bool) or not isinstance(cid, int) or cid < 0:
        raise SettingError(f"{where}.controlnet_id must be an integer >= 0 (the ControlNet's position among the "
                           f"ControlNets given to from_pretrained), got {cid!r}.")
    scale = finite(item.scale, f"{where}.scale")
    start, end = finite(item.start, f"{where}.start"), finite(item.end, f"{where}.end")
    if not 0.0 <= end <= start <= 1.0:
        raise SettingError(
            f"{where}: start={start}, end={end}: DiffSynth's convention counts from 1.0 (the first step) down to 0.0 "
            "(the last), so 0 <= end <= start <= 1 (default start=1.0, end=0.0: every step). From diffusers' "
            "control_guidance_start/end: start = about 1 - control_guidance_start, end = about 1 - "
            "control_guidance_end (pipelines.core.control.from_diffusers_window gives the exact values).")
    if item.processor_id is not None:
        raise SettingError(f"{where}.processor_id={item.processor_id!r}: no preprocessor is built in. Give the "
                           "processed picture (an edge map, a depth map, a pose) as `image`, and processor_id=None.")
    if item.image is None and item.inpaint_image is None:
        raise SettingError(f"{where} has no picture: give `image` (the control picture, or the picture to repaint).")
    if item.inpaint_image is not None and item.inpaint_mask is None:
        raise SettingError(f"{where}.inpaint_image is the picture an inpainting ControlNet repaints under "
                           "`inpaint_mask`: give inpaint_mask too.")
    pictures = {name: open_picture(getattr(item, name), f"{where}.{name}")
                for name in ("image", "inpaint_image", "inpaint_mask") if getattr(item, name) is not None}
    return dataclasses.replace(item, scale=scale, start=start, end=end, **pictures)


def _as_input(item: Any, where: str) -> ControlNetInput:
    if isinstance(item, ControlNetInput):
        return item
    if not isinstance(item, Mapping):
        raise SettingError(f"{where} must be a pipelines.ControlNetInput, got {type(item).__name__} {item!r}.")
    fields = [f.name for f in dataclasses.fields(ControlNetInput)]
    unknown = [k for k in item if k not in fields]
    if unknown:
        close = difflib.get_close_matches(str(unknown[0]), fields, n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"its fields are {', '.join(fields)}"
        raise SettingError(f"{where} has no field {unknown[0]!r}: {hint}")
    return ControlNetInput(**item)
