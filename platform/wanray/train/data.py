"""Training batches from the preprocessed Parquet: stored dtype honoured, text padded to 512.

The driver hands Ray Train a Ray Data dataset over the clip shards; each worker iterates
its shard, decodes the tensor columns in their stored dtype, and groups clips of one
latent shape into batches (clips of different lengths cannot be stacked). A shard small
enough (train.cache_bytes) is kept decoded in memory after its first full epoch, and
later epochs reshuffle it instead of reading the Parquet again.
"""
from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass
from typing import Iterable, Iterator

import torch

from wanray.data.shards import shard_paths
from wanray.schema import decode_tensor, pad_text_embedding


@dataclass
class Batch:
    latents: torch.Tensor
    """(B, 16, F, H, W) normalised VAE latents, stored dtype."""
    text: torch.Tensor
    """(B, max_tokens, text_dim) text embeddings zero-padded as WanPipeline pads them."""

    @property
    def tokens(self) -> int:
        """DiT tokens in the batch: B x F x H/2 x W/2 (patch 1x2x2); 32,760 per 81x480x832 clip."""
        b, _, f, h, w = self.latents.shape
        return b * f * (h // 2) * (w // 2)


def read_clip_dataset(data_dir):
    """A Ray Data dataset over the clip shards of a preprocess output directory."""
    import ray

    ray.data.DataContext.get_current().enable_progress_bars = False  # workers log their own progress
    paths = shard_paths(data_dir)
    if not paths:
        raise FileNotFoundError(f"no preprocessed clips (part-*.parquet) in {data_dir}")
    return ray.data.read_parquet([str(p) for p in paths], columns=[
        "id", "latent", "latent_shape", "latent_dtype", "text_embedding", "text_embedding_shape",
        "text_embedding_dtype"])


Clip = tuple[torch.Tensor, torch.Tensor]  # (latent, unpadded text embedding)


def _decode_rows(shard) -> Iterator[Clip]:
    for b in shard.iter_batches(batch_size=64, batch_format="numpy", prefetch_batches=2):
        for i in range(len(b["latent"])):
            yield (decode_tensor(b["latent"][i], b["latent_shape"][i], b["latent_dtype"][i]),
                   decode_tensor(b["text_embedding"][i], b["text_embedding_shape"][i], b["text_embedding_dtype"][i]))


def bucket_batches(clips: Iterable[Clip], batch_size: int, max_tokens: int) -> Iterator[Batch]:
    """Same-shape batches; clips whose shape has not filled a batch at the end go out as a smaller one."""
    buckets: dict[tuple, list[Clip]] = defaultdict(list)

    def emit(bucket):
        return Batch(torch.stack([c[0] for c in bucket]),
                     torch.stack([pad_text_embedding(c[1], max_tokens) for c in bucket]))

    for clip in clips:
        bucket = buckets[tuple(clip[0].shape)]
        bucket.append(clip)
        if len(bucket) == batch_size:
            yield emit(bucket)
            bucket.clear()
    for bucket in buckets.values():
        if bucket:
            yield emit(bucket)


class EpochSource:
    """A worker's clips, one epoch at a time, streamed from its dataset shard or from memory."""

    def __init__(self, shard, batch_size: int, max_tokens: int, cache_bytes: int, seed: int):
        self.shard, self.batch_size, self.max_tokens = shard, batch_size, max_tokens
        self.cache_bytes, self.seed = cache_bytes, seed
        self.cache: list[Clip] | None = None

    def epoch(self, index: int, skip: int = 0) -> Iterator[Batch]:
        if self.cache is not None:
            clips = list(self.cache)
            random.Random(self.seed * 7919 + index).shuffle(clips)
            return bucket_batches(clips[skip:], self.batch_size, self.max_tokens)
        return bucket_batches(self._stream(skip), self.batch_size, self.max_tokens)

    def _stream(self, skip: int) -> Iterator[Clip]:
        kept, size = ([] if skip == 0 and self.cache_bytes > 0 else None), 0
        for n, clip in enumerate(_decode_rows(self.shard)):
            if kept is not None:
                size += sum(t.numel() * t.element_size() for t in clip)
                kept = kept if size <= self.cache_bytes else None
                if kept is not None:
                    kept.append(clip)
            if n >= skip:
                yield clip
        if kept is not None:  # a whole epoch fitted: later epochs come from memory
            self.cache = kept
