"""Aspect-ratio and duration buckets, end to end on a real local Ray: a mixed corpus of portrait,
square and landscape mp4s of several lengths -> bucketed Parquet -> training on 2 workers."""

import json
import subprocess
import sys

import pytest
from conftest import ROOT, tiny_config
from PIL import Image
from test_integration_train import assert_same_training_state, checkpoint_state, metrics

from wanray.buckets import Bucket
from wanray.data.preprocess import run_preprocess
from wanray.data.shards import read_clips
from wanray.data.synthetic import SyntheticClip, render
from wanray.io import write_mp4
from wanray.train.runs import latest_checkpoint
from wanray.train.trainer import train_experts
from wanray.wan import KINDS, latent_frames

BUDGET = 240  # tokens: 17 frames (5 latent) of 48 patches of 16x16 pixels, e.g. 96x128
# (height, width, frames at 16 fps): 16:9, 9:16, 1:1, 4:3, 3:5 and 4:7 sources, two of each, some
# shorter than data.num_frames (17) but at least data.min_frames (9)
SOURCES = [
    (72, 128, 24),
    (72, 128, 11),
    (128, 72, 12),
    (128, 72, 30),
    (96, 96, 14),
    (96, 96, 20),
    (96, 128, 20),
    (96, 128, 15),
    (160, 96, 18),
    (160, 96, 10),
    (120, 208, 17),
    (120, 208, 26),
]
IMAGES = {"portrait.png": (200, 112), "landscape.jpg": (90, 160), "square.webp": (100, 100)}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixed")
    entries = []
    for i, (h, w, n) in enumerate(SOURCES):
        motion = ("left to right", "top to bottom", "right to left", "bottom to top")[i % 4]
        clip = SyntheticClip(
            f"v{i:02d}.mp4",
            f"a {'red' if i % 2 else 'blue'} circle moving {motion}",
            h,
            w,
            16,
            n,
            "circle",
            "red" if i % 2 else "blue",
            "gray",
            motion,
        )
        write_mp4(root / clip.name, render(clip), 16)
        entries.append({"path": clip.name, "cap": clip.caption})
    short = SyntheticClip("short.mp4", "too short", 64, 64, 16, 6, "square", "green", "black", "left to right")
    write_mp4(root / short.name, render(short), 16)
    (root / "broken.mp4").write_bytes((root / "v00.mp4").read_bytes()[:2000])
    entries += [{"path": "short.mp4", "cap": "too short"}, {"path": "broken.mp4", "cap": "broken"}]
    for name, (h, w) in IMAGES.items():  # still images: one frame of a rendered clip each
        frame = render(SyntheticClip(name, "", h, w, 16, 2, "square", "yellow", "navy", "left to right"))[0]
        Image.fromarray(frame).save(root / name)
        entries.append({"image": name, "cap": f"a yellow square on a navy background, {name.split('.')[0]}"})
    (root / "cut.png").write_bytes((root / "portrait.png").read_bytes()[:200])
    (root / "text.jpg").write_text("not an image")
    entries += [{"path": "cut.png", "cap": "a damaged image"}, {"path": "text.jpg", "cap": "text"}]
    manifest = root / "data.jsonl"
    manifest.write_text("".join(json.dumps(e) + "\n" for e in entries))
    return manifest


@pytest.fixture(scope="module")
def bucketed(corpus, tiny_model, ray_cluster, tmp_path_factory):
    out = tmp_path_factory.mktemp("bucketed")
    cfg = tiny_config(tiny_model, f"data.bucket_budget={BUDGET}")
    return out, run_preprocess(cfg, str(corpus), str(out), log=lambda _: None)


def test_every_source_lands_in_the_bucket_of_its_aspect_ratio_within_the_budget(bucketed):
    out, summary = bucketed
    assert summary["outcomes"]["written"] == len(SOURCES) + len(IMAGES)
    assert summary["rejects_by_reason"] == {"too_short": 1, "corrupt_video": 1, "corrupt_image": 1, "not_an_image": 1}
    rows = read_clips(out).to_pylist()
    for r in rows:
        bucket = Bucket.parse(r["bucket"], KINDS["t2v-a14b"])
        assert (bucket.height, bucket.width, bucket.frames) == (r["height"], r["width"], r["num_frames"])
        assert r["latent_shape"] == [16, latent_frames(bucket.frames), r["height"] // 8, r["width"] // 8]
        assert bucket.tokens(KINDS["t2v-a14b"]) <= BUDGET
        source, stored = r["source_width"] / r["source_height"], r["width"] / r["height"]
        assert abs(stored / source - 1) <= 0.10, r["bucket"]
        assert (r["height"] > r["width"]) == (r["source_height"] > r["source_width"]), r["bucket"]
        name = r["source"].rsplit("/", 1)[1]
        if name in IMAGES:
            assert IMAGES[name] == (r["source_height"], r["source_width"]) and r["num_frames"] == 1
            continue
        h, w, n = SOURCES[int(name[1:3])]
        assert (h, w) == (r["source_height"], r["source_width"])
        assert r["num_frames"] == max(f for f in (17, 13, 9) if f <= n)  # the longest bucket length it holds
    assert len({r["bucket"] for r in rows}) >= 6
    assert sum(summary["clips_by_bucket"].values()) == len(rows)
    assert summary["clips_by_bucket"]["144x80x9"] == 2  # the 12-frame 9:16 and 10-frame 3:5 sources: 9, not 13

    histogram = subprocess.run(
        [sys.executable, str(ROOT / "pipelines" / "buckets.py"), "--data", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert histogram.returncode == 0 and "144x80x9" in histogram.stdout and f"{len(rows):>7}" in histogram.stdout


def test_training_on_buckets_batches_one_bucket_per_micro_batch_and_resumes_exactly(bucketed, tiny_model, tmp_path):
    out, _ = bucketed
    bucket_of = {r["id"]: r["bucket"] for r in read_clips(out).select(["id", "bucket"]).to_pylist()}
    sets = [
        f"data.bucket_budget={BUDGET}",
        "train.workers=2",
        "train.batch_size=2",
        "train.log_every=1",
        "train.caption_dropout=0.0",
        "train.lr=3e-3",
        "train.checkpoint_every=12",
        "train.steps=24",
    ]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train_experts(tiny_config(tiny_model, *sets), "high", out, straight, log=lambda _: None)
    m = metrics(straight)
    losses = [x["loss"] for x in m]
    assert sum(losses[-4:]) / 4 < 0.8 * sum(losses[:4]) / 4, losses
    assert all(sum(x["buckets"].values()) >= 2 for x in m) and len({b for x in m for b in x["buckets"]}) >= 4
    for path in (straight / "high" / "data_order").glob("rank-*.jsonl"):
        for line in path.read_text().splitlines():
            ids = json.loads(line)["ids"]  # one micro-batch per step (grad_accum 1)
            assert len({bucket_of[i] for i in ids}) == 1, ids

    train_experts(tiny_config(tiny_model, *sets[:-1], "train.steps=12"), "high", out, resumed, log=lambda _: None)
    train_experts(tiny_config(tiny_model, *sets), "high", out, resumed, log=lambda _: None)
    a = checkpoint_state(latest_checkpoint(straight, "high"), tmp_path)
    b = checkpoint_state(latest_checkpoint(resumed, "high"), resumed)
    assert_same_training_state(a, b, atol=0)


def test_training_reads_version_1_shards_and_refuses_unknown_versions(bucketed, tmp_path):
    import pyarrow.parquet as pq

    from wanray.data.shards import bucket_counts, shard_paths
    from wanray.errors import DataError
    from wanray.schema import VERSION_KEY
    from wanray.train.data import ClipIndex

    out, _ = bucketed
    table = pq.read_table(shard_paths(out)[0])
    old = table.drop_columns(["bucket", "source_height", "source_width"])
    for version, d in (("1", tmp_path / "v1"), ("0", tmp_path / "v0")):
        d.mkdir()
        pq.write_table(
            old.replace_schema_metadata({VERSION_KEY: version.encode()}), d / "part-0.parquet", row_group_size=1
        )
    index = ClipIndex.from_dir(tmp_path / "v1")
    assert len(index) == len(table) and index.shapes
    assert sum(bucket_counts(tmp_path / "v1").values()) == len(table)
    with pytest.raises(DataError, match="schema version '0', this wanray reads 1 or 2"):
        ClipIndex.from_dir(tmp_path / "v0")
