"""QwenImage21Pipeline: Qwen-Image 2.1, text-to-image and generation from up to 10 reference
pictures with one model, RGBA in and out, as diffusers' `QwenImage21Pipeline`.

    repo = "Qwen/Qwen-Image-2.1"
    pipe = QwenImage21Pipeline.from_pretrained(
        torch_dtype=torch.bfloat16, device="cuda",
        model_configs=[ModelConfig(model_id=repo, origin_file_pattern=f"{part}/*.safetensors")
                       for part in ("transformer", "text_encoder", "vae")],
        processor_config=ModelConfig(model_id=repo, origin_file_pattern="processor/"))
    image = pipe("a capybara in a wizard hat", seed=0)                 # RGBA, 1024x1024, 40 steps
    image = pipe("put the cat on the sofa", edit_image=[cat, sofa], seed=1)

What a call does (docs/qwen_image_2_1.md): the prompt (with the pictures, each resized to the
`output_resolution`^2 area, composited over white for the vision encoder only) through Qwen3-VL
(`models/qwen3_vl_encoder.py`, the system turn dropped); the pictures through the VAE (all four
channels); noise from the seed; `core.sampling.denoise` with the block-causal DiT, whose prompt
and picture tokens are computed once and kept in a KV cache (`use_kv_cache`); the VAE decodes
RGBA. The sampling grid: `sigmas`, else the pipeline's `sample_sigmas` (a distilled Turbo's),
else `num_inference_steps` linear steps; the scheduler (`scheduler`, else 2.1's) shifts it.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image

from .core.files import check_folder_files
from .core.images import ImageInput, image_to_tensor, open_picture, tensor_to_image
from .core.model_config import ModelConfig
from .core.parse import SettingError, check_seed, finite, parse_device
from .core.pipeline import Pipeline, generation
from .core.sampling import FlowMatchScheduler, denoise
from .models.qwen2_5_text import QwenImageTextEncoder
from .models.qwen2_5_vl_encoder import QwenImageVLEncoder
from .models.qwen3_vl_encoder import QwenImage21TextEncoder
from .models.qwen3_vl_processor import QwenImage21Processor
from .models.qwen_image_21_dit import SLOT_TOKENS, KVCache, PromptInput, QwenImage21DiT
from .models.qwen_image_21_vae import QwenImage21VAE
from .models.qwen_image_dit import QwenImageDiT
from .models.qwen_image_vae import QwenImageVAE
from .qwen_image import check_tiling, fit_area, random_seed

__all__ = ["QwenImage21Pipeline", "ModelConfig", "FlowMatchScheduler", "SCHEDULER"]

logger = logging.getLogger(__name__)

VAE_SCALE = 16  # pixels per latent token (the VAE's compression; 2.1's DiT reads latents unpatched)
SIZE_MULTIPLE = 32  # a vision slot of the text encoder stands for 2x2 latent tokens: sizes in 32-pixel steps
DEFAULT_RESOLUTION = 1024
MAX_PICTURES = 10  # what the model was trained with: more work, with a warning
MAX_PIXELS = 4096 * 4096  # beyond, latents and attention outgrow any device; `max_pixels` raises it
MAX_STEPS = 10_000  # the schedule is computed in the checks; beyond, a typo would fill the memory
FLAGS = ("use_kv_cache", "tiled", "progress_bar")  # call arguments that are bools
# diffusers' QwenImage21Pipeline reads its scheduler config with these defaults (calculate_shift):
# the dynamic exponential shift from 0.5 at 256 tokens to 1.15 at 4096, no terminal stretch
SCHEDULER = FlowMatchScheduler(base_shift=0.5, max_shift=1.15, base_seq_len=256, max_seq_len=4096,
                               shift_terminal=None)


@dataclass
class PromptEmbeds:
    """One prompt as the DiT reads it: (1, L, hidden) embeddings, their mask (None: nothing
    padded) and the (1, L) vision slots (True where a picture's tokens go)."""

    embeds: torch.Tensor
    mask: torch.Tensor | None
    slots: torch.Tensor


class QwenImage21Pipeline(Pipeline):
    components = {"dit": QwenImage21DiT, "text_encoder": QwenImage21TextEncoder, "vae": QwenImage21VAE}
    lora_target = "dit"
    image_arguments = ("edit_image",)
    family = "Qwen-Image 2.1"
    foreign_components = {QwenImageDiT: ("transformer", "Qwen-Image 1.x", "QwenImagePipeline"),
                          QwenImageTextEncoder: ("text encoder", "Qwen-Image 1.x", "QwenImagePipeline"),
                          QwenImageVLEncoder: ("text encoder", "Qwen-Image 1.x", "QwenImagePipeline"),
                          QwenImageVAE: ("VAE", "Qwen-Image 1.x", "QwenImagePipeline")}
    # the side of the square whose area pictures and the default output get (call: output_resolution=None)
    default_resolution: ClassVar[int] = DEFAULT_RESOLUTION
    # the sampling grid the checkpoint ships (diffusers' `sample_sigmas` in model_index.json: the Turbo's),
    # without the final 0; None: `num_inference_steps` linear steps. A call's `sigmas` wins.
    sample_sigmas: ClassVar[tuple[float, ...] | None] = None

    def __init__(self, torch_dtype: torch.dtype, device: str | torch.device):
        super().__init__(torch_dtype, device)
        self.scheduler = SCHEDULER

    @classmethod
    def load_processor(cls, paths: Sequence[Path]) -> QwenImage21Processor:
        """The `processor/` folder: Qwen3-VL's tokenizer, image processor and chat template."""
        folder = paths[0] if paths[0].is_dir() else paths[0].parent
        check_folder_files(folder, "processor_config")
        return QwenImage21Processor.from_folder(folder)

    def on_loaded(self) -> None:
        """The DiT reads the text encoder's hidden states and the VAE's latents, and one vision
        slot of the processor stands for 2x2 of the VAE's latent tokens."""
        dit = self.dit.params if self.dit is not None else None
        if dit is not None and self.text_encoder is not None:
            hidden = self.text_encoder.text_params.hidden_size
            if hidden != dit.context_in_dim:
                raise ValueError(
                    f"The text encoder's hidden size is {hidden} but the DiT reads text of width {dit.context_in_dim} "
                    "(context_in_dim): they belong to different models. Load the text encoder of the same model as "
                    "the DiT.")
        if self.vae is not None:
            vae = self.vae.params
            if vae.scale_factor != VAE_SCALE:
                raise ValueError(f"The VAE compresses {vae.scale_factor}x, not Qwen-Image 2.1's {VAE_SCALE}x: it "
                                 "belongs to another model. Load the VAE of Qwen-Image 2.1.")
            if dit is not None and not dit.in_channels == dit.out_channels == vae.z_dim:
                raise ValueError(
                    f"The VAE has {vae.z_dim} latent channels but the DiT takes {dit.in_channels} and predicts "
                    f"{dit.out_channels}: they belong to different models. Load the VAE of the same model as the DiT.")
        factor = getattr(getattr(self.processor, "image_processor", None), "factor", SIZE_MULTIPLE)
        if factor * factor != SLOT_TOKENS * VAE_SCALE * VAE_SCALE:
            raise ValueError(
                f"The processor merges pictures in {factor}-pixel blocks, but one vision token of Qwen-Image 2.1 "
                f"stands for 2x2 latent tokens ({SIZE_MULTIPLE} pixels): its preprocessor_config.json (patch_size, "
                "merge_size) is another model's. Load the processor/ folder of Qwen-Image 2.1.")

    # ------------------------------------------------------------------ generation

    @generation
    def __call__(
        self,
        prompt: str,
        negative_prompt: str | None = None,
        cfg_scale: float = 1.0,
        height: int | None = None,
        width: int | None = None,
        seed: int | None = None,
        num_inference_steps: int = 40,
        scheduler: FlowMatchScheduler | None = None,
        progress_bar: bool = True,
        edit_image: ImageInput | Sequence[ImageInput] | None = None,
        output_resolution: int | None = None,
        use_kv_cache: bool = True,
        sigmas: Sequence[float] | None = None,
        rand_device: str = "cpu",
        tiled: bool = False,
        tile_size: int = 64,
        tile_stride: int = 32,
        max_pixels: int = MAX_PIXELS,
    ) -> Image.Image:
        """Generate one RGBA image. Guidance (true CFG) runs when `cfg_scale` > 1 and a
        `negative_prompt` is given ("" counts: it reads as " "). `edit_image`: reference pictures
        or paths (RGB or RGBA, up to 10), each resized to the `output_resolution`^2 area (default
        1024; multiples of 32); the output size defaults to the last picture's aspect at that
        area, else `output_resolution` square, and rounds down to multiples of 32. `sigmas` (a
        grid from ~1 down, without the final 0) replaces `num_inference_steps` linear steps, as
        the pipeline's `sample_sigmas` does; `scheduler` (None: 2.1's) shifts either by the
        image's token count. `use_kv_cache` computes the prompt and picture tokens once (the
        same image as without). `tiled` encodes/decodes in tiles of `tile_size` latent pixels."""
        a = self.check_arguments({k: v for k, v in locals().items() if k != "self"})
        self._require("dit", "text_encoder", "vae", "processor")
        tiling = dict(tiled=a["tiled"], tile_size=a["tile_size"], tile_stride=a["tile_stride"])
        pictures = self.prepare_pictures(a["edit_image"] or (), a["output_resolution"])
        with self.timed("encode_s"):
            texts = [self.encode_prompt(a["prompt"], pictures)]
            if guided(a["cfg_scale"], a["negative_prompt"]):
                texts.append(self.encode_prompt(a["negative_prompt"], pictures))
        with self.timed("denoise_s"):
            h, w = a["height"] // VAE_SCALE, a["width"] // VAE_SCALE
            sigmas = schedule(a["scheduler"] or self.scheduler, a["sigmas"],
                              check_sigmas(self.sample_sigmas, "sample_sigmas"), a["num_inference_steps"], h * w)
            generator = torch.Generator(a["rand_device"]).manual_seed(a["seed"])
            noise = torch.randn((1, self.dit.params.in_channels, h, w), generator=generator,
                                device=a["rand_device"], dtype=torch.float32)
            latents = noise.flatten(2).transpose(1, 2).to(self.device)  # (1, h*w, C): row-major tokens
            references = self._encode_references(pictures, tiling)
            self.use_stage("dit")
            velocity = self._velocity(texts, h, w, references, a["use_kv_cache"])
            latents = denoise(velocity, latents, sigmas, self.device, a["cfg_scale"], False, a["progress_bar"])
        self.timings["denoise_steps"] = len(sigmas) - 1
        with self.timed("decode_s"):
            self.use_stage("vae")
            image = self.vae.decode(latents.transpose(1, 2).reshape(1, -1, h, w), **tiling)
        return tensor_to_image(image[0])

    @classmethod
    def check_arguments(cls, arguments: Mapping[str, Any]) -> dict[str, Any]:
        """Every call argument checked before any work (the runner calls this before loading):
        strings, finite numbers, flags that are bools, steps and sizes in range, a device for the
        noise, a seed (None: a random one, logged), readable pictures (read here: `edit_image`
        becomes a list of pictures or None), a sampling grid that decreases, and the schedule the
        call will use computed once."""
        a = super().check_arguments(arguments)
        if not isinstance(a["prompt"], str):
            raise SettingError(f"prompt must be a string, got {type(a['prompt']).__name__}.")
        if a["negative_prompt"] is not None and not isinstance(a["negative_prompt"], str):
            raise SettingError(f"negative_prompt must be a string or None (no guidance), got "
                               f"{type(a['negative_prompt']).__name__}.")
        a["cfg_scale"] = finite(a["cfg_scale"], "cfg_scale")
        for key in FLAGS:
            if not isinstance(a[key], bool):
                raise SettingError(f"{key} must be true or false, got {a[key]!r}.")
        a["num_inference_steps"] = count(a["num_inference_steps"], "num_inference_steps", MAX_STEPS)
        a["max_pixels"] = count(a["max_pixels"], "max_pixels")
        check_tiling(a["tile_size"], a["tile_stride"])
        a["rand_device"] = parse_device(a["rand_device"], "rand_device")
        a["seed"] = random_seed() if a["seed"] is None else check_seed(a["seed"])
        resolution = cls.default_resolution if a["output_resolution"] is None else a["output_resolution"]
        a["output_resolution"] = count(resolution, "output_resolution", math.isqrt(a["max_pixels"]))
        a["edit_image"] = read_pictures(a["edit_image"], a["output_resolution"])
        a["height"], a["width"] = output_size(a["height"], a["width"], a["edit_image"], a["output_resolution"],
                                              a["max_pixels"])
        a["sigmas"] = check_sigmas(a["sigmas"])
        check_schedule(a, cls.sample_sigmas)
        return a

    def prepare_pictures(self, pictures: Sequence[Image.Image], resolution: int) -> list[Image.Image]:
        """Each picture as RGBA at the `resolution`^2 area (multiples of 32, Lanczos: diffusers'
        resize), the size both encoders read; refused if the processor would resize it again."""
        if len(pictures) > MAX_PICTURES:
            logger.warning("%d pictures: Qwen-Image 2.1 was trained with up to %d; more may not follow the prompt "
                           "as well (and each one lengthens every step).", len(pictures), MAX_PICTURES)
        prepared = []
        for i, picture in enumerate(pictures):
            width, height = fit_area(picture, resolution * resolution)
            rgba = picture if picture.mode == "RGBA" else picture.convert("RGBA")
            prepared.append(rgba.resize((width, height), resample=Image.LANCZOS))
            seen = self.processor.image_processor.target_size(height, width)
            if seen != (height, width):
                raise SettingError(
                    f"edit_image[{i}] is resized to {width}x{height} (output_resolution={resolution}), but the "
                    f"processor reads pictures at {seen[1]}x{seen[0]} (its preprocessor_config.json keeps "
                    f"pictures between {self.processor.image_processor.min_pixels:,} and "
                    f"{self.processor.image_processor.max_pixels:,} pixels): the vision tokens would not match the "
                    "picture's latents. Choose an output_resolution whose area lies in that range.")
        return prepared

    def encode_prompt(self, prompt: str, pictures: Sequence[Image.Image] = ()) -> PromptEmbeds:
        """The prompt (with the pictures as `prepare_pictures` gives them) in 2.1's template ->
        the embeddings of its tokens after the system turn, as the DiT reads them."""
        self._require("text_encoder", "processor")
        self.use_stage("text_encoder")
        inputs = self.processor([prompt], list(pictures) or None).to(self.device)
        embeds, mask, slots = self.text_encoder.encode_prompt(
            inputs["input_ids"], inputs["attention_mask"], self.processor.system_tokens, inputs.get("pixel_values"),
            inputs.get("image_grid_thw"))
        return PromptEmbeds(embeds, None if bool(mask.all()) else mask.bool(), slots)

    def _encode_references(self, pictures: Sequence[Image.Image],
                           tiling: dict) -> tuple[torch.Tensor, tuple[tuple[int, int], ...]] | None:
        """The pictures' normalised VAE latents (posterior means, RGBA) as tokens, one picture
        after the other, and their latent grids."""
        if not pictures:
            return None
        self.use_stage("vae")
        tokens, grids = [], []
        for picture in pictures:
            pixels = image_to_tensor(picture, picture.height, picture.width, alpha=True).to(self.device)
            latents = self.vae.encode(pixels, **tiling)
            tokens.append(latents.flatten(2).transpose(1, 2))
            grids.append((latents.shape[-2], latents.shape[-1]))
        return torch.cat(tokens, dim=1), tuple(grids)

    def _velocity(self, texts: Sequence[PromptEmbeds], h: int, w: int,
                  references: tuple[torch.Tensor, tuple[tuple[int, int], ...]] | None, use_kv_cache: bool):
        """The DiT as `denoise` calls it: (latents, sigma) -> (conditional, unconditional or None).
        Both prompts in one DiT call (`forward_prompts`: on small images their tokens go through
        each projection together, one larger product). With the cache (and causal_condition),
        each prompt's first step fills its own KVCache."""
        ref_latents, grids = references if references is not None else (None, ())
        cached = use_kv_cache and self.dit.params.causal_condition
        prompts = [PromptInput(t.embeds, t.mask, t.slots, KVCache() if cached else None) for t in texts]

        def velocity(latents: torch.Tensor, sigma: torch.Tensor):
            out = self.dit.forward_prompts(latents, sigma, prompts, h, w, references=grids,
                                           reference_latents=ref_latents)
            return out[0], out[1] if len(out) == 2 else None
        return velocity


# ------------------------------------------------------------------ checks (no model needed)


def guided(cfg_scale: float, negative_prompt: str | None) -> bool:
    """True CFG runs when the scale is above 1 and a negative prompt is given, as in diffusers."""
    if cfg_scale > 1.0 and negative_prompt is None:
        logger.warning("cfg_scale=%s but no negative_prompt: guidance is off (give negative_prompt, \"\" included, "
                       "to guide).", cfg_scale)
    elif cfg_scale <= 1.0 and negative_prompt:
        logger.warning("A negative_prompt is given but cfg_scale=%s <= 1: guidance is off, the negative prompt is "
                       "not used.", cfg_scale)
    return cfg_scale > 1.0 and negative_prompt is not None


def count(value: Any, key: str, most: int | None = None) -> int:
    """A positive integer, at most `most`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1 or (most is not None and value > most):
        limit = f" from 1 to {most:,}" if most is not None else " (positive)"
        raise SettingError(f"{key} must be an integer{limit}, got {value!r}.")
    return value


def read_pictures(value: Any, resolution: int) -> list[Image.Image] | None:
    """`edit_image` as given (a picture, a path, or a list of them) -> the pictures, RGBA where
    they have transparency; each must keep both sides at `resolution`^2 area."""
    if value is None:
        return None
    if isinstance(value, (Image.Image, str, Path)):
        pictures = [open_picture(value, "edit_image", alpha=True)]
    elif isinstance(value, Sequence) and value:
        pictures = [open_picture(v, f"edit_image[{i}]", alpha=True) for i, v in enumerate(value)]
    else:
        raise SettingError(f"edit_image must be a picture, a path, or a non-empty list of them, got {value!r}.")
    for i, picture in enumerate(pictures):
        width, height = fit_area(picture, resolution * resolution)
        if min(width, height) < SIZE_MULTIPLE:
            raise SettingError(
                f"edit_image[{i}] ({picture.width}x{picture.height}) at output_resolution={resolution} would be "
                f"{width}x{height} pixels: its aspect ratio is too extreme for that area. Crop the picture, or raise "
                "output_resolution.")
    return pictures


def output_size(height: Any, width: Any, pictures: Sequence[Image.Image] | None, resolution: int,
                max_pixels: int) -> tuple[int, int]:
    """(height, width): given, else the last picture's aspect at `resolution`^2 area, else
    `resolution` square; rounded down to multiples of 32 (diffusers), at most `max_pixels`."""
    fit_width, fit_height = fit_area(pictures[-1], resolution * resolution) if pictures else (resolution, resolution)
    size = {"height": fit_height if height is None else height, "width": fit_width if width is None else width}
    for key, value in size.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < SIZE_MULTIPLE:
            raise SettingError(f"{key} must be an integer of at least {SIZE_MULTIPLE} (pixels), got {value!r}.")
        if value % SIZE_MULTIPLE:
            logger.warning("%s=%d is not a multiple of %d: using %d.", key, value, SIZE_MULTIPLE,
                           value // SIZE_MULTIPLE * SIZE_MULTIPLE)
            size[key] = value // SIZE_MULTIPLE * SIZE_MULTIPLE
    height, width = size["height"], size["width"]
    if height * width > max_pixels:
        raise SettingError(f"height={height}, width={width}: {height * width:,} pixels, above max_pixels="
                           f"{max_pixels:,} (4096x4096 by default): its latents and attention would not fit in "
                           "memory. Give a smaller size, or raise max_pixels if you have the memory.")
    return height, width


def check_sigmas(value: Any, key: str = "sigmas") -> tuple[float, ...] | None:
    """A sampling grid: numbers in (0, 1], decreasing at every step, without the final 0."""
    if value is None:
        return None
    if isinstance(value, (torch.Tensor, np.ndarray)):
        value = value.tolist()
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or not value:
        raise SettingError(f"{key} must be a non-empty list of numbers (the sampling grid from about 1 down, "
                           f"without the final 0), got {value!r}.")
    if len(value) > MAX_STEPS:
        raise SettingError(f"{key} has {len(value):,} values: at most {MAX_STEPS:,} steps.")
    grid = tuple(finite(v, f"{key}[{i}]") for i, v in enumerate(value))
    outside = next((i for i, s in enumerate(grid) if not 0.0 < s <= 1.0), None)
    if outside is not None:
        raise SettingError(f"{key}[{outside}]={grid[outside]!r}: every sigma lies in (0, 1] (1 is pure noise; the "
                           "final 0 is added by the sampler, leave it out).")
    rising = next((i for i in range(1, len(grid)) if grid[i] >= grid[i - 1]), None)
    if rising is not None:
        raise SettingError(f"{key} must decrease at every step: {key}[{rising - 1}]={grid[rising - 1]!r} is "
                           f"followed by {grid[rising]!r}. Give the grid from about 1 down.")
    return grid


def schedule(scheduler: FlowMatchScheduler, sigmas: Sequence[float] | None, sample_sigmas: Sequence[float] | None,
             steps: int, tokens: int) -> torch.Tensor:
    """The call's sigmas (float32, ending in 0): the grid (`sigmas`, else `sample_sigmas`, else
    `steps` linear steps) shifted by the scheduler for an image of `tokens` latent tokens."""
    grid = sigmas if sigmas is not None else sample_sigmas
    if grid is None:
        return scheduler.sigmas(steps, tokens)
    return scheduler.shift_grid(grid, tokens)


def check_schedule(a: dict[str, Any], sample_sigmas: Sequence[float] | None) -> None:
    """The schedule computed as the call will compute it: a scheduler whose shift overflows or
    leaves steps that do not move is refused before any model loads."""
    scheduler = a["scheduler"]
    if scheduler is not None and not callable(getattr(scheduler, "shift_grid", None)):
        raise SettingError(f"scheduler must be a FlowMatchScheduler (or None for Qwen-Image 2.1's), got "
                           f"{type(scheduler).__name__}.")
    tokens = (a["height"] // VAE_SCALE) * (a["width"] // VAE_SCALE)
    try:
        sigmas = schedule(scheduler or SCHEDULER, a["sigmas"], check_sigmas(sample_sigmas, "sample_sigmas"),
                          a["num_inference_steps"], tokens)
    except OverflowError:
        sigmas = None
    if sigmas is None or not bool(torch.isfinite(sigmas).all()) or not bool((sigmas[1:] < sigmas[:-1]).all()):
        raise SettingError(
            "the scheduler's settings give no usable sigma schedule for this grid and image size (exp(mu) "
            "overflows, or the sigmas are not finite or do not decrease at every step). Leave scheduler null for "
            "Qwen-Image 2.1's own, or give shifts of the order of 0.5 to 1.2.")
