"""Preprocessing on a real local Ray: parity with diffusers, rejects, resume after a kill, loaded encoders shared by
runs."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import decord
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import ROOT, tiny_config

from wanray import storage
from wanray.buckets import BucketSet
from wanray.data.preprocess import Preprocessor, run_preprocess
from wanray.data.shards import EMPTY_PROMPT_FILE, collect_rejects, read_clips, read_empty_prompt, shard_paths
from wanray.data.synthetic import SyntheticClip, render, write_dataset, write_mp4, write_shots
from wanray.data.video import decode_clip
from wanray.infer.evaluate import evaluate
from wanray.infer.validation import RECORD_FILE, Validation
from wanray.model_files import write_tiny_aesthetic, write_tiny_vlm
from wanray.schema import VERSION_KEY, ClipRow, pad_text_embedding
from wanray.train.export import export_run
from wanray.train.runs import checkpoints
from wanray.train.trainer import train_experts
from wanray.wan import KINDS


def _bad_inputs(root: Path, good: list[dict]) -> list[str]:
    """JSONL lines: the good clips plus one of each kind of bad input."""
    (root / "zero.mp4").write_bytes(b"")
    data = Path(good[0]["path"]).read_bytes()
    (root / "truncated.mp4").write_bytes(data[: len(data) // 2])
    (root / "notvideo.mp4").write_text("this is a text file, not a video\n" * 20)
    write_mp4(
        root / "short.mp4", render(SyntheticClip("s", "", 64, 64, 16, 3, "circle", "red", "gray", "left to right")), 16
    )
    lines = [json.dumps(g) for g in good]
    lines += [
        json.dumps({"path": "missing.mp4", "cap": "gone"}),
        json.dumps({"path": "zero.mp4", "cap": "zero bytes"}),
        json.dumps({"path": "truncated.mp4", "cap": "cut off"}),
        json.dumps({"path": "notvideo.mp4", "cap": "text"}),
        json.dumps({"path": "short.mp4", "cap": "three frames"}),
        json.dumps({"path": good[0]["path"]}),
        json.dumps({"path": good[1]["path"], "cap": ""}),
        json.dumps({"path": good[2]["path"], "cap": {"en": "dict"}}),
        '{"path": "x.mp4", "cap": "broken line"',
    ]
    return lines


@pytest.fixture(scope="module")
def prep(tmp_path_factory, tiny_model, synthetic, ray_cluster):
    root = tmp_path_factory.mktemp("prep_in")
    anno = json.loads((synthetic.parent / "data.json").read_text())
    good = [{"path": str(synthetic.parent / a["path"]), "cap": a["cap"]} for a in anno]
    manifest = root / "manifest.jsonl"
    manifest.write_text("\n".join(_bad_inputs(root, good)) + "\n")
    out = tmp_path_factory.mktemp("prep_out")
    summary = run_preprocess(tiny_config(tiny_model), str(manifest), str(out))
    return out, summary, good


def test_every_good_clip_written_and_every_bad_input_named(prep):
    out, summary, good = prep
    table = read_clips(out)
    assert sorted(table.column("caption").to_pylist()) == sorted(g["cap"] for g in good)
    assert summary["outcomes"]["written"] == len(good)
    assert summary["rejects_by_reason"] == {
        "file_not_found": 1,
        "empty_file": 1,
        "corrupt_video": 1,
        "not_a_video": 1,
        "too_short": 1,
        "missing_caption": 1,
        "empty_caption": 1,
        "caption_not_string": 1,
        "malformed_json_line": 1,
    }
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    by_reason = {r["reason"]: r["input"] for r in rejects}
    for reason, name in (
        ("file_not_found", "missing.mp4"),
        ("empty_file", "zero.mp4"),
        ("corrupt_video", "truncated.mp4"),
        ("not_a_video", "notvideo.mp4"),
        ("too_short", "short.mp4"),
    ):
        assert by_reason[reason].endswith(name), (reason, by_reason[reason])
    assert json.loads((out / "summary.json").read_text())["rows_in_output"] == len(good)


def test_shards_are_plain_pyarrow_with_schema_version(prep):
    out, _, _ = prep
    shard = shard_paths(out)[0]
    table = pq.read_table(shard)
    assert table.schema.metadata[VERSION_KEY] == b"3"
    row = table.slice(0, 1).to_pylist()[0]
    assert row["latent_dtype"] == "float32" and row["latent_shape"][0] == 16
    assert len(row["latent"]) == 4 * int(np.prod(row["latent_shape"]))
    assert row["text_tokens"] == row["text_embedding_shape"][0] and row["height"] == 64
    assert row["bucket"] == f"{row['height']}x{row['width']}x{row['num_frames']}" and row["source_height"] > 0


def test_latents_and_text_embeddings_match_diffusers(prep, tiny_model):
    from diffusers import AutoencoderKLWan, WanPipeline

    out, _, _ = prep
    cfg = tiny_config(tiny_model).data
    vae = AutoencoderKLWan.from_pretrained(tiny_model, subfolder="vae").eval()
    pipe = WanPipeline.from_pretrained(tiny_model)
    rows = [ClipRow.from_record(r) for r in read_clips(out).to_pylist()[:3]]
    for row in rows:
        clip = decode_clip(
            row.source,
            BucketSet.fixed(cfg.height, cfg.width, cfg.num_frames, cfg.min_frames, KINDS["t2v-a14b"]),
            cfg.fps,
        )
        video = torch.from_numpy(clip.frames).permute(3, 0, 1, 2)[None].float() / 127.5 - 1
        with torch.no_grad():
            z = vae.encode(video).latent_dist.mode()
        mean = torch.tensor(vae.config.latents_mean).view(1, 16, 1, 1, 1)
        inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, 16, 1, 1, 1)
        expected = (z - mean) * inv_std  # WanPipeline decodes with latents / inv_std + mean
        assert row.latent.shape == expected[0].shape == (16, (row.num_frames - 1) // 4 + 1, 8, 8)
        torch.testing.assert_close(row.latent, expected[0], atol=1e-5, rtol=0)
        with torch.no_grad():
            want, _ = pipe.encode_prompt(row.caption, do_classifier_free_guidance=False, max_sequence_length=512)
        torch.testing.assert_close(pad_text_embedding(row.text_embedding, 512), want[0], atol=1e-5, rtol=0)
    with torch.no_grad():
        empty, _ = pipe.encode_prompt("", do_classifier_free_guidance=False, max_sequence_length=512)
    torch.testing.assert_close(pad_text_embedding(read_empty_prompt(out), 512), empty[0], atol=1e-5, rtol=0)


def test_preprocessor_runs_share_one_set_of_loaded_encoders(prep, tmp_path, tiny_model):
    import ray
    from ray._private.state import actors  # the GCS actor table, dead actors included

    def started_actors() -> Counter:
        return Counter(a["ActorClassName"].rsplit(".", 1)[-1] for a in actors().values())

    def pid(actor) -> int:
        return ray.get(actor.__ray_call__.remote(lambda self: os.getpid()))

    one_shot, _, good = prep
    manifests = [tmp_path / "part0.jsonl", tmp_path / "part1.jsonl"]  # the second with every kind of bad input
    manifests[0].write_text("".join(json.dumps(g) + "\n" for g in good[:5]))
    manifests[1].write_text("\n".join(_bad_inputs(tmp_path, good)[5:]) + "\n")
    before = started_actors()
    with Preprocessor(tiny_config(tiny_model), log=lambda _: None) as pre:
        pids = [pid(a) for a in pre.vae + pre.text]
        summaries = [pre.run(str(m), str(tmp_path / f"out{i}")) for i, m in enumerate(manifests)]
        assert [pid(a) for a in pre.vae + pre.text] == pids  # the same processes served both runs
        handles = pre.vae + pre.text
    # the Preprocessor's 2 VAE and 1 text encoder actors, and no actor pool of either run
    assert started_actors() - before == Counter({"LatentEncoder": 2, "TextEncoder": 1})
    with pytest.raises(ray.exceptions.RayActorError):  # closed: the encoders are gone
        ray.get(handles[0].__ray_ready__.remote())
    with pytest.raises(RuntimeError, match="closed"):
        pre.run(str(manifests[0]), str(tmp_path / "again"))

    assert [s["outcomes"]["written"] for s in summaries] == [5, len(good) - 5]
    assert summaries[1]["rejects_by_reason"] == prep[1]["rejects_by_reason"]
    expected = {r["id"]: ClipRow.from_record(r) for r in read_clips(one_shot).to_pylist()}
    rows = [ClipRow.from_record(r) for i in range(2) for r in read_clips(tmp_path / f"out{i}").to_pylist()]
    assert sorted(r.id for r in rows) == sorted(expected)
    for row in rows:  # the same encoders as a one-shot run's, batched differently
        torch.testing.assert_close(row.latent, expected[row.id].latent, atol=1e-5, rtol=0)
        torch.testing.assert_close(row.text_embedding, expected[row.id].text_embedding, atol=1e-5, rtol=0)
    for i in range(2):
        assert torch.equal(read_empty_prompt(tmp_path / f"out{i}"), read_empty_prompt(one_shot))


def test_encode_on_spreads_a_block_over_the_actors_in_turn(ray_cluster):
    import ray

    from wanray.data.preprocess import encode_on

    @ray.remote(num_cpus=0.01)
    class Tagger:
        def __init__(self, name):
            self.name = name

        def __call__(self, batch):
            return {**batch, "actor": np.array([self.name] * len(batch["seq"]), dtype=object)}

    actors = [Tagger.remote("a"), Tagger.remote("b"), Tagger.remote("c")]
    batch = {
        "seq": np.arange(6, 13, dtype=np.int32),
        "caption": np.array([f"c{i}" for i in range(6, 13)], dtype=object),
    }
    out = encode_on(batch, actors, batch_size=2)
    # rows 6..12 in batches [6,7] [8,9] [10,11] [12]; the first is the run's 4th batch (6 // 2 = 3)
    assert out["seq"].tolist() == list(range(6, 13)) and out["caption"].tolist() == batch["caption"].tolist()
    assert out["actor"].tolist() == ["a", "a", "b", "b", "c", "c", "a"]
    for actor in actors:
        ray.kill(actor)


def test_killed_run_resumes_to_exactly_one_row_per_clip(tmp_path, tiny_model, ray_cluster):
    manifest = write_dataset(tmp_path / "videos", count=24, seed=7)
    out = tmp_path / "out"
    # small batches everywhere, so shards land one by one while the run goes on
    settings = [
        "preprocess.rows_per_shard=2",
        "preprocess.vae_batch_size=1",
        "preprocess.text_batch_size=1",
        "preprocess.vae_actors=1",
        "data.height=128",
        "data.width=128",
    ]
    cmd = [
        sys.executable,
        str(ROOT / "pipelines" / "preprocess.py"),
        "--config",
        str(ROOT / "configs/tiny.yaml"),
        "--data",
        str(manifest),
        "--out",
        str(out),
        "--set",
        f"model.path={tiny_model}",
    ]
    cmd += [a for s in settings for a in ("--set", s)]
    log = (tmp_path / "run.log").open("w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 240
    while not (out.exists() and shard_paths(out)) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, f"the run ended before it could be killed: {(tmp_path / 'run.log').read_text()[-2000:]}"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    partial = len(read_clips(out))
    assert 0 < partial < 24, (tmp_path / "run.log").read_text()[-2000:]
    summary = run_preprocess(tiny_config(tiny_model, *settings), str(manifest), str(out))
    ids = read_clips(out).column("id").to_pylist()
    assert len(ids) == len(set(ids)) == 24
    assert summary["outcomes"] == {"written": 24 - partial, "already_written": partial, "rejected": 0}
    # the empty-prompt embedding lost after every clip was done: a re-run encodes only it again
    empty = read_empty_prompt(out)
    (out / EMPTY_PROMPT_FILE).unlink()
    again = run_preprocess(tiny_config(tiny_model, *settings), str(manifest), str(out))
    assert again["outcomes"]["written"] == 0 and torch.equal(read_empty_prompt(out), empty)


def test_cli_bad_input_is_one_line_and_nonzero(tmp_path, ray_cluster):
    base = [sys.executable, str(ROOT / "pipelines" / "preprocess.py"), "--out", str(tmp_path / "o")]
    for extra, needle in [
        (["--data", str(tmp_path / "nope.txt")], "manifest not found"),
        (["--data", "x.txt", "--set", "data.fpz=2"], "unknown config key 'data.fpz'"),
    ]:
        r = subprocess.run(base + extra, capture_output=True, text=True, cwd=ROOT)
        assert r.returncode == 2
        assert needle in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_local_ray_keeps_idle_workers_for_the_next_run(tmp_path):
    """A local instance started by connect_ray keeps its idle workers on 2 CPUs (Ray alone keeps 2),
    so the fractional-CPU tasks of the next run start no new worker processes."""
    code = """
import os, time, ray
from wanray.runtime import connect_ray
connect_ray(num_cpus=2, include_dashboard=False)
@ray.remote(num_cpus=0.25)
def pid():
    time.sleep(1)
    return os.getpid()
first = set(ray.get([pid.remote() for _ in range(8)]))
time.sleep(5)  # Ray kills idle workers beyond its limit after 1 s
second = set(ray.get([pid.remote() for _ in range(8)]))
print("workers", len(first), "reused", len(first & second))
"""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_num_workers_soft_limit")}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=180, cwd=tmp_path
    )
    found = re.search(r"workers (\d+) reused (\d+)", out.stdout)
    assert found, out.stdout[-1000:] + out.stderr[-2000:]
    workers, reused = map(int, found.groups())
    assert reused == workers > 2, out.stdout  # every worker kept, more than the 2 Ray alone keeps


def test_a_near_duplicate_of_a_copy_rejected_later_is_written_in_its_place(
    tmp_path, tiny_model, ray_cluster, monkeypatch
):
    """The larger copy of a near-duplicate pair is kept and its smaller twin rejected as near_duplicate before
    any decoding; when the kept copy then fails at decode (here data.min_seconds: it plays twice as fast), the
    run deduplicates again, from the near pairs it found (the Ray Data comparison runs once a run), and writes
    the twin, so no footage is lost to a copy that was never stored."""
    from wanray.data import curate

    compared, near_pair_rows = [], curate.near_pair_rows
    monkeypatch.setattr(curate, "near_pair_rows", lambda *a: compared.append(a) or near_pair_rows(*a))
    original, faster = tmp_path / "original.mp4", tmp_path / "faster.mp4"
    write_shots(original, [30], seed=4)  # 96x160 at 16 fps: 1.9 s
    # the same frames at 120x200 and 32 fps: near duplicates (the hash takes the same frames), the larger first
    write_mp4(faster, decord.VideoReader(str(original), width=200, height=120).get_batch(list(range(30))).asnumpy(), 32)
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps({"path": p.name, "cap": "a shot"}) + "\n" for p in (original, faster)))
    cfg = tiny_config(tiny_model, "data.dedup=true", "data.dedup_distance=24", "data.min_seconds=1.2")
    log: list[str] = []
    summary = run_preprocess(cfg, str(manifest), str(tmp_path / "out"), log.append)
    assert [r["source"] for r in read_clips(tmp_path / "out").to_pylist()] == [str(original)]
    assert [(r["input"], r["reason"]) for r in collect_rejects(tmp_path / "out")] == [
        (str(faster), "below_min_duration")
    ]
    assert summary["outcomes"] == {"written": 1, "already_written": 0, "rejected": 1}, summary
    assert any("near duplicates: 1 of 2 clips" in line for line in log), log
    assert any("1 clip(s) kept among near duplicates were rejected: deduplicating again" in line for line in log)
    assert any("near duplicates: 0 of 2 clips (data.dedup_distance 24); 1 no longer" in line for line in log), log
    assert len(compared) == 1
    log.clear()
    again = run_preprocess(cfg, str(manifest), str(tmp_path / "out"), log.append)  # a rerun: nothing to do
    assert again["outcomes"] == {"written": 0, "already_written": 1, "rejected": 1}, again
    assert not any("deduplicating again" in line for line in log), log


def test_raw_videos_in_a_bucket_become_clips_that_train_resume_validate_and_export_in_buckets(
    tmp_path, tiny_model, ray_cluster, s3
):
    """Raw videos and their manifest in an S3 bucket (the loopback test server) are split, deduplicated, captioned
    and encoded into Parquet in another bucket (a rerun redoes nothing), and an expert trains from there into a
    run directory in a bucket, resumes from its checkpoints there, renders validation videos and exports."""
    long, reupload, other = tmp_path / "long.mp4", tmp_path / "reupload.mp4", tmp_path / "other.mp4"
    write_shots(long, [40, 56, 6], seed=3)  # hard cuts at frames 40 and 96
    # the same footage rescaled from 96x160 to 120x200 and encoded again: every clip of one a near duplicate of
    # the other's, and the larger copy's stay (the re-upload's, though its path sorts after)
    write_mp4(reupload, decord.VideoReader(str(long), width=200, height=120).get_batch(list(range(102))).asnumpy(), 16)
    write_shots(other, [30], seed=9)
    lines = [
        {"path": "long.mp4"},  # no caption: the VLM writes one for each of its clips
        {"path": "reupload.mp4"},
        {"path": "other.mp4", "cap": "the first second", "cut": [0, 17]},
        {"path": "gone.mp4"},  # not in the bucket
    ]
    s3.create_bucket(Bucket="raw")
    for f in (long, reupload, other):
        s3.upload_file(str(f), "raw", f"corpus/{f.name}")
    s3.put_object(Bucket="raw", Key="corpus/m.jsonl", Body="".join(json.dumps(line) + "\n" for line in lines))
    long, reupload, other = (f"s3://raw/corpus/{name}" for name in ("long.mp4", "reupload.mp4", "other.mp4"))
    manifest, out = "s3://raw/corpus/m.jsonl", "s3://prep/clips"
    s3.create_bucket(Bucket="prep")
    cfg = tiny_config(
        tiny_model,
        "data.max_clip_seconds=1.5",
        "data.min_clip_seconds=0.5",
        "data.min_frames=5",
        "data.dedup=true",
        "data.dedup_distance=24",  # flat synthetic frames: a rescale moves up to 22 of the 256 bits
        f"caption.model={write_tiny_vlm(tmp_path / 'tiny-vlm')}",
        f"data.aesthetic_model={write_tiny_aesthetic(tmp_path / 'aesthetic')}",
        "caption.frames=3",
        "caption.max_new_tokens=8",
    )
    log: list[str] = []
    summary = run_preprocess(cfg, manifest, out, log.append)
    rows = read_clips(out).to_pylist()
    shots = [(0, 25), (25, 40), (40, 65), (65, 90)]
    assert sorted((r["source"], r["cut_start"], r["cut_end"]) for r in rows) == sorted(
        [(reupload, a, b) for a, b in shots] + [(other, 0, 17)]
    )
    assert all(r["clip_start"] == r["cut_start"] and r["motion"] > 0 and np.isfinite(r["aesthetic"]) for r in rows)
    # the uncaptioned line's clips carry the VLM's caption and its name; the manifest's caption stays as it is
    assert {(r["caption"], r["caption_model"]) for r in rows if r["source"] == other} == {("the first second", None)}
    captioned = [r for r in rows if r["source"] == reupload]
    assert all(r["caption"] and r["caption_model"] == "tiny-vlm" for r in captioned)
    # each clip holds the frames of its range only: a 15-frame piece gives 13 frames (4n+1), not more
    assert {(r["cut_start"], r["num_frames"]) for r in rows if r["source"] == reupload} == {
        (0, 17),
        (25, 13),
        (40, 17),
        (65, 17),
    }
    rejects = {(r["input"], r["reason"]): r["detail"] for r in collect_rejects(out)}
    assert set(rejects) == {
        ("s3://raw/corpus/gone.mp4", "file_not_found"),
        *((f"{video}#{a}-{b}", "short_shot") for video in (long, reupload) for a, b in ((90, 96), (96, 102))),
        *((f"{long}#{a}-{b}", "near_duplicate") for a, b in shots),
    }
    for a, b in shots:  # each names the clip it duplicates, the same range of the larger copy
        assert rejects[(f"{long}#{a}-{b}", "near_duplicate")].startswith(f"near duplicate of {reupload}#{a}-{b} (")
    assert summary["clips_after_split"] == 9 and summary["outcomes"]["written"] == 5
    assert any("curated 4/4 videos: 9 clips" in line for line in log)  # the cut line: fingerprinted only
    assert any("captioned 4/4 clips" in line for line in log)  # the near duplicates are not captioned
    log.clear()
    again = run_preprocess(cfg, manifest, out, log.append)
    assert again["outcomes"]["written"] == 0 and not any(w in line for line in log for w in ("curated", "captioning"))
    # the run directory in a bucket too: Ray Train's checkpoints, the ranks' files and the validation videos
    lines: list[str] = []
    run, steps = "s3://runs/run", ["train.checkpoint_every=1", "train.log_every=1", "train.filters=[num_frames > 13]"]
    s3.create_bucket(Bucket="runs")
    train_experts(tiny_config(tiny_model, *steps, "train.steps=2"), "high", out, run, log=lines.append)
    assert any(f"train.filters keep 4 of the 5 clips of {out}" in line for line in lines)
    assert any("[train:high] step 2/2 loss" in line for line in lines)  # followed from the bucket's console.log
    s3.put_object(Bucket="runs", Key="validation.txt", Body=b"a red circle\n")
    validating = ["train.validation.every=3", "train.validation.prompts_file=s3://runs/validation.txt"]
    cfg = tiny_config(tiny_model, *steps, *validating, "train.validation.num_inference_steps=2", "train.steps=3")
    train_experts(cfg, "high", out, run, log=lines.append, validation=Validation(cfg, tiny_model))
    assert any("[train:high] resumed at step 2 (epoch" in line for line in lines)
    metrics = [json.loads(line) for line in storage.read_text(f"{run}/high/metrics.jsonl").splitlines()]
    assert [m["step"] for m in metrics if "loss" in m] == [1, 2, 3]
    for rank in (0, 1):  # each data-parallel rank's order, appended to across the two starts
        order = storage.read_text(f"{run}/high/data_order/rank-0000{rank}.jsonl").splitlines()
        assert [json.loads(line)["step"] for line in order] == [1, 2, 3]
    assert sorted(checkpoints(run, "high")) == [2, 3]  # train.keep_checkpoints: 2
    (record,) = [json.loads(line) for line in storage.read_text(f"{run}/high/validation/{RECORD_FILE}").splitlines()]
    assert record["step"] == 3 and "error" not in record, record
    assert record["videos"] == [f"{run}/high/validation/step_3/00.mp4"] and storage.info(record["videos"][0]).size
    assert storage.is_file(f"{run}/high/wanray_run.json") and storage.list_files(f"{run}/high/tensorboard")
    exported: list[str] = []
    export_run(cfg, run, "s3://runs/export", log=exported.append)
    assert any(f"high-noise expert from {run}/high/checkpoint_" in line for line in exported)
    assert storage.is_file("s3://runs/export/model_index.json")

    # the run evaluated from the bucket into the bucket, and the UI's pages find both there
    from wanray.infer.browse import ReportView, Roots, list_reports, list_runs

    evaluated = tiny_config(tiny_model, "infer.num_inference_steps=2")
    results = evaluate(evaluated, [f"ft={run}"], "s3://runs/validation.txt", "s3://runs/eval", log=lines.append)
    assert lines[-1] == "[evaluate] wrote s3://runs/eval/metrics.json and s3://runs/eval/report.html"
    assert json.loads(storage.read_text("s3://runs/eval/metrics.json")) == results
    roots = Roots(["s3://runs"], "ui.runs_roots")
    assert list_runs(roots) == [run] and list_reports(roots) == ["s3://runs/eval"]
    ((video, caption),) = ReportView.open(roots, "s3://runs/eval").videos()
    assert caption == "ft · a red circle" and storage.info(video).size
