"""ControlNets and mask inpainting for the Qwen-Image 1.x family: what `QwenImagePipeline` does with
`controlnet_inputs` (or DiffSynth's name for them, `blockwise_controlnet_inputs`) and with
`input_image` + `inpaint_mask` (docs/controlnet.md).

A ControlNet class (a model file, listed in CONTROLNET_CLASSES) has `params.inner_dim` (the width
of the DiT's image stream it adds to), `params.condition_channels` (channels per token of the
packed condition it reads) and `inpaint` (it reads a masked picture and its mask rather than a
control picture), and one of two ways to act:

- a whole net (InstantX: `QwenImageControlNet`): `net(latents, condition, timestep, text,
  text_mask, height, width)` returns block samples; it runs once per step with the prompt (both
  CFG branches get the same samples, as in diffusers) and sample k is added after DiT block i for
  k = i // ceil(dit_blocks / samples), scaled; several inputs to one net add their samples.
- blockwise (DiffSynth's Blockwise nets: `QwenImageBlockwiseControlNet`): `condition(latents,
  keep_mask)` once per call on the DiT's stage, from the packed condition latents (and for the
  inpaint variant the packed keep-mask riding after them); then after DiT block `index`
  `block_residual(index, image, condition, scale)` from the current image tokens, in every step
  the input acts and both CFG branches; the residuals of all inputs add up (DiffSynth's
  QwenImageBlockwiseMultiControlNet). The net has as many blocks as the DiT (`check_fits`).

How a kind's pictures become its condition latents is its recipe in CONDITIONS. Wiring another
kind in: its class in CONTROLNET_CLASSES, its recipe in CONDITIONS.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from .core.control import ControlNetInput, acts_at, check_controlnet_inputs
from .core.images import gaussian_blur, image_to_tensor, mask_to_tensor, open_picture, pack_latents
from .core.parse import SettingError, finite
from .models.qwen_image_blockwise_controlnet import (
    QwenImageBlockwiseControlNet,
    inpaint_keep_mask,
    mask_control_picture,
)
from .models.qwen_image_controlnet import QwenImageControlNet

# The ControlNet classes the family loads (recognised from their keys): InstantX's and DiffSynth's Blockwise nets.
CONTROLNET_CLASSES: tuple[type, ...] = (QwenImageControlNet, QwenImageBlockwiseControlNet)


def is_blockwise(net: nn.Module) -> bool:
    return hasattr(net, "block_residual")


def kind_of(net: nn.Module) -> str:
    return "blockwise" if is_blockwise(net) else "instantx"


# ------------------------------------------------------------------ checks


def check_control_arguments(a: dict[str, Any]) -> None:
    """The call's ControlNet and inpainting arguments, in place: `controlnet_inputs` becomes the
    checked list (from either name), `inpaint_mask` a picture, the blur settings numbers."""
    given = [name for name in ("controlnet_inputs", "blockwise_controlnet_inputs") if a[name] is not None]
    if len(given) == 2:
        raise SettingError("controlnet_inputs and blockwise_controlnet_inputs are two names for the same argument: "
                           "give the ControlNet inputs under one of them.")
    a["controlnet_inputs"] = check_controlnet_inputs(a[given[0]], given[0]) if given else []
    a["blockwise_controlnet_inputs"] = None
    size, sigma = a["inpaint_blur_size"], a["inpaint_blur_sigma"]
    if a["inpaint_mask"] is None:
        if size is not None or sigma is not None:
            raise SettingError("inpaint_blur_size/inpaint_blur_sigma soften inpaint_mask: give inpaint_mask too.")
        return
    if a["input_image"] is None:
        raise SettingError("inpaint_mask needs input_image: the picture whose white-masked part is repainted.")
    a["inpaint_mask"] = open_picture(a["inpaint_mask"], "inpaint_mask")
    if (size is None) != (sigma is None):
        raise SettingError("inpaint_blur_size and inpaint_blur_sigma go together (a Gaussian blur of the mask, "
                           "2 * size + 1 latent pixels wide): give both, or neither.")
    if size is not None:
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise SettingError(f"inpaint_blur_size must be an integer >= 0 (latent pixels), got {size!r}.")
        a["inpaint_blur_sigma"] = finite(sigma, "inpaint_blur_sigma")
        if a["inpaint_blur_sigma"] <= 0:
            raise SettingError(f"inpaint_blur_sigma must be > 0, got {sigma!r}.")


def check_controls(controls: Sequence[ControlNetInput], nets: Sequence[nn.Module], name: str) -> None:
    """Each input names a loaded ControlNet and gives what that net reads (before any work)."""
    for i, control in enumerate(controls):
        where = f"{name}[{i}]"
        if control.controlnet_id >= len(nets):
            raise SettingError(
                f"{where}.controlnet_id={control.controlnet_id}, but {len(nets)} ControlNet(s) are loaded (ids are "
                "their positions among the ControlNet files in model_configs, from 0). Add the ControlNet's "
                "ModelConfig to from_pretrained, or fix the id.")
        net = nets[control.controlnet_id]
        if net.inpaint and control.inpaint_mask is None:
            raise SettingError(f"{where}: ControlNet {control.controlnet_id} ({type(net).__name__}) is an inpainting "
                               "net: give inpaint_mask (white = repaint) beside the picture.")
        if not net.inpaint and (control.inpaint_mask is not None or control.inpaint_image is not None):
            raise SettingError(f"{where}: ControlNet {control.controlnet_id} ({type(net).__name__}) takes a control "
                               "picture (`image`) only, no inpaint_image/inpaint_mask: load an inpainting ControlNet "
                               "for those, or inpaint with the call's own input_image + inpaint_mask.")


def check_controlnets_fit(nets: Sequence[nn.Module], dit: nn.Module | None, vae: nn.Module | None,
                          sources: dict[str, Any]) -> None:
    """At load: each ControlNet adds to an image stream of the DiT's width and reads conditions of
    the VAE's latent channels; otherwise it belongs to another model (both files named)."""
    for i, net in enumerate(nets):
        source = sources[f"controlnets.{i}"].describe()
        if dit is not None:
            text = getattr(net.params, "joint_attention_dim", dit.params.joint_attention_dim)  # blockwise: no text
            if (net.params.inner_dim, text) != (dit.params.inner_dim, dit.params.joint_attention_dim):
                raise ValueError(
                    f"The ControlNet {source} is {net.params.inner_dim} wide (text width {text}) but the DiT "
                    f"{sources['dit'].describe()} is {dit.params.inner_dim} (text width "
                    f"{dit.params.joint_attention_dim}): the ControlNet was made for another model. Load a ControlNet "
                    "made for this DiT.")
            if is_blockwise(net):
                try:
                    net.check_fits(dit.params.inner_dim, len(dit.transformer_blocks))
                except ValueError as error:
                    raise ValueError(f"The ControlNet {source} does not fit the DiT {sources['dit'].describe()}: "
                                     f"{error}.") from None
        if vae is not None:
            expected = 4 * (vae.params.z_dim + (1 if net.inpaint else 0))
            if net.params.condition_channels != expected:
                raise ValueError(
                    f"The ControlNet {source} reads {net.params.condition_channels} condition channels per token but "
                    f"the VAE {sources['vae'].describe()} gives {expected} (4 x ({vae.params.z_dim} latent channels"
                    f"{' + the mask' if net.inpaint else ''})): they belong to different models.")


# ------------------------------------------------------------------ conditions


def encode_condition(vae: nn.Module, net: nn.Module, control: ControlNetInput, height: int, width: int,
                     generator: torch.Generator, device: torch.device, tiling: dict) -> torch.Tensor:
    """The packed condition latents (1, Li, condition_channels) of one input, by its net's recipe."""
    recipe = CONDITIONS.get(kind_of(net))
    if recipe is None:
        raise NotImplementedError(f"{type(net).__name__} is a {kind_of(net)} ControlNet, whose conditions "
                                  "pipelines.qwen_image_control.CONDITIONS has no recipe for.")
    return recipe(vae, net, control, height, width, generator, device, tiling)


def instantx_condition(vae: nn.Module, net: nn.Module, control: ControlNetInput, height: int, width: int,
                       generator: torch.Generator, device: torch.device, tiling: dict) -> torch.Tensor:
    """InstantX nets' condition, the pictures resized (Lanczos) to the generation size as diffusers
    does. A control picture: a posterior sample
    drawn from the call's generator (diffusers' ControlNet pipeline). An inpainting net's
    condition (diffusers' ControlNetInpaint pipeline): the picture with the masked pixels black,
    encoded (the posterior mean: diffusers samples it from the unseeded global generator), and
    the kept region (1 - mask, nearest-resized to the latent grid) as one more latent channel."""
    if not net.inpaint:
        pixels = image_to_tensor(control.image, height, width).to(device)
        return pack_latents(vae.encode(pixels, generator=generator, **tiling))
    picture = control.inpaint_image if control.inpaint_image is not None else control.image
    mask = mask_to_tensor(control.inpaint_mask, height, width)
    pixels = image_to_tensor(picture, height, width).masked_fill(mask > 0.5, -1.0)
    latents = vae.encode(pixels.to(device), **tiling)
    keep = 1.0 - F.interpolate(mask, size=latents.shape[-2:]).to(latents.device)
    return pack_latents(torch.cat([latents, keep], dim=1))


def blockwise_condition(vae: nn.Module, net: nn.Module, control: ControlNetInput, height: int, width: int,
                        generator: torch.Generator, device: torch.device, tiling: dict) -> torch.Tensor:
    """DiffSynth's Blockwise nets' condition latents (its QwenImageUnit_BlockwiseControlNet): the
    control picture resized to the generation size and encoded to the posterior mean (no random
    draw: the generator is not used), packed. For the inpaint variant the picture (`inpaint_image`
    when given, else `image`) is first made black where the soft mask (its channels' mean, not
    binarised) is above one half, and the keep-mask (1 - mask, nearest to the latent grid) is
    packed after the latents' channels; the net's `condition` reads both on the DiT's stage."""
    picture = control.inpaint_image if net.inpaint and control.inpaint_image is not None else control.image
    pixels = image_to_tensor(picture, height, width)
    mask = None
    if net.inpaint:
        mask = (image_to_tensor(control.inpaint_mask, height, width) + 1.0) / 2.0  # (1, 3, H, W) in [0, 1]
        pixels = mask_control_picture(pixels, mask)
    latents = vae.encode(pixels.to(device), **tiling)
    if mask is None:
        return pack_latents(latents)
    keep = inpaint_keep_mask(mask, *latents.shape[-2:]).to(latents.device, latents.dtype)
    return pack_latents(torch.cat([latents, keep], dim=1))


def blockwise_input(net: nn.Module, packed: torch.Tensor) -> torch.Tensor:
    """What a Blockwise net's blocks read, from `blockwise_condition`'s packed latents (and keep-mask)."""
    channels = net.params.in_dim
    return net.condition(packed[..., :channels], packed[..., channels:] if net.inpaint else None)


# kind -> recipe (vae, net, input, height, width, generator, device, tiling) -> packed condition latents
CONDITIONS = {"instantx": instantx_condition, "blockwise": blockwise_condition}


class Controls:
    """The ControlNet inputs of one call during the denoising: which act at the current step
    (DiffSynth's start/end over the steps run), the whole nets' block samples of the step, and the
    residual the DiT's `block_residual` hook gets after each block."""

    def __init__(self, nets: Sequence[nn.Module], controls: Sequence[ControlNetInput],
                 conditions: Sequence[torch.Tensor], dit_blocks: int, steps: int,
                 text: tuple[torch.Tensor, torch.Tensor | None]):
        self.items = []
        for control, condition in zip(controls, conditions):
            net = nets[control.controlnet_id]
            if is_blockwise(net):
                condition = blockwise_input(net, condition)
            self.items.append((control, net, condition))
        self.dit_blocks, self.steps, self.text = dit_blocks, steps, text
        self.active: list = []
        self.samples: list[tuple[int, list[torch.Tensor]]] = []

    def set_step(self, step: int) -> None:
        """`denoise`'s step_begin: the inputs acting at this step."""
        self.active = [item for item in self.items if acts_at(item[0], step, self.steps)]
        self.samples = []

    def hook(self, latents: torch.Tensor, timestep: torch.Tensor, height: int, width: int):
        """Once per step, before the DiT's forwards: runs the whole nets; the hook for the DiT (None
        when no input acts at this step)."""
        if not self.active:
            return None
        text, text_mask = self.text
        per_net: dict[int, list[torch.Tensor]] = {}
        for control, net, condition in self.active:
            if is_blockwise(net):
                continue
            samples = [s * control.scale for s in net(latents, condition, timestep, text, text_mask, height, width)]
            previous = per_net.get(control.controlnet_id)
            per_net[control.controlnet_id] = samples if previous is None else [
                a + b for a, b in zip(previous, samples)]
        self.samples = [(math.ceil(self.dit_blocks / len(s)), s) for s in per_net.values()]
        return self.residual

    def residual(self, index: int, image: torch.Tensor) -> torch.Tensor | None:
        total = None
        for interval, samples in self.samples:
            total = samples[index // interval] if total is None else total + samples[index // interval]
        for control, net, condition in self.active:
            if is_blockwise(net):
                out = net.block_residual(index, image, condition, control.scale)
                total = out if total is None else total + out
        return total


# ------------------------------------------------------------------ inpainting without a ControlNet


class InpaintBlend:
    """diffusers' QwenImageInpaintPipeline after each step: the kept region (mask 0) is replaced
    by the encoded picture noised to the next sigma with the call's own noise (the picture itself
    after the last step); the repainted region (mask 1) keeps the model's latents."""

    def __init__(self, mask: Image.Image, image_latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor,
                 h: int, w: int, blur: tuple[int, float] | None):
        latent_mask = F.interpolate(mask_to_tensor(mask, 16 * h, 16 * w), size=(2 * h, 2 * w))
        if blur is not None:
            latent_mask = gaussian_blur(latent_mask, *blur)
        channels = image_latents.shape[-1] // 4
        self.mask = pack_latents(latent_mask.repeat(1, channels, 1, 1)).to(image_latents.device)
        self.image_latents, self.noise, self.sigmas = image_latents, noise, sigmas

    def __call__(self, step: int, latents: torch.Tensor) -> torch.Tensor:
        sigma = self.sigmas[step + 1].item()
        known = sigma * self.noise + (1.0 - sigma) * self.image_latents
        return (1 - self.mask) * known + self.mask * latents
