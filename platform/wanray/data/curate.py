"""The curation pass before decoding: manifest sources -> the clips to train on.

    sources (Ray Data tasks on CPU nodes, clips_per_decode_task sources each)
      -> split: a source without a `cut` into its shots' clips (wanray.data.scenes), data.max_clip_seconds
      -> with data.dedup, each clip's perceptual-hash fingerprint (wanray.data.dedup)
      -> candidates/part-<hash>.parquet: each clip with its source, [cut_start, cut_end) frame range and
         fingerprint, and in the file's metadata the ids of the sources it covers
    -> with data.dedup, near duplicates across every candidates file (a Ray Data groupby): rejected
    then the clips go through decode -> encode -> write as manifest lines with a `cut` do.

Preprocessing runs it when data.max_clip_seconds or data.dedup is set. A source's clips appear in one
file, whole or not at all (temp file + rename), so a resumed run splits only the sources no file covers;
shots too short to be a clip, sources that cannot be split and near duplicates are rejects.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import ray

from wanray import storage
from wanray.buckets import parse_shape
from wanray.config import Config
from wanray.data.dedup import BITS, FRAMES, HASH_SIZE, choose, fingerprint, near_pair_rows
from wanray.data.manifest import ClipSource, Reject, clip_id
from wanray.data.scenes import cut_shot, detect_shots
from wanray.data.shards import forget_rejects, part_name, record_reject, reject_reasons, write_table_atomic
from wanray.data.video import (
    ClipRejected,
    frame_size,
    is_image,
    local_file,
    open_image,
    sample_frames,
    unreadable,
)

CANDIDATES_DIR = "candidates"
SOURCES_KEY = b"wanray.sources"
CANDIDATE_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("source_id", pa.string(), nullable=False),
        pa.field("path", pa.string(), nullable=False),
        pa.field("caption", pa.string(), nullable=False),
        pa.field("cut_start", pa.int32(), nullable=False),
        pa.field("cut_end", pa.int32(), nullable=False),
        pa.field("phash", pa.binary(), nullable=True),
        pa.field("pixels", pa.int64(), nullable=True),  # the source's frame height x width (data.dedup keeps
        # the largest copy); null in candidates files of older runs
    ]
)


def needs_split(src: ClipSource, cfg: Config) -> bool:
    return bool(cfg.data.max_clip_seconds) and src.whole and not is_image(src.path)


def in_pass(src: ClipSource, cfg: Config) -> bool:
    """Whether the source goes through this pass (to be split, or to be fingerprinted)."""
    return cfg.data.dedup or needs_split(src, cfg)


def clip_name(clip: ClipSource) -> str:
    """What a reject of one clip names: its file, with the frame range when it is a cut."""
    return clip.path if clip.cut_end < 0 and clip.cut_start == 0 else f"{clip.path}#{clip.cut_start}-{clip.cut_end}"


def clip_fingerprint(clip: ClipSource) -> bytes:
    """Raises ClipRejected for what cannot be read."""
    if is_image(clip.path):
        image = np.asarray(open_image(clip.path).resize((HASH_SIZE, HASH_SIZE)), dtype=np.uint8)
        return fingerprint(np.repeat(image[None], FRAMES, axis=0))
    return fingerprint(sample_frames(clip.path, FRAMES, HASH_SIZE, clip.cut_start, clip.cut_end))


def source_pixels(path: str) -> int:
    """Height x width of a source's frames (as shown: a rotated phone video's or photo's too). Raises
    ClipRejected for what cannot be read."""
    if is_image(path):
        width, height = open_image(path).size
        return width * height
    with local_file(path) as local:
        try:
            height, width, _ = frame_size(local)
        except Exception as e:
            raise unreadable(local, e) from None
    return height * width


def piece_of(src: ClipSource, start: int, end: int) -> ClipSource:
    """The clip of source frames [start, end) of `src`, with its caption."""
    return ClipSource(clip_id(src.path, src.caption, start, end), src.path, src.caption, start, end)


def split_source(src: ClipSource, cfg: Config, out_dir: str) -> list[ClipSource]:
    """The clips of one source: itself when it is not split, else one per piece of its shots (rejects
    recorded in out_dir: the source when it cannot be read, each piece too short to be a clip)."""
    if not needs_split(src, cfg):
        return [src]
    d = cfg.data
    try:
        with local_file(src.path) as local:
            try:
                found = detect_shots(local, d.scene_threshold, min_shot_frames=2)
            except Exception as e:  # scenedetect's VideoOpenFailure and OpenCV errors carry the reason
                raise unreadable(local, e) from None
        if not found.shots or found.fps <= 0:
            raise ClipRejected("too_short", f"no frames read ({found.frames} frames at {found.fps:g} fps)")
    except ClipRejected as e:
        record_reject(out_dir, Reject(src.path, e.reason, e.detail), key=src.id)
        return []
    shortest = max(d.min_clip_seconds, (least_video_frames(d) - 1) / d.fps)
    clips = []
    for start, end in found.shots:
        keep, short = cut_shot(start, end, found.fps, d.max_clip_seconds, shortest)
        clips += [piece_of(src, a, b) for a, b in keep]
        for piece in (piece_of(src, a, b) for a, b in short):
            a, b = piece.cut_start, piece.cut_end
            span = (b - a - 1) / found.fps  # first frame to last, as cut_shot counts
            detail = f"frames [{a}, {b}) of the shot [{start}, {end}): {span:.2f}s, need {shortest:.2f}s"
            record_reject(out_dir, Reject(clip_name(piece), "short_shot", detail), key=piece.id)
    return clips


def least_video_frames(d) -> int:
    """The fewest frames a video clip may have: the shortest video bucket of data.buckets (1 where it lists still
    images only), else data.min_frames."""
    if not d.buckets:
        return d.min_frames
    return min((f for f in (parse_shape(b)[2] for b in d.buckets) if f > 1), default=1)


def split_batch(batch: pa.Table, cfg: Config, out_dir: str) -> dict:
    """Ray Data map_batches: a batch of source rows -> one candidates file with their clips."""
    sources = [ClipSource(**row) for row in batch.to_pylist()]
    rows: list[tuple[str, ClipSource, bytes | None, int | None]] = []
    for source in sources:
        pixels = None
        for clip in split_source(source, cfg, out_dir):
            try:
                if cfg.data.dedup and pixels is None:
                    pixels = source_pixels(source.path)
                rows.append((source.id, clip, clip_fingerprint(clip) if cfg.data.dedup else None, pixels))
            except ClipRejected as e:
                record_reject(out_dir, Reject(clip_name(clip), e.reason, e.detail), key=clip.id)
    table = pa.Table.from_pydict(
        {
            "id": [c.id for _, c, _, _ in rows],
            "source_id": [sid for sid, _, _, _ in rows],
            "path": [c.path for _, c, _, _ in rows],
            "caption": [c.caption for _, c, _, _ in rows],
            "cut_start": [c.cut_start for _, c, _, _ in rows],
            "cut_end": [c.cut_end for _, c, _, _ in rows],
            "phash": [h for _, _, h, _ in rows],
            "pixels": [n for _, _, _, n in rows],
        },
        schema=CANDIDATE_SCHEMA.with_metadata({SOURCES_KEY: json.dumps([s.id for s in sources]).encode()}),
    )
    folder = storage.join(out_dir, CANDIDATES_DIR)
    storage.make_dirs(folder)
    write_table_atomic(table, storage.join(folder, part_name([s.id for s in sources])))
    return {"sources": np.array([len(sources)]), "clips": np.array([len(rows)])}


def read_candidates(out_dir) -> tuple[dict[str, list[ClipSource]], set[str]]:
    """(the clips of the candidates files by source id, the ids of the sources the files cover)."""
    clips: dict[str, list[ClipSource]] = {}
    covered: set[str] = set()
    for path in candidate_files(out_dir):
        table = storage.read_table(path, schema=CANDIDATE_SCHEMA)
        covered.update(json.loads((storage.read_schema(path).metadata or {})[SOURCES_KEY]))
        for r in table.to_pylist():
            clips.setdefault(r["source_id"], []).append(
                ClipSource(r["id"], r["path"], r["caption"], r["cut_start"], r["cut_end"])
            )
    return clips, covered


def candidate_files(out_dir) -> list[str]:
    return storage.list_files(storage.join(out_dir, CANDIDATES_DIR), "part-*.parquet")


@dataclass(frozen=True)
class Curated:
    """curate_sources' result: the clips of the sources, in their order; the ids of the clips kept as the copy
    of near duplicates; with data.dedup, the near pairs found (near_pair_rows) and the candidates files they
    came from, which spare curating again in the same run the comparison while those files stay the same."""

    clips: list[ClipSource]
    keepers: set[str] = field(default_factory=set)
    pairs: tuple[list[str], list[dict]] | None = None


def curate_sources(
    sources: list[ClipSource],
    cfg: Config,
    out_dir: str,
    skip: set[str],
    written: set[str],
    log,
    pairs: tuple[list[str], list[dict]] | None = None,
) -> Curated:
    """The clips of `sources`: a source no candidates file covers yet (and not in `skip`, the rejected) is split
    and fingerprinted on Ray Data first; with data.dedup, near duplicates among every clip of the candidates
    files are rejected (never one of `written`, the clips already stored). Should a kept copy be rejected later
    (its decode fails, a filter), curating again frees its near duplicates (reject_duplicates); `pairs`, a
    Curated's of the same run, spares it comparing the clips again."""
    _, covered = read_candidates(out_dir)
    todo = [s for s in sources if s.id not in covered and s.id not in skip and in_pass(s, cfg)]
    if todo:
        d = cfg.data
        doing = " and ".join(
            ([f"splitting into shots, clips of at most {d.max_clip_seconds:g}s"] if d.max_clip_seconds else [])
            + (["fingerprinting"] if d.dedup else [])
        )
        log(f"[preprocess] {doing}: {len(todo)} videos")
        items = [{k: getattr(s, k) for k in ClipSource.__dataclass_fields__} for s in todo]
        per_task = cfg.preprocess.clips_per_decode_task
        ds = ray.data.from_items(items, override_num_blocks=max(1, -(-len(todo) // per_task)))
        split = ds.map_batches(
            split_batch,
            fn_kwargs={"cfg": cfg, "out_dir": out_dir},
            batch_size=per_task,
            batch_format="pyarrow",
            num_cpus=cfg.preprocess.decode_cpus,
        )
        sources_done = clips_found = 0
        for row in split.iter_rows():
            sources_done, clips_found = sources_done + int(row["sources"]), clips_found + int(row["clips"])
            log(f"[preprocess] curated {sources_done}/{len(todo)} videos: {clips_found} clips")
    by_source, _ = read_candidates(out_dir)
    clips = [c for s in sources for c in (by_source.get(s.id, []) if in_pass(s, cfg) else [s])]
    if not cfg.data.dedup:
        return Curated(clips)
    files = candidate_files(out_dir)
    rows = pairs[1] if pairs is not None and pairs[0] == files else near_pair_rows(files, cfg.data.dedup_distance)
    keepers = reject_duplicates(by_source, rows, cfg.data.dedup_distance, out_dir, written, log)
    return Curated(clips, keepers, (files, rows))


def reject_duplicates(
    by_source: dict[str, list[ClipSource]], rows: list[dict], distance: int, out_dir: str, written: set[str], log
) -> set[str]:
    """Records a near_duplicate reject for each near duplicate among the near pairs `rows` and returns the ids
    of the clips they name. A clip rejected for another reason keeps none (choose's `failed`): the reject of a
    near duplicate that named one is deleted, and that clip is processed unless another copy stays."""
    clips = {c.id: c for group in by_source.values() for c in group}
    reasons = reject_reasons(out_dir, set(clips))
    failed = frozenset(k for k, reason in reasons.items() if reason != "near_duplicate")
    # a clip stored by an earlier run (of another manifest, say) stays, and a later near one goes
    duplicates = choose(rows, frozenset(written), failed)
    freed = {k for k, reason in reasons.items() if reason == "near_duplicate" and k not in duplicates}
    forget_rejects(out_dir, freed)
    for dup, (kept, bits) in sorted(duplicates.items()):
        detail = f"near duplicate of {clip_name(clips[kept])} ({bits} of {BITS} hash bits differ)"
        record_reject(out_dir, Reject(clip_name(clips[dup]), "near_duplicate", detail), key=dup)
    log(
        f"[preprocess] near duplicates: {len(duplicates)} of {len(clips)} clips (data.dedup_distance {distance})"
        + (f"; {len(freed)} no longer, the copy they duplicated was rejected" if freed else "")
    )
    return {kept for kept, _ in duplicates.values()}
