"""A tiny random-weight Blockwise ControlNet for the tiny demo model, and a control picture.

    python -m pipelines.demo.controlnet_tiny OUT.safetensors [--inpaint] [--picture EDGES.png]

`build(out_path)` writes a DiffSynth Blockwise ControlNet (`model.safetensors` of
`DiffSynth-Studio/Qwen-Image-Blockwise-ControlNet-Canny`, in its exact key layout) sized for the
tiny demo DiT (`qwen_image_tiny.DIT`: as many blocks, as wide); `build_inpaint(out_path)` the
-Inpaint variant. The weights are seeded and non-zero everywhere (the trained nets' projections
start at zero and end far from it), strong enough that the control changes the picture.
`build_control_picture(out_path)` draws an edge map (white outlines on black, the look of a
canny picture) at the demo's 128x128. Each file is written beside and renamed into place:
complete or absent.
"""
from __future__ import annotations

import argparse
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from safetensors.torch import save_file

from ..core.loader import parameters_on_meta
from ..models.qwen_image_blockwise_controlnet import (
    INPAINT_CHANNELS,
    BlockwiseControlNetParams,
    QwenImageBlockwiseControlNet,
)
from .checkpoints import random_state_dict
from .qwen_image_tiny import DIT

logger = logging.getLogger(__name__)

PICTURE_SIZE = 128  # the tiny demo's output (TinyQwenImagePipeline.output_area, sampler=tiny)


def tiny_params(inpaint: bool = False) -> BlockwiseControlNetParams:
    """The Blockwise ControlNet that fits the tiny demo DiT."""
    return BlockwiseControlNetParams(num_layers=DIT.num_layers, dim=DIT.inner_dim,
                                     additional_in_dim=INPAINT_CHANNELS if inpaint else 0)


def tiny_state_dict(params: BlockwiseControlNetParams, seed: int = 0) -> dict[str, torch.Tensor]:
    """Seeded random weights in the published layout; the RMS norms' weights near one."""
    with parameters_on_meta():
        net = QwenImageBlockwiseControlNet(params)
    state = random_state_dict({k: tuple(v.shape) for k, v in net.state_dict().items()}, seed)
    for key, value in state.items():
        if key.endswith("_rms.weight"):
            state[key] = 1.0 + value  # random_tensor gives 1-D non-norm weights a 0.1 spread
    return state


def build(out_path: str | Path, seed: int = 0, inpaint: bool = False) -> Path:
    """Write the tiny Blockwise ControlNet (the canny/depth layout; `inpaint`: the -Inpaint one)
    to `out_path` (a .safetensors file)."""
    state = tiny_state_dict(tiny_params(inpaint), seed)
    path = _write_atomically(out_path, ".safetensors",
                             lambda staging: save_file(state, staging, metadata={"format": "pt"}))
    logger.info("Wrote the tiny Blockwise ControlNet%s to %s", " (inpaint)" if inpaint else "", path)
    return path


def build_inpaint(out_path: str | Path, seed: int = 0) -> Path:
    """`build` for the -Inpaint variant (one argument, as a `${built_file:...}` builder)."""
    return build(out_path, seed, inpaint=True)


def control_picture(size: int = PICTURE_SIZE) -> Image.Image:
    """An edge map: one-pixel-wide white outlines (a box, a circle, a horizon, a triangle) on black."""
    image = Image.new("RGB", (size, size), (0, 0, 0))
    draw = ImageDraw.Draw(image)
    s = size / 128
    draw.rectangle([int(14 * s), int(20 * s), int(58 * s), int(70 * s)], outline=(255, 255, 255))
    draw.ellipse([int(70 * s), int(14 * s), int(114 * s), int(58 * s)], outline=(255, 255, 255))
    draw.line([(0, int(92 * s)), (size - 1, int(84 * s))], fill=(255, 255, 255))
    draw.polygon([(int(64 * s), int(98 * s)), (int(30 * s), int(122 * s)), (int(100 * s), int(122 * s))],
                 outline=(255, 255, 255))
    return image


def build_control_picture(out_path: str | Path, size: int = PICTURE_SIZE) -> Path:
    """Write `control_picture(size)` as a PNG to `out_path`."""
    picture = control_picture(size)
    path = _write_atomically(out_path, ".png", lambda staging: picture.save(staging, format="PNG"))
    logger.info("Wrote the tiny demo's control picture to %s", path)
    return path


def _write_atomically(out_path: str | Path, suffix: str, write: Callable[[str], None]) -> Path:
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fd, staging = tempfile.mkstemp(prefix=f".{out_path.name}-", suffix=suffix, dir=out_path.parent)
    os.close(fd)
    try:
        write(staging)
        os.chmod(staging, 0o644)  # mkstemp made it private
        os.replace(staging, out_path)
    except BaseException:
        Path(staging).unlink(missing_ok=True)
        raise
    return out_path


def main() -> None:
    parser = argparse.ArgumentParser(description="Write a tiny random Blockwise ControlNet for the tiny demo model.")
    parser.add_argument("out", type=Path, help="the .safetensors file to write")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--inpaint", action="store_true", help="the -Inpaint variant (4 more input channels)")
    parser.add_argument("--picture", type=Path, metavar="EDGES.png", help="also write the demo's control picture")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    build(os.path.abspath(args.out), args.seed, inpaint=args.inpaint)
    if args.picture is not None:
        build_control_picture(os.path.abspath(args.picture))


if __name__ == "__main__":
    main()
