"""Curation without Ray: long videos split into shots and clips (PySceneDetect on real mp4 files), motion."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import ROOT, tiny_config

from wanray.config import load_config
from wanray.data.curate import split_source
from wanray.data.dedup import FRAMES, HASH_SIZE, band_keys, choose, distance_bits, fingerprint, near_pairs
from wanray.data.manifest import ClipSource, Reject, clip_id, read_manifest
from wanray.data.motion import curation_motion
from wanray.data.scenes import cut_shot, detect_shots
from wanray.data.shards import collect_rejects, forget_retried, record_reject, rejected_keys, write_shard
from wanray.data.synthetic import SyntheticClip, render, write_mp4, write_shots
from wanray.data.video import available_frames, sample_frames
from wanray.errors import ConfigError, DataError
from wanray.schema import VERSION_KEY, ClipRow


def test_a_shot_is_cut_into_clips_of_at_most_the_longest_and_short_pieces_are_named():
    # 16 fps, first frame to last: 1.5 s is 25 frames; 0.5 s is 9
    assert cut_shot(0, 60, 16, 1.5, 0.5) == ([(0, 25), (25, 50), (50, 60)], [])
    keep, short = cut_shot(10, 40, 16, 1.5, 0.5)
    assert keep == [(10, 35)] and short == [(35, 40)]
    assert cut_shot(0, 5, 16, 1.5, 0.5) == ([], [(0, 5)])  # a shot shorter than the shortest clip
    # the README's split, 5.06 s and at least 81 frames at 16 fps: every piece decodes to 81 frames, whatever
    # the source's rate (pieces of 80 frames at 16 fps were cut, and every one was rejected too_short)
    for fps in (8, 12, 15, 16, 24, 25, 29.97, 30, 60):
        shortest = (81 - 1) / 16  # what curate asks of a piece for data.min_frames 81 at data.fps 16
        keep, _ = cut_shot(0, 2000, fps, 5.06, shortest)
        assert keep and {available_frames(fps, 2000, 16, a, b) for a, b in keep} == {81}, fps
        least = next(n for n in range(1, 400) if cut_shot(0, n, fps, 5.06, shortest)[0])  # the shortest clip
        assert available_frames(fps, 2000, 16, 0, least) == 81 and available_frames(fps, 2000, 16, 0, least - 1) < 81


@pytest.fixture(scope="module")
def long_video(tmp_path_factory):
    """Shots of 40, 56 and 6 frames at 16 fps, hard cuts at frames 40 and 96."""
    path = tmp_path_factory.mktemp("long") / "long.mp4"
    write_shots(path, [40, 56, 6], seed=3)
    return str(path)


def test_shots_are_found_at_the_hard_cuts(long_video):
    found = detect_shots(long_video, threshold=27.0, min_shot_frames=2)
    assert (found.fps, found.frames) == (16.0, 102)
    assert found.shots == [(0, 40), (40, 96), (96, 102)]


def config(*overrides):
    return load_config(str(ROOT / "configs" / "tiny.yaml"), ["data.min_frames=5", *overrides])


def test_a_line_without_cut_is_split_and_one_with_cut_is_kept(long_video, tmp_path):
    cfg = config("data.max_clip_seconds=1.5", "data.min_clip_seconds=0.5")
    whole = ClipSource("w", long_video, "shapes", whole=True)
    clips = split_source(whole, cfg, str(tmp_path))
    ranges = [(c.cut_start, c.cut_end) for c in clips]
    assert ranges == [(0, 25), (25, 40), (40, 65), (65, 90)]
    assert all(
        c.path == long_video and c.caption == "shapes" and c.id == clip_id(c.path, "shapes", *r)
        for c, r in zip(clips, ranges)
    )
    # the end of the second shot and the last shot (6 frames, 0.31 s) are below min_clip_seconds: named rejects,
    # keyed as their clips would be
    rejects = sorted(collect_rejects(tmp_path), key=lambda r: r["input"])
    assert [(r["reason"], r["input"]) for r in rejects] == [
        ("short_shot", f"{long_video}#90-96"),
        ("short_shot", f"{long_video}#96-102"),
    ]
    assert rejects[1]["detail"] == "frames [96, 102) of the shot [96, 102): 0.31s, need 0.50s"
    assert (tmp_path / "rejects" / f"{clip_id(long_video, 'shapes', 96, 102)}.json").exists()
    cut = ClipSource("c", long_video, "shapes", 0, 30)
    assert split_source(cut, cfg, str(tmp_path)) == [cut]
    assert split_source(whole, config(), str(tmp_path)) == [whole]  # max_clip_seconds 0: splitting is off


def test_the_split_keeps_pieces_as_long_as_the_shortest_video_bucket():
    from wanray.data.curate import least_video_frames

    assert least_video_frames(config().data) == 5  # data.min_frames
    assert least_video_frames(config("data.buckets=[64x64x17, 32x64x9, 64x64x1]").data) == 9  # not min_frames'
    assert least_video_frames(config("data.buckets=[64x64x1]").data) == 1  # stills only: no floor of its own


def test_the_manifest_says_which_lines_have_no_cut(tmp_path):
    (tmp_path / "m.jsonl").write_text(
        json.dumps({"path": "a.mp4", "cap": "x"}) + "\n" + json.dumps({"path": "a.mp4", "cap": "x", "cut": [0, 9]})
    )
    sources, _ = read_manifest(tmp_path / "m.jsonl")
    assert [s.whole for s in sources] == [True, False]


def test_a_video_that_cannot_be_split_is_a_named_reject(tmp_path):
    cfg = config("data.max_clip_seconds=2")
    (tmp_path / "text.mp4").write_text("not a video at all")
    (tmp_path / "empty.mp4").write_bytes(b"")
    for name in ("missing.mp4", "text.mp4", "empty.mp4"):
        assert split_source(ClipSource(name, str(tmp_path / name), "x", whole=True), cfg, str(tmp_path)) == []
    reasons = {r["input"].rsplit("/", 1)[1]: r["reason"] for r in collect_rejects(tmp_path)}
    assert reasons == {"missing.mp4": "file_not_found", "text.mp4": "not_a_video", "empty.mp4": "empty_file"}


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["data.max_clip_seconds=-1"], "max_clip_seconds"),
        (["data.max_clip_seconds=2", "data.min_clip_seconds=3"], "exceeds data.max_clip_seconds"),
        (["data.scene_threshold=0"], "scene_threshold"),
    ],
)
def test_bad_split_settings_are_one_line_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        config(*overrides)


def test_motion_rises_with_the_speed_of_what_moves():
    def frames(n):  # the same square crossing the frame in n frames: fewer frames, faster
        return render(SyntheticClip("m", "", 96, 160, 16, n, "square", "white", "black", "left to right"))

    still = np.repeat(frames(9)[:1], 9, axis=0)
    slow, fast = curation_motion(frames(40)), curation_motion(frames(10))
    assert curation_motion(still) == pytest.approx(0.0, abs=1e-3)
    assert 0.1 < slow < fast


def test_motion_sees_a_square_move_on_a_background_of_its_own_luminance():
    """Blue on olive is two greys of about equal luminance (85 and 89): on grayscale the square read as still."""

    def frames(color, background):
        return render(SyntheticClip("m", "", 96, 160, 16, 20, "square", color, background, "left to right"))

    red_on_black = curation_motion(frames("red", "black"))
    assert red_on_black > 0.3
    assert curation_motion(frames("blue", "olive")) == pytest.approx(red_on_black, rel=0.1)


def test_an_output_directory_of_older_settings_or_shards(tmp_path):
    from wanray.data.preprocess import _check_settings

    cfg = config()
    _check_settings(cfg, tmp_path)
    settings = json.loads((tmp_path / "settings.json").read_text())
    # written before the split keys existed: the same settings, as the new keys are at their defaults
    for key in ("max_clip_seconds", "min_clip_seconds", "scene_threshold"):
        del settings["data"][key]
    (tmp_path / "settings.json").write_text(json.dumps(settings))
    _check_settings(cfg, tmp_path)
    with pytest.raises(ConfigError, match="other data settings"):
        _check_settings(config("data.max_clip_seconds=2"), tmp_path)
    # captions from another model or prompt would mix in one directory; the captioners' resources do not count
    captioned = config("caption.model=/models/vlm", "caption.actors=1")
    with pytest.raises(ConfigError, match="other caption settings"):
        _check_settings(captioned, tmp_path)
    (tmp_path / "settings.json").unlink()
    _check_settings(captioned, tmp_path)
    _check_settings(config("caption.model=/models/vlm", "caption.actors=4", "caption.batch_size=8"), tmp_path)
    with pytest.raises(ConfigError, match="other caption settings"):
        _check_settings(config("caption.model=/models/vlm", "caption.prompt=Describe it."), tmp_path)
    # shards of schema 2 (no cut or motion columns) and new ones would not read as one directory
    pq.write_table(pa.table({"id": ["a"]}).replace_schema_metadata({VERSION_KEY: b"2"}), tmp_path / "part-0.parquet")
    with pytest.raises(ConfigError, match="schema version '2', this wanray reads 3"):
        _check_settings(cfg, tmp_path)


def test_fingerprints_within_the_distance_share_a_band_and_the_earliest_clip_is_kept():
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, 32, dtype=np.uint8)

    def flip(h, bits):  # `bits` distinct bits of h flipped
        out = np.unpackbits(h)
        out[rng.choice(out.size, bits, replace=False)] ^= 1
        return np.packbits(out).tobytes()

    for _ in range(50):  # pigeonhole: at most `distance` differing bits leave one of distance + 1 bands whole
        near = flip(base, 12)
        assert distance_bits(base.tobytes(), near) == 12
        assert set(band_keys(base.tobytes(), 12)) & set(band_keys(near, 12))
    far = rng.integers(0, 256, 32, dtype=np.uint8).tobytes()
    group = pa.table(
        {
            "id": ["c", "a", "b", "d"],
            "rank": ["3", "1", "2", "4"],
            "phash": [flip(base, 5), base.tobytes(), far, flip(base, 40)],
        }
    )
    pairs = near_pairs(group, 12).to_pylist()
    # c is near a (ranked first); b and d are near nothing within 12 bits
    assert [(p["id"], p["other"], p["bits"]) for p in pairs] == [("c", "a", 5)]


def test_a_clip_is_rejected_only_as_the_duplicate_of_one_that_stays():
    def pair(one, other, bits):  # rank: the clip's name
        return {"id": one, "rank": one, "other": other, "other_rank": other, "bits": bits}

    # a chain, each near the next, a not near c: b goes as a's duplicate, c stays (it was lost as b's)
    chain = [pair("b", "a", 10), pair("c", "b", 10)]
    assert choose(chain) == {"b": ("a", 10)}
    # d near both a (rejected here: a stored clip comes first) and b: it names the first one that stays
    assert choose([*chain, pair("d", "a", 3), pair("d", "b", 7)], kept=frozenset({"c"})) == {
        "b": ("c", 10),
        "d": ("a", 3),
    }
    # two stored clips near each other both stay, and each pair counts once however many bands it shares
    assert choose([pair("b", "a", 4), pair("b", "a", 4)], kept=frozenset({"a", "b"})) == {}
    # a rejected for another reason (its decode failed) keeps nothing: b stays, and c goes as b's duplicate
    assert choose([*chain, pair("c", "a", 12)], failed=frozenset({"a"})) == {"c": ("b", 10)}


def test_of_near_duplicates_the_copy_of_the_largest_frames_stays(long_video, tmp_path):
    """A video uploaded again at another size: whichever path sorts first, the larger copy stays (the smaller
    would also lose the bucket sizes above its own and fail data.min_resolution first). Candidates files of an
    older run carry no frame size: their clips come after those that do, in path order."""
    import decord

    from wanray.data.curate import source_pixels
    from wanray.data.dedup import _ranked

    small = tmp_path / "a-small.mp4"
    write_mp4(small, decord.VideoReader(long_video, width=80, height=48).get_batch(list(range(40))).asnumpy(), 16)
    assert source_pixels(str(small)) == 48 * 80 and source_pixels(long_video) > 48 * 80
    h = fingerprint(sample_frames(long_video, FRAMES, HASH_SIZE, 0, 40))
    rows = [
        # the small copy's path sorts first
        _ranked(
            {"id": "small", "path": "s3://a/v.mp4", "cut_start": 0, "pixels": source_pixels(str(small)), "phash": h}
        ),
        _ranked(
            {"id": "large", "path": "s3://b/v.mp4", "cut_start": 0, "pixels": source_pixels(long_video), "phash": h}
        ),
        _ranked({"id": "old", "path": "s3://0/v.mp4", "cut_start": 0, "phash": h}),  # no pixels column
    ]
    pairs = near_pairs(pa.table({k: [r[k] for r in rows] for k in rows[0]}), 12).to_pylist()
    assert choose(pairs) == {"small": ("large", 0), "old": ("large", 0)}


def test_a_rescaled_reencode_keeps_the_fingerprint_and_other_footage_does_not(long_video, tmp_path):
    import decord

    frames = decord.VideoReader(long_video, width=200, height=120).get_batch(list(range(40))).asnumpy()
    write_mp4(tmp_path / "copy.mp4", frames, 16)
    write_shots(tmp_path / "other.mp4", [40], seed=9)
    original = fingerprint(sample_frames(long_video, FRAMES, HASH_SIZE, 0, 40))
    copy = fingerprint(sample_frames(str(tmp_path / "copy.mp4"), FRAMES, HASH_SIZE, 0, 40))
    other = fingerprint(sample_frames(str(tmp_path / "other.mp4"), FRAMES, HASH_SIZE, 0, 40))
    assert distance_bits(original, copy) <= 16 < 64 < distance_bits(original, other)


def shard_of(out, motions, frames):
    import torch

    g = torch.Generator().manual_seed(0)
    rows = [
        ClipRow(
            f"clip-{i}", "v.mp4", "a clip", 16.0, f, 32, 32, f"32x32x{f}", 32, 32, 0,
            torch.randn(16, (f + 3) // 4, 4, 4, generator=g), torch.randn(6, 32, generator=g), motion=m,
        ).to_record()
        for i, (m, f) in enumerate(zip(motions, frames))
    ]  # fmt: skip
    write_shard({k: [r[k] for r in rows] for k in rows[0]}, str(out))
    return out


def test_training_keeps_the_clips_that_pass_every_filter(tmp_path):
    from wanray.train.data import ClipIndex
    from wanray.train.trainer import apply_filters

    data = shard_of(tmp_path, [0.2, 1.5, None, 3.0], [5, 9, 1, 5])  # clip-2 is a still: no motion
    # a write task retried after it wrote (its worker died before it returned) writes the same file again
    shard_of(tmp_path, [0.2, 1.5, None, 3.0], [5, 9, 1, 5])
    assert len(list(tmp_path.glob("part-*.parquet"))) == 1
    index = ClipIndex.from_dir(data)
    log: list[str] = []

    def kept(*filters):
        cfg = tiny_config("unused", *(f"train.filters=[{', '.join(filters)}]",) if filters else ())
        return apply_filters(cfg, index, data, log.append).ids()

    assert kept() == [f"clip-{i}" for i in range(4)]
    assert kept("motion >= 0.5") == ["clip-1", "clip-3"]
    assert log[-1].endswith(f"keep 2 of the 4 clips of {data} (motion >= 0.5: 2)")
    assert kept("motion >= 0.5", "num_frames > 5") == ["clip-1"]
    assert kept("motion != 1.5") == ["clip-0", "clip-3"]  # a null passes no filter
    with pytest.raises(DataError, match="train.filters keep none of the 4 clips"):
        kept("motion > 10")


@pytest.mark.parametrize(
    "text, message",
    [
        ("motion", "is not 'COLUMN OP NUMBER'"),
        ("motion => 1", "is not 'COLUMN OP NUMBER'"),
        ("colour >= 1", "'colour' is no numeric column of the shards"),
        ("motion >= fast", "'fast' in 'motion >= fast' is not a number"),
    ],
)
def test_a_bad_filter_is_a_one_line_error(text, message):
    with pytest.raises(ConfigError, match=message):
        tiny_config("unused", f"train.filters=[{text}]")


def test_a_filter_on_a_column_older_shards_lack_names_it(tmp_path):
    from wanray.train.data import ClipIndex

    data = shard_of(tmp_path, [1.0], [5])
    (shard,) = data.glob("part-*.parquet")
    table = pq.read_table(shard).drop_columns(["motion", "cut_start", "cut_end"])
    pq.write_table(table.replace_schema_metadata({VERSION_KEY: b"2"}), shard, row_group_size=1)
    with pytest.raises(DataError, match="has no 'motion' column \\(schema version 2\\): preprocess the videos again"):
        ClipIndex.from_dir(data).column("motion")


def test_the_captioner_writes_a_caption_per_clip_with_its_model_name_and_names_what_it_cannot_read(
    long_video, tmp_path
):
    from wanray.data.caption import Captioner
    from wanray.model_files import write_tiny_vlm

    model = write_tiny_vlm(tmp_path / "Qwen2.5-VL-tiny")
    cfg = config(f"caption.model={model}", "caption.frames=3", "caption.max_new_tokens=6")
    captioner = Captioner(cfg, str(tmp_path))
    rows = [
        {"id": "a", "path": long_video, "cut_start": 0, "cut_end": 40, "name": "first shot"},
        {"id": "b", "path": str(tmp_path / "gone.mp4"), "cut_start": 0, "cut_end": -1, "name": "gone"},
        {"id": "c", "path": long_video, "cut_start": 0, "cut_end": 40, "name": "first shot again"},
    ]
    out = captioner(pa.Table.from_pylist(rows)).to_pylist()
    assert [(r["id"], r["caption_model"]) for r in out] == [("a", "Qwen2.5-VL-tiny"), ("c", "Qwen2.5-VL-tiny")]
    assert out[0]["caption"] and out[0]["caption"] == out[1]["caption"]  # greedy: one clip, one caption
    assert [(r["input"], r["reason"]) for r in collect_rejects(tmp_path)] == [("gone", "file_not_found")]


def test_lines_without_a_caption_are_sources_when_a_model_captions_them(tmp_path):
    (tmp_path / "m.jsonl").write_text(
        json.dumps({"path": "a.mp4"}) + "\n" + json.dumps({"path": "b.mp4", "cap": ""}) + "\n"
    )
    sources, rejects = read_manifest(tmp_path / "m.jsonl")
    assert not sources and {r.reason for r in rejects} == {"missing_caption", "empty_caption"}
    sources, rejects = read_manifest(tmp_path / "m.jsonl", uncaptioned=True)
    assert [s.caption for s in sources] == ["", ""] and not rejects


def test_the_aesthetic_scorer_rates_each_clip_with_the_predictor_head(long_video, tmp_path):
    from wanray.data.aesthetic import AestheticScorer, load_head
    from wanray.model_files import AESTHETIC_HEAD_FILE, write_tiny_aesthetic

    model = write_tiny_aesthetic(tmp_path / "aesthetic")
    scorer = AestheticScorer(str(model))
    frames = sample_frames(long_video, 8, 64, 0, 40)
    other = sample_frames(long_video, 8, 64, 40, 96)
    out = scorer({"frames": np.array([frames, frames, other]), "id": np.array(["a", "b", "c"])})
    scores = out["aesthetic"].tolist()
    assert out["id"].tolist() == ["a", "b", "c"] and scores[0] == scores[1] != scores[2]
    assert all(np.isfinite(scores))
    # the head is LAION's layout: Linear layers at 0, 2, 4, 6 and 7, dropouts between the first four
    head = load_head(model)
    assert [type(m).__name__ for m in head] == ["Linear", "Identity", "Linear", "Identity", "Linear", "Identity",
                                                "Linear", "Linear"]  # fmt: skip
    (model / AESTHETIC_HEAD_FILE).unlink()
    with pytest.raises(ConfigError, match="has no aesthetic_head.safetensors"):
        load_head(model)


def test_a_storage_error_is_recorded_and_tried_again_by_the_next_run(tmp_path):
    """A store that refused a read may serve it later: its reject is kept apart, so resume does not skip the input
    for good; the next run deletes the record and tries again (recording it again if it fails again)."""
    record_reject(tmp_path, Reject("s3://raw/a.mp4", "storage_error", "AWS Error NETWORK_CONNECTION"), key="a")
    record_reject(tmp_path, Reject("s3://raw/b.mp4", "corrupt_video", "moov atom not found"), key="b")
    assert rejected_keys(tmp_path) == {"b"} and rejected_keys(tmp_path, retried=True) == {"a", "b"}
    assert [r["reason"] for r in collect_rejects(tmp_path)] == ["storage_error", "corrupt_video"]  # both reported
    assert forget_retried(tmp_path) == 1 and forget_retried(tmp_path) == 0
    assert [r["input"] for r in collect_rejects(tmp_path)] == ["s3://raw/b.mp4"]
