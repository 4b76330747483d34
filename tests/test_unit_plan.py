"""The training memory plan of the real Wan2.2-T2V-A14B expert: fake process group, no weights, no device."""

import math

import pytest
from conftest import ROOT, driver_plan

from wanray import model_files
from wanray.config import load_config
from wanray.train.plan import ActivationModel, _saved_bytes, _tiny_expert, measure_activations, plan_training


@pytest.fixture(scope="module")
def a14b_configs(tmp_path_factory):
    """A Wan2.2-T2V-A14B directory holding its published config files only (no weights)."""
    return model_files.write_config_dir(tmp_path_factory.mktemp("a14b-configs"))


@pytest.fixture(scope="module")
def activations():
    return measure_activations("bfloat16")


def preset(model, *sets):
    return load_config(ROOT / "configs" / "t2v_a14b.yaml", [f"model.path={model}", *sets])


@pytest.mark.parametrize("world", [8, 16])
def test_parameters_and_per_rank_shards_of_the_real_expert(a14b_configs, activations, world):
    from wanray.train.parallel import build_on_meta

    plan = plan_training(preset(a14b_configs, f"train.workers={world}"), a14b_configs, "high", activations)
    assert plan.parameters == plan.trainable == 14_288_491_584  # the published count
    assert plan.block_parameters * 40 + plan.root_parameters == plan.parameters
    # FSDP2 splits dim 0 like torch.chunk: rank 0 holds ceil(rows / world) rows of every parameter
    shapes = [p.shape for p in build_on_meta(a14b_configs, "high").parameters()]
    rank0 = sum(min(s[0], math.ceil(s[0] / world)) * math.prod(s[1:]) for s in shapes)
    assert plan.param_bytes == plan.grad_bytes == 4 * rank0 and plan.optimizer_bytes == 8 * rank0
    assert (
        abs(plan.param_bytes - 4 * 14_288_491_584 / world) < 0.005 * plan.param_bytes
    )  # (1, 6, dim) tables sit on rank 0
    assert plan.tokens == 32_760  # 21 x 30 x 52 patches of one 81x480x832 clip
    assert plan.unsharded_grad_bytes == 4 * 14_288_491_584  # 57 GB: why full fine-tuning syncs every micro-batch
    assert plan.fits == (world == 16)  # 64 GB devices: MindSpeed-MM trains it on 16


def test_the_plan_takes_the_largest_micro_batch_of_the_data_buckets(a14b_configs, activations):
    """A plan of data.height x data.width alone said "fits" for 720P buckets it would run out of memory on; with
    scale_batch_by_tokens, a micro-batch of stills holds many clips, each with its own text activations."""
    plan = lambda *sets: plan_training(
        preset(a14b_configs, "train.workers=16", *sets), a14b_configs, "high", activations
    )
    base, hd = plan(), plan("data.buckets=[480x832x81, 720x1280x81]")
    assert (base.tokens, base.bucket, hd.tokens, hd.bucket) == (32_760, "1 x 480x832x81", 75_600, "1 x 720x1280x81")
    assert hd.activation_bytes > base.activation_bytes and base.fits and not hd.fits
    stills = plan("data.buckets=[480x832x81, 480x832x1]", "train.scale_batch_by_tokens=true")
    assert stills.bucket == "21 x 480x832x1" and stills.activation_bytes > base.activation_bytes
    # by bytes, not tokens: 20 stills of 496x832 hold fewer tokens (32,240) than one 480x832x81 clip, more bytes
    uneven = plan("data.buckets=[480x832x81, 496x832x1]", "train.scale_batch_by_tokens=true")
    assert uneven.bucket == "20 x 496x832x1" and uneven.tokens < base.tokens
    assert uneven.activation_bytes > base.activation_bytes


def test_activation_model_predicts_a_block_it_was_not_fitted_on(activations):
    import torch
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    dim, ffn, side = 192, 512, 12
    inputs = {
        "hidden_states": torch.randn(1, 16, 4, 2 * side, 2 * side, dtype=torch.bfloat16).requires_grad_(),
        "timestep": torch.tensor([500.0]),
        "encoder_hidden_states": torch.randn(1, 512, 64, dtype=torch.bfloat16),
    }
    measured = [_saved_bytes(_tiny_expert(dim, ffn, layers, 64, torch.bfloat16, False), inputs) for layers in (1, 2)]
    predicted = ActivationModel.bytes(activations.block, 4 * side * side, dim, ffn)
    assert abs((measured[1] - measured[0]) - predicted) < 0.03 * predicted
    # TI2V-5B trains with a timestep per token: (tokens, 6, dim) float32 tables per block, fitted on their own
    per_token = measure_activations("bfloat16", per_token=True)
    inputs["timestep"] = torch.full((1, 4 * side * side), 500.0)
    measured = [_saved_bytes(_tiny_expert(dim, ffn, layers, 64, torch.bfloat16, False), inputs) for layers in (1, 2)]
    predicted = ActivationModel.bytes(per_token.block, 4 * side * side, dim, ffn)
    assert abs((measured[1] - measured[0]) - predicted) < 0.03 * predicted
    assert predicted > 1.3 * ActivationModel.bytes(activations.block, 4 * side * side, dim, ffn)
    _AttentionBackendRegistry.set_active_backend("_native_math")  # another model's global choice must not leak in
    try:
        assert measure_activations("bfloat16").block == activations.block
        assert measure_activations("bfloat16", "_native_math").block[0] > activations.block[0]  # keeps the scores
    finally:
        _AttentionBackendRegistry.set_active_backend("native")


def test_checkpointing_and_lora_change_the_plan(a14b_configs, activations):
    full = plan_training(preset(a14b_configs), a14b_configs, "low", activations)
    no_ac = plan_training(
        preset(a14b_configs, "train.activation_checkpointing=false"), a14b_configs, "low", activations
    )
    assert no_ac.activation_bytes == full.activation_bytes_without_checkpointing > 10 * full.activation_bytes
    assert not no_ac.fits
    lora = plan_training(
        preset(a14b_configs, "train.lora.enabled=true", "train.workers=8"), a14b_configs, "low", activations
    )
    assert lora.trainable < 0.02 * lora.parameters and lora.optimizer_bytes < 0.02 * full.optimizer_bytes * 2
    assert lora.fits


def test_train_plan_cli_prints_the_verdict_and_exits_by_it(a14b_configs):
    def run(*sets):
        argv = ["--config", str(ROOT / "configs" / "t2v_a14b.yaml"), "--expert", "high"]
        return driver_plan(
            "train", *argv, "--set", f"model.path={a14b_configs}", *(a for s in sets for a in ("--set", s))
        )

    (fits, fits_out), (too_big, too_big_out) = run(), run("train.workers=8")
    assert fits == 0 and "14,288,491,584 parameters" in fits_out and "fits:" in fits_out
    assert too_big == 1 and "DOES NOT FIT" in too_big_out


def test_context_parallel_splits_a_720p_samples_activations_over_its_group(a14b_configs, activations):
    """720x1280x81 (75,600 tokens) on 16 ranks: Ulysses 2 and 4 keep 1/2 and 1/4 of the activations per
    rank (less the small per-block constant), the parameter shards stay those of 16 ranks."""
    sets = ["train.workers=16", "data.height=720", "data.width=1280"]
    plans = {
        n: plan_training(
            preset(a14b_configs, *sets, f"train.context_parallel.ulysses={n}"), a14b_configs, "high", activations
        )
        for n in (1, 2, 4)
    }
    assert plans[1].tokens == plans[4].tokens == 75_600
    for n in (2, 4):
        assert plans[n].param_bytes == plans[1].param_bytes
        assert abs(plans[n].activation_bytes * n / plans[1].activation_bytes - 1) < 0.02
    assert (
        "75,600 tokens (1 x 720x1280x81, the largest micro-batch), 18,900 per rank (context parallel over 4)"
        in "\n".join(plans[4].lines())
    )
    assert plans[4].total_bytes < plans[1].total_bytes


def test_ring_attention_counts_its_gathered_keys_values_and_gradient_buffers(a14b_configs, activations):
    """The T2V preset (32,760 tokens, bf16 on NPUs) on 16 ranks with ring 2: one attention call's backward holds
    every rank's keys and values (2 x 32,760 x 5,120 bf16 = 0.67 GB) and float32 gradient buffers; the plan adds
    it to the total and says so. On the native backend elsewhere (a GPU here) the tiled op's tiles come on top;
    untiled, that op alone would have needed 42.9 GB per score tensor."""
    from wanray import ring_attention

    sets = ["train.workers=16", "train.context_parallel.ring=2"]
    plain = plan_training(
        preset(a14b_configs, "train.workers=16", "train.context_parallel.ulysses=2"), a14b_configs, "high", activations
    )
    npu = plan_training(preset(a14b_configs, *sets), a14b_configs, "high", activations)
    assert plain.ring_bytes == 0 and npu.ring == 2
    assert npu.ring_bytes == ring_attention.ring_working_bytes(1, 32_760, 40, 128, 1, 2, 2, tiled=False)
    assert 2 * 32_760 * 5_120 * 2 < npu.ring_bytes < 6e9
    assert (
        npu.total_bytes
        == npu.param_bytes
        + npu.grad_bytes
        + npu.optimizer_bytes
        + npu.gathered_bytes
        + npu.grad_buffer_bytes
        + npu.activation_bytes
        + npu.ring_bytes
    )
    assert any(line.startswith("ring attention over 2 ranks: ") for line in npu.lines())
    gpu = plan_training(preset(a14b_configs, *sets, "train.worker.device=cuda"), a14b_configs, "high", activations)
    assert gpu.ring_bytes == npu.ring_bytes + ring_attention.tiled_working_bytes(
        (1, 16_380, 40, 128), (1, 16_380, 40, 128)
    )
