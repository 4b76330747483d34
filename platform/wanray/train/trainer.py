"""Driver side of training: one Ray Train TorchTrainer per expert.

Each expert's run directory (`--out/<expert>/`, local or an object-store URI) holds Ray Train's checkpoints,
metrics.jsonl, data_order/ (the clips of every step, per rank), CONFIG_FILE and RUN_FILE: the boundary and
timestep range the expert trains on, which export writes into the exported model_index.json.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, as_completed

import numpy as np

from wanray import context_parallel, model_files, models, storage
from wanray.compat import row_group_warning
from wanray.config import Config
from wanray.data.shards import read_empty_prompt
from wanray.devices import accelerator
from wanray.errors import USER_ERRORS, ConfigError, DataError
from wanray.sections import parse_filter
from wanray.train import checkpoint as ckpt
from wanray.train.console import Follow
from wanray.train.data import ClipIndex, held_out
from wanray.train.loop import LoopSpec, train_loop
from wanray.train.metrics import CONSOLE_FILE
from wanray.train.runs import checkpoints, latest_checkpoint, record_run, selected

"""The resolved config of the expert's latest start, beside RUN_FILE (the UI's Runs page shows it)."""


def worker_resources(cfg: Config) -> dict:
    w = cfg.train.worker
    res = {"CPU": w.cpus}
    name = accelerator(w.device).ray_resource
    if name:
        res[name] = w.accelerators
    return res


def make_trainer(
    cfg: Config,
    expert: str,
    data_dir,
    run_dir,
    index: ClipIndex | None = None,
    validator=None,
    holdout: ClipIndex | None = None,
):
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    t = cfg.train
    if t.lora.enabled and t.init_dcp:
        raise ConfigError("train.init_dcp holds plain expert weights; with train.lora.enabled load from safetensors")
    model_path = str(model_files.ensure_model(cfg.model))
    contract = models.read_contract(model_path, cfg.model)
    attention = context_parallel.training_backend(cfg)
    cp = t.context_parallel
    index = index or apply_filters(cfg, ClipIndex.from_dir(data_dir), data_dir, log=lambda _: None)
    # every shape a rank splits: the training clips' and the held-out ones' (a held-out directory has its own)
    shapes = {contract.bucket_name(s): index.tokens(i) for i, s in enumerate(index.shapes)}
    if holdout is not None:
        shapes |= {contract.bucket_name(s): holdout.tokens(i) for i, s in enumerate(holdout.shapes)}
    context_parallel.check(
        cp.ulysses, cp.ring, models.expert_config(model_path, expert)["num_attention_heads"], shapes, attention
    )
    check_data(index, contract, data_dir)
    if holdout is not None and holdout is not index:
        check_data(holdout, contract, cfg.train.validation.holdout or data_dir)
    expert_dir = storage.join(run_dir, expert)
    if checkpoints(run_dir, expert):  # a resume: fail here, not in every worker
        ckpt.check_resumable(latest_checkpoint(run_dir, expert))
    record_run(cfg, expert, contract, index, attention, expert_dir)
    spec = LoopSpec(
        cfg,
        expert,
        model_path,
        contract,
        index,
        attention,
        read_empty_prompt(data_dir),
        expert_dir,
        validator,
        holdout,
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
            **run_storage(run_dir),
            # with a held-out loss Ray keeps the lowest-loss checkpoints (export.py --best) and the latest (resume)
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=t.keep_checkpoints,
                **({"checkpoint_score_attribute": "val_loss", "checkpoint_score_order": "min"} if holdout else {}),
            ),
            failure_config=ray.train.FailureConfig(max_failures=t.max_failures),
        ),
    )


def run_storage(run_dir) -> dict:
    """RunConfig's storage arguments for a run directory: a local (shared) path, or a URI on the filesystem
    wanray.storage made for it (the same endpoint and credentials as every other read and write)."""
    if not storage.is_uri(run_dir):
        return {"storage_path": storage.absolute(run_dir)}
    fs, inner = storage.filesystem(run_dir)
    return {"storage_path": inner, "storage_filesystem": fs}


def check_data(index: ClipIndex, contract, data_dir) -> None:
    """A DataError unless the preprocessed clips are this model's: its latent channels, and first-frame
    conditions where the model requires them."""
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


def apply_filters(cfg: Config, index: ClipIndex, data_dir, log=print) -> ClipIndex:
    """The clips that pass every train.filters entry (all of them without filters)."""
    if not cfg.train.filters:
        return index
    keep = np.ones(len(index), dtype=bool)
    counts = []
    for text in cfg.train.filters:
        column, op, value = parse_filter(text)
        values = index.column(column)
        passed = FILTER_TESTS[op](values, value) & ~np.isnan(values)  # a null value never passes
        keep &= passed
        counts.append(f"{text}: {int(passed.sum())}")
    if not keep.any():
        raise DataError(f"train.filters keep none of the {len(index)} clips of {data_dir} ({'; '.join(counts)})")
    log(f"[train] train.filters keep {int(keep.sum())} of the {len(index)} clips of {data_dir} ({'; '.join(counts)})")
    return index.subset(keep)


FILTER_TESTS = {
    ">=": np.greater_equal,
    "<=": np.less_equal,
    "==": np.equal,
    "!=": np.not_equal,
    ">": np.greater,
    "<": np.less,
}


def split_holdout(cfg: Config, index: ClipIndex, data_dir, log=print) -> tuple[ClipIndex, ClipIndex | None]:
    """(the clips to train on, the held-out clips or None): train.validation.holdout's directory, or
    holdout_fraction of the training clips taken out of them."""
    v = cfg.train.validation
    if v.holdout:
        held = ClipIndex.from_dir(v.holdout)
        log(f"[train] held-out loss on the {len(held)} clips of {v.holdout}")
        return index, held
    if not v.holdout_fraction:
        return index, None
    keep = held_out(index.ids(), v.holdout_fraction)
    if keep.all():
        raise DataError(f"{data_dir} holds {len(index)} clip(s): too few to keep some out of training")
    log(
        f"[train] held-out loss on {int(keep.sum())} of the {len(index)} clips of {data_dir} "
        f"(train.validation.holdout_fraction {v.holdout_fraction}), kept out of training"
    )
    return index.subset(~keep), index.subset(keep)


def room_for_both(cfg: Config) -> bool:
    """Whether the cluster can hold both experts' worker groups at once."""
    import ray

    total = ray.cluster_resources()
    need = {k: 2 * v * cfg.train.workers for k, v in worker_resources(cfg).items()}
    return all(total.get(k, 0) >= v for k, v in need.items())


def train_experts(cfg: Config, expert: str, data_dir, run_dir, log=print, validation=None) -> dict:
    """Train `high`, `low` or `both` on the connected Ray (at once when the cluster has room for both worker
    groups, else one after the other). `validation` (wanray.infer.validation.Validation, which the
    drivers make when train.validation.every is set) renders validation videos beside each expert's workers."""
    experts = selected(expert, models.expected_kind(cfg.model))
    if cfg.train.validation.renders and validation is None:
        raise ConfigError("train.validation has prompts: pass a Validation (pipelines/train.py makes one)")
    index = ClipIndex.from_dir(data_dir)  # read once, sent to every worker of both experts
    if warning := row_group_warning(data_dir, index.rows_per_row_group()):
        log(warning)
    index = apply_filters(cfg, index, data_dir, log)
    index, holdout = split_holdout(cfg, index, data_dir, log)
    validators = {e: validation.start(e, run_dir) for e in experts} if validation is not None else {}
    try:
        trainers = {e: make_trainer(cfg, e, data_dir, run_dir, index, validators.get(e), holdout) for e in experts}
        with Follow([storage.join(run_dir, e, CONSOLE_FILE) for e in experts], log):
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
        for e in list(validators):  # the last validation may still be rendering
            validation.finish(validators[e], log)
            del validators[e]  # finished and stopped; the finally stops the rest
    finally:
        for v in validators.values():
            validation.stop(v)
    return results


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
    future, so the run's error (Ray Train V2's fit() raises it) reaches the caller as itself. One expert's failure
    does not stop the other: both runs end on their own (each keeps its checkpoints and says why it stopped in its
    console.log), then the first error is raised. A Ctrl-C meanwhile interrupts the wait here and ends the
    driver; its exit ends the Ray Train controllers it owns, and with them the workers (Ray Train's own Ctrl-C
    handler is registered only when fit() runs in the main thread)."""
    results: dict = {}
    if len(trainers) == 2 and room_for_both(cfg):
        log("[train] training both experts at once")
        futures = {_in_thread(t.fit, f"fit-{e}"): e for e, t in trainers.items()}
        errors = []
        for future in as_completed(futures):
            if (error := future.exception()) is None:
                results[futures[future]] = future.result()
                continue
            errors.append(error)
            if len(errors) < len(futures):
                log(f"[train] the {futures[future]}-noise expert stopped on an error; waiting for the other to end")
        if errors:
            raise errors[0]
        return results
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
