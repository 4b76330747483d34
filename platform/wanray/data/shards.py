"""Parquet shards and reject records of a preprocess output directory.

out/ (a local directory, or a prefix in an object store: wanray.storage)
  part-<hash>.parquet   clips, CLIP_SCHEMA, one row group per clip (training reads clips one by one,
                        in random order); each shard appears whole (temp file + rename, or one upload)
  empty_prompt.parquet  the empty-prompt text embedding
  rejects/<key>.json    one record per rejected input, written where it was rejected (.retry.json: a
                        storage error, tried again by the next run)
  rejects.jsonl         all reject records, one JSON object per line (rebuilt every run)
  summary.json          counts by outcome, reject reason and bucket, throughput
  settings.json         the model and data settings the shards were made with
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter

import numpy as np
import pyarrow as pa

from wanray import storage
from wanray.data.manifest import Reject
from wanray.schema import CLIP_SCHEMA, EMPTY_PROMPT_SCHEMA, TRAINING_READS, check_version

SHARD_GLOB = "part-*.parquet"
EMPTY_PROMPT_FILE = "empty_prompt.parquet"


def write_table_atomic(table: pa.Table, path, row_group_size: int | None = None) -> None:
    """Readers never see a partial shard (wanray.storage.write_parquet; `path` local or a URI)."""
    storage.write_parquet(table, path, row_group_size)


def part_name(ids) -> str:
    """A part file's name from the ids it holds: a Ray task retried after its write (its worker died before it
    returned) writes the same file again rather than a second copy of its rows."""
    return f"part-{hashlib.sha1(chr(10).join(ids).encode()).hexdigest()[:32]}.parquet"


def shard_paths(out_dir) -> list[str]:
    return storage.list_files(out_dir, SHARD_GLOB)


def written_ids(out_dir) -> set[str]:
    """Ids of all clips already in complete shards (reads only the id column)."""
    ids: set[str] = set()
    for p in shard_paths(out_dir):
        ids.update(storage.read_table(p, columns=["id"]).column("id").to_pylist())
    return ids


def read_clips(out_dir) -> pa.Table:
    """All clip rows of a preprocess output directory, version-checked."""
    paths = shard_paths(out_dir)
    if not paths:
        raise FileNotFoundError(f"no Parquet shards ({SHARD_GLOB}) in {out_dir}")
    for p in paths:
        check_version(storage.read_schema(p), str(p))
    return pa.concat_tables([storage.read_table(p, schema=CLIP_SCHEMA) for p in paths])


def bucket_counts(out_dir) -> dict[str, int]:
    """Clips per bucket ("HxWxF") in the shards of a preprocess output directory, largest first
    (shards of schema version 1 have no bucket column: their height, width and num_frames name it)."""
    counts: Counter = Counter()
    for p in shard_paths(out_dir):
        schema = storage.read_schema(p)
        check_version(schema, str(p), TRAINING_READS)
        if "bucket" in schema.names:
            counts.update(storage.read_table(p, columns=["bucket"]).column("bucket").to_pylist())
        else:
            t = storage.read_table(p, columns=["height", "width", "num_frames"]).to_pydict()
            counts.update(f"{h}x{w}x{f}" for h, w, f in zip(t["height"], t["width"], t["num_frames"]))
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def reject_key(reject: Reject) -> str:
    return hashlib.sha1(f"{reject.input}\n{reject.reason}".encode()).hexdigest()[:20]


RETRIED = frozenset({"storage_error"})
"""Reject reasons the next run tries again: a store that refused a read (network, throttling, credentials) may
serve it then. Their records are `rejects/<key>.retry.json`, which resume does not skip."""
RETRY_SUFFIX = ".retry.json"


def record_reject(out_dir, reject: Reject, key: str | None = None) -> None:
    d = storage.join(out_dir, "rejects")
    storage.make_dirs(d)
    suffix = RETRY_SUFFIX if reject.reason in RETRIED else ".json"
    storage.write_json(
        {"input": reject.input, "reason": reject.reason, "detail": reject.detail},
        storage.join(d, f"{key or reject_key(reject)}{suffix}"),
    )


def rejected_keys(out_dir, retried: bool = False) -> set[str]:
    """The keys of the inputs rejected for good (what a resumed run skips), and with `retried` also of those the
    next run tries again."""
    files = storage.list_files(storage.join(out_dir, "rejects"), "*.json")
    return {
        storage.name(p).removesuffix(RETRY_SUFFIX).removesuffix(".json")
        for p in files
        if retried or not p.endswith(RETRY_SUFFIX)
    }


def forget_retried(out_dir) -> int:
    """Deletes the records of the rejects a run tries again (RETRIED); how many there were."""
    files = storage.list_files(storage.join(out_dir, "rejects"), "*" + RETRY_SUFFIX)
    for p in files:
        storage.remove(p)
    return len(files)


def reject_reasons(out_dir, keys: set[str]) -> dict[str, str]:
    """{key: reason} of the inputs of `keys` rejected for good (reads only their records, 16 at a time: on an
    object store each is a request)."""
    from concurrent.futures import ThreadPoolExecutor

    def reason(key: str) -> str:
        return json.loads(storage.read_text(storage.join(out_dir, "rejects", f"{key}.json")))["reason"]

    found = sorted(rejected_keys(out_dir) & keys)
    with ThreadPoolExecutor(16) as pool:
        return dict(zip(found, pool.map(reason, found), strict=True))


def forget_rejects(out_dir, keys: set[str]) -> None:
    """Deletes the records of these inputs' rejects for good: the next run processes them."""
    for key in sorted(keys):
        storage.remove(storage.join(out_dir, "rejects", f"{key}.json"))


def collect_rejects(out_dir) -> list[dict]:
    """All reject records, also rewritten as out/rejects.jsonl sorted by input."""
    files = storage.list_files(storage.join(out_dir, "rejects"), "*.json")
    records = sorted((json.loads(storage.read_text(p)) for p in files), key=lambda r: (r["input"], r["reason"]))
    storage.write_text(storage.join(out_dir, "rejects.jsonl"), "".join(json.dumps(r) + "\n" for r in records))
    return records


def write_shard(batch: dict, out_dir: str) -> dict:
    """Ray Data map_batches function: one batch of clip rows becomes one Parquet shard."""
    rows = len(batch["id"])
    columns = {}
    for f in CLIP_SCHEMA:
        values = list(batch[f.name]) if f.name in batch else [None] * rows  # nullable columns a model has not
        if f.name == "motion":  # a still's NaN (decode_source)
            values = [None if v is None or np.isnan(v) else float(v) for v in values]
        if f.name == "caption_model":  # "" for a manifest's caption
            values = [v or None for v in values]
        columns[f.name] = (
            [None if v is None else list(map(int, v)) for v in values] if f.name.endswith("_shape") else values
        )
    name = part_name(batch["id"])
    table = pa.Table.from_pydict(columns, schema=CLIP_SCHEMA)
    write_table_atomic(table, storage.join(out_dir, name), row_group_size=1)
    return {"shard": [name], "rows": [len(batch["id"])], "frames": [int(sum(batch["num_frames"]))]}


def write_empty_prompt(out_dir, embedding) -> None:
    from wanray.schema import encode_tensor

    data, shape, dtype = encode_tensor(embedding)
    table = pa.Table.from_pydict(
        {
            "text_embedding": [data],
            "text_embedding_shape": [shape],
            "text_embedding_dtype": [dtype],
            "text_tokens": [int(embedding.shape[0])],
        },
        schema=EMPTY_PROMPT_SCHEMA,
    )
    write_table_atomic(table, storage.join(out_dir, EMPTY_PROMPT_FILE))


def read_empty_prompt(out_dir):
    from wanray.schema import decode_tensor

    path = storage.join(out_dir, EMPTY_PROMPT_FILE)
    check_version(storage.read_schema(path), str(path), TRAINING_READS)  # unchanged since version 1
    row = storage.read_table(path).to_pylist()[0]
    return decode_tensor(row["text_embedding"], row["text_embedding_shape"], row["text_embedding_dtype"])
