"""The preprocessing encoders: Ray Data callable classes around wanray.encoding.

`LatentEncoder` and `TextEncoder` load their model once per actor in __init__ and turn numpy
batches of decoded frames / captions into the Parquet tensor columns.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import numpy as np
import torch

from wanray import models, storage
from wanray.data.shards import EMPTY_PROMPT_FILE, write_empty_prompt
from wanray.devices import accelerator, torch_dtype
from wanray.encoding import encode_first_frame, encode_latents, encode_text, frames_to_video
from wanray.schema import encode_tensor
from wanray.wan import VAE_DTYPE


def _columns(tensors: Sequence[torch.Tensor | None], name: str) -> dict[str, np.ndarray]:
    """Bytes, shape and dtype columns of `tensors`, every one of them encoded by now."""
    encoded = [encode_tensor(t) for t in tensors if t is not None]
    if len(encoded) != len(tensors):
        raise RuntimeError(f"a {name} of the batch was not encoded")
    return {
        name: np.array([e[0] for e in encoded], dtype=object),
        f"{name}_shape": np.array([e[1] for e in encoded], dtype=np.int32),
        f"{name}_dtype": np.array([e[2] for e in encoded], dtype=object),
    }


class LatentEncoder:
    """Ray Data actor: `frames` (T, H, W, 3) uint8 -> `latent` bytes, shape and dtype columns; for an
    image-to-video model also the `condition` columns (the first frame then zero frames, encoded).

    The VAE encodes in float32 (wan.VAE_DTYPE); latents are stored in `dtype`."""

    def __init__(self, model_path: str, device: str = "cpu", dtype: str = "float32"):
        self.device = accelerator(device).torch_device()
        self.vae = models.load_vae(model_path, torch_dtype(VAE_DTYPE), self.device)
        self.dtype = torch_dtype(dtype)
        self.condition = models.read_kind(model_path).image == "required"

    def __call__(self, batch: dict) -> dict:
        frames = list(batch.pop("frames"))
        latents: list[torch.Tensor | None] = [None] * len(frames)
        conditions: list[torch.Tensor | None] = [None] * len(frames)
        by_shape = defaultdict(list)  # clips of one shape go through the VAE together
        for i, f in enumerate(frames):
            by_shape[f.shape].append(i)
        for idx in by_shape.values():
            videos = torch.stack([frames_to_video(frames[i]) for i in idx])
            for i, zi in zip(idx, encode_latents(self.vae, videos).to(self.dtype).cpu()):
                latents[i] = zi
            if self.condition:
                first = encode_first_frame(self.vae, videos[:, :, 0], videos.shape[2])
                for i, ci in zip(idx, first.to(self.dtype).cpu()):
                    conditions[i] = ci
        columns = _columns(latents, "latent")
        if self.condition:
            columns.update(_columns(conditions, "condition"))
        return {**batch, **columns}


class TextEncoder:
    """Ray Data actor: `caption` -> `text_embedding` bytes, shape, dtype and `text_tokens` columns.

    Given `empty_prompt_dir`, it also writes the empty-prompt embedding there once (if missing)."""

    def __init__(
        self, model_path: str, device: str = "cpu", dtype: str = "float32", empty_prompt_dir: str | None = None
    ):
        self.device = accelerator(device).torch_device()
        self.tokenizer = models.load_tokenizer(model_path)
        self.text_encoder = models.load_text_encoder(model_path, torch_dtype(dtype), self.device)
        if empty_prompt_dir and not storage.is_file(storage.join(empty_prompt_dir, EMPTY_PROMPT_FILE)):
            self.write_empty_prompt(empty_prompt_dir)

    def write_empty_prompt(self, out_dir: str) -> None:
        """The empty-prompt embedding into `out_dir`, with the model already loaded here: a separate
        process would load UMT5 (11 GB for the real one) again. Atomic: two actors may both write it."""
        (embedding,) = encode_text(self.tokenizer, self.text_encoder, [""])
        write_empty_prompt(out_dir, embedding.cpu())

    def __call__(self, batch: dict) -> dict:
        embeddings = [e.cpu() for e in encode_text(self.tokenizer, self.text_encoder, list(batch["caption"]))]
        cols = _columns(embeddings, "text_embedding")
        cols["text_tokens"] = np.array([e.shape[0] for e in embeddings], dtype=np.int32)
        return {**batch, **cols}
