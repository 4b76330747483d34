"""Near-duplicate clips across the whole corpus, found with a Ray Data aggregation.

A clip's fingerprint is the perceptual hashes (ImageHash's pHash: the low frequencies of a 32x32 DCT, 64
bits) of FRAMES frames spread evenly over it, 256 bits in all; re-encodes, rescales and small edits of a
clip keep most bits, other footage differs in about half. Two clips are near duplicates when at most
`distance` (data.dedup_distance) of the bits differ.

Comparing every pair is quadratic, so the bits are cut into distance + 1 bands: two fingerprints within
`distance` bits agree on at least one whole band (pigeonhole). Every clip goes out once per band, keyed by
(band, its bits); a groupby on that key brings together only clips that share a band, and each group
compares its own members (a band is 256 / (distance + 1) bits: the larger the distance, the larger the
groups). Of near duplicates the clip first in (source path, start frame)
order is kept; every other is rejected as near_duplicate naming it (wanray.data.curate).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import ray

FRAMES = 4
BITS = 64 * FRAMES
HASH_SIZE = 64
"""Frames are decoded this many pixels square for hashing (pHash reduces them to 32x32)."""


def fingerprint(frames: np.ndarray) -> bytes:
    """The pHashes of FRAMES (n, h, w, 3) uint8 frames, 8 bytes each."""
    import imagehash
    from PIL import Image

    assert len(frames) == FRAMES, len(frames)
    return b"".join(np.packbits(imagehash.phash(Image.fromarray(f)).hash.flatten()).tobytes() for f in frames)


def distance_bits(a: bytes, b: bytes) -> int:
    return int(np.unpackbits(np.frombuffer(a, np.uint8) ^ np.frombuffer(b, np.uint8)).sum())


def band_keys(phash: bytes, distance: int) -> list[str]:
    """One key per band of the bits: near duplicates share at least one."""
    bits = np.unpackbits(np.frombuffer(phash, np.uint8))
    edges = np.linspace(0, bits.size, distance + 2).round().astype(int)
    return [f"{i}:{np.packbits(bits[a:b]).tobytes().hex()}" for i, (a, b) in enumerate(zip(edges[:-1], edges[1:]))]


def _band_rows(row: dict, distance: int) -> list[dict]:
    return [{**row, "band": key} for key in band_keys(row["phash"], distance)]


def near_pairs(group: pa.Table, distance: int) -> pa.Table:
    """Ray Data map_groups: the clips of one band key -> (id, duplicate_of, of_rank, bits) for every clip
    within `distance` bits of one before it in rank order (the earliest such one)."""
    order = np.argsort(np.array(group.column("rank").to_pylist(), dtype=object), kind="stable")
    ids = np.array(group.column("id").to_pylist(), dtype=object)[order]
    ranks = np.array(group.column("rank").to_pylist(), dtype=object)[order]
    hashes = np.frombuffer(b"".join(group.column("phash").to_pylist()), np.uint8).reshape(len(ids), -1)[order]
    found: dict[str, list] = {"id": [], "duplicate_of": [], "of_rank": [], "bits": []}
    for j in range(1, len(ids)):
        bits = np.unpackbits(hashes[:j] ^ hashes[j], axis=1).sum(axis=1)
        near = np.flatnonzero((bits <= distance) & (ids[:j] != ids[j]))
        if near.size:
            i = int(near[0])
            for key, value in zip(found, (ids[j], ids[i], ranks[i], int(bits[i]))):
                found[key].append(value)
    return pa.table(
        found,
        schema=pa.schema(
            [("id", pa.string()), ("duplicate_of", pa.string()), ("of_rank", pa.string()), ("bits", pa.int64())]
        ),
    )


def _ranked(row: dict) -> dict:
    return {"id": row["id"], "phash": row["phash"], "rank": f"{row['path']}\0{row['cut_start']:012d}\0{row['id']}"}


def find_duplicates(files: list[str], distance: int) -> dict[str, tuple[str, int]]:
    """{clip id: (id of the clip it duplicates, differing bits)} over the clips of the candidates `files`
    (wanray.data.curate, written with data.dedup: every clip has its `phash`)."""
    if not files:
        return {}
    ds = ray.data.read_parquet(files, columns=["id", "path", "cut_start", "phash"])  # local paths or URIs
    pairs = (
        ds.map(_ranked)
        .flat_map(_band_rows, fn_kwargs={"distance": distance})
        .groupby("band", num_partitions=min(len(files), 200))  # Ray's default is 200: slow for a few files
        .map_groups(near_pairs, fn_kwargs={"distance": distance}, batch_format="pyarrow")
    )
    best: dict[str, tuple[str, str, int]] = {}
    for r in pairs.iter_rows():  # a clip near several earlier ones, in several bands: the earliest
        if r["id"] not in best or r["of_rank"] < best[r["id"]][1]:
            best[r["id"]] = (r["duplicate_of"], r["of_rank"], int(r["bits"]))
    return {k: (of, bits) for k, (of, _, bits) in best.items()}
