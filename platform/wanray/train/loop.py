"""The per-worker training loop Ray Train runs on every rank of one expert's worker group."""
from __future__ import annotations

import json
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch
import torch.distributed as dist
import torch.nn.functional as F

from wanray.config import Config
from wanray.devices import accelerator
from wanray.schema import pad_text_embedding
from wanray.train import checkpoint as ckpt
from wanray.train.data import Batch, EpochSource
from wanray.train.flow import noisy_latents, sample_timesteps
from wanray.train.parallel import (apply_fsdp, build_on_meta, init_lora, load_expert_shards, materialize,
                                   shard_stats, trainable_parameters)

STEP_FILE = "wanray_step.json"


@dataclass
class LoopSpec:
    """Everything a worker needs, sent by the driver."""

    cfg: Config
    expert: str
    model_path: str
    empty_prompt: torch.Tensor
    """Unpadded empty-prompt embedding (caption dropout)."""
    run_dir: str
    """Where rank 0 appends metrics.jsonl."""


def lr_lambda(cfg: Config):
    t = cfg.train

    def factor(step: int) -> float:
        if step < t.warmup_steps:
            return (step + 1) / t.warmup_steps
        if t.lr_schedule == "cosine":
            done = (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, done)))
        return 1.0
    return factor


def build_model(spec: LoopSpec, device: torch.device, fresh: bool):
    """Meta -> FSDP2 shards -> local storage -> weights (skipped when a checkpoint will load them)."""
    t = spec.cfg.train
    model = build_on_meta(spec.model_path, spec.expert, t.lora)
    apply_fsdp(model, device, t.param_dtype, t.reduce_dtype, t.activation_checkpointing)
    materialize(model, device)
    if fresh:
        if t.init_dcp:
            ckpt.load_model_weights(model, t.init_dcp)
        else:
            load_expert_shards(model, spec.model_path, spec.expert)
        if t.lora.enabled:
            init_lora(model, t.seed)
    return model.train()


def flow_loss(model, batch: Batch, spec: LoopSpec, empty: torch.Tensor, gen: torch.Generator, device):
    """Flow-matching MSE on the expert's side of the boundary, with caption dropout."""
    t, b = spec.cfg.train, batch.latents.shape[0]
    x0 = batch.latents.float()
    text = batch.text.float()
    drop = torch.rand(b, generator=gen) < t.caption_dropout
    text[drop] = empty
    timesteps = sample_timesteps(b, spec.expert, spec.cfg.model.boundary, t.timestep_shift, gen)
    noise = torch.randn(x0.shape, generator=gen)
    xt, target = noisy_latents(x0, noise, timesteps)
    pred = model(hidden_states=xt.to(device), timestep=timesteps.to(device), encoder_hidden_states=text.to(device),
                 return_dict=False)[0]
    return F.mse_loss(pred.float(), target.to(device))


class Batches:
    """Micro-batches across epochs; every rank starts each epoch together (see `next`)."""

    def __init__(self, shard, spec: LoopSpec, progress: ckpt.Progress, world: int, rank: int, device):
        t = spec.cfg.train
        self.source = EpochSource(shard, t.batch_size, spec.cfg.data.max_text_tokens, t.cache_bytes, t.seed + rank)
        self.progress, self.world, self.device = progress, world, device
        self.it = self.source.epoch(progress.epoch, skip=progress.samples_in_epoch // world)

    def next(self) -> Batch:
        for _ in range(3):
            batch = next(self.it, None)
            # Host sync, once per micro-batch: a rank whose shard ran dry must not start the
            # next epoch while others still step (streaming_split starts epochs together), so all
            # ranks agree to end the epoch as soon as one has no batch left.
            have = torch.tensor([0.0 if batch is None else 1.0], device=self.device)
            dist.all_reduce(have, op=dist.ReduceOp.MIN)
            if have.item() == 1.0:
                self.progress.samples_in_epoch += batch.latents.shape[0] * self.world
                return batch
            self.progress.epoch += 1
            self.progress.samples_in_epoch = 0
            self.it = self.source.epoch(self.progress.epoch)
        raise RuntimeError("the training data yields no batch on some worker: too few clips for the worker count")


def peak_memory_bytes(acc) -> int:
    peak = acc.peak_memory_bytes()
    return peak if peak is not None else psutil.Process().memory_info().rss


def save_checkpoint(state: dict, progress: ckpt.Progress, metrics: dict, rank: int) -> None:
    """Every rank writes its shards to a local temp dir; Ray Train gathers them into one checkpoint."""
    import ray.train

    with tempfile.TemporaryDirectory() as d:
        ckpt.save(state, d)
        if rank == 0:
            Path(d, STEP_FILE).write_text(json.dumps({"step": progress.step}))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))


def train_loop(config: dict) -> None:
    import ray.train

    spec: LoopSpec = config["spec"]
    t = spec.cfg.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    acc = accelerator(t.device)
    device = acc.torch_device(ctx.get_local_rank())
    resume = ray.train.get_checkpoint()
    model = build_model(spec, device, fresh=resume is None)
    params = trainable_parameters(model)
    optimizer = torch.optim.AdamW(params, lr=t.lr, betas=tuple(t.betas), eps=t.eps, weight_decay=t.weight_decay,
                                  fused=device.type != "cpu")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(spec.cfg))
    progress = ckpt.Progress()
    state = ckpt.app_state(model, optimizer, scheduler, progress)
    if resume is not None:
        with resume.as_directory() as d:
            ckpt.load(state, d)
        if rank == 0:
            print(f"[train:{spec.expert}] resumed at step {progress.step} (epoch {progress.epoch}) on {world} workers")
    batches = Batches(ray.train.get_dataset_shard("train"), spec, progress, world, rank, device)
    empty = pad_text_embedding(spec.empty_prompt.float(), spec.cfg.data.max_text_tokens)
    log = MetricsLog(spec, rank, world, acc)
    while progress.step < t.steps:
        step_start, wait, samples, tokens = time.perf_counter(), 0.0, 0, 0
        loss_sum = torch.zeros((), device=device)
        gen = torch.Generator().manual_seed(t.seed * 1_000_003 + rank * 10_007 + progress.step)
        for micro in range(t.grad_accum):
            w0 = time.perf_counter()
            batch = batches.next()
            wait += time.perf_counter() - w0
            model.set_requires_gradient_sync(micro == t.grad_accum - 1)  # reduce-scatter once per step
            loss = flow_loss(model, batch, spec, empty, gen, device) / t.grad_accum
            loss.backward()
            loss_sum += loss.detach()
            samples, tokens = samples + batch.latents.shape[0], tokens + batch.tokens
        grad_norm = torch.nn.utils.clip_grad_norm_(params, t.clip_grad if t.clip_grad > 0 else float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        progress.step += 1
        metrics = log.step(loss_sum, grad_norm, scheduler.get_last_lr()[0], time.perf_counter() - step_start,
                           wait, samples, tokens, progress)
        if metrics:
            metrics.update(shard_stats(model, optimizer))
            log.write(metrics)
        if progress.step % t.checkpoint_every == 0 or progress.step == t.steps:
            save_checkpoint(state, progress, metrics or {"step": progress.step}, rank)
        elif metrics:
            ray.train.report(metrics)


class MetricsLog:
    """Accumulates timings between logged steps; one host sync per logged step."""

    def __init__(self, spec: LoopSpec, rank: int, world: int, acc):
        self.spec, self.rank, self.world, self.acc = spec, rank, world, acc
        self.path = Path(spec.run_dir) / "metrics.jsonl"
        self.reset = True
        self.started = None

    def step(self, loss, grad_norm, lr, seconds, wait, samples, tokens, progress) -> dict | None:
        if self.reset:
            self.seconds = self.wait = self.samples = self.tokens = 0.0
            self.reset = False
        self.seconds, self.wait = self.seconds + seconds, self.wait + wait
        self.samples, self.tokens = self.samples + samples, self.tokens + tokens
        t = self.spec.cfg.train
        if progress.step % t.log_every and progress.step != t.steps:
            return None
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        vals = torch.stack([loss.float(), grad_norm.float().to(loss.device)])
        dist.all_reduce(vals)  # mean loss over ranks; grad_norm is already global (summed, divided below)
        loss_v, norm_v = (vals / self.world).tolist()  # the host sync of this logged step
        m = {"expert": self.spec.expert, "step": progress.step, "epoch": progress.epoch, "loss": loss_v,
             "grad_norm": norm_v, "lr": lr, "samples_per_s": self.samples * self.world / self.seconds,
             "tokens_per_s": self.tokens * self.world / self.seconds, "data_wait_fraction": self.wait / self.seconds,
             "peak_memory_bytes": peak_memory_bytes(self.acc), "world_size": self.world}
        self.reset = True
        return m

    def write(self, m: dict) -> None:
        """Rank 0 appends to metrics.jsonl and prints the progress line."""
        if self.rank != 0:
            return
        step = m["step"]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps(m) + "\n")
        if self.started is None:
            self.started = (time.perf_counter(), step)
        t0, s0 = self.started
        rate = (step - s0) / (time.perf_counter() - t0) if step > s0 else 0.0
        eta = (self.spec.cfg.train.steps - step) / rate if rate else float("nan")
        print(f"[train:{m['expert']}] step {step}/{self.spec.cfg.train.steps} loss {m['loss']:.4f} "
              f"grad_norm {m['grad_norm']:.3f} lr {m['lr']:.2e} {m['samples_per_s']:.2f} samples/s "
              f"data-wait {m['data_wait_fraction']:.1%} ETA {eta:.0f}s", flush=True)

