"""DiffSynth-Studio's Blockwise ControlNet for Qwen-Image 1.x, in plain torch.

The published checkpoints `DiffSynth-Studio/Qwen-Image-Blockwise-ControlNet-Canny`, `-Depth` and
`-Inpaint` (one `model.safetensors` each, no config.json) hold exactly the state dict of DiffSynth's
`QwenImageBlockWiseControlNet` (diffsynth/models/qwen_image_controlnet.py; its entry in
diffsynth/configs/model_configs.py names no state-dict converter, so the file's keys are the
module's):

    img_in.weight                          (3072, 64)   canny / depth;  (3072, 68) inpaint
    img_in.bias                            (3072,)
    controlnet_blocks.N.x_rms.weight       (3072,)      N = 0 .. 59, one per DiT block
    controlnet_blocks.N.y_rms.weight       (3072,)
    controlnet_blocks.N.input_proj.weight  (3072, 3072)
    controlnet_blocks.N.input_proj.bias    (3072,)
    controlnet_blocks.N.output_proj.weight (3072, 3072)
    controlnet_blocks.N.output_proj.bias   (3072,)

(defaults `num_layers=60, in_dim=64, dim=3072`; the inpaint entry adds `additional_in_dim=4`).
DiffSynth recognises the files by an MD5 of their sorted `key:shape` list; the two hashes it
lists (073bce9c... canny/depth, a9e54e48... inpaint) are reproduced from this layout in
tests/test_blockwise_controlnet.py. Canny and Depth share the layout: only the pictures they
were trained on differ. The inpaint variant is told apart by `img_in`'s 68 input channels.

The math (DiffSynth's `QwenImageBlockWiseControlNet`, `BlockWiseControlBlock`, and
`QwenImageBlockwiseMultiControlNet` in diffsynth/pipelines/qwen_image.py):

    c   = img_in(packed control latents)                            once per generation
    r_N = output_proj(gelu(input_proj(x_rms(h_N) + y_rms(c)))) * scale
    h_N <- h_N + sum over the inputs of r_N                         after DiT block N

where h_N is the image stream leaving DiT block N (the generated image's tokens only: an edit's
reference-picture tokens after them get nothing), `gelu` is the exact (erf) GELU and the RMS
norms compute their statistic in float32, round to the computation dtype, then multiply by
their weight (two roundings, as DiffSynth's `RMSNorm`).

How a pipeline calls it
-----------------------
1. The condition, once per generation and input (the same in every step and CFG branch):
   the control picture at the generation size, in [-1, 1] as for `input_image`
   (`image_to_tensor`), VAE-encoded like an img2img source (posterior mean, normalised with
   latents_mean / latents_std), packed 2x2 (`pack_latents`: (1, L, 64)). For the inpaint
   variant the picture is first blacked out where the mask is set (`mask_control_picture`) and
   the keep-mask at latent resolution (`inpaint_keep_mask`, 1 = keep, 0 = repaint), packed the
   same way ((1, L, 4)), rides beside the latents: `net.condition(latents, keep_mask)` ->
   (1, L, dim) in the net's computation dtype.
2. After every double-stream block N of the DiT, for each input on this net that is active in
   this step: `net.block_residual(N, img, condition, scale)` -> (B, L, dim); add the sum of the
   inputs' residuals to the first L image tokens: `img[:, :L] = img[:, :L] + residual_sum`
   (DiffSynth sums the inputs' residuals first, then adds). `img` is the DiT's image stream in
   its computation dtype; a condition of batch 1 broadcasts over a CFG batch of 2. Both CFG
   branches get the residual. The net has as many blocks as the DiT and its width
   (`check_fits`). `scale=0` gives an exact zero (the plain image), with no block computed.
3. `start` / `end` (DiffSynth's `ControlNetInput`, fractions of the schedule counted from the
   noisy end): an input takes part in step i (0-based) of the N steps when
   `end - 1e-4 <= (N - 1 - i) / max(N - 1, 1) <= start + 1e-4`; the default start=1, end=0 is
   every step.

Every projection is an `nn.Linear` called as a module and every norm a module with its weight,
so VRAM management and hot LoRA can wrap the layers from outside.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

LATENT_CHANNELS = 64  # a packed 2x2 patch of the 16-channel VAE latent
INPAINT_CHANNELS = 4  # the packed keep-mask beside it (the -Inpaint variant)


@dataclass
class BlockwiseControlNetParams:
    """DiffSynth's constructor arguments; the defaults are those of the published checkpoints."""

    num_layers: int = 60
    in_dim: int = LATENT_CHANNELS
    additional_in_dim: int = 0  # INPAINT_CHANNELS for the inpaint variant
    dim: int = 3072
    eps: float = 1e-6

    def __post_init__(self) -> None:
        for name in ("num_layers", "in_dim", "dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"BlockwiseControlNetParams.{name} must be a positive int, got {value!r}")
        if self.in_dim != LATENT_CHANNELS or self.additional_in_dim not in (0, INPAINT_CHANNELS):
            raise ValueError(
                f"Blockwise ControlNet: img_in takes {self.in_dim + self.additional_in_dim} channels; the published "
                f"nets take {LATENT_CHANNELS} (packed VAE latents: canny, depth) or "
                f"{LATENT_CHANNELS + INPAINT_CHANNELS} (latents and the packed mask: inpaint)")

    @property
    def inpaint(self) -> bool:
        return self.additional_in_dim == INPAINT_CHANNELS

    @property
    def inner_dim(self) -> int:
        """The width of the DiT image stream the net adds to."""
        return self.dim

    @property
    def condition_channels(self) -> int:
        """Channels per token of what `condition` reads: the packed latents, and the packed
        keep-mask for the inpaint variant."""
        return self.in_dim + self.additional_in_dim


class ControlRMSNorm(nn.Module):
    """DiffSynth's RMSNorm: x / rms(x) with the statistic in float32, rounded to x's dtype, then
    times the weight (in x's dtype)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x, (x.shape[-1],), eps=self.eps) * self.weight.to(x.dtype)


class BlockwiseControlBlock(nn.Module):
    """`output_proj(gelu(input_proj(x_rms(x) + y_rms(y))))`: the residual for one DiT block."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.x_rms = ControlRMSNorm(dim, eps)
        self.y_rms = ControlRMSNorm(dim, eps)
        self.input_proj = nn.Linear(dim, dim)
        self.output_proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return self.output_proj(F.gelu(self.input_proj(self.x_rms(x) + self.y_rms(y))))


# The checkpoint's key grammar, exact: the DiT's file shares `img_in.*`, and InstantX's ControlNets
# have `controlnet_blocks.N.weight` / `.bias` (one linear per block), which are not ours.
_OWNED_KEY = re.compile(
    r"^(?:img_in\.(?:weight|bias)"
    r"|controlnet_blocks\.\d+\.(?:[xy]_rms\.weight|(?:input_proj|output_proj)\.(?:weight|bias)))$")
_BLOCK_KEY = re.compile(r"^controlnet_blocks\.(\d+)\.")


class QwenImageBlockwiseControlNet(nn.Module):
    """DiffSynth's Blockwise ControlNet: a residual for every DiT block's image stream (see the
    module docstring for how a pipeline calls it)."""

    CHECKPOINT_REQUIRED_KEYS: tuple[str, ...] = (
        "img_in.weight",
        "controlnet_blocks.0.x_rms.weight",
        "controlnet_blocks.0.y_rms.weight",
        "controlnet_blocks.0.input_proj.weight",
        "controlnet_blocks.0.output_proj.weight",
    )

    def __init__(self, params: BlockwiseControlNetParams | None = None):
        super().__init__()
        self.params = p = params or BlockwiseControlNetParams()
        self.img_in = nn.Linear(p.in_dim + p.additional_in_dim, p.dim)
        self.controlnet_blocks = nn.ModuleList([BlockwiseControlBlock(p.dim, p.eps) for _ in range(p.num_layers)])

    # Set this when the weights are stored in another dtype than the one to compute in (FP8
    # storage under VRAM management); None = compute in the weights' dtype.
    compute_dtype: torch.dtype | None = None

    @property
    def dtype(self) -> torch.dtype:
        """The computation dtype (inputs are cast to it, the outputs have it)."""
        return self.compute_dtype or self.img_in.weight.dtype

    @property
    def inpaint(self) -> bool:
        """Whether this is the inpaint variant (its condition carries the keep-mask)."""
        return self.params.inpaint

    def check_fits(self, inner_dim: int, num_layers: int) -> None:
        """ValueError unless this net fits a DiT of this width and block count (the caller names
        the files)."""
        p = self.params
        if p.dim != inner_dim or p.num_layers != num_layers:
            raise ValueError(
                f"the Blockwise ControlNet is {p.dim} wide with {p.num_layers} blocks, the DiT {inner_dim} wide with "
                f"{num_layers} blocks: the ControlNet was made for another model. Use a ControlNet trained for "
                "this DiT")

    def condition(self, control_latents: Tensor, keep_mask: Tensor | None = None) -> Tensor:
        """(B, L, 64) packed VAE latents of the control picture, and for the inpaint variant
        (B, L, 4) the packed keep-mask -> (B, L, dim), what every block reads."""
        p = self.params
        if control_latents.ndim != 3 or control_latents.shape[-1] != p.in_dim:
            raise ValueError(f"Blockwise ControlNet: control latents must be (batch, tokens, {p.in_dim}) packed VAE "
                             f"latents, got {tuple(control_latents.shape)}")
        if p.inpaint != (keep_mask is not None):
            raise ValueError(
                "Blockwise ControlNet: the inpaint variant needs an inpaint mask with its picture (ControlNetInput("
                "image=..., inpaint_mask=...))" if p.inpaint else
                "Blockwise ControlNet: this net is not the inpaint variant (its img_in takes 64 channels), so it "
                "takes no inpaint mask; give the mask to an -Inpaint net, or leave it out")
        if keep_mask is not None:
            if keep_mask.shape != (*control_latents.shape[:2], p.additional_in_dim):
                raise ValueError(f"Blockwise ControlNet: the packed keep-mask must be "
                                 f"{(*control_latents.shape[:2], p.additional_in_dim)} (the latents' batch and "
                                 f"tokens), got {tuple(keep_mask.shape)}")
            control_latents = torch.cat([control_latents, keep_mask.to(control_latents.dtype)], dim=-1)
        return self.img_in(control_latents.to(self.dtype))

    def block_residual(self, index: int, image_hidden: Tensor, condition: Tensor, scale: float = 1.0) -> Tensor:
        """The residual (B, L, dim) for the first L = condition.shape[1] tokens of the image
        stream `image_hidden` (B, >= L, dim) leaving DiT block `index`, times `scale`."""
        length = condition.shape[1]
        if image_hidden.ndim != 3 or image_hidden.shape[1] < length or image_hidden.shape[-1] != self.params.dim:
            raise ValueError(f"Blockwise ControlNet: the image stream must be (batch, >= {length} tokens, "
                             f"{self.params.dim}), got {tuple(image_hidden.shape)}; the control picture must have "
                             "the generated image's size")
        x = image_hidden[:, :length].to(self.dtype)
        if scale == 0:
            return torch.zeros_like(x)
        out = self.controlnet_blocks[index](x, condition)
        return out if scale == 1 else out * scale

    # -- checkpoint contract (pipelines.core.checkpoint.CheckpointModel) ------------------------

    @staticmethod
    def owns_checkpoint_key(key: str) -> bool:
        return _OWNED_KEY.match(key) is not None

    @staticmethod
    def convert_checkpoint_key(key: str) -> str | None:
        return key  # DiffSynth's layout is ours

    @classmethod
    def from_checkpoint(cls, shapes: Mapping[str, tuple[int, ...]],
                        config: dict[str, Any] | None) -> "QwenImageBlockwiseControlNet":
        # the published files come without a config.json: everything follows from the shapes,
        # and every key and shape is then checked by the loader, which names the file
        return cls(params_from_checkpoint(shapes))


def params_from_checkpoint(shapes: Mapping[str, tuple[int, ...]]) -> BlockwiseControlNetParams:
    """The sizes from the tensor shapes: width and input channels from `img_in.weight`, the block
    count from the `controlnet_blocks.N` indices (0..N-1)."""
    blocks = {int(m.group(1)) for k in shapes if (m := _BLOCK_KEY.match(k))}
    if not blocks or blocks != set(range(len(blocks))):
        missing = sorted(set(range(max(blocks, default=0) + 1)) - blocks)[:10]
        raise ValueError(f"Blockwise ControlNet checkpoint: the controlnet_blocks indices are not 0..N-1 (missing "
                         f"{missing}); the file is incomplete")
    shape = tuple(shapes.get("img_in.weight", ()))
    if len(shape) != 2:
        raise ValueError(f"Blockwise ControlNet checkpoint: 'img_in.weight' must be 2-D, got {shape}")
    dim, channels = shape
    return BlockwiseControlNetParams(num_layers=len(blocks), in_dim=LATENT_CHANNELS,
                                     additional_in_dim=channels - LATENT_CHANNELS, dim=dim)


# ----------------------------------------------------------------------------------------------
# The inpaint variant's inputs (DiffSynth's QwenImageUnit_BlockwiseControlNet)
# ----------------------------------------------------------------------------------------------


def mask_control_picture(picture: Tensor, mask: Tensor) -> Tensor:
    """The control picture (B, 3, H, W) in [-1, 1] made black (-1) where the mask (B, 1 or 3,
    H, W) in [0, 1], averaged over its channels, is above one half: the picture the inpaint
    net's latents are encoded from."""
    if mask.shape[-2:] != picture.shape[-2:]:
        raise ValueError(f"Blockwise ControlNet: the inpaint mask is {tuple(mask.shape[-2:])} pixels, the control "
                         f"picture {tuple(picture.shape[-2:])}; resize the mask to the picture's size")
    return picture.masked_fill(mask.mean(dim=1, keepdim=True) > 0.5, -1.0)


def inpaint_keep_mask(mask: Tensor, latent_height: int, latent_width: int) -> Tensor:
    """The mask (B, 1 or 3, H, W) in [0, 1] (1 = repaint) -> (B, 1, latent_height, latent_width)
    keep-mask (1 = keep): channel mean, nearest-neighbour to the latent grid, 1 - mask. Pack it
    2x2 like the latents for `condition`."""
    mask = mask.mean(dim=1, keepdim=True)
    return 1 - F.interpolate(mask, size=(latent_height, latent_width), mode="nearest")
