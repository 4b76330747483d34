"""VAE latents and UMT5 text embeddings, exactly as diffusers' WanPipeline makes them.

The pure functions work on tensors; `LatentEncoder` and `TextEncoder` are Ray Data
callable classes (the model loads once per actor in __init__) working on numpy batches.
"""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from wanray import models
from wanray.devices import accelerator, torch_dtype
from wanray.data.shards import EMPTY_PROMPT_FILE, write_empty_prompt
from wanray.schema import encode_tensor
from wanray.wan import TEXT_TOKENS, normalize_latents


def frames_to_video(frames: np.ndarray) -> torch.Tensor:
    """(T, H, W, 3) uint8 -> (3, T, H, W) float in [-1, 1], the VAE's input range."""
    return torch.from_numpy(np.array(frames)).permute(3, 0, 1, 2).float().div_(127.5).sub_(1.0)  # a writable copy


@torch.no_grad()
def encode_latents(vae, videos: torch.Tensor) -> torch.Tensor:
    """(B, 3, T, H, W) in [-1, 1] -> normalised latents (B, 16, (T-1)/4+1, H/8, W/8): the posterior
    mode, normalised as the Wan2.2 contract says (wan.normalize_latents)."""
    param = next(vae.parameters())
    z = vae.encode(videos.to(param.device, param.dtype)).latent_dist.mode()
    return normalize_latents(z, vae.config.latents_mean, vae.config.latents_std)


@torch.no_grad()
def encode_text(tokenizer, text_encoder, prompts: list[str]) -> list[torch.Tensor]:
    """Unpadded UMT5 embeddings, one (tokens, dim) tensor per prompt.

    Same cleaning, tokenisation (padded to the contract's 512 tokens, as the model saw it) and
    truncation as `WanPipeline._get_t5_prompt_embeds`; padding is dropped for storage.
    """
    from diffusers.pipelines.wan.pipeline_wan import prompt_clean

    inputs = tokenizer([prompt_clean(p) for p in prompts], padding="max_length", max_length=TEXT_TOKENS,
                       truncation=True, add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
    device = next(text_encoder.parameters()).device
    mask = inputs.attention_mask.to(device)
    hidden = text_encoder(inputs.input_ids.to(device), mask).last_hidden_state
    lengths = mask.gt(0).sum(dim=1).tolist()  # host sync: one per batch, needed to slice
    return [h[:n] for h, n in zip(hidden, lengths)]


def _columns(tensors: list[torch.Tensor], name: str) -> dict[str, np.ndarray]:
    encoded = [encode_tensor(t) for t in tensors]
    return {name: np.array([e[0] for e in encoded], dtype=object),
            f"{name}_shape": np.array([e[1] for e in encoded], dtype=np.int32),
            f"{name}_dtype": np.array([e[2] for e in encoded], dtype=object)}


class LatentEncoder:
    """Ray Data actor: `frames` (T, H, W, 3) uint8 -> `latent` bytes, shape and dtype columns."""

    def __init__(self, model_path: str, device: str = "cpu", dtype: str = "float32"):
        self.device = accelerator(device).torch_device()
        self.vae = models.load_vae(model_path, torch_dtype(dtype), self.device)

    def __call__(self, batch: dict) -> dict:
        frames = list(batch.pop("frames"))
        latents: list[torch.Tensor | None] = [None] * len(frames)
        by_shape = defaultdict(list)  # clips of one shape go through the VAE together
        for i, f in enumerate(frames):
            by_shape[f.shape].append(i)
        for idx in by_shape.values():
            z = encode_latents(self.vae, torch.stack([frames_to_video(frames[i]) for i in idx]))
            for i, zi in zip(idx, z.cpu()):
                latents[i] = zi
        return {**batch, **_columns(latents, "latent")}


class TextEncoder:
    """Ray Data actor: `caption` -> `text_embedding` bytes, shape, dtype and `text_tokens` columns.

    Given `empty_prompt_dir`, it also writes the empty-prompt embedding there once (if missing)."""

    def __init__(self, model_path: str, device: str = "cpu", dtype: str = "float32",
                 empty_prompt_dir: str | None = None):
        self.device = accelerator(device).torch_device()
        self.tokenizer = models.load_tokenizer(model_path)
        self.text_encoder = models.load_text_encoder(model_path, torch_dtype(dtype), self.device)
        if empty_prompt_dir and not (Path(empty_prompt_dir) / EMPTY_PROMPT_FILE).exists():
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
