"""VAE latents and UMT5 text embeddings, exactly as diffusers' WanPipeline makes them.

Pure functions of a loaded model and tensors, shared by preprocessing (wanray.data.encode) and the
sampler's prompt encoder.
"""

from __future__ import annotations

import numpy as np
import torch

from wanray.wan import TEXT_TOKENS, normalize_latents


def frames_to_video(frames: np.ndarray) -> torch.Tensor:
    """(T, H, W, 3) uint8 -> (3, T, H, W) float in [-1, 1], the VAE's input range."""
    return torch.from_numpy(np.array(frames)).permute(3, 0, 1, 2).float().div_(127.5).sub_(1.0)  # a writable copy


@torch.no_grad()
def encode_first_frame(vae, first: torch.Tensor, num_frames: int, last: torch.Tensor | None = None) -> torch.Tensor:
    """(B, 3, H, W) first frames in [-1, 1] -> normalised latents of [the frame, num_frames - 1 zero
    frames] (with `last` frames: [first, num_frames - 2 zero frames, last]): the image-to-video
    condition, as WanImageToVideoPipeline.prepare_latents builds it."""
    b, c, h, w = first.shape
    ends = [first[:, :, None]] + ([] if last is None else [last[:, :, None]])
    zeros = first.new_zeros(b, c, num_frames - len(ends), h, w)
    return encode_latents(vae, torch.cat([ends[0], zeros, *ends[1:]], dim=2))


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

    inputs = tokenizer(
        [prompt_clean(p) for p in prompts],
        padding="max_length",
        max_length=TEXT_TOKENS,
        truncation=True,
        add_special_tokens=True,
        return_attention_mask=True,
        return_tensors="pt",
    )
    device = next(text_encoder.parameters()).device
    mask = inputs.attention_mask.to(device)
    hidden = text_encoder(inputs.input_ids.to(device), mask).last_hidden_state
    lengths = mask.gt(0).sum(dim=1).tolist()  # host sync: one per batch, needed to slice
    return [h[:n] for h, n in zip(hidden, lengths)]
