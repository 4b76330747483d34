"""Preprocessing throughput, measured side by side in one run on the same clips.

    python benchmarks/preprocess.py [--clips 256] [--small 32] [--repeats 3] [--size 128] [--frames 17]

Prints (Ray start-up and worker warm-up timed and stated apart, never inside a ratio):
 (a) pipeline clips/s over a sequential single-process loop doing the same decode and encode
 (b) decode-stage frames/s (Ray Data tasks) over bare decord get_batch on the same files and indices:
     --hd-clips source videos of 480x832 at 24 fps, 6 s each, cut to --hd-frames frames at 16 fps
     and resized to --size (decoding tiny clips would measure only Ray's per-task overhead)
 (c) pipeline seconds per clip at --small and at --clips clips (the --small run repeated, its median used):
     one-shot runs (run_preprocess, which starts the encoder actor pools inside each run), and the
     runs of one Preprocessor (encoders loaded once, before its first run); with the fixed and
     per-clip cost each pair of sizes implies
 (d) peak memory (RSS summed over the driver and all Ray worker processes; RSS of the loop)
 (e) buckets: pipeline clips/s on the mixed-shape synthetic set (16:10, 1:1, 16:9, 3:5 and 3:5.2
     sources) stored in aspect-ratio buckets within the single size's token budget, against the same
     set at the single size, runs alternated (--repeats each); and the share of each source's pixels
     the stored clip keeps (area after the crop / area before), bucketed vs single-size
 (f) curation of raw long videos (--long-videos of 8 shots, 2-4 s each, 160x96 at 16 fps): clips/s through
     splitting + fingerprinting (Ray Data tasks) and the near-duplicate groupby with one CPU worker and with
     two, and clips/s through captioning (the tiny random Qwen2.5-VL: its cost is not a real
     VLM's, the pool around it is measured) with one captioner actor and with two
"""

import argparse
import contextlib
import json
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path

import psutil
import ray
import torch

from wanray import model_files, models
from wanray.buckets import BucketSet
from wanray.config import load_config
from wanray.data.manifest import read_manifest
from wanray.data.preprocess import Preprocessor, decode_dataset, run_preprocess
from wanray.data.synthetic import make_clips, render, write_dataset, write_shots
from wanray.data.video import decode_clip, plan_clip
from wanray.encoding import encode_latents, encode_text, frames_to_video
from wanray.io import write_mp4
from wanray.runtime import connect_ray
from wanray.wan import KINDS

ROOT = Path(__file__).resolve().parents[1]


class PeakRSS:
    """Samples the summed RSS of this process and every Ray worker every 0.1 s."""

    def __init__(self, ray_workers: bool):
        self.ray_workers, self.peak, self._stop = ray_workers, 0, threading.Event()

    def _sample(self) -> int:
        procs = [psutil.Process()]
        if self.ray_workers:
            procs += [p for p in psutil.process_iter(["cmdline"]) if any("ray::" in c for c in p.info["cmdline"] or [])]
        total = 0
        for p in procs:
            with contextlib.suppress(psutil.Error):
                total += p.memory_info().rss
        return total

    def __enter__(self):
        def loop():
            while not self._stop.wait(0.1):
                self.peak = max(self.peak, self._sample())

        self._thread = threading.Thread(target=loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def sequential(cfg, sources, model_path) -> float:
    """The same decode + VAE + UMT5 work, one clip after another in this process (seconds)."""
    d = cfg.data
    vae, tok, te = models.load_vae(model_path), models.load_tokenizer(model_path), models.load_text_encoder(model_path)
    start = time.perf_counter()
    for s in sources:
        clip = decode_clip(
            s.path, BucketSet.fixed(d.height, d.width, d.num_frames, d.min_frames, KINDS["t2v-a14b"]), d.fps
        )
        encode_latents(vae, frames_to_video(clip.frames)[None])
        encode_text(tok, te, [s.caption])
    return time.perf_counter() - start


def pipeline(run, manifest, work: Path, name: str) -> tuple[float, int]:
    """One preprocessing run of `manifest` into a new directory: `run(manifest, out_dir)`."""
    out = work / f"out-{name}"
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    summary = run(str(manifest), str(out))
    return time.perf_counter() - start, summary["outcomes"]["written"]


def scaling(run, small, big, work: Path, name: str, repeats: int) -> tuple[float, float, int, int]:
    """(seconds at --small: the median of `repeats` runs, seconds at --clips, their clip counts)."""
    t_big, n_big = pipeline(run, big, work, f"{name}-big")
    smalls = [pipeline(run, small, work, f"{name}-small{i}") for i in range(repeats)]
    return statistics.median(t for t, _ in smalls), t_big, smalls[0][1], n_big


def print_scaling(label: str, t_small: float, t_big: float, n_small: int, n_big: int) -> None:
    s_small, s_big = t_small / n_small, t_big / n_big
    marginal = (t_big - t_small) / (n_big - n_small)  # the two runs as a line: time = fixed + clips * marginal
    print(
        f"    {label}: {s_small:.3f} at {n_small} clips, {s_big:.3f} at {n_big} clips: {s_small / s_big:.2f}x "
        f"(target within 15%), i.e. {t_small - n_small * marginal:.1f}s fixed per run + {marginal:.3f}s per clip"
    )


def count_frames(batch: dict) -> dict:
    return {"frames": [int(batch["num_frames"].sum())]}


def decode_stage(cfg, sources, work: Path) -> tuple[float, int]:
    """The pipeline's decode stage alone; frame counting fuses into the same tasks."""
    start = time.perf_counter()
    ds = decode_dataset(sources, cfg, str(work), KINDS["t2v-a14b"])
    # summed on the driver: Dataset.sum() would add a shuffle stage that starts its own actors
    frames = sum(
        r["frames"]
        for r in ds.map_batches(count_frames, batch_size=None, num_cpus=cfg.preprocess.decode_cpus).iter_rows()
    )
    return time.perf_counter() - start, frames


def bare_decord(cfg, sources) -> tuple[float, int]:
    import decord

    d, frames = cfg.data, 0
    start = time.perf_counter()
    for s in sources:
        reader = decord.VideoReader(s.path, ctx=decord.cpu(0), num_threads=1)
        plan = plan_clip(reader.get_avg_fps(), len(reader), d.fps, d.num_frames, d.min_frames)
        frames += reader.get_batch(plan.indices).asnumpy().shape[0]
    return time.perf_counter() - start, frames


def write_hd_videos(root: Path, count: int):
    """480x832, 24 fps, 6 s synthetic videos: decoding them costs what real footage costs."""
    import dataclasses

    root.mkdir(parents=True)
    clips = [dataclasses.replace(c, height=480, width=832, fps=24, num_frames=144) for c in make_clips(count, seed=3)]
    for c in clips:
        write_mp4(root / c.name, render(c), c.fps)
    manifest = root / "data.jsonl"
    manifest.write_text("".join(json.dumps({"path": c.name, "cap": c.caption}) + "\n" for c in clips))
    return read_manifest(manifest)[0]


def pixels_kept(out: Path) -> float:
    """Mean over clips of the stored crop's share of its source's area (resize to cover, center crop)."""
    from wanray.data.shards import read_clips

    rows = read_clips(out).select(["height", "width", "source_height", "source_width"]).to_pylist()
    shares = [(r["height"] / r["width"]) / (r["source_height"] / r["source_width"]) for r in rows]
    return statistics.mean(min(x, 1 / x) for x in shares)  # cover-and-crop keeps the ratio of the aspect ratios


def buckets_vs_single(cfg, manifest, work: Path, repeats: int) -> tuple[float, float, float, float]:
    """(clips/s single-size, clips/s bucketed, pixels kept single-size, pixels kept bucketed)."""
    d = cfg.data
    budget = KINDS["t2v-a14b"].tokens(d.num_frames, d.height, d.width)  # the tiny T2V model of tiny.yaml
    bucketed = load_config(
        ROOT / "configs" / "tiny.yaml",
        [
            f"model.path={cfg.model.path}",
            f"data.height={d.height}",
            f"data.width={d.width}",
            f"data.num_frames={d.num_frames}",
            f"data.bucket_budget={budget}",
        ],
    )
    times = {"single": [], "buckets": []}
    for i in range(repeats):
        for name, c in (("single", cfg), ("buckets", bucketed)):
            t, n = pipeline(lambda m, o, c=c: run_preprocess(c, m, o, log=lambda _: None), manifest, work, f"{name}{i}")
            times[name].append(n / t)
    return (
        statistics.median(times["single"]),
        statistics.median(times["buckets"]),
        pixels_kept(work / "out-single0"),
        pixels_kept(work / "out-buckets0"),
    )


def curation(work: Path, videos: int) -> None:
    """(f): splitting + fingerprinting + dedup with 1 and 2 CPU workers, captioning with 1 and 2 actors."""
    import random

    from wanray.data.caption import caption_clips
    from wanray.data.curate import curate_sources
    from wanray.model_files import write_tiny_vlm

    rng = random.Random(0)
    raw = work / "raw"
    raw.mkdir()
    lines = []
    for i in range(videos):
        write_shots(raw / f"raw{i:03d}.mp4", [rng.randint(32, 64) for _ in range(8)], seed=i)
        lines.append(json.dumps({"path": f"raw{i:03d}.mp4"}))
    (raw / "raw.jsonl").write_text("\n".join(lines) + "\n")
    vlm = write_tiny_vlm(work / "tiny-vlm")
    base = [f"model.path={work / 'model'}", "data.max_clip_seconds=2", "data.min_frames=9", "data.dedup=true"]
    base += [f"caption.model={vlm}", "caption.frames=4", "caption.max_new_tokens=16", "caption.batch_size=4"]
    base += ["preprocess.clips_per_decode_task=1"]
    rates = {}
    for workers in (1, 2, 1, 2):  # alternated: the machine's noise falls on both
        cfg = load_config(ROOT / "configs" / "tiny.yaml", [*base, f"preprocess.decode_cpus={2 / workers}"])
        sources, _ = read_manifest(raw / "raw.jsonl", uncaptioned=True)
        out = work / f"curate-{workers}-{len(rates)}"
        out.mkdir()
        t0 = time.perf_counter()
        clips = curate_sources(sources, cfg, str(out), set(), set(), lambda _: None).clips
        elapsed = time.perf_counter() - t0
        rates.setdefault(workers, []).append((len(clips), elapsed))
    for i, actors in enumerate((1, 2, 1, 2)):
        cfg = load_config(ROOT / "configs" / "tiny.yaml", [*base, f"caption.actors={actors}"])
        out = work / f"caption-{i}"
        out.mkdir()
        t0 = time.perf_counter()
        captioned = caption_clips(clips, cfg, str(out), set(), lambda _: None)
        rates.setdefault(f"caption{actors}", []).append((len(captioned), time.perf_counter() - t0))

    def rate(key) -> float:
        return statistics.median(n / t for n, t in rates[key])

    print(
        f"(f) {videos} raw videos -> {len(clips)} clips: split + fingerprint + dedup {rate(1):.2f} clips/s on one "
        f"CPU worker, {rate(2):.2f} on two: {rate(2) / rate(1):.2f}x; captioning {rate('caption1'):.2f} clips/s "
        f"with one actor, {rate('caption2'):.2f} with two: {rate('caption2') / rate('caption1'):.2f}x"
    )


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clips", type=int, default=256)
    ap.add_argument("--small", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3, help="runs at --small (median used)")
    ap.add_argument("--size", type=int, default=128, help="clip height and width")
    ap.add_argument("--frames", type=int, default=17)
    ap.add_argument("--hd-clips", type=int, default=32, help="480x832 source videos for (b)")
    ap.add_argument("--hd-frames", type=int, default=81, help="clip frames cut from each of them in (b)")
    ap.add_argument("--long-videos", type=int, default=8, help="raw videos of 8 shots each for (f)")
    ap.add_argument("--parts", default="abcdef", help="which of (a)-(f) to measure, e.g. --parts e")
    args = ap.parse_args()
    parts = set(args.parts)
    work = Path(tempfile.mkdtemp(prefix="wanray-bench-"))
    size = [f"data.height={args.size}", f"data.width={args.size}"]
    cfg = load_config(
        ROOT / "configs" / "tiny.yaml", [f"model.path={work / 'model'}", *size, f"data.num_frames={args.frames}"]
    )
    model_path = str(model_files.ensure_model(cfg.model))
    big = write_dataset(work / "big", count=args.clips, seed=0)
    small = work / "big" / "small.json"  # the first --small clips of the same set
    small.write_text(json.dumps(json.loads((work / "big" / "data.json").read_text())[: args.small]))
    sources, _ = read_manifest(big)
    print(
        f"{args.clips} synthetic clips -> {args.size}x{args.size}x{args.frames}; "
        f"torch threads {torch.get_num_threads()}"
    )

    if "a" in parts or "d" in parts:
        with PeakRSS(ray_workers=False) as seq_mem:
            t_seq = sequential(cfg, sources, model_path)
    t0 = time.perf_counter()
    connect_ray(num_cpus=psutil.cpu_count(), include_dashboard=False)
    t_ray = time.perf_counter() - t0
    quiet = lambda _: None
    one_shot = lambda manifest, out: run_preprocess(cfg, manifest, out, log=quiet)
    t0 = time.perf_counter()
    pipeline(one_shot, small, work, "warmup")
    t_warm = time.perf_counter() - t0
    print(
        f"ray start-up {t_ray:.1f}s, first pipeline run (worker warm-up) on {args.small} clips {t_warm:.1f}s "
        "-- excluded below"
    )
    if parts & set("acd"):
        with PeakRSS(ray_workers=True) as pipe_mem:
            one_shot_scaling = scaling(one_shot, small, big, work, "one-shot", args.repeats)
        _, t_big, _, n_big = one_shot_scaling
        t0 = time.perf_counter()
        with Preprocessor(cfg, log=quiet) as pre:
            t_load = time.perf_counter() - t0
            t0 = time.perf_counter()
            pipeline(pre.run, small, work, "preprocessor-warmup")  # its new task workers import the encode code
            t_pre_warm = time.perf_counter() - t0
            session_scaling = scaling(pre.run, small, big, work, "preprocessor", args.repeats)
        assert n_big == args.clips and one_shot_scaling[2:] == session_scaling[2:] == (args.small, args.clips)
        print(f"Preprocessor encoders loading {t_load:.1f}s and its first run {t_pre_warm:.1f}s -- excluded below")
    if "a" in parts:
        print(
            f"(a) pipeline {n_big / t_big:.2f} clips/s vs sequential loop {args.clips / t_seq:.2f} clips/s: "
            f"{t_seq / t_big:.2f}x (target >= 1.7x); Preprocessor runs {n_big / session_scaling[1]:.2f} clips/s"
        )
    if "b" in parts:
        hd = write_hd_videos(work / "hd", args.hd_clips)
        hd_cfg = load_config(ROOT / "configs" / "tiny.yaml", [*size, f"data.num_frames={args.hd_frames}"])
        decode_stage(hd_cfg, hd, work / "decode")  # its new task workers import the decode code once
        t_dec, f_dec = decode_stage(hd_cfg, hd, work / "decode")
        t_bare, f_bare = bare_decord(hd_cfg, hd)
        assert f_dec == f_bare
        print(
            f"(b) {args.hd_clips} videos 480x832 -> {args.size}x{args.size}x{args.hd_frames}: decode stage "
            f"{f_dec / t_dec:.0f} frames/s vs bare decord get_batch {f_bare / t_bare:.0f} frames/s: "
            f"{(f_dec / t_dec) / (f_bare / t_bare):.2f}x (target >= 0.85)"
        )
    if "c" in parts:
        print(f"(c) seconds per clip (median of {args.repeats} runs at {args.small} clips)")
        print_scaling("Preprocessor runs, encoders loaded once", *session_scaling)
        print_scaling("one-shot runs, encoder pools starting in each", *one_shot_scaling)
    if "d" in parts:
        print(
            f"(d) peak RSS: pipeline {pipe_mem.peak / 2**20:.0f} MiB (driver + Ray workers), "
            f"sequential loop {seq_mem.peak / 2**20:.0f} MiB"
        )
    if "e" in parts:
        single, bucketed, kept_single, kept_buckets = buckets_vs_single(cfg, big, work, args.repeats)
        print(
            f"(e) mixed shapes, {args.clips} clips: bucketed {bucketed:.2f} clips/s vs single-size {single:.2f} "
            f"clips/s: {bucketed / single:.2f}x (target within 15%); source pixels kept: bucketed "
            f"{kept_buckets:.1%}, single-size {kept_single:.1%}"
        )
    if "f" in parts:
        curation(work, args.long_videos)
    ray.shutdown()
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
