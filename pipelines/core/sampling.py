"""Sampling: the flow-matching sigma schedule, the Euler step, classifier-free guidance and the
denoising loop every family pipeline runs (small plain functions, as in flux's sampling.py)."""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch
from tqdm import tqdm

from .parse import finite


class NonFiniteError(FloatingPointError):
    """The latents became NaN or infinite: decoding them would give a black image."""


@dataclass(frozen=True)
class FlowMatchScheduler:
    """Dynamic exponential time shift, interpolated on the image sequence length, then an
    optional stretch so the last sigma equals `shift_terminal`. Defaults: Qwen-Image's own
    scheduler_config.json. `lightning()` (mu = ln 3 at every size, no stretch) is the schedule
    the Lightning LoRAs were distilled with."""

    base_shift: float = 0.5
    max_shift: float = 0.9
    base_seq_len: int = 256
    max_seq_len: int = 8192
    shift_terminal: float | None = 0.02

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None:
                finite(value, f"FlowMatchScheduler.{f.name}")
        if self.max_seq_len <= self.base_seq_len:
            raise ValueError(f"FlowMatchScheduler: max_seq_len ({self.max_seq_len}) must exceed base_seq_len "
                             f"({self.base_seq_len}).")
        if self.shift_terminal is not None and not 0.0 <= self.shift_terminal < 1.0:
            raise ValueError(f"FlowMatchScheduler.shift_terminal must be in [0, 1) or None, got {self.shift_terminal}.")

    @classmethod
    def lightning(cls) -> "FlowMatchScheduler":
        return cls(base_shift=math.log(3), max_shift=math.log(3), shift_terminal=None)

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "FlowMatchScheduler":
        """From a diffusers FlowMatchEulerDiscreteScheduler config (scheduler_config.json)."""
        if config.get("use_dynamic_shifting") is False or config.get("time_shift_type", "exponential") != "exponential":
            raise ValueError("FlowMatchScheduler reproduces the dynamic exponential shift only "
                             "(use_dynamic_shifting=true, time_shift_type=exponential).")
        return cls(base_shift=config.get("base_shift", 0.5), max_shift=config.get("max_shift", 0.9),
                   base_seq_len=config.get("base_image_seq_len", 256),
                   max_seq_len=config.get("max_image_seq_len", 8192),
                   shift_terminal=config.get("shift_terminal") or None)

    def mu(self, image_seq_len: int) -> float:
        slope = (self.max_shift - self.base_shift) / (self.max_seq_len - self.base_seq_len)
        return self.base_shift + slope * (image_seq_len - self.base_seq_len)

    def sigmas(self, num_steps: int, image_seq_len: int, mu: float | None = None) -> torch.Tensor:
        """num_steps + 1 float32 sigmas from ~1 down to the terminal value, then 0."""
        if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
            raise ValueError(f"num_inference_steps must be an integer >= 1, got {num_steps!r}.")
        return self.shift_grid(torch.linspace(1.0, 1.0 / num_steps, num_steps, dtype=torch.float64), image_seq_len, mu)

    def shift_grid(self, grid: torch.Tensor | Sequence[float], image_seq_len: int,
                   mu: float | None = None) -> torch.Tensor:
        """A grid of sigmas in (0, 1] without the terminal 0 (`sigmas` uses the linear one; a
        distilled model may ship its own) -> float32 sigmas shifted and stretched as `sigmas`
        does it, then 0: diffusers' `set_timesteps(sigmas=grid, mu=...)`."""
        mu = self.mu(image_seq_len) if mu is None else finite(mu, "exponential_shift_mu")
        sigmas = torch.as_tensor(grid, dtype=torch.float64).flatten()
        sigmas = math.exp(mu) / (math.exp(mu) + (1.0 / sigmas - 1.0))
        if self.shift_terminal and sigmas[-1] < 1.0:  # one step: sigma 1 cannot be stretched
            one_minus = 1.0 - sigmas
            sigmas = 1.0 - one_minus / (one_minus[-1] / (1.0 - self.shift_terminal))
        return torch.cat([sigmas, sigmas.new_zeros(1)]).float()


def euler_step(latents: torch.Tensor, velocity: torch.Tensor, sigma: float, sigma_next: float) -> torch.Tensor:
    """One Euler step of the flow ODE, in float32 whatever the model's dtype."""
    return latents.float() + (sigma_next - sigma) * velocity.float()


def guide(cond: torch.Tensor, uncond: torch.Tensor, scale: float, norm_rescale: bool) -> torch.Tensor:
    """True classifier-free guidance; optionally keep the conditional prediction's norm per token."""
    guided = uncond + scale * (cond - uncond)
    if norm_rescale:
        guided = guided * (cond.norm(dim=-1, keepdim=True) / guided.norm(dim=-1, keepdim=True))
    return guided


# (latents, timestep (1,) on the device) -> (conditional velocity, unconditional velocity or None)
Velocity = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, "torch.Tensor | None"]]


def denoise(velocity: Velocity, latents: torch.Tensor, sigmas: torch.Tensor, device: torch.device,
            cfg_scale: float = 1.0, cfg_norm_rescale: bool = True, progress_bar: bool = True,
            step_begin: Callable[[int], None] | None = None,
            step_end: Callable[[int, torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Integrate the flow from sigmas[0] to sigmas[-1] with Euler steps; where `velocity` gives
    an unconditional prediction too, guide with `cfg_scale`. `step_begin(i)` runs before step i's
    prediction (e.g. which ControlNets act), `step_end(i, latents)` after its Euler step returns the
    latents to go on with (e.g. inpainting's blend). Latents that stop being finite are an error
    naming the step (decoding them would give a black image)."""
    steps = len(sigmas) - 1
    for i in tqdm(range(steps), desc="Denoising", disable=not progress_bar):
        if step_begin is not None:
            step_begin(i)
        cond, uncond = velocity(latents, sigmas[i: i + 1].to(device))
        v = cond.float() if uncond is None else guide(cond.float(), uncond.float(), cfg_scale, cfg_norm_rescale)
        latents = euler_step(latents, v, sigmas[i].item(), sigmas[i + 1].item())
        if step_end is not None:
            latents = step_end(i, latents)
        if not bool(torch.isfinite(latents).all()):
            raise NonFiniteError(
                f"The latents became NaN or infinite at denoising step {i + 1} of {steps} (sigma "
                f"{sigmas[i].item():.4f}): the model produced non-finite values. Usual causes: float16 overflow "
                "(use bfloat16 or float32), a LoRA with extreme weights or alpha, corrupt weights. Nothing was "
                "decoded.")
    return latents
