"""One check of the real Wan2.2-T2V-A14B dimensions on one accelerator, each figure beside its anchor.

    python benchmarks/device_check.py            # one H100/H200 (or NPU): under 8 minutes
    python benchmarks/device_check.py --tiny     # the same code end to end on the CPU at tiny sizes (CI)

Needs torch and diffusers only: no Ray, no downloads. The weights are random at the published
dimensions (wanray.model_files.A14B_TRANSFORMER, A14B_VAE), written as a config-only model directory that
the platform's own code reads. Three measurements:

1. One training step of one expert at 81x480x832 (32,760 tokens) through the platform's training code
   (build_model: meta -> FSDP2 -> local shards; build_optimizer; train_step with flow_loss) under the
   A14B preset's options (bf16 compute, fp32 master weights and reductions, activation checkpointing),
   FSDP2 on one rank. A whole 14B expert does not train on one device (fp32 weights, gradients and
   AdamW moments alone are 16 bytes x 14.3B = 229 GB), so the step runs --train-layers of the 40
   blocks; the rate (tokens/s, TFLOP/s) is the blocks' rate, and the full expert's step time is
   scaled by 40/L (the blocks do all but ~0.1% of the FLOPs). The memory plan
   (wanray.train.plan) for the same L-block expert on one rank is printed beside the measured peak.
2. One denoising step with guidance (two forwards) of the full 40-block expert in bf16 at 480x832x81,
   through the sampler's ExpertStage (the stage Serve and batch generation run).
3. VAE decode of 21 latent frames to 81x480x832 in float32, through the sampler's VideoDecoder, whole and in
   256-pixel tiles (infer.vae_tiling).
On CUDA the denoising step is timed again with the speed levers: compiled blocks, then FP8 on top (torchao: carry
its wheel as diffusers'); each against the bf16 eager step, with the latents' relative difference.

FLOPs (stated so the TFLOP/s can be checked; `expert_forward_flops`): a forward of an expert with
L blocks, width d, FFN width f, text width e, N video tokens and T = 512 text tokens is
    2 N [L (6 d^2 + 2 d f) + 2 p d] + 2 T [L 2 d^2 + e d + d^2] + 2 (q d + d^2 + 6 d^2) + 4 L N d (N + T)
(per token: self-attention q, k, v, o and cross-attention q, o projections, the FFN, patch embedding and
head with p = 16 x 1 x 2 x 2 values per patch; per text token: cross-attention k, v and the text
embedder; per sample: the time embedder with q = 256 frequencies; then attention scores and values).
Training model FLOPs = 3 x forward (NeMo's and MFU's convention); with activation checkpointing the
blocks' forward runs again, so the hardware does 4 x forward: both rates are printed.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import math
import os
import socket
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "platform"))

from wanray import model_files, models  # noqa: E402
from wanray.backends import attention_backend  # noqa: E402
from wanray.config import load_config  # noqa: E402
from wanray.devices import accelerator  # noqa: E402

TB = 1e12
GB = 1e9
OPTIONAL_BACKENDS = {"sage": "sageattention", "_flash_3": "flash_attn_interface"}
"""Inference attention backends timed by default where their package is installed (SageAttention, FlashAttention 3)."""
REAL_CLIP = dict(frames=81, height=480, width=832)
TINY_CLIP = dict(frames=9, height=64, width=64)
TINY_EXPERT = {
    **model_files.A14B_TRANSFORMER,
    "attention_head_dim": 24,
    "num_attention_heads": 4,
    "ffn_dim": 192,
    "text_dim": 32,
    "freq_dim": 32,
    "num_layers": 2,
}
TINY_VAE = {**model_files.A14B_VAE, **model_files.TINY_VAE}

# Anchors: published figures on one H100 of the same work.
ANCHORS = {
    "train": "NeMo FSDP Wan2.1-14B pretraining: 175.88 TFLOP/s per H100 (8 GPUs)",
    "denoise": "diffusers 9.77 s/step, LightX2V 5.18 s/step (Wan 14B 480P, one H100)",
    "vae": "none published for this size",
}


def expert_forward_flops(config: dict, tokens: int, text_tokens: int = 512) -> int:
    """Matmul FLOPs of one forward of a Wan expert over one sample (see the module docstring)."""
    d = config["num_attention_heads"] * config["attention_head_dim"]
    f, e, q, L = config["ffn_dim"], config["text_dim"], config["freq_dim"], config["num_layers"]
    p = config["in_channels"] * math.prod(config["patch_size"])
    n, t = tokens, text_tokens
    per_token = L * (6 * d * d + 2 * d * f) + 2 * p * d
    per_text_token = L * 2 * d * d + e * d + d * d
    per_sample = q * d + d * d + 6 * d * d
    attention = 4 * L * n * d * (n + t)
    return 2 * n * per_token + 2 * t * per_text_token + 2 * per_sample + attention


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "npu":
        torch.npu.synchronize()


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    elif device.type == "npu":
        torch.npu.reset_peak_memory_stats()


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    elif device.type == "npu":
        torch.npu.empty_cache()


def peak_gb(device: torch.device) -> float | None:
    peak = accelerator(device.type).peak_memory_bytes()
    return None if peak is None else peak / GB


def timed(fn, device: torch.device):
    synchronize(device)
    start = time.perf_counter()
    out = fn()
    synchronize(device)
    return time.perf_counter() - start, out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def config_for(model_dir: Path, kind: str, clip: dict, layers: int, *extra: str):
    """The A14B preset, pointed at the config-only directory, on one rank of `kind` (`extra`: more overrides)."""
    stages = [f"infer.stages.{s}.device={kind}" for s in ("text", "high", "low", "vae")]
    return load_config(
        ROOT / "configs" / "t2v_a14b.yaml",
        [
            f"model.path={model_dir}",
            "train.workers=1",
            f"train.worker.device={kind}",
            f"data.num_frames={clip['frames']}",
            f"data.min_frames={clip['frames']}",
            f"data.height={clip['height']}",
            f"data.width={clip['width']}",
            *stages,
            *extra,
        ],
    )


DISTILLED_RANK = 64
"""Rank of the published Wan2.2-Lightning adapters (Wan2.2-T2V-A14B-4steps-lora-rank64)."""
ADAPTED = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k", "attn2.to_v")
ADAPTED += ("attn2.to_out.0", "ffn.net.0.proj", "ffn.net.2")


def write_random_adapter(path: Path, expert_config: dict, rank: int = DISTILLED_RANK) -> Path:
    """A random LoRA of every attention projection and FFN linear of each block at `rank`, in bf16: the shape of
    the 4-step distilled adapters (612 MB at the A14B dimensions, rank 64)."""
    from safetensors.torch import save_file

    d = expert_config["num_attention_heads"] * expert_config["attention_head_dim"]
    sizes = {layer: (d, d) for layer in ADAPTED[:8]} | {"ffn.net.0.proj": (d, expert_config["ffn_dim"])}
    sizes["ffn.net.2"] = (expert_config["ffn_dim"], d)
    g = torch.Generator().manual_seed(3)
    state = {}
    for i in range(expert_config["num_layers"]):
        for layer, (fan_in, fan_out) in sizes.items():
            key = f"transformer.blocks.{i}.{layer}"
            state[f"{key}.lora_A.weight"] = (torch.randn(rank, fan_in, generator=g) * 0.01).bfloat16()
            state[f"{key}.lora_B.weight"] = (torch.randn(fan_out, rank, generator=g) * 0.01).bfloat16()
    save_file(state, path)
    return path


def random_expert(config: dict, dtype: torch.dtype, device: torch.device, seed: int = 1):
    torch.manual_seed(seed)
    return models.expert_from_config(config, dtype, device)


def random_vae(config: dict, device: torch.device, seed: int = 2):
    torch.manual_seed(seed)
    return models.vae_from_config(config, device)


def check_training(root: Path, kind: str, clip: dict, expert_config: dict, layers: int, steps: int) -> dict:
    """One expert of `layers` blocks trained by the platform's loop code, FSDP2 on one rank."""
    from torch.distributed.tensor import DTensor

    from wanray.train.data import Batch, StepData
    from wanray.train.loop import ExpertTrainer, LoopSpec, build_model, build_optimizer
    from wanray.train.parallel import trainable_parameters
    from wanray.train.plan import plan_training

    model_dir = model_files.write_config_dir(root / f"expert-{layers}-blocks", {**expert_config, "num_layers": layers})
    cfg = config_for(model_dir, kind, clip, layers)
    t = cfg.train
    plan = plan_training(cfg, model_dir, "high")  # before the real process group: it uses a fake one
    acc = accelerator(kind)
    device = acc.torch_device()
    dist.init_process_group(acc.dist_backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        contract = models.read_contract(model_dir, cfg.model)
        text_dim = expert_config["text_dim"]
        spec = LoopSpec(
            cfg=cfg,
            expert="high",
            model_path=str(model_dir),
            contract=contract,
            index=None,
            attention=attention_backend(cfg.model.attention_backend, kind, t.worker.dtype, training=True),
            empty_prompt=torch.zeros(8, text_dim),
            run_dir=str(root),
        )
        reset_peak(device)
        model = build_model(spec, device, fresh=False)  # as a resumed run: no weights loaded, random ones instead
        torch.manual_seed(0)
        with torch.no_grad():
            for p in model.parameters():
                (p.to_local() if isinstance(p, DTensor) else p).normal_(0.0, 0.02)
        params = trainable_parameters(model)
        optimizer, schedule = build_optimizer(spec, params, device)
        trainer = ExpertTrainer(spec, device, model, params, optimizer, schedule)
        shape = contract.latent_shape(16, clip["frames"], clip["height"], clip["width"])
        stored = torch.bfloat16  # preprocess.encoders.dtype of the preset

        def step(i: int) -> torch.Tensor:
            batch = Batch(
                torch.randn(shape).to(stored),
                torch.randn(1, contract.text_tokens, text_dim).to(stored),
                ids=[f"random-{i}"],
                epoch=0,
                index=i,
            )
            return trainer.step(StepData(0, i, [batch])).loss

        warm, loss = timed(lambda: step(0), device)
        times = []
        for i in range(1, steps + 1):
            seconds, loss = timed(lambda i=i: step(i), device)
            times.append(seconds)
        loss = float(loss)
        peak = peak_gb(device)
    finally:
        dist.destroy_process_group()
    seconds = sum(times) / len(times)
    tokens = batch_tokens(shape, expert_config)
    flops = expert_forward_flops({**expert_config, "num_layers": layers}, tokens, contract.text_tokens)
    full_layers = expert_config["num_layers"]
    return {
        "blocks": layers,
        "of_blocks": full_layers,
        "tokens": tokens,
        "first_step_s": warm,
        "step_s": seconds,
        "full_expert_step_s": seconds * full_layers / layers,
        "tokens_per_s": tokens / seconds,
        "model_tflops": 3 * flops / seconds / TB,
        "hardware_tflops": 4 * flops / seconds / TB,
        "loss": loss,
        "peak_gb": peak,
        "plan_gb": plan.total_bytes / GB,
        "plan_activation_gb": plan.activation_bytes / GB,
    }


def batch_tokens(latent_shape, expert_config: dict) -> int:
    _, _, f, h, w = latent_shape
    pt, ph, pw = expert_config["patch_size"]
    return (f // pt) * (h // ph) * (w // pw)


def check_denoise(root: Path, kind: str, clip: dict, expert_config: dict, other_backends: list[str]) -> dict:
    """Guided denoising steps of the full expert through the sampler's ExpertStage, with the preset's
    attention backend, then with each of `other_backends` (model.attention_backend choices)."""
    from wanray.devices import apply_attention_backend
    from wanray.infer.plan import plan_stage
    from wanray.infer.request import GenerationParams, TextEmbeddings
    from wanray.infer.sampler import ExpertStage
    from wanray.infer.spec import StageSpec, pin_for, resident

    model_dir = model_files.write_config_dir(root / "full", expert_config)
    adapter = write_random_adapter(root / "distilled.safetensors", expert_config)
    cfg = config_for(model_dir, kind, clip, expert_config["num_layers"], f"infer.loras.distilled={adapter}")
    spec = StageSpec.for_serving(model_dir, cfg)
    plan = plan_stage(
        model_dir,
        "high",
        cfg.infer.stages.high.dtype,
        spec.contract,
        clip["frames"],
        clip["height"],
        clip["width"],
        spec.attention["high"],
    )
    device = spec.device("high")
    stage = ExpertStage(spec, "high", model=random_expert(expert_config, spec.dtype("high"), device))
    weights = sum(t.numel() * t.element_size() for t in [*stage.expert.parameters(), *stage.expert.buffers()])
    free(device)
    reset_peak(device)  # the denoising peak, not the random initialisation's
    text_dim = expert_config["text_dim"]
    text = TextEmbeddings(
        torch.randn(1, spec.contract.text_tokens, text_dim).to(spec.dtype("text")),
        torch.randn(1, spec.contract.text_tokens, text_dim).to(spec.dtype("text")),
    )

    def params(steps: int, distilled: bool = False) -> GenerationParams:
        """The preset's guided UniPC steps, or the distilled recipe's: Euler at shift 5, guidance 1.0 (one forward
        per step), the rank-64 adapter active."""
        return GenerationParams(
            prompt="",
            negative_prompt="",
            height=clip["height"],
            width=clip["width"],
            num_frames=clip["frames"],
            num_inference_steps=steps,
            guidance_scale=1.0 if distilled else cfg.infer.guidance_scale,
            guidance_scale_2=1.0 if distilled else cfg.infer.guidance_scale_2,
            seed=0,
            loras=(("distilled", 1.0),) if distilled else (),
            sampler="euler" if distilled else "unipc",
            flow_shift=5.0 if distilled else None,
        )

    warm, _ = timed(lambda: stage.denoise(params(1), text), device)  # one step: t = 1000
    # 3 steps at flow_shift 12: t = 1000, 960, 857, so the high-noise stage runs the first two
    seconds, state = timed(lambda: stage.denoise(params(3), text), device)
    steps = state.step
    peak = peak_gb(device)
    by_backend = {spec.attention["high"]: seconds / steps}
    # the 4-step distilled recipe: adapter loaded once (timed), then 4 Euler steps at shift 5 (t = 1000, 937.5 on
    # the high-noise expert at boundary 0.875; the low-noise one's two cost the same per step)
    adapter_load, _ = timed(lambda: stage.adapters.activate((("distilled", 1.0),)), device)
    distilled_s, distilled = timed(lambda: stage.denoise(params(4, distilled=True), text), device)
    distilled_steps = distilled.step
    for backend in other_backends:
        try:
            apply_attention_backend(stage.expert, backend)
            timed(lambda: stage.denoise(params(1), text), device)
            other, _ = timed(lambda: stage.denoise(params(3), text), device)
            by_backend[backend] = other / steps
        except Exception as e:
            by_backend[backend] = f"{type(e).__name__}: {e}"
    # infer.batch_offload: the expert waits in pinned host memory and comes to the device for its stage
    module_to_host, _ = timed(lambda: stage.expert.to("cpu"), device)  # what offloading did before
    pin, _ = timed(lambda: pin_for(stage.expert, device), device)
    onload = resident(stage.expert, device, offload=True)
    to_device, _ = timed(onload.__enter__, device)
    to_host, _ = timed(lambda: onload.__exit__(None, None, None), device)
    levers = check_levers(stage, device, lambda: stage.denoise(params(1), text), lambda: stage.denoise(params(3), text))
    tokens = batch_tokens(state.latents.shape, expert_config)
    flops = 2 * expert_forward_flops(expert_config, tokens, spec.contract.text_tokens)
    return {
        "levers": {
            name: v if isinstance(v, str) else {**v, "latent_rel_err": rel_err(v.pop("latents"), state.latents)}
            for name, v in levers.items()
        },
        "tokens": tokens,
        "first_step_s": warm,
        "steps": steps,
        "step_s": seconds / steps,
        "tflops": flops / (seconds / steps) / TB,
        "weights_gb": weights / GB,
        "peak_gb": peak,
        "plan_gb": plan.total_bytes / GB,
        "offload_to_device_s": to_device,
        "offload_to_host_s": to_host,
        "pin_s": pin,
        "module_to_host_s": module_to_host,
        "step_s_by_attention_backend": by_backend,
        "adapter_load_s": adapter_load,
        "distilled_step_s": distilled_s / distilled_steps,
        "distilled_steps": distilled_steps,
        "finite": bool(torch.isfinite(state.latents).all()),
    }


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def check_levers(stage, device: torch.device, warm, run) -> dict:
    """On CUDA, the denoising steps again with each speed lever on top of the last (the expert is changed in place;
    run last): compiled blocks (infer.compile, inductor: the warm-up step compiles), then FP8 (infer.quantize,
    compiled too, as torchao recommends). Each: s/step and the latents to compare with the bf16 eager ones."""
    from wanray.infer.quantize import check_fp8_gpu, quantize_fp8

    if device.type != "cuda":
        return {}
    stage.expert.to(device)  # the offload check above left it in host memory
    found: dict = {}

    def fp8():
        check_fp8_gpu(device)
        quantize_fp8(stage.expert)
        stage.expert.compile_repeated_blocks(backend="inductor")

    for name, prepare in (("compile", lambda: stage.expert.compile_repeated_blocks(backend="inductor")), ("fp8", fp8)):
        try:
            prepare()
            first, _ = timed(warm, device)
            seconds, state = timed(run, device)
            found[name] = {"first_step_s": first, "step_s": seconds / state.step, "latents": state.latents}
        except Exception as e:  # a lever that cannot run here (no torchao, an older GPU): say why, go on
            found[name] = f"{type(e).__name__}: {e}"
    return found


def check_vae(root: Path, kind: str, clip: dict, vae_config: dict) -> dict:
    """Decode of a clip's latents to frames through the sampler's VideoDecoder (float32)."""
    from wanray.infer.plan import plan_stage
    from wanray.infer.request import DenoiseState
    from wanray.infer.sampler import VideoDecoder
    from wanray.infer.spec import StageSpec

    model_dir = model_files.write_config_dir(root / "vae", vae=vae_config)
    cfg = config_for(model_dir, kind, clip, 1)
    spec = StageSpec.for_serving(model_dir, cfg)
    plan = plan_stage(model_dir, "vae", "float32", spec.contract, clip["frames"], clip["height"], clip["width"])
    device = spec.device("vae")
    reset_peak(device)
    decoder = VideoDecoder(spec, vae=random_vae(vae_config, device, seed=2))
    shape = spec.contract.latent_shape(vae_config["z_dim"], clip["frames"], clip["height"], clip["width"])
    warm, _ = timed(lambda: decoder.decode(DenoiseState(torch.randn(1, shape[1], 2, 8, 8), None, 0)), device)
    seconds, frames = timed(lambda: decoder.decode(DenoiseState(torch.randn(shape), None, 0)), device)
    peak = peak_gb(device)
    latents = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    whole = decoder.decode(DenoiseState(latents, None, 0))
    decoder.vae_tile = 256  # infer.vae_tiling at the default tile
    free(device)
    reset_peak(device)
    tiled_s, tiled = timed(lambda: decoder.decode(DenoiseState(latents, None, 0)), device)
    return {
        "tiled_decode_s": tiled_s,
        "tiled_peak_gb": peak_gb(device),
        "tiled_max_diff": float(abs(tiled - whole).max()),
        "latent_frames": shape[2],
        "frames": list(frames.shape),
        "warmup_s": warm,
        "decode_s": seconds,
        "peak_gb": peak,
        "plan_gb": plan.total_bytes / GB,
    }


def detect_kind() -> str:
    if torch.cuda.is_available():
        return "cuda"
    try:
        import torch_npu  # noqa: F401

        return "npu" if torch.npu.is_available() else "cpu"
    except ImportError:
        return "cpu"


def describe(kind: str) -> str:
    if kind == "cuda":
        return torch.cuda.get_device_name()
    if kind == "npu":
        return torch.npu.get_device_name()
    return f"CPU ({os.cpu_count()} cores)"


def report(r: dict) -> list[str]:
    mem = lambda v: "n/a on CPU" if v is None else f"{v:.1f} GB"
    t, d, v = r["train"], r["denoise"], r["vae"]
    distilled_video, guided_video = 4 * d["distilled_step_s"] + v["decode_s"], 40 * d["step_s"] + v["decode_s"]
    return [
        f"device check: {r['device']}, torch {r['torch']}, diffusers {r['diffusers']}, {r['date']}",
        f"train step, {t['blocks']} of {t['of_blocks']} blocks, {t['tokens']:,} tokens (bf16, AC, FSDP2 on 1 rank): "
        f"{t['step_s']:.2f} s (first {t['first_step_s']:.1f} s), {t['tokens_per_s']:,.0f} tokens/s, "
        f"{t['model_tflops']:.1f} model TFLOP/s ({t['hardware_tflops']:.1f} with the recompute); "
        f"full {t['of_blocks']}-block expert ~{t['full_expert_step_s']:.1f} s/step",
        f"    anchor: {ANCHORS['train']}",
        f"    peak memory {mem(t['peak_gb'])}; the memory plan for the same expert on 1 rank says "
        f"{t['plan_gb']:.1f} GB (activations {t['plan_activation_gb']:.1f} GB); loss {t['loss']:.4f}",
        f"denoise step with guidance (2 forwards), {d['tokens']:,} tokens, full expert bf16: {d['step_s']:.2f} s/step "
        f"({d['steps']} steps timed, first {d['first_step_s']:.1f} s), {d['tflops']:.1f} TFLOP/s, "
        f"peak {mem(d['peak_gb'])} (the inference plan says {d['plan_gb']:.1f} GB)",
        f"    anchor: {ANCHORS['denoise']}",
        "    by attention backend (s/step): "
        + ", ".join(
            f"{b} {v:.2f}" if isinstance(v, float) else f"{b} {v}" for b, v in d["step_s_by_attention_backend"].items()
        ),
        f"    batch offload of that expert ({d['weights_gb']:.1f} GB; once per expert and video): "
        f"{d['offload_to_device_s']:.1f} s from pinned host memory to the device, {d['offload_to_host_s']:.2f} s "
        f"back (the host copy is kept); Module.to to the host took {d['module_to_host_s']:.1f} s",
        f"    4-step distilled recipe (rank-{DISTILLED_RANK} adapter active, guidance 1.0: one forward): "
        f"{d['distilled_step_s']:.2f} s/step ({d['distilled_steps']} timed), adapter loaded in "
        f"{d['adapter_load_s']:.1f} s; "
        f"a video's denoising: 4 steps {4 * d['distilled_step_s']:.1f} s vs 40 guided steps {40 * d['step_s']:.1f} s "
        f"-> {40 * d['step_s'] / (4 * d['distilled_step_s']):.1f}x (text encoding and the VAE decode below come on top "
        "of both)",
        f"VAE decode of {v['latent_frames']} latent frames to {'x'.join(map(str, v['frames'][:3]))} (float32): "
        f"{v['decode_s']:.2f} s, peak {mem(v['peak_gb'])} (the inference plan says {v['plan_gb']:.1f} GB)",
        f"    anchor: {ANCHORS['vae']}",
        f"    tiled (infer.vae_tiling, 256-pixel tiles): {v['tiled_decode_s']:.2f} s, peak {mem(v['tiled_peak_gb'])}, "
        f"frames within {v['tiled_max_diff']:.1e} of the whole decode",
        f"a {'x'.join(map(str, v['frames'][:3]))} video end to end (the denoising and VAE decode timed above; the text "
        f"encoder's one forward not timed): 4-step distilled {distilled_video:.1f} s vs 40 guided steps "
        f"{guided_video:.1f} s -> {guided_video / distilled_video:.1f}x",
        *(
            f"    lever {name}: "
            + (
                lever
                if isinstance(lever, str)
                else f"{lever['step_s']:.2f} s/step ({d['step_s'] / lever['step_s']:.2f}x the bf16 eager step; first "
                f"{lever['first_step_s']:.1f} s), latents {lever['latent_rel_err']:.1e} from the bf16 eager ones"
            )
            for name, lever in d["levers"].items()
        ),
    ]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny dimensions on the CPU (what CI runs)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda", "npu"), default="auto")
    p.add_argument(
        "--train-layers",
        type=int,
        default=None,
        help="blocks of the trained expert (default 10 of 40; all of the tiny one's)",
    )
    p.add_argument("--train-steps", type=int, default=2, help="timed training steps after one warm-up")
    p.add_argument(
        "--only", choices=("train", "denoise", "vae"), action="append", help="run only these checks (repeatable)"
    )
    p.add_argument("--json", type=Path, help="also write the figures here")
    p.add_argument(
        "--denoise-backends",
        type=lambda v: [b for b in v.split(",") if b],
        default=None,
        help="comma-separated attention backends to time the denoise step with besides the preset's "
        "(default on CUDA: _native_cudnn,_native_flash, and sage and _flash_3 where their packages are installed)",
    )
    args = p.parse_args(argv)
    kind = detect_kind() if args.device == "auto" else args.device
    if args.denoise_backends is None:
        installed = [b for b, package in OPTIONAL_BACKENDS.items() if importlib.util.find_spec(package)]
        args.denoise_backends = ["_native_cudnn", "_native_flash", *installed] if kind == "cuda" else []
    if kind == "cpu" and not args.tiny:
        print("no accelerator found: the real dimensions need an H100/H200 or NPU (use --tiny on the CPU)")
        return 2
    import diffusers

    expert = TINY_EXPERT if args.tiny else model_files.A14B_TRANSFORMER
    vae = TINY_VAE if args.tiny else model_files.A14B_VAE
    clip = TINY_CLIP if args.tiny else REAL_CLIP
    layers = args.train_layers or (expert["num_layers"] if args.tiny else 10)
    checks = set(args.only or ("train", "denoise", "vae"))
    results = {
        "device": describe(kind),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "tiny": args.tiny,
    }
    runs = {
        "train": lambda root: check_training(root, kind, clip, expert, layers, args.train_steps),
        "denoise": lambda root: check_denoise(root, kind, clip, expert, args.denoise_backends),
        "vae": lambda root: check_vae(root, kind, clip, vae),
    }
    failed = []
    with tempfile.TemporaryDirectory(prefix="wanray-device-check-") as tmp:
        for name in (n for n in runs if n in checks):
            try:  # one failing check must not cost the others' figures (device time is scarce)
                results[name] = runs[name](Path(tmp))
            except Exception as e:
                traceback.print_exc()
                results[name] = {"error": f"{type(e).__name__}: {e}"}
                failed.append(name)
            free(torch.device(kind))  # the check's models went with its frame
            print(f"{name}:", json.dumps(results[name]), flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    if not failed and checks == set(runs):
        print("\n".join(report(results)))
    if failed:
        print(f"FAILED: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
