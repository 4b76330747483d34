"""Training batches from the preprocessed Parquet: stored dtype honoured, text padded to 512.

The driver hands Ray Train a Ray Data dataset over the clip shards; each worker iterates
its shard, decodes the tensor columns in their stored dtype, and groups clips of one
latent shape into batches (clips of different lengths cannot be stacked).
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Iterator

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

    paths = shard_paths(data_dir)
    if not paths:
        raise FileNotFoundError(f"no preprocessed clips (part-*.parquet) in {data_dir}")
    return ray.data.read_parquet([str(p) for p in paths], columns=[
        "id", "latent", "latent_shape", "latent_dtype", "text_embedding", "text_embedding_shape",
        "text_embedding_dtype"])


def _rows(batch: dict) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for i in range(len(batch["latent"])):
        yield (decode_tensor(batch["latent"][i], batch["latent_shape"][i], batch["latent_dtype"][i]),
               decode_tensor(batch["text_embedding"][i], batch["text_embedding_shape"][i],
                             batch["text_embedding_dtype"][i]))


def clip_batches(shard, batch_size: int, max_tokens: int, skip: int = 0) -> Iterator[Batch]:
    """One epoch of same-shape batches from a worker's dataset shard, after skipping `skip` clips.

    Clips whose shape has not filled a batch by the end of the epoch go out as a smaller batch.
    """
    buckets: dict[tuple, list] = defaultdict(list)
    seen = 0
    for rows in shard.iter_batches(batch_size=64, batch_format="numpy", prefetch_batches=2):
        for latent, text in _rows(rows):
            seen += 1
            if seen <= skip:
                continue
            bucket = buckets[tuple(latent.shape)]
            bucket.append((latent, pad_text_embedding(text, max_tokens)))
            if len(bucket) == batch_size:
                yield Batch(torch.stack([b[0] for b in bucket]), torch.stack([b[1] for b in bucket]))
                bucket.clear()
    for bucket in buckets.values():
        if bucket:
            yield Batch(torch.stack([b[0] for b in bucket]), torch.stack([b[1] for b in bucket]))
