"""Pictures <-> tensors, and the 2x2 packing of latents into tokens (MMDiT families).

`open_picture` is the one reader of every picture the library takes (and the runner's too):
a path (a regular file only) or a PIL image in memory, read as it looks. See docs/editing.md,
"How pictures are read".
"""
from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Union

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .files import regular_file
from .parse import SettingError

ImageInput = Union[Image.Image, str, Path]  # a picture, or the path of an image file

logger = logging.getLogger(__name__)

# Pillow refuses pictures above PIL.Image.MAX_IMAGE_PIXELS (a small file can declare a size that
# fills the memory when decoded); this variable sets that limit for the library's reader.
MAX_PIXELS_VARIABLE = "DIFFSYNTH_MAX_IMAGE_PIXELS"
_OPEN_LOCK = threading.Lock()
_WARNED_FRAMES: set[tuple] = set()  # (file, its mtime and size): a multi-frame warning once per process
WHITE = (255, 255, 255, 255)


class PictureError(SettingError):
    """A picture that cannot be used: not a readable image, too large, values no picture has, an
    unsupported mode. The message names the argument, the file and the fix."""


def open_picture(image: ImageInput, what: str = "picture", alpha: bool = False) -> Image.Image:
    """A picture as it looks, as a new 8-bit RGB image (RGBA with `alpha=True` when it has
    transparency: the caller composites it itself). A path must name a regular file; a PIL image
    in memory goes through the same steps but the file checks:

    - EXIF orientation applied (PIL.ImageOps.exif_transpose);
    - 16-bit and 32-bit grey levels (I;16, I;16B, I, F) scaled to 8 bit over their range
      (65535 for I;16*; for I and F the range the values use: [0, 1] (F), [0, 255] or [0, 65535]);
    - palette, grey, grey+alpha, CMYK, YCbCr by PIL's conversions; a palette or colour key with
      transparency becomes RGBA, and without `alpha` transparency is composited onto white;
    - an animation: its first frame (a PIL image in memory: the frame it is at), with a warning
      naming the file and the number of frames;
    - more pixels than PIL.Image.MAX_IMAGE_PIXELS (or $DIFFSYNTH_MAX_IMAGE_PIXELS): PictureError
      before anything is decoded."""
    if isinstance(image, Image.Image):
        return _normalise(image, what, alpha, None)
    if isinstance(image, (str, os.PathLike)):
        path = regular_file(image, what, PictureError)
        with _open(path, what) as opened:
            return _normalise(opened, what, alpha, path)
    raise PictureError(f"{what} must be a PIL.Image or the path of an image file, got {type(image).__name__} "
                       f"{image!r}.")


def pixel_limit() -> int | None:
    """The most pixels a picture file may declare: $DIFFSYNTH_MAX_IMAGE_PIXELS when set (0: no
    limit), else PIL.Image.MAX_IMAGE_PIXELS (None: no limit)."""
    raw = os.environ.get(MAX_PIXELS_VARIABLE, "").strip()
    if not raw:
        return Image.MAX_IMAGE_PIXELS
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value < 0:
        raise SettingError(f"{MAX_PIXELS_VARIABLE}={raw!r} is not a pixel count: give a non-negative integer "
                           "(0 = no limit), or unset it for Pillow's limit.")
    return value or None


def _open(path: Path, what: str) -> Image.Image:
    """Image.open (headers only) with the pixel limit checked here, naming the file and the
    override. Pillow's own check is off while it opens: it would raise (above twice its limit)
    or warn without the file's name, and it cannot be raised above its global per call."""
    limit = pixel_limit()
    try:
        with _OPEN_LOCK:
            saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
            try:
                opened = Image.open(path)
            finally:
                Image.MAX_IMAGE_PIXELS = saved
    except Exception as error:  # Pillow's format plugins raise many types for a broken file
        why = str(error) if isinstance(error, UnidentifiedImageError) else f"{type(error).__name__}: {error}"
        raise PictureError(f"{what}: {str(path)!r} is not a readable image ({why}). Give a PNG, JPEG or WebP "
                           "file.") from None
    pixels = opened.width * opened.height
    if limit is not None and pixels > limit:
        opened.close()
        raise PictureError(
            f"{what}: {str(path)!r} declares {opened.width}x{opened.height} = {pixels:,} pixels, above the limit of "
            f"{limit:,} (Pillow's guard against decompression bombs: a small file that would fill the memory). "
            f"If the picture is genuine, raise the limit: {MAX_PIXELS_VARIABLE}={pixels} in the environment (0 = "
            "no limit), or PIL.Image.MAX_IMAGE_PIXELS in Python; or give a smaller picture.")
    return opened


def _normalise(image: Image.Image, what: str, alpha: bool, path: Path | None) -> Image.Image:
    """The steps of `open_picture` on an opened or given image; `path` None: one in memory."""
    source = "the picture given" if path is None else repr(str(path))
    frames = getattr(image, "n_frames", 1)
    if frames > 1:
        _warn_frames(image, what, path, frames)
    try:
        upright = ImageOps.exif_transpose(image)  # a new image (a copy when there is no orientation)
        return _colours(_eight_bit(upright, what, source), alpha)
    except PictureError:
        raise
    except Exception as error:  # a truncated file, broken EXIF, a mode PIL cannot convert
        raise PictureError(f"{what}: {source} cannot be read as a picture ({type(error).__name__}: {error}). Save "
                           "it as an 8-bit RGB PNG or JPEG.") from None


def _warn_frames(image: Image.Image, what: str, path: Path | None, frames: int) -> None:
    if path is None:
        logger.warning("%s: the picture given has %d frames (an animation); frame %d, the one it is at, is used.",
                       what, frames, image.tell() + 1)
        return
    info = os.stat(path)
    key = (os.path.realpath(path), info.st_mtime_ns, info.st_size)
    if key in _WARNED_FRAMES:  # the runner checks the arguments before the call, which checks them again
        return
    _WARNED_FRAMES.add(key)
    logger.warning("%s: %r has %d frames (an animation); its first frame is used. To use another, save that "
                   "frame as a picture of its own.", what, str(path), frames)


def _eight_bit(image: Image.Image, what: str, source: str) -> Image.Image:
    """High bit depth grey (I;16*, I, F) -> 8-bit L, scaled over its range, never clipped."""
    mode = image.mode
    if not (mode.startswith("I;16") or mode in ("I", "F")):
        return image
    values = np.asarray(image).astype(np.float64)
    full = _full_scale(mode, values, what, source)
    return Image.fromarray(np.round(values * (255.0 / full)).astype(np.uint8), "L")


def _full_scale(mode: str, values: np.ndarray, what: str, source: str) -> float:
    if mode.startswith("I;16") and not mode.startswith("I;16S"):
        return 65535.0
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if not np.isfinite(values).all() or low < 0 or high > 65535:
        raise PictureError(f"{what}: {source} is a {mode} picture with values from {low:g} to {high:g}; a picture's "
                           "grey levels lie in [0, 1], [0, 255] or [0, 65535]. Save it as an 8- or 16-bit PNG.")
    if mode == "F" and high <= 1.0:
        return 1.0
    return 255.0 if high <= 255 else 65535.0


def _colours(image: Image.Image, alpha: bool) -> Image.Image:
    """-> RGB, or RGBA when `alpha` and the picture has transparency (PIL's conversions)."""
    transparent = "A" in image.getbands() or "a" in image.getbands() or "transparency" in image.info
    if not transparent:
        return image.convert("RGB") if image.mode != "RGB" else image
    rgba = image.convert("RGBA")
    if rgba.getextrema()[3][0] == 255:  # fully opaque after all
        return rgba.convert("RGB")
    return rgba if alpha else to_rgb(rgba)


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB; transparency composited onto white (what transformers' convert_to_rgb does)."""
    if image.mode == "RGB":
        return image
    if image.mode == "RGBA":
        return Image.alpha_composite(Image.new("RGBA", image.size, WHITE), image).convert("RGB")
    return image.convert("RGB")


def image_to_tensor(image: Image.Image, height: int, width: int, alpha: bool = False) -> torch.Tensor:
    """PIL image -> (1, 3, H, W) in [-1, 1], resized (Lanczos) to the generation size. With
    `alpha`, (1, 4, H, W) RGBA with straight alpha (an opaque picture gets alpha 1.0): for VAEs
    that read transparency (Qwen-Image 2.1's)."""
    if alpha:
        image = image if image.mode == "RGBA" else image.convert("RGBA")
    else:
        image = to_rgb(image)
    if image.size != (width, height):
        image = image.resize((width, height), resample=Image.LANCZOS)
    array = np.asarray(image, dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1)[None] * 2.0 - 1.0


def mask_to_tensor(mask: Image.Image, height: int, width: int) -> torch.Tensor:
    """A mask picture -> (1, 1, H, W) float32 of 0 (keep) and 1 (repaint), as diffusers' mask
    processor makes it: resized (Lanczos) to the generation size, to grey, 1 where >= 0.5."""
    if mask.size != (width, height):
        mask = mask.resize((width, height), resample=Image.LANCZOS)
    grey = np.asarray(mask.convert("L"), dtype=np.float32) / 255.0
    return torch.from_numpy((grey >= 0.5).astype(np.float32))[None, None]


def gaussian_blur(mask: torch.Tensor, size: int, sigma: float) -> torch.Tensor:
    """(B, C, H, W) blurred with a Gaussian kernel of 2 * size + 1 taps and `sigma`, borders
    reflected (torchvision's GaussianBlur, which DiffSynth-Studio uses for inpaint_blur_size/sigma)."""
    if size == 0:
        return mask
    x = torch.linspace(-size, size, 2 * size + 1, dtype=torch.float32, device=mask.device)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    kernel = (kernel / kernel.sum()).to(mask.dtype)
    channels = mask.shape[1]
    mode = "reflect" if size < min(mask.shape[-2:]) else "replicate"
    out = torch.nn.functional.pad(mask, (size, size, size, size), mode=mode)
    out = torch.nn.functional.conv2d(out, kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1), groups=channels)
    return torch.nn.functional.conv2d(out, kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1), groups=channels)


def tensor_to_image(image: torch.Tensor) -> Image.Image:
    """(3, H, W) in [-1, 1] -> RGB PIL image; (4, H, W) -> RGBA."""
    array = ((image.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
    return Image.fromarray(array.permute(1, 2, 0).cpu().numpy())


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
