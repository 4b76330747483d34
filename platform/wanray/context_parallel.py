"""Context parallelism: one sample's token sequence split over a group of ranks (Ulysses, ring, or both).

    ranks (row-major mesh dp x ring x ulysses)      one context-parallel group = ring x ulysses ranks
    ┌ dp 0: ranks 0 .. C-1 ─ read the same clips ─ each holds 1/C of every sample's tokens
    └ dp 1: ranks C .. 2C-1 ...                     (C = ring x ulysses)

diffusers does the work: the Wan transformer's `_cp_plan` splits the sequence where it enters
the first block (and the RoPE tables with it) and gathers it at `proj_out`, and its attention
dispatcher runs Ulysses (an all-to-all from sequence shards to head shards and back) or ring
attention (key/value chunks passed around, partial results merged by their log-sum-exp). The
gathered output is whole on every rank of a group, and its backward hands each rank the
gradient of its own shard, so the parameter gradients of a group's ranks sum to the sample's.

What wanray adds, and why:
- `enable`: diffusers' `enable_parallelism` takes the device as `rank % accelerator count`,
  which divides by zero on a CPU-only worker and names the wrong device under Ray (each worker
  sees only its own); the mesh and device come from the caller instead.
- ring attention goes through wanray.ring_attention: a corrected backward (diffusers 0.42.1 sends
  key/value gradients the wrong way round a ring of 3 or more) and the log-sum-exp op the native
  backend lacks, tiled.
- the backends that can run context-parallel are those diffusers registers as such, read from its
  registry, so a backend it lists but does not register (0.42.1's `_flash_3`) fails here in one line
  rather than in every worker.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from wanray import ring_attention
from wanray.errors import ConfigError

NO_BACKWARD = ("_native_npu", "sage", "sage_hub")
"""Context-parallel backends whose diffusers op raises NotImplementedError in backward (0.42.1): inference only."""


def context_parallel_backends() -> tuple[str, ...]:
    """The attention backends diffusers runs context-parallel: those registered with
    `supports_context_parallel=True` in its dispatcher."""
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    return tuple(sorted(_AttentionBackendRegistry._supports_context_parallel))


def training_backend(cfg) -> str:
    """The attention backend the training workers run: model.attention_backend's choice for the worker device
    (wanray.config.attention_backend), except that with context parallelism the NPU default, torch_npu's fused
    kernel whose diffusers op has no context-parallel backward, becomes native, whose ring op wanray runs on
    that same kernel (wanray.ring_attention)."""
    from wanray.backends import attention_backend

    worker = cfg.train.worker
    attention = attention_backend(cfg.model.attention_backend, worker.device, worker.dtype, training=True)
    if cfg.train.context_parallel.degree > 1 and cfg.model.attention_backend is None and attention in NO_BACKWARD:
        return "native"
    return attention


def check(
    ulysses: int,
    ring: int,
    heads: int,
    token_counts: dict[str, int],
    attention: str,
    where: str = "train.context_parallel",
    training: bool = True,
) -> None:
    """A configuration that cannot work is a one-line ConfigError naming the constraint, before any worker
    starts. token_counts: tokens per sample of each bucket (name -> count)."""
    degree = ulysses * ring
    if degree == 1:
        return
    if heads % ulysses:
        raise ConfigError(
            f"{where}: ulysses = {ulysses} must divide the transformer's {heads} attention heads "
            "(Ulysses gives each rank whole heads)"
        )
    for name, tokens in token_counts.items():
        if tokens % degree:
            raise ConfigError(
                f"{where}: ulysses x ring = {degree} must divide every sample's tokens; bucket {name} has {tokens}"
            )
    if training:
        ring_attention.check_version(ring, where)
    usable = [b for b in context_parallel_backends() if not (training and b in NO_BACKWARD)]
    if attention not in usable:
        raise ConfigError(
            f"{where}: attention backend {attention!r} has no context-parallel "
            f"{'backward' if training else 'support'} in diffusers; set model.attention_backend to one "
            f"of {', '.join(usable)}"
        )


def mesh(device: torch.device, ulysses: int, ring: int):
    """The (dp, ring, ulysses) device mesh over every rank: consecutive ranks form a context-parallel group."""
    from torch.distributed.device_mesh import init_device_mesh

    world = dist.get_world_size()
    return init_device_mesh(
        device.type, (world // (ulysses * ring), ring, ulysses), mesh_dim_names=("dp", "ring", "ulysses")
    )


def enable(model, ulysses: int, ring: int, device_mesh, device: torch.device) -> None:
    """Route `model` (a diffusers transformer with a `_cp_plan`, possibly on the meta device) through
    diffusers' context parallelism over `device_mesh`'s ring and ulysses dimensions."""
    from diffusers import ContextParallelConfig
    from diffusers.models._modeling_parallel import ParallelConfig

    def resolve(config):  # diffusers' own: see the module docstring
        config = ParallelConfig(context_parallel_config=config)
        config.setup(dist.get_rank(), dist.get_world_size(), device, mesh=device_mesh)
        model._parallel_config = config
        return config

    if ring > 1:
        ring_attention.install()
    model._resolve_parallel_config = resolve
    model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=ulysses, ring_degree=ring, mesh=device_mesh))
