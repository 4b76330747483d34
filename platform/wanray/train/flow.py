"""Flow matching restricted to one expert's timestep range.

x_t = (1 - s) * x0 + s * noise, target = noise - x0, t = num_train_timesteps * s, with s drawn
from the shifted schedule s = shift * u / (1 + (shift - 1) * u), u ~ U(0, 1).

The sampler hands a step to the high-noise expert by the contract's switch rule
(`WanContract.uses_high_expert`: t >= boundary * 1000, t the scheduler's shifted timestep).
Training uses exactly that rule: u is drawn only from the part of (0, 1) whose shifted t falls
on the expert's side, so an expert never learns a range it never sees at inference.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from wanray.wan import WanContract, clean_frame_mask, token_timesteps


def shift_sigma(u: torch.Tensor, shift: float) -> torch.Tensor:
    return shift * u / (1 + (shift - 1) * u)


def unshift_sigma(s: float, shift: float) -> float:
    """Inverse of shift_sigma."""
    return s / (shift - (shift - 1) * s)


def sample_timesteps(
    n: int, expert: str, contract: WanContract, shift: float, generator: torch.Generator
) -> torch.Tensor:
    """`n` float32 timesteps in [0, num_train_timesteps] on `expert`'s side of the boundary."""
    u_b = unshift_sigma(contract.boundary, shift)  # u whose shifted timestep is the boundary
    lo, hi = (u_b, 1.0) if expert == "high" else (0.0, u_b)
    u = lo + (hi - lo) * torch.rand(n, generator=generator, dtype=torch.float64)
    t = (shift_sigma(u, shift) * contract.num_train_timesteps).float()
    # float32 rounding may carry a t across the boundary: move it back by one ulp
    edge = torch.tensor(contract.boundary_timestep, dtype=torch.float32)
    if expert == "high":
        return torch.where(contract.uses_high_expert(t), t, edge)
    return torch.where(contract.uses_high_expert(t), edge.nextafter(torch.tensor(0.0)), t)


def band_timesteps(expert: str, contract: WanContract, shift: float, bands: int) -> torch.Tensor:
    """(bands,) float32 timesteps: the middle of each of `bands` equal slices of u over `expert`'s side, shifted
    as training draws them (the held-out loss's fixed timesteps, highest first)."""
    u_b = unshift_sigma(contract.boundary, shift)
    lo, hi = (u_b, 1.0) if expert == "high" else (0.0, u_b)
    u = hi - (hi - lo) * (torch.arange(bands, dtype=torch.float64) + 0.5) / bands
    return (shift_sigma(u, shift) * contract.num_train_timesteps).float()


def holdout_noise(seed: int, clip: int, band: int, shape: tuple[int, ...]) -> torch.Tensor:
    """The fixed noise of held-out clip `clip` (its index position) at timestep band `band`."""
    state = np.random.SeedSequence([seed, clip, band, 0x401D]).generate_state(1, dtype=np.uint64)[0] >> 1
    return torch.randn(shape, generator=torch.Generator().manual_seed(int(state)))


def noisy_latents(
    x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, num_train_timesteps: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_t, target) for latents x0 (B, C, F, H, W) at timesteps t (B,)."""
    s = (t / num_train_timesteps).to(x0.dtype).view(-1, *([1] * (x0.dim() - 1)))
    return (1 - s) * x0 + s * noise, noise - x0


@dataclass
class FlowDraw:
    """The random part of one micro-batch's loss."""

    timesteps: torch.Tensor
    """(B,) float32: exactly what the model is given and what x_t is built from."""
    noise: torch.Tensor
    """Like the latents, float32."""
    drop_caption: torch.Tensor
    """(B,) bool: train these clips on the empty-prompt embedding."""
    first_frame: torch.Tensor
    """(B,) bool: TI2V-5B trains these clips as image to video (first latent frame clean)."""


def batch_seed(seed: int, epoch: int, index: int) -> int:
    """Seed of the global batch `index` of `epoch`: its noise, timesteps and caption dropout are the
    same whichever rank draws them, so a resumed run (on any worker count) draws what the
    uninterrupted run drew."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1, dtype=np.uint64)[0] >> 1)


def draw_flow(
    latent_shape: tuple[int, ...],
    expert: str,
    contract: WanContract,
    shift: float,
    caption_dropout: float,
    seed: int,
    image_condition: float = 0.0,
) -> FlowDraw:
    gen = torch.Generator().manual_seed(seed)
    b = latent_shape[0]
    drop = torch.rand(b, generator=gen) < caption_dropout
    timesteps = sample_timesteps(b, expert, contract, shift, gen)
    noise = torch.randn(latent_shape, generator=gen)
    first_frame = torch.rand(b, generator=gen) < (image_condition if contract.kind.expand_timesteps else 0.0)
    # A clip of one latent frame (a still image) is never image-conditioned: its one frame would be the clean
    # condition, leaving nothing to learn and a loss of 0/0.
    first_frame &= latent_shape[2] > 1
    return FlowDraw(timesteps, noise, drop, first_frame)


def keep_first_frame(xt: torch.Tensor, x0: torch.Tensor, timesteps: torch.Tensor, first_frame: torch.Tensor):
    """TI2V-5B's image conditioning, as WanImageToVideoPipeline(expand_timesteps=True) samples it: for
    the clips flagged in `first_frame` (B,), the first latent frame of x_t is the clean x0 and its tokens
    get timestep 0. Returns (x_t, per-token timesteps (B, F x H/2 x W/2), frame mask (B, 1, F, H, W):
    0 on the clean frames, which the loss leaves out)."""
    mask = clean_frame_mask(tuple(xt.shape), first_frame).to(xt.device, xt.dtype)
    return (1 - mask) * x0 + mask * xt, token_timesteps(mask, timesteps.to(mask.dtype)), mask
