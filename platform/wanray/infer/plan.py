"""A dry run of inference memory per device: no weights, no accelerator, no Ray.

    the model directory's config files ─► each stage's model under torch's FakeTensorMode (tensors
    with shapes and dtypes but no storage) ─► its weights, and the peak of the tensors alive during
    one call of the stage at the planned size (one UMT5 forward, one guided denoising step: two
    expert forwards, one VAE decode), counted by `LiveBytes` ─► per device: Serve's stages each on
    their own; a batch actor all four, or with infer.batch_offload only the running one
    ─► the totals against infer.device_memory_gb

Checked on an H200 (benchmarks/device_check.py): a guided step of the 14B expert at 81x480x832
peaked 3.85 GB above its weights; this plan says 3.74 GB.
"""

from __future__ import annotations

import dataclasses
import functools
import weakref
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass
from torch.utils._pytree import tree_leaves

from wanray import models
from wanray.backends import attention_backend
from wanray.config import Config
from wanray.devices import apply_attention_backend, torch_dtype
from wanray.infer import adapters as lora_adapters
from wanray.infer.quantize import check_fp8, fp8_saved_bytes
from wanray.infer.vae_tiles import decode_tiled
from wanray.sections import STAGES, Resources
from wanray.train.plan import GB, HEADROOM, cpu_proxy
from wanray.wan import EXPERTS, VAE_DTYPE, WanContract

STAGE_NAMES = {
    "text": "UMT5 text encoder",
    "high": "high-noise expert",
    "low": "low-noise expert",
    "vae": "VAE decoder",
}


class LiveBytes(TorchDispatchMode):
    """Peak bytes of the tensor storages created while active and still alive (fake ones count their
    size): what a caching allocator must hold at once, less its rounding and fragmentation. The
    storages of `existing` (weights, inputs) are not counted, nor are views of them (a transposed
    weight), nor wrapper tensors that own no storage (a collective's pending result, whose tensor
    is counted where the collective creates it)."""

    def __init__(self, existing=()):
        super().__init__()
        self.live = self.peak = 0
        self._refs: dict[int, weakref.ref] = {}
        for t in existing:
            storage = t.untyped_storage()
            key = id(storage)
            self._refs[key] = weakref.ref(storage, lambda _, key=key: self._refs.pop(key, None))

    def _freed(self, key: int, nbytes: int) -> None:
        self.live -= nbytes
        self._refs.pop(key, None)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and not is_traceable_wrapper_subclass(t):
                storage = t.untyped_storage()
                key = id(storage)
                if key not in self._refs:
                    n = storage.nbytes()
                    self._refs[key] = weakref.ref(storage, lambda _, key=key, n=n: self._freed(key, n))
                    self.live += n
                    self.peak = max(self.peak, self.live)
        return out


def _weight_bytes(module: torch.nn.Module) -> int:
    tensors = {id(t): t for t in [*module.parameters(), *module.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values())


@dataclass(frozen=True)
class StagePlan:
    stage: str
    dtype: str
    weight_bytes: int
    working_bytes: int
    """Peak of the tensors one call of the stage allocates, above its weights (on one device)."""
    devices: int = 1
    """Devices the stage's tokens are split over (infer.stages.<expert>.devices or infer.batch_devices: Ulysses);
    each holds the whole model and 1/devices of the working set, which is per token."""
    adapter_bytes: int = 0
    """An expert's LoRA adapters loaded at once (infer.max_loaded_loras of the largest), beside its weights."""

    @property
    def total_bytes(self) -> int:
        """On each of the stage's devices."""
        return self.weight_bytes + self.adapter_bytes + self.working_bytes // self.devices


def _peak(call, *existing: torch.nn.Module | torch.Tensor) -> int:
    tensors = [
        t for e in existing for t in ([*e.parameters(), *e.buffers()] if isinstance(e, torch.nn.Module) else [e])
    ]
    tracker = LiveBytes(tensors)
    with tracker, torch.no_grad():
        call()
    return tracker.peak


@functools.lru_cache(maxsize=64)  # a plan builds the stage on fake tensors (seconds): the same one is asked often
def plan_stage(
    model_dir,
    stage: str,
    dtype: str,
    contract: WanContract,
    frames: int,
    height: int,
    width: int,
    attention: str = "native",
    batched_guidance: bool = False,
    vae_tile: int = 0,
    quantize: str = "none",
    cache: str = "none",
) -> StagePlan:
    """Weights and working set of one stage at frames x height x width (built on fake tensors); an expert's with
    the tensors its step cache (infer.cache) holds from one forward to the next."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    compute = torch_dtype(dtype)
    with FakeTensorMode():
        if stage == "text":
            model = models.text_encoder_from_config(models.read_json(model_dir, "text_encoder/config.json"), compute)
            ids = torch.zeros(1, contract.text_tokens, dtype=torch.long)
            working = _peak(lambda: model(ids, torch.ones_like(ids)), model, ids)
        elif stage in EXPERTS:
            config = models.expert_config(model_dir, stage)
            # blocks are alike and free their activations: one block's bytes and a two-block model's working set
            # give the whole depth's (test_unit_infer_plan checks both against the full 40 blocks)
            one, two = (
                _expert_bytes(
                    config | {"num_layers": n}, compute, attention, contract, frames, height, width, batched_guidance
                )
                for n in (1, 2)
            )
            depth = config["num_layers"] - 1  # blocks beyond the first
            weights, saved, working = one[0] + depth * (two[0] - one[0]), one[1] + depth * (two[1] - one[1]), two[2]
            # per guidance pass (cond, uncond: 2; batched, 1 of batch 2), (tokens, dim) tensors kept between steps:
            # MagCache's first-block input and residual, the first-block cache's output and two residuals
            held = {"none": 0, "magcache": 2, "first_block": 3}[cache]
            dim = config["num_attention_heads"] * config["attention_head_dim"]
            working += 2 * held * contract.kind.tokens(frames, height, width) * dim * compute.itemsize
            if quantize == "fp8":  # the working set stays bfloat16's (activations quantized per matmul)
                return StagePlan(stage, f"fp8 weights, {dtype}", weights - saved, working)
            return StagePlan(stage, dtype, weights, working)
        elif stage == "vae":
            config = models.read_json(model_dir, "vae/config.json")
            model = models.vae_from_config(config)
            latents = torch.zeros(contract.latent_shape(config.get("z_dim", 16), frames, height, width))
            if vae_tile:  # as VideoDecoder decodes with infer.vae_tiling
                working = _peak(lambda: decode_tiled(model, contract.denormalize(latents), vae_tile), model, latents)
            else:
                working = _peak(lambda: model.decode(contract.denormalize(latents), return_dict=False), model, latents)
        else:
            raise ValueError(f"stage must be one of {', '.join(STAGES)}, got {stage!r}")
        return StagePlan(stage, dtype, _weight_bytes(model), working)


def _expert_bytes(
    config: dict,
    compute: torch.dtype,
    attention: str,
    contract: WanContract,
    frames: int,
    height: int,
    width: int,
    batched_guidance: bool,
) -> tuple[int, int, int]:
    """(weight bytes, bytes FP8 takes off them, working set of one guided step) of an expert of `config`, built
    on the fake tensors of the caller's FakeTensorMode."""
    model = models.expert_from_config(config, compute)
    apply_attention_backend(model, cpu_proxy(attention))
    latents = torch.zeros(contract.latent_shape(config["in_channels"], frames, height, width))
    text = torch.zeros(1, contract.text_tokens, config["text_dim"], dtype=compute)

    # TI2V-5B (expand_timesteps): a timestep per token, as ExpertStage._steps passes it; diffusers then keeps a
    # (tokens, 6, dim) projection through the forward, where one timestep keeps (6, dim)
    tokens = contract.kind.tokens(frames, height, width) if contract.kind.expand_timesteps else 1
    t = torch.full((1, tokens), 500.0) if contract.kind.expand_timesteps else torch.tensor([500.0])

    def guided_step():  # as ExpertStage._steps: conditional, unconditional, combined
        x = latents.to(compute)
        if batched_guidance:
            cond, uncond = model(
                hidden_states=torch.cat([x, x]),
                timestep=torch.cat([t, t]),
                encoder_hidden_states=torch.cat([text, text]),
                return_dict=False,
            )[0].chunk(2)
        else:
            cond = model(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False)[0]
            uncond = model(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False)[0]
        return uncond + 4.0 * (cond - uncond)

    return _weight_bytes(model), fp8_saved_bytes(model), _peak(guided_step, model, latents, text)


@dataclass
class InferencePlan:
    use: str
    """"serve" (each stage on its own device), "batch" or "validation" (one actor holds all four)."""
    frames: int
    height: int
    width: int
    stages: dict[str, StagePlan]
    offload: bool
    device_bytes: int

    def devices(self) -> dict[str, int]:
        """Peak bytes of each device: one per stage when serving; one per batch actor."""
        if self.use == "serve":
            return {s: p.total_bytes for s, p in self.stages.items()}
        actor = f"{self.use} actor"
        if self.offload:
            return {actor: max(p.total_bytes for p in self.stages.values())}
        weights = sum(p.weight_bytes + p.adapter_bytes for p in self.stages.values())
        return {actor: weights + max(p.working_bytes // p.devices for p in self.stages.values())}

    @property
    def fits(self) -> bool:
        return all(b <= HEADROOM * self.device_bytes for b in self.devices().values())

    def lines(self) -> list[str]:
        g = lambda n: f"{n / GB:.2f} GB"
        title, offload_key = {
            "serve": ("Serve", None),
            "batch": ("batch generation", "infer.batch_offload"),
            "validation": ("validation while training", "train.validation.offload"),
        }[self.use]
        out = [
            f"{title} at {self.frames}x{self.height}x{self.width} (frames x height x width)"
            + (f", {offload_key} {'on' if self.offload else 'off'}" if offload_key else "")
        ]
        for s, p in self.stages.items():
            split = f" split over {p.devices} devices" if p.devices > 1 else ""
            adapters = f", adapters {g(p.adapter_bytes)}" if p.adapter_bytes else ""
            out.append(
                f"{STAGE_NAMES[s]} ({p.dtype}): weights {g(p.weight_bytes)}{adapters}, working set "
                f"{g(p.working_bytes)}{split}, total {g(p.total_bytes)}{' per device' if split else ''}"
            )
        for device, n in self.devices().items():
            if offload_key:
                what = (
                    "the largest stage's model and working set: the others wait in host memory"
                    if self.offload
                    else "all four models and the largest working set"
                )
            else:
                what = f"the {STAGE_NAMES[device]}'s device"
            verdict = (
                f"fits ({n / self.device_bytes:.0%} of {g(self.device_bytes)})"
                if n <= HEADROOM * self.device_bytes
                else f"DOES NOT FIT ({n / self.device_bytes:.0%} of {g(self.device_bytes)}; at most "
                f"{HEADROOM:.0%})" + (f": turn on {offload_key}" if offload_key and not self.offload else "")
            )
            out.append(f"{device}: {g(n)}, {what}: {verdict}")
        return out


def plan_inference(cfg: Config, model_dir, use: str) -> InferencePlan:
    """The device memory of serving `model_dir` under cfg (at the largest request infer.max_* admits),
    of batch generation (at data.*, the size generate.py renders) or of the validation actor while
    training (at train.validation's size, against train.device_memory_gb)."""
    i, d, v = cfg.infer, cfg.data, cfg.train.validation
    contract = models.read_contract(model_dir, cfg.model)
    offload, device_gb = False, i.device_memory_gb
    if use == "serve":
        frames, height, width = i.max_frames, i.max_height, i.max_width
        resources: dict[str, Resources] = {s: i.stages[s] for s in STAGES}
    elif use == "batch":
        frames, height, width = d.num_frames, d.height, d.width
        resources, offload = {s: i.batch for s in STAGES}, i.batch_offload
    elif use == "validation":
        frames, height, width = v.num_frames or d.num_frames, v.height or d.height, v.width or d.width
        resources, offload, device_gb = {s: v.worker for s in STAGES}, v.offload, cfg.train.device_memory_gb
    else:
        raise ValueError(f"use must be 'serve', 'batch' or 'validation', got {use!r}")
    adapters = lora_adapters.resolve(i, contract.kind)
    stages = {}
    for s in ("text", *contract.kind.experts, "vae"):  # TI2V-5B: no low-noise stage
        dtype = VAE_DTYPE if s == "vae" else resources[s].dtype
        attention = (
            attention_backend(cfg.model.attention_backend, resources[s].device, dtype, training=False)
            if s in EXPERTS
            else "native"
        )
        tile = i.vae_tile if i.vae_tiling and s == "vae" else 0
        quantize = i.quantize if s in EXPERTS else "none"
        if quantize == "fp8":
            check_fp8(resources[s].device, dtype, f"the {s}-noise expert")
        stages[s] = plan_stage(
            model_dir,
            s,
            dtype,
            contract,
            frames,
            height,
            width,
            attention,
            i.batched_guidance,
            tile,
            quantize,
            i.cache if s in EXPERTS else "none",
        )
        if s in EXPERTS:
            devices = {"serve": i.stages[s].devices, "batch": i.batch_devices, "validation": 1}[use]
            size = torch_dtype(dtype).itemsize
            held = lora_adapters.loaded_bytes(adapters, str(model_dir), s, i.max_loaded_loras, size)
            stages[s] = dataclasses.replace(stages[s], devices=devices, adapter_bytes=held)
    return InferencePlan(use, frames, height, width, stages, offload, int(device_gb * GB))


def print_plan(cfg: Config, use: str, log=print) -> bool:
    """Print the inference memory plan of cfg.model.path (`serve`, `batch` or `validation`); True when it fits."""
    plan = plan_inference(cfg, models.check_model_dir(cfg.model.path), use)
    for line in plan.lines():
        log(f"[plan] {line}")
    return plan.fits
