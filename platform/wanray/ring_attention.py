"""Ring attention as wanray trains with it: diffusers' ring with a corrected backward, and the
log-sum-exp op its native backend lacks, tiled so that its working set stays bounded.

    rank r of a ring of N holds the queries, keys and values of its 1/N of the tokens
    forward (diffusers): all-gather every rank's key/value chunk; at step i attend to chunk (r + i) % N
                         and merge the partial outputs by their log-sum-exp
    backward (here):     at step i the gradient of chunk (r + i) % N accumulates on rank r, then moves
                         to rank r - 1, which handles that chunk at step i + 1; after N steps each
                         chunk's gradient sits with the rank that owns it

Why wanray replaces the backward: diffusers 0.42.1's `TemplatedRingAttention.backward` sends the
accumulated key/value gradient to rank r + 1 (its `next_ranks` permutation) where rank r - 1 needs
it. With 2 ranks both are the same rank; with 3 or more the query gradient and the forward stay
exact while dK and dV are O(1) wrong (ring 3 on gloo: relative error 0.97-1.09 in the key
projections' gradients against the unsplit model). `install()` swaps diffusers' class for
`corrected_ring_class()` in its attention dispatcher, which looks the class up by name for ring
and for Ulysses x ring alike. The correction is written against diffusers `FIXED_RING_VERSION`'s
forward (chunk order, the `ring_out`/`ring_lse` it stashes); `check_version` refuses ring training
on any other version.

The native backend (torch SDPA) returns no log-sum-exp, which ring merging needs. `lse_forward` /
`lse_backward` compute it exactly: on an NPU through torch_npu's fused `npu_fusion_attention`
(its softmax max and sum give the log-sum-exp; `npu_fusion_attention_grad`, given the merged
output and log-sum-exp as max and a sum of 1, gives one chunk's share of the gradients, as
MindSpeed's ring attention uses it), elsewhere with plain matmuls over tiles of at most
`TILE_BYTES` of float32 scores (a group of heads x a block of queries x every key of the chunk).
Untiled, one chunk's scores for all 40 heads of an A14B expert at 32,760 tokens over ring 2 are
40 x 16,380^2 x 4 bytes = 42.9 GB per tensor.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator

import torch

from wanray.errors import ConfigError

FIXED_RING_VERSION = "0.42.1"
"""The diffusers release whose ring backward `corrected_ring_class` replaces (see the module docstring)."""
PROVEN_RING_DEGREES = (2, 3, 4)
"""Ring degrees whose training gradients tests compare with the unsplit model's (tests/test_unit_ring_attention.py,
alone and times Ulysses 2; ring 3 also in a Ray Train run)."""
TILE_BYTES = 256 * 2**20
"""Float32 score bytes of one tile of the tiled op: 4,096 queries x 16,380 keys of one head at the A14B
preset over ring 2. The forward and the backward each hold at most two (see `tiled_working_bytes`)."""
NPU_DTYPES = (torch.float16, torch.bfloat16)
"""What torch_npu's fused attention takes; float32 on an NPU goes through the tiled op."""


def check_version(ring: int, where: str) -> None:
    """Ring training runs only where its gradients are proven: the degrees tested, on the diffusers release
    whose backward wanray corrects."""
    if ring == 1:
        return
    if ring not in PROVEN_RING_DEGREES:
        raise ConfigError(
            f"{where}: ring = {ring} is not a proven ring degree (wanray's tests prove "
            f"{', '.join(map(str, PROVEN_RING_DEGREES))} against unsplit gradients); use one of those, "
            "or Ulysses for the rest of the split"
        )
    import diffusers

    if diffusers.__version__ != FIXED_RING_VERSION:
        raise ConfigError(
            f"{where}: ring attention training is proven on diffusers {FIXED_RING_VERSION} (wanray "
            f"corrects its ring backward), not on the installed {diffusers.__version__}; use Ulysses "
            "(ring = 1)"
        )


@functools.cache
def corrected_ring_class():
    """diffusers' TemplatedRingAttention with the backward described in the module docstring."""
    import torch.distributed._functional_collectives as funcol
    from diffusers.models import attention_dispatch as ad

    class CorrectedRingAttention(ad.TemplatedRingAttention):
        @staticmethod
        def backward(ctx, grad_out, *args):
            cp = ctx._parallel_config.context_parallel_config
            group, rank, world = cp._ring_mesh.get_group(), cp._ring_local_rank, cp.ring_degree
            to_previous = [(r - 1) % world for r in range(world)]  # funcol: src_dst[m] = n means m sends to n
            accumulate = torch.float32 if cp.convert_to_fp32 else grad_out.dtype
            query, key, value, *_ = ctx.saved_tensors
            out, lse = ctx.ring_out, ctx.ring_lse
            # every chunk, as the forward gathered them: 2 x tokens x heads x head_dim elements per rank
            chunks = funcol.all_gather_tensor(
                torch.cat([key.flatten(), value.flatten()]), gather_dim=0, group=group
            ).chunk(world)
            grad_query = torch.zeros(ctx.q_shape, dtype=accumulate, device=grad_out.device)
            passed = None
            for i in range(world):
                chunk = chunks[(rank + i) % world]
                k, v = chunk[: key.numel()].view_as(key), chunk[key.numel() :].view_as(value)
                dq, dk, dv, *_ = ctx.backward_op(ctx, grad_out, query=query, key=k, value=v, out=out, lse=lse)
                grad_query += dq
                mine = torch.cat([dk.flatten(), dv.flatten()]).to(accumulate)
                if passed is not None:  # chunk (rank + i)'s gradient from steps 0 .. i-1, from rank + 1
                    mine += ad._wait_tensor(passed)
                passed = funcol.permute_tensor(mine, to_previous, group=group)
            grad_kv = ad._wait_tensor(passed)  # chunk `rank`'s whole gradient, from rank + 1
            grad_key = grad_kv[: key.numel()].view_as(key).to(grad_out.dtype)
            grad_value = grad_kv[key.numel() :].view_as(value).to(grad_out.dtype)
            return grad_query.to(grad_out.dtype), grad_key, grad_value, *([None] * 9)

    return CorrectedRingAttention


def install() -> None:
    """Route diffusers' ring (and Ulysses x ring) attention through the corrected backward and give its
    native backend the log-sum-exp (once per process)."""
    from diffusers.models import attention_dispatch as ad

    ad.TemplatedRingAttention = corrected_ring_class()
    installed = ad._native_attention_forward_op
    if isinstance(installed, functools.partial) and installed.func is lse_forward:
        return
    forward = functools.partial(lse_forward, _sdpa=ad._native_attention_forward_op)
    backward = functools.partial(lse_backward, _sdpa_backward=ad._native_attention_backward_op)
    ad._native_attention_forward_op, ad._native_attention_backward_op = forward, backward


def lse_forward(
    ctx,
    query,
    key,
    value,
    attn_mask=None,
    dropout_p=0.0,
    is_causal=False,
    scale=None,
    enable_gqa=False,
    return_lse=False,
    _save_ctx=True,
    _parallel_config=None,
    _sdpa=None,
):
    """diffusers' native forward op, plus an exact log-sum-exp when ring asks for one (model layout:
    q, k, v (B, S, H, D), lse (B, S, H))."""
    if not return_lse:
        return _sdpa(
            ctx,
            query,
            key,
            value,
            attn_mask,
            dropout_p,
            is_causal,
            scale,
            enable_gqa,
            False,
            _save_ctx=_save_ctx,
            _parallel_config=_parallel_config,
        )
    if attn_mask is not None or dropout_p or is_causal or enable_gqa:
        raise ValueError("wanray's ring attention op takes no mask, dropout, causal masking or GQA")
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    if _save_ctx:
        ctx.save_for_backward(query, key, value)
        ctx.scale = scale
    if fused_npu(query):
        return _npu_forward(query, key, value, scale)
    return tiled_forward(query, key, value, scale)


def lse_backward(
    ctx, grad_out, *args, query=None, key=None, value=None, out=None, lse=None, _sdpa_backward=None, **kwargs
):
    """Ring's backward for one key/value chunk, from the merged output and log-sum-exp."""
    if key is None:  # not ring: diffusers' own recompute through SDPA
        return _sdpa_backward(ctx, grad_out, *args, **kwargs)
    if fused_npu(query):
        return _npu_backward(query, key, value, out, grad_out, lse, ctx.scale)
    return tiled_backward(query, key, value, out, grad_out, lse, ctx.scale)


def _tiles(heads: int, queries: int, keys: int, tile_bytes: int) -> Iterator[tuple[slice, list[slice]]]:
    """(a group of heads, its blocks of queries) such that a float32 score tile (heads x block x keys) is at most
    tile_bytes, or one head x one query where even a row is larger."""
    row = 4 * keys
    rows = max(1, min(queries, tile_bytes // row))
    group = max(1, min(heads, tile_bytes // (row * queries))) if rows == queries else 1
    blocks = [slice(q, q + rows) for q in range(0, queries, rows)]
    for h in range(0, heads, group):
        yield slice(h, h + group), blocks


def tiled_forward(query, key, value, scale: float, tile_bytes: int = TILE_BYTES):
    """Attention of (B, S, H, D) queries over one key/value chunk, and its log-sum-exp (B, S, H) in float32,
    one score tile at a time."""
    out = torch.empty_like(query)
    lse = torch.empty(query.shape[:3], dtype=torch.float32, device=query.device)
    q4, k4, v4, o4 = (x.permute(0, 2, 1, 3) for x in (query, key, value, out))  # (B, H, S, D) views
    lse3 = lse.permute(0, 2, 1)
    for b in range(query.shape[0]):
        for hs, blocks in _tiles(query.shape[2], query.shape[1], key.shape[1], tile_bytes):
            k, v = k4[b, hs].float(), v4[b, hs].float()
            for qs in blocks:
                scores = torch.bmm(q4[b, hs, qs].float(), k.transpose(1, 2)).mul_(scale)
                tile_lse = torch.logsumexp(scores, dim=-1)  # allocates a second tile (exp of the shifted scores)
                probabilities = scores.sub_(tile_lse[..., None]).exp_()  # in place: one tile alive
                o4[b, hs, qs] = (probabilities @ v).to(out.dtype)
                lse3[b, hs, qs] = tile_lse
    return out, lse


def tiled_backward(query, key, value, out, grad_out, lse, scale: float, tile_bytes: int = TILE_BYTES):
    """One chunk's share of dQ and its dK, dV from the merged output and log-sum-exp (flash attention's
    backward: P = exp(S - lse), dV = P^T dO, dS = P o (dO V^T - rowsum(dO o O)), dQ = dS K, dK = dS^T Q)."""
    grad_query, grad_key, grad_value = (torch.empty_like(x) for x in (query, key, value))
    q4, k4, v4, o4, do4, dq4, dk4, dv4 = (
        x.permute(0, 2, 1, 3) for x in (query, key, value, out, grad_out, grad_query, grad_key, grad_value)
    )
    lse3 = lse.permute(0, 2, 1)
    for b in range(query.shape[0]):
        for hs, blocks in _tiles(query.shape[2], query.shape[1], key.shape[1], tile_bytes):
            k, v = k4[b, hs].float(), v4[b, hs].float()
            dk, dv = torch.zeros_like(k), torch.zeros_like(v)
            for qs in blocks:
                q, do = q4[b, hs, qs].float(), do4[b, hs, qs].float()
                delta = (do * o4[b, hs, qs].float()).sum(-1, keepdim=True)
                p = torch.baddbmm(-lse3[b, hs, qs].float()[..., None], q, k.transpose(1, 2), alpha=scale).exp_()
                dv += p.transpose(1, 2) @ do
                ds = (do @ v.transpose(1, 2)).sub_(delta).mul_(p)  # dS, in place: two tiles alive
                del p
                dq4[b, hs, qs] = (ds @ k * scale).to(grad_query.dtype)
                dk += ds.transpose(1, 2) @ q * scale
            dk4[b, hs], dv4[b, hs] = dk.to(grad_key.dtype), dv.to(grad_value.dtype)
    return grad_query, grad_key, grad_value


def tiled_working_bytes(query_shape, key_shape, tile_bytes: int = TILE_BYTES) -> int:
    """Bytes the tiled forward or backward allocates beyond its inputs and outputs, at most: two float32 score
    tiles, and for each head of a tile's group six float32 keys x head_dim tensors (the keys and values cast,
    their gradient accumulators, the products added to them) and the tile's float32 queries x head_dim
    tensors (queries, output gradient, output, their products: six) and four per-query terms."""
    _, queries, heads, dim = query_shape
    keys = key_shape[1]
    heads_slice, blocks = next(_tiles(heads, queries, keys, tile_bytes))
    group, rows = heads_slice.stop - heads_slice.start, blocks[0].stop - blocks[0].start
    return 2 * 4 * group * rows * keys + group * 4 * (6 * keys * dim + 6 * rows * dim + 4 * rows)


def ring_working_bytes(
    batch: int, tokens: int, heads: int, head_dim: int, ulysses: int, ring: int, compute_bytes: int, tiled: bool
) -> int:
    """Bytes one ring attention call of a sample of `tokens` allocates at its peak, in the backward, beyond its
    inputs. A rank's chunk after Ulysses is batch x tokens/ring x heads/ulysses x head_dim elements (c bytes
    each); it holds every rank's keys and values gathered ((ring + 1) x 2 chunks, with its own flattened), the
    chunk op's three gradients (3 chunks) and, in float32, the query gradient, the key/value gradient it adds
    to, the one it receives and the one it sends (4 + 3 x 8 bytes a chunk element), and while it casts, two
    more chunks; plus the tiled op's working set on the native backend."""
    rows, local_heads = tokens // ring, heads // ulysses
    chunk = batch * rows * local_heads * head_dim
    op = tiled_working_bytes((1, rows, local_heads, head_dim), (1, rows, local_heads, head_dim)) if tiled else 0
    return 2 * (ring + 1) * compute_bytes * chunk + (28 + 5 * compute_bytes) * chunk + op


def fused_npu(query: torch.Tensor) -> bool:
    """Whether this chunk runs through torch_npu's fused attention: on an NPU, in a dtype it takes, where the
    installed torch_npu has both the fused forward and its gradient (else the tiled op)."""
    if query.device.type != "npu" or query.dtype not in NPU_DTYPES:
        return False
    import torch_npu

    return hasattr(torch_npu, "npu_fusion_attention") and hasattr(torch_npu, "npu_fusion_attention_grad")


def _npu_forward(query, key, value, scale: float):
    """torch_npu's fused attention in diffusers' (B, S, H, D) layout ("BSND"); its softmax max and sum
    ((B, H, S, 8), the value repeated over the last dim) give the log-sum-exp."""
    import torch_npu

    out, softmax_max, softmax_sum, *_ = torch_npu.npu_fusion_attention(
        query, key, value, query.shape[2], "BSND", scale=scale
    )
    lse = softmax_max[..., 0] + torch.log(softmax_sum[..., 0])
    return out, lse.transpose(1, 2)


def _npu_backward(query, key, value, out, grad_out, lse, scale: float):
    """One chunk's gradients from torch_npu's fused backward, given the merged log-sum-exp as the softmax
    max and a softmax sum of 1 (so P = exp(S - lse)) and the merged output (rowsum(dO o O))."""
    import torch_npu

    stats = lse.transpose(1, 2).float()[..., None].expand(*lse.transpose(1, 2).shape, 8).contiguous()
    dq, dk, dv, *_ = torch_npu.npu_fusion_attention_grad(
        query,
        key,
        value,
        grad_out,
        query.shape[2],
        "BSND",
        softmax_max=stats,
        softmax_sum=torch.ones_like(stats),
        attention_in=out.to(query.dtype),
        scale_value=scale,
    )
    return dq, dk, dv
