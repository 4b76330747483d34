"""diffusers' own WanPipeline (WanImageToVideoPipeline given an image) on a model directory: the
reference wanray's sampler is held to."""

from __future__ import annotations

import numpy as np
import torch

from wanray import models
from wanray.infer.request import GenerationParams, image_from_base64


def wanpipeline_frames(
    model_dir,
    params: GenerationParams,
    boundary: float | None = None,
    flow_shift: float | None = None,
    caches: dict | None = None,
    adapters: dict[str, dict[str, str]] | None = None,
    scheduler=None,
) -> np.ndarray:
    """(F, H, W, 3) float32 frames of diffusers' pipeline for the model's kind, fp32 on CPU:
    `WanPipeline(transformer, transformer_2, boundary_ratio)`, or WanImageToVideoPipeline when
    params.image is set; TI2V-5B's with its one transformer and expand_timesteps. `boundary` None
    takes the directory's; `caches` maps "high" / "low" to a diffusers cache config enabled on that transformer.
    `adapters` (name -> expert -> file) are loaded with load_lora_weights (the low-noise one with
    load_into_transformer_2) and params.loras activated with set_adapters on each transformer that has them;
    `scheduler` replaces the directory's."""
    from diffusers import WanImageToVideoPipeline, WanPipeline

    kind = models.read_kind(model_dir)
    two = not kind.one_transformer
    if boundary is None and two:
        boundary = models.read_json(model_dir, "model_index.json")["boundary_ratio"]
    parts = dict(
        tokenizer=models.load_tokenizer(model_dir),
        text_encoder=models.load_text_encoder(model_dir),
        vae=models.load_vae(model_dir),
        scheduler=models.load_scheduler(model_dir, flow_shift),
        transformer=models.load_expert(model_dir, "high"),
        transformer_2=models.load_expert(model_dir, "low") if two else None,
        boundary_ratio=boundary if two else None,
        expand_timesteps=kind.expand_timesteps,
    )
    image = {} if params.image is None else {"image": image_from_base64(params.image)}
    if params.last_image is not None:
        image["last_image"] = image_from_base64(params.last_image)
    if scheduler is not None:
        parts["scheduler"] = scheduler
    pipe = WanImageToVideoPipeline(**parts) if image else WanPipeline(**parts)
    pipe.set_progress_bar_config(disable=True)
    for name, files in (adapters or {}).items():
        for expert, path in files.items():
            pipe.load_lora_weights(path, adapter_name=name, load_into_transformer_2=expert == "low")
    for transformer in (pipe.transformer, pipe.transformer_2) if adapters else ():
        if transformer is None:
            continue
        uses = [(n, s) for n, s in params.loras if n in getattr(transformer, "peft_config", {})]
        if uses:
            transformer.set_adapters([n for n, _ in uses], [s for _, s in uses])
        elif getattr(transformer, "peft_config", None):
            transformer.disable_lora()
    for expert, config in (caches or {}).items():
        (pipe.transformer if expert == "high" else pipe.transformer_2).enable_cache(config)
    out = pipe(
        prompt=params.prompt,
        negative_prompt=params.negative_prompt,
        height=params.height,
        width=params.width,
        num_frames=params.num_frames,
        num_inference_steps=params.num_inference_steps,
        guidance_scale=params.guidance_scale,
        guidance_scale_2=params.guidance_scale_2 if two else None,
        generator=torch.Generator("cpu").manual_seed(params.seed),
        output_type="np",
        **image,
    )
    return out.frames[0]


# diffusers' module of each adapted layer in a block, and its name in the original Wan and musubi/kohya keys
LORA_LAYERS = {
    "attn1.to_q": "self_attn.q",
    "attn1.to_k": "self_attn.k",
    "attn1.to_v": "self_attn.v",
    "attn1.to_out.0": "self_attn.o",
    "attn2.to_q": "cross_attn.q",
    "attn2.to_k": "cross_attn.k",
    "attn2.to_v": "cross_attn.v",
    "attn2.to_out.0": "cross_attn.o",
    "ffn.net.0.proj": "ffn.0",
    "ffn.net.2": "ffn.2",
}
LORA_RANK = 4


def tiny_adapter(model_dir, expert: str, seed: int) -> dict[str, torch.Tensor]:
    """A rank-4 adapter of every attention projection and FFN linear, in diffusers' keys (scale 1)."""
    g = torch.Generator().manual_seed(seed)
    model = models.load_expert(model_dir, expert)
    out = {}
    for i in range(len(model.blocks)):
        for layer in LORA_LAYERS:
            linear = model.get_submodule(f"blocks.{i}.{layer}")
            out[f"transformer.blocks.{i}.{layer}.lora_A.weight"] = (
                torch.randn(LORA_RANK, linear.in_features, generator=g) * 0.3
            )
            out[f"transformer.blocks.{i}.{layer}.lora_B.weight"] = (
                torch.randn(linear.out_features, LORA_RANK, generator=g) * 0.3
            )
    return out
