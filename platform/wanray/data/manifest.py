"""Caption manifests -> clip sources, every bad entry a named reject.

Accepted formats (picked by file extension):
- MindSpeed-MM `data.txt`: lines `folder,annotation.json`; the annotation JSON is a list of
  `{path, cap, num_frames, fps, resolution: {height, width}}` with `cap` a string or a list
  of strings (the first non-empty one is used) and optional Open-Sora-Plan `cut`
  ([start_frame, end_frame) in source frames) and `aesthetic`. Video paths resolve
  against `folder`.
- A bare annotation `.json` (paths resolve against its own directory).
- `.jsonl`: one object per line with `path` (or `video`) and `cap` (or `prompt`, `caption`, `text`).
- `.csv` with `video,prompt` columns (DiffSynth-Studio style).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import PurePosixPath

from wanray import storage
from wanray.errors import ManifestError

PATH_KEYS = ("path", "video", "image")
CAPTION_KEYS = ("cap", "prompt", "caption", "text")


@dataclass(frozen=True)
class ClipSource:
    """One video (or one `cut` of it) with its caption, as the manifest names it."""

    id: str
    path: str
    caption: str
    cut_start: int = 0
    cut_end: int = -1
    """Exclusive end frame in the source video; -1 means the end of the video."""
    whole: bool = False
    """The manifest gave no `cut`: with data.max_clip_seconds set, the video is split into clips
    (wanray.data.scenes); a line with a `cut` is kept as it is."""
    caption_model: str = ""
    """The model that wrote `caption` (wanray.data.caption); empty for the manifest's own."""


@dataclass(frozen=True)
class Reject:
    input: str
    """What was rejected: a video path, or `manifest:line` for an entry that names none."""
    reason: str
    """Stable machine-readable reason, e.g. missing_caption, file_not_found."""
    detail: str = ""


def clip_id(path: str, caption: str, cut_start: int, cut_end: int) -> str:
    return hashlib.sha1(f"{path}\n{cut_start}\n{cut_end}\n{caption}".encode()).hexdigest()[:20]


def _caption(entry: dict) -> tuple[str | None, str | None]:
    """(caption, None) or (None, reject reason)."""
    key = next((k for k in CAPTION_KEYS if k in entry), None)
    if key is None:
        return None, "missing_caption"
    cap = entry[key]
    if isinstance(cap, list):
        if not all(isinstance(c, str) for c in cap):
            return None, "caption_not_string"
        cap = next((c for c in cap if c.strip()), "")
    if not isinstance(cap, str):
        return None, "caption_not_string"
    if not cap.strip():
        return None, "empty_caption"
    return cap.strip(), None


def _cut(entry: dict) -> tuple[int, int] | None:
    cut = entry.get("cut")
    if cut is None:
        return 0, -1
    ok = (
        isinstance(cut, (list, tuple))
        and len(cut) == 2
        and all(isinstance(c, int) for c in cut)
        and cut[0] >= 0
        and (cut[1] == -1 or cut[1] > cut[0])
    )
    return (cut[0], cut[1]) if ok else None


def parse_entry(entry, folder: str, where: str, uncaptioned: bool = False) -> ClipSource | Reject:
    """One annotation object -> a ClipSource, or a Reject naming what is wrong with it. `uncaptioned`: an
    entry without a caption (or an empty one) is a source with caption "" (a VLM writes it: caption.model)."""
    if not isinstance(entry, dict):
        return Reject(where, "malformed_entry", f"expected an object, got {type(entry).__name__}")
    raw_path = next((entry[k] for k in PATH_KEYS if k in entry), None)
    if not isinstance(raw_path, str) or not raw_path.strip():
        return Reject(where, "missing_path", "entry has no video path")
    path = storage.join(folder, raw_path.strip())  # a URI or an absolute path stands alone
    caption, reason = _caption(entry)
    if caption is None and uncaptioned and reason in ("missing_caption", "empty_caption"):
        caption = ""
    if caption is None:
        return Reject(path, reason or "missing_caption", where)
    cut = _cut(entry)
    if cut is None:
        return Reject(path, "malformed_cut", f"{where}: cut must be [start_frame, end_frame], got {entry['cut']!r}")
    return ClipSource(clip_id(path, caption, *cut), path, caption, *cut, whole="cut" not in entry)


def _annotation(path: str, folder: str, where: str, uncaptioned: bool) -> list[ClipSource | Reject]:
    if not storage.is_file(path):
        return [Reject(where, "annotation_not_found", str(path))]
    try:
        entries = json.loads(storage.read_text(path))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        return [Reject(str(path), "malformed_json", str(e))]
    if not isinstance(entries, list):
        return [Reject(str(path), "malformed_annotation", "annotation JSON must be a list of objects")]
    return [parse_entry(e, folder, f"{path}#{i}", uncaptioned) for i, e in enumerate(entries)]


def _data_txt(path: str, uncaptioned: bool) -> list[ClipSource | Reject]:
    out: list[ClipSource | Reject] = []
    for n, line in enumerate(storage.read_text(path).splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != 2 or not all(parts):
            out.append(Reject(f"{path}:{n}", "malformed_manifest_line", "expected 'folder,annotation.json'"))
            continue
        folder, anno = storage.join(storage.parent(path), parts[0]), storage.join(storage.parent(path), parts[1])
        out.extend(_annotation(anno, folder, f"{path}:{n}", uncaptioned))
    return out


def _jsonl(path: str, uncaptioned: bool) -> list[ClipSource | Reject]:
    out: list[ClipSource | Reject] = []
    for n, line in enumerate(storage.read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as e:
            out.append(Reject(f"{path}:{n}", "malformed_json_line", str(e)))
            continue
        out.append(parse_entry(entry, storage.parent(path), f"{path}:{n}", uncaptioned))
    return out


def _csv(path: str, uncaptioned: bool) -> list[ClipSource | Reject]:
    with io.StringIO(storage.read_text(path), newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {"video", "prompt"} <= set(reader.fieldnames):
            raise ManifestError(f"{path}: CSV manifest needs 'video' and 'prompt' columns, has {reader.fieldnames}")
        return [
            parse_entry({"video": r["video"], "prompt": r["prompt"]}, storage.parent(path), f"{path}:{n}", uncaptioned)
            for n, r in enumerate(reader, 2)
        ]


def read_manifest(path, uncaptioned: bool = False) -> tuple[list[ClipSource], list[Reject]]:
    """All clip sources of a manifest, and a Reject for every entry that cannot be one. `uncaptioned`: entries
    without a caption are sources too (parse_entry).

    Duplicate entries (same video, cut and caption) are kept once and the rest rejected.
    """
    p = storage.absolute(path)  # a local path, or a URI (wanray.storage)
    if not storage.is_file(p):
        raise ManifestError(f"manifest not found: {p}")
    suffix = PurePosixPath(p).suffix.lower()
    if suffix == ".txt":
        items = _data_txt(p, uncaptioned)
    elif suffix == ".json":
        items = _annotation(p, storage.parent(p), p, uncaptioned)
    elif suffix == ".jsonl":
        items = _jsonl(p, uncaptioned)
    elif suffix == ".csv":
        items = _csv(p, uncaptioned)
    else:
        raise ManifestError(f"{p}: unknown manifest format {suffix!r} (use data.txt, .json, .jsonl or .csv)")
    sources: dict[str, ClipSource] = {}
    rejects: list[Reject] = []
    for item in items:
        if isinstance(item, Reject):
            rejects.append(item)
        elif item.id in sources:
            rejects.append(Reject(item.path, "duplicate_entry", "same video, cut and caption listed before"))
        else:
            sources[item.id] = item
    return list(sources.values()), rejects
