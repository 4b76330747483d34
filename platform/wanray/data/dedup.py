"""Near-duplicate clips across the whole corpus, found with a Ray Data aggregation.

A clip's fingerprint is the perceptual hashes (ImageHash's pHash: the low frequencies of a 32x32 DCT, 64
bits) of FRAMES frames spread evenly over it, 256 bits in all; re-encodes, rescales and small edits of a
clip keep most bits, other footage differs in about half. Two clips are near duplicates when at most
`distance` (data.dedup_distance) of the bits differ.

Comparing every pair is quadratic, so the bits are cut into distance + 1 bands: two fingerprints within
`distance` bits agree on at least one whole band (pigeonhole). Every clip goes out once per band, keyed by
(band, its bits); a groupby on that key brings together only clips that share a band, and each group
compares its own members (a band is 256 / (distance + 1) bits: the larger the distance, the larger the
groups). Clips are taken in order of their source's frame size, the largest first (of a video uploaded at 1080p
and again at 240p, the 1080p copy stays), then (source path, start frame), those stored already before all:
one near a clip kept before it is rejected as near_duplicate naming that clip (wanray.data.curate), one near
only rejected clips stays. A clip rejected for another reason (its decode failed, a filter) is kept by nothing:
its near duplicates are compared as if it were not there, so the next copy in the order stays.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import ray

from wanray.data.video import IMAGE_SUFFIXES

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
    """Ray Data map_groups: the clips of one band key -> every pair of them within `distance` bits, as (id, rank,
    other, other_rank, bits) with `other` the one before in rank order."""
    order = np.argsort(np.array(group.column("rank").to_pylist(), dtype=object), kind="stable")
    ids = np.array(group.column("id").to_pylist(), dtype=object)[order]
    ranks = np.array(group.column("rank").to_pylist(), dtype=object)[order]
    hashes = np.frombuffer(b"".join(group.column("phash").to_pylist()), np.uint8).reshape(len(ids), -1)[order]
    found: dict[str, list] = {"id": [], "rank": [], "other": [], "other_rank": [], "bits": []}
    for j in range(1, len(ids)):
        bits = np.unpackbits(hashes[:j] ^ hashes[j], axis=1).sum(axis=1)
        for i in np.flatnonzero((bits <= distance) & (ids[:j] != ids[j])):
            for key, value in zip(found, (ids[j], ranks[j], ids[i], ranks[i], int(bits[i]))):
                found[key].append(value)
    return pa.table(found, schema=pa.schema([(k, pa.int64() if k == "bits" else pa.string()) for k in found]))


MAX_PIXELS = 10**15
RANK_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("path", pa.string()),
        ("cut_start", pa.int32()),
        ("pixels", pa.int64()),
        ("phash", pa.binary()),
    ]
)


def _ranked(row: dict) -> dict:
    """The clip's place in the order: videos before stills (a photo never replaces a clip that moves), larger
    sources first (candidates files of an older run have no pixels: 0), then by path and start frame."""
    still = row["path"].lower().endswith(IMAGE_SUFFIXES)
    fewer = MAX_PIXELS - min(row.get("pixels") or 0, MAX_PIXELS) + (MAX_PIXELS if still else 0)
    return {
        "id": row["id"],
        "phash": row["phash"],
        "rank": f"{fewer:016d}\0{row['path']}\0{row['cut_start']:012d}\0{row['id']}",
    }


def near_pair_rows(files: list[str], distance: int) -> list[dict]:
    """near_pairs' rows over the clips of the candidates `files` (wanray.data.curate, written with data.dedup:
    every clip has its `phash`): each pair within `distance` bits, once per band it shares, on the driver."""
    if not files:
        return []
    # an explicit schema: candidates files of older runs have no pixels column (read as null)
    ds = ray.data.read_parquet(files, schema=RANK_SCHEMA).select_columns(RANK_SCHEMA.names)  # local paths or URIs
    pairs = (
        ds.map(_ranked)
        .flat_map(_band_rows, fn_kwargs={"distance": distance})
        .groupby("band", num_partitions=min(len(files), 200))  # Ray's default is 200: slow for a few files
        .map_groups(near_pairs, fn_kwargs={"distance": distance}, batch_format="pyarrow")
    )
    return list(pairs.iter_rows())


def choose(
    pairs, kept: frozenset[str] = frozenset(), failed: frozenset[str] = frozenset()
) -> dict[str, tuple[str, int]]:
    """{clip id: (id of the kept clip it duplicates, differing bits)} from near_pairs' rows. Clips are taken
    largest source first, then in (source path, start frame) order, those of `kept` (stored already) first and
    never rejected: a clip is rejected when it is near one kept before it, naming the first such one. So a clip
    near only a rejected one stays: of A, B, C in a row, each near the next but A not near C, A and C stay.
    Clips of `failed` (rejected for another reason) are left out, neither kept nor duplicates."""
    near: dict[str, dict[str, int]] = {}  # clip -> {a clip near it: bits}, each pair once however many bands
    rank: dict[str, str] = {}
    for r in pairs:
        if r["id"] in failed or r["other"] in failed:
            continue
        rank[r["id"]], rank[r["other"]] = r["rank"], r["other_rank"]
        near.setdefault(r["id"], {})[r["other"]] = int(r["bits"])
        near.setdefault(r["other"], {})[r["id"]] = int(r["bits"])

    def first(clip: str) -> tuple[bool, str]:  # the order clips are taken in
        return clip not in kept, rank[clip]

    duplicates: dict[str, tuple[str, int]] = {}
    for clip in sorted(near, key=first):
        before = [o for o in near[clip] if first(o) < first(clip) and o not in duplicates]
        if before and clip not in kept:
            of = min(before, key=first)
            duplicates[clip] = (of, near[clip][of])
    return duplicates
