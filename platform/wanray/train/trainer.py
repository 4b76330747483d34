"""Driver side of training: one Ray Train TorchTrainer per expert."""
from __future__ import annotations

import json
import threading
from pathlib import Path

from wanray import models
from wanray.config import Config, ConfigError
from wanray.data.shards import read_empty_prompt
from wanray.devices import accelerator
from wanray.train.data import read_clip_dataset
from wanray.train.loop import STEP_FILE, LoopSpec, train_loop

EXPERTS = ("high", "low")


def worker_resources(cfg: Config) -> dict:
    t = cfg.train
    res = {"CPU": t.cpus_per_worker}
    name = accelerator(t.device).ray_resource
    if name:
        res[name] = t.accelerators_per_worker
    return res


def make_trainer(cfg: Config, expert: str, data_dir, run_dir):
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    t = cfg.train
    if t.lora.enabled and t.init_dcp:
        raise ConfigError("train.init_dcp holds plain expert weights; with train.lora.enabled load from safetensors")
    model_path = str(models.ensure_model(cfg.model))
    run_dir = Path(run_dir).resolve()
    spec = LoopSpec(cfg, expert, model_path, read_empty_prompt(data_dir), str(run_dir / expert))
    return TorchTrainer(
        train_loop,
        train_loop_config={"spec": spec},
        scaling_config=ray.train.ScalingConfig(num_workers=t.workers, use_gpu=t.device == "cuda",
                                               resources_per_worker=worker_resources(cfg)),
        torch_config=TorchConfig(backend=accelerator(t.device).dist_backend),
        run_config=ray.train.RunConfig(
            name=expert, storage_path=str(run_dir),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=t.keep_checkpoints),
            failure_config=ray.train.FailureConfig(max_failures=t.max_failures)),
        datasets={"train": read_clip_dataset(data_dir)},
    )


def room_for_both(cfg: Config) -> bool:
    """Whether the cluster can hold both experts' worker groups at once (leaving a CPU for Ray Data)."""
    import ray

    total = ray.cluster_resources()
    need = {k: 2 * v * cfg.train.workers for k, v in worker_resources(cfg).items()}
    need["CPU"] = need["CPU"] + 1
    return all(total.get(k, 0) >= v for k, v in need.items())


def train_experts(cfg: Config, expert: str, data_dir, run_dir, log=print) -> dict:
    """Train `high`, `low` or `both` (at once when the cluster has room, else one after the other)."""
    experts = EXPERTS if expert == "both" else (expert,)
    if any(e not in EXPERTS for e in experts):
        raise ConfigError(f"--expert must be high, low or both, got {expert!r}")
    trainers = {e: make_trainer(cfg, e, data_dir, run_dir) for e in experts}
    results: dict = {}
    if len(experts) == 2 and room_for_both(cfg):
        log("[train] training both experts at once")
        threads = [threading.Thread(target=lambda e=e: results.__setitem__(e, trainers[e].fit())) for e in experts]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
    else:
        for e in experts:
            log(f"[train] training the {e}-noise expert")
            results[e] = trainers[e].fit()
    for e in experts:
        if results.get(e) is None or results[e].error:
            raise RuntimeError(f"training the {e}-noise expert failed: {getattr(results.get(e), 'error', 'no result')}")
        log(f"[train] {e}-noise expert: latest checkpoint {latest_checkpoint(run_dir, e)}")
    return results


def latest_checkpoint(run_dir, expert: str) -> Path:
    """The checkpoint directory with the highest step under run_dir/<expert>/."""
    found = [(json.loads(p.read_text())["step"], p.parent) for p in Path(run_dir, expert).glob(f"*/{STEP_FILE}")]
    if not found:
        raise FileNotFoundError(f"no checkpoint of the {expert}-noise expert in {Path(run_dir) / expert}")
    return max(found)[1]
