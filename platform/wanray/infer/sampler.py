"""The Wan2.2 two-stage sampler, split into the four stages that Serve runs as deployments.

    prompt ─► PromptEncoder ─► ExpertStage("high") ─► ExpertStage("low") ─► VideoDecoder ─► frames
              (UMT5)           steps with t >= boundary  the other steps       (VAE)

Each stage loads only its own part of the model directory, so each can live on its own
device, and takes the Wan2.2 contract of that directory (`wanray.wan`: switch rule, text
length, latent shape and normalisation) from the driver that read it. What moves between the expert stages is a `DenoiseState`: the latents *and* the
scheduler, because UniPC is multistep and keeps a history of model outputs. Every step
reproduces diffusers' `WanPipeline.__call__` (same latent init, timesteps, expert switch,
guidance formula and de-normalisation), so the frames equal WanPipeline's for the same
weights, scheduler, prompts and seed. `Sampler` chains the stages in one process.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch

from wanray import models
from wanray.config import Config, InferConfig, attention_backend
from wanray.data.encode import encode_text
from wanray.devices import accelerator, apply_attention_backend, torch_dtype
from wanray.schema import pad_text_embedding
from wanray.wan import WanContract, read_contract

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


def _stage_device(infer: InferConfig) -> torch.device:
    """Apply the stage's torch thread setting and return the device it computes on."""
    if infer.torch_threads > 0:
        torch.set_num_threads(infer.torch_threads)
    return accelerator(infer.device).torch_device()


class PromptEncoder:
    """Stage 1: prompt and negative prompt -> padded UMT5 embeddings."""

    def __init__(self, model_dir: str, infer: InferConfig, contract: WanContract):
        self.device = _stage_device(infer)
        self.text_tokens = contract.text_tokens
        self.tokenizer = models.load_tokenizer(model_dir)
        self.text_encoder = models.load_text_encoder(model_dir, torch_dtype(infer.dtype), self.device)

    def encode(self, params: GenerationParams) -> TextEmbeddings:
        # One forward per prompt, as WanPipeline does: a batch of two could round differently.
        def one(text: str) -> torch.Tensor:
            (emb,) = encode_text(self.tokenizer, self.text_encoder, [text])
            return pad_text_embedding(emb, self.text_tokens)[None].cpu()

        negative = one(params.negative_prompt) if params.guided else None
        return TextEmbeddings(one(params.prompt), negative)


class ExpertStage:
    """Stage 2 or 3: the high-noise expert (t >= boundary*1000, starting from noise) or the low-noise one."""

    def __init__(self, model_dir: str, expert: str, infer: InferConfig, contract: WanContract, attention: str):
        self.device = _stage_device(infer)
        self.expert_name, self.contract = expert, contract
        self.expert = models.load_expert(model_dir, expert, torch_dtype(infer.dtype), self.device)
        apply_attention_backend(self.expert, attention)
        self.scheduler = models.load_scheduler(model_dir, infer.flow_shift)

    def initial_state(self, params: GenerationParams) -> DenoiseState:
        """Seeded noise and a fresh scheduler, exactly as WanPipeline.prepare_latents / set_timesteps."""
        from diffusers.utils.torch_utils import randn_tensor

        scheduler = copy.deepcopy(self.scheduler)
        scheduler.set_timesteps(params.num_inference_steps, device=self.device)
        scheduler.set_begin_index(0)
        shape = self.contract.latent_shape(self.expert.config.in_channels, params.num_frames, params.height,
                                           params.width)
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
        high_steps = int(self.contract.uses_high_expert(timesteps).sum())  # host sync, once per request
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

    def __init__(self, model_dir: str, infer: InferConfig, contract: WanContract):
        from diffusers.video_processor import VideoProcessor

        self.device, self.contract = _stage_device(infer), contract
        self.vae = models.load_vae(model_dir, torch_dtype(infer.dtype), self.device)
        self.video_processor = VideoProcessor(vae_scale_factor=contract.vae_scale_spatial)

    @torch.no_grad()
    def decode(self, state: DenoiseState) -> np.ndarray:
        latents = self.contract.denormalize(state.latents.to(self.device, self.vae.dtype))
        video = self.vae.decode(latents, return_dict=False)[0]
        return self.video_processor.postprocess_video(video, output_type="np")[0]


@dataclass(frozen=True)
class StageSpec:
    """What every stage of one served model shares, resolved once by the driver."""

    model_dir: str
    infer: InferConfig
    contract: WanContract
    attention: str
    """diffusers attention backend of the experts."""

    @classmethod
    def resolve(cls, model_dir, cfg: Config) -> StageSpec:
        """The spec for `model_dir` under `cfg`; a boundary contradicting the directory is a ConfigError."""
        return cls(str(model_dir), cfg.infer, read_contract(model_dir, cfg.model),
                   attention_backend(cfg.model.attention_backend, cfg.infer.device, cfg.infer.dtype, training=False))

    def prompt_encoder(self) -> tuple:
        return PromptEncoder, self.model_dir, self.infer, self.contract

    def expert(self, expert: str) -> tuple:
        return ExpertStage, self.model_dir, expert, self.infer, self.contract, self.attention

    def decoder(self, cls: type | None = None) -> tuple:
        return cls or VideoDecoder, self.model_dir, self.infer, self.contract


def build(stage: tuple):
    """A stage from StageSpec's (class, *arguments)."""
    cls, *args = stage
    return cls(*args)


class Sampler:
    """All four stages in one process: batch generation, and the baseline Serve is measured against."""

    def __init__(self, spec: StageSpec):
        self.prompt_encoder = build(spec.prompt_encoder())
        self.high = build(spec.expert("high"))
        self.low = build(spec.expert("low"))
        self.decoder = build(spec.decoder())

    def __call__(self, params: GenerationParams) -> np.ndarray:
        text = self.prompt_encoder.encode(params)
        state = self.high.denoise(params, text)
        state = self.low.denoise(params, text, state)
        return self.decoder.decode(state)
