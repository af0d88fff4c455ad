"""QwenImagePipeline: the Qwen-Image family: text-to-image, image-to-image, and editing
(Qwen-Image-Edit, -2509, -2511) with pictures, as DiffSynth-Studio's pipeline of the same name.

    pipe = QwenImagePipeline.from_pretrained(torch_dtype=torch.bfloat16, device="cuda",
                                             model_configs=[...], tokenizer_config=...)
    image = pipe("a red fox in the snow", seed=0, num_inference_steps=40)
    # with processor_config=ModelConfig(model_id="Qwen/Qwen-Image-Edit", origin_file_pattern="processor/"):
    image = pipe("make it winter", edit_image=[picture], seed=1)

    # ControlNets: a ControlNet's files in model_configs, then
    image = pipe("a house", controlnet_inputs=[ControlNetInput(image=edges, scale=0.8)], seed=2)
    # inpainting: the white part of the mask repainted
    image = pipe("a cat", input_image=photo, inpaint_mask=mask, denoising_strength=0.9, seed=3)

Editing follows diffusers' QwenImageEditPlusPipeline when `edit_image` is a list (2509, 2511:
"Picture N:" prompts, pictures to the vision-language encoder at ~384x384 and to the VAE at
~1024x1024) and its QwenImageEditPipeline for a single picture (the original Edit). ControlNets
and inpainting: `pipelines.qwen_image_control` and docs/controlnet.md.

The family declares its components, its LoRA target and its call; loading, stage offload,
LoRA and timings are `pipelines.core.pipeline`'s, the denoising loop `core.sampling.denoise`.
"""
from __future__ import annotations

import logging
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from .core.control import ControlNetInput
from .core.files import check_folder_files
from .core.images import ImageInput, image_to_tensor, open_picture, pack_latents, tensor_to_image, unpack_latents
from .core.model_config import ModelConfig
from .core.parse import SettingError, check_seed, finite, parse_device
from .core.pipeline import Pipeline, generation
from .core.sampling import FlowMatchScheduler, denoise
from .models.qwen2_5_text import QwenImageTextEncoder
from .models.qwen2_5_vl_encoder import QwenImageVLEncoder
from .models.qwen3_vl_encoder import QwenImage21TextEncoder
from .models.qwen_image_21_dit import QwenImage21DiT
from .models.qwen_image_21_vae import QwenImage21VAE
from .models.qwen_image_dit import QwenImageDiT
from .models.qwen_image_vae import QwenImageVAE
from .models.qwen_tokenizer import QwenTokenizer
from .qwen_image_control import (
    CONTROLNET_CLASSES,
    Controls,
    InpaintBlend,
    check_control_arguments,
    check_controlnets_fit,
    check_controls,
    encode_condition,
)

__all__ = ["QwenImagePipeline", "ModelConfig", "FlowMatchScheduler", "ControlNetInput"]

logger = logging.getLogger(__name__)

PROMPT_TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, "
    "text, spatial relationships of the objects and background:<|im_end|>\n"
    "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
)
MAX_PROMPT_TOKENS = 1024  # tokenizer limit after the template prefix
MAX_TEXT_EMBEDDINGS = 512  # the DiT sees at most this many prompt tokens
SIZE_MULTIPLE = 16  # 8x VAE compression times the 2x2 latent packing
MAX_PIXELS = 4096 * 4096  # beyond, latents and attention outgrow any device; `max_pixels` raises it
MAX_STEPS = 10_000  # the schedule is computed in the checks; beyond, a typo (1e9 steps) would fill the memory
DEFAULT_SIZE = 1328

EDIT_SYSTEM = (
    "<|im_start|>system\nDescribe the key features of the input image (color, shape, size, texture, objects, "
    "background), then explain how the user's text instruction should alter or modify the image. Generate a new "
    "image that meets the user's requirements while maintaining consistency with the original input where "
    "appropriate.<|im_end|>\n<|im_start|>user\n"
)
EDIT_TEMPLATE = EDIT_SYSTEM + "{}<|im_end|>\n<|im_start|>assistant\n"  # 2509, 2511
SINGLE_EDIT_TEMPLATE = EDIT_SYSTEM + "<|vision_start|><|image_pad|><|vision_end|>{}<|im_end|>\n<|im_start|>assistant\n"
PICTURE_PROMPT = "Picture {}: <|vision_start|><|image_pad|><|vision_end|>"
EDIT_PREFIX_TOKENS = 64  # the edit template's system part, dropped from the embeddings
# diffusers' QwenImageEditPlusPipeline's areas (CONDITION_IMAGE_SIZE, VAE_IMAGE_SIZE); the class
# attributes of the same name (lower case) are what a pipeline uses, so a family variant may change them
CONDITION_AREA = 384 * 384  # pictures as the vision-language encoder sees them (2509, 2511)
REFERENCE_AREA = 1024 * 1024  # pictures as the VAE encodes them
OUTPUT_AREA = 1024 * 1024  # the default output size of an edit, with the last picture's aspect
FLAGS = ("edit_image_auto_resize", "tiled", "progress_bar", "cfg_norm_rescale", "cfg_batch")  # call arguments: bools


@dataclass
class EditInput:
    """The pictures of an edit: `multi` (a list was given) selects 2509/2511's semantics."""

    pictures: list[Image.Image]
    multi: bool


@dataclass
class Start:
    """The latents the denoising starts from, the sigmas it runs, and for image-to-image the
    encoded picture and the noise (inpainting blends with them)."""

    latents: torch.Tensor
    sigmas: torch.Tensor
    noise: torch.Tensor
    image_latents: torch.Tensor | None = None


class QwenImagePipeline(Pipeline):
    components = {"dit": QwenImageDiT, "text_encoder": QwenImageTextEncoder, "vae": QwenImageVAE}
    component_lists = {"controlnets": CONTROLNET_CLASSES}  # any number, `controlnet_id` = position
    stage_of = {"controlnets": "dit"}
    lora_target = "dit"
    image_arguments = ("input_image", "edit_image", "inpaint_mask")
    family = "Qwen-Image 1.x"
    foreign_components = {QwenImage21DiT: ("transformer", "Qwen-Image 2.1", "QwenImage21Pipeline"),
                          QwenImage21TextEncoder: ("text encoder", "Qwen-Image 2.1", "QwenImage21Pipeline"),
                          QwenImage21VAE: ("VAE", "Qwen-Image 2.1", "QwenImage21Pipeline")}
    # the pictures' areas in pixels (an edit); a variant for other models may set its own
    condition_area: int = CONDITION_AREA
    reference_area: int = REFERENCE_AREA
    output_area: int = OUTPUT_AREA

    def __init__(self, torch_dtype: torch.dtype, device: str | torch.device):
        super().__init__(torch_dtype, device)
        self.scheduler = FlowMatchScheduler()
        self._template_prefix_tokens: int | None = None

    @classmethod
    def component_classes(cls, with_processor: bool) -> dict[str, type]:
        """With a processor (edit models) the text encoder is loaded with its vision tower."""
        classes = dict(cls.components)
        if with_processor:
            classes["text_encoder"] = QwenImageVLEncoder
        return classes

    @classmethod
    def load_tokenizer(cls, paths: Sequence[Path]):
        return load_tokenizer(paths)

    @classmethod
    def load_processor(cls, paths: Sequence[Path]):
        from .models.qwen_image_vision import QwenVLProcessor

        folder = paths[0] if paths[0].is_dir() else paths[0].parent
        check_folder_files(folder, "processor_config")
        return QwenVLProcessor.from_folder(folder)

    def on_loaded(self) -> None:
        """The DiT reads the text encoder's hidden states and the VAE's packed latents; an edit
        model's processor carries the tokenizer when no tokenizer_config is given."""
        if self.tokenizer is None and self.processor is not None:
            self.tokenizer = self.processor.tokenizer
        dit = self.dit.params if self.dit is not None else None
        if dit is not None and self.text_encoder is not None:
            hidden = self.text_encoder.params.hidden_size
            if hidden != dit.joint_attention_dim:
                raise ValueError(
                    f"The text encoder's hidden size is {hidden} but the DiT reads text of width "
                    f"{dit.joint_attention_dim} (joint_attention_dim): they belong to different models. Load the "
                    "text encoder of the same model as the DiT.")
        if dit is not None and self.vae is not None:
            z = self.vae.params.z_dim
            if dit.in_channels != 4 * z or dit.out_channels != z:
                raise ValueError(
                    f"The VAE has {z} latent channels but the DiT takes {dit.in_channels} packed channels (4 x "
                    f"{dit.in_channels // 4}) and predicts {dit.out_channels}: they belong to different models. Load "
                    "the VAE of the same model as the DiT.")
        check_controlnets_fit(self.controlnets, self.dit, self.vae, self.sources)

    # ------------------------------------------------------------------ generation

    @generation
    def __call__(
        self,
        prompt: str,
        negative_prompt: str = "",
        cfg_scale: float = 4.0,
        height: int | None = None,
        width: int | None = None,
        seed: int | None = None,
        rand_device: str = "cpu",
        num_inference_steps: int = 30,
        exponential_shift_mu: float | None = None,
        input_image: ImageInput | None = None,
        denoising_strength: float = 1.0,
        edit_image: ImageInput | Sequence[ImageInput] | None = None,
        edit_image_auto_resize: bool = True,
        zero_cond_t: bool | None = None,
        tiled: bool = False,
        tile_size: int = 128,
        tile_stride: int = 64,
        progress_bar: bool = True,
        scheduler: FlowMatchScheduler | None = None,
        cfg_norm_rescale: bool = True,
        cfg_batch: bool = False,
        max_pixels: int = MAX_PIXELS,
        controlnet_inputs: Sequence[ControlNetInput] | None = None,
        blockwise_controlnet_inputs: Sequence[ControlNetInput] | None = None,
        inpaint_mask: ImageInput | None = None,
        inpaint_blur_size: int | None = None,
        inpaint_blur_sigma: float | None = None,
    ) -> Image.Image:
        """Generate one image. `cfg_scale` != 1 runs true CFG against `negative_prompt`;
        `cfg_norm_rescale` rescales the guided prediction to the conditional one's norm per
        token, as the reference pipeline does. `input_image` (a picture or its path) +
        `denoising_strength` < 1 is image-to-image: the first (1 - strength) of the steps are
        skipped. `edit_image` (pictures or paths; needs a processor_config) edits: a list is
        2509/2511's multi-picture edit, a single picture the original Edit's; the pictures are
        resized to ~1024x1024 for the VAE unless `edit_image_auto_resize=False`. `zero_cond_t`
        (2511) modulates the pictures' tokens as at t = 0; None reads the DiT's config.json.
        `height`/`width` default to 1328, or with pictures to the last picture's aspect at
        ~1024x1024; they round to multiples of 16, and above `max_pixels` pixels the call is
        refused before any work. `cfg_batch` runs the two CFG branches as one batch-2 forward
        (prompts padded to one length with a mask): the weights are read once per step, which
        pays when they stream (VRAM management).
        `controlnet_inputs` (DiffSynth's name `blockwise_controlnet_inputs` works too): a list of
        ControlNetInput for the loaded ControlNets (docs/controlnet.md). `inpaint_mask` with
        `input_image` repaints the mask's white part and keeps the rest (diffusers'
        QwenImageInpaintPipeline); `inpaint_blur_size`/`inpaint_blur_sigma` soften the mask's edge."""
        a = self.check_arguments({k: v for k, v in locals().items() if k != "self"})
        edit: EditInput | None = a["edit_image"]
        self._require("dit", "text_encoder", "vae", "tokenizer", *(("processor",) if edit else ()))
        check_controls(a["controlnet_inputs"], self.controlnets,
                       "controlnet_inputs" if blockwise_controlnet_inputs is None else "blockwise_controlnet_inputs")
        tiling = dict(tiled=a["tiled"], tile_size=a["tile_size"], tile_stride=a["tile_stride"])
        with self.timed("encode_s"):
            texts = [self.encode_prompt(a["prompt"], edit)]
            if a["cfg_scale"] != 1.0:
                texts.append(self.encode_prompt(a["negative_prompt"], edit))
        with self.timed("denoise_s"):
            latents, steps = self._denoise(a, texts, edit, tiling)
        self.timings["denoise_steps"] = steps  # fewer than asked in image-to-image
        with self.timed("decode_s"):
            self.use_stage("vae")
            image = self.vae.decode(unpack_latents(latents, a["height"] // SIZE_MULTIPLE,
                                                   a["width"] // SIZE_MULTIPLE), **tiling)
        return tensor_to_image(image[0])

    def _denoise(self, a: dict[str, Any], texts: list[tuple[torch.Tensor, torch.Tensor | None]],
                 edit: EditInput | None, tiling: dict) -> tuple[torch.Tensor, int]:
        """Pictures encoded (edit references, ControlNet conditions, the input image: the
        generator draws in that order, then the noise), then the denoising loop; returns the
        final latents and the number of steps run."""
        h, w = a["height"] // SIZE_MULTIPLE, a["width"] // SIZE_MULTIPLE
        sigmas = (a["scheduler"] or self.scheduler).sigmas(a["num_inference_steps"], h * w, a["exponential_shift_mu"])
        generator = torch.Generator(a["rand_device"]).manual_seed(a["seed"])
        references = self._encode_references(edit, a["edit_image_auto_resize"], tiling)
        controls = a["controlnet_inputs"]
        if controls:
            self.use_stage("vae")
        conditions = [encode_condition(self.vae, self.controlnets[c.controlnet_id], c, a["height"], a["width"],
                                       generator, self.device, tiling) for c in controls]
        start = self._initial_latents(generator, a["rand_device"], h, w, sigmas, a["input_image"],
                                      a["denoising_strength"], tiling)
        blend = None
        if a["inpaint_mask"] is not None:
            blur = None if a["inpaint_blur_size"] is None else (a["inpaint_blur_size"], a["inpaint_blur_sigma"])
            blend = InpaintBlend(a["inpaint_mask"], start.image_latents, start.noise, start.sigmas, h, w, blur)
        self.use_stage("dit")
        control = Controls(self.controlnets, controls, conditions, len(self.dit.transformer_blocks),
                           len(start.sigmas) - 1, texts[0]) if controls else None
        velocity = self._velocity(texts, h, w, a["cfg_batch"], references, a["zero_cond_t"], control)
        latents = denoise(velocity, start.latents, start.sigmas, self.device, a["cfg_scale"], a["cfg_norm_rescale"],
                          a["progress_bar"], step_begin=control.set_step if control else None, step_end=blend)
        return latents, len(start.sigmas) - 1

    @classmethod
    def check_arguments(cls, arguments: Mapping[str, Any]) -> dict[str, Any]:
        """Every call argument checked before any work (the runner calls this before loading):
        finite numbers, flags that are bools, a random-number device this machine has, sizes
        within `max_pixels`, a seed in range (None: a random one, logged), a schedule that can
        be computed (the shift `exponential_shift_mu` included), readable pictures (read here;
        `edit_image` becomes an EditInput)."""
        a = super().check_arguments(arguments)
        if not isinstance(a["prompt"], str) or not isinstance(a["negative_prompt"], str):
            raise SettingError("prompt and negative_prompt must be strings.")
        for key in ("cfg_scale", "denoising_strength"):
            a[key] = finite(a[key], key)
        if not 0.0 < a["denoising_strength"] <= 1.0:
            raise SettingError(f"denoising_strength must be in (0, 1], got {a['denoising_strength']}.")
        check_flags(a)
        steps = a["num_inference_steps"]
        if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= MAX_STEPS:
            raise SettingError(f"num_inference_steps must be an integer from 1 to {MAX_STEPS}, got {steps!r}.")
        check_tiling(a["tile_size"], a["tile_stride"])
        a["rand_device"] = parse_device(a["rand_device"], "rand_device")
        a["seed"] = random_seed() if a["seed"] is None else check_seed(a["seed"])
        if a["input_image"] is not None:
            a["input_image"] = open_picture(a["input_image"], "input_image")
        a["edit_image"] = edit_input(a["edit_image"])
        check_control_arguments(a)
        a["height"], a["width"] = check_size(*default_size(a["height"], a["width"], a["edit_image"],
                                                           cls.output_area), a["max_pixels"])
        check_schedule(a)
        return a

    def _encode_references(self, edit: EditInput | None, auto_resize: bool,
                           tiling: dict) -> tuple[torch.Tensor, tuple[tuple[int, int], ...]] | None:
        """The pictures as packed VAE latents (posterior means), concatenated, and their token grids."""
        if edit is None:
            return None
        self.use_stage("vae")
        latents, grids = [], []
        for picture in edit.pictures:
            width, height = reference_size(picture, auto_resize, self.reference_area)
            encoded = self.vae.encode(image_to_tensor(picture, height, width).to(self.device), **tiling)
            latents.append(pack_latents(encoded))
            grids.append((height // SIZE_MULTIPLE, width // SIZE_MULTIPLE))
        return torch.cat(latents, dim=1), tuple(grids)

    def _initial_latents(self, generator: torch.Generator, rand_device: str, h: int, w: int, sigmas: torch.Tensor,
                         source: Image.Image | None, strength: float, tiling: dict) -> Start:
        """Noise (and for image-to-image the encoded picture mixed in at the first kept step)."""
        if source is not None:
            self.use_stage("vae")
            # the posterior sample draws from the generator before the noise, as in diffusers
            image_latents = pack_latents(self.vae.encode(
                image_to_tensor(source, h * SIZE_MULTIPLE, w * SIZE_MULTIPLE).to(self.device),
                generator=generator, **tiling))
        noise = torch.randn((1, 16, 2 * h, 2 * w), generator=generator, device=rand_device, dtype=torch.float32)
        noise = pack_latents(noise.to(self.device))
        if source is None:
            return Start(noise, sigmas, noise)
        steps = len(sigmas) - 1
        sigmas = sigmas[int(max(steps - steps * strength, 0)):]
        return Start(sigmas[0] * noise + (1.0 - sigmas[0]) * image_latents, sigmas, noise, image_latents)

    def _velocity(self, texts: list[tuple[torch.Tensor, torch.Tensor | None]], h: int, w: int, cfg_batch: bool,
                  references: tuple[torch.Tensor, tuple[tuple[int, int], ...]] | None, zero_cond_t: bool | None,
                  control: Controls | None = None):
        """The DiT as `denoise` calls it: (latents, timestep) -> (conditional, unconditional or
        None); the pictures' latents ride after the generated ones. The ControlNets run once per
        step (with the prompt) and their residuals go to every branch, as in diffusers."""
        ref_latents, grids = references if references is not None else (None, ())

        def dit(latents: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor, mask: torch.Tensor | None,
                hook) -> torch.Tensor:
            if ref_latents is not None:
                latents = torch.cat([latents, ref_latents.expand(latents.shape[0], -1, -1)], dim=1)
            return self.dit(latents, timestep, text, mask, h, w, grids, zero_cond_t, block_residual=hook)

        def hook_for(latents: torch.Tensor, timestep: torch.Tensor):
            return None if control is None else control.hook(latents, timestep, h, w)

        if len(texts) == 2 and cfg_batch:
            both_texts, both_masks = stack_texts(texts)
            return lambda latents, timestep: dit(torch.cat([latents, latents]), timestep, both_texts, both_masks,
                                                 hook_for(latents, timestep)).chunk(2)

        def separate(latents: torch.Tensor, timestep: torch.Tensor):
            hook = hook_for(latents, timestep)
            outputs = [dit(latents, timestep, text, mask, hook) for text, mask in texts]
            return outputs[0], outputs[1] if len(outputs) == 2 else None
        return separate

    def encode_prompt(self, prompt: str, edit: EditInput | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Prompt (with the edit's pictures) -> (1, L, hidden) embeddings of the prompt tokens,
        the template prefix dropped, and their mask (None: no padding at batch 1)."""
        if edit is not None:
            return self._encode_edit_prompt(prompt, edit), None
        self._require("text_encoder", "tokenizer")
        self.use_stage("text_encoder")
        drop = self.template_prefix_tokens
        ids = self.tokenizer(PROMPT_TEMPLATE.format(prompt), return_tensors="pt").input_ids
        if ids.shape[1] > MAX_PROMPT_TOKENS + drop:
            logger.warning("The prompt has %d tokens; the tokenizer keeps the first %d.",
                           ids.shape[1] - drop, MAX_PROMPT_TOKENS)
            ids = ids[:, : MAX_PROMPT_TOKENS + drop]
        ids = ids.to(self.device)
        hidden = self.text_encoder(ids, torch.ones_like(ids))[:, drop:]
        if hidden.shape[1] > MAX_TEXT_EMBEDDINGS:
            logger.warning("The prompt has %d tokens after the template; Qwen-Image uses the first %d, the rest is "
                           "ignored.", hidden.shape[1], MAX_TEXT_EMBEDDINGS)
            hidden = hidden[:, :MAX_TEXT_EMBEDDINGS]
        return hidden, None

    def _encode_edit_prompt(self, prompt: str, edit: EditInput) -> torch.Tensor:
        """The edit template with the pictures: each as the vision-language encoder sees it
        (2509/2511: ~384x384 area, "Picture N:" before it; the original Edit: the ~1024x1024
        picture the VAE encodes), the system part dropped."""
        self._require("text_encoder", "processor")
        if not isinstance(self.text_encoder, QwenImageVLEncoder):
            raise RuntimeError("Editing needs the text encoder's vision tower, which is loaded when a processor is "
                               "given: pass processor_config=ModelConfig(..., origin_file_pattern='processor/') to "
                               "from_pretrained.")
        self.use_stage("text_encoder")
        if edit.multi:
            numbered = "".join(PICTURE_PROMPT.format(i + 1) for i in range(len(edit.pictures)))
            text = EDIT_TEMPLATE.format(numbered + prompt)
            seen = [resized(p, *fit_area(p, self.condition_area)) for p in edit.pictures]
        else:
            text = SINGLE_EDIT_TEMPLATE.format(prompt)
            seen = [resized(p, *fit_area(p, self.reference_area)) for p in edit.pictures]
        inputs = self.processor([text], images=seen).to(self.device)
        hidden = self.text_encoder(inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"],
                                   inputs["image_grid_thw"])
        return hidden[:, EDIT_PREFIX_TOKENS:]

    @property
    def template_prefix_tokens(self) -> int:
        """How many tokens the template puts before the prompt (34 with the real vocabulary)."""
        if self._template_prefix_tokens is None:
            prefix = PROMPT_TEMPLATE.split("{}")[0]
            self._template_prefix_tokens = len(self.tokenizer(prefix).input_ids)
        return self._template_prefix_tokens


def load_tokenizer(paths: Sequence[Path]) -> QwenTokenizer:
    """The Qwen2.5-VL tokenizer of a `tokenizer/` folder, read with the `tokenizers` library (no
    transformers import); its errors name the folder or file, the fault and the fix."""
    folder = paths[0] if paths[0].is_dir() else paths[0].parent
    check_folder_files(folder, "tokenizer_config")
    return QwenTokenizer.from_folder(folder)


def stack_texts(texts: Sequence[tuple[torch.Tensor, torch.Tensor | None]]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(1, L_i, D) prompt embeddings with their masks -> (N, max L_i, D) zero-padded and the
    (N, max L_i) mask of real tokens (None when nothing is padded)."""
    length = max(t.shape[1] for t, _ in texts)
    rows, masks = [], []
    for t, m in texts:
        pad = length - t.shape[1]
        rows.append(torch.nn.functional.pad(t, (0, 0, 0, pad)))
        m = torch.ones(t.shape[:2], dtype=torch.bool, device=t.device) if m is None else m.bool()
        masks.append(torch.nn.functional.pad(m, (0, pad), value=False))
    mask = torch.cat(masks)
    return torch.cat(rows), None if bool(mask.all()) else mask


def random_seed() -> int:
    seed = random.randrange(2**31)
    logger.info("No seed given: using seed %d", seed)
    return seed


def round_size(size: int) -> int:
    rounded = max(SIZE_MULTIPLE, int(round(size / SIZE_MULTIPLE)) * SIZE_MULTIPLE)
    if rounded != size:
        logger.warning("Image size %d is not a multiple of %d: using %d.", size, SIZE_MULTIPLE, rounded)
    return rounded


def check_size(height: int, width: int, max_pixels: int = MAX_PIXELS) -> tuple[int, int]:
    """Positive integer sizes, rounded to multiples of 16, at most `max_pixels` pixels."""
    for key, value in (("height", height), ("width", width), ("max_pixels", max_pixels)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise SettingError(f"{key} must be a positive integer (pixels), got {value!r}.")
    height, width = round_size(height), round_size(width)
    if height * width > max_pixels:
        raise SettingError(
            f"height={height}, width={width}: {height * width:,} pixels, above max_pixels={max_pixels:,} (4096x4096 by "
            "default): "
            "its latents and attention would not fit in memory. Give a smaller size, or raise max_pixels if you "
            "have the memory.")
    return height, width


def check_flags(a: dict[str, Any]) -> None:
    """The on/off arguments are bools (a string such as "false" would count as on)."""
    for key in FLAGS:
        if not isinstance(a[key], bool):
            raise SettingError(f"{key} must be true or false, got {a[key]!r}.")
    if a["zero_cond_t"] is not None and not isinstance(a["zero_cond_t"], bool):
        raise SettingError(f"zero_cond_t must be true, false or None (the transformer's config.json decides), got "
                           f"{a['zero_cond_t']!r}.")


def check_schedule(a: dict[str, Any]) -> None:
    """The sigma schedule of the call, computed as the call will (it needs no model): a shift
    `exponential_shift_mu` so large or small that exp() overflows, or that leaves NaN or steps
    that do not move, is refused here rather than after loading."""
    scheduler = a["scheduler"]
    if scheduler is not None and not callable(getattr(scheduler, "sigmas", None)):
        raise SettingError(f"scheduler must be a FlowMatchScheduler (or None for the default), got "
                           f"{type(scheduler).__name__}.")
    mu = a["exponential_shift_mu"]
    if mu is not None:
        a["exponential_shift_mu"] = mu = finite(mu, "exponential_shift_mu")
    tokens = (a["height"] // SIZE_MULTIPLE) * (a["width"] // SIZE_MULTIPLE)
    try:
        sigmas = (scheduler or FlowMatchScheduler()).sigmas(a["num_inference_steps"], tokens, mu)
    except OverflowError:
        sigmas = None
    if sigmas is None or not bool(torch.isfinite(sigmas).all()) or not bool((sigmas[1:] < sigmas[:-1]).all()):
        what = f"exponential_shift_mu={mu!r}" if mu is not None else "the scheduler's settings"
        raise SettingError(
            f"{what} gives no usable sigma schedule for {a['num_inference_steps']} step(s) (exp(mu) overflows, or "
            "the sigmas are not finite or do not decrease at every step). Qwen-Image's own shift is mu of about "
            "0.5 to 0.9 (Lightning: ln 3 = 1.1): give a value of that order, or leave it null for the default.")


def check_tiling(tile_size: int, tile_stride: int) -> None:
    for key, value in (("tile_size", tile_size), ("tile_stride", tile_stride)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise SettingError(f"{key} must be a positive integer (latent pixels), got {value!r}.")
    if tile_stride > tile_size:
        raise SettingError(f"tile_stride ({tile_stride}) must not exceed tile_size ({tile_size}): tiles would leave "
                           "gaps. Use e.g. tile_size=128 tile_stride=64.")


def edit_input(value: Any) -> EditInput | None:
    """`edit_image` as given (a picture, a path, or a list of them) -> EditInput."""
    if value is None:
        return None
    if isinstance(value, EditInput):
        return value
    if isinstance(value, (Image.Image, str, Path)):
        return EditInput([open_picture(value, "edit_image", alpha=True)], multi=False)
    if not isinstance(value, Sequence) or not value:
        raise SettingError(f"edit_image must be a picture, a path, or a non-empty list of them, got {value!r}.")
    # RGBA kept: the vision-language path composites onto white after resizing, as transformers does
    return EditInput([open_picture(v, f"edit_image[{i}]", alpha=True) for i, v in enumerate(value)], multi=True)


def fit_area(picture: Image.Image, area: int) -> tuple[int, int]:
    """(width, height) with the picture's aspect ratio and about `area` pixels, multiples of 32
    (diffusers' calculate_dimensions)."""
    ratio = picture.width / picture.height
    width = math.sqrt(area * ratio)
    return round(width / 32) * 32, round(width / ratio / 32) * 32


def resized(picture: Image.Image, width: int, height: int) -> Image.Image:
    return picture if picture.size == (width, height) else picture.resize((width, height), Image.LANCZOS)


def reference_size(picture: Image.Image, auto_resize: bool, area: int = REFERENCE_AREA) -> tuple[int, int]:
    """(width, height) a picture is VAE-encoded at: `area` (~1024x1024) with its aspect, or with
    `auto_resize=False` its own size rounded down to multiples of 16."""
    if auto_resize:
        return fit_area(picture, area)
    size = (max(SIZE_MULTIPLE, picture.width // SIZE_MULTIPLE * SIZE_MULTIPLE),
            max(SIZE_MULTIPLE, picture.height // SIZE_MULTIPLE * SIZE_MULTIPLE))
    if size != picture.size:
        logger.warning("edit_image of %dx%d is not a multiple of %d: encoded at %dx%d.", *picture.size, SIZE_MULTIPLE,
                       *size)
    return size


def default_size(height: int | None, width: int | None, edit: EditInput | None,
                 area: int = OUTPUT_AREA) -> tuple[int, int]:
    """1328x1328, or with pictures the last one's aspect at `area` (~1024x1024; multiples of 16 below)."""
    if edit is None:
        return (DEFAULT_SIZE if height is None else height), (DEFAULT_SIZE if width is None else width)
    fit_width, fit_height = fit_area(edit.pictures[-1], area)
    height = fit_height if height is None else height
    width = fit_width if width is None else width
    return height // SIZE_MULTIPLE * SIZE_MULTIPLE, width // SIZE_MULTIPLE * SIZE_MULTIPLE
