"""Optical-flow motion of a clip (OpenCV's Farneback flow; no torch), shared by preprocessing's `motion`
column and the video scores (wanray.infer.scores).

The flow runs on frames projected on the colour axes of the video's strongest edges (`edge_axes`), not on
luminance: luminance flattens an edge between two colours of about equal luminance, and its motion with it
(a blue square moving on olive read as still)."""

from __future__ import annotations

import numpy as np

CURATION_WIDTH = 256
"""Preprocessing measures a clip's motion on copies this many pixels wide (the `motion` column)."""
CURATION_PAIRS = 8
"""... between at most this many pairs of consecutive frames, spread evenly over the clip."""
LUMINANCE = np.array([0.299, 0.587, 0.114])
SECOND_AXIS = 0.01
"""The second colour axis gets a flow of its own where its edges hold at least this share of the first's."""
WINDOW = 15
"""The side of the window over which each axis's edge energy is compared: Farneback's own window."""

Axes = list[tuple[np.ndarray, float]]


def as_uint8(frames: np.ndarray) -> np.ndarray:
    """(F, H, W, 3) frames, float in [0, 1] (the sampler's) or uint8, as uint8."""
    if frames.dtype == np.uint8:
        return frames
    return (np.clip(frames, 0.0, 1.0) * 255).round().astype(np.uint8)


def edge_axes(video: np.ndarray) -> Axes:
    """(weights, offset) per colour axis the optical flow runs on, each turning a colour pixel of (F, H, W, 3)
    uint8 frames into one channel, `pixel @ weights + offset`: the two colour axes along which the video's
    edges are strongest (the top eigenvectors of its neighbouring pixels' colour differences, in up to 8
    frames; the second only where its edges hold SECOND_AXIS of the first's), weights scaled to sum to 1 in
    magnitude and offset into 0-255, so a grey video has one axis and keeps its values; no edge at all:
    luminance. The strongest axis alone flattens an object whose colours differ across it (red moving on
    green among black and white stripes)."""
    picked = video[np.unique(np.linspace(0, len(video) - 1, min(8, len(video))).round().astype(int))]
    picked = picked.astype(np.float64)
    diffs = np.concatenate([np.diff(picked, axis=1).reshape(-1, 3), np.diff(picked, axis=2).reshape(-1, 3)])
    values, vectors = np.linalg.eigh(diffs.T @ diffs)  # ascending
    if values[-1] <= 0:
        axes = [LUMINANCE]
    else:
        axes = [vectors[:, -1]] + ([vectors[:, -2]] if values[-2] >= SECOND_AXIS * values[-1] else [])
    out = []
    for axis in axes:
        weights = (axis if axis.sum() >= 0 else -axis) / np.abs(axis).sum()
        out.append((weights.astype(np.float32), float(255.0 * -weights[weights < 0].sum())))
    return out


def project(frame: np.ndarray, axes: Axes) -> list[np.ndarray]:
    """A (H, W, 3) uint8 frame on each axis: (H, W) uint8 images, the flow's input."""
    f = frame.astype(np.float32)
    return [(f @ w + np.float32(o)).round().clip(0, 255).astype(np.uint8) for w, o in axes]


def colour_flow(this: list[np.ndarray], following: list[np.ndarray]) -> np.ndarray:
    """(H, W, 2) optical flow between two frames projected on the same axes (`project`): with two axes, each
    pixel's is that of the axis with more edge energy around it in the first frame."""
    import cv2

    flows = [farneback(a, b) for a, b in zip(this, following, strict=True)]
    if len(flows) == 1:
        return flows[0]
    energy = [
        cv2.boxFilter(cv2.Sobel(g, cv2.CV_32F, 1, 0) ** 2 + cv2.Sobel(g, cv2.CV_32F, 0, 1) ** 2, -1, (WINDOW,) * 2)
        for g in this
    ]
    return np.where((energy[1] > energy[0])[..., None], flows[1], flows[0])


def flow_motion(frames: np.ndarray, width: int | None = None, pairs: int | None = None) -> float:
    """Mean optical-flow magnitude (pixels per frame, `colour_flow`) between consecutive frames; 0 for a
    still. `width`: measured on copies resized to that width; `pairs`: on at most that many pairs, evenly
    spaced."""
    import cv2

    frames = as_uint8(frames)
    starts = list(range(len(frames) - 1))
    if pairs is not None and len(starts) > pairs:
        starts = [starts[round(i * (len(starts) - 1) / (pairs - 1))] for i in range(pairs)] if pairs > 1 else [0]
    if not starts:
        return 0.0

    def resized(f: np.ndarray) -> np.ndarray:
        if width is None or f.shape[1] == width:
            return f
        return cv2.resize(f, (width, max(1, round(f.shape[0] * width / f.shape[1]))), interpolation=cv2.INTER_AREA)

    used = {i: resized(frames[i]) for i in sorted({i for s in starts for i in (s, s + 1)})}
    axes = edge_axes(np.stack(list(used.values())))
    projected = {i: project(f, axes) for i, f in used.items()}
    magnitudes = [float(np.linalg.norm(colour_flow(projected[i], projected[i + 1]), axis=-1).mean()) for i in starts]
    return float(np.mean(magnitudes))


def farneback(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(H, W, 2) optical flow from grayscale frame a to b: a(x) matches b(x + flow(x))."""
    import cv2

    return cv2.calcOpticalFlowFarneback(a, b, None, 0.5, 3, 15, 3, 5, 1.2, 0)


def curation_motion(frames: np.ndarray) -> float:
    """The `motion` column of a preprocessed clip."""
    return flow_motion(frames, CURATION_WIDTH, CURATION_PAIRS)
