"""The flow-matching sampler: sigma schedule and Euler step (REFERENCE.md, "Sampling")."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class FlowMatchScheduler:
    """Dynamic exponential time shift, interpolated on the image sequence length, then an
    optional stretch so the last sigma equals `shift_terminal`. Defaults: Qwen-Image's own
    scheduler_config.json."""

    base_shift: float = 0.5
    max_shift: float = 0.9
    base_seq_len: int = 256
    max_seq_len: int = 8192
    shift_terminal: float | None = 0.02

    @classmethod
    def lightning(cls) -> "FlowMatchScheduler":
        """Qwen-Image-Lightning's schedule: mu = ln 3 at every size, no terminal stretch."""
        return cls(base_shift=math.log(3), max_shift=math.log(3), shift_terminal=None)

    def mu(self, image_seq_len: int) -> float:
        slope = (self.max_shift - self.base_shift) / (self.max_seq_len - self.base_seq_len)
        return self.base_shift + slope * (image_seq_len - self.base_seq_len)

    def sigmas(self, num_steps: int, image_seq_len: int, mu: float | None = None) -> torch.Tensor:
        """num_steps + 1 float32 sigmas from ~1 down to the terminal value, then 0."""
        if num_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_steps}.")
        mu = self.mu(image_seq_len) if mu is None else mu
        sigmas = torch.linspace(1.0, 1.0 / num_steps, num_steps, dtype=torch.float64)
        sigmas = math.exp(mu) / (math.exp(mu) + (1.0 / sigmas - 1.0))
        if self.shift_terminal and sigmas[-1] < 1.0:  # one step: sigma 1 cannot be stretched
            one_minus = 1.0 - sigmas
            sigmas = 1.0 - one_minus / (one_minus[-1] / (1.0 - self.shift_terminal))
        return torch.cat([sigmas, sigmas.new_zeros(1)]).float()


def euler_step(latents: torch.Tensor, velocity: torch.Tensor, sigma: float, sigma_next: float) -> torch.Tensor:
    """One Euler step of the flow ODE, in float32 whatever the model's dtype."""
    return latents.float() + (sigma_next - sigma) * velocity.float()
