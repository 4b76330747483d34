"""A synthetic captioned video set: coloured shapes moving over a background.

Each clip is a real H.264 mp4 (written with PyAV) with its own size, frame rate and
length, and a caption that says what moves where, so a model trained on it has
something learnable. Output is a MindSpeed-MM style `data.txt` + annotation JSON.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from wanray.io import write_mp4

COLORS = {
    "red": (220, 40, 40),
    "green": (40, 200, 70),
    "blue": (40, 80, 230),
    "yellow": (240, 220, 40),
    "white": (245, 245, 245),
    "purple": (150, 60, 200),
}
BACKGROUNDS = {"black": (10, 10, 10), "gray": (110, 110, 110), "navy": (20, 30, 80), "olive": (90, 100, 30)}
SHAPES = ("circle", "square")
MOTIONS = {"left to right": (1, 0), "right to left": (-1, 0), "top to bottom": (0, 1), "bottom to top": (0, -1)}
SIZES = ((96, 160), (128, 128), (72, 128), (160, 96), (120, 208))
FPS = (8, 12, 16, 24, 30)


@dataclass(frozen=True)
class SyntheticClip:
    name: str
    caption: str
    height: int
    width: int
    fps: int
    num_frames: int
    shape: str
    color: str
    background: str
    motion: str


def render(clip: SyntheticClip) -> np.ndarray:
    """(frames, height, width, 3) uint8 frames of the clip."""
    h, w = clip.height, clip.width
    yy, xx = np.mgrid[0:h, 0:w]
    r = max(4, min(h, w) // 6)
    dx, dy = MOTIONS[clip.motion]
    frames = np.empty((clip.num_frames, h, w, 3), np.uint8)
    for i in range(clip.num_frames):
        f = i / max(1, clip.num_frames - 1)
        cx = w / 2 + dx * (f - 0.5) * (w - 2 * r)
        cy = h / 2 + dy * (f - 0.5) * (h - 2 * r)
        if clip.shape == "circle":
            mask = (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
        else:
            mask = (abs(xx - cx) <= r) & (abs(yy - cy) <= r)
        frames[i] = BACKGROUNDS[clip.background]
        frames[i][mask] = COLORS[clip.color]
    return frames


def make_clips(count: int, seed: int = 0, min_seconds: float = 1.2, max_seconds: float = 2.5) -> list[SyntheticClip]:
    rng = random.Random(seed)
    clips = []
    for i in range(count):
        h, w = rng.choice(SIZES)
        fps = rng.choice(FPS)
        shape, color, bg = rng.choice(SHAPES), rng.choice(list(COLORS)), rng.choice(list(BACKGROUNDS))
        motion = rng.choice(list(MOTIONS))
        n = max(2, round(fps * rng.uniform(min_seconds, max_seconds)))
        caption = f"a {color} {shape} moving {motion} on a {bg} background"
        clips.append(SyntheticClip(f"video{i:06d}.mp4", caption, h, w, fps, n, shape, color, bg, motion))
    return clips


def write_dataset(root, count: int = 16, seed: int = 0) -> Path:
    """Write `count` clips under root/videos, root/data.json and root/data.txt; return data.txt."""
    root = Path(root)
    (root / "videos").mkdir(parents=True, exist_ok=True)
    annotation = []
    for clip in make_clips(count, seed):
        path = root / "videos" / clip.name
        if not path.exists():
            write_mp4(path, render(clip), clip.fps)
        annotation.append(
            {
                "path": f"videos/{clip.name}",
                "cap": clip.caption,
                "num_frames": clip.num_frames,
                "fps": clip.fps,
                "resolution": {"height": clip.height, "width": clip.width},
            }
        )
    (root / "data.json").write_text(json.dumps(annotation, indent=1))
    manifest = root / "data.txt"
    manifest.write_text(".,data.json\n")
    return manifest


def write_shots(path, frames_per_shot: list[int], seed: int = 0, size: tuple[int, int] = (96, 160), fps: int = 16):
    """A raw video of len(frames_per_shot) shots with hard cuts between them: each shot a synthetic clip of
    its own shape, colour, background and motion, all of one size and frame rate. Returns the clips."""
    rng = random.Random(seed)
    shots = []
    for i, n in enumerate(frames_per_shot):
        background = list(BACKGROUNDS)[i % len(BACKGROUNDS)]  # consecutive shots never share a background
        shape, color, motion = rng.choice(SHAPES), rng.choice(list(COLORS)), rng.choice(list(MOTIONS))
        caption = f"a {color} {shape} moving {motion} on a {background} background"
        shots.append(SyntheticClip(f"shot{i}", caption, *size, fps, n, shape, color, background, motion))
    write_mp4(path, np.concatenate([render(s) for s in shots]), fps)
    return shots
