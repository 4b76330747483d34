"""The seeded global data order: epochs, same-shape batches, ranks and resume positions."""

import itertools
from collections import Counter

import numpy as np
import pytest

from wanray.train.data import ClipIndex, DataPlan, epoch_batches


def index_of(shapes: list[int]) -> ClipIndex:
    n = len(shapes)
    return ClipIndex(
        ["part-0.parquet"], np.zeros(n, dtype=np.int64), np.arange(n), np.zeros(n, dtype=np.int64), np.array(shapes)
    )


MIXED = index_of([0] * 50 + [1] * 13 + [2] * 3)


def test_an_epoch_holds_every_clip_once_in_same_shape_batches():
    batches = epoch_batches(MIXED, 0, seed=0, batch_size=4)
    clips = np.concatenate([batches[i] for i in range(len(batches))])
    assert sorted(clips.tolist()) == list(range(len(MIXED)))
    sizes = Counter()
    for i in range(len(batches)):
        shapes = set(MIXED.shape[batches[i]].tolist())
        assert len(shapes) == 1
        sizes[(shapes.pop(), len(batches[i]))] += 1
    assert sizes == {(0, 4): 12, (0, 2): 1, (1, 4): 3, (1, 1): 1, (2, 3): 1}


def test_epochs_are_shuffled_differently_and_reproducibly():
    def order(epoch, seed=0):
        b = epoch_batches(MIXED, epoch, seed, 4)
        return [tuple(b[i].tolist()) for i in range(len(b))]

    assert order(0) == order(0) and order(1) == order(1)
    assert order(0) != order(1) and order(0) != order(0, seed=1)


def steps(plan, rank, epoch=0, start=0, count=10):
    return list(itertools.islice(plan.steps(epoch, start, rank), count))


def test_a_step_is_the_next_G_global_batches_shared_among_the_ranks():
    two = [steps(DataPlan(MIXED, 4, 0, world=2, grad_accum=2), r) for r in (0, 1)]
    one = steps(DataPlan(MIXED, 4, 0, world=1, grad_accum=4), 0)
    for k in range(10):
        by_rank = [[i for i, _ in two[r][k].batches] for r in (0, 1)]
        assert not set(by_rank[0]) & set(by_rank[1])
        assert sorted(by_rank[0] + by_rank[1]) == [i for i, _ in one[k].batches]
        assert [c.tolist() for _, c in sorted(two[0][k].batches + two[1][k].batches, key=lambda b: b[0])] == [
            c.tolist() for _, c in one[k].batches
        ]
    # 18 batches per epoch, 4 per step: 4 steps, then the next epoch starts at batch 0
    assert [(s.epoch, s.start) for s in one[:6]] == [(0, 0), (0, 4), (0, 8), (0, 12), (1, 0), (1, 4)]


def test_resuming_at_a_data_position_continues_the_same_sequence():
    plan = DataPlan(MIXED, 4, 0, world=2, grad_accum=1)
    straight = steps(plan, 1, count=30)
    for k in (3, 9, 17):  # mid-epoch and right at an epoch's end
        position = (straight[k].epoch, straight[k].start)
        resumed = steps(plan, 1, *position, count=30 - k)
        assert [(s.epoch, s.start, [c.tolist() for _, c in s.batches]) for s in resumed] == [
            (s.epoch, s.start, [c.tolist() for _, c in s.batches]) for s in straight[k:]
        ]
    end = straight[8]  # the last step of epoch 0 (18 batches, 2 per step)
    assert (end.epoch, end.start) == (0, 16) and (straight[9].epoch, straight[9].start) == (1, 0)
    assert (steps(plan, 1, 0, 18, 1)[0].epoch, steps(plan, 1, 0, 18, 1)[0].start) == (1, 0)


def test_clips_of_a_rare_shape_are_not_always_the_ones_left_out():
    """An epoch's batch count is cut to a multiple of G; the cut falls on other batches each epoch."""
    plan, seen = DataPlan(MIXED, 4, 0, world=4, grad_accum=2), Counter()
    for rank in range(4):
        for step in steps(plan, rank, count=2 * 40):  # 2 steps per epoch: 40 epochs
            for _, clips in step.batches:
                seen.update(clips.tolist())
    assert len(seen) == len(MIXED)
    assert all(seen[c] >= 25 for c in (63, 64, 65)), [seen[c] for c in (63, 64, 65)]


def test_too_few_clips_for_one_step_is_a_clear_error():
    with pytest.raises(RuntimeError, match="one step takes 8 .* too few clips"):
        steps(DataPlan(index_of([0] * 12), 2, 0, world=4, grad_accum=2), 0, count=1)


def test_batches_scaled_by_tokens_and_each_step_knows_its_clips_and_bucket_mix():
    # shape 0: 2 latent frames of 4x4 (8 tokens), shape 1: 1 frame of 4x4 (4 tokens), shape 2: 1 frame of 2x2 (1)
    index = index_of([0] * 20 + [1] * 20 + [2] * 24)
    index.shapes = [(16, 2, 8, 8), (16, 1, 8, 8), (16, 1, 4, 4)]
    plan = DataPlan(index, 1, 0, world=2, grad_accum=2, scale_by_tokens=True)
    assert plan.sizes.tolist() == [1, 2, 8]
    assert plan.fingerprint() != DataPlan(index, 1, 0, world=2, grad_accum=2).fingerprint()
    steps = list(itertools.islice(plan.steps(0, 0, rank=0), 6))
    other = list(itertools.islice(plan.steps(0, 0, rank=1), 6))
    for mine, theirs in zip(steps, other):
        assert mine.samples == theirs.samples == sum(mine.shapes.values())
        held = Counter()
        for _, clips in mine.batches + theirs.batches:
            (shape,) = set(index.shape[clips].tolist())
            assert len(clips) <= plan.sizes[shape]
            held[shape] += len(clips)
        assert held == Counter(mine.shapes)
