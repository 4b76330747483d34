"""Serving overhead and stage overlap, measured side by side in one run.

    python benchmarks/serve.py [--steps 20] [--flow-shift 6.0] [--size 64] [--frames 17] [--requests 4]

Prints (Ray and Serve start-up timed and stated apart, never inside a ratio; the two sides of
each ratio are timed in turns, so that other load on the machine hits both alike):
 (a) single-request latency through Serve (HTTP -> ingress -> 4 stage replicas -> mp4) over the
     same sampler in this process (encode, both experts, decode, mp4), both at 1 torch thread
 (b) throughput of --requests concurrent requests over the same requests sent one after another
 (c) throughput of --requests concurrent requests with 2 replicas of every stage (1 torch thread each)
     over 1 replica of every stage (2 torch threads each): the same CPU budget, redeployed in turns
 (d) one request in-process with classifier-free guidance as one batch-2 forward (infer.batched_guidance)
     over two forwards, and the largest difference of their frames
 (e) one request in-process with diffusers' first-block cache (infer.cache=first_block at each --cache threshold)
     over none, and the cached frames' PSNR and SSIM against the uncached ones (same seed)
 (f) serving two fine-tunes (rank-16 LoRA adapters of every attention projection and FFN linear): a request
     that switches adapter on the live deployment over redeploying the application on the other fine-tune's
     merged model directory and sending the request (the way to serve two fine-tunes without adapters)
 (g) one request in-process with two stacked adapters over none

The model is the tiny checkpoint with its two experts widened (dim 384, 8 layers), so that,
as in the real Wan2.2, the denoising stages dominate a request and not the VAE. Overlap can
only hide the shorter expert stage behind the longer one: the printed high/low step split
bounds the gain (flow shift 6.0 at 20 steps splits 10/10; the official T2V 12.0 at 40 steps
splits 26/14).
"""

import argparse
import concurrent.futures
import contextlib
import dataclasses
import os
import statistics
import tempfile
import time
from pathlib import Path

import psutil
import requests
import torch

from wanray import model_files, models
from wanray.config import load_config
from wanray.infer.calibrate import frame_quality
from wanray.infer.request import GenerationParams
from wanray.infer.sampler import Sampler
from wanray.infer.spec import StageSpec
from wanray.infer.video import mp4_bytes
from wanray.runtime import connect_ray, free_port

ROOT = Path(__file__).resolve().parents[1]
WIDE_EXPERT = dict(num_attention_heads=8, attention_head_dim=48, ffn_dim=1536, num_layers=8)


def write_bench_checkpoint(path: Path) -> Path:
    """The tiny checkpoint with wider experts (~14 M parameters each; the tiny ones have ~0.03 M)."""
    from diffusers import WanTransformer3DModel

    model_files.write_tiny_checkpoint(path)
    torch.manual_seed(1)
    for sub in models.EXPERT_SUBFOLDERS.values():
        WanTransformer3DModel(**{**model_files.TINY_TRANSFORMER, **WIDE_EXPERT}).save_pretrained(path / sub)
    return path


class ForeignCpu:
    """CPUs that processes outside this one and its descendants (Ray and its workers) kept busy, on average."""

    @staticmethod
    def _busy() -> tuple[float, float]:
        t = psutil.cpu_times()
        system = t.user + t.nice + t.system + t.irq + t.softirq + getattr(t, "steal", 0.0)
        own = 0.0
        for proc in [psutil.Process(), *psutil.Process().children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                own += sum(proc.cpu_times()[:2])
        return system, own

    def __enter__(self):
        self.start, (self.system, self.own) = time.perf_counter(), self._busy()
        return self

    def __exit__(self, *exc):
        system, own = self._busy()
        self.cpus = max(0.0, (system - self.system) - (own - self.own)) / (time.perf_counter() - self.start)


def interleaved(a, b, rounds: int, warm_up: bool = True) -> tuple[float, float]:
    """Median wall seconds of a() and of b(), taken in turns so that drifting load hits both alike."""
    if warm_up:
        a(), b()
    times: tuple[list, list] = ([], [])
    for _ in range(rounds):
        for fn, out in zip((a, b), times):
            start = time.perf_counter()
            fn()
            out.append(time.perf_counter() - start)
    return statistics.median(times[0]), statistics.median(times[1])


def get_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--flow-shift", type=float, default=6.0)
    parser.add_argument("--size", type=int, default=64, help="height = width, pixels")
    parser.add_argument("--frames", type=int, default=17)
    parser.add_argument("--requests", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3, help="timed pairs for the latency figures (median)")
    parser.add_argument(
        "--cache", type=float, nargs="+", default=[0.1, 0.3, 0.6], help="first-block cache thresholds for (e)"
    )
    return parser.parse_args()


def stage_seconds(sampler: Sampler, params: GenerationParams, fps: float) -> dict:
    """Wall seconds of each stage of one request in this process (after the warm-up runs)."""
    times, start = {}, time.perf_counter()
    text = sampler.prompt_encoder.encode(params)
    times["text"], start = time.perf_counter() - start, time.perf_counter()
    state = sampler.high.denoise(params, text)
    times["high"], start = time.perf_counter() - start, time.perf_counter()
    state = sampler.low.denoise(params, text, state)
    times["low"], start = time.perf_counter() - start, time.perf_counter()
    mp4_bytes(sampler.decoder.decode(state), fps)
    times["vae"] = time.perf_counter() - start
    times["high_steps"] = int(sampler.high.contract.uses_high_expert(state.scheduler.timesteps).sum())
    return times


def overlap_bound(t: dict, n: int) -> float:
    """Throughput gain of n requests if stages overlapped perfectly: the longer expert stage paces them."""
    one = t["text"] + t["high"] + t["low"] + t["vae"]
    return n * one / (t["text"] + n * max(t["high"], t["low"]) + min(t["high"], t["low"]) + t["vae"])


def measure(cfg, model: Path, params: GenerationParams, args) -> dict:
    """Start-up; one request in-process vs through Serve; n requests one after another vs concurrently."""
    import ray
    from ray import serve

    from wanray.infer.serve import start

    torch.set_num_threads(cfg.infer.torch_threads)  # the same thread setting the stage replicas use
    sampler = Sampler(StageSpec.for_serving(model, cfg))
    out = {"stages": stage_seconds(sampler, params, cfg.data.fps)}
    started = time.perf_counter()
    # Ray runs workers at niceness 15; the in-process baseline runs at 0. Same priority for both.
    os.environ.setdefault("RAY_worker_niceness", "0")
    connect_ray(num_cpus=4, include_dashboard=False)  # logical: 2 replicas of 4 stages fit; the cores are the same
    url = start(cfg, str(model))
    out["startup"] = time.perf_counter() - started
    body = {
        "prompt": params.prompt,
        "negative_prompt": params.negative_prompt,
        "height": params.height,
        "width": params.width,
        "num_frames": params.num_frames,
        "num_inference_steps": params.num_inference_steps,
    }

    def one(seed: int = 0) -> bytes:
        r = requests.post(f"{url}/v1/generate", json={**body, "seed": seed}, timeout=600)
        r.raise_for_status()
        return r.content

    seeds = list(range(1, args.requests + 1))
    with ForeignCpu() as foreign, concurrent.futures.ThreadPoolExecutor(args.requests) as pool:
        out["in_process"], out["single"] = interleaved(
            lambda: mp4_bytes(sampler(params), cfg.data.fps), one, args.repeats
        )
        out["sequential"], out["concurrent"] = interleaved(
            lambda: [one(s) for s in seeds], lambda: list(pool.map(one, seeds)), 2, warm_up=False
        )
    out["foreign_cpus"] = foreign.cpus
    out["one_replica"], out["two_replicas"] = replica_throughput(cfg, model, body, seeds, url)
    tunes = write_fine_tunes(model, model.parent)
    out["switch"], out["restart"] = adapter_switching(cfg, model, body, url, tunes)
    serve.shutdown()
    ray.shutdown()

    def variant(*settings: str) -> Sampler:
        return Sampler(
            StageSpec.for_serving(
                model,
                load_config(
                    ROOT / "configs" / "tiny.yaml",
                    [f"model.path={model}", f"infer.flow_shift={cfg.infer.flow_shift}", *settings],
                ),
            )
        )

    batched = variant("infer.batched_guidance=true")
    frames = {}

    def run(name, s):
        frames[name] = s(params)

    out["two_forwards"], out["batched"] = interleaved(
        lambda: run("two", sampler), lambda: run("batched", batched), args.repeats
    )
    out["batched_difference"] = float(abs(frames["two"] - frames["batched"]).max())
    stacked = variant(*[f"infer.loras.{n}.{e}={p}" for n, (files, _) in tunes.items() for e, p in files.items()])
    with_two = dataclasses.replace(params, loras=(("a", 1.0), ("b", 0.5)))
    stacked(with_two)  # loaded once
    out["no_adapter"], out["two_adapters"] = interleaved(
        lambda: stacked(params), lambda: stacked(with_two), args.repeats
    )
    out["cache"] = {}
    for threshold in args.cache:
        cached = variant("infer.cache=first_block", f"infer.cache_threshold={threshold}")
        uncached_s, cached_s = interleaved(
            lambda: run("two", sampler), lambda cached=cached: run("cached", cached), args.repeats
        )
        out["cache"][threshold] = (uncached_s, cached_s, *frame_quality(frames["cached"], frames["two"]))
    return out


ADAPTER_RANK = 16
ADAPTED = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k", "attn2.to_v")
ADAPTED += ("attn2.to_out.0", "ffn.net.0.proj", "ffn.net.2")


def write_fine_tunes(model: Path, root: Path) -> dict[str, tuple[dict[str, str], Path]]:
    """Two fine-tunes "a" and "b": each expert's adapter file, and the model directory with the adapters merged."""
    from safetensors.torch import load_file, save_file

    out = {}
    for seed, name in enumerate(("a", "b")):
        g = torch.Generator().manual_seed(seed)
        merged = root / f"merged-{name}"
        models.copy_model_dir(model, merged, without_weights_of=["high", "low"])
        files = {}
        for expert, sub in models.EXPERT_SUBFOLDERS.items():
            weights = load_file(model / sub / "diffusion_pytorch_model.safetensors")
            adapter = {}
            for key in [k for k in weights if k.endswith(".weight") and k.split(".", 2)[-1][:-7] in ADAPTED]:
                out_f, in_f = weights[key].shape
                a = torch.randn(ADAPTER_RANK, in_f, generator=g) * 0.05
                b = torch.randn(out_f, ADAPTER_RANK, generator=g) * 0.05
                module = key[: -len(".weight")]
                adapter[f"transformer.{module}.lora_A.weight"] = a
                adapter[f"transformer.{module}.lora_B.weight"] = b
                weights[key] = weights[key] + b @ a
            files[expert] = str(root / f"{name}-{expert}.safetensors")
            save_file(adapter, files[expert])
            save_file(weights, merged / sub / "diffusion_pytorch_model.safetensors")
        out[name] = (files, merged)
    return out


def adapter_switching(cfg, model: Path, body: dict, url: str, tunes: dict, rounds: int = 3) -> tuple[float, float]:
    """Median seconds of a request that switches adapter on a live deployment, and of redeploying on the other
    fine-tune's merged directory plus that request (each taken in turns)."""
    from ray import serve

    from wanray.infer.serve import APP_NAME, build_app

    sets = [f"infer.flow_shift={cfg.infer.flow_shift}", "infer.torch_threads=1"]
    sets += [f"infer.num_inference_steps={cfg.infer.num_inference_steps}"]
    loras = [f"infer.loras.{n}.{e}={p}" for n, (files, _) in tunes.items() for e, p in files.items()]

    def deploy(model_dir, extra=()):
        config = load_config(ROOT / "configs" / "tiny.yaml", [f"model.path={model_dir}", *sets, *extra])
        serve.run(build_app(config, str(model_dir)), name=APP_NAME, route_prefix="/")

    def one(loras_used):
        r = requests.post(f"{url}/v1/generate", json={**body, "seed": 1, "loras": loras_used}, timeout=600)
        r.raise_for_status()

    deploy(model, loras)
    one([{"name": "a"}]), one([{"name": "b"}])  # each adapter loaded once
    switch = []
    for i in range(2 * rounds):
        start = time.perf_counter()
        one([{"name": "ab"[i % 2]}])
        switch.append(time.perf_counter() - start)
    restart = []
    for i in range(2 * rounds):
        start = time.perf_counter()
        deploy(tunes["ab"[i % 2]][1])
        one([])
        restart.append(time.perf_counter() - start)
    return statistics.median(switch), statistics.median(restart)


def replica_throughput(cfg, model: Path, body: dict, seeds: list[int], url: str, rounds: int = 2) -> tuple:
    """Median seconds of len(seeds) concurrent requests with 1 replica per stage at 2 torch threads, and
    with 2 replicas per stage at 1 thread; each deployed in turn (deployment time not counted)."""
    from ray import serve

    from wanray.infer.serve import APP_NAME, build_app

    layouts = [["infer.torch_threads=2"], [f"infer.stages.{s}.replicas=2" for s in ("text", "high", "low", "vae")]]
    times: tuple[list, list] = ([], [])
    for _ in range(rounds):
        for layout, out in zip(layouts, times):
            sets = [
                f"model.path={model}",
                f"infer.flow_shift={cfg.infer.flow_shift}",
                "infer.torch_threads=1",
                f"infer.num_inference_steps={cfg.infer.num_inference_steps}",
                *layout,
            ]
            serve.run(
                build_app(load_config(ROOT / "configs" / "tiny.yaml", sets), str(model)),
                name=APP_NAME,
                route_prefix="/",
            )

            def one(seed):
                requests.post(f"{url}/v1/generate", json={**body, "seed": seed}, timeout=600).raise_for_status()

            one(0)  # warm-up: every replica loaded
            with concurrent.futures.ThreadPoolExecutor(len(seeds)) as pool:
                start = time.perf_counter()
                list(pool.map(one, seeds))
                out.append(time.perf_counter() - start)
    return statistics.median(times[0]), statistics.median(times[1])


def main(args):
    tmp = tempfile.TemporaryDirectory(prefix="wanray-bench-")
    model = write_bench_checkpoint(Path(tmp.name) / "bench-wan2.2")
    cfg = load_config(
        ROOT / "configs" / "tiny.yaml",
        [
            f"model.path={model}",
            f"infer.flow_shift={args.flow_shift}",
            f"infer.num_inference_steps={args.steps}",
            "infer.torch_threads=1",
            f"infer.port={free_port()}",
        ],
    )
    params = GenerationParams(
        "a red circle moving left to right", "blurry", args.size, args.size, args.frames, args.steps, 4.0, 3.0, 0
    )
    m = measure(cfg, model, params, args)
    tmp.cleanup()

    n, stages = args.requests, m["stages"]
    high = stages["high_steps"]
    print(
        f"\nrequest: {args.size}x{args.size}, {args.frames} frames, {args.steps} steps (high-noise {high} / "
        f"low-noise {args.steps - high}, flow shift {args.flow_shift}), guidance 4.0/3.0, 1 torch thread"
    )
    print("stages in-process: " + ", ".join(f"{k} {stages[k]:.3f} s" for k in ("text", "high", "low", "vae")))
    print(
        f"Ray + Serve start-up (not in any ratio): {m['startup']:.1f} s; other processes on the machine "
        f"kept {m['foreign_cpus']:.2f} of {os.cpu_count()} CPUs busy during the measurements"
    )
    print(
        f"(a) single request: in-process {m['in_process']:.3f} s, through Serve {m['single']:.3f} s "
        f"-> {m['single'] / m['in_process']:.3f}x (target <= 1.10x)"
    )
    print(
        f"(b) {n} requests: one after another {m['sequential']:.2f} s, concurrent {m['concurrent']:.2f} s "
        f"-> throughput {m['sequential'] / m['concurrent']:.2f}x "
        f"(target >= 1.5x; perfect overlap of these stages would give {overlap_bound(stages, n):.2f}x)"
    )
    print(
        f"(c) {n} concurrent requests, same CPU budget: 1 replica per stage (2 threads) {m['one_replica']:.2f} s, "
        f"2 replicas per stage (1 thread) {m['two_replicas']:.2f} s -> {m['one_replica'] / m['two_replicas']:.2f}x"
    )
    print(
        f"(d) batched guidance: two forwards {m['two_forwards']:.3f} s, one batch-2 forward {m['batched']:.3f} s "
        f"-> {m['two_forwards'] / m['batched']:.2f}x; frames differ by at most {m['batched_difference']:.1e}"
    )
    print(
        f"(f) two fine-tunes: switching adapter per request {m['switch']:.3f} s, redeploying on the other merged "
        f"model + the request {m['restart']:.2f} s -> {m['restart'] / m['switch']:.1f}x faster to switch"
    )
    print(
        f"(g) two stacked adapters (rank {ADAPTER_RANK}) {m['two_adapters']:.3f} s, none {m['no_adapter']:.3f} s "
        f"-> {m['two_adapters'] / m['no_adapter']:.3f}x the time"
    )
    for threshold, (uncached_s, cached_s, db, similarity) in m["cache"].items():
        print(
            f"(e) first-block cache {threshold}: uncached {uncached_s:.3f} s, cached {cached_s:.3f} s -> "
            f"{uncached_s / cached_s:.2f}x; cached frames vs uncached: PSNR {db:.1f} dB, SSIM {similarity:.4f}"
        )


if __name__ == "__main__":
    main(get_args())
