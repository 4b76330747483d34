"""The held-out loss: which clips are kept out, its fixed timesteps and noise, and that one checkpoint always gives
one value (no Ray: the tiny expert in one gloo process)."""

from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.distributed as dist
from conftest import tiny_config

from wanray import models
from wanray.data.shards import write_shard
from wanray.errors import ConfigError
from wanray.schema import ClipRow
from wanray.train.data import ClipIndex, held_out, holdout_batches
from wanray.train.flow import band_timesteps

IDS = [f"clip-{i:03d}" for i in range(400)]


def test_the_held_out_clips_are_chosen_by_id_whatever_their_order():
    keep = held_out(IDS, 0.1)
    chosen = {i for i, k in zip(IDS, keep) if k}
    shuffled = list(reversed(IDS))
    assert {i for i, k in zip(shuffled, held_out(shuffled, 0.1)) if k} == chosen
    assert 20 < len(chosen) < 60  # about a tenth
    assert held_out(IDS[:3], 0.01).sum() == 1  # at least one
    assert held_out(IDS[:1], 0.2).tolist() == [True]  # also of one clip: training refuses it, not a NaN loss


def test_the_bands_lie_on_the_experts_side_highest_first(tiny_model):
    contract = models.read_contract(tiny_model, tiny_config(tiny_model).model)
    high, low = (band_timesteps(e, contract, 5.0, 4) for e in ("high", "low"))
    assert len(high) == len(low) == 4
    assert bool(contract.uses_high_expert(high).all()) and not bool(contract.uses_high_expert(low).any())
    assert torch.all(high[:-1] > high[1:]) and torch.all(low[:-1] > low[1:])


def test_holdout_keys_are_checked():
    cfg = tiny_config("unused")
    v = cfg.train.validation
    with pytest.raises(ConfigError, match="holdout is set but validation is off"):
        replace(cfg.train, validation=replace(v, holdout_fraction=0.1))
    with pytest.raises(ConfigError, match="holdout_fraction must lie in"):
        replace(cfg.train, validation=replace(v, every=10, holdout_fraction=1.0))
    with pytest.raises(ConfigError, match="not both"):
        replace(cfg.train, validation=replace(v, every=10, holdout="d", holdout_fraction=0.1))
    held = replace(cfg.train, validation=replace(v, every=10, holdout_fraction=0.1))  # no prompts needed
    assert held.validation.has_holdout and not held.validation.renders


@pytest.fixture(scope="module")
def holdout_dir(tmp_path_factory):
    """Five clips of two latent shapes in a shard, as preprocessing writes them."""
    out = tmp_path_factory.mktemp("holdout")
    g = torch.Generator().manual_seed(0)
    rows = []
    for i, frames in enumerate((2, 2, 2, 1, 2)):
        row = ClipRow(
            f"held-{i}", "v.mp4", "a clip", 16.0, 4 * frames - 3, 32, 32, f"32x32x{4 * frames - 3}", 32, 32, 0,
            torch.randn(16, frames, 4, 4, generator=g), torch.randn(6, 32, generator=g),
        )  # fmt: skip
        rows.append(row.to_record())
    write_shard({k: [r[k] for r in rows] for k in rows[0]}, str(out))
    return out


def test_an_index_reads_its_ids_and_keeps_a_subset_in_order(holdout_dir):
    index = ClipIndex.from_dir(holdout_dir)
    assert index.ids() == [f"held-{i}" for i in range(5)]
    part = index.subset(np.array([True, False, True, True, False]))
    assert part.ids() == ["held-0", "held-2", "held-3"] and part.shapes == index.shapes
    batches = holdout_batches(index, 2)
    assert sorted(np.concatenate(batches).tolist()) == list(range(5))
    assert all(len(set(index.shape[b].tolist())) == 1 and len(b) <= 2 for b in batches)


def test_one_checkpoint_always_gives_one_held_out_loss(tiny_model, holdout_dir, tmp_path):
    """Measured twice on the same weights: the same value, per band and overall; other weights give another."""
    from types import SimpleNamespace

    from wanray.schema import pad_text_embedding
    from wanray.train.loop import HeldOut, LoopSpec

    cfg = tiny_config(tiny_model, "train.validation.every=10", f"train.validation.holdout={holdout_dir}")
    contract = models.read_contract(tiny_model, cfg.model)
    index = ClipIndex.from_dir(holdout_dir)
    spec = LoopSpec(cfg, "high", str(tiny_model), contract, index, "native", torch.zeros(1, 32), str(tmp_path))
    spec.holdout = index
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = models.load_expert(tiny_model, "high", torch.float32)
        trainer = SimpleNamespace(
            model=model, device=torch.device("cpu"), empty=pad_text_embedding(torch.zeros(1, 32), 512)
        )
        held = HeldOut(spec, 0, 1)
        first, again = held.measure(trainer), held.measure(trainer)
        assert first == again and first.clips == 5 and len(first.bands) == cfg.train.validation.holdout_bands
        assert model.training  # measured in eval mode, handed back in training mode
        with torch.no_grad():
            model.proj_out.weight.mul_(1.1)
        assert held.measure(trainer).mean != first.mean
        record = first.metrics(10, "high")
        assert record["val_loss"] == pytest.approx(np.mean(first.bands)) and len(record["val_loss_bands"]) == 4
    finally:
        dist.destroy_process_group()


def test_the_runs_pages_loss_plot_draws_each_experts_held_out_loss_as_its_own_series():
    import pandas as pd

    from ui.pages import curve

    metrics = pd.DataFrame(
        [
            {"expert": "high", "step": 5, "loss": 0.5, "grad_norm": 1.0},
            {"expert": "high", "step": 10, "loss": 0.4, "grad_norm": 0.9},
            {"expert": "high", "step": 10, "val_loss": 0.45, "val_clips": 2},
        ]
    )
    loss = curve(metrics, "loss")
    assert loss.to_dict("records") == [
        {"step": 5, "loss": 0.5, "expert": "high"},
        {"step": 10, "loss": 0.4, "expert": "high"},
        {"step": 10, "loss": 0.45, "expert": "high held-out"},
    ]
    assert curve(metrics, "grad_norm")["step"].tolist() == [5, 10]  # the held-out record has no gradient norm
    assert curve(metrics, "lr").empty
