"""Flow matching restricted to one expert's timestep range.

x_t = (1 - s) * x0 + s * noise, target = noise - x0, t = 1000 * s, with s drawn from the
shifted schedule s = shift * u / (1 + (shift - 1) * u), u ~ U(0, 1).

The sampler hands a step to the high-noise expert when t >= boundary * 1000 (t being
the scheduler's shifted timestep), else to the low-noise expert. Training uses exactly
that rule: u is drawn only from the part of (0, 1) whose shifted t falls on the
expert's side, so an expert never learns a range it never sees at inference.
"""
from __future__ import annotations

import torch

NUM_TRAIN_TIMESTEPS = 1000


def shift_sigma(u: torch.Tensor, shift: float) -> torch.Tensor:
    return shift * u / (1 + (shift - 1) * u)


def unshift_sigma(s: float, shift: float) -> float:
    """Inverse of shift_sigma."""
    return s / (shift - (shift - 1) * s)


def uses_high_expert(t: torch.Tensor, boundary: float) -> torch.Tensor:
    """The sampler's switch: the high-noise expert runs steps with t >= boundary * 1000."""
    return t >= boundary * NUM_TRAIN_TIMESTEPS


def sample_timesteps(n: int, expert: str, boundary: float, shift: float, generator: torch.Generator) -> torch.Tensor:
    """`n` float32 timesteps in [0, 1000] on `expert`'s side of the boundary."""
    u_b = unshift_sigma(boundary, shift)  # u whose shifted timestep is the boundary
    lo, hi = (u_b, 1.0) if expert == "high" else (0.0, u_b)
    u = lo + (hi - lo) * torch.rand(n, generator=generator, dtype=torch.float64)
    t = (shift_sigma(u, shift) * NUM_TRAIN_TIMESTEPS).float()
    # float32 rounding may carry a t across the boundary: move it back by one ulp
    edge = torch.tensor(boundary * NUM_TRAIN_TIMESTEPS, dtype=torch.float32)
    if expert == "high":
        return torch.where(uses_high_expert(t, boundary), t, edge)
    return torch.where(uses_high_expert(t, boundary), edge.nextafter(torch.tensor(0.0)), t)


def noisy_latents(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_t, target) for latents x0 (B, C, F, H, W) at timesteps t (B,)."""
    s = (t / NUM_TRAIN_TIMESTEPS).to(x0.dtype).view(-1, *([1] * (x0.dim() - 1)))
    return (1 - s) * x0 + s * noise, noise - x0
