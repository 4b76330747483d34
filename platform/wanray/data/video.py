"""Clip planning and decoding, and the decode stage built on them; no Ray, no torch (decode workers start light).

A still image (jpg, png, webp) is a one-frame clip at the resolution of its aspect ratio.
A clip is the source video resampled to the preset fps, given the bucket (wanray.buckets) of
the resolution nearest its aspect ratio and the longest frame count of it that the video holds,
then resized so it covers that resolution and center-cropped to it. Only the frames the clip
uses are decoded (decord `get_batch` on exactly those indices), and decord scales them while it
converts them to RGB (ffmpeg's swscale): resizing 480x832 frames in Python afterwards costs
several times the decode itself.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from wanray import storage
from wanray.buckets import Bucket, BucketSet
from wanray.config import Config
from wanray.data.manifest import ClipSource, Reject
from wanray.data.motion import curation_motion
from wanray.data.shards import record_reject
from wanray.wan import VAE_STRIDE_TEMPORAL, ModelKind


class ClipRejected(Exception):
    """A video that cannot give a clip; `reason` is the stable reject reason."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


@dataclass(frozen=True)
class ClipPlan:
    indices: list[int]
    """Source frame indices, one per clip frame (4n+1 of them)."""

    @property
    def start(self) -> int:
        return self.indices[0]


def longest_4n1(available: int, most: int, least: int) -> int | None:
    """The largest 4n+1 <= min(available, most), or None if it is below `least`."""
    n = min(available, most)
    n = n - (n - 1) % VAE_STRIDE_TEMPORAL if n >= 1 else 0
    return n if n >= least else None


def available_frames(src_fps: float, src_frames: int, fps: float, cut_start: int = 0, cut_end: int = -1) -> int:
    """Frames a clip resampled from `src_fps` to `fps` can have (those whose source index is in the cut)."""
    if not src_fps or src_fps <= 0 or not math.isfinite(src_fps):
        raise ClipRejected("bad_frame_rate", f"source reports {src_fps} fps")
    end = src_frames if cut_end < 0 else min(cut_end, src_frames)
    if cut_start >= end:
        raise ClipRejected("too_short", f"cut starts at frame {cut_start}, video has {src_frames}")
    return int((end - 1 - cut_start) // (src_fps / fps) + 1)


def plan_clip(
    src_fps: float, src_frames: int, fps: float, most: int, least: int, cut_start: int = 0, cut_end: int = -1
) -> ClipPlan:
    """Source frame indices of a clip resampled from `src_fps` to `fps`, of the longest 4n+1 frame
    count in [least, most] the video holds.

    Clip frame i shows source frame cut_start + floor(i * src_fps / fps): frames are
    dropped when the source is faster and repeated when it is slower.
    """
    available = available_frames(src_fps, src_frames, fps, cut_start, cut_end)
    n = longest_4n1(available, most, least)
    if n is None:
        raise ClipRejected(
            "too_short", f"{src_frames} frames at {src_fps:g} fps give {available} at {fps:g} fps, need {least}"
        )
    step = src_fps / fps
    return ClipPlan([cut_start + int(i * step) for i in range(n)])


def variable_rate_times(reader, src_fps: float) -> np.ndarray | None:
    """Each frame's presentation time (s) when the video's frame rate varies (a phone's recording, a screen
    capture): a frame more than half a frame period from where its average rate puts it. None: a constant rate,
    where a frame's index gives its time."""
    if len(reader) < 2 or not src_fps or not math.isfinite(src_fps) or src_fps <= 0:
        return None
    times = np.asarray(reader.get_frame_timestamp(range(len(reader))))[:, 0]
    drift = np.abs((times - times[0]) * src_fps - np.arange(len(times)))
    return times if drift.max() > 0.5 else None


def timed_available(times: np.ndarray, fps: float, cut_start: int = 0, cut_end: int = -1) -> int:
    """available_frames of a variable-rate video: the clip frames at 1 / fps steps from the cut's first frame's
    time to its last one's."""
    end = len(times) if cut_end < 0 else min(cut_end, len(times))
    if cut_start >= end:
        raise ClipRejected("too_short", f"cut starts at frame {cut_start}, video has {len(times)}")
    return int((times[end - 1] - times[cut_start]) * fps + 1e-6) + 1


def timed_plan(times: np.ndarray, fps: float, n: int, cut_start: int = 0) -> ClipPlan:
    """plan_clip of a variable-rate video, by time: clip frame i shows the source frame on screen at
    i / fps after the cut's first frame (the last one that started by then)."""
    targets = times[cut_start] + np.arange(n) / fps + 1e-6
    return ClipPlan([int(i) for i in np.searchsorted(times, targets, side="right") - 1])


def resize_crop_box(src_h: int, src_w: int, h: int, w: int) -> tuple[int, int, int, int]:
    """(resized_h, resized_w, top, left): scale to cover h x w keeping aspect, then center-crop."""
    scale = max(h / src_h, w / src_w)
    rh, rw = max(h, round(src_h * scale)), max(w, round(src_w * scale))
    return rh, rw, (rh - h) // 2, (rw - w) // 2


def resize_crop(frames: np.ndarray, h: int, w: int) -> np.ndarray:
    """(T, H, W, 3) uint8 -> (T, h, w, 3) uint8, bilinear with antialiasing (a no-op resize when
    the frames already cover h x w exactly, as decode_clip asks decord to scale them)."""
    rh, rw, top, left = resize_crop_box(frames.shape[1], frames.shape[2], h, w)
    return np.ascontiguousarray(resize(frames, rh, rw)[:, top : top + h, left : left + w])


def resize(frames: np.ndarray, h: int, w: int) -> np.ndarray:
    """(T, H, W, 3) uint8 -> (T, h, w, 3) uint8, bilinear with antialiasing; the frames themselves at their size."""
    if frames.shape[1:3] == (h, w):
        return frames
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=(h, w), mode="bilinear", antialias=True, align_corners=False)
    return x.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


# Container signatures: (offset, magic). A file with one of these that still fails to
# open is a damaged video (e.g. an mp4 cut off before its moov atom); without, not a video.
_MAGIC = ((4, b"ftyp"), (0, b"\x1aE\xdf\xa3"), (0, b"RIFF"), (0, b"\x00\x00\x01\xba"), (0, b"OggS"), (0, b"FLV"))


def looks_like_video(path: str) -> bool:
    with open(path, "rb") as f:
        head = f.read(16)
    return any(head[o : o + len(m)] == m for o, m in _MAGIC)


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__


@dataclass(frozen=True)
class DecodedClip:
    frames: np.ndarray
    """(T, h, w, 3) uint8 at the bucket's size."""
    plan: ClipPlan
    src_fps: float
    bucket: Bucket
    source_size: tuple[int, int]
    """(height, width) of the source video."""
    source_seconds: float = 0.0
    """Duration of the source within its cut (0 for an image)."""
    cut: tuple[int, int] = (0, 1)
    """Source frames [start, end) of the cut the clip is taken from (an image: its one frame)."""


def frame_size(path: str) -> tuple[int, int, bool]:
    """(height, width, rotated) of the first video stream as it is shown: a phone's portrait video is stored
    landscape with a display rotation of 90 degrees, which decord applies to the frames it returns (PyAV: the
    container header, and the first frame for its rotation)."""
    import av

    with av.open(path) as container:
        stream = container.streams.video[0]
        h, w = stream.codec_context.height, stream.codec_context.width
        first = next(container.decode(stream), None)
    return (w, h, True) if first is not None and round(first.rotation) % 180 == 90 else (h, w, False)


def read_frames(reader, indices: list[int], h: int, w: int, fit) -> np.ndarray:
    """`fit(frames, h, w)` of the reader's frames at `indices`, CHUNK at a time. A rotated video is read at its
    full size and scaled here: decord's own scaling squeezes it into the stored orientation, or fails."""
    return np.concatenate(
        [fit(reader.get_batch(indices[i : i + CHUNK]).asnumpy(), h, w) for i in range(0, len(indices), CHUNK)]
    )


CHUNK = 8
"""Frames decoded at once: a rotated 4K video's are read at full size (25 MB each)."""


@contextlib.contextmanager
def local_file(path: str) -> Iterator[str]:
    """`path` (local, or an object-store URI: wanray.storage) as a local file the decoders can open; a missing
    or empty file, or a store that refuses the read, is a named reject before any decoder sees it."""
    with contextlib.ExitStack() as stack:
        try:
            local = stack.enter_context(storage.local_copy(path))
            size = os.path.getsize(local)
        except FileNotFoundError:
            raise ClipRejected("file_not_found", path) from None
        except OSError as e:  # pyarrow's S3, GCS and HDFS errors: access denied, no such bucket, network
            raise ClipRejected("storage_error", _first_line(e)) from None
        if size == 0:
            raise ClipRejected("empty_file", path)
        yield local


def unreadable(path: str, e: Exception) -> ClipRejected:
    """The reject for a video file a decoder failed to open: damaged, or no video at all."""
    return ClipRejected("corrupt_video" if looks_like_video(path) else "not_a_video", _first_line(e))


def decode_clip(path: str, buckets: BucketSet, fps: float, cut_start: int = 0, cut_end: int = -1) -> DecodedClip:
    """Decode the clip of `path` into its bucket (raises ClipRejected with a named reason)."""
    with local_file(path) as local:
        return _decode_clip(local, buckets, fps, cut_start, cut_end)


def _decord():
    """decord, or a one-line error where it is not installed: it publishes x86_64 wheels only (pyproject.toml's
    marker leaves it out on aarch64, e.g. Kunpeng Ascend hosts), so decode on x86_64 CPU nodes."""
    try:
        import decord
    except ModuleNotFoundError:
        from wanray.errors import ConfigError

        raise ConfigError(
            "decord is not installed on this node (it has x86_64 wheels only): run video decoding on x86_64 CPU "
            "nodes (Ray schedules preprocessing's decode tasks on any node with free CPUs)"
        ) from None
    return decord


def _decode_clip(path: str, buckets: BucketSet, fps: float, cut_start: int, cut_end: int) -> DecodedClip:
    decord = _decord()

    try:
        src_h, src_w, rotated = frame_size(path)
    except Exception as e:  # PyAV raises with ffmpeg's message
        raise unreadable(path, e) from None
    resolution = buckets.resolution(src_h, src_w, video=True)
    if resolution is None:
        raise ClipRejected("no_video_bucket", f"data.buckets holds still images only ({buckets.describe()})")
    height, width = resolution
    try:
        rh, rw, _, _ = resize_crop_box(src_h, src_w, height, width)
        scale = {} if rotated or (rh, rw) == (src_h, src_w) else {"height": rh, "width": rw}
        reader = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=1, **scale)
        src_frames, src_fps = len(reader), reader.get_avg_fps()
    except Exception as e:  # PyAV and decord raise with ffmpeg's message
        raise unreadable(path, e) from None
    try:
        times = variable_rate_times(reader, src_fps)
    except Exception as e:  # decord's index of the frames' timestamps
        raise unreadable(path, e) from None
    if times is None:
        available = available_frames(src_fps, src_frames, fps, cut_start, cut_end)
    else:
        available = timed_available(times, fps, cut_start, cut_end)
    n = buckets.frames((height, width), available)
    if n is None:
        shortest = min(f for f in buckets.frames_by_resolution[(height, width)] if f > 1)
        rate = f"{src_fps:g} fps" if times is None else f"a variable rate ({src_fps:g} fps on average)"
        raise ClipRejected(
            "too_short", f"{src_frames} frames at {rate} give {available} at {fps:g} fps, need {shortest}"
        )
    if times is None:
        plan = plan_clip(src_fps, src_frames, fps, n, n, cut_start, cut_end)
    else:
        plan = timed_plan(times, fps, n, cut_start)
    try:
        frames = read_frames(reader, list(plan.indices), height, width, resize_crop)
    except Exception as e:
        raise ClipRejected("decode_error", _first_line(e)) from None
    if frames.shape[0] != len(plan.indices) or frames.ndim != 4:
        raise ClipRejected("decode_error", f"got frames of shape {frames.shape} for {len(plan.indices)} indices")
    end = src_frames if cut_end < 0 else min(cut_end, src_frames)
    return DecodedClip(
        frames,
        plan,
        src_fps,
        Bucket(height, width, n),
        (src_h, src_w),
        (end - cut_start) / src_fps,
        (cut_start, end),
    )


def sample_frames(path: str, count: int, size: int, cut_start: int = 0, cut_end: int = -1, square=True) -> np.ndarray:
    """(count, h, w, 3) uint8: `count` frames evenly spread over the cut, scaled while decord decodes them:
    squeezed to size x size (for hashing: nothing of the clip's framing matters), or with `square` False to
    their longer side `size` (never up). Raises ClipRejected."""
    with local_file(path) as local:
        return _sample_frames(local, count, size, cut_start, cut_end, square)


def _sample_frames(path: str, count: int, size: int, cut_start: int, cut_end: int, square: bool) -> np.ndarray:
    decord = _decord()

    try:
        src_h, src_w, rotated = frame_size(path)
        if square:
            h, w = size, size
        else:
            scale = min(1.0, size / max(src_h, src_w))
            h, w = max(2, round(src_h * scale)), max(2, round(src_w * scale))
        reader = decord.VideoReader(
            path, ctx=decord.cpu(0), num_threads=1, **({} if rotated else {"width": w, "height": h})
        )
        end = len(reader) if cut_end < 0 else min(cut_end, len(reader))
    except Exception as e:
        raise unreadable(path, e) from None
    if end <= cut_start:
        raise ClipRejected("too_short", f"cut starts at frame {cut_start}, video has {len(reader)}")
    indices = np.linspace(cut_start, end - 1, count).round().astype(int).tolist()
    try:
        return read_frames(reader, indices, h, w, resize)
    except Exception as e:
        raise ClipRejected("decode_error", _first_line(e)) from None


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
# PNG, JPEG and WebP signatures: a file with one that PIL cannot read is a damaged image.
_IMAGE_MAGIC = ((0, b"\x89PNG"), (0, b"\xff\xd8\xff"), (8, b"WEBP"))


def is_image(path: str) -> bool:
    return path.lower().endswith(IMAGE_SUFFIXES)


def open_image(path: str):
    """The image at `path` as a decoded RGB PIL image; raises ClipRejected with a named reason."""
    with local_file(path) as local:
        return _open_image(local)


def _open_image(path: str):
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as opened:  # upright as shown (a phone's EXIF orientation), then whole: a
            return ImageOps.exif_transpose(opened).convert("RGB")  # truncated file fails here
    except Exception as e:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, ...
        with open(path, "rb") as f:
            head = f.read(16)
        damaged = any(head[o : o + len(m)] == m for o, m in _IMAGE_MAGIC)
        raise ClipRejected("corrupt_image" if damaged else "not_an_image", _first_line(e)) from None


def decode_image(path: str, buckets: BucketSet) -> DecodedClip:
    """A still image as a one-frame clip at the resolution of its aspect ratio (Wan trains on images
    as 1-frame videos); raises ClipRejected with a named reason."""
    from PIL import Image

    img = open_image(path)
    src_w, src_h = img.size
    resolution = buckets.resolution(src_h, src_w)
    assert resolution is not None  # a bucket set holds a resolution
    height, width = resolution
    rh, rw, top, left = resize_crop_box(src_h, src_w, height, width)
    if (rh, rw) != (src_h, src_w):
        img = img.resize((rw, rh), Image.Resampling.BICUBIC, reducing_gap=3.0)
    frame = np.asarray(img.crop((left, top, left + width, top + height)), dtype=np.uint8)
    return DecodedClip(frame[None], ClipPlan([0]), 0.0, Bucket(height, width, 1), (src_h, src_w))


def motion(frames: np.ndarray) -> float:
    """Mean absolute difference between consecutive frames, 0-255 scale (0 for a single frame)."""
    if len(frames) < 2:
        return 0.0
    return float(np.mean([np.abs(a.astype(np.int16) - b).mean() for a, b in zip(frames[1:], frames[:-1])]))


def curate(clip: DecodedClip, d) -> None:
    """The optional data.min_* filters (off at 0), each a named reject."""
    if d.min_resolution and min(clip.source_size) < d.min_resolution:
        raise ClipRejected(
            "below_min_resolution",
            f"{clip.source_size[0]}x{clip.source_size[1]}, the shorter side must be at least {d.min_resolution}",
        )
    if clip.bucket.frames == 1:  # an image: duration and motion do not apply
        return
    if d.min_seconds and clip.source_seconds < d.min_seconds:
        raise ClipRejected("below_min_duration", f"{clip.source_seconds:.2f}s, need {d.min_seconds:g}s")
    if d.min_motion and (m := motion(clip.frames)) < d.min_motion:
        raise ClipRejected("static_clip", f"mean frame difference {m:.2f}, need {d.min_motion:g}")


def decode_source(row: dict, cfg: Config, out_dir: str, kind: ModelKind) -> list[dict]:
    """The decode stage (a Ray Data flat_map): a ClipSource row (plus `seq`, its place in the run, kept
    in the output) -> [clip row with frames], or [] after recording the reject in `out_dir`. `kind`: the
    model the clips are for (its sizes, wanray.buckets)."""
    row = dict(row)
    seq = row.pop("seq", 0)
    src = ClipSource(**row)
    d = cfg.data
    buckets = BucketSet.from_config(d, kind)
    try:
        if is_image(src.path) and kind.image == "required":
            # its first-frame condition would be the still itself, so the loss gives the answer away
            raise ClipRejected("still_for_image_to_video", f"{kind.title} trains on videos only")
        clip = (
            decode_image(src.path, buckets)
            if is_image(src.path)
            else decode_clip(src.path, buckets, d.fps, src.cut_start, src.cut_end)
        )
        curate(clip, d)
    except ClipRejected as e:
        record_reject(out_dir, Reject(src.path, e.reason, e.detail), key=src.id)
        return []
    b = clip.bucket
    return [
        {
            "id": src.id,
            "source": src.path,
            "caption": src.caption,
            "fps": np.float32(d.fps),
            "num_frames": np.int32(b.frames),
            "height": np.int32(b.height),
            "width": np.int32(b.width),
            "bucket": b.name,
            "source_height": np.int32(clip.source_size[0]),
            "source_width": np.int32(clip.source_size[1]),
            "clip_start": np.int32(clip.plan.start),
            "cut_start": np.int32(clip.cut[0]),
            "cut_end": np.int32(clip.cut[1]),
            # NaN for a still (Ray Data blocks keep one column type); the shard stores it as null
            "motion": np.float32("nan" if b.frames == 1 else curation_motion(clip.frames)),
            "caption_model": src.caption_model,  # "" for the manifest's caption: stored as null
            "frames": clip.frames,
            "seq": np.int32(seq),
        }
    ]
