"""Generated frames as the bytes a user receives: an H.264 mp4, or the raw float frames as .npy."""

from __future__ import annotations

import io
import tempfile
from pathlib import Path

import numpy as np

from wanray.io import write_mp4


def to_uint8(frames: np.ndarray) -> np.ndarray:
    """(F, H, W, 3) float in [0, 1] -> uint8, as diffusers' export_to_video does."""
    return (np.clip(frames, 0.0, 1.0) * 255).astype(np.uint8)


def mp4_bytes(frames: np.ndarray, fps: float) -> bytes:
    """(F, H, W, 3) float frames in [0, 1] -> an mp4 (libx264, yuv420p)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "video.mp4"
        write_mp4(path, to_uint8(frames), round(fps))
        return path.read_bytes()


def npy_bytes(frames: np.ndarray) -> bytes:
    """Raw float32 frames in .npy format: `np.load(io.BytesIO(data))` gives them back exactly."""
    buf = io.BytesIO()
    np.save(buf, frames.astype(np.float32, copy=False))
    return buf.getvalue()
