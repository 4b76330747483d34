"""Sharding, mixed precision, activation checkpointing and weight loading: all FSDP2 lives here.

The expert is built on the meta device, sharded with `fully_shard` per transformer block
and then the root, given storage for its local shards only, and loaded shard by shard
(straight from the safetensors file, each rank reading just its rows, or from a DCP copy).
No rank ever materialises the whole unsharded expert: 14B x 4 bytes = 56 GB would not
fit a 64 GB NPU next to activations.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from wanray import models
from wanray.devices import apply_attention_backend, check_compile_backend, torch_dtype
from wanray.models import block_linear


def build_on_meta(model_path, expert: str, lora=None, attention_backend: str | None = None):
    """The expert's module with parameters on the meta device and real (CPU) buffers, its attention
    routed through diffusers' `attention_backend` when one is named."""
    from accelerate import init_empty_weights
    from diffusers import WanTransformer3DModel

    config = models.expert_config(model_path, expert)
    with init_empty_weights(include_buffers=False):  # rope tables stay real: they are computed, not loaded
        model = WanTransformer3DModel.from_config(config)
    if lora is not None and lora.enabled:
        from peft import LoraConfig

        model.requires_grad_(False)
        model.add_adapter(
            LoraConfig(
                r=lora.rank, lora_alpha=lora.alpha, target_modules=list(lora.target_modules), init_lora_weights=True
            )
        )
    if attention_backend is not None:
        apply_attention_backend(model, attention_backend)
    return model


def apply_fsdp(
    model,
    device: torch.device,
    param_dtype: str,
    reduce_dtype: str,
    activation_checkpointing: bool,
    compile_backend: str = "",
    float8: bool = False,
):
    """Shard each transformer block, then the root, over all ranks (one flat data-parallel mesh); with
    `float8`, the blocks' Linear layers train in float8 first (convert_float8), with `compile_backend` each
    block is compiled before it is sharded (torchtitan's order: float8, compile, FSDP2).

    Mixed precision: parameters are all-gathered and computed in param_dtype, except the time
    embedder, which stays float32 as diffusers keeps it. diffusers also keeps the blocks'
    scale_shift_table and norm weights in float32 (`_keep_in_fp32_modules`); here they are gathered
    in param_dtype with their block (FSDP2 sets precision per sharded group, and they are not
    modules of their own), while the arithmetic they enter stays float32 (the blocks compute
    `scale_shift_table + temb.float()` and FP32LayerNorm). Forward inputs are never cast
    (cast_forward_inputs=False): by default FSDP2 would cast the float timestep to bf16, which steps
    by 4 between 512 and 1024 (874.9 -> 876, across the boundary), and the RoPE tables the root hands
    each block. The caller casts latents and text to param_dtype itself.
    """
    if activation_checkpointing:
        model.enable_gradient_checkpointing()  # diffusers recomputes each block in backward
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    mp = MixedPrecisionPolicy(
        param_dtype=torch_dtype(param_dtype), reduce_dtype=torch_dtype(reduce_dtype), cast_forward_inputs=False
    )
    fp32 = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32, cast_forward_inputs=False)
    fully_shard(model.condition_embedder.time_embedder, mesh=mesh, mp_policy=fp32)
    if float8:
        convert_float8(model)
    if compile_backend:
        check_compile_backend(compile_backend, "train.compile_backend")
    for block in model.blocks:
        if compile_backend:
            block.compile(backend=compile_backend)
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return model


def convert_float8(model) -> int:
    """Swap the blocks' Linear layers for torchao's Float8Linear (dynamic per-tensor scales; weights all-gathered by
    FSDP2 in float8: enable_fsdp_float8_all_gather), as torchtitan's float8 training does; layers whose dimensions
    are not multiples of 16 (float8 matmuls need them) stay. The number converted."""
    try:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    except ImportError:
        from wanray.errors import ConfigError

        raise ConfigError("train.float8 needs torchao on the training workers: pip install 'wanray[fp8]'") from None

    def chosen(module, name: str) -> bool:
        return block_linear(module, name) and module.in_features % 16 == 0 and module.out_features % 16 == 0

    count = sum(chosen(m, n) for n, m in model.named_modules())
    convert_to_float8_training(
        model, config=Float8LinearConfig(enable_fsdp_float8_all_gather=True), module_filter_fn=chosen
    )
    return count


def materialize(model, device: torch.device) -> None:
    """Allocate local shards on `device`; buffers keep the values computed at construction."""
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    model.to_empty(device=device)
    with torch.no_grad():
        for name, b in model.named_buffers():
            b.copy_(buffers[name])


def checkpoint_name(param_name: str) -> str | None:
    """The diffusers tensor name of a parameter (None for LoRA adapter parameters)."""
    if ".lora_" in param_name:
        return None
    return param_name.replace(".base_layer.", ".")


def _local_slices(p: torch.Tensor) -> tuple[torch.Tensor, tuple[slice, ...]]:
    """(this rank's local tensor, the index of it in the full tensor)."""
    if not isinstance(p, DTensor):
        return p, tuple(slice(0, n) for n in p.shape)
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    return p.to_local(), tuple(slice(o, o + n) for o, n in zip(offset, shape))


@torch.no_grad()
def load_expert_shards(model, model_path, expert: str) -> None:
    """Fill each rank's local shards of the expert's weights (not LoRA adapters) from its safetensors,
    reading only those rows."""
    with models.ExpertWeights(model_path, expert) as weights:
        for name, p in model.named_parameters():
            key = checkpoint_name(name)
            if key is None:
                continue
            local, index = _local_slices(p)
            if local.numel():
                local.copy_(weights.get_slice(key)[index])


@torch.no_grad()
def init_lora(model, seed: int) -> None:
    """Adapter init after materialisation: A ~ kaiming-uniform (same on all ranks, by seed), B = 0."""
    g = torch.Generator().manual_seed(seed)
    for name, p in sorted(model.named_parameters()):
        if ".lora_" not in name:
            continue
        local, index = _local_slices(p)
        if ".lora_B." in name:
            local.zero_()
        else:
            fan_in = p.shape[1]
            full = (torch.rand(p.shape, generator=g) * 2 - 1) / fan_in**0.5
            local.copy_(full[index].to(local.dtype))


def trainable_parameters(model) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def shard_stats(model, optimizer) -> dict:
    """Bytes of parameters and optimizer state held by this rank, and over how many ranks params are sharded."""

    def local_bytes(t: torch.Tensor) -> int:
        t = t.to_local() if isinstance(t, DTensor) else t
        return t.numel() * t.element_size()

    params = list(model.parameters())
    states = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0]
    return {
        "param_bytes": sum(local_bytes(p) for p in params),
        "optimizer_bytes": sum(local_bytes(v) for v in states),
        "params_sharded_over": min(p.device_mesh.size() if isinstance(p, DTensor) else 1 for p in params),
    }
