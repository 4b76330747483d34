"""Optical-flow motion of a clip (OpenCV's Farneback flow on grayscale frames; no torch)."""

from __future__ import annotations

import numpy as np

CURATION_WIDTH = 256
"""Preprocessing measures a clip's motion on copies this many pixels wide (the `motion` column)."""
CURATION_PAIRS = 8
"""... between at most this many pairs of consecutive frames, spread evenly over the clip."""


def as_uint8(frames: np.ndarray) -> np.ndarray:
    """(F, H, W, 3) frames, float in [0, 1] (the sampler's) or uint8, as uint8."""
    if frames.dtype == np.uint8:
        return frames
    return (np.clip(frames, 0.0, 1.0) * 255).round().astype(np.uint8)


def flow_motion(frames: np.ndarray, width: int | None = None, pairs: int | None = None) -> float:
    """Mean Farneback optical-flow magnitude (pixels per frame) between consecutive frames; 0 for a still.
    `width`: measured on copies resized to that width; `pairs`: on at most that many pairs, evenly spaced."""
    import cv2

    frames = as_uint8(frames)
    starts = list(range(len(frames) - 1))
    if pairs is not None and len(starts) > pairs:
        starts = [starts[round(i * (len(starts) - 1) / (pairs - 1))] for i in range(pairs)] if pairs > 1 else [0]

    def gray(f: np.ndarray) -> np.ndarray:
        g = cv2.cvtColor(f, cv2.COLOR_RGB2GRAY)
        if width is None or g.shape[1] == width:
            return g
        return cv2.resize(g, (width, max(1, round(g.shape[0] * width / g.shape[1]))), interpolation=cv2.INTER_AREA)

    flows = (farneback(gray(frames[i]), gray(frames[i + 1])) for i in starts)
    magnitudes = [float(np.linalg.norm(flow, axis=-1).mean()) for flow in flows]
    return float(np.mean(magnitudes)) if magnitudes else 0.0


def farneback(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(H, W, 2) optical flow from grayscale frame a to b: a(x) matches b(x + flow(x))."""
    import cv2

    return cv2.calcOpticalFlowFarneback(a, b, None, 0.5, 3, 15, 3, 5, 1.2, 0)


def curation_motion(frames: np.ndarray) -> float:
    """The `motion` column of a preprocessed clip."""
    return flow_motion(frames, CURATION_WIDTH, CURATION_PAIRS)
