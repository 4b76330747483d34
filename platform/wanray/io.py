"""Files that appear whole or not at all, and mp4 writing.

Every output a reader may find half-written (Parquet shards, reject records, summaries, the tiny
model, exports, generated videos, synthetic data) is written to a hidden temporary sibling and
renamed into place: a rename within one directory is atomic, so a crash leaves the old file or
nothing, never a partial one.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, replace_dir: bool = False) -> Iterator[Path]:
    """A hidden temporary sibling of `path` (".name.<random>.tmp": no reader's glob of the final
    names matches it) to write a file or a directory into; it replaces `path` when the block ends
    without an error, and is removed when it raises. A non-empty directory already at `path` is an
    OSError, or with `replace_dir` is removed first (then, briefly, only the finished temporary
    directory holds the result, and it is kept if the rename fails)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    keep = False
    try:
        yield tmp
        if replace_dir and tmp.is_dir() and path.is_dir():
            shutil.rmtree(path)
            keep = True
        os.replace(tmp, path)
    except BaseException:
        if keep:
            raise
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json_atomic(obj, path: str | os.PathLike) -> None:
    write_text_atomic(path, json.dumps(obj, indent=1, sort_keys=True))


def write_mp4(path: str | os.PathLike, frames, fps: int) -> None:
    """(frames, height, width, 3) uint8 frames as an H.264 mp4 (yuv420p), written atomically."""
    import av

    with atomic_path(path) as tmp, av.open(str(tmp), mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        stream.options = {"preset": "ultrafast", "crf": "23"}
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
