"""DCP checkpoints of a sharded expert (wanray.train.export writes them back as a diffusers directory).

A checkpoint holds three Stateful objects under fixed keys:
  "model"  the expert's parameters (sharded DTensors; resharded on load to any world size)
  "optim"  AdamW state
  "train"  step, data position (epoch, global batches of it consumed), LR schedule, and the
           fingerprint of the clip index the order was drawn from
Noise, timesteps and caption dropout are drawn per global batch from generators seeded by
(seed, epoch, batch index), so the data position restores the random stream too.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import IO

import pyarrow.fs as pafs
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.filesystem import FileSystem
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.checkpoint.stateful import Stateful

from wanray import storage
from wanray.errors import DataError


@dataclass
class Progress:
    step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0
    """Global batches (all ranks together) of the current epoch consumed: the data position."""
    data_fingerprint: str = ""
    """ClipIndex.fingerprint() of the data the run reads."""


class ModelState(Stateful):
    """The expert's trained tensors. With LoRA, only the adapters: the frozen base is the model
    directory's, loaded from there on resume (a 14B base in every checkpoint would be 57 GB each)."""

    def __init__(self, model, adapters_only: bool = False):
        self.model = model
        self.options = StateDictOptions(ignore_frozen_params=True, strict=False) if adapters_only else None

    def state_dict(self):
        return get_model_state_dict(self.model, options=self.options)

    def load_state_dict(self, state):
        set_model_state_dict(self.model, state, options=self.options)


class OptimizerState(Stateful):
    def __init__(self, model, optimizer):
        self.model, self.optimizer = model, optimizer

    def state_dict(self):
        return get_optimizer_state_dict(self.model, self.optimizer)

    def load_state_dict(self, state):
        set_optimizer_state_dict(self.model, self.optimizer, state)


class TrainState(Stateful):
    def __init__(self, progress: Progress, lr_scheduler):
        self.progress, self.lr_scheduler = progress, lr_scheduler

    def state_dict(self):
        return {**asdict(self.progress), "lr_scheduler": self.lr_scheduler.state_dict()}

    def load_state_dict(self, state):
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        for k in ("step", "epoch", "batches_in_epoch"):
            setattr(self.progress, k, int(state[k]))
        self.progress.data_fingerprint = str(state["data_fingerprint"])


def app_state(model, optimizer, lr_scheduler, progress: Progress, lora: bool = False) -> dict:
    return {
        "model": ModelState(model, adapters_only=lora),
        "optim": OptimizerState(model, optimizer),
        "train": TrainState(progress, lr_scheduler),
    }


def save(state: dict, directory) -> None:
    """Collective: every rank writes its shards (__<rank>_*.distcp) and rank 0 the metadata."""
    dcp.save(state, checkpoint_id=str(directory))


def load(state: dict, directory) -> None:
    """Collective; works whatever the world size the checkpoint was written with."""
    dcp.load(state, checkpoint_id=str(directory))


class _StoreFiles(FileSystem):
    """DCP's file operations on a pyarrow filesystem (an object store), for reading: a checkpoint's files opened
    for random access, its .metadata read whole (pickle reads it in many small pieces)."""

    def __init__(self, fs: pafs.FileSystem):
        self.fs = fs
        self.metadata: dict[str, bytes] = {}

    @contextlib.contextmanager
    def create_stream(self, path, mode: str) -> Iterator[io.IOBase]:
        if mode != "rb":
            raise io.UnsupportedOperation(f"a checkpoint in an object store is read here, not written ({mode})")
        if str(path).endswith(".metadata"):  # read whole once: one reader loads a checkpoint block by block
            if str(path) not in self.metadata:
                with self.fs.open_input_stream(str(path)) as f:
                    self.metadata[str(path)] = f.read()
            yield io.BytesIO(self.metadata[str(path)])
            return
        with self.fs.open_input_file(str(path)) as f:
            yield f

    def concat_path(self, path, suffix: str) -> str:
        return f"{path}/{suffix}"

    def init_path(self, path) -> str:
        return str(path)

    def exists(self, path) -> bool:
        return self.fs.get_file_info(str(path)).type != pafs.FileType.NotFound

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id) -> bool:
        return False  # never picked by DCP on its own: only through reader()

    def rename(self, path, new_path) -> None:
        raise io.UnsupportedOperation("rename")

    def mkdir(self, path) -> None:
        raise io.UnsupportedOperation("mkdir")

    def rm_file(self, path) -> None:
        raise io.UnsupportedOperation("rm_file")


class _StoreReader(dcp.FileSystemReader):
    """DCP's FileSystemReader on a checkpoint in an object store: one ranged read per tensor it loads, so export
    and validation fetch the model's tensors, not the optimizer state stored beside them (2x as large)."""

    def __init__(self, uri: str):
        super().__init__(uri)
        fs, self.path = storage.filesystem(uri)
        self.fs = _StoreFiles(fs)

    def reset(self, checkpoint_id=None) -> None:
        super().reset()
        if checkpoint_id:
            self.path = storage.filesystem(checkpoint_id)[1]

    def _slice_file(self, file, sinfo) -> IO[bytes]:
        return io.BytesIO(file.read_at(sinfo.length, sinfo.offset))


def reader(directory) -> dcp.FileSystemReader:
    """DCP's reader of a checkpoint directory, local or in an object store (wanray.storage)."""
    if storage.is_uri(directory):
        return _StoreReader(str(directory))
    return dcp.FileSystemReader(storage.filesystem(directory)[1])  # a file:// path too


def check_resumable(directory) -> None:
    """A DataError for a checkpoint this wanray cannot resume from (one written before the seeded data order)."""
    keys = reader(directory).read_metadata().state_dict_metadata
    if not all(f"train.{k}" in keys for k in ("batches_in_epoch", "data_fingerprint")):
        raise DataError(
            f"{directory} was written by an earlier wanray (no data position of the seeded order): "
            "it cannot be resumed; train into a new --out directory"
        )


def load_model_weights(model, directory) -> None:
    """Only the "model" entries of a DCP directory (a training checkpoint or an --to-dcp copy)."""
    state = {"model": get_model_state_dict(model)}
    dcp.load(state, storage_reader=reader(directory))
    set_model_state_dict(model, state["model"])


# ---- single-process tools: export and conversion (no process group needed) ----
