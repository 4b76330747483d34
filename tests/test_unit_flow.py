"""Per-expert timesteps follow the sampler's switch rule; flow-matching targets; LoRA merge."""
import pytest
import torch

from wanray.models import SCHEDULER_CONFIG
from wanray.train.checkpoint import merge_lora
from wanray.train.flow import noisy_latents, sample_timesteps


@pytest.mark.parametrize("shift", [1.0, 5.0, 12.0])
@pytest.mark.parametrize("boundary", [0.875, 0.9])
def test_timesteps_lie_on_the_experts_side_of_the_samplers_boundary(shift, boundary):
    boundary_timestep = boundary * SCHEDULER_CONFIG["num_train_timesteps"]  # as WanPipeline computes it
    g = torch.Generator().manual_seed(0)
    high = sample_timesteps(20000, "high", boundary, shift, g)
    low = sample_timesteps(20000, "low", boundary, shift, g)
    assert bool((high >= boundary_timestep).all()) and bool((low < boundary_timestep).all())
    assert high.max() <= 1000 and low.min() >= 0
    # each expert covers its whole range, not a sliver of it
    assert high.min() < boundary_timestep + 5 and high.max() > 995
    assert low.max() > boundary_timestep - 5 and low.min() < 50 * shift
    # the sampler's integer timesteps split the same way
    assert bool((high.floor() >= boundary_timestep).all()) and bool((low.floor() < boundary_timestep).all())


def test_shifted_schedule_density():
    # with shift 5 the shifted sigma of u=0.5 is 5/6: half of all draws lie above t=833.3
    g = torch.Generator().manual_seed(1)
    high = sample_timesteps(40000, "high", 0.5, 1.0, g)
    assert abs(high.mean().item() - 750) < 5  # shift 1 is uniform on [500, 1000]


def test_flow_matching_interpolation_and_target():
    x0, noise = torch.randn(2, 16, 3, 4, 4), torch.randn(2, 16, 3, 4, 4)
    xt, target = noisy_latents(x0, noise, torch.tensor([0.0, 1000.0]))
    torch.testing.assert_close(xt[0], x0[0])
    torch.testing.assert_close(xt[1], noise[1])
    torch.testing.assert_close(target, noise - x0)


def test_merge_lora_folds_scaled_delta_and_renames():
    base, a, b = torch.randn(6, 4), torch.randn(2, 4), torch.randn(6, 2)
    state = {"blk.to_q.base_layer.weight": base, "blk.to_q.base_layer.bias": torch.ones(6),
             "blk.to_q.lora_A.default.weight": a, "blk.to_q.lora_B.default.weight": b, "other.weight": torch.ones(3)}
    merged, adapter = merge_lora(state, scale=0.5)
    assert set(merged) == {"blk.to_q.weight", "blk.to_q.bias", "other.weight"}
    torch.testing.assert_close(merged["blk.to_q.weight"], base + 0.5 * b @ a)
    assert set(adapter) == {"blk.to_q.lora_A.weight", "blk.to_q.lora_B.weight"}
