"""Everything this wanray still accepts from the versions before it, in one place: each goes at
REMOVAL_VERSION, after which an old key is an unknown key and an old shard is refused like any other.

- Config keys that were renamed or removed: a one-line error naming the new key (not "unknown key").
- Parquet shards of schema 1 (one fixed size per directory, before each clip's bucket and source size
  were stored) and 2 (before each clip's source frame range and motion score): training reads them, as it
  needs only the tensors and their shapes (a train.filters column they lack is an error); preprocessing
  writes schema 3 only.
- Shards of several clips per Parquet row group (before one row group per clip): training reads them, with a
  warning, as every clip read decodes its whole row group.
"""

from __future__ import annotations

REMOVAL_VERSION = "1.0"
"""The release that drops these (pyproject's version is 0.x)."""

REMOVED_KEYS = {
    "data.max_text_tokens": "Wan2.2's text length is fixed at 512 tokens (wanray.wan.TEXT_TOKENS)",
    "preprocess.device": "use preprocess.encoders.device",
    "preprocess.dtype": "use preprocess.encoders.dtype",
    "preprocess.encoder_cpus": "use preprocess.encoders.cpus",
    "preprocess.encoder_accelerators": "use preprocess.encoders.accelerators",
    "infer.device": "each stage has its own: infer.stages.{text,high,low,vae}.device and infer.batch.device",
    "infer.dtype": "each stage has its own: infer.stages.{text,high,low,vae}.dtype and infer.batch.dtype",
    **{
        f"infer.{stage}_{old}": f"use infer.stages.{stage}.{new}"
        for stage in ("text", "high", "low", "vae")
        for old, new in (("cpus", "cpus"), ("accelerators", "accelerators"))
    },
    "infer.batch_cpus": "use infer.batch.cpus",
    "infer.batch_accelerators": "use infer.batch.accelerators",
    "train.device": "use train.worker.device",
    "train.param_dtype": "use train.worker.dtype",
    "train.cpus_per_worker": "use train.worker.cpus",
    "train.accelerators_per_worker": "use train.worker.accelerators",
    "infer.high_devices": "use infer.stages.high.devices",
    "infer.low_devices": "use infer.stages.low.devices",
    "infer.replicas": "each stage has its own: infer.stages.{text,high,low,vae}.replicas",
    "infer.max_replicas": "each stage has its own: infer.stages.{text,high,low,vae}.max_replicas",
    "infer.first_block_cache": "use infer.cache: first_block and infer.cache_threshold: the old value",
}


TRAINING_READS = ("1", "2", "3")
"""Parquet schema versions training reads (wanray.schema.SCHEMA_VERSION is what preprocessing writes)."""


def row_group_warning(data_dir, clips_per_row_group: int) -> str | None:
    """The warning for a preprocessed directory whose shards hold several clips per Parquet row group (an earlier
    wanray's), or None for this one's (one clip per row group)."""
    if clips_per_row_group <= 1:
        return None
    return (
        f"[train] warning: the shards in {data_dir} hold up to {clips_per_row_group} clips per Parquet row group "
        "(written by an earlier wanray): every clip read decodes its whole row group. Preprocess into a new "
        "directory for one row group per clip"
    )
