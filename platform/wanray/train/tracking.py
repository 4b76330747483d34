"""Experiment tracking: TensorBoard event files in the run directory, local and offline.

    runs/<run>/<expert>/tensorboard/   scalars (every metrics.jsonl number), the resolved config (text),
                                       validation videos (animated GIFs, one per prompt, at their step)
    tensorboard --logdir runs/<run>    the curves and the videos, per expert

TensorBoard rather than MLflow: its event files are append-only files in the run directory, which
the training rank and the validation actor write side by side (one file each) with no server, no
database and nothing to lock; any TensorBoard, or an MLflow or W&B import of TensorBoard logs,
reads them. `train.tracker: none` turns it off.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

SCALARS = (
    "loss",
    "grad_norm",
    "lr",
    "samples_per_s",
    "tokens_per_s",
    "data_wait_fraction",
    "peak_memory_bytes",
    "val_loss",
)


class Tracker:
    """One writer of a run directory's event files; every method is a no-op for `none`."""

    def __init__(self, kind: str, run_dir, name: str):
        """name: which writer this is ("train", "validation"): its event file's suffix."""
        self.writer = None
        if kind == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"), filename_suffix=f".{name}")

    def text(self, tag: str, text: str, step: int = 0) -> None:
        if self.writer is not None:
            self.writer.add_text(tag, text, step)

    def scalars(self, metrics: dict) -> None:
        if self.writer is None:
            return
        for key in SCALARS:
            if isinstance(metrics.get(key), (int, float)):
                self.writer.add_scalar(f"train/{key}", metrics[key], metrics["step"])
        for band, value in metrics.get("val_loss_bands", {}).items():
            self.writer.add_scalar(f"train/val_loss_{band}", value, metrics["step"])
        self.writer.flush()

    def scalar(self, tag: str, value: float, step: int) -> None:
        if self.writer is not None:
            self.writer.add_scalar(tag, value, step)
            self.writer.flush()

    def video(self, tag: str, frames: np.ndarray, step: int, fps: float) -> None:
        """(F, H, W, 3) float frames in [0, 1] as an animated GIF (TensorBoard's images tab plays it)."""
        if self.writer is None:
            return
        from PIL import Image
        from tensorboard.compat.proto.summary_pb2 import Summary

        images = [Image.fromarray((np.clip(f, 0, 1) * 255).round().astype(np.uint8)) for f in frames]
        gif = io.BytesIO()
        images[0].save(gif, format="GIF", save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)
        h, w = frames.shape[1:3]
        image = Summary.Image(height=h, width=w, colorspace=3, encoded_image_string=gif.getvalue())
        summary = Summary(value=[Summary.Value(tag=tag, image=image)])  # add_image takes no animated GIF
        self.writer.file_writer.add_summary(summary, step)  # type: ignore[attr-defined]  # open while writing
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
