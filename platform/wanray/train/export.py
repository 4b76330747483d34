"""A run's trained experts back to a diffusers-format directory, and a directory's expert to DCP.

DCP checkpoint (sharded) ─► expert_state_groups: one group of tensors at a time (full fine-tune: the
trained tensors; LoRA: the frozen base from safetensors merged with the adapters) ─► WeightShards of
the copied model directory (the other parts hard-linked or copied), atomically; LoRA also writes the
adapter files diffusers' load_lora_weights reads.
"""

from __future__ import annotations

import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp

from wanray import model_files, models, storage
from wanray.config import Config
from wanray.io import atomic_path
from wanray.train.checkpoint import reader
from wanray.train.runs import best_checkpoint, latest_checkpoint, trained_boundary, trained_lora


def adapter_key(peft_key: str) -> str:
    """A peft parameter name as diffusers writes adapters: "m.lora_A.default.weight" -> "m.lora_A.weight"."""
    module, rest = peft_key.split(".lora_", 1)  # "blocks.0.attn1.to_q", "A.default.weight"
    return f"{module}.lora_{rest.split('.')[0]}.weight"


def merge_lora(state: dict, scale: float) -> tuple[dict, dict]:
    """(plain diffusers state dict with W + scale * B @ A folded in, adapter tensors by module)."""
    merged, adapter = {}, {}
    for key, value in state.items():
        if ".lora_" in key:
            adapter[adapter_key(key)] = value
        else:
            merged[key.replace(".base_layer.", ".")] = value
    for key in [k for k in adapter if k.endswith(".lora_A.weight")]:
        module = key[: -len(".lora_A.weight")]
        w = merged[f"{module}.weight"]
        delta = adapter[f"{module}.lora_B.weight"].float() @ adapter[key].float()
        merged[f"{module}.weight"] = (w.float() + scale * delta).to(w.dtype)
    return merged, adapter


def _load_checkpoint(tensors: dict, source: dcp.FileSystemReader) -> None:
    """Fill `tensors` (name -> empty tensor) from the model state of a DCP checkpoint (its reader), reading just
    those."""
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        dcp.load({"model": tensors}, storage_reader=source, no_dist=True)


def checkpoint_adapter(model_path, expert: str, checkpoint_dir, lora) -> dict[str, torch.Tensor]:
    """A LoRA run's adapter tensors at a checkpoint, by diffusers adapter name ("blocks.0.attn1.to_q.lora_A.weight";
    scale alpha / rank), read from the checkpoint alone: megabytes, where the expert is gigabytes."""
    from wanray.train.parallel import build_on_meta

    model = build_on_meta(model_path, expert, lora)
    trained = {n: torch.empty(t.shape, dtype=t.dtype) for n, t in model.state_dict().items() if ".lora_" in n}
    _load_checkpoint(trained, reader(checkpoint_dir))
    return {adapter_key(k): v for k, v in trained.items()}


def expert_state_groups(model_path, expert: str, checkpoint_dir, lora=None) -> Iterator[tuple[dict, dict]]:
    """The trained expert from a DCP checkpoint as diffusers tensors, one transformer block (then the
    layers outside the blocks) at a time: (weights with any LoRA delta folded in, that group's adapter
    tensors). Only one group is in memory: 351M parameters, 1.4 GB in fp32, for a 14B expert. A LoRA
    checkpoint holds the adapters only: the frozen base comes from model_path."""
    from wanray.train.parallel import build_on_meta, checkpoint_name

    model = build_on_meta(model_path, expert, lora)
    groups: dict[str, list[tuple[str, torch.Tensor]]] = {}
    for name, tensor in model.state_dict().items():
        parts = name.split(".")
        groups.setdefault(".".join(parts[:2]) if parts[0] == "blocks" else "rest", []).append((name, tensor))
    scale = lora.alpha / lora.rank if lora is not None and lora.enabled else None
    source = reader(checkpoint_dir)
    with models.ExpertWeights(model_path, expert) as base:
        for members in groups.values():
            trained = {n: torch.empty(t.shape, dtype=t.dtype) for n, t in members if scale is None or ".lora_" in n}
            if trained:
                _load_checkpoint(trained, source)
            if scale is None:
                yield trained, {}
                continue
            frozen = {n: base.get(name).to(t.dtype) for n, t in members if (name := checkpoint_name(n)) is not None}
            yield merge_lora({**frozen, **trained}, scale)


def export_diffusers(
    model_path,
    out_dir,
    experts: dict[str, Path | str],
    boundary: float | None,
    loras: dict | None = None,
    max_shard_bytes: int = 5 * 10**9,
) -> Path | str:
    """Copy the base directory to out_dir with each trained expert's weights in place.

    The weights stream from the checkpoint one transformer block at a time into safetensors shards
    of at most `max_shard_bytes` (with diffusers' index when there are several), so host memory
    holds one shard and one block, not the 57 GB fp32 expert.

    experts maps "high" / "low" to a DCP checkpoint directory (local, or a URI read in place: the model's tensors
    only); `boundary` (the one they were trained with; None for a one-transformer model) goes into
    model_index.json. The result is loadable by
    `WanPipeline.from_pretrained(out_dir)`. `out_dir` may be an object-store URI (wanray.storage): the export
    is written to a local temporary directory first (room for it in TMPDIR), then uploaded. LoRA runs also
    get `<subfolder>/lora/` with the adapter written by diffusers' own `save_lora_weights`, its rank and alpha
    in the file's metadata, so `load_lora_weights` (with `load_into_transformer_2=True` for the low-noise
    expert) applies it at alpha / rank. `loras`: each expert's LoraConfig as its run trained it (none: full
    fine-tuning).
    """
    from diffusers import WanPipeline

    storage.check_replaceable(out_dir, "model_index.json", "export", keep=(model_path,))
    if storage.is_uri(out_dir):  # staged in a local temporary directory, then uploaded with model_index.json last
        with tempfile.TemporaryDirectory(prefix="wanray-export-") as tmp:
            local = export_diffusers(model_path, Path(tmp) / "model", experts, boundary, loras, max_shard_bytes)
            storage.upload_dir(local, str(out_dir), last="model_index.json")
        return str(out_dir)
    src, out = models.check_model_dir(model_path), Path(out_dir)
    with atomic_path(out, replace_dir=True) as tmp:
        models.copy_model_dir(src, tmp, without_weights_of=list(experts))
        if boundary is not None:
            models.write_boundary(tmp, boundary)
        for expert, ckpt in experts.items():
            lora = (loras or {}).get(expert)
            shards, adapter = models.WeightShards(tmp, expert, max_shard_bytes), {}
            for weights, group_adapter in expert_state_groups(src, expert, ckpt, lora):
                shards.add(weights)
                adapter.update(group_adapter)
            folder = shards.close()
            if adapter:
                assert lora is not None  # an adapter comes from a LoRA run's checkpoint
                WanPipeline.save_lora_weights(
                    folder / "lora",
                    transformer_lora_layers={k: v.contiguous() for k, v in adapter.items()},
                    transformer_lora_adapter_metadata={
                        "r": lora.rank,
                        "lora_alpha": lora.alpha,
                        "target_modules": list(lora.target_modules),
                    },
                )
    return out


def diffusers_to_dcp(model_path, expert: str, out_dir) -> Path:
    """Write an expert's weights (float32) as a DCP directory, for sharded loading (train.init_dcp),
    tensor by tensor: DCP plans the checkpoint from the expert's shapes on the meta device, then asks
    for each tensor as it writes it (`_LazySavePlanner`), one file per tensor (FileSystemWriter
    keeps every tensor of a file until the file is done). Host memory holds one tensor at a time
    (the largest of a 14B expert: 283 MB), not the 57 GB expert."""
    from torch.distributed.checkpoint import FileSystemWriter

    from wanray.train.parallel import build_on_meta

    storage.check_replaceable(out_dir, ".metadata", "DCP checkpoint", keep=(model_path,))
    shapes = build_on_meta(model_path, expert).state_dict()
    out = Path(out_dir)
    with models.ExpertWeights(model_path, expert) as weights, atomic_path(out, replace_dir=True) as tmp:

        def read(fqn: str) -> torch.Tensor:
            name = fqn[len("model.") :]
            return weights.get(name).to(shapes[name].dtype)

        dcp.save(
            {"model": shapes},
            storage_writer=FileSystemWriter(str(tmp), single_file_per_rank=False, thread_count=1),
            planner=_LazySavePlanner(read),
            no_dist=True,
        )
    return out


class _LazySavePlanner(dcp.DefaultSavePlanner):
    """Plans from the state dict's (meta) tensors, and reads each tensor only when DCP writes it."""

    def __init__(self, read):
        super().__init__()
        self._read = read

    def resolve_data(self, write_item):
        from torch.distributed.checkpoint.planner import WriteItemType

        if write_item.type == WriteItemType.BYTE_IO:
            return super().resolve_data(write_item)
        return self._read(write_item.index.fqn)


def export_run(cfg: Config, run_dir, out_dir, log=print, best: bool = False) -> Path | str:
    """The latest checkpoint of each expert trained in run_dir (best: the one of its lowest held-out loss), in a
    copy of model.path (see export_diffusers), with the boundary they trained with in its model_index.json."""
    storage.check_replaceable(out_dir, "model_index.json", "export", keep=(run_dir,))  # before any loading
    model_path = model_files.ensure_model(cfg.model)
    contract = models.read_contract(model_path, cfg.model)
    experts = [e for e in contract.kind.experts if storage.is_dir(storage.join(run_dir, e))]
    if not experts:
        raise FileNotFoundError(f"no trained {'/ or '.join(contract.kind.experts)}/ in {run_dir}")
    trained = {}
    for e in experts:
        if best:
            trained[e], step, loss = best_checkpoint(run_dir, e)
            log(f"[export] {e}-noise expert: step {step} has the lowest held-out loss, {loss:.4f}")
        else:
            trained[e] = latest_checkpoint(run_dir, e)
    boundary = None
    if not contract.kind.one_transformer:
        boundary = trained_boundary(run_dir, trained)
        boundary = contract.boundary if boundary is None else boundary
    loras = {e: trained_lora(run_dir, e, cfg.train.lora) for e in trained}  # the run's, not this command's
    for e, checkpoint in trained.items():
        how = f", LoRA rank {loras[e].rank} alpha {loras[e].alpha:g}" if loras[e].enabled else ""
        log(f"[export] {e}-noise expert from {checkpoint}{how}")
    out = export_diffusers(model_path, out_dir, trained, boundary, loras)
    log(
        f"[export] wrote {out} ({'' if boundary is None else f'boundary {boundary}; '}load with "
        f"{contract.kind.pipeline}.from_pretrained)"
    )
    return out
