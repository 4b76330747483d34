"""Aspect-ratio and duration buckets: which shape each clip is stored at.

A bucket is a resolution (multiples of the model's size multiple: 16 pixels per DiT token side for
the A14B models, 32 for TI2V-5B's 16x VAE) and a frame count (4n+1, or 1 for a still image).
Preprocessing gives each clip the resolution whose aspect ratio is nearest its own (so a
portrait video stays portrait and the crop is as small as the set allows), then the longest
frame count of that resolution the clip holds. Three ways to say which buckets there are:

- nothing (the default): one resolution, data.height x data.width, and every 4n+1 frame count
  from data.min_frames to data.num_frames (one fixed size when they are equal: the MindSpeed recipe);
- data.buckets: an explicit list of "HxWxF" shapes;
- data.bucket_budget: a token budget (480x832x81 = 21 x 30 x 52 = 32,760): for each aspect ratio of
  ASPECT_RATIOS the largest resolution whose tokens per latent frame fit budget / latent frames of
  data.num_frames, and frame counts from data.num_frames down to data.min_frames in steps of a quarter
  of the latent frames; every bucket is at most the budget.

Tokens of a bucket: latent frames ((F - 1) / 4 + 1) x height/m x width/m, m the size multiple (VAE 8x
and patch 2x2: 16; TI2V-5B's VAE 16x: 32): wanray.wan owns these numbers, and a bucket set is always for
one model kind.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from wanray.errors import ConfigError
from wanray.wan import VAE_STRIDE_TEMPORAL, ModelKind, latent_frames, valid_frames

ASPECT_RATIOS = ((9, 16), (2, 3), (3, 4), (1, 1), (4, 3), (3, 2), (16, 9))
"""(height, width) proportions of the generated set: landscape 16:9 to portrait 9:16."""
ASPECT_TOLERANCE = 1.05
"""A generated resolution's aspect ratio is within 5% of its target."""


def parse_shape(text: str, where: str = "data.buckets") -> tuple[int, int, int]:
    """(height, width, frames) of "HEIGHTxWIDTHxFRAMES", checked as far as every model agrees: positive
    sizes, 4n+1 frames."""
    try:
        h, w, f = (int(v) for v in str(text).lower().split("x"))
    except ValueError:
        raise ConfigError(f"{where}: {text!r} is not HEIGHTxWIDTHxFRAMES (e.g. 480x832x81)") from None
    if h <= 0 or w <= 0:
        raise ConfigError(f"{where}: {text!r}: height and width must be positive")
    if not valid_frames(f):
        raise ConfigError(f"{where}: {text!r}: frames must be 4n+1 (1 for still images)")
    return h, w, f


@dataclass(frozen=True, order=True)
class Bucket:
    height: int
    width: int
    frames: int

    @property
    def name(self) -> str:
        return f"{self.height}x{self.width}x{self.frames}"

    def tokens(self, kind: ModelKind) -> int:
        """DiT tokens of a clip of this shape for a model of `kind`."""
        return kind.tokens(self.frames, self.height, self.width)

    @classmethod
    def parse(cls, text: str, kind: ModelKind, where: str = "data.buckets") -> Bucket:
        """A bucket of `kind`: its sizes multiples of the kind's size multiple."""
        h, w, f = parse_shape(text, where)
        m = kind.size_multiple
        if h % m or w % m:
            raise ConfigError(f"{where}: {text!r}: height and width must be multiples of {m} for {kind.title}")
        return cls(h, w, f)


def _resolution(aspect_hw: tuple[int, int], patches: int, multiple: int) -> tuple[int, int]:
    """The largest height x width (multiples of `multiple`) of aspect h:w within 5% with at most
    `patches` tokens of multiple x multiple pixels."""
    ah, aw = aspect_hw
    best = None
    for h16 in range(1, patches + 1):
        for w16 in {min(patches // h16, math.floor(h16 * aw / ah)), min(patches // h16, math.ceil(h16 * aw / ah))}:
            if not 1 <= w16 <= patches // h16:
                continue
            err = abs(math.log((w16 / h16) / (aw / ah)))
            if err <= math.log(ASPECT_TOLERANCE) and (
                best is None or (h16 * w16, -err) > (best[0] * best[1], -best[2])
            ):
                best = (h16, w16, err)
    if best is None:
        raise ConfigError(f"data.bucket_budget is too small for aspect ratio {ah}:{aw}")
    return best[0] * multiple, best[1] * multiple


def frame_counts(most: int, least: int) -> list[int]:
    """Generated frame counts: from `most` down to `least` in steps of a quarter of the latent frames."""
    top, bottom = latent_frames(most), latent_frames(least)
    step = max(1, top // 4)
    latent = list(range(top, bottom - 1, -step))
    if latent[-1] != bottom:
        latent.append(bottom)
    return [VAE_STRIDE_TEMPORAL * (t - 1) + 1 for t in latent]


@dataclass(frozen=True)
class BucketSet:
    """The buckets of a data config for a model of one kind; `resolution` and `frames` place a clip."""

    frames_by_resolution: dict[tuple[int, int], tuple[int, ...]]
    """(height, width) -> its frame counts, descending."""
    kind: ModelKind
    """The model the clips are for: its size multiple and token count (wanray.wan)."""

    @classmethod
    def from_config(cls, d, kind: ModelKind) -> BucketSet:
        """From data.* for a model of `kind` (see the module docstring); ConfigError for a set that
        cannot work (data.DataConfig has checked what holds for every model)."""
        if d.buckets:
            buckets = [Bucket.parse(b, kind) for b in d.buckets]
        elif d.bucket_budget:
            patches = d.bucket_budget // latent_frames(d.num_frames)
            counts = frame_counts(d.num_frames, d.min_frames)
            buckets = [Bucket(*_resolution(a, patches, kind.size_multiple), f) for a in ASPECT_RATIOS for f in counts]
        else:
            m = kind.size_multiple
            if d.height % m or d.width % m:
                raise ConfigError(
                    f"data.height and data.width must be multiples of {m} for {kind.title}, got {d.height}x{d.width}"
                )
            return cls.fixed(d.height, d.width, d.num_frames, d.min_frames, kind)
        return cls.of(buckets, kind)

    @classmethod
    def fixed(cls, height: int, width: int, most: int, least: int, kind: ModelKind) -> BucketSet:
        """One resolution, every 4n+1 frame count from `least` to `most`."""
        return cls.of([Bucket(height, width, f) for f in range(most, least - 1, -VAE_STRIDE_TEMPORAL)], kind)

    @classmethod
    def of(cls, buckets: list[Bucket], kind: ModelKind) -> BucketSet:
        table: dict[tuple[int, int], set[int]] = {}
        for b in buckets:
            table.setdefault((b.height, b.width), set()).add(b.frames)
        return cls({r: tuple(sorted(f, reverse=True)) for r, f in sorted(table.items())}, kind)

    @property
    def buckets(self) -> list[Bucket]:
        return [Bucket(h, w, f) for (h, w), counts in self.frames_by_resolution.items() for f in counts]

    @property
    def max_tokens(self) -> int:
        return max(b.tokens(self.kind) for b in self.buckets)

    def resolution(self, src_height: int, src_width: int, video: bool = False) -> tuple[int, int] | None:
        """The resolution whose aspect ratio is nearest the source's (log ratio; ties to the larger); for a
        `video`, of those with a video frame count (None: data.buckets gives only still images)."""
        aspect = math.log(src_width / src_height)
        fits = [r for r, counts in self.frames_by_resolution.items() if not video or max(counts) > 1]
        return min(fits, key=lambda r: (abs(math.log(r[1] / r[0]) - aspect), -r[0] * r[1]), default=None)

    def frames(self, resolution: tuple[int, int], available: int) -> int | None:
        """The longest video frame count of `resolution` that `available` frames hold (None: too short).
        A still image is always one frame, at the resolution of its aspect ratio."""
        return next((f for f in self.frames_by_resolution[resolution] if 1 < f <= available), None)

    def describe(self) -> str:
        return ", ".join(f"{h}x{w} ({'/'.join(map(str, f))} frames)" for (h, w), f in self.frames_by_resolution.items())
