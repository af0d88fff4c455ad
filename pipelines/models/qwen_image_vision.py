"""Input side of Qwen2.5-VL for the Qwen-Image-Edit family: pictures -> vision patches, and
prompts with picture placeholders -> token ids, without torchvision.

`QwenVLImageProcessor` reproduces transformers' PIL image processor of Qwen2-VL / Qwen2.5-VL
(`Qwen2VLImageProcessorPil` in transformers 5.x, the "slow" `Qwen2VLImageProcessor` of 4.x):
RGB conversion (transparency composited onto white), `smart_resize` to multiples of
patch_size * merge_size within [min_pixels, max_pixels], a PIL resize (bicubic by default),
rescale (x rescale_factor, computed in float64 then stored as float32), normalisation
((x - mean) / std in float32) and patchification into
`pixel_values` (num_patches, C * temporal_patch * patch * patch) with `image_grid_thw` (n, 3).

`QwenVLProcessor` reproduces transformers' `Qwen2VLProcessor.__call__` for images: each
`<|image_pad|>` placeholder (in order, across the batch) is expanded to
grid_t * grid_h * grid_w / merge_size**2 copies before the tokenizer runs.

Note: with torchvision installed, transformers 5.x builds its torchvision image processor for
`image_processor_type: Qwen2VLImageProcessor`; that one resizes with torchvision's bicubic
(on uint8 tensors), whose values differ slightly from PIL's. This module follows PIL.
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .qwen_tokenizer import QwenTokenizer

IMAGE_TOKEN = "<|image_pad|>"
VISION_START_TOKEN = "<|vision_start|>"
VISION_END_TOKEN = "<|vision_end|>"

# OpenAI CLIP statistics: transformers' defaults, and the values of Qwen2.5-VL's config.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

PREPROCESSOR_CONFIG = "preprocessor_config.json"
PROCESSOR_CONFIG = "processor_config.json"  # transformers 5.x writes the image processor in here
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer_config.json")


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """The size Qwen2-VL resizes an image to: both sides multiples of `factor`, the area within
    [min_pixels, max_pixels], the aspect ratio kept as well as that allows. Python's `round`
    (half to even) as in transformers."""
    if min(height, width) <= 0:
        raise ValueError(f"image of size {width}x{height} has no pixels")
    if max(height, width) / min(height, width) > 200:
        raise ValueError(
            f"image of size {width}x{height}: the aspect ratio must be below 200 "
            f"(got {max(height, width) / min(height, width):.1f}); crop or pad the picture"
        )
    h = round(height / factor) * factor
    w = round(width / factor) * factor
    if h * w > max_pixels:
        scale = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / scale / factor) * factor)
        w = max(factor, math.floor(width / scale / factor) * factor)
    elif h * w < min_pixels:
        scale = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * scale / factor) * factor
        w = math.ceil(width * scale / factor) * factor
    return h, w


def _check_image(image: Any, index: int) -> None:
    from PIL import Image

    if not isinstance(image, Image.Image):
        raise TypeError(
            f"image {index}: expected a PIL.Image.Image, got {type(image).__module__}.{type(image).__name__}. "
            "Open files with PIL.Image.open(path) (arrays: PIL.Image.fromarray(uint8 HxWxC array))."
        )
    if image.width <= 0 or image.height <= 0:
        raise ValueError(f"image {index}: it has no pixels (size {image.width}x{image.height})")


def _to_rgb(image):
    """transformers' `convert_to_rgb`: transparency is composited onto white."""
    from PIL import Image

    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def _as_tuple(value: Any, name: str) -> tuple[float, ...] | float:
    if isinstance(value, (int, float)):
        return float(value)
    try:
        return tuple(float(v) for v in value)
    except TypeError as error:
        raise ValueError(f"image processor: `{name}` must be a number or a list of numbers, got {value!r}") from error


@dataclass
class QwenVLImageProcessor:
    """Qwen2.5-VL image preprocessing. Defaults are transformers' class defaults; the hub's
    Qwen2.5-VL / Qwen-Image-Edit `preprocessor_config.json` sets min_pixels 3136 and
    max_pixels 12845056."""

    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: tuple[float, ...] | float = CLIP_MEAN
    image_std: tuple[float, ...] | float = CLIP_STD
    do_resize: bool = True
    resample: int = 3  # PIL.Image.Resampling.BICUBIC
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    do_convert_rgb: bool = True
    source: str = field(default="defaults", compare=False)  # where the values came from, for errors

    def __post_init__(self) -> None:
        where = f"image processor ({self.source})"
        for name in ("min_pixels", "max_pixels", "patch_size", "temporal_patch_size", "merge_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{where}: `{name}` must be a positive integer, got {value!r}")
        if self.min_pixels > self.max_pixels:
            raise ValueError(f"{where}: min_pixels {self.min_pixels} is above max_pixels {self.max_pixels}")
        if isinstance(self.resample, bool) or not isinstance(self.resample, int) or self.resample not in range(6):
            raise ValueError(f"{where}: `resample` must be a PIL resampling filter 0..5, got {self.resample!r}")
        self.image_mean = _as_tuple(self.image_mean, "image_mean")
        self.image_std = _as_tuple(self.image_std, "image_std")

    # ---- construction --------------------------------------------------------------------

    @classmethod
    def from_config(cls, config: Mapping[str, Any], source: str = "config") -> "QwenVLImageProcessor":
        """From a `preprocessor_config.json` dict, read as transformers reads it: `size`
        ({shortest_edge, longest_edge}) first, `min_pixels` / `max_pixels` override it; absent
        or null fields keep the class defaults."""
        if not isinstance(config, Mapping):
            raise ValueError(f"image processor ({source}): expected a JSON object, got {type(config).__name__}")
        kwargs: dict[str, Any] = {}
        size = config.get("size")
        if size is not None:
            if not isinstance(size, Mapping) or not {"shortest_edge", "longest_edge"} <= set(size):
                raise ValueError(
                    f"image processor ({source}): `size` must hold 'shortest_edge' and 'longest_edge' "
                    f"(pixel counts), got {size!r}; or give `min_pixels` and `max_pixels`"
                )
            kwargs["min_pixels"] = size["shortest_edge"]
            kwargs["max_pixels"] = size["longest_edge"]
        known = {f.name for f in fields(cls)} - {"source"}
        for name in known:
            if config.get(name) is not None:
                kwargs[name] = config[name]
        if isinstance(kwargs.get("resample"), str):  # e.g. "BICUBIC" in hand-written files
            from PIL import Image

            try:
                kwargs["resample"] = int(Image.Resampling[kwargs["resample"].upper()])
            except KeyError as error:
                raise ValueError(f"image processor ({source}): unknown `resample` {kwargs['resample']!r}") from error
        try:
            return cls(**kwargs, source=source)
        except TypeError as error:
            raise ValueError(f"image processor ({source}): {error}") from error

    @classmethod
    def from_folder(cls, folder: str | os.PathLike) -> "QwenVLImageProcessor":
        """From `preprocessor_config.json` in `folder` (or the `image_processor` entry of a
        transformers 5.x `processor_config.json`)."""
        folder = Path(folder)
        config, path = _read_image_processor_config(folder)
        return cls.from_config(config, source=str(path))

    # ---- processing ----------------------------------------------------------------------

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    def target_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) an image of this size is resized to."""
        if not self.do_resize:
            return height, width
        return smart_resize(height, width, self.factor, self.min_pixels, self.max_pixels)

    def _pixels(self, image, index: int) -> np.ndarray:
        """One image -> float32 (H, W, C) array, resized, rescaled, normalised."""
        from PIL import Image

        if self.do_convert_rgb:
            image = _to_rgb(image)
        elif image.mode not in ("L", "RGB", "RGBA"):
            raise ValueError(
                f"image {index}: mode {image.mode!r} with do_convert_rgb=false; convert it to RGB first"
            )
        if self.do_resize:
            height, width = self.target_size(image.height, image.width)
            image = image.resize((width, height), resample=Image.Resampling(self.resample))
        pixels = np.asarray(image)
        if pixels.ndim == 2:
            pixels = pixels[:, :, None]
        if self.do_rescale:
            pixels = (pixels.astype(np.float64) * self.rescale_factor).astype(np.float32)
        if self.do_normalize:
            if not np.issubdtype(pixels.dtype, np.floating):
                pixels = pixels.astype(np.float32)
            channels = pixels.shape[-1]
            mean = np.array(self._per_channel(self.image_mean, channels, "image_mean"), dtype=pixels.dtype)
            std = np.array(self._per_channel(self.image_std, channels, "image_std"), dtype=pixels.dtype)
            pixels = (pixels - mean) / std
        return pixels.astype(np.float32, copy=False)

    def _per_channel(self, value, channels: int, name: str) -> tuple[float, ...]:
        if isinstance(value, float):
            return (value,) * channels
        if len(value) != channels:
            raise ValueError(
                f"image processor ({self.source}): `{name}` has {len(value)} values for an image with "
                f"{channels} channel(s)"
            )
        return value

    def _patchify(self, pixels: np.ndarray, index: int) -> tuple[np.ndarray, tuple[int, int, int]]:
        height, width, channels = pixels.shape
        p, m, t = self.patch_size, self.merge_size, self.temporal_patch_size
        if height % (p * m) or width % (p * m):
            raise ValueError(
                f"image {index}: {width}x{height} is not a multiple of patch_size * merge_size = {p * m} "
                "(do_resize is false); resize the picture or enable do_resize"
            )
        grid_h, grid_w = height // p, width // p
        # (H, W, C) -> (blocks_h, merge_h, patch_h, blocks_w, merge_w, patch_w, C)
        blocks = pixels.reshape(grid_h // m, m, p, grid_w // m, m, p, channels)
        # -> (blocks_h, blocks_w, merge_h, merge_w, C, patch_h, patch_w): patches of one merge
        # block are consecutive, each flattened channel-first
        blocks = blocks.transpose(0, 3, 1, 4, 6, 2, 5)
        # one still picture fills every temporal slot of the 3-D patch
        blocks = np.broadcast_to(blocks[:, :, :, :, :, None], (*blocks.shape[:5], t, p, p))
        return blocks.reshape(grid_h * grid_w, channels * t * p * p), (1, grid_h, grid_w)

    def __call__(self, images: Sequence[Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """PIL images -> (pixel_values float32 (sum of patches, C*T*P*P), image_grid_thw int64 (n, 3))."""
        from PIL import Image

        if isinstance(images, Image.Image):
            images = [images]
        if not isinstance(images, Sequence) or isinstance(images, (str, bytes)) or len(images) == 0:
            raise TypeError(f"images: expected a non-empty list of PIL images, got {type(images).__name__}")
        patches, grids = [], []
        for index, image in enumerate(images):
            _check_image(image, index)
            flat, grid = self._patchify(self._pixels(image, index), index)
            patches.append(flat)
            grids.append(grid)
        pixel_values = torch.from_numpy(np.ascontiguousarray(np.concatenate(patches, axis=0)))
        return pixel_values, torch.tensor(grids, dtype=torch.long)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ValueError(f"{path}: cannot read it as JSON ({error}). Fix the file or fetch it again.") from error


def _read_image_processor_config(folder: Path) -> tuple[dict, Path]:
    if not folder.is_dir():
        raise FileNotFoundError(
            f"{folder}: no such folder. Give the `processor/` folder of a Qwen-Image-Edit repo "
            "(it holds preprocessor_config.json and the tokenizer files)."
        )
    path = folder / PREPROCESSOR_CONFIG
    if path.is_file():
        return _read_json(path), path
    combined = folder / PROCESSOR_CONFIG
    if combined.is_file():
        config = _read_json(combined)
        if isinstance(config, Mapping) and isinstance(config.get("image_processor"), Mapping):
            return dict(config["image_processor"]), combined
    raise FileNotFoundError(
        f"{folder}: no {PREPROCESSOR_CONFIG} (the image processor settings of Qwen2.5-VL). This is not "
        "a processor folder: give the `processor/` folder of a Qwen-Image-Edit repo, download its "
        f"{PREPROCESSOR_CONFIG}, or write one with pipelines.demo.processor.build_processor_folder."
    )


class ProcessorOutput(dict):
    """input_ids, attention_mask (and pixel_values, image_grid_thw when there are pictures)."""

    def to(self, device: str | torch.device) -> "ProcessorOutput":
        return ProcessorOutput({k: v.to(device) for k, v in self.items()})


class QwenVLProcessor:
    """Prompts with `<|vision_start|><|image_pad|><|vision_end|>` placeholders + pictures ->
    model inputs, as transformers' Qwen2VLProcessor / Qwen2_5_VLProcessor produce them."""

    image_token = IMAGE_TOKEN

    def __init__(self, tokenizer: Any, image_processor: QwenVLImageProcessor):
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        if self.image_token_id is None or self.image_token_id == getattr(tokenizer, "unk_token_id", object()):
            raise ValueError(
                f"tokenizer has no {self.image_token} token: it is not a Qwen2-VL / Qwen2.5-VL tokenizer"
            )

    @classmethod
    def from_folder(cls, folder: str | os.PathLike) -> "QwenVLProcessor":
        """A hub `processor/` folder: tokenizer files (read with the `tokenizers` library into a
        QwenTokenizer, the ids transformers' AutoTokenizer gives) and preprocessor_config.json."""
        folder = Path(folder)
        image_processor = QwenVLImageProcessor.from_folder(folder)
        if not any((folder / name).is_file() for name in TOKENIZER_FILES):
            raise FileNotFoundError(
                f"{folder}: no tokenizer files ({', '.join(TOKENIZER_FILES)}). The processor folder "
                "needs the Qwen2.5-VL tokenizer beside preprocessor_config.json: download the whole "
                "`processor/` folder, or copy the repo's `tokenizer/` files into it."
            )
        # its errors name the file, what is wrong with it and how to get a good one
        return cls(QwenTokenizer.from_folder(folder), image_processor)

    def expand_placeholders(self, texts: Sequence[str], grids: torch.Tensor | None) -> list[str]:
        """Each `<|image_pad|>` (in order, across the batch) -> one copy per merged patch."""
        counts = [text.count(self.image_token) for text in texts]
        n_images = 0 if grids is None else len(grids)
        if sum(counts) != n_images:
            raise ValueError(
                f"the prompts hold {sum(counts)} {self.image_token} placeholder(s) but {n_images} "
                f"image(s) were given: write one {VISION_START_TOKEN}{self.image_token}{VISION_END_TOKEN} "
                "per picture, in the order of the pictures"
            )
        if n_images == 0:
            return list(texts)
        merge = self.image_processor.merge_size**2
        tokens = iter(int(g.prod()) // merge for g in grids)
        out = []
        for text in texts:
            parts = text.split(self.image_token)
            expanded = [parts[0]]
            for part in parts[1:]:
                expanded.append(self.image_token * next(tokens))
                expanded.append(part)
            out.append("".join(expanded))
        return out

    def __call__(
        self,
        text: str | Sequence[str],
        images: Sequence[Any] | None = None,
        padding: bool | str = True,
    ) -> ProcessorOutput:
        """-> {"input_ids", "attention_mask"} (B, L) int64, plus {"pixel_values" float32,
        "image_grid_thw" int64} when there are images. `padding` is passed to the tokenizer
        (True pads to the longest prompt, the tokenizer's padding side)."""
        texts = [text] if isinstance(text, str) else list(text)
        if not texts or not all(isinstance(t, str) for t in texts):
            raise TypeError("text: expected a string or a non-empty list of strings")
        if images is not None and not isinstance(images, (list, tuple)):
            images = [images]
        if images is not None and len(images) == 0:
            images = None
        pixel_values = grids = None
        if images is not None:
            pixel_values, grids = self.image_processor(images)
        expanded = self.expand_placeholders(texts, grids)
        encoded = self.tokenizer(expanded, padding=padding, return_tensors="pt")
        out = ProcessorOutput(input_ids=encoded["input_ids"], attention_mask=encoded["attention_mask"])
        if images is not None:
            found = int((out["input_ids"] == self.image_token_id).sum())
            expected = int(sum(int(g.prod()) for g in grids)) // self.image_processor.merge_size**2
            if found != expected:
                raise ValueError(
                    f"tokenizing gave {found} {self.image_token} tokens for {expected} image patches: "
                    "the tokenizer splits the image token (is it the Qwen2.5-VL tokenizer?)"
                )
            out["pixel_values"] = pixel_values
            out["image_grid_thw"] = grids
        return out
