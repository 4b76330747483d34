"""The Wan2.2 two-stage sampler, split into the four stages that Serve runs as deployments.

    prompt ─► PromptEncoder ─► ExpertStage("high") ─► ExpertStage("low") ─► VideoDecoder ─► frames
              (UMT5)           steps with t >= boundary  the other steps       (VAE)

Each stage loads only its own part of the model directory, so each can live on its own
device, and takes the Wan2.2 contract of that directory (`wanray.wan`: switch rule, text
length, latent shape and normalisation) from the driver that read it. What moves between the
expert stages is a `DenoiseState`: the latents *and* the scheduler, because UniPC is multistep
and keeps a history of model outputs. Every step reproduces diffusers' `WanPipeline.__call__`
(same latent init, timesteps, expert switch, guidance formula and de-normalisation), so the
frames equal WanPipeline's for the same weights, scheduler, prompts and seed. `Sampler` chains the
stages in one process.
"""

from __future__ import annotations

import copy
import logging

import numpy as np
import torch

from wanray import context_parallel, models
from wanray.devices import apply_attention_backend, check_compile_backend, torch_dtype
from wanray.encoding import encode_first_frame, encode_latents, encode_text
from wanray.infer.adapters import LoadedAdapters
from wanray.infer.cache import StepCache
from wanray.infer.quantize import check_fp8_gpu, quantize_fp8
from wanray.infer.request import (
    AgreedFailure,
    Cancelled,
    DenoiseState,
    GenerationParams,
    TextEmbeddings,
    image_from_base64,
    multistep,
)
from wanray.infer.spec import StageSpec, resident
from wanray.infer.vae_tiles import decode_tiled
from wanray.schema import pad_text_embedding
from wanray.wan import VAE_DTYPE, WanContract, clean_frame_mask, first_frame_mask, token_timesteps


def frame_mask(state: DenoiseState, contract: WanContract) -> torch.Tensor | None:
    """TI2V-5B's (1, 1, F, H, W) frame mask for a request (zeros on the first frame when an image is
    given), on the latents' device; None for the A14B models."""
    if not contract.kind.expand_timesteps:
        return None
    return clean_frame_mask(tuple(state.latents.shape), state.condition is not None).to(state.latents.device)


def set_timesteps(scheduler, steps: int, device: torch.device) -> None:
    """The request's timesteps. UniPC: as WanPipeline sets them. Euler (the 4-step distilled adapters'):
    sigmas 1, 1 - 1/n, ..., 1/n shifted by the flow shift, then 0, as Wan2.2-Lightning's sampler takes
    them (diffusers' own default ends at its smallest training sigma instead of 1/n)."""
    if multistep(scheduler):
        scheduler.set_timesteps(steps, device=device)
    else:
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 0.0, steps + 1)[:-1].tolist(), device=device)
    scheduler.set_begin_index(0)


class PromptEncoder:
    """Stage 1: prompt and negative prompt -> padded UMT5 embeddings."""

    def __init__(self, spec: StageSpec):
        self.device, self.offload = spec.device("text"), spec.offload
        self.text_tokens = spec.contract.text_tokens
        self.tokenizer = models.load_tokenizer(spec.model_dir)
        self.text_encoder = spec.hosted(
            models.load_text_encoder(spec.model_dir, spec.dtype("text"), spec.load_device(self.device)), self.device
        )

    def encode(self, params: GenerationParams) -> TextEmbeddings:
        # One forward per prompt, as WanPipeline does: a batch of two could round differently.
        def one(text: str) -> torch.Tensor:
            (emb,) = encode_text(self.tokenizer, self.text_encoder, [text])
            return pad_text_embedding(emb, self.text_tokens)[None].cpu()

        with resident(self.text_encoder, self.device, self.offload):
            negative = one(params.negative_prompt) if params.guided else None
            return TextEmbeddings(one(params.prompt), negative)


MIN_CACHED_STEPS = 3
"""MagCache skips no step of an expert that runs fewer of its own steps in a request."""


def compile_blocks(expert, backend: str) -> None:
    """torch.compile each transformer block's forward (regional compilation: the blocks share one graph), before
    any hook wraps it. diffusers' compile_repeated_blocks compiles a block's Module call instead, which runs its
    hooked forward: MagCache's hooks are torch.compiler.disable'd, so under them nothing compiled at all."""
    for block in expert.blocks:
        block.forward = torch.compile(block.forward, backend=backend)


class ExpertStage:
    """Stage 2 or 3: the high-noise expert (t >= boundary*1000, starting from noise) or the low-noise one."""

    def __init__(self, spec: StageSpec, expert: str, model=None):
        """model: the expert already built (the device check's random weights at the real dimensions);
        None loads it from spec.model_dir."""
        self.device, self.offload = spec.device(expert), spec.offload
        self.expert_name, self.contract = expert, spec.contract
        self.expert = (
            model
            if model is not None
            else spec.hosted(
                models.load_expert(spec.model_dir, expert, spec.dtype(expert), spec.load_device(self.device)),
                self.device,
            )
        )
        apply_attention_backend(self.expert, spec.attention[expert])
        if spec.quantize == "fp8":
            check_fp8_gpu(self.device)
            quantize_fp8(self.expert)
        if spec.compile_backend:  # adapters load later, and a new set recompiles
            check_compile_backend(spec.compile_backend, "infer.compile_backend")
            compile_blocks(self.expert, spec.compile_backend)
        ratios = spec.calibration.expert(expert, spec.contract.kind.experts) if spec.calibration else None
        self.cache = StepCache(self.expert, spec.cache, spec.cache_threshold, ratios)  # before the split's hooks
        if (ranks := spec.devices[expert]) > 1:  # one rank of a group (wanray.infer.group)
            context_parallel.enable(self.expert, ranks, 1, context_parallel.mesh(self.device, ranks, 1), self.device)
        self.model_dir, self.flow_shift = spec.model_dir, spec.flow_shift
        self.schedulers: dict[tuple[str, float | None], object] = {}
        self.adapters = LoadedAdapters(self.expert, expert, spec.adapters, spec.model_dir, spec.max_loaded_loras)
        self.ranks = spec.devices[expert]
        self.batched_guidance = spec.batched_guidance
        self.calibration = spec.calibration
        if spec.calibration is not None:  # the shift it ran at (None: the directory's)
            shift = spec.calibration.flow_shift
            self.calibrated_shift = models.load_scheduler(spec.model_dir, shift).config.flow_shift
        self.warned: set[tuple] = set()
        self.should_stop = lambda: False
        """Asked before every denoising step (Serve's stage sets it per request): True stops the request."""

    def _cache_fits(self, params: GenerationParams, scheduler, steps: int) -> bool:
        """Whether MagCache's calibrated ratios may skip this request's steps (other caches: always). Not under
        another schedule than the calibration's (sampler, flow_shift): the ratios belong to its sigmas; nor for
        an expert of fewer than MIN_CACHED_STEPS own steps (a distilled 4-step request: 2 each), where diffusers'
        retention of the first fifth of the steps rounds to none. Adapters other than the calibration's keep the
        ratios (a warning, once per set of names)."""
        c = self.calibration
        if c is None:
            return True
        shift = scheduler.config.flow_shift if multistep(scheduler) else scheduler.config.shift
        if (params.sampler, shift) != (c.sampler, self.calibrated_shift):
            self._warn_once(
                ("schedule", params.sampler, shift),
                "MagCache was calibrated for %s at flow_shift %g; requests with %s at %g run uncached (calibrate "
                "this schedule: pipelines/calibrate_cache.py)",
                c.sampler,
                self.calibrated_shift,
                params.sampler,
                shift,
            )
            return False
        if steps < MIN_CACHED_STEPS:
            return False
        loras = [(n, float(v)) for n, v in c.loras]
        if list(params.loras) != loras:
            self._warn_once(
                ("loras", *sorted(n for n, _ in params.loras)),
                "MagCache's ratios were calibrated with adapters %s; a request with %s uses them as they are "
                "(calibrate with the adapters you serve: pipelines/calibrate_cache.py)",
                loras or "none",
                list(params.loras) or "none",
            )
        return True

    def _warn_once(self, key: tuple, message: str, *args) -> None:
        if key not in self.warned and len(self.warned) < 64:  # bounded: requests choose the keys
            self.warned.add(key)
            logging.getLogger("wanray").warning("%s expert: " + message, self.expert_name, *args)

    def _activate(self, loras: tuple) -> None:
        """adapters.activate, agreed by every rank of a group: when one rank fails to load an adapter (a store's
        error, memory), every rank raises before the request's first collective, instead of the others waiting
        in it, where the next request's collectives would pair with theirs."""
        failed: Exception | None = None
        try:
            self.adapters.activate(loras)
        except Exception as e:
            failed = e
        if self.ranks > 1:
            import torch.distributed as dist

            flag = torch.tensor([float(failed is not None)], device=self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            if flag.item():  # every rank raises here: the group stays in step (wanray.infer.group)
                if failed is None:
                    raise AgreedFailure(f"{self.expert_name} expert: an adapter failed to load on another rank")
                raise AgreedFailure(f"{type(failed).__name__}: {failed}") from failed
        if failed is not None:
            raise failed

    def _stopping(self) -> bool:
        """should_stop(), agreed by every rank of a group: one all-reduce of a flag per step (the other ranks'
        collectives would wait forever for a rank that stopped alone); a host sync, tiny beside a step."""
        stop = self.should_stop()
        if self.ranks == 1:
            return stop
        import torch.distributed as dist

        flag = torch.tensor([float(stop)], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def initial_state(self, params: GenerationParams, condition: torch.Tensor | None = None) -> DenoiseState:
        """Seeded noise and a fresh scheduler, exactly as WanPipeline.prepare_latents / set_timesteps
        (the noise has the latents' channels, not the transformer's input channels)."""
        from diffusers.utils.torch_utils import randn_tensor

        shift = self.flow_shift if params.flow_shift is None else params.flow_shift
        if (params.sampler, shift) not in self.schedulers:
            if len(self.schedulers) >= 16:  # requests choose the shift: keep the 16 newest
                del self.schedulers[next(iter(self.schedulers))]
            self.schedulers[params.sampler, shift] = models.load_scheduler(self.model_dir, shift, params.sampler)
        scheduler = copy.deepcopy(self.schedulers[params.sampler, shift])
        set_timesteps(scheduler, params.num_inference_steps, self.device)
        shape = self.contract.latent_shape(
            self.contract.kind.latent_channels, params.num_frames, params.height, params.width
        )
        generator = torch.Generator("cpu").manual_seed(params.seed)  # noise drawn on the CPU, then moved
        latents = randn_tensor(shape, generator=generator, device=self.device, dtype=torch.float32)
        return DenoiseState(latents, scheduler, 0, None if condition is None else condition.to(self.device))

    def denoise(
        self,
        params: GenerationParams,
        text: TextEmbeddings,
        state: DenoiseState | None = None,
        condition: torch.Tensor | None = None,
    ) -> DenoiseState:
        """Run this expert's steps: the high-noise stage starts from noise (and, for image to video, the
        first-frame `condition` from VideoDecoder.condition), the low-noise one from `state`."""
        if (state is None) != (self.expert_name == "high"):
            raise ValueError("the high-noise stage starts from noise; the low-noise stage continues its state")
        state = self.initial_state(params, condition) if state is None else state.to(self.device)
        timesteps = state.scheduler.timesteps
        # Timesteps descend, so the high-noise expert owns the first k of them, k = #(t >= boundary).
        high_steps = int(self.contract.uses_high_expert(timesteps).sum())  # host sync, once per request
        stop = high_steps if self.expert_name == "high" else len(timesteps)
        scale = params.guidance_scale if self.expert_name == "high" else params.guidance_scale_2
        # each request starts afresh (no residual from the last one), MagCache only under its calibration's schedule
        self.cache.begin(stop - state.step, self._cache_fits(params, state.scheduler, stop - state.step))
        self._activate(params.loras)  # before `resident`: an adapter loaded now waits with the expert
        with resident(self.expert, self.device, self.offload):
            state = self._steps(state, text, scale, stop)
        return state.to(torch.device("cpu"))

    @torch.no_grad()
    def _steps(self, state: DenoiseState, text: TextEmbeddings, scale: float, stop: int) -> DenoiseState:
        dtype = self.expert.dtype
        prompt = text.prompt.to(self.device, dtype)
        negative = None if text.negative is None else text.negative.to(self.device, dtype)
        latents, scheduler = state.latents, state.scheduler
        mask = frame_mask(state, self.contract)
        euler = not multistep(scheduler)
        for i in range(state.step, stop):
            if self._stopping():
                raise Cancelled(f"cancelled before step {i + 1} of {len(scheduler.timesteps)}")
            t = scheduler.timesteps[i]
            if mask is not None:  # TI2V: per-token timesteps, the given image's frame clean at 0
                latent_input = latents if state.condition is None else (1 - mask) * state.condition + mask * latents
                timestep = token_timesteps(mask, t).expand(latents.shape[0], -1)
            else:
                latent_input = latents if state.condition is None else torch.cat([latents, state.condition], dim=1)
                timestep = t.expand(latents.shape[0])
            latent_input = latent_input.to(dtype)
            uncond: torch.Tensor | None
            if negative is not None and self.batched_guidance:  # one forward of batch 2: twice the activations
                noise, uncond = self._forward(
                    "both", i, torch.cat([latent_input] * 2), torch.cat([timestep] * 2), torch.cat([prompt, negative])
                ).chunk(2)
            else:
                noise = self._forward("cond", i, latent_input, timestep, prompt)
                uncond = None if negative is None else self._forward("uncond", i, latent_input, timestep, negative)
            if uncond is not None:
                noise = uncond + scale * (noise - uncond)
            if euler:  # the distilled recipe's update accumulates in float32, the latents' dtype
                noise = noise.float()
            latents = scheduler.step(noise, t, latents, return_dict=False)[0]
        return DenoiseState(latents, scheduler, max(stop, state.step), state.condition)

    def _forward(self, name: str, step: int, latents, timestep, text) -> torch.Tensor:
        """The expert's noise prediction; with a step cache, under the call's own cache context (the
        conditional and unconditional passes keep separate residuals, as in WanPipeline)."""
        with self.cache.context(name, step):
            return self.expert(hidden_states=latents, timestep=timestep, encoder_hidden_states=text, return_dict=False)[
                0
            ]


class VideoDecoder:
    """Stage 4: normalised latents -> (frames, height, width, 3) float32 frames in [0, 1]."""

    def __init__(self, spec: StageSpec, vae=None):
        """vae: the VAE already built, in float32 (the device check's); None loads it from spec.model_dir."""
        from diffusers.video_processor import VideoProcessor

        self.device, self.offload, self.contract = spec.device("vae"), spec.offload, spec.contract
        # float32 whatever the stage's dtype
        self.vae = (
            vae
            if vae is not None
            else spec.hosted(
                models.load_vae(spec.model_dir, torch_dtype(VAE_DTYPE), spec.load_device(self.device)), self.device
            )
        )
        self.vae_tile = spec.vae_tile
        self.video_processor = VideoProcessor(vae_scale_factor=spec.contract.vae_scale_spatial)

    @torch.no_grad()
    def condition(self, params: GenerationParams) -> torch.Tensor:
        """The first image, float32 on the CPU, as WanImageToVideoPipeline.prepare_latents builds it: for
        I2V-A14B (1, 4 + 16, F, H, W), the frame mask and the normalised latent of [the image, zero
        frames] (or [image, zero frames, last image]); for TI2V-5B (1, 48, 1, H, W), the image's
        normalised latent."""
        image, last = (
            None
            if data is None
            else self.video_processor.preprocess(image_from_base64(data), height=params.height, width=params.width)
            for data in (params.image, params.last_image)
        )
        if image is None:
            raise ValueError("condition() takes a request with an image")
        with resident(self.vae, self.device, self.offload):
            if self.contract.kind.expand_timesteps:
                return encode_latents(self.vae, image[:, :, None]).float().cpu()
            latent = encode_first_frame(self.vae, image, params.num_frames, last).float().cpu()
        mask = first_frame_mask(latent.shape, self.contract.vae_scale_temporal, last=last is not None)
        return torch.cat([mask, latent], dim=1)

    @torch.no_grad()
    def decode(self, state: DenoiseState) -> np.ndarray:
        latents = state.latents
        if (mask := frame_mask(state, self.contract)) is not None and state.condition is not None:
            latents = (1 - mask) * state.condition + mask * latents  # the image's frame, as diffusers decodes it
        latents = self.contract.denormalize(latents.to(self.device, self.vae.dtype))
        with resident(self.vae, self.device, self.offload):
            video = (
                decode_tiled(self.vae, latents, self.vae_tile)
                if self.vae_tile
                else self.vae.decode(latents, return_dict=False)[0]
            )
        return self.video_processor.postprocess_video(video, output_type="np")[0]


class Sampler:
    """All stages in one process: batch generation, and the baseline Serve is measured against. A
    one-transformer model (TI2V-5B) has no low-noise stage: its transformer runs every step."""

    def __init__(self, spec: StageSpec, experts: dict | None = None):
        """experts: the expert stages already built (a batch actor's multi-device group,
        wanray.infer.group); None builds them here, on this process's device."""
        self.prompt_encoder = PromptEncoder(spec)
        self.experts: dict[str, ExpertStage] = experts or {e: ExpertStage(spec, e) for e in spec.contract.kind.experts}
        """The expert stages by name: "high", and "low" where the model has it (TI2V-5B has not)."""
        self.high, self.low = self.experts["high"], self.experts.get("low")
        self.decoder = VideoDecoder(spec)

    def __call__(self, params: GenerationParams) -> np.ndarray:
        text = self.prompt_encoder.encode(params)
        condition = None if params.image is None else self.decoder.condition(params)
        state = self.high.denoise(params, text, condition=condition)
        if self.low is not None:
            state = self.low.denoise(params, text, state)
        return self.decoder.decode(state)
