"""The per-worker training loop Ray Train runs on every rank of one expert's worker group."""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from wanray import context_parallel, storage
from wanray.config import Config
from wanray.devices import accelerator, torch_dtype
from wanray.errors import NonFiniteLoss
from wanray.schema import pad_text_embedding
from wanray.storage import WorkingCopy
from wanray.train import checkpoint as ckpt
from wanray.train.data import Batch, ClipIndex, ClipLoader, ClipReader, DataPlan, StepData, holdout_batches
from wanray.train.flow import (
    FlowDraw,
    band_timesteps,
    batch_seed,
    draw_flow,
    holdout_noise,
    keep_first_frame,
    noisy_latents,
)
from wanray.train.metrics import BEST_FILE, CONSOLE_FILE, METRICS_FILE, MetricsLog, StepMetrics
from wanray.train.parallel import (
    apply_fsdp,
    build_on_meta,
    init_lora,
    load_expert_shards,
    materialize,
    shard_stats,
    trainable_parameters,
)
from wanray.train.runs import STEP_FILE
from wanray.wan import WanContract, first_frame_mask


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
    """The expert's run directory (local or a URI): rank 0's metrics.jsonl, console.log and tracker files, and
    every data-parallel rank's data_order/ record, each written through the rank's WorkingCopy of it."""
    validator: Any = None
    """The validation actor (wanray.infer.validation.Validator) rank 0 tells of each validation step's
    checkpoint once it is reported; None: no validation videos."""
    holdout: ClipIndex | None = None
    """The held-out clips whose loss every validation step measures; None: no held-out loss."""


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
    the sample mean because a group's ranks each hold part of a sample's gradient (see ExpertTrainer.step)."""
    t = spec.cfg.train
    model = build_on_meta(spec.model_path, spec.expert, t.lora, spec.attention)
    cp = t.context_parallel
    if cp.degree > 1:
        context_parallel.enable(model, cp.ulysses, cp.ring, context_parallel.mesh(device, cp.ulysses, cp.ring), device)
    compile_backend = t.compile_backend if t.compile else ""
    apply_fsdp(model, device, t.worker.dtype, t.reduce_dtype, t.activation_checkpointing, compile_backend, t.float8)
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


class ExpertTrainer:
    """One rank's training of one expert: its model (FSDP2 shards), trainable parameters, optimizer, learning
    rate schedule, the spec and the device. `step()` runs one optimizer step."""

    def __init__(self, spec: LoopSpec, device: torch.device, model, params: list, optimizer, schedule):
        self.spec, self.device = spec, device
        self.model, self.params, self.optimizer, self.schedule = model, params, optimizer, schedule
        self.empty = pad_text_embedding(spec.empty_prompt.float(), spec.contract.text_tokens)

    @classmethod
    def build(cls, spec: LoopSpec, device: torch.device, fresh: bool) -> ExpertTrainer:
        """The model sharded and loaded (build_model), then its optimizer and schedule."""
        model = build_model(spec, device, fresh)
        params = trainable_parameters(model)
        optimizer, schedule = build_optimizer(spec, params, device)
        return cls(spec, device, model, params, optimizer, schedule)

    def step(self, data: StepData) -> StepMetrics:
        """One optimizer step over this rank's micro-batches."""
        train, spec, device = self.spec.cfg.train, self.spec, self.device
        loss_sum, drawn, losses = torch.zeros((), device=device), [], []
        world, group = dist.get_world_size(), train.context_parallel.degree
        # The loss is the mean over every clip of the step, on all ranks: micro-batches of different
        # buckets hold different numbers of clips, and FSDP2 averages the ranks' gradients. The ranks of a
        # context-parallel group see the same clips and their gradients sum to the clips' (each holds its
        # shard's part), so the weight is the same; the loss they report is the clips' `group` times.
        samples = data.samples or world // group * sum(b.latents.shape[0] for b in data.batches)
        for micro, batch in enumerate(data.batches):
            # Full fine-tuning reduce-scatters every micro-batch: without it each rank would keep the
            # unsharded gradients (14.3B x 4 bytes = 57 GB in fp32). LoRA's are small: sync once per step.
            self.model.set_requires_gradient_sync(not train.lora.enabled or micro == len(data.batches) - 1)
            draw = draw_for(batch, spec)
            weight = batch.latents.shape[0] * world / samples
            loss = flow_loss(self.model, batch, draw, self.empty, spec, device) * weight
            loss.backward()
            loss_sum += loss.detach() / group
            losses.append(loss.detach())
            drawn.append(draw.timesteps)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, train.clip_grad if train.clip_grad > 0 else math.inf)
        if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor, reduced over the ranks here (a scalar all-reduce)
            grad_norm = grad_norm.full_tensor()
        # A host sync every step, deliberately: AdamW would write a non-finite gradient into every weight, and
        # clipping does not stop NaN. The norm is global, so every rank stops at the same step.
        if not torch.isfinite(grad_norm):
            bad = [i for b, loss in zip(data.batches, losses) if not torch.isfinite(loss) for i in b.ids]
            raise NonFiniteLoss(f"gradient norm {float(grad_norm)}", bad, [i for b in data.batches for i in b.ids])
        lr = self.schedule.get_last_lr()[0]  # this step's: the schedule steps to the next one's below
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.schedule.step()
        return StepMetrics(loss_sum, grad_norm, torch.cat(drawn), lr)


@dataclass
class HeldOutLoss:
    """The held-out loss of one checkpoint: per timestep band and their mean."""

    timesteps: list[float]
    """The bands' fixed timesteps, highest first."""
    bands: list[float]
    clips: int

    @property
    def mean(self) -> float:
        return sum(self.bands) / len(self.bands)

    def metrics(self, step: int, expert: str) -> dict:
        """Its metrics.jsonl record."""
        return {
            "expert": expert,
            "step": step,
            "time": time.time(),
            "val_loss": self.mean,
            "val_loss_bands": {f"t{t:.0f}": v for t, v in zip(self.timesteps, self.bands)},
            "val_clips": self.clips,
        }


class HeldOut:
    """Measures the held-out loss on every rank of the expert's group: each data-parallel rank takes every
    D-th batch, all ranks run the same number of forwards (FSDP2 gathers in each), and the sums meet in one
    all-reduce. Fixed noise per clip and band, fixed timesteps, no caption dropout, no first-frame
    conditioning of TI2V clips: the same checkpoint gives the same value."""

    def __init__(self, spec: LoopSpec, dp_rank: int, dp_size: int):
        assert spec.holdout is not None
        v, t = spec.cfg.train.validation, spec.cfg.train
        self.spec, self.dp_rank, self.dp_size = spec, dp_rank, dp_size
        self.reader = ClipReader(spec.holdout, t.cache_bytes)
        self.batches = holdout_batches(spec.holdout, t.batch_size)
        self.timesteps = band_timesteps(spec.expert, spec.contract, t.timestep_shift, v.holdout_bands)

    @torch.no_grad()
    def measure(self, trainer: ExpertTrainer) -> HeldOutLoss:
        spec, device, bands = self.spec, trainer.device, len(self.timesteps)
        sums = torch.zeros(bands + 1, dtype=torch.float64)  # loss x clips per band, then the clips
        mine = self.batches[self.dp_rank :: self.dp_size]
        trainer.model.eval()
        try:
            for i in range(math.ceil(len(self.batches) / self.dp_size)):
                counted = i < len(mine)  # a rank out of batches runs its first again, counted 0
                clips = mine[i] if counted else self.batches[0]
                batch = self.reader.batch(clips, -1, i, spec.contract.text_tokens)
                n = len(clips)
                for b, t in enumerate(self.timesteps):
                    shape = tuple(batch.latents.shape[1:])
                    draw = FlowDraw(
                        t.repeat(n),
                        torch.stack([holdout_noise(spec.cfg.train.seed, int(c), b, shape) for c in clips]),
                        torch.zeros(n, dtype=torch.bool),
                        torch.zeros(n, dtype=torch.bool),
                    )
                    loss = flow_loss(trainer.model, batch, draw, trainer.empty, spec, device)
                    sums[b] += float(loss) * n * counted
                sums[-1] += n * counted
        finally:
            trainer.model.train()
        total = sums.float().to(device)  # float32: what every collective backend reduces
        dist.all_reduce(total)  # a context-parallel group's ranks measured the same clips: their count cancels
        total = total.cpu()
        return HeldOutLoss(
            self.timesteps.tolist(),
            (total[:-1] / total[-1]).tolist(),
            int(total[-1]) // (spec.cfg.train.context_parallel.degree),
        )


def save_checkpoint(state: dict, progress: ckpt.Progress, metrics: dict, rank: int, run_dir: str) -> str | None:
    """Every rank writes its shards to a local temp dir and Ray Train uploads them into one checkpoint of run_dir;
    once every rank's are there, rank 0 writes its STEP_FILE, by which export, validation and the UI know it: a
    directory without one is a checkpoint still being written (an upload runs file by file). Rank 0 gets the
    checkpoint's directory (None if Ray Train skipped the report); the other ranks None."""
    import ray.train

    before = ray.train.get_checkpoint()
    with tempfile.TemporaryDirectory() as d:
        ckpt.save(state, d)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))  # once this rank's are up
    dist.barrier()
    persisted = ray.train.get_checkpoint()  # the checkpoint just reported, where Ray Train put it
    if rank == 0 and persisted is not None and (before is None or persisted.path != before.path):  # not skipped
        directory = storage.join(run_dir, storage.name(persisted.path))
        storage.write_json({"step": progress.step}, storage.join(directory, STEP_FILE))
        return directory
    return None


def own_files(rank: int, group: int) -> list[str]:
    """The run-directory files a rank writes (relative): rank 0 the metrics, console, best step and tracker files;
    the first rank of each context-parallel group its data-parallel rank's data order."""
    own = [METRICS_FILE, CONSOLE_FILE, BEST_FILE, "tensorboard"] if rank == 0 else []
    return own + ([f"data_order/rank-{rank // group:05d}.jsonl"] if rank % group == 0 else [])


def train_loop(config: dict) -> None:
    import ray.train

    spec: LoopSpec = config["spec"]
    train = spec.cfg.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    acc = accelerator(train.worker.device)
    resume = ray.train.get_checkpoint()
    trainer = ExpertTrainer.build(spec, acc.torch_device(), fresh=resume is None)
    group = train.context_parallel.degree  # the ranks of a context-parallel group read the same clips
    plan = DataPlan(
        spec.index, train.batch_size, train.seed, world // group, train.grad_accum, train.scale_batch_by_tokens
    )
    progress = ckpt.Progress(data_fingerprint=plan.fingerprint())
    state = ckpt.app_state(trainer.model, trainer.optimizer, trainer.schedule, progress, lora=train.lora.enabled)
    own = own_files(rank, group)
    with WorkingCopy(spec.run_dir) as files:
        files.pull(*(f for f in own if f != "tensorboard"))  # appended to from here (a new event file each start)
        log = MetricsLog(spec, rank, world, acc, files)
        if resume is not None:
            with resume.as_directory() as d:
                ckpt.load(state, d)
            log.resumed(progress, order_changed=progress.data_fingerprint != plan.fingerprint())
            progress.data_fingerprint = plan.fingerprint()
        reader = ClipReader(spec.index, train.cache_bytes)
        loader = ClipLoader(
            plan, reader, progress.epoch, progress.batches_in_epoch, rank // group, spec.contract.text_tokens
        )
        held_out = HeldOut(spec, rank // group, world // group) if spec.holdout is not None else None
        order = files.local / "data_order" / f"rank-{rank // group:05d}.jsonl"  # one per data-parallel rank: its
        order.parent.mkdir(parents=True, exist_ok=True)  # group's first rank writes it
        try:
            with order.open("a") if rank % group == 0 else open(os.devnull, "w") as order_log:
                while progress.step < train.steps:
                    step_start = time.perf_counter()
                    data = loader.next()
                    wait = time.perf_counter() - step_start
                    try:
                        result = trainer.step(data)
                    except NonFiniteLoss as e:
                        raise non_finite(e, progress.step + 1, log) from None
                    progress.step += 1
                    progress.epoch, progress.batches_in_epoch = data.epoch, data.start + plan.per_step
                    ids = [i for b in data.batches for i in b.ids]
                    batches = [b.index for b in data.batches]
                    record = {"step": progress.step, "epoch": data.epoch, "batches": batches, "ids": ids}
                    order_log.write(json.dumps(record) + "\n")
                    order_log.flush()
                    metrics = log.step(result, time.perf_counter() - step_start, wait, data, progress)
                    if metrics:
                        metrics.update(shard_stats(trainer.model, trainer.optimizer))
                        log.write(metrics)
                    # Ray Train hears of metrics with checkpoints only: a V2 report blocks until the
                    # controller's next poll (every 2 s), which costs more than a small step.
                    if progress.step % train.checkpoint_every == 0 or progress.step == train.steps:
                        checkpoint(spec, trainer, state, progress, metrics, held_out, log, rank)
                        files.sync(*own)
        finally:
            loader.close()
            log.tracker.close()
            files.sync(*own)


def checkpoint(spec: LoopSpec, trainer, state: dict, progress, metrics: dict | None, held_out, log, rank: int) -> None:
    """A checkpoint of this step, its held-out loss first on a validation step (Ray Train keeps the checkpoints of
    the lowest; an unmeasured one counts as the worst), then the validation videos of it."""
    train = spec.cfg.train
    validating = bool(train.validation.every) and progress.step % train.validation.every == 0
    reported = metrics or {"step": progress.step}
    measured = held_out.measure(trainer) if held_out is not None and validating else None
    if held_out is not None:
        reported = {**reported, "val_loss": measured.mean if measured is not None else math.inf}
    directory = save_checkpoint(state, progress, reported, rank, spec.run_dir)
    if measured is not None:  # best.json names a checkpoint that exists
        log.held_out(measured.metrics(progress.step, spec.expert))
    if validating and spec.validator is not None and directory is not None:  # rank 0, a checkpoint Ray Train kept
        spec.validator.submit.remote(progress.step, directory)  # returns at once: training goes on


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
        f"{log.spec.run_dir}/data_order. Check those clips' latents, or lower train.lr"
    )
    log.say(f"error: {message}")
    return NonFiniteLoss(message, suspects)
