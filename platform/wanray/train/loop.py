"""The per-worker training loop Ray Train runs on every rank of one expert's worker group."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml

from wanray import context_parallel
from wanray.config import Config
from wanray.devices import accelerator, torch_dtype
from wanray.errors import NonFiniteLoss
from wanray.schema import pad_text_embedding
from wanray.train import checkpoint as ckpt
from wanray.train.data import Batch, ClipIndex, ClipLoader, ClipReader, DataPlan, StepData
from wanray.train.flow import FlowDraw, batch_seed, draw_flow, keep_first_frame, noisy_latents
from wanray.train.parallel import (
    apply_fsdp,
    build_on_meta,
    init_lora,
    load_expert_shards,
    materialize,
    shard_stats,
    trainable_parameters,
)
from wanray.train.tracking import Tracker
from wanray.wan import WanContract, first_frame_mask

STEP_FILE = "wanray_step.json"
CONSOLE_FILE = "console.log"
"""Per expert run directory: rank 0's progress lines, which the driver prints as they come."""


@dataclass
class LoopSpec:
    """Everything a worker needs, sent by the driver."""

    cfg: Config
    expert: str
    model_path: str
    contract: WanContract
    """The Wan2.2 contract of model_path under cfg.model: the boundary this expert trains on."""
    index: ClipIndex
    """Every clip of the training data; each worker reads its own."""
    attention: str
    """diffusers attention backend of the expert (config.attention_backend, resolved by the driver)."""
    empty_prompt: torch.Tensor
    """Unpadded empty-prompt embedding (caption dropout)."""
    run_dir: str
    """Where rank 0 appends metrics.jsonl and every data-parallel rank its data_order/ record."""
    validator: Any = None
    """The validation actor (wanray.infer.validation.Validator) rank 0 tells of each validation step's
    checkpoint once it is reported; None: no validation."""


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
    """Meta -> context parallelism -> FSDP2 shards -> local storage -> weights. A resumed run
    (fresh=False) gets its trained tensors from the checkpoint; LoRA's frozen base, which its
    checkpoints leave out, is loaded here either way, and a fresh LoRA run initialises its adapters.

    With context parallelism FSDP2 still shards over every rank, the context-parallel ones included:
    parameters, gradients and optimizer state do not grow with the sequence, so the widest sharding
    holds the least per rank (torchtitan's dp_shard x cp). Its gradient mean over all ranks is
    the sample mean because a group's ranks each hold part of a sample's gradient (see train_step)."""
    t = spec.cfg.train
    model = build_on_meta(spec.model_path, spec.expert, t.lora, spec.attention)
    cp = t.context_parallel
    if cp.degree > 1:
        context_parallel.enable(model, cp.ulysses, cp.ring, context_parallel.mesh(device, cp.ulysses, cp.ring), device)
    apply_fsdp(model, device, t.worker.dtype, t.reduce_dtype, t.activation_checkpointing)
    materialize(model, device)
    if fresh or t.lora.enabled:
        if t.init_dcp:
            ckpt.load_model_weights(model, t.init_dcp)
        else:
            load_expert_shards(model, spec.model_path, spec.expert)
    if fresh and t.lora.enabled:
        init_lora(model, t.seed)
    return model.train()


def build_optimizer(spec: LoopSpec, params: list, device: torch.device):
    t = spec.cfg.train
    optimizer = torch.optim.AdamW(
        params,
        lr=t.lr,
        betas=(t.betas[0], t.betas[1]),
        eps=t.eps,
        weight_decay=t.weight_decay,
        fused=device.type != "cpu",
    )
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(spec.cfg))


def draw_for(batch: Batch, spec: LoopSpec) -> FlowDraw:
    t = spec.cfg.train
    return draw_flow(
        tuple(batch.latents.shape),
        spec.expert,
        spec.contract,
        t.timestep_shift,
        t.caption_dropout,
        batch_seed(t.seed, batch.epoch, batch.index),
        t.image_condition,
    )


def flow_loss(model, batch: Batch, draw: FlowDraw, empty: torch.Tensor, spec: LoopSpec, device: torch.device):
    """Flow-matching MSE on the expert's side of the boundary, with caption dropout.

    x_t is built in float32 from the float32 timesteps, and the model is given those same
    timesteps; latents and text are cast to the compute dtype here (FSDP2 casts no inputs)."""
    compute = torch_dtype(spec.cfg.train.worker.dtype)
    x0, text = batch.latents.float(), batch.text.float()
    text[draw.drop_caption] = empty
    xt, target = noisy_latents(x0, draw.noise, draw.timesteps, spec.contract.num_train_timesteps)
    timesteps, kept = draw.timesteps, None
    if spec.contract.kind.image == "required":  # image to video: mask and first-frame channels, as its sampler
        assert batch.condition is not None  # make_trainer refuses data without it
        mask = first_frame_mask(x0.shape, spec.contract.vae_scale_temporal)
        xt = torch.cat([xt, mask, batch.condition.float()], dim=1)
    elif spec.contract.kind.expand_timesteps:  # TI2V: per-token timesteps, some clips' first frame clean
        xt, timesteps, kept = keep_first_frame(xt, x0, timesteps, draw.first_frame)
    pred = model(
        hidden_states=xt.to(device, compute),
        timestep=timesteps.to(device),
        encoder_hidden_states=text.to(device, compute),
        return_dict=False,
    )[0]
    if kept is None or not draw.first_frame.any():
        return F.mse_loss(pred.float(), target.to(device))
    # the mean over each clip's noised elements, then over clips: a clean first frame is not learned
    kept = kept.to(device).expand_as(target)
    per_clip = ((pred.float() - target.to(device)) ** 2 * kept).flatten(1).sum(1) / kept.flatten(1).sum(1)
    return per_clip.mean()


def train_step(
    model,
    params: list,
    optimizer,
    lr_schedule,
    step: StepData,
    spec: LoopSpec,
    empty: torch.Tensor,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One optimizer step over this rank's micro-batches: (summed loss, grad norm, the timesteps drawn)."""
    t = spec.cfg.train
    loss_sum, drawn, losses = torch.zeros((), device=device), [], []
    world, group = dist.get_world_size(), t.context_parallel.degree
    # The loss is the mean over every clip of the step, on all ranks: micro-batches of different
    # buckets hold different numbers of clips, and FSDP2 averages the ranks' gradients. The ranks of a
    # context-parallel group see the same clips and their gradients sum to the clips' (each holds its
    # shard's part), so the weight is the same; the loss they report is the clips' `group` times.
    samples = step.samples or world // group * sum(b.latents.shape[0] for b in step.batches)
    for micro, batch in enumerate(step.batches):
        # Full fine-tuning reduce-scatters every micro-batch: without it each rank would keep the
        # unsharded gradients (14.3B x 4 bytes = 57 GB in fp32). LoRA's are small: sync once per step.
        model.set_requires_gradient_sync(not t.lora.enabled or micro == len(step.batches) - 1)
        draw = draw_for(batch, spec)
        weight = batch.latents.shape[0] * world / samples
        loss = flow_loss(model, batch, draw, empty, spec, device) * weight
        loss.backward()
        loss_sum += loss.detach() / group
        losses.append(loss.detach())
        drawn.append(draw.timesteps)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, t.clip_grad if t.clip_grad > 0 else float("inf"))
    if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor, reduced over the ranks here (a scalar all-reduce)
        grad_norm = grad_norm.full_tensor()
    # A host sync every step, deliberately: AdamW would write a non-finite gradient into every weight, and
    # clipping does not stop NaN. The norm is global, so every rank stops at the same step.
    if not torch.isfinite(grad_norm):
        bad = [i for b, loss in zip(step.batches, losses) if not torch.isfinite(loss) for i in b.ids]
        raise NonFiniteLoss(f"gradient norm {float(grad_norm)}", bad, [i for b in step.batches for i in b.ids])
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    lr_schedule.step()
    return loss_sum, grad_norm, torch.cat(drawn)


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


def data_order_path(run_dir, rank: int) -> Path:
    return Path(run_dir) / "data_order" / f"rank-{rank:05d}.jsonl"


def train_loop(config: dict) -> None:
    import ray.train

    spec: LoopSpec = config["spec"]
    t = spec.cfg.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    acc = accelerator(t.worker.device)
    device = acc.torch_device()
    resume = ray.train.get_checkpoint()
    model = build_model(spec, device, fresh=resume is None)
    params = trainable_parameters(model)
    optimizer, lr_schedule = build_optimizer(spec, params, device)
    group = t.context_parallel.degree  # the ranks of a context-parallel group read the same clips
    plan = DataPlan(spec.index, t.batch_size, t.seed, world // group, t.grad_accum, t.scale_batch_by_tokens)
    progress = ckpt.Progress(data_fingerprint=plan.fingerprint())
    state = ckpt.app_state(model, optimizer, lr_schedule, progress, lora=t.lora.enabled)
    log = MetricsLog(spec, rank, world, acc)
    if resume is not None:
        with resume.as_directory() as d:
            ckpt.load(state, d)
        log.resumed(progress, order_changed=progress.data_fingerprint != plan.fingerprint())
        progress.data_fingerprint = plan.fingerprint()
    loader = ClipLoader(
        plan,
        ClipReader(spec.index, t.cache_bytes),
        progress.epoch,
        progress.batches_in_epoch,
        rank // group,
        spec.contract.text_tokens,
    )
    empty = pad_text_embedding(spec.empty_prompt.float(), spec.contract.text_tokens)
    order = data_order_path(spec.run_dir, rank // group)  # one record per data-parallel rank: its group's first
    order.parent.mkdir(parents=True, exist_ok=True)
    try:
        with order.open("a") if rank % group == 0 else open(os.devnull, "w") as order_log:
            while progress.step < t.steps:
                step_start = time.perf_counter()
                step = loader.next()
                wait = time.perf_counter() - step_start
                try:
                    loss, grad_norm, timesteps = train_step(
                        model, params, optimizer, lr_schedule, step, spec, empty, device
                    )
                except NonFiniteLoss as e:
                    raise non_finite(e, progress.step + 1, log) from None
                progress.step += 1
                progress.epoch, progress.batches_in_epoch = step.epoch, step.start + plan.per_step
                order_log.write(
                    json.dumps(
                        {
                            "step": progress.step,
                            "epoch": step.epoch,
                            "batches": [b.index for b in step.batches],
                            "ids": [i for b in step.batches for i in b.ids],
                        }
                    )
                    + "\n"
                )
                order_log.flush()
                metrics = log.step(
                    loss,
                    grad_norm,
                    lr_schedule.get_last_lr()[0],
                    time.perf_counter() - step_start,
                    wait,
                    step,
                    timesteps,
                    progress,
                )
                if metrics:
                    metrics.update(shard_stats(model, optimizer))
                    log.write(metrics)
                # Ray Train hears of metrics with checkpoints only: a V2 report blocks until the
                # controller's next poll (every 2 s), which costs more than a small step.
                if progress.step % t.checkpoint_every == 0 or progress.step == t.steps:
                    save_checkpoint(state, progress, metrics or {"step": progress.step}, rank)
                    if spec.validator is not None and rank == 0 and progress.step % t.validation.every == 0:
                        spec.validator.submit.remote(progress.step)  # returns at once: training goes on
    finally:
        loader.close()
        log.tracker.close()


def non_finite(error: NonFiniteLoss, step: int, log: MetricsLog) -> NonFiniteLoss:
    """The error every rank raises at the step whose gradients are not finite (all reach it together: the
    norm is global), naming the step's suspect clips of every data-parallel rank; rank 0 also prints it."""
    found: list = [None] * dist.get_world_size()
    dist.all_gather_object(found, (error.clips, error.step_clips))
    bad = {c for clips, _ in found for c in clips}
    suspects = sorted(bad or {c for _, clips in found for c in clips})
    message = (
        f"step {step}: the loss is not finite ({error}); clips: {', '.join(suspects)}. Stopped before the "
        f"optimizer step, so the weights are step {step - 1}'s; each rank's clips of every step are in "
        f"{Path(log.spec.run_dir) / 'data_order'}. Check those clips' latents, or lower train.lr"
    )
    log.say(f"error: {message}")
    return NonFiniteLoss(message, suspects)


class MetricsLog:
    """Accumulates timings between logged steps; one host sync per logged step."""

    def __init__(self, spec: LoopSpec, rank: int, world: int, acc):
        self.spec, self.rank, self.world, self.acc = spec, rank, world, acc
        self.path = Path(spec.run_dir) / "metrics.jsonl"
        self.range = list(spec.contract.timestep_range(spec.expert))
        self.reset = True
        self.started: tuple[float, int] | None = None
        self.tracker = Tracker(spec.cfg.train.tracker if rank == 0 else "none", spec.run_dir, "train")
        self.tracker.text("config", "```\n" + yaml.safe_dump(dataclasses.asdict(spec.cfg), sort_keys=False) + "```")
        self.say(
            f"{spec.contract.describe_range(spec.expert)} (boundary {spec.contract.boundary} from "
            f"{spec.contract.boundary_source}); {len(spec.index)} clips, {world} workers"
        )

    def say(self, text: str) -> None:
        """Rank 0 appends a line to the expert's console file, which the driver prints (see trainer.fit):
        worker output itself reaches the terminal only with --verbose."""
        if self.rank == 0:
            with (Path(self.spec.run_dir) / CONSOLE_FILE).open("a") as f:
                f.write(f"[train:{self.spec.expert}] {text}\n")

    def resumed(self, progress: ckpt.Progress, order_changed: bool) -> None:
        self.say(
            f"resumed at step {progress.step} (epoch {progress.epoch}, {progress.batches_in_epoch} "
            f"batches into it) on {self.world} workers"
        )
        if order_changed:
            self.say(
                "warning: the data order differs from the one this run started with (shards added, removed "
                "or rewritten, or train.seed, train.batch_size or workers x grad_accum changed): from here on "
                "the batches are not those of an uninterrupted run"
            )

    def step(self, loss, grad_norm, lr, seconds, wait, step: StepData, timesteps, progress) -> dict | None:
        if self.reset:
            self.seconds = self.wait = self.samples = self.tokens = 0.0
            self.t_min, self.t_max = math.inf, -math.inf
            self.buckets: Counter[str] = Counter()
            self.reset = False
        self.seconds, self.wait = self.seconds + seconds, self.wait + wait
        index = self.spec.index
        for shape_id, clips in step.shapes.items():  # the whole step's, from the data plan: no communication
            self.samples += clips
            self.tokens += clips * index.tokens(shape_id)
            self.buckets[self.spec.contract.bucket_name(index.shapes[shape_id])] += clips
        self.t_min = min(self.t_min, float(timesteps.min()))  # CPU tensors: no device sync
        self.t_max = max(self.t_max, float(timesteps.max()))
        t = self.spec.cfg.train
        if progress.step % t.log_every and progress.step != t.steps:
            return None
        vals = torch.stack([loss.float(), grad_norm.float().to(loss.device)])
        dist.all_reduce(vals)  # mean loss over ranks; grad_norm is already global (summed, divided below)
        loss_v, norm_v = (vals / self.world).tolist()  # the host sync of this logged step
        m = {
            "expert": self.spec.expert,
            "step": progress.step,
            "time": time.time(),
            "epoch": progress.epoch,
            "loss": loss_v,
            "grad_norm": norm_v,
            "lr": lr,
            "samples_per_s": self.samples / self.seconds,
            "tokens_per_s": self.tokens / self.seconds,
            "buckets": dict(sorted(self.buckets.items())),
            "data_wait_fraction": self.wait / self.seconds,
            "timestep_range": self.range,
            "timesteps_seen": [self.t_min, self.t_max],
            "peak_memory_bytes": peak_memory_bytes(self.acc),
            "world_size": self.world,
        }
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
        self.tracker.scalars(m)
        if self.started is None:
            self.started = (time.perf_counter(), step)
        t0, s0 = self.started
        rate = (step - s0) / (time.perf_counter() - t0) if step > s0 else 0.0
        eta = f"{(self.spec.cfg.train.steps - step) / rate:.0f}s" if rate else "-"
        self.say(
            f"step {step}/{self.spec.cfg.train.steps} loss {m['loss']:.4f} "
            f"grad_norm {m['grad_norm']:.3f} lr {m['lr']:.2e} {m['samples_per_s']:.2f} samples/s "
            f"data-wait {m['data_wait_fraction']:.1%} t {m['timesteps_seen'][0]:.0f}-{m['timesteps_seen'][1]:.0f} "
            f"ETA {eta}"
        )
