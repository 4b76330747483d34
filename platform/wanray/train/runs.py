"""A training run directory: one <expert>/ per trained expert, each with its run record, config and
checkpoints (Ray Train's), as train.py --out writes it and export, validation and the UI read it. A run
directory may be an object-store URI (wanray.storage): Ray Train keeps the checkpoints there too."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import yaml

from wanray import storage
from wanray.config import Config
from wanray.errors import ConfigError
from wanray.sections import LoraConfig
from wanray.train.data import ClipIndex
from wanray.wan import EXPERTS, ModelKind, WanContract

RUN_FILE = "wanray_run.json"
"""Per expert: what it trains on (boundary and its source, timestep range, attention backend, clips)."""
CONFIG_FILE = "config.yaml"
"""Per expert: the resolved config of its run."""
STEP_FILE = "wanray_step.json"
"""In each checkpoint: the step it holds."""


def record_run(cfg: Config, expert: str, contract: WanContract, index: ClipIndex, attention: str, run_dir: str) -> None:
    """Write (or, on resume, check) what the expert trains on; a resumed run must keep its boundary."""
    record = {
        "expert": expert,
        "boundary": contract.boundary,
        "boundary_source": contract.boundary_source,
        "timestep_range": list(contract.timestep_range(expert)),
        "attention_backend": attention,
        "clips": len(index),
    }
    path = storage.join(run_dir, RUN_FILE)
    if storage.is_file(path):
        before = json.loads(storage.read_text(path))
        if before["boundary"] != contract.boundary:
            raise ConfigError(
                f"{run_dir} trained the {expert}-noise expert with boundary {before['boundary']}; "
                f"this run would use {contract.boundary}: use a new --out directory"
            )
    storage.make_dirs(run_dir)
    storage.write_json(record, path)
    storage.write_text(storage.join(run_dir, CONFIG_FILE), yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))


def trained_boundary(run_dir, experts) -> float | None:
    """The boundary the experts of a run were trained with (None for runs without a record)."""
    records = [storage.join(run_dir, e, RUN_FILE) for e in experts]
    found = {json.loads(storage.read_text(p))["boundary"] for p in records if storage.is_file(p)}
    if len(found) > 1:
        raise ConfigError(
            f"the experts in {run_dir} were trained with different boundaries {sorted(found)}; export them separately"
        )
    return found.pop() if found else None


def trained_lora(run_dir, expert: str, default: LoraConfig) -> LoraConfig:
    """The LoRA settings `expert` of run_dir trained with, from its config.yaml (`default` for a run without
    one): what its checkpoints hold, whatever the config of the command that reads them says."""
    path = storage.join(run_dir, expert, CONFIG_FILE)
    if not storage.is_file(path):
        return default
    return LoraConfig(**yaml.safe_load(storage.read_text(path))["train"]["lora"])


def trained_experts(run_dir) -> list[str]:
    """The experts a run directory (train.py --out) holds a training of, in EXPERTS order."""
    return [e for e in EXPERTS if storage.is_file(storage.join(run_dir, e, RUN_FILE))]


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


def checkpoints(run_dir, expert: str) -> dict[int, Path | str]:
    """Step -> checkpoint directory (a URI in an object store) of every checkpoint under run_dir/<expert>/."""
    root = storage.join(run_dir, expert)
    directories: list[Path] | list[str]
    if storage.is_uri(root):
        directories = storage.list_dirs(root)
    else:
        directories = [p.parent for p in Path(root).glob(f"*/{STEP_FILE}")]
    found: dict[int, Path | str] = {}
    for directory in directories:  # train.keep_checkpoints may delete one while it is read
        step_file = storage.join(directory, STEP_FILE)
        try:
            found[json.loads(storage.read_text(step_file))["step"]] = directory
        except FileNotFoundError:  # not a checkpoint, or one still being written
            continue
        except OSError:  # a store may fail a read that races the object's deletion (train.keep_checkpoints)
            if storage.is_file(step_file):
                raise
    return found


def latest_checkpoint(run_dir, expert: str) -> Path | str:
    """The checkpoint directory with the highest step under run_dir/<expert>/."""
    found = checkpoints(run_dir, expert)
    if not found:
        raise FileNotFoundError(f"no checkpoint of the {expert}-noise expert in {storage.join(run_dir, expert)}")
    return found[max(found)]


def best_checkpoint(run_dir, expert: str) -> tuple[Path | str, int, float]:
    """(checkpoint, step, held-out loss) of the expert's lowest held-out loss (its BEST_FILE, which training
    writes at each validation step with train.validation.holdout or holdout_fraction)."""
    from wanray.train.metrics import BEST_FILE

    path = storage.join(run_dir, expert, BEST_FILE)
    if not storage.is_file(path):
        raise FileNotFoundError(
            f"{path} does not exist: --best needs a run trained with a held-out loss (train.validation.holdout "
            "or holdout_fraction, and train.validation.every)"
        )
    best = json.loads(storage.read_text(path))
    checkpoint = checkpoints(run_dir, expert).get(best["step"])
    if checkpoint is None:
        raise FileNotFoundError(
            f"the {expert}-noise expert's best checkpoint (step {best['step']}, held-out loss {best['val_loss']:.4f}) "
            f"is no longer in {storage.join(run_dir, expert)}: train.keep_checkpoints kept only the latest ones"
        )
    return checkpoint, best["step"], best["val_loss"]
