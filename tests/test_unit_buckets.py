"""Bucket sets from data.*: the generated standard set, explicit lists, and bad settings."""

import pytest
from conftest import ROOT

from wanray.buckets import ASPECT_RATIOS, Bucket, BucketSet
from wanray.config import load_config
from wanray.errors import ConfigError
from wanray.wan import KINDS

T2V, TI2V = KINDS["t2v-a14b"], KINDS["ti2v-5b"]


def data(*sets):
    return load_config(ROOT / "configs" / "t2v_a14b.yaml", list(sets)).data


def test_the_a14b_preset_keeps_the_mindspeed_recipe():
    assert BucketSet.from_config(data(), T2V).buckets == [Bucket(480, 832, 81)]


def test_a_budget_gives_every_aspect_ratio_within_it_and_the_recipe_among_them():
    buckets = BucketSet.from_config(data("data.bucket_budget=32760", "data.min_frames=21"), T2V)
    assert all(b.tokens(T2V) <= 32760 for b in buckets.buckets)
    resolutions = list(buckets.frames_by_resolution)
    assert len(resolutions) == len(ASPECT_RATIOS) and (480, 832) in resolutions and (832, 480) in resolutions
    for (h, w), (ah, aw) in zip(
        sorted(resolutions, key=lambda r: r[1] / r[0]), sorted(ASPECT_RATIOS, key=lambda a: a[1] / a[0])
    ):
        assert abs((w / h) / (aw / ah) - 1) <= 0.05
        assert buckets.frames_by_resolution[(h, w)] == (81, 61, 41, 21)
    assert buckets.resolution(1080, 1920) == (480, 832) and buckets.resolution(1920, 1080) == (832, 480)
    assert buckets.resolution(1000, 1000) == (640, 624)
    assert buckets.frames((480, 832), 80) == 61 and buckets.frames((480, 832), 20) is None


def test_an_explicit_list_and_what_cannot_work():
    buckets = BucketSet.from_config(data("data.buckets=[480x832x81, 480x832x41, 832x480x81]"), T2V)
    assert buckets.frames_by_resolution == {(480, 832): (81, 41), (832, 480): (81,)}
    for sets, message in (  # what no model takes: refused when the config loads
        (["data.buckets=[480x832x80]"], r"4n\+1"),
        (["data.buckets=[480by832]"], "HEIGHTxWIDTHxFRAMES"),
        (["data.buckets=[480x832x81]", "data.bucket_budget=32760"], "not both"),
        (["data.bucket_budget=-1"], ">= 0"),
    ):
        with pytest.raises(ConfigError, match=message):
            data(*sets)
    for sets, message in (  # what this model does not take: refused with its kind
        (["data.buckets=[480x830x81]"], "multiples of 16 for Wan2.2-T2V-A14B"),
        (["data.bucket_budget=21"], "too small"),
    ):
        with pytest.raises(ConfigError, match=message):
            BucketSet.from_config(data(*sets), T2V)


def test_each_model_kind_checks_its_own_size_multiple():
    """A14B's 720P, 720x1280, is 16-aligned, not 32: fine for T2V-A14B, refused for TI2V-5B (whose 16x VAE and
    2x2 patch take multiples of 32) rather than passed by a check that assumed 16."""
    hd = data("data.height=720", "data.width=1280")
    assert BucketSet.from_config(hd, T2V).buckets[0].tokens(T2V) == 21 * 45 * 80  # 75,600
    with pytest.raises(ConfigError, match="multiples of 32 for Wan2.2-TI2V-5B, got 720x1280"):
        BucketSet.from_config(hd, TI2V)
    ti2v = load_config(ROOT / "configs" / "ti2v_5b.yaml").data
    assert BucketSet.from_config(ti2v, TI2V).buckets[0].tokens(TI2V) == 31 * 22 * 40  # 121x704x1280
