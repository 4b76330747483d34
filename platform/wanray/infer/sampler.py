"""The Wan2.2 two-stage sampler, split into the four stages that Serve runs as deployments.

    prompt ─► PromptEncoder ─► ExpertStage("high") ─► ExpertStage("low") ─► VideoDecoder ─► frames
              (UMT5)           steps with t >= boundary  the other steps       (VAE)

Each stage loads only its own part of the model directory, so each can live on its own
device. What moves between the expert stages is a `DenoiseState`: the latents *and* the
scheduler, because UniPC is multistep and keeps a history of model outputs. Every step
reproduces diffusers' `WanPipeline.__call__` (same latent init, timesteps, expert switch,
guidance formula and de-normalisation), so the frames equal WanPipeline's for the same
weights, scheduler, prompts and seed. `Sampler` chains the stages in one process.
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from wanray import models
from wanray.config import InferConfig
from wanray.data.encode import encode_text, latent_stats
from wanray.devices import accelerator, torch_dtype
from wanray.schema import pad_text_embedding

TEXT_TOKENS = 512  # WanPipeline's max_sequence_length: embeddings are zero-padded to it
# UniPC state that set_timesteps and step keep on the compute device: timesteps, and the multistep
# history (last solver_order model outputs, their timesteps, the last sample). sigmas stay on the CPU.
SCHEDULER_DEVICE_STATE = ("timesteps", "model_outputs", "timestep_list", "last_sample")


@dataclass(frozen=True)
class GenerationParams:
    """One video to generate, every value resolved (see `wanray.infer.api.resolve`)."""

    prompt: str
    negative_prompt: str
    height: int
    width: int
    num_frames: int
    num_inference_steps: int
    guidance_scale: float
    """High-noise expert's guidance."""
    guidance_scale_2: float
    """Low-noise expert's guidance."""
    seed: int

    @property
    def guided(self) -> bool:
        """Classifier-free guidance on: diffusers decides it from guidance_scale alone, for both stages."""
        return self.guidance_scale > 1.0


@dataclass
class TextEmbeddings:
    prompt: torch.Tensor
    """(1, 512, text_dim), zero-padded like WanPipeline.encode_prompt, in the text encoder's dtype."""
    negative: torch.Tensor | None
    """The negative prompt's, None when guidance is off."""


@dataclass
class DenoiseState:
    """What the high-noise stage hands the low-noise stage: latents and the scheduler's state."""

    latents: torch.Tensor
    """(1, 16, (frames-1)/4+1, height/8, width/8), float32 like WanPipeline's."""
    scheduler: object
    """The request's own scheduler: its timesteps and multistep history (model outputs, last sample)."""
    step: int
    """Index of the next timestep to run."""

    def to(self, device: torch.device) -> "DenoiseState":
        """Move the latents and the scheduler's per-request tensors (the rest stays on the CPU, as in diffusers)."""
        def move(v):
            return [move(x) for x in v] if isinstance(v, list) else v.to(device) if torch.is_tensor(v) else v

        for name in SCHEDULER_DEVICE_STATE:
            setattr(self.scheduler, name, move(getattr(self.scheduler, name)))
        self.latents = self.latents.to(device)
        return self


def model_boundary(model_dir, fallback: float) -> float:
    """The boundary stored in the directory's model_index.json (the experts were trained for it), else config."""
    stored = models.boundary_ratio(model_dir)
    return fallback if stored is None else stored


def _stage_device(infer: InferConfig) -> torch.device:
    """Apply the stage's torch thread setting and return the device it computes on."""
    if infer.torch_threads > 0:
        torch.set_num_threads(infer.torch_threads)
    return accelerator(infer.device).torch_device()


class PromptEncoder:
    """Stage 1: prompt and negative prompt -> padded UMT5 embeddings."""

    def __init__(self, model_dir: str, infer: InferConfig):
        self.device = _stage_device(infer)
        self.tokenizer = models.load_tokenizer(model_dir)
        self.text_encoder = models.load_text_encoder(model_dir, torch_dtype(infer.dtype), self.device)

    def encode(self, params: GenerationParams) -> TextEmbeddings:
        # One forward per prompt, as WanPipeline does: a batch of two could round differently.
        def one(text: str) -> torch.Tensor:
            (emb,) = encode_text(self.tokenizer, self.text_encoder, [text], TEXT_TOKENS)
            return pad_text_embedding(emb, TEXT_TOKENS)[None].cpu()

        negative = one(params.negative_prompt) if params.guided else None
        return TextEmbeddings(one(params.prompt), negative)


class ExpertStage:
    """Stage 2 or 3: the high-noise expert (t >= boundary*1000, starting from noise) or the low-noise one."""

    def __init__(self, model_dir: str, expert: str, infer: InferConfig, boundary: float):
        self.device = _stage_device(infer)
        self.expert_name = expert
        self.expert = models.load_expert(model_dir, expert, torch_dtype(infer.dtype), self.device)
        self.scheduler = models.load_scheduler(model_dir, infer.flow_shift)
        self.boundary_timestep = boundary * self.scheduler.config.num_train_timesteps
        vae = json.loads((Path(model_dir) / "vae" / "config.json").read_text())
        self.scale_t, self.scale_s = vae.get("scale_factor_temporal", 4), vae.get("scale_factor_spatial", 8)

    def initial_state(self, params: GenerationParams) -> DenoiseState:
        """Seeded noise and a fresh scheduler, exactly as WanPipeline.prepare_latents / set_timesteps."""
        from diffusers.utils.torch_utils import randn_tensor

        scheduler = copy.deepcopy(self.scheduler)
        scheduler.set_timesteps(params.num_inference_steps, device=self.device)
        scheduler.set_begin_index(0)
        shape = (1, self.expert.config.in_channels, (params.num_frames - 1) // self.scale_t + 1,
                 params.height // self.scale_s, params.width // self.scale_s)
        generator = torch.Generator("cpu").manual_seed(params.seed)  # noise drawn on the CPU, then moved
        latents = randn_tensor(shape, generator=generator, device=self.device, dtype=torch.float32)
        return DenoiseState(latents, scheduler, 0)

    def denoise(self, params: GenerationParams, text: TextEmbeddings,
                state: DenoiseState | None = None) -> DenoiseState:
        """Run this expert's steps: the high-noise stage starts from noise, the low-noise one from `state`."""
        if (state is None) != (self.expert_name == "high"):
            raise ValueError("the high-noise stage starts from noise; the low-noise stage continues its state")
        state = self.initial_state(params) if state is None else state.to(self.device)
        timesteps = state.scheduler.timesteps
        # Timesteps descend, so the high-noise expert owns the first k of them, k = #(t >= boundary).
        high_steps = int((timesteps >= self.boundary_timestep).sum())  # host sync, once per request
        stop = high_steps if self.expert_name == "high" else len(timesteps)
        scale = params.guidance_scale if self.expert_name == "high" else params.guidance_scale_2
        state = self._steps(state, text, scale, stop)
        return state.to(torch.device("cpu"))

    @torch.no_grad()
    def _steps(self, state: DenoiseState, text: TextEmbeddings, scale: float, stop: int) -> DenoiseState:
        dtype = self.expert.dtype
        prompt = text.prompt.to(self.device, dtype)
        negative = None if text.negative is None else text.negative.to(self.device, dtype)
        latents, scheduler = state.latents, state.scheduler
        for i in range(state.step, stop):
            t = scheduler.timesteps[i]
            latent_input, timestep = latents.to(dtype), t.expand(latents.shape[0])
            noise = self.expert(hidden_states=latent_input, timestep=timestep, encoder_hidden_states=prompt,
                                return_dict=False)[0]
            if negative is not None:
                uncond = self.expert(hidden_states=latent_input, timestep=timestep,
                                     encoder_hidden_states=negative, return_dict=False)[0]
                noise = uncond + scale * (noise - uncond)
            latents = scheduler.step(noise, t, latents, return_dict=False)[0]
        return DenoiseState(latents, scheduler, max(stop, state.step))


class VideoDecoder:
    """Stage 4: normalised latents -> (frames, height, width, 3) float32 frames in [0, 1]."""

    def __init__(self, model_dir: str, infer: InferConfig):
        from diffusers.video_processor import VideoProcessor

        self.device = _stage_device(infer)
        self.vae = models.load_vae(model_dir, torch_dtype(infer.dtype), self.device)
        self.video_processor = VideoProcessor(vae_scale_factor=self.vae.config.scale_factor_spatial)

    @torch.no_grad()
    def decode(self, state: DenoiseState) -> np.ndarray:
        latents = state.latents.to(self.device, self.vae.dtype)
        mean, std = latent_stats(self.vae, latents.device, latents.dtype)
        latents = latents / (1.0 / std) + mean  # WanPipeline's exact expression: the inverse of preprocessing
        video = self.vae.decode(latents, return_dict=False)[0]
        return self.video_processor.postprocess_video(video, output_type="np")[0]


class Sampler:
    """All four stages in one process: batch generation, and the baseline Serve is measured against."""

    def __init__(self, model_dir: str, infer: InferConfig, boundary: float):
        self.prompt_encoder = PromptEncoder(model_dir, infer)
        self.high = ExpertStage(model_dir, "high", infer, boundary)
        self.low = ExpertStage(model_dir, "low", infer, boundary)
        self.decoder = VideoDecoder(model_dir, infer)

    def __call__(self, params: GenerationParams) -> np.ndarray:
        text = self.prompt_encoder.encode(params)
        state = self.high.denoise(params, text)
        state = self.low.denoise(params, text, state)
        return self.decoder.decode(state)
