"""Per-expert timesteps follow the sampler's switch rule; flow-matching targets; LoRA merge."""

import pytest
import torch

from wanray.errors import DataError
from wanray.model_files import SCHEDULER_CONFIG
from wanray.train.checkpoint import check_resumable
from wanray.train.export import merge_lora
from wanray.train.flow import batch_seed, draw_flow, noisy_latents, sample_timesteps
from wanray.wan import WanContract


def contract(boundary: float) -> WanContract:
    return WanContract(
        boundary=boundary,
        boundary_source="test",
        num_train_timesteps=1000,
        vae_scale_temporal=4,
        vae_scale_spatial=8,
        latents_mean=(0.0,) * 16,
        latents_std=(1.0,) * 16,
    )


@pytest.mark.parametrize("shift", [1.0, 5.0, 12.0])
@pytest.mark.parametrize("boundary", [0.875, 0.9])
def test_timesteps_lie_on_the_experts_side_of_the_samplers_boundary(shift, boundary):
    boundary_timestep = boundary * SCHEDULER_CONFIG["num_train_timesteps"]  # as WanPipeline computes it
    g = torch.Generator().manual_seed(0)
    high = sample_timesteps(20000, "high", contract(boundary), shift, g)
    low = sample_timesteps(20000, "low", contract(boundary), shift, g)
    assert high.dtype == low.dtype == torch.float32
    assert bool((high >= boundary_timestep).all()) and bool((low < boundary_timestep).all())
    assert high.max() <= 1000 and low.min() >= 0
    # each expert covers its whole range, not a sliver of it
    assert high.min() < boundary_timestep + 5 and high.max() > 995
    assert low.max() > boundary_timestep - 5 and low.min() < 50 * shift
    # the sampler's integer timesteps split the same way
    assert bool((high.floor() >= boundary_timestep).all()) and bool((low.floor() < boundary_timestep).all())


def test_shifted_schedule_density():
    g = torch.Generator().manual_seed(1)
    # shift 1 is uniform: the high expert of boundary 0.5 draws uniformly from [500, 1000]
    assert abs(sample_timesteps(40000, "high", contract(0.5), 1.0, g).mean().item() - 750) < 5
    # shift 5 maps u=0.5 to t=833.3 and u=1/6 to t=500, so of the high expert's u in [1/6, 1]
    # a share (1 - 0.5) / (1 - 1/6) = 0.6 lies above t=833.3
    high = sample_timesteps(40000, "high", contract(0.5), 5.0, g)
    assert abs((high > 1000 * 5 / 6).float().mean().item() - 0.6) < 0.01


def test_flow_matching_interpolation_and_target():
    x0, noise = torch.randn(2, 16, 3, 4, 4), torch.randn(2, 16, 3, 4, 4)
    xt, target = noisy_latents(x0, noise, torch.tensor([0.0, 1000.0]), 1000)
    torch.testing.assert_close(xt[0], x0[0])
    torch.testing.assert_close(xt[1], noise[1])
    torch.testing.assert_close(target, noise - x0)


def test_a_batch_draws_the_same_noise_whoever_draws_it():
    """Noise, timesteps and caption dropout depend on (seed, epoch, batch index) only: not on the
    rank or step that trains the batch, which change when a run resumes on another worker count."""

    def draw(seed, epoch, index):
        return draw_flow((2, 16, 3, 4, 4), "low", contract(0.875), 5.0, 0.5, batch_seed(seed, epoch, index))

    a, b = draw(0, 1, 7), draw(0, 1, 7)
    assert torch.equal(a.noise, b.noise) and torch.equal(a.timesteps, b.timesteps)
    assert torch.equal(a.drop_caption, b.drop_caption)
    for other in (draw(1, 1, 7), draw(0, 2, 7), draw(0, 1, 8)):
        assert not torch.equal(a.noise, other.noise)


def test_merge_lora_folds_scaled_delta_and_renames():
    base, a, b = torch.randn(6, 4), torch.randn(2, 4), torch.randn(6, 2)
    state = {
        "blk.to_q.base_layer.weight": base,
        "blk.to_q.base_layer.bias": torch.ones(6),
        "blk.to_q.lora_A.default.weight": a,
        "blk.to_q.lora_B.default.weight": b,
        "other.weight": torch.ones(3),
    }
    merged, adapter = merge_lora(state, scale=0.5)
    assert set(merged) == {"blk.to_q.weight", "blk.to_q.bias", "other.weight"}
    torch.testing.assert_close(merged["blk.to_q.weight"], base + 0.5 * b @ a)
    assert set(adapter) == {"blk.to_q.lora_A.weight", "blk.to_q.lora_B.weight"}


def test_a_checkpoint_without_the_data_position_is_refused_before_training(tmp_path):
    import torch.distributed.checkpoint as dcp

    dcp.save(
        {"train": {"step": 3, "epoch": 0, "samples_in_epoch": 2}}, checkpoint_id=str(tmp_path / "old"), no_dist=True
    )
    with pytest.raises(DataError, match="written by an earlier wanray"):
        check_resumable(tmp_path / "old")
    dcp.save(
        {"train": {"step": 3, "epoch": 0, "batches_in_epoch": 2, "data_fingerprint": "x"}},
        checkpoint_id=str(tmp_path / "new"),
        no_dist=True,
    )
    check_resumable(tmp_path / "new")


def test_a_clip_of_one_latent_frame_is_never_drawn_image_conditioned():
    """TI2V-5B at train.image_condition=1.0: videos always are, stills (one latent frame) never, or their loss
    mask would be empty (0/0)."""
    import dataclasses

    from wanray.wan import KINDS

    ti2v = dataclasses.replace(contract(0.875), kind=KINDS["ti2v-5b"])
    for seed in range(5):
        assert draw_flow((3, 48, 5, 4, 4), "high", ti2v, 5.0, 0.0, seed, 1.0).first_frame.all()
        assert not draw_flow((3, 48, 1, 4, 4), "high", ti2v, 5.0, 0.0, seed, 1.0).first_frame.any()
