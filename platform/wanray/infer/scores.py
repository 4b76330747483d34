"""Numbers for one generated video, beside the video itself: how well it shows its prompt, how steady it is,
how much moves and how sharp it is. Validation scores every video it renders (validations.jsonl, TensorBoard,
the Runs page); the same scorer rates each model of an evaluation.

- clip_score: the mean cosine similarity of the prompt's CLIP text embedding and the embeddings of `frames`
  frames sampled evenly from the video (transformers' CLIPModel, `eval.clip_model`; as CLIPScore, without its
  x100 and clipping at 0).
- temporal_consistency: the mean cosine similarity of consecutive sampled frames' CLIP image embeddings
  (flicker and sudden changes lower it).
- motion: the mean optical-flow magnitude between consecutive frames, in pixels per frame (OpenCV's
  Farneback flow, on the frames projected on the colour axes of their strongest edges: wanray.data.motion, the grey
  of a grey video): a distilled or collapsed model that stops moving shows here.
  Flicker and grain read as flow too, so more is not better: compare it with the base model's.
- sharpness: detail that stays from one frame to the next: the mean product of each frame's Laplacian (per
  RGB channel, 0-255 scale, OpenCV) and the next frame's, moved back along the optical flow between them,
  averaged over the channels. Blur lowers it, and so does noise: grain differs in every frame, so its products
  average out, where a plain Laplacian variance counts it as detail. Per channel, not on grayscale: an edge
  between two colours of about equal luminance (a blue square on olive) is detail, which grayscale reads as
  flat. A single frame (a still): its Laplacian's variance, averaged over the channels.

Without `eval.clip_model` the first two are left out (None); motion and sharpness need no model.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from wanray.data.motion import as_uint8, colour_flow, edge_axes, project

SCORES_VERSION = 3
"""Written beside every record of scores (validations.jsonl, an evaluation's metrics.json). Records without it
are version 1, whose sharpness was a plain Laplacian variance; version 2 took sharpness on grayscale and both
pixel scores' flow on luminance: other quantities under the same names."""
CHANGED_IN = {"sharpness": 3, "motion": 3}
"""The version each score last changed its meaning in."""


def comparable(scores: dict[str, float], version: int | None) -> dict[str, float]:
    """A record's `scores` as this version defines them: a score it holds from before that score's last
    change is left out."""
    return {k: v for k, v in scores.items() if (version or 1) >= CHANGED_IN.get(k, 1)}


@dataclass(frozen=True)
class VideoScores:
    motion: float
    sharpness: float
    clip_score: float | None = None
    temporal_consistency: float | None = None

    def as_dict(self) -> dict[str, float]:
        """The scores that were measured."""
        return {k: v for k, v in asdict(self).items() if v is not None}


def pixel_scores(frames: np.ndarray) -> tuple[float, float]:
    """(motion, sharpness) of (F, H, W, 3) frames, from one optical flow per pair of consecutive frames: with
    two colour axes (edge_axes), each pixel's flow is that of the axis with more edge energy around it in the
    first frame. Holds two frames' Laplacians at a time, not the video's."""
    import cv2

    video = as_uint8(frames)
    if len(video) == 0:
        return 0.0, 0.0
    axes = edge_axes(video)

    def laplacian(i: int) -> np.ndarray:  # (H, W, 3): each channel's
        return cv2.Laplacian(video[i].astype(np.float32), cv2.CV_32F)

    if len(video) < 2:
        return 0.0, float(laplacian(0).var(axis=(0, 1)).mean())
    h, w = video.shape[1:3]
    ys, xs = np.mgrid[0:h, 0:w]
    grid = np.stack([xs, ys], axis=-1).astype(np.float32)  # (x, y) of every pixel
    moved, kept = [], []
    this, this_laplacian = project(video[0], axes), laplacian(0)
    for i in range(len(video) - 1):
        following_frame, next_laplacian = project(video[i + 1], axes), laplacian(i + 1)
        flow = colour_flow(this, following_frame)
        moved.append(float(np.linalg.norm(flow, axis=-1).mean()))
        at = grid + flow  # where each pixel of frame i is in frame i + 1 (Lanczos: a bilinear sample between
        # pixels would blur the Laplacian, -27% at half a pixel a frame, and read slow motion as blur)
        following = cv2.remap(
            next_laplacian, at[..., 0], at[..., 1], cv2.INTER_LANCZOS4, borderMode=cv2.BORDER_REPLICATE
        )
        kept.append(float((this_laplacian * following).mean()))
        this, this_laplacian = following_frame, next_laplacian
    return float(np.mean(moved)), float(np.mean(kept))


class VideoScorer:
    """Scores videos; loads the CLIP model (if any) once."""

    def __init__(self, clip_model: str = "", frames: int = 8, device: str | torch.device = "cpu"):
        self.frames, self.device = frames, torch.device(device)
        self.model = self.processor = None
        if clip_model:
            from transformers import CLIPModel, CLIPProcessor

            self.model = CLIPModel.from_pretrained(clip_model).to(self.device).eval()
            self.processor = CLIPProcessor.from_pretrained(clip_model)

    @torch.no_grad()
    def __call__(self, frames: np.ndarray, prompt: str) -> VideoScores:
        video = as_uint8(frames)
        scores = VideoScores(*pixel_scores(video))
        if self.model is None or self.processor is None:
            return scores
        picked = video[np.unique(np.linspace(0, len(video) - 1, min(self.frames, len(video))).round().astype(int))]
        inputs = self.processor(
            text=[prompt],
            images=list(picked),
            return_tensors="pt",
            padding=True,
            truncation=True,  # at the model's own length: a tokenizer may leave model_max_length unset
            max_length=self.model.config.text_config.max_position_embeddings,
        ).to(self.device)
        text = self.model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        image = self.model.get_image_features(pixel_values=inputs["pixel_values"])
        t = torch.nn.functional.normalize(text.pooler_output.float(), dim=-1)
        v = torch.nn.functional.normalize(image.pooler_output.float(), dim=-1)
        alignment = float((v @ t[0]).mean())
        consistency = float((v[1:] * v[:-1]).sum(-1).mean()) if len(v) > 1 else 1.0
        return VideoScores(scores.motion, scores.sharpness, alignment, consistency)


def mean_scores(scores: list[dict[str, float]]) -> dict[str, float]:
    """Each score's mean over the videos that have it."""
    keys = sorted({k for s in scores for k in s})
    return {k: float(np.mean([s[k] for s in scores if k in s])) for k in keys}
