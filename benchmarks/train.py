"""Training throughput, measured side by side in one run on the same model and clips.

    python benchmarks/train.py [--clips 64] [--size 128] [--steps 80] [--parts 1234]

Prints:
 (1) data-wait fraction at steady state of a Ray Train run (2 workers, first 20% of steps
     dropped), streaming Parquet every epoch and with the in-memory epoch cache
 (2) step time training from the precomputed Parquet over step time encoding the same clips
     online (decode + VAE + UMT5 every step), same process, same model and train step
 (3) per-rank memory with 1 and with 2 workers (parameters + optimizer state; peak RSS)
 (4) per-rank memory of one forward + backward against sequence length, with context parallelism
     (Ulysses) over 1, 2 and 4 gloo ranks on CPU: the bytes autograd saves for backward, and the peak
     of live tensors (wanray.infer.plan.LiveBytes: gradients and communication buffers included)
"""

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import ray
import torch

from wanray import model_files, models
from wanray.buckets import BucketSet
from wanray.config import load_config
from wanray.data.manifest import read_manifest
from wanray.data.preprocess import run_preprocess
from wanray.data.shards import read_empty_prompt, shard_paths
from wanray.data.synthetic import write_dataset
from wanray.data.video import decode_clip
from wanray.encoding import encode_latents, encode_text, frames_to_video
from wanray.runtime import connect_ray
from wanray.schema import ClipRow, pad_text_embedding
from wanray.train.data import Batch, ClipIndex
from wanray.train.loop import LoopSpec, draw_for, flow_loss
from wanray.train.trainer import train_experts
from wanray.wan import KINDS, TEXT_TOKENS

ROOT = Path(__file__).resolve().parents[1]


def ray_run(cfg, data, out: Path, **sets) -> list[dict]:
    from dataclasses import replace

    cfg = replace(cfg, train=replace(cfg.train, **sets))
    shutil.rmtree(out, ignore_errors=True)
    train_experts(cfg, "high", data, out, log=lambda _: None)
    return [json.loads(line) for line in (out / "high" / "metrics.jsonl").read_text().splitlines()]


def steady(metrics: list[dict], key: str) -> float:
    tail = metrics[len(metrics) // 5 :]
    return sum(m[key] for m in tail) / len(tail)


def step_times(cfg, data: Path, sources, model_path: str, steps: int) -> tuple[float, float]:
    """(seconds per step from Parquet, seconds per step encoding online), one process."""
    d = cfg.data
    model = models.load_expert(model_path, "high").train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr)
    spec = LoopSpec(
        cfg,
        "high",
        model_path,
        models.read_contract(model_path, cfg.model),
        ClipIndex.from_dir(data),
        "native",
        read_empty_prompt(data),
        "",
    )
    empty = pad_text_embedding(spec.empty_prompt, TEXT_TOKENS)

    def train_step(batch, step):
        batch.index = step
        loss = flow_loss(model, batch, draw_for(batch, spec), empty, spec, torch.device("cpu"))
        loss.backward()
        opt.step()
        opt.zero_grad()

    rows = [r for p in shard_paths(data) for r in pq.read_table(p).to_pylist()]
    start = time.perf_counter()
    for step in range(steps):
        row = ClipRow.from_record(rows[step % len(rows)])
        train_step(Batch(row.latent[None], pad_text_embedding(row.text_embedding, TEXT_TOKENS)[None]), step)
    t_parquet = (time.perf_counter() - start) / steps

    vae, tok, te = models.load_vae(model_path), models.load_tokenizer(model_path), models.load_text_encoder(model_path)
    start = time.perf_counter()
    for step in range(steps):
        s = sources[step % len(sources)]
        clip = decode_clip(
            s.path, BucketSet.fixed(d.height, d.width, d.num_frames, d.min_frames, KINDS["t2v-a14b"]), d.fps
        )
        latent = encode_latents(vae, frames_to_video(clip.frames)[None])
        (text,) = encode_text(tok, te, [s.caption])
        train_step(Batch(latent, pad_text_embedding(text, TEXT_TOKENS)[None]), step)
    return t_parquet, (time.perf_counter() - start) / steps


CP_EXPERT = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=8,
    attention_head_dim=32,
    in_channels=16,
    out_channels=16,
    text_dim=64,
    freq_dim=64,
    ffn_dim=512,
    num_layers=2,
)
"""A small Wan transformer (dim 256, 8 heads) whose activations dominate its weights at these lengths."""


def cp_rank_memory(rank: int, world: int, port: int, frames: int, out: str) -> None:
    """One rank of a Ulysses group of `world`: forward + backward of one 32x32-latent sample of `frames`
    latent frames (256 tokens each); writes (saved bytes, peak live bytes) for rank 0."""
    import torch.distributed as dist
    from diffusers import WanTransformer3DModel

    from wanray import context_parallel
    from wanray.infer.plan import LiveBytes
    from wanray.train.plan import _saved_bytes

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = WanTransformer3DModel(**CP_EXPERT)
    cpu = torch.device("cpu")
    if world > 1:
        context_parallel.enable(model, world, 1, context_parallel.mesh(cpu, world, 1), cpu)
    inputs = {
        "hidden_states": torch.randn(1, 16, frames, 32, 32),
        "timestep": torch.tensor([500.0]),
        "encoder_hidden_states": torch.randn(1, 64, 64),
    }
    saved = _saved_bytes(model, inputs)
    tracker = LiveBytes([*model.parameters(), *model.buffers(), *inputs.values()])
    with tracker:
        model(**inputs, return_dict=False)[0].pow(2).mean().backward()
    if rank == 0:
        Path(out).write_text(json.dumps([saved, tracker.peak]))
    dist.destroy_process_group()


def context_parallel_memory(work: Path) -> None:
    import torch.multiprocessing as mp

    from wanray.runtime import free_port

    base = {}
    for frames in (4, 8, 16):
        row = []
        for degree in (1, 2, 4):
            out = work / f"cp-{frames}-{degree}.json"
            mp.spawn(cp_rank_memory, args=(degree, free_port(), frames, str(out)), nprocs=degree)
            saved, peak = json.loads(out.read_text())
            base.setdefault(frames, (saved, peak))
            row.append(
                f"Ulysses {degree}: saved {saved / 2**20:6.1f} MiB ({saved / base[frames][0]:.2f}x), "
                f"peak {peak / 2**20:6.1f} MiB ({peak / base[frames][1]:.2f}x)"
            )
        print(f"(4) {frames * 256:>5} tokens per sample, per rank: " + "; ".join(row))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clips", type=int, default=64)
    ap.add_argument("--size", type=int, default=128, help="clip height and width")
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--parts", default="1234", help="which measurements to run: digits of 1-4 (1-3 share one Ray run)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="wanray-train-bench-"))
    if "4" in args.parts:
        context_parallel_memory(work)
    if not set(args.parts) & set("123"):
        shutil.rmtree(work, ignore_errors=True)
        return
    cfg = load_config(
        ROOT / "configs" / "tiny.yaml",
        [
            f"model.path={work / 'model'}",
            f"data.height={args.size}",
            f"data.width={args.size}",
            f"train.steps={args.steps}",
            "train.log_every=1",
            f"train.checkpoint_every={args.steps}",
        ],
    )
    model_path = str(model_files.ensure_model(cfg.model))
    manifest = write_dataset(work / "videos", count=args.clips)
    connect_ray(num_cpus=2, include_dashboard=False)
    t0 = time.perf_counter()
    run_preprocess(cfg, str(manifest), str(work / "prep"), log=lambda _: None)
    print(
        f"{args.clips} clips {args.size}x{args.size}x{cfg.data.num_frames}, preprocessed in "
        f"{time.perf_counter() - t0:.1f}s (Ray start-up and preprocessing excluded below)"
    )

    streamed = ray_run(cfg, work / "prep", work / "run-stream", workers=2, cache_bytes=0)
    cached = ray_run(cfg, work / "prep", work / "run-cache", workers=2)
    one = ray_run(cfg, work / "prep", work / "run-one", workers=1)
    print(
        f"(1) steady-state data-wait fraction, 2 workers: {steady(streamed, 'data_wait_fraction'):.1%} streaming "
        f"Parquet every epoch, {steady(cached, 'data_wait_fraction'):.1%} with the epoch cache (target <= 5%); "
        f"{steady(cached, 'samples_per_s'):.1f} samples/s"
    )

    sources, _ = read_manifest(manifest)
    t_parquet, t_online = step_times(cfg, work / "prep", sources, model_path, min(args.steps, 40))
    print(
        f"(2) step time: {t_parquet * 1e3:.1f} ms from Parquet vs {t_online * 1e3:.1f} ms encoding online: "
        f"{t_parquet / t_online:.3f}x the time ({t_online / t_parquet:.1f}x faster)"
    )
    for name, m in (("1 worker ", one), ("2 workers", cached)):
        last = m[-1]
        print(
            f"(3) {name}: rank-0 parameters + optimizer {(last['param_bytes'] + last['optimizer_bytes']) / 2**20:.2f} "
            f"MiB (sharded over {last['params_sharded_over']}), peak RSS {last['peak_memory_bytes'] / 2**20:.0f} MiB"
        )
    ray.shutdown()
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
