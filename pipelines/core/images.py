"""Pictures <-> tensors, and the 2x2 packing of latents into tokens (MMDiT families)."""
from __future__ import annotations

from pathlib import Path
from typing import Union

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

ImageInput = Union[Image.Image, str, Path]  # a picture, or the path of an image file


def open_image(image: ImageInput, what: str = "image") -> Image.Image:
    """A PIL image as RGB; a path is opened (an unreadable file is an error naming it)."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, (str, Path)):
        try:
            with Image.open(image) as opened:
                return opened.convert("RGB")
        except FileNotFoundError:
            raise FileNotFoundError(f"{what}: no such file {str(image)!r}. Check the path.") from None
        except (UnidentifiedImageError, OSError) as error:
            raise ValueError(f"{what}: {str(image)!r} is not a readable image ({error}). Give a PNG, JPEG or WebP "
                             "file.") from None
    raise TypeError(f"{what} must be a PIL.Image or the path of an image file, got {type(image).__name__}.")


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
