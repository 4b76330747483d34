"""Training batches from the preprocessed Parquet, in one seeded global order that resume replays.

    driver:  ClipIndex.from_dir(prep/)   one entry per clip: shard, row group, row, latent shape
    epoch e: permutation(seed, e) of all clips -> same-shape batches of batch_size, in seeded
             random order (the epoch's global batch list) -> cut to a multiple of G = workers x grad_accum
    step:    the next G global batches of the epoch; micro-batch m of rank r is batch
             start + m * workers + r
    worker:  ClipLoader reads its own clips (one Parquet row group per clip) in a background
             thread, a step ahead, and keeps decoded clips in memory while they fit in cache_bytes

The order depends on (seed, epoch) only and the data position is one number per epoch (global
batches consumed), so a resumed run reads exactly the clips the uninterrupted run would have,
also on another worker count with the same G. Clips of different latent shapes cannot be
stacked, so a batch holds one shape; a shape's last, unfilled batch of an epoch goes out smaller.
"""

from __future__ import annotations

import hashlib
import queue
import threading
from collections import Counter, OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import pyarrow.parquet as pq
import torch

from wanray import storage
from wanray.data.shards import shard_paths
from wanray.errors import DataError
from wanray.schema import TRAINING_READS, VERSION_KEY, check_version, decode_tensor, pad_text_embedding
from wanray.wan import latent_tokens

CONDITION_COLUMNS = ["condition", "condition_shape", "condition_dtype"]
TENSOR_COLUMNS = [
    "id",
    "latent",
    "latent_shape",
    "latent_dtype",
    "text_embedding",
    "text_embedding_shape",
    "text_embedding_dtype",
]


@dataclass
class ClipIndex:
    """Where every clip of a preprocess output directory lives, in a fixed order (shards by name)."""

    files: list[str]
    file: np.ndarray
    """(N,) index into files."""
    row_group: np.ndarray
    row: np.ndarray
    """(N,) row within its row group."""
    shape: np.ndarray
    """(N,) id of the clip's latent shape: clips of one id can be stacked."""
    shapes: list[tuple[int, ...]] = field(default_factory=list)
    """Latent shape (C, F, H, W) of each shape id: a bucket of the preprocessed data."""
    conditioned: bool = False
    """Every clip has an image-to-video first-frame condition (preprocessed with an I2V model)."""

    def __len__(self) -> int:
        return len(self.file)

    @classmethod
    def from_dir(cls, data_dir) -> ClipIndex:
        """Reads the shards' footers and latent_shape columns only; checks their schema version."""
        paths = shard_paths(data_dir)
        if not paths:
            raise FileNotFoundError(f"no preprocessed clips (part-*.parquet) in {data_dir}")
        files, rows, conditioned = list(paths), [], True
        shapes: dict[tuple[int, ...], int] = {}
        for f, path in enumerate(paths):
            pf = storage.parquet_file(path)
            check_version(pf.schema_arrow, str(path), TRAINING_READS)
            column = iter(pf.read(columns=["latent_shape"]).column("latent_shape").to_pylist())
            conditioned = (
                conditioned
                and "condition_shape" in pf.schema_arrow.names
                and pf.read(columns=["condition_shape"]).column("condition_shape").null_count == 0
            )
            for g in range(pf.num_row_groups):
                for r in range(pf.metadata.row_group(g).num_rows):
                    rows.append((f, g, r, shapes.setdefault(tuple(next(column)), len(shapes))))
        table = np.array(rows, dtype=np.int64).reshape(-1, 4)
        file, row_group, row, shape = (table[:, i].copy() for i in range(4))
        return cls(files, file, row_group, row, shape, shapes=list(shapes), conditioned=conditioned)

    def tokens(self, shape_id: int) -> int:
        """DiT tokens of one clip of that shape (wanray.wan.latent_tokens)."""
        return latent_tokens(self.shapes[shape_id])

    def fingerprint(self) -> str:
        """Changes when shards are added, removed or rewritten (not when the directory moves)."""
        h = hashlib.sha1("\n".join(storage.name(f) for f in self.files).encode())
        h.update(np.stack([self.file, self.row_group, self.row, self.shape]).tobytes())
        return h.hexdigest()[:16]

    def ids(self) -> list[str]:
        """Every clip's id, in index order (reads the shards' id columns)."""
        rows: dict[tuple[int, int], list[str]] = {}
        for f, path in enumerate(self.files):
            pf = storage.parquet_file(path)
            for g in range(pf.num_row_groups):
                rows[(f, g)] = pf.read_row_group(g, columns=["id"]).column("id").to_pylist()
        return [rows[(f, g)][r] for f, g, r in zip(self.file.tolist(), self.row_group.tolist(), self.row.tolist())]

    def column(self, name: str) -> np.ndarray:
        """(N,) float64: every clip's value of a numeric column, in index order; NaN where it is null. A shard
        without the column (written before it existed) is a DataError."""
        values: dict[tuple[int, int], np.ndarray] = {}
        for f, path in enumerate(self.files):
            pf = storage.parquet_file(path)
            if name not in pf.schema_arrow.names:
                raise DataError(
                    f"{path} has no {name!r} column (schema version "
                    f"{(pf.schema_arrow.metadata or {}).get(VERSION_KEY, b'?').decode()}): preprocess the videos "
                    "again into a new directory to filter on it"
                )
            for g in range(pf.num_row_groups):
                column = pf.read_row_group(g, columns=[name]).column(name)
                values[(f, g)] = column.cast("float64").to_numpy(zero_copy_only=False)
        return np.array(
            [values[(f, g)][r] for f, g, r in zip(self.file.tolist(), self.row_group.tolist(), self.row.tolist())],
            dtype=np.float64,
        )

    def subset(self, keep: np.ndarray) -> ClipIndex:
        """The clips where `keep` (N,) is true, in the same order; same files and shape ids."""
        return ClipIndex(
            self.files,
            self.file[keep],
            self.row_group[keep],
            self.row[keep],
            self.shape[keep],
            shapes=self.shapes,
            conditioned=self.conditioned,
        )

    def rows_per_row_group(self) -> int:
        """Most clips in one Parquet row group: 1 for shards written by this wanray."""
        _, counts = np.unique(np.stack([self.file, self.row_group]), axis=1, return_counts=True)
        return int(counts.max())


@dataclass(frozen=True)
class EpochBatches:
    """One epoch's global batch list: batch i is clips[starts[i]:ends[i]]."""

    clips: np.ndarray
    starts: np.ndarray
    ends: np.ndarray

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.clips[self.starts[i] : self.ends[i]]


def epoch_batches(index: ClipIndex, epoch: int, seed: int, batch_size: int | np.ndarray) -> EpochBatches:
    """Clips in seeded random order, cut into same-shape batches of batch_size (one number, or one per
    shape id; a shape's last batch may be smaller), the batches themselves in seeded random order:
    which batches an epoch leaves out (see DataPlan) changes from epoch to epoch, whatever their shape."""
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(index))
    order = order[np.argsort(index.shape[order], kind="stable")]  # grouped by shape, shuffled within
    shape = index.shape[order]
    size = batch_size if np.isscalar(batch_size) else np.asarray(batch_size)[shape]
    new_shape = np.r_[True, shape[1:] != shape[:-1]]
    first_of_shape = np.flatnonzero(new_shape)[np.cumsum(new_shape) - 1]
    new_batch = new_shape | ((np.arange(len(order)) - first_of_shape) % size == 0)
    starts = np.flatnonzero(new_batch)
    ends = np.r_[starts[1:], len(order)]
    shuffled = rng.permutation(len(starts))
    return EpochBatches(order, starts[shuffled], ends[shuffled])


@dataclass(frozen=True)
class StepPlan:
    """The global batches one rank trains on in one step."""

    epoch: int
    start: int
    """Global batches of the epoch consumed before this step."""
    batches: list[tuple[int, np.ndarray]]
    """(global batch index, clip positions) per micro-batch of this rank."""
    samples: int
    """Clips in the step's global batches (all ranks): the loss is their mean."""
    shapes: dict[int, int]
    """Shape id -> clips of it in the step's global batches (the bucket mix)."""


class DataPlan:
    """The global batch order of a run: what each rank trains on at each data position.

    An epoch's batches are cut to a multiple of G = workers x grad_accum so that every step takes
    G of them; the few left out are others each epoch. With `scale_by_tokens`, a shape's batches hold
    batch_size x (tokens of the largest shape / its tokens) clips, so every batch costs about the same."""

    def __init__(
        self, index: ClipIndex, batch_size: int, seed: int, world: int, grad_accum: int, scale_by_tokens: bool = False
    ):
        self.index, self.batch_size, self.seed = index, batch_size, seed
        self.world, self.grad_accum, self.scale_by_tokens = world, grad_accum, scale_by_tokens
        self.per_step = world * grad_accum  # G: global batches per optimizer step
        if scale_by_tokens:
            tokens = np.array([index.tokens(i) for i in range(len(index.shapes))])
            self.sizes = np.maximum(1, batch_size * tokens.max() // tokens)
        else:
            self.sizes = np.full(max(1, len(index.shapes)), batch_size)

    def fingerprint(self) -> str:
        """Changes with anything that changes which clips a data position means."""
        scaled = "-t" if self.scale_by_tokens else ""
        return f"{self.index.fingerprint()}-s{self.seed}-b{self.batch_size}{scaled}-g{self.per_step}"

    def steps(self, epoch: int, start: int, rank: int) -> Iterator[StepPlan]:
        """Rank `rank`'s steps from data position (epoch, start) on, forever (epoch after epoch)."""
        while True:
            batches = epoch_batches(
                self.index, epoch, self.seed, self.sizes if self.scale_by_tokens else self.batch_size
            )
            usable = len(batches) - len(batches) % self.per_step
            if usable == 0:
                raise RuntimeError(
                    f"an epoch holds {len(batches)} batches of train.batch_size={self.batch_size}, "
                    f"but one step takes {self.per_step} (train.workers x train.grad_accum): "
                    f"too few clips ({len(self.index)})"
                )
            while start + self.per_step <= usable:
                picks = [start + m * self.world + rank for m in range(self.grad_accum)]
                shapes: Counter[int] = Counter()
                for i in range(start, start + self.per_step):
                    shapes[int(self.index.shape[batches[i][0]])] += len(batches[i])
                yield StepPlan(epoch, start, [(i, batches[i]) for i in picks], sum(shapes.values()), dict(shapes))
                start += self.per_step
            epoch, start = epoch + 1, 0


@dataclass
class Batch:
    latents: torch.Tensor
    """(B, 16, F, H, W) normalised VAE latents, stored dtype."""
    text: torch.Tensor
    """(B, 512, text_dim) text embeddings zero-padded as WanPipeline pads them."""
    ids: list[str] = field(default_factory=list)
    epoch: int = 0
    index: int = 0
    """Global batch index within the epoch (seeds the batch's noise)."""
    condition: torch.Tensor | None = None
    """(B, 16, F, H, W) image-to-video first-frame condition latents, stored dtype (None for T2V)."""

    @property
    def tokens(self) -> int:
        """DiT tokens in the batch: B x those of one clip; 32,760 per 81x480x832 clip."""
        return self.latents.shape[0] * latent_tokens(self.latents.shape)


Clip = tuple[str, torch.Tensor, torch.Tensor, torch.Tensor | None]  # (id, latent, unpadded text, I2V condition)


class ClipReader:
    """Reads clips by index position from the shards; keeps decoded clips while they fit in cache_bytes."""

    OPEN_FILES = 128

    def __init__(self, index: ClipIndex, cache_bytes: int):
        self.index, self.cache_bytes = index, cache_bytes
        self.handles: OrderedDict[int, pq.ParquetFile] = OrderedDict()
        self.cache: dict[int, Clip] = {}
        self.cached = 0

    def _file(self, f: int) -> pq.ParquetFile:
        if f in self.handles:
            self.handles.move_to_end(f)
        else:
            self.handles[f] = storage.parquet_file(self.index.files[f])
            if len(self.handles) > self.OPEN_FILES:
                self.handles.popitem(last=False)
        return self.handles[f]

    def read(self, clip: int) -> Clip:
        if clip in self.cache:
            return self.cache[clip]
        ix = self.index
        columns = TENSOR_COLUMNS + (CONDITION_COLUMNS if ix.conditioned else [])
        table = self._file(int(ix.file[clip])).read_row_group(int(ix.row_group[clip]), columns=columns)
        row = table.slice(int(ix.row[clip]), 1).to_pylist()[0]
        out = (
            row["id"],
            decode_tensor(row["latent"], row["latent_shape"], row["latent_dtype"]),
            decode_tensor(row["text_embedding"], row["text_embedding_shape"], row["text_embedding_dtype"]),
            decode_tensor(row["condition"], row["condition_shape"], row["condition_dtype"]) if ix.conditioned else None,
        )
        size = out[1].nbytes + out[2].nbytes + (out[3].nbytes if out[3] is not None else 0)
        if self.cached + size <= self.cache_bytes:
            self.cache[clip], self.cached = out, self.cached + size
        return out

    def batch(self, clips: np.ndarray, epoch: int, index: int, text_tokens: int) -> Batch:
        read = [self.read(int(c)) for c in clips]
        return Batch(
            torch.stack([c[1] for c in read]),
            torch.stack([pad_text_embedding(c[2], text_tokens) for c in read]),
            [c[0] for c in read],
            epoch,
            index,
            torch.stack([c[3] for c in read if c[3] is not None]) if self.index.conditioned else None,
        )


@dataclass
class StepData:
    epoch: int
    start: int
    batches: list[Batch]
    samples: int = 0
    """Clips in the step's global batches, all ranks together (StepPlan.samples)."""
    shapes: dict[int, int] = field(default_factory=dict)
    """StepPlan.shapes."""


class ClipLoader:
    """A rank's steps, read one step ahead in a background thread (pyarrow and decoding release the GIL)."""

    def __init__(
        self, plan: DataPlan, reader: ClipReader, epoch: int, start: int, rank: int, text_tokens: int, depth: int = 2
    ):
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.stop = threading.Event()
        steps = plan.steps(epoch, start, rank)

        def put(item) -> bool:
            """Wait for room, unless the loader is closed; False when it is."""
            while not self.stop.is_set():
                try:
                    self.queue.put(item, timeout=0.5)
                    return True
                except queue.Full:
                    continue
            return False

        def produce():
            try:
                for step in steps:
                    batches = [reader.batch(clips, step.epoch, i, text_tokens) for i, clips in step.batches]
                    if not put(StepData(step.epoch, step.start, batches, step.samples, step.shapes)):
                        return
            except BaseException as e:  # handed to the training thread, raised there
                put(e)

        self.thread = threading.Thread(target=produce, name="wanray-clip-loader", daemon=True)
        self.thread.start()

    def next(self) -> StepData:
        item = self.queue.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        self.stop.set()


def held_out(ids: list[str], fraction: float) -> np.ndarray:
    """(N,) bool: the clips kept out of training, by a hash of each id (the same clips whatever the shards' order
    or the run's seed), about `fraction` of them and at least one."""
    scores = np.array([int.from_bytes(hashlib.sha1(i.encode()).digest()[:8], "big") / 2**64 for i in ids])
    keep = scores < fraction
    if not keep.any() and len(ids):
        keep[np.argmin(scores)] = True
    return keep


def holdout_batches(index: ClipIndex, batch_size: int) -> list[np.ndarray]:
    """The held-out clips in fixed batches (index positions) of one latent shape each, shape by shape."""
    out = []
    for shape in range(len(index.shapes)):
        clips = np.flatnonzero(index.shape == shape)
        out += [clips[i : i + batch_size] for i in range(0, len(clips), batch_size)]
    return out
