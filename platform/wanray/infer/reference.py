"""diffusers' own WanPipeline (WanImageToVideoPipeline given an image) on a model directory: the
reference wanray's sampler is held to."""
from __future__ import annotations

import numpy as np
import torch

from wanray import models
from wanray.infer.sampler import GenerationParams, image_from_base64


def wanpipeline_frames(model_dir, params: GenerationParams, boundary: float,
                       flow_shift: float | None = None) -> np.ndarray:
    """(F, H, W, 3) float32 frames of `WanPipeline(transformer, transformer_2, boundary_ratio)` (or
    WanImageToVideoPipeline when params.image is set), fp32 on CPU."""
    from diffusers import WanImageToVideoPipeline, WanPipeline

    parts = dict(tokenizer=models.load_tokenizer(model_dir), text_encoder=models.load_text_encoder(model_dir),
                 vae=models.load_vae(model_dir), scheduler=models.load_scheduler(model_dir, flow_shift),
                 transformer=models.load_expert(model_dir, "high"), transformer_2=models.load_expert(model_dir, "low"),
                 boundary_ratio=boundary)
    image = {} if params.image is None else {"image": image_from_base64(params.image)}
    pipe = WanImageToVideoPipeline(**parts) if image else WanPipeline(**parts)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(prompt=params.prompt, negative_prompt=params.negative_prompt, height=params.height,
               width=params.width, num_frames=params.num_frames, num_inference_steps=params.num_inference_steps,
               guidance_scale=params.guidance_scale, guidance_scale_2=params.guidance_scale_2,
               generator=torch.Generator("cpu").manual_seed(params.seed), output_type="np", **image)
    return out.frames[0]
