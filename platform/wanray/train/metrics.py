"""What a training rank reports: its progress lines (through the expert's console file, which the driver
prints), metrics.jsonl, the tracker, and the metrics of each logged step."""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections import Counter
from dataclasses import dataclass

import psutil
import torch
import torch.distributed as dist
import yaml

from wanray.io import write_json_atomic
from wanray.storage import WorkingCopy
from wanray.train import checkpoint as ckpt
from wanray.train.data import StepData
from wanray.train.tracking import Tracker

METRICS_FILE = "metrics.jsonl"
"""Per expert run directory: rank 0's record of every logged step and held-out loss, one JSON line each."""
CONSOLE_FILE = "console.log"
"""Per expert run directory: rank 0's progress lines, which the driver prints as they come."""
SYNC_SECONDS = 5.0
"""In a run directory in an object store, rank 0 uploads the console and metrics at most this often (and at each
checkpoint and the end)."""
BEST_FILE = "best.json"
"""Per expert run directory: the step whose checkpoint has the lowest held-out loss so far, and that loss."""


@dataclass
class StepMetrics:
    """What one optimizer step reports; device tensors, read on the logged steps (MetricsLog)."""

    loss: torch.Tensor
    """This rank's share of the step's mean loss over its clips (summed over micro-batches)."""
    grad_norm: torch.Tensor
    """The global gradient norm before clipping."""
    timesteps: torch.Tensor
    """Every timestep this rank drew, on the CPU."""
    lr: float
    """The learning rate the step used (the schedule has moved on to the next step's when it is read)."""


def peak_memory_bytes(acc) -> int:
    peak = acc.peak_memory_bytes()
    return peak if peak is not None else psutil.Process().memory_info().rss


class MetricsLog:
    """Accumulates timings between logged steps; one host sync per logged step."""

    def __init__(self, spec, rank: int, world: int, acc, files: WorkingCopy):
        """spec: the rank's wanray.train.loop.LoopSpec; files: its working copy of the expert's run directory,
        into which rank 0 writes METRICS_FILE, CONSOLE_FILE and BEST_FILE (synced as they change)."""
        self.spec, self.rank, self.world, self.acc, self.files = spec, rank, world, acc, files
        self.path = files.local / METRICS_FILE
        self.range = list(spec.contract.timestep_range(spec.expert))
        self.reset = True
        self.started: tuple[float, int] | None = None
        self.tracker = Tracker(spec.cfg.train.tracker if rank == 0 else "none", files.local, "train")
        self.tracker.text("config", "```\n" + yaml.safe_dump(dataclasses.asdict(spec.cfg), sort_keys=False) + "```")
        self.say(
            f"{spec.contract.describe_range(spec.expert)} (boundary {spec.contract.boundary} from "
            f"{spec.contract.boundary_source}); {len(spec.index)} clips, {world} workers"
        )

    def say(self, text: str) -> None:
        """Rank 0 appends a line to the expert's console file, which the driver prints (see trainer.fit):
        worker output itself reaches the terminal only with --verbose."""
        if self.rank == 0:
            with (self.files.local / CONSOLE_FILE).open("a") as f:
                f.write(f"[train:{self.spec.expert}] {text}\n")
            self.files.sync(CONSOLE_FILE, every=SYNC_SECONDS)

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
        if self.rank == 0:
            self.files.sync(CONSOLE_FILE)  # not held back by the start's line just before

    def step(self, result: StepMetrics, seconds: float, wait: float, data: StepData, progress) -> dict | None:
        """The metrics of this step when it is a logged one (else None), accumulated since the last."""
        if self.reset:
            self.seconds = self.wait = self.samples = self.tokens = 0.0
            self.t_min, self.t_max = math.inf, -math.inf
            self.buckets: Counter[str] = Counter()
            self.reset = False
        self.seconds, self.wait = self.seconds + seconds, self.wait + wait
        index = self.spec.index
        for shape_id, clips in data.shapes.items():  # the whole step's, from the data plan: no communication
            self.samples += clips
            self.tokens += clips * index.tokens(shape_id)
            self.buckets[self.spec.contract.bucket_name(index.shapes[shape_id])] += clips
        self.t_min = min(self.t_min, float(result.timesteps.min()))  # CPU tensors: no device sync
        self.t_max = max(self.t_max, float(result.timesteps.max()))
        train = self.spec.cfg.train
        if progress.step % train.log_every and progress.step != train.steps:
            return None
        loss = result.loss
        vals = torch.stack([loss.float(), result.grad_norm.float().to(loss.device)])
        dist.all_reduce(vals)  # mean loss over ranks; grad_norm is already global (summed, divided below)
        loss_v, norm_v = (vals / self.world).tolist()  # the host sync of this logged step
        m = {
            "expert": self.spec.expert,
            "step": progress.step,
            "time": time.time(),
            "epoch": progress.epoch,
            "loss": loss_v,
            "grad_norm": norm_v,
            "lr": result.lr,
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

    def held_out(self, m: dict) -> None:
        """Rank 0 appends a held-out loss record (HeldOutLoss.metrics) to metrics.jsonl, the tracker and the
        console, and records the best step so far in BEST_FILE (what export.py --best exports)."""
        if self.rank != 0:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(m) + "\n")
        self.tracker.scalars(m)
        best_path = self.path.parent / BEST_FILE
        best = json.loads(best_path.read_text()) if best_path.exists() else None
        if best is None or m["val_loss"] < best["val_loss"]:
            write_json_atomic({"step": m["step"], "val_loss": m["val_loss"]}, best_path)
            best = m
        self.files.sync(METRICS_FILE, BEST_FILE)
        bands = ", ".join(f"{k} {v:.4f}" for k, v in m["val_loss_bands"].items())
        clips = f"{m['val_clips']} clip{'' if m['val_clips'] == 1 else 's'}"
        self.say(
            f"step {m['step']} held-out loss {m['val_loss']:.4f} over {clips} ({bands}); "
            f"best {best['val_loss']:.4f} at step {best['step']}"
        )

    def write(self, m: dict) -> None:
        """Rank 0 appends to metrics.jsonl and prints the progress line."""
        if self.rank != 0:
            return
        step = m["step"]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps(m) + "\n")
        self.files.sync(METRICS_FILE, every=SYNC_SECONDS)
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
