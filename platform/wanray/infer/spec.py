"""A served model's stages resolved once by the driver (StageSpec: resources, contract, attention backends,
devices), and where a stage's model waits when offloaded (pinned host memory, on the device only while
its stage runs)."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from wanray import context_parallel, models
from wanray.backends import attention_backend
from wanray.config import Config
from wanray.devices import accelerator, torch_dtype
from wanray.errors import ConfigError
from wanray.infer import adapters as lora_adapters
from wanray.infer.cache import Calibration, ratios_path
from wanray.infer.quantize import check_fp8
from wanray.sections import STAGES, Resources
from wanray.wan import EXPERTS, WanContract

M = TypeVar("M", bound=torch.nn.Module)


@dataclass(frozen=True)
class StageSpec:
    """One served model's four stages, resolved once by the driver: the resources of each, the
    Wan2.2 contract of the model directory and the experts' attention backends."""

    model_dir: str
    contract: WanContract
    resources: dict[str, Resources]
    """Each stage's resources (wanray.sections.STAGES: text, high, low, vae)."""
    flow_shift: float | None
    torch_threads: int
    attention: dict[str, str]
    """diffusers attention backend per expert."""
    offload: bool = False
    """Each stage's model waits in host memory and is on its device only while the stage runs (batch actors)."""
    batched_guidance: bool = False
    """Classifier-free guidance as one forward of the conditional and unconditional inputs together."""
    cache: str = "none"
    """infer.cache of the expert stages (wanray.infer.cache)."""
    cache_threshold: float = 0.0
    calibration: Calibration | None = None
    """magcache: the model's calibration (its per-expert ratios)."""
    vae_tile: int = 0
    quantize: str = "none"
    """infer.quantize of the experts (wanray.infer.quantize)."""
    compile_backend: str = ""
    """torch.compile backend of the experts' blocks (infer.compile); empty: eager."""
    """The VAE decodes in tiles of this many pixels (infer.vae_tile with infer.vae_tiling); 0: whole frames."""
    devices: dict[str, int] = field(default_factory=lambda: {e: 1 for e in EXPERTS})
    """Devices of each expert stage: above 1 it runs context-parallel (Ulysses) over that many ranks
    (wanray.infer.group), each ExpertStage one rank of the process group."""
    adapters: lora_adapters.Adapters = field(default_factory=dict)
    """infer.loras resolved to each expert's file, checked against the experts' shapes."""
    max_loaded_loras: int = 4

    @classmethod
    def for_serving(cls, model_dir, cfg: Config) -> StageSpec:
        """Each stage on its own infer.stages.<stage> resources, the experts over their stages' devices. A
        boundary contradicting the directory, an attention backend that cannot run on a stage, or a device
        count the heads cannot be split over is a ConfigError, raised here in the driver."""
        stages = cfg.infer.stages
        spec = cls._make(model_dir, cfg, {s: stages[s] for s in STAGES})
        return spec._split({e: stages[e].devices for e in EXPERTS}, "infer.stages.{}.devices")

    @classmethod
    def for_batch(cls, model_dir, cfg: Config) -> StageSpec:
        """Every stage in one batch-generation actor, on infer.batch; with infer.batch_offload only the
        running stage's model is on the device; with infer.batch_devices > 1 both experts span that many."""
        b, n = cfg.infer.batch, cfg.infer.batch_devices
        spec = cls._make(model_dir, cfg, dict.fromkeys(STAGES, b), cfg.infer.batch_offload)
        return spec._split({"high": n, "low": n}, "infer.batch_devices")

    def _split(self, devices: dict[str, int], where: str) -> StageSpec:
        """These experts over `devices` each: heads the degree cannot split are a ConfigError naming `where`, as
        is an adapter that does not fit its expert (checked here, in the driver, not in a replica)."""
        for e in self.contract.kind.experts:
            heads = models.expert_config(self.model_dir, e)["num_attention_heads"]
            context_parallel.check(devices[e], 1, heads, {}, self.attention[e], where=where.format(e), training=False)
        lora_adapters.check_all(self.adapters, self.model_dir, self.contract.kind, devices)
        return dataclasses.replace(self, devices=devices)

    @classmethod
    def for_validation(cls, model_dir, cfg: Config) -> StageSpec:
        """Every stage in one validation actor (wanray.infer.validation), on train.validation.worker; with
        train.validation.offload only the running stage's model is on the device."""
        v = cfg.train.validation
        return cls._make(model_dir, cfg, dict.fromkeys(STAGES, v.worker), v.offload)._split(
            dict.fromkeys(EXPERTS, 1), "train.validation ({})"
        )

    @classmethod
    def _make(cls, model_dir, cfg: Config, resources: dict[str, Resources], offload: bool = False) -> StageSpec:
        attention = {
            e: attention_backend(cfg.model.attention_backend, resources[e].device, resources[e].dtype, training=False)
            for e in EXPERTS
        }
        contract = models.read_contract(model_dir, cfg.model)
        return cls(
            str(model_dir),
            contract,
            resources,
            cfg.infer.flow_shift,
            cfg.infer.torch_threads,
            attention,
            offload,
            cfg.infer.batched_guidance,
            cfg.infer.cache,
            cfg.infer.cache_threshold,
            calibration(cfg, model_dir, contract),
            cfg.infer.vae_tile if cfg.infer.vae_tiling else 0,
            quantized(cfg, resources, offload),
            cfg.infer.compile_backend if cfg.infer.compile else "",
            adapters=lora_adapters.resolve(cfg.infer, contract.kind),
            max_loaded_loras=cfg.infer.max_loaded_loras,
        )

    def load_device(self, device: torch.device) -> torch.device:
        """Where a stage loads its model: host memory when offloading, else its device."""
        return torch.device("cpu") if self.offload else device

    def hosted(self, module: M, device: torch.device) -> M:
        """A stage's model as loaded: in pinned host memory when offloading (see pin_for)."""
        return pin_for(module, device) if self.offload else module

    def device(self, stage: str) -> torch.device:
        """In the stage's own process: apply the torch thread setting, return the device Ray assigned."""
        if self.torch_threads > 0:
            torch.set_num_threads(self.torch_threads)
        return accelerator(self.resources[stage].device).torch_device()

    def dtype(self, stage: str) -> torch.dtype:
        return torch_dtype(self.resources[stage].dtype)


def quantized(cfg: Config, resources: dict[str, Resources], offload: bool) -> str:
    """infer.quantize, checked against where the experts run (a one-line ConfigError in the driver)."""
    if cfg.infer.quantize == "fp8":
        for e in EXPERTS:
            check_fp8(resources[e].device, resources[e].dtype, f"the {e}-noise expert")
        if cfg.infer.loras:
            raise ConfigError("infer.quantize fp8 does not take infer.loras yet: merge the adapter (export.py) first")
        if offload:
            raise ConfigError(
                "infer.quantize fp8 halves the experts: run without offload (--plan shows whether it fits)"
            )
    return cfg.infer.quantize


def calibration(cfg: Config, model_dir, contract: WanContract) -> Calibration | None:
    """With infer.cache magcache, the model's calibration, with ratios for each of its experts (else a
    one-line ConfigError, raised in the driver)."""
    if cfg.infer.cache != "magcache":
        return None
    found = Calibration.read(ratios_path(cfg.infer.cache_ratios, model_dir))
    for e in contract.kind.experts:
        found.expert(e, contract.kind.experts)
    return found


def _tensors(module: torch.nn.Module) -> list[torch.Tensor]:
    return [*module.parameters(), *module.buffers()]


def pin_for(module: M, device: torch.device) -> M:
    """An offloaded model waits in page-locked host memory when its device is an accelerator: copies
    from it run at the link's speed without a staging buffer (pageable memory stays if pinning fails)."""
    if device.type == "cpu":
        return module
    try:
        with torch.no_grad():
            for t in _tensors(module):
                t.data = t.data.pin_memory()
    except RuntimeError as e:
        logging.getLogger(__name__).warning(
            "could not pin %s in host memory (%s): offloading from pageable memory", type(module).__name__, e
        )
    return module


@contextlib.contextmanager
def resident(module: torch.nn.Module, device: torch.device, offload: bool):
    """`module` on `device` for the block. Offloaded (batch actors), its weights wait in host memory
    and are copied to the device when its stage runs, as diffusers' model offload and the official
    sampler's --offload_model do; afterwards the device copy is dropped and the host copy serves again,
    with no copy back, since inference never changes weights. On an H200 (benchmarks/device_check.py)
    the 28.6 GB bf16 expert came to the device from pinned memory in 0.5 s; Module.to, which offloading
    used before, took 21 to 30 s to move it to host memory and 4.4 s back."""
    if not offload:
        yield
        return
    # Each module's parameter and buffer slots get device copies and then their host tensors back
    # (the objects themselves: no set_data, which some device types refuse across devices).
    slots = [
        (table, name, t)
        for m in module.modules()
        for table in (m._parameters, m._buffers)
        for name, t in table.items()
        if t is not None
    ]
    copies: dict[int, Any] = {}  # a tied tensor is copied once
    try:
        for table, name, t in slots:
            if id(t) not in copies:
                copy = t.detach().to(device, non_blocking=True)
                copies[id(t)] = torch.nn.Parameter(copy, t.requires_grad) if isinstance(t, torch.nn.Parameter) else copy
            table[name] = copies[id(t)]
        yield
    finally:
        for table, name, t in slots:
            table[name] = t  # type: ignore[assignment]  # the slot's own tensor back
