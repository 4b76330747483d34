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
- `_lse_forward` / `_lse_backward`: ring attention needs each chunk's log-sum-exp, which torch's
  SDPA (diffusers' "native" backend, the default on CPU and the one that trains on NPU) does not
  return. These compute it exactly with plain matmuls, materialising one (S/C) x (S/C) score block
  per head at a time: right for CPU runs and tests; on CUDA, `_native_cudnn` / `_native_flash`
  return it from their kernels and diffusers uses them directly.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from wanray.errors import ConfigError

CONTEXT_PARALLEL_BACKENDS = ("native", "_native_cudnn", "_native_flash", "flash", "_flash_3", "_native_npu", "sage")
"""The attention backends diffusers runs context-parallel (its `supports_context_parallel`)."""
NO_BACKWARD = ("_native_npu", "sage")
"""Of those, the ones whose context-parallel op has no backward in diffusers: inference only."""


def check(ulysses: int, ring: int, heads: int, token_counts: dict[str, int], attention: str,
          where: str = "train.context_parallel", training: bool = True) -> None:
    """A configuration that cannot work is a one-line ConfigError naming the constraint, before any worker
    starts. token_counts: tokens per sample of each bucket (name -> count)."""
    degree = ulysses * ring
    if degree == 1:
        return
    if heads % ulysses:
        raise ConfigError(f"{where}: ulysses = {ulysses} must divide the transformer's {heads} attention heads "
                          "(Ulysses gives each rank whole heads)")
    for name, tokens in token_counts.items():
        if tokens % degree:
            raise ConfigError(f"{where}: ulysses x ring = {degree} must divide every sample's tokens; bucket {name} "
                              f"has {tokens}")
    usable = [b for b in CONTEXT_PARALLEL_BACKENDS if not (training and b in NO_BACKWARD)]
    if attention not in usable:
        raise ConfigError(f"{where}: attention backend {attention!r} has no context-parallel "
                          f"{'backward' if training else 'support'} in diffusers; set model.attention_backend to one "
                          f"of {', '.join(usable)}")


def mesh(device: torch.device, ulysses: int, ring: int):
    """The (dp, ring, ulysses) device mesh over every rank: consecutive ranks form a context-parallel group."""
    from torch.distributed.device_mesh import init_device_mesh

    world = dist.get_world_size()
    return init_device_mesh(device.type, (world // (ulysses * ring), ring, ulysses),
                            mesh_dim_names=("dp", "ring", "ulysses"))


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
        _native_ring_support()
    model._resolve_parallel_config = resolve
    model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=ulysses, ring_degree=ring, mesh=device_mesh))


def _lse_forward(ctx, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                 enable_gqa=False, return_lse=False, _save_ctx=True, _parallel_config=None, _sdpa=None):
    """diffusers' native forward op, plus an exact log-sum-exp when asked (model layout: q, k, v
    (B, S, H, D), lse (B, S, H))."""
    if not return_lse:
        return _sdpa(ctx, query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, False,
                     _save_ctx=_save_ctx, _parallel_config=_parallel_config)
    if attn_mask is not None or dropout_p or is_causal or enable_gqa:
        raise ValueError("wanray's ring attention op takes no mask, dropout, causal masking or GQA")
    q, k, v = (x.transpose(1, 2).float() for x in (query, key, value))  # (B, H, S, D)
    scores = q @ k.transpose(-1, -2) * (q.shape[-1] ** -0.5 if scale is None else scale)
    lse = torch.logsumexp(scores, dim=-1)
    out = (torch.exp(scores - lse[..., None]) @ v).transpose(1, 2).to(query.dtype)
    if _save_ctx:
        ctx.save_for_backward(query, key, value)
        ctx.scale = scale
    return out, lse.transpose(1, 2)


def _lse_backward(ctx, grad_out, *args, query=None, key=None, value=None, out=None, lse=None, _sdpa_backward=None,
                  **kwargs):
    """Ring's backward for one key/value chunk from the merged output and log-sum-exp (the flash
    attention backward: P = exp(S - lse), dV = P^T dO, dS = P (dO V^T - rowsum(dO o O)))."""
    if key is None:  # not ring: diffusers' own recompute through SDPA
        return _sdpa_backward(ctx, grad_out, *args, **kwargs)
    q, k, v, o, do = (x.transpose(1, 2).float() for x in (query, key, value, out, grad_out))
    scale = q.shape[-1] ** -0.5 if ctx.scale is None else ctx.scale
    p = torch.exp(q @ k.transpose(-1, -2) * scale - lse.transpose(1, 2).float()[..., None])
    grad_v = p.transpose(-1, -2) @ do
    ds = p * (do @ v.transpose(-1, -2) - (do * o).sum(-1, keepdim=True))
    grad_q, grad_k = ds @ k * scale, ds.transpose(-1, -2) @ q * scale
    return tuple(g.transpose(1, 2).to(query.dtype) for g in (grad_q, grad_k, grad_v))


def _native_ring_support() -> None:
    """Give diffusers' native backend the log-sum-exp ring attention needs (once per process)."""
    import functools

    from diffusers.models import attention_dispatch as ad

    if getattr(ad._native_attention_forward_op, "wanray_lse", False):
        return
    forward = functools.partial(_lse_forward, _sdpa=ad._native_attention_forward_op)
    backward = functools.partial(_lse_backward, _sdpa_backward=ad._native_attention_backward_op)
    forward.wanray_lse = backward.wanray_lse = True
    ad._native_attention_forward_op, ad._native_attention_backward_op = forward, backward
