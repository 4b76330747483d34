"""A training run directory: one <expert>/ per trained expert, each with its run record, config and
checkpoints (Ray Train's), as train.py --out writes it and export, validation and the UI read it."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import yaml

from wanray.config import Config
from wanray.errors import ConfigError
from wanray.io import write_json_atomic, write_text_atomic
from wanray.train.data import ClipIndex
from wanray.wan import EXPERTS, ModelKind, WanContract

RUN_FILE = "wanray_run.json"
"""Per expert: what it trains on (boundary and its source, timestep range, attention backend, clips)."""
CONFIG_FILE = "config.yaml"
"""Per expert: the resolved config of its run."""
STEP_FILE = "wanray_step.json"
"""In each checkpoint: the step it holds."""


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


def trained_boundary(run_dir, experts) -> float | None:
    """The boundary the experts of a run were trained with (None for runs without a record)."""
    found = {json.loads(p.read_text())["boundary"] for e in experts if (p := Path(run_dir, e, RUN_FILE)).exists()}
    if len(found) > 1:
        raise ConfigError(
            f"the experts in {run_dir} were trained with different boundaries {sorted(found)}; export them separately"
        )
    return found.pop() if found else None


def trained_experts(run_dir) -> list[str]:
    """The experts a run directory (train.py --out) holds a training of, in EXPERTS order."""
    return [e for e in EXPERTS if (Path(run_dir) / e / RUN_FILE).is_file()]


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


def checkpoints(run_dir, expert: str) -> dict[int, Path]:
    """Step -> checkpoint directory of every checkpoint under run_dir/<expert>/."""
    return {json.loads(p.read_text())["step"]: p.parent for p in Path(run_dir, expert).glob(f"*/{STEP_FILE}")}


def latest_checkpoint(run_dir, expert: str) -> Path:
    """The checkpoint directory with the highest step under run_dir/<expert>/."""
    found = checkpoints(run_dir, expert)
    if not found:
        raise FileNotFoundError(f"no checkpoint of the {expert}-noise expert in {Path(run_dir) / expert}")
    return found[max(found)]


def best_checkpoint(run_dir, expert: str) -> tuple[Path, int, float]:
    """(checkpoint, step, held-out loss) of the expert's lowest held-out loss (its BEST_FILE, which training
    writes at each validation step with train.validation.holdout or holdout_fraction)."""
    from wanray.train.metrics import BEST_FILE

    path = Path(run_dir, expert, BEST_FILE)
    if not path.exists():
        raise FileNotFoundError(
            f"{path} does not exist: --best needs a run trained with a held-out loss (train.validation.holdout "
            "or holdout_fraction, and train.validation.every)"
        )
    best = json.loads(path.read_text())
    checkpoint = checkpoints(run_dir, expert).get(best["step"])
    if checkpoint is None:
        raise FileNotFoundError(
            f"the {expert}-noise expert's best checkpoint (step {best['step']}, held-out loss {best['val_loss']:.4f}) "
            f"is no longer in {Path(run_dir, expert)}: train.keep_checkpoints kept only the latest ones"
        )
    return checkpoint, best["step"], best["val_loss"]
