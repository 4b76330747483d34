"""Driver side of training: one Ray Train TorchTrainer per expert.

Each expert's run directory (`--out/<expert>/`) holds Ray Train's checkpoints, metrics.jsonl,
data_order/ (the clips of every step, per rank), CONFIG_FILE and RUN_FILE: the boundary and timestep
range the expert trains on, which export writes into the exported model_index.json.
"""

from __future__ import annotations

import dataclasses
import json
import threading
from concurrent.futures import Future
from pathlib import Path

import yaml

from wanray import context_parallel, models
from wanray.config import Config
from wanray.data.shards import read_empty_prompt
from wanray.devices import accelerator
from wanray.errors import USER_ERRORS, ConfigError, DataError
from wanray.io import write_json_atomic, write_text_atomic
from wanray.train import checkpoint as ckpt
from wanray.train.data import ClipIndex
from wanray.train.loop import CONSOLE_FILE, STEP_FILE, LoopSpec, train_loop
from wanray.wan import EXPERTS, ModelKind, WanContract

RUN_FILE = "wanray_run.json"
CONFIG_FILE = "config.yaml"
"""The resolved config of the expert's latest start, beside RUN_FILE (the UI's Runs page shows it)."""


def worker_resources(cfg: Config) -> dict:
    w = cfg.train.worker
    res = {"CPU": w.cpus}
    name = accelerator(w.device).ray_resource
    if name:
        res[name] = w.accelerators
    return res


def record_run(
    cfg: Config, expert: str, contract: WanContract, index: ClipIndex, attention: str, run_dir: Path
) -> None:
    """Write (or, on resume, check) what the expert trains on; a resumed run must keep its boundary."""
    record = {
        "expert": expert,
        "boundary": contract.boundary,
        "boundary_source": contract.boundary_source,
        "timestep_range": list(contract.timestep_range(expert)),
        "attention_backend": attention,
        "clips": len(index),
    }
    path = run_dir / RUN_FILE
    if path.exists():
        before = json.loads(path.read_text())
        if before["boundary"] != contract.boundary:
            raise ConfigError(
                f"{run_dir} trained the {expert}-noise expert with boundary {before['boundary']}; "
                f"this run would use {contract.boundary}: use a new --out directory"
            )
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(record, path)
    write_text_atomic(run_dir / CONFIG_FILE, yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))


def make_trainer(cfg: Config, expert: str, data_dir, run_dir, index: ClipIndex | None = None, validator=None):
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    t = cfg.train
    if t.lora.enabled and t.init_dcp:
        raise ConfigError("train.init_dcp holds plain expert weights; with train.lora.enabled load from safetensors")
    model_path = str(models.ensure_model(cfg.model))
    contract = models.read_contract(model_path, cfg.model)
    attention = context_parallel.training_backend(cfg)
    cp = t.context_parallel
    index = index or ClipIndex.from_dir(data_dir)
    context_parallel.check(
        cp.ulysses,
        cp.ring,
        models.expert_config(model_path, expert)["num_attention_heads"],
        {contract.bucket_name(s): index.tokens(i) for i, s in enumerate(index.shapes)},
        attention,
    )
    channels = {shape[0] for shape in index.shapes}
    if channels != {contract.kind.latent_channels}:
        raise DataError(
            f"{data_dir} holds {'/'.join(map(str, sorted(channels)))}-channel latents; {contract.kind.title}'s "
            f"VAE makes {contract.kind.latent_channels}: preprocess the videos with this model (model.path) "
            "into a new directory"
        )
    if contract.kind.image == "required" and not index.conditioned:
        raise DataError(
            f"{data_dir} holds no first-frame condition for {contract.kind.title}: preprocess the videos "
            "with this model (model.path) into a new directory"
        )
    expert_dir = Path(run_dir).resolve() / expert
    if list(expert_dir.glob(f"*/{STEP_FILE}")):  # a resume: fail here, not in every worker
        ckpt.check_resumable(latest_checkpoint(run_dir, expert))
    record_run(cfg, expert, contract, index, attention, expert_dir)
    spec = LoopSpec(
        cfg, expert, model_path, contract, index, attention, read_empty_prompt(data_dir), str(expert_dir), validator
    )
    return TorchTrainer(
        train_loop,
        train_loop_config={"spec": spec},
        scaling_config=ray.train.ScalingConfig(
            num_workers=t.workers, use_gpu=t.worker.device == "cuda", resources_per_worker=worker_resources(cfg)
        ),
        torch_config=TorchConfig(backend=accelerator(t.worker.device).dist_backend),
        run_config=ray.train.RunConfig(
            name=expert,
            storage_path=str(expert_dir.parent),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=t.keep_checkpoints),
            failure_config=ray.train.FailureConfig(max_failures=t.max_failures),
        ),
    )


def trained_boundary(run_dir, experts) -> float | None:
    """The boundary the experts of a run were trained with (None for runs without a record)."""
    found = {json.loads(p.read_text())["boundary"] for e in experts if (p := Path(run_dir, e, RUN_FILE)).exists()}
    if len(found) > 1:
        raise ConfigError(
            f"the experts in {run_dir} were trained with different boundaries {sorted(found)}; export them separately"
        )
    return found.pop() if found else None


def room_for_both(cfg: Config) -> bool:
    """Whether the cluster can hold both experts' worker groups at once."""
    import ray

    total = ray.cluster_resources()
    need = {k: 2 * v * cfg.train.workers for k, v in worker_resources(cfg).items()}
    return all(total.get(k, 0) >= v for k, v in need.items())


def selected(expert: str, kind: ModelKind) -> tuple[str, ...]:
    """The experts `high`, `low` or `both` names for a model of `kind`; for a one-transformer model
    (TI2V-5B) `high` and `both` mean its transformer, `low` is an error."""
    if expert not in (*EXPERTS, "both"):
        raise ConfigError(f"--expert must be high, low or both, got {expert!r}")
    if kind.one_transformer:
        if expert == "low":
            raise ConfigError(
                f"{kind.title} has one transformer, no low-noise expert: train it with --expert high "
                "(or both, the default)"
            )
        return kind.experts
    return EXPERTS if expert == "both" else (expert,)


def train_experts(cfg: Config, expert: str, data_dir, run_dir, log=print, validation=None) -> dict:
    """Train `high`, `low` or `both` on the connected Ray (at once when the cluster has room for both worker
    groups, else one after the other). `validation` (wanray.infer.validation.Validation, which the
    drivers make when train.validation.every is set) renders validation videos beside each expert's workers."""
    experts = selected(expert, models.expected_kind(cfg.model))
    if cfg.train.validation.every and validation is None:
        raise ConfigError("train.validation.every is set: pass a Validation (pipelines/train.py makes one)")
    index = ClipIndex.from_dir(data_dir)  # read once, sent to every worker of both experts
    if (per_group := index.rows_per_row_group()) > 1:
        log(
            f"[train] warning: the shards in {data_dir} hold up to {per_group} clips per Parquet row "
            "group (written by an earlier wanray): every clip read decodes its whole row group. Preprocess into a "
            "new directory for one row group per clip"
        )
    validators = {e: validation.start(e, run_dir) for e in experts} if validation is not None else {}
    try:
        trainers = {e: make_trainer(cfg, e, data_dir, run_dir, index, validators.get(e)) for e in experts}
        with Follow([Path(run_dir) / e / CONSOLE_FILE for e in experts], log):
            try:
                results = fit(cfg, trainers, log)
            except Exception as error:
                raise worker_user_error(error) or error from None
        for e in experts:
            if results.get(e) is None or results[e].error:
                raise RuntimeError(
                    f"training the {e}-noise expert failed: {getattr(results.get(e), 'error', 'no result')}"
                )
            log(f"[train] {e}-noise expert: latest checkpoint {latest_checkpoint(run_dir, e)}")
        while validators:  # the last validation may still be rendering
            validation.finish(validators.popitem()[1], log)
    finally:
        for v in validators.values():
            validation.stop(v)
    return results


class Follow:
    """Print the lines appended to `paths` (the workers' console files) while the block runs, as `tail -f`
    would, from where each file ends at the start (a resumed run's old lines are not printed again)."""

    def __init__(self, paths: list[Path], log=print, interval: float = 0.5):
        self.log, self.interval = log, interval
        self.offsets = {p: p.stat().st_size if p.exists() else 0 for p in paths}
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True, name="console")

    def __enter__(self) -> Follow:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.done.set()
        self.thread.join()

    def _run(self) -> None:
        while not self.done.wait(self.interval):
            self._print_new()
        self._print_new()

    def _print_new(self) -> None:
        for path, offset in self.offsets.items():
            if not path.exists():
                continue
            with path.open("rb") as f:
                f.seek(offset)
                chunk = f.read()
            complete = chunk[: chunk.rfind(b"\n") + 1]  # a line still being written waits for the next poll
            self.offsets[path] = offset + len(complete)
            for line in complete.decode().splitlines():
                self.log(line)


def worker_user_error(error: Exception) -> Exception | None:
    """The error a worker raised because of what the user gave it (wanray.errors: a non-finite loss from a
    corrupt clip), out of Ray Train's WorkerGroupError, so the driver reports it in one line; else None."""
    from ray.train import WorkerGroupError

    if isinstance(error, WorkerGroupError):
        for failure in error.worker_failures.values():
            cause = getattr(failure, "cause", failure)  # a RayTaskError carries the worker's own exception
            if isinstance(cause, USER_ERRORS):
                return cause
    return None


def fit(cfg: Config, trainers: dict, log=print) -> dict:
    """Run the experts' trainers: at once when the cluster has room for both worker groups, else in turn.

    At once, each TorchTrainer.fit() runs in a daemon thread and hands its result or its error back through a
    future, so the run's error (Ray Train V2's fit() raises it) reaches the caller as itself. A Ctrl-C meanwhile
    interrupts the wait here and ends the driver; its exit ends the Ray Train controllers it owns, and with them
    the workers (Ray Train's own Ctrl-C handler is registered only when fit() runs in the main thread)."""
    results: dict = {}
    if len(trainers) == 2 and room_for_both(cfg):
        log("[train] training both experts at once")
        futures = {e: _in_thread(t.fit, f"fit-{e}") for e, t in trainers.items()}
        return {e: f.result() for e, f in futures.items()}
    for e, t in trainers.items():
        log(f"[train] training the {e}-noise expert")
        results[e] = t.fit()
    return results


def _in_thread(call, name: str) -> Future:
    """`call()` in a daemon thread (it never holds up the driver's exit); its result or error in the future."""
    future: Future = Future()

    def run() -> None:
        try:
            future.set_result(call())
        except BaseException as e:  # the caller re-raises it from future.result()
            future.set_exception(e)

    threading.Thread(target=run, name=name, daemon=True).start()
    return future


def checkpoints(run_dir, expert: str) -> dict[int, Path]:
    """Step -> checkpoint directory of every checkpoint under run_dir/<expert>/."""
    return {json.loads(p.read_text())["step"]: p.parent for p in Path(run_dir, expert).glob(f"*/{STEP_FILE}")}


def latest_checkpoint(run_dir, expert: str) -> Path:
    """The checkpoint directory with the highest step under run_dir/<expert>/."""
    found = checkpoints(run_dir, expert)
    if not found:
        raise FileNotFoundError(f"no checkpoint of the {expert}-noise expert in {Path(run_dir) / expert}")
    return found[max(found)]


def export_run(cfg: Config, run_dir, out_dir, log=print) -> Path:
    """The latest checkpoint of each expert trained in run_dir, in a copy of model.path (see
    checkpoint.export_diffusers), with the boundary they trained with in its model_index.json."""
    model_path = models.ensure_model(cfg.model)
    contract = models.read_contract(model_path, cfg.model)
    trained = {e: latest_checkpoint(run_dir, e) for e in contract.kind.experts if (Path(run_dir) / e).is_dir()}
    if not trained:
        raise FileNotFoundError(f"no trained {'/ or '.join(contract.kind.experts)}/ in {run_dir}")
    boundary = None
    if not contract.kind.one_transformer:
        boundary = trained_boundary(run_dir, trained)
        boundary = contract.boundary if boundary is None else boundary
    for e, checkpoint in trained.items():
        log(f"[export] {e}-noise expert from {checkpoint}")
    out = ckpt.export_diffusers(model_path, out_dir, trained, boundary, cfg.train.lora)
    log(
        f"[export] wrote {out} ({'' if boundary is None else f'boundary {boundary}; '}load with "
        f"{contract.kind.pipeline}.from_pretrained)"
    )
    return out


def print_plans(cfg: Config, expert: str, log=print) -> bool:
    """Print the memory plan of `high`, `low` or `both` (train.plan); True when every one fits."""
    from wanray.train.plan import measure_activations, plan_training

    model_path = models.check_model_dir(cfg.model.path)
    activations = measure_activations(cfg.train.worker.dtype, context_parallel.training_backend(cfg))
    fits = True
    for e in selected(expert, models.read_kind(model_path)):
        plan = plan_training(cfg, model_path, e, activations)
        for line in plan.lines():
            log(f"[plan] {line}")
        fits = fits and plan.fits
    return fits
