"""An aesthetic score per clip: a CLIP-based predictor, as a Ray Data actor pool after decoding.

The predictor is LAION's improved aesthetic predictor layout (github.com/christophschuhmann/improved-aesthetic-
predictor): an MLP on the L2-normalised CLIP image embedding, whose weights are `layers.{0,2,4,6,7}.weight/bias`
(Linear layers; the other indices are dropouts), e.g. sac+logos+ava1-l14-linearMSE.pth on CLIP ViT-L/14. The
directory data.aesthetic_model holds the CLIP model in transformers' layout and the head as HEAD_FILE (a LAION
.pth converts with `safetensors.torch.save_file(torch.load(pth), HEAD_FILE)`).
A clip's score is the head's mean over FRAMES frames spread over it, on the 1-10 scale the head was fitted to.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from wanray.errors import ConfigError
from wanray.model_files import AESTHETIC_HEAD_FILE as HEAD_FILE

FRAMES = 4


def load_head(model_dir) -> torch.nn.Sequential:
    """The MLP of `model_dir`/HEAD_FILE, its layer sizes read from the weights."""
    from safetensors.torch import load_file

    path = Path(model_dir) / HEAD_FILE
    if not path.is_file():
        raise ConfigError(f"data.aesthetic_model {model_dir} has no {HEAD_FILE} (the predictor's MLP weights)")
    state = {k.removeprefix("layers."): v for k, v in load_file(str(path)).items()}
    linear = sorted({int(k.split(".")[0]) for k in state})
    layers = [
        torch.nn.Linear(state[f"{i}.weight"].shape[1], state[f"{i}.weight"].shape[0])
        if i in linear
        else torch.nn.Identity()  # a dropout of the training layout
        for i in range(linear[-1] + 1)
    ]
    head = torch.nn.Sequential(*layers)
    head.load_state_dict(state)
    return head.eval()


class AestheticScorer:
    """Ray Data actor: decoded clip rows (`frames`) -> the same rows with an `aesthetic` column."""

    def __init__(self, model_dir: str, device: str = "cpu"):
        from transformers import AutoImageProcessor, CLIPModel

        from wanray.devices import accelerator

        self.device = accelerator(device).torch_device()
        self.clip = CLIPModel.from_pretrained(model_dir).to(self.device).eval()
        self.images = AutoImageProcessor.from_pretrained(model_dir)
        self.head = load_head(model_dir).to(self.device)

    @torch.inference_mode()
    def score(self, frames: np.ndarray) -> float:
        picked = frames[np.unique(np.linspace(0, len(frames) - 1, min(FRAMES, len(frames))).round().astype(int))]
        pixels = self.images(images=list(picked), return_tensors="pt")["pixel_values"].to(self.device)
        embedding = self.clip.get_image_features(pixel_values=pixels).pooler_output.float()
        return float(self.head(torch.nn.functional.normalize(embedding, dim=-1)).mean())

    def __call__(self, batch: dict) -> dict:
        batch["aesthetic"] = np.array([self.score(f) for f in batch["frames"]], dtype=np.float32)
        return batch
