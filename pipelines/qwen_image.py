"""QwenImagePipeline: Qwen-Image text-to-image and image-to-image (REFERENCE.md section 1)."""
from __future__ import annotations

import functools
import logging
import random
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from .core import vram
from .core.download import resolve_files
from .core.flow_match import FlowMatchScheduler, euler_step
from .core.loader import load_model
from .core.lora import LoraHandle, clear_lora as remove_loras, load_lora as apply_lora
from .core.model_config import ModelConfig
from .models.qwen_image_dit import QwenImageDiT
from .models.qwen_image_text_encoder import QwenImageTextEncoder
from .models.qwen_image_vae import QwenImageVAE

__all__ = ["QwenImagePipeline", "ModelConfig", "FlowMatchScheduler"]

logger = logging.getLogger(__name__)

PROMPT_TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, "
    "text, spatial relationships of the objects and background:<|im_end|>\n"
    "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
)
MAX_PROMPT_TOKENS = 1024  # tokenizer limit after the template prefix
MAX_TEXT_EMBEDDINGS = 512  # the DiT sees at most this many prompt tokens
SIZE_MULTIPLE = 16  # 8x VAE compression times the 2x2 latent packing

# pipeline attribute -> model class; the loader recognises which one a checkpoint holds
COMPONENTS = {"dit": QwenImageDiT, "text_encoder": QwenImageTextEncoder, "vae": QwenImageVAE}


def _offload_when_done(call):
    """Every VRAM-managed model goes back to its offload storage when a call ends (or fails)."""
    @functools.wraps(call)
    def wrapper(self, *args, **kwargs):
        try:
            return call(self, *args, **kwargs)
        finally:
            vram.use_stage(self.vram, None)
    return wrapper


class QwenImagePipeline:
    supports_vram_management = True

    def __init__(self, torch_dtype: torch.dtype, device: str | torch.device):
        self.torch_dtype = torch_dtype
        self.device = torch.device(device)
        self.dit: QwenImageDiT | None = None
        self.text_encoder: QwenImageTextEncoder | None = None
        self.vae: QwenImageVAE | None = None
        self.tokenizer = None
        self.scheduler = FlowMatchScheduler()
        self.timings: dict[str, float] = {}
        self._template_prefix_tokens: int | None = None
        self.vram: dict[str, vram.VramManager] = {}  # component name -> its VRAM manager

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_pretrained(
        cls,
        torch_dtype: torch.dtype = torch.bfloat16,
        device: str | torch.device = "cuda",
        model_configs: Sequence[ModelConfig] = (),
        tokenizer_config: ModelConfig | None = None,
        vram_limit: float | str | None = None,
    ) -> "QwenImagePipeline":
        """Load the models named by `model_configs` (recognised from their keys) and the
        tokenizer. `torch_dtype`/`device` are the computation precision and device.
        A ModelConfig with offload_dtype/offload_device gets VRAM management
        (`pipelines.core.vram`); `vram_limit`: GiB of device memory below which layers stay
        on the preparing device, None for no limit, "auto" for the total minus a margin."""
        device = torch.device(device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(
                f"device={str(device)!r} but CUDA is not available on this machine: pass device='cpu' "
                "(and torch_dtype=torch.float32 for speed on a CPU)."
            )
        vram_limit = vram.resolve_vram_limit(vram_limit, device)
        settings = [vram.settings_for(c, torch_dtype, device, vram_limit) for c in model_configs]  # checked first
        if vram_limit is not None and not any(settings):
            logger.warning("vram_limit=%s has no effect: no ModelConfig enables VRAM management (offload_*).",
                           vram_limit)
        pipe = cls(torch_dtype, device)
        origins: dict[str, ModelConfig] = {}  # component -> the config that gave it
        for config, managed in zip(model_configs, settings):
            if managed is None:
                model = load_model(resolve_files(config), tuple(COMPONENTS.values()), torch_dtype, device)
            else:
                model = vram.load_managed(resolve_files(config), tuple(COMPONENTS.values()), managed)
            name = next(n for n, c in COMPONENTS.items() if isinstance(model, c))
            if name in origins:
                raise ValueError(
                    f"Two model configs hold the {name}: {origins[name].describe()} and {config.describe()}. "
                    "Give each component once: drop one of them from model_configs."
                )
            origins[name] = config
            setattr(pipe, name, model)
            if managed is not None:
                pipe.vram[name] = vram.manager_of(model)
        if tokenizer_config is not None:
            pipe.tokenizer = load_tokenizer(resolve_files(tokenizer_config))
        return pipe

    # ------------------------------------------------------------------ generation

    @torch.inference_mode()
    @_offload_when_done
    def __call__(
        self,
        prompt: str,
        negative_prompt: str = "",
        cfg_scale: float = 4.0,
        height: int = 1328,
        width: int = 1328,
        seed: int | None = None,
        rand_device: str = "cpu",
        num_inference_steps: int = 30,
        exponential_shift_mu: float | None = None,
        input_image: Image.Image | None = None,
        denoising_strength: float = 1.0,
        tiled: bool = False,
        tile_size: int = 128,
        tile_stride: int = 64,
        progress_bar: bool = True,
        scheduler: FlowMatchScheduler | None = None,
        cfg_norm_rescale: bool = True,
        cfg_batch: bool = False,
    ) -> Image.Image:
        """Generate one image. `cfg_scale` != 1 runs true CFG against `negative_prompt`;
        `cfg_norm_rescale` rescales the guided prediction to the conditional one's norm per
        token, as the reference pipeline does. `input_image` + `denoising_strength` < 1 is
        image-to-image: the first (1 - strength) of the steps are skipped. `cfg_batch` runs the
        two CFG branches as one batch-2 forward (prompts padded to one length with a mask):
        the weights are read once per step, which pays when they stream (VRAM management)."""
        self._require("dit", "text_encoder", "vae", "tokenizer")
        if not 0.0 < denoising_strength <= 1.0:
            raise ValueError(f"denoising_strength must be in (0, 1], got {denoising_strength}.")
        height, width = _round_size(height), _round_size(width)
        if seed is None:
            seed = random.randrange(2**31)
            logger.info("No seed given: using seed %d", seed)
        self.timings = {}

        start = self._now()
        text, text_mask = self.encode_prompt(prompt)
        do_cfg = cfg_scale != 1.0
        if do_cfg:
            negative_text, negative_mask = self.encode_prompt(negative_prompt)
        self.timings["encode_s"] = self._now() - start

        start = self._now()
        h, w = height // SIZE_MULTIPLE, width // SIZE_MULTIPLE
        scheduler = scheduler or self.scheduler
        sigmas = scheduler.sigmas(num_inference_steps, h * w, exponential_shift_mu)
        generator = torch.Generator(rand_device).manual_seed(seed)
        if input_image is not None:
            vram.use_stage(self.vram, "vae")
            # the posterior sample draws from the generator before the noise, as in diffusers
            image_latents = pack_latents(self.vae.encode(
                image_to_tensor(input_image, height, width).to(self.device), tiled=tiled,
                tile_size=tile_size, tile_stride=tile_stride, generator=generator))
        noise = torch.randn((1, 16, 2 * h, 2 * w), generator=generator, device=rand_device, dtype=torch.float32)
        latents = pack_latents(noise.to(self.device))
        if input_image is not None:
            first_step = int(max(num_inference_steps - num_inference_steps * denoising_strength, 0))
            sigmas = sigmas[first_step:]
            latents = sigmas[0] * latents + (1.0 - sigmas[0]) * image_latents

        if do_cfg and cfg_batch:
            both_texts, both_masks = stack_texts([(text, text_mask), (negative_text, negative_mask)])
        vram.use_stage(self.vram, "dit")
        steps = tqdm(range(len(sigmas) - 1), desc="Denoising", disable=not progress_bar)
        for i in steps:
            timestep = sigmas[i : i + 1].to(self.device)
            if do_cfg and cfg_batch:
                both = self.dit(torch.cat([latents, latents]), timestep, both_texts, both_masks, h, w).float()
                velocity, negative = both.chunk(2)
            else:
                velocity = self.dit(latents, timestep, text, text_mask, h, w).float()
                if do_cfg:
                    negative = self.dit(latents, timestep, negative_text, negative_mask, h, w).float()
            if do_cfg:
                velocity = guide(velocity, negative, cfg_scale, cfg_norm_rescale)
            latents = euler_step(latents, velocity, sigmas[i].item(), sigmas[i + 1].item())
        self.timings["denoise_s"] = self._now() - start
        self.timings["denoise_steps"] = len(sigmas) - 1  # fewer than asked in image-to-image

        start = self._now()
        vram.use_stage(self.vram, "vae")
        image = self.vae.decode(unpack_latents(latents, h, w), tiled=tiled, tile_size=tile_size,
                                tile_stride=tile_stride)
        self.timings["decode_s"] = self._now() - start
        return tensor_to_image(image[0])

    def encode_prompt(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Prompt -> (1, L, hidden) embeddings of the prompt tokens (the template prefix
        dropped) and their mask (None: no padding at batch 1)."""
        self._require("text_encoder", "tokenizer")
        vram.use_stage(self.vram, "text_encoder")
        drop = self.template_prefix_tokens
        ids = self.tokenizer(PROMPT_TEMPLATE.format(prompt), return_tensors="pt").input_ids
        if ids.shape[1] > MAX_PROMPT_TOKENS + drop:
            logger.warning(
                "The prompt has %d tokens; the tokenizer keeps the first %d.",
                ids.shape[1] - drop, MAX_PROMPT_TOKENS,
            )
            ids = ids[:, : MAX_PROMPT_TOKENS + drop]
        ids = ids.to(self.device)
        hidden = self.text_encoder(ids, torch.ones_like(ids))[:, drop:]
        if hidden.shape[1] > MAX_TEXT_EMBEDDINGS:
            logger.warning(
                "The prompt has %d tokens after the template; Qwen-Image uses the first %d, "
                "the rest is ignored.", hidden.shape[1], MAX_TEXT_EMBEDDINGS,
            )
            hidden = hidden[:, :MAX_TEXT_EMBEDDINGS]
        return hidden, None

    @property
    def template_prefix_tokens(self) -> int:
        """How many tokens the template puts before the prompt (34 with the real vocabulary)."""
        if self._template_prefix_tokens is None:
            prefix = PROMPT_TEMPLATE.split("{}")[0]
            self._template_prefix_tokens = len(self.tokenizer(prefix).input_ids)
        return self._template_prefix_tokens

    # ------------------------------------------------------------------ helpers

    def _require(self, *names: str) -> None:
        missing = [n for n in names if getattr(self, n) is None]
        if missing:
            raise RuntimeError(
                f"The pipeline has no {', '.join(missing)}: add a ModelConfig for "
                f"{' and '.join(missing)} to from_pretrained (tokenizer: tokenizer_config=...)."
            )

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    # ------------------------------------------------------------------ LoRA

    def load_lora(self, module: torch.nn.Module, lora, alpha: float = 1.0, hotload: bool | None = None,
                  strict: bool = True) -> LoraHandle:
        """Apply a LoRA to `module` (e.g. `pipe.dit`). `lora`: a ModelConfig, a path, or a state
        dict, in any format of `pipelines.core.lora`. Cold (fused, no speed cost) unless
        `hotload=True` (kept apart, added in the forward); the default (None) is hot for a
        VRAM-managed model. Returns a handle whose alpha can be
        changed in place: `handle.set_alpha(0.5)`. `pipe.clear_lora()` removes it exactly."""
        if module is None or not isinstance(module, torch.nn.Module):
            raise TypeError(f"load_lora: `module` must be a loaded model such as pipe.dit, got {module!r}.")
        if hotload is None:
            # hot for VRAM-managed models: their weights have several copies (or stay on disk)
            hotload = vram.manager_of(module) is not None
        return apply_lora(module, lora, alpha=alpha, hot=hotload, strict=strict)

    def clear_lora(self) -> None:
        """Remove every LoRA (cold or hot) from every model: the base weights come back bit for bit."""
        for name in COMPONENTS:
            model = getattr(self, name)
            if model is not None:
                remove_loras(model)


def load_tokenizer(paths: Sequence[Path]):
    from transformers import AutoTokenizer

    folder = paths[0] if paths[0].is_dir() else paths[0].parent
    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except Exception as error:
        raise ValueError(
            f"{folder}: cannot load a tokenizer from this folder ({type(error).__name__}: {error}). "
            "It should hold Qwen-Image's tokenizer/ files (vocab.json, merges.txt, tokenizer_config.json)."
        ) from error


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


def guide(cond: torch.Tensor, uncond: torch.Tensor, scale: float, norm_rescale: bool) -> torch.Tensor:
    """True classifier-free guidance; optionally keep the conditional prediction's norm per token."""
    guided = uncond + scale * (cond - uncond)
    if norm_rescale:
        guided = guided * (cond.norm(dim=-1, keepdim=True) / guided.norm(dim=-1, keepdim=True))
    return guided


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, 2h, 2w) -> (B, h*w, C*4), channel index c*4 + dy*2 + dx."""
    b, c, hh, ww = latents.shape
    x = latents.view(b, c, hh // 2, 2, ww // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (hh // 2) * (ww // 2), c * 4)


def unpack_latents(latents: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(B, h*w, C*4) -> (B, C, 2h, 2w), the inverse of pack_latents."""
    b, _, cp = latents.shape
    x = latents.view(b, h, w, cp // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, cp // 4, 2 * h, 2 * w)


def _round_size(size: int) -> int:
    rounded = max(SIZE_MULTIPLE, int(round(size / SIZE_MULTIPLE)) * SIZE_MULTIPLE)
    if rounded != size:
        logger.warning("Image size %d is not a multiple of %d: using %d.", size, SIZE_MULTIPLE, rounded)
    return rounded


def image_to_tensor(image: Image.Image, height: int, width: int) -> torch.Tensor:
    """PIL image -> (1, 3, H, W) in [-1, 1], resized (Lanczos) to the generation size."""
    image = image.convert("RGB")
    if image.size != (width, height):
        image = image.resize((width, height), resample=Image.LANCZOS)
    array = np.asarray(image, dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1)[None] * 2.0 - 1.0


def tensor_to_image(image: torch.Tensor) -> Image.Image:
    """(3, H, W) in [-1, 1] -> PIL image."""
    array = ((image.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
    return Image.fromarray(array.permute(1, 2, 0).cpu().numpy())
