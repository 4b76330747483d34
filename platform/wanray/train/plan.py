"""A dry run of one expert's training memory per rank: no weights, no accelerator, no Ray.

    expert config.json ─► model on the meta device ─► FSDP2 over a fake process group of train.workers
    ranks (torch's "fake" backend, as torchtitan's dry runs) ─► rank 0's parameter, gradient and AdamW
    shards, the bf16 blocks it gathers
    + activations of train.batch_size clips of data.num_frames x height x width, from bytes measured on
      the real diffusers blocks at small sizes (see ActivationModel)
    ─► the total against train.device_memory_gb

Everything is in GB (1e9 bytes). Rank 0 holds the largest shards (FSDP2 splits dim 0 like torch.chunk).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from wanray.config import Config
from wanray.devices import apply_attention_backend, torch_dtype

GB = 1e9
HEADROOM = 0.9
"""Share of device memory the plan lets the estimate use: the rest is left to the allocator's
fragmentation, kernel workspaces and communication buffers, which the plan does not model."""


@dataclass(frozen=True)
class ActivationModel:
    """Bytes saved for backward, linear in the sizes of the expert (fitted by `measure_activations`):
    saved(T tokens) = T * (d * dim + f * ffn + c) + k * dim, per transformer block without activation
    checkpointing (`block`), per block with it (`checkpointed`: the block's inputs), and for the layers
    outside the blocks (`rest`)."""

    block: tuple[float, float, float, float]
    checkpointed: tuple[float, float, float, float]
    rest: tuple[float, float, float, float]

    @staticmethod
    def bytes(coef, tokens: int, dim: int, ffn: int, clips: int = 1) -> float:
        """Over `tokens` tokens of `clips` clips (k: per clip, its text)."""
        d, f, c, k = coef
        return tokens * (d * dim + f * ffn + c) + clips * k * dim


def _saved_bytes(model, inputs: dict) -> int:
    """Bytes of the distinct tensors autograd saves in one forward (parameters and inputs excluded)."""
    exclude = {p.untyped_storage().data_ptr() for p in model.parameters()}
    exclude |= {t.untyped_storage().data_ptr() for t in inputs.values()}
    seen: dict[int, int] = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(**inputs, return_dict=False)
    return sum(n for ptr, n in seen.items() if ptr not in exclude)


def _tiny_expert(
    dim: int, ffn: int, layers: int, text_dim: int, dtype: torch.dtype, checkpointing: bool, attention: str = "native"
):
    from diffusers import WanTransformer3DModel

    model = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=dim // 64,
        attention_head_dim=64,
        in_channels=16,
        out_channels=16,
        text_dim=text_dim,
        freq_dim=64,
        ffn_dim=ffn,
        num_layers=layers,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
    )
    model.to(dtype)
    model.condition_embedder.time_embedder.float()  # as wanray's FSDP2 setup keeps it
    apply_attention_backend(model, attention)
    if checkpointing:
        model.enable_gradient_checkpointing()
    return model.train()


def cpu_proxy(attention: str) -> str:
    """The backend that stands in for `attention` on the CPU: itself where it runs there, else native,
    whose fused CPU kernel keeps O(tokens) for backward like the accelerators' fused kernels (flash,
    cudnn, npu_fusion_attention); _native_math keeps the tokens x tokens scores."""
    return attention if attention in ("native", "_native_math") else "native"


def measure_activations(
    dtype: str, attention: str = "native", text_tokens: int = 512, per_token: bool = False
) -> ActivationModel:
    """Fit ActivationModel on the real diffusers Wan blocks at small sizes, on the CPU (a few seconds),
    with the attention backend set explicitly (diffusers' global default may have been changed). `per_token`:
    a timestep per token, as TI2V-5B trains (expand_timesteps): diffusers then keeps (tokens, 6, dim) float32
    modulation tables per block, where one timestep keeps (6, dim)."""
    from diffusers.utils import logging as diffusers_logging

    compute = torch_dtype(dtype)
    rows, totals = [], {}
    torch.manual_seed(0)
    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # "modules should be kept in float32": as in training, they are not
    for dim, ffn, side in ((128, 256, 8), (128, 768, 8), (256, 256, 8), (128, 256, 16)):
        tokens = 4 * side * side  # 4 latent frames of side x side patches
        x = torch.randn(1, 16, 4, 2 * side, 2 * side, dtype=compute)
        inputs = {
            "hidden_states": x.requires_grad_(),
            "timestep": torch.full((1, tokens), 500.0) if per_token else torch.tensor([500.0]),
            "encoder_hidden_states": torch.randn(1, text_tokens, 64, dtype=compute),
        }
        for checkpointing in (False, True):
            for layers in (1, 2):
                model = _tiny_expert(dim, ffn, layers, 64, compute, checkpointing, cpu_proxy(attention))
                totals[(dim, ffn, tokens, checkpointing, layers)] = _saved_bytes(model, inputs)
        rows.append((dim, ffn, tokens))
    diffusers_logging.set_verbosity(level)

    def fit(values):
        design = np.array([[t * d, t * f, t, d] for d, f, t in rows], dtype=float)
        return tuple(float(c) for c in np.linalg.lstsq(design, np.array(values, dtype=float), rcond=None)[0])

    block = [totals[r + (False, 2)] - totals[r + (False, 1)] for r in rows]
    checkpointed = [totals[r + (True, 2)] - totals[r + (True, 1)] for r in rows]
    rest = [totals[r + (False, 1)] - b for r, b in zip(rows, block)]
    return ActivationModel(fit(block), fit(checkpointed), fit(rest))


@dataclass
class TrainingPlan:
    expert: str
    world: int
    parameters: int
    trainable: int
    block_parameters: int
    root_parameters: int
    """Parameters outside the transformer blocks (embeddings, time projection, output): one FSDP2 group."""
    param_bytes: int
    """Rank 0's fp32 parameter shard."""
    grad_bytes: int
    optimizer_bytes: int
    gathered_bytes: int
    """bf16 parameters all-gathered at once: the root group, the running block and the prefetched next."""
    grad_buffer_bytes: int
    """Unsharded gradients: full fine-tuning, the block being reduce-scattered (param dtype + reduce dtype);
    LoRA with gradient accumulation, every adapter's (it syncs once per step)."""
    unsharded_grad_bytes: int
    """Unsharded gradients of every trained parameter, in the reduce dtype: what skipping the sync between
    micro-batches holds."""
    lora: bool
    tokens: int
    """Of the largest micro-batch of the data's buckets, before any context-parallel split."""
    bucket: str
    """That micro-batch: clips x its bucket (HxWxF)."""
    activation_bytes: int
    activation_bytes_without_checkpointing: int
    device_bytes: int
    activation_checkpointing: bool
    context_parallel: int = 1
    """Ranks that share each sample (ulysses x ring): each keeps the activations of its 1/N of the tokens."""
    ring: int = 1
    ring_bytes: int = 0
    """Ring attention's working set at its peak (one attention call's backward, wanray.ring_attention): the
    all-gathered keys and values, gradient buffers, score tiles; 0 without ring."""

    @property
    def total_bytes(self) -> int:
        return (
            self.param_bytes
            + self.grad_bytes
            + self.optimizer_bytes
            + self.gathered_bytes
            + self.grad_buffer_bytes
            + self.activation_bytes
            + self.ring_bytes
        )

    @property
    def fits(self) -> bool:
        return self.total_bytes <= HEADROOM * self.device_bytes

    def lines(self) -> list[str]:
        g = lambda n: f"{n / GB:.2f} GB"
        verdict = (
            f"fits: {g(self.total_bytes)} of {g(self.device_bytes)} ({self.total_bytes / self.device_bytes:.0%}; "
            f"the plan keeps {1 - HEADROOM:.0%} for the allocator, workspaces and communication buffers)"
            if self.fits
            else f"DOES NOT FIT: {g(self.total_bytes)} of {g(self.device_bytes)} "
            f"({self.total_bytes / self.device_bytes:.0%}; at most {HEADROOM:.0%}): add ranks"
            f"{'' if self.activation_checkpointing else ', turn on activation checkpointing'}, split samples "
            "(train.context_parallel), or train LoRA"
        )
        split = (
            ""
            if self.context_parallel == 1
            else f", {self.tokens // self.context_parallel:,} per rank (context parallel over {self.context_parallel})"
        )
        return [
            f"{self.expert}-noise expert: {self.parameters:,} parameters ({self.trainable:,} trained), "
            f"{self.block_parameters:,} per block, {self.root_parameters:,} outside the blocks; {self.world} ranks",
            f"per rank: parameters (fp32 shard) {g(self.param_bytes)}, gradients {g(self.grad_bytes)}, "
            f"AdamW moments {g(self.optimizer_bytes)}, gathered bf16 parameters {g(self.gathered_bytes)}, "
            f"gradient buffers {g(self.grad_buffer_bytes)}",
            f"activations for {self.tokens:,} tokens ({self.bucket}, the largest micro-batch){split}: "
            f"{g(self.activation_bytes)} "
            f"(activation checkpointing {'on' if self.activation_checkpointing else 'off'}; "
            f"{g(self.activation_bytes_without_checkpointing)} without it)",
            *(
                [
                    f"ring attention over {self.ring} ranks: {g(self.ring_bytes)} at its peak, one attention call "
                    "at a time (every rank's keys and values gathered, gradient buffers, the chunk op's workspace)"
                ]
                if self.ring > 1
                else []
            ),
            (
                "LoRA syncs gradients once per step: its unsharded adapter gradients take "
                f"{g(self.unsharded_grad_bytes)}"
                if self.lora
                else "gradient accumulation reduce-scatters every micro-batch, keeping gradients sharded; skipping "
                f"the sync between micro-batches would hold {g(self.unsharded_grad_bytes)} of unsharded gradients "
                "instead"
            ),
            f"total per rank {g(self.total_bytes)}: {verdict}",
        ]


def _rank0_shard_numel(model, world: int) -> tuple[int, int]:
    """(rank 0's local elements of all parameters, of the trainable ones) after FSDP2 over a fake group."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from wanray.train.parallel import apply_fsdp

    if dist.is_initialized():
        raise RuntimeError("the memory plan shards over a fake process group of its own: run it outside training")
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    try:
        apply_fsdp(model, torch.device("cpu"), "bfloat16", "float32", activation_checkpointing=False)
        local = [(p.to_local().numel(), p.requires_grad) for p in model.parameters()]
    finally:
        dist.destroy_process_group()
    return sum(n for n, _ in local), sum(n for n, trains in local if trains)


def plan_training(cfg: Config, model_path, expert: str, activations: ActivationModel | None = None) -> TrainingPlan:
    """Rank 0's memory when training `expert` of `model_path` (its config.json only) under `cfg`."""
    from wanray import context_parallel, models, ring_attention
    from wanray.buckets import BucketSet
    from wanray.context_parallel import training_backend
    from wanray.train.parallel import build_on_meta

    t, d = cfg.train, cfg.data
    model = build_on_meta(model_path, expert, t.lora)
    config = models.expert_config(model_path, expert)
    parameters = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    block = sum(p.numel() for p in model.blocks[0].parameters())
    root = parameters - sum(p.numel() for b in model.blocks for p in b.parameters())
    local, local_trainable = _rank0_shard_numel(model, t.workers)
    compute = torch_dtype(t.worker.dtype).itemsize
    reduce = torch_dtype(t.reduce_dtype).itemsize
    dim = config["num_attention_heads"] * config["attention_head_dim"]
    ffn, layers = config["ffn_dim"], config["num_layers"]
    # the largest micro-batch of the data's buckets: batch_size clips each, or with scale_batch_by_tokens as many
    # as fit the largest bucket's tokens (train.data.DataPlan); 81x480x832: 21 x 30 x 52 = 32,760 per clip
    kind = models.read_contract(model_path, cfg.model).kind
    per_clip = {
        f"{b.height}x{b.width}x{b.frames}": b.tokens(kind)
        for b in BucketSet.from_config(d, kind).buckets
        if b.frames > 1 or kind.image != "required"  # I2V-A14B's preprocessing rejects stills
    }
    most = max(per_clip.values())
    clips = {
        b: max(1, t.batch_size * most // n) if t.scale_batch_by_tokens else t.batch_size for b, n in per_clip.items()
    }
    act = activations or measure_activations(t.worker.dtype, per_token=kind.expand_timesteps)
    # A context-parallel rank keeps its shard's activations: Ulysses' attention holds all tokens of 1/U of
    # the heads, the same bytes. Ring attention saves its own chunk too, but each call gathers every
    # rank's keys and values and, in backward, float32 gradient buffers: ring_bytes, counted once.
    split = t.context_parallel.degree

    def activation_bytes(b: str) -> tuple[float, ...]:
        """(one block's, the rest's, one block's checkpointed inputs') bytes of bucket b's micro-batch."""
        rank, n = clips[b] * per_clip[b] // split, clips[b]
        return tuple(ActivationModel.bytes(c, rank, dim, ffn, n) for c in (act.block, act.rest, act.checkpointed))

    def total(b: str) -> float:
        one, rest, kept = activation_bytes(b)
        return layers * kept + one + rest if t.activation_checkpointing else layers * one + rest

    # the micro-batch of the most activation bytes (a batch of many stills holds fewer tokens, but a text each)
    bucket = max(per_clip, key=total)
    tokens, batch = clips[bucket] * per_clip[bucket], clips[bucket]
    rank_tokens = tokens // split
    one_block, rest, _ = activation_bytes(bucket)
    cp = t.context_parallel
    heads = config["num_attention_heads"]
    # ring attention keeps each block's reduced output (compute dtype) and log-sum-exp (float32) on its autograd
    # context as attributes (diffusers' TemplatedRingAttention), which no saved-tensor hook sees: activation
    # checkpointing does not drop them, and the measured activation model does not count them
    ring_kept = 0 if cp.ring == 1 else layers * rank_tokens * (compute * dim + 4 * heads)
    # with checkpointing: every block keeps its inputs, and backward recomputes one block at a time
    checkpointed = layers * ActivationModel.bytes(act.checkpointed, rank_tokens, dim, ffn, batch) + one_block + rest
    context_parallel.check(cp.ulysses, cp.ring, heads, per_clip, training_backend(cfg))
    half_npu = t.worker.device == "npu" and t.worker.dtype != "float32"  # torch_npu's fused op, not the tiles
    ring_bytes = (
        0
        if cp.ring == 1
        else ring_attention.ring_working_bytes(
            batch,
            per_clip[bucket],
            heads,
            config["attention_head_dim"],
            cp.ulysses,
            cp.ring,
            compute,
            tiled=training_backend(cfg) == "native" and not half_npu,
        )
    )
    lora = t.lora.enabled
    grad_buffers = reduce * trainable if lora else (compute + reduce) * block
    return TrainingPlan(
        expert=expert,
        world=t.workers,
        parameters=parameters,
        trainable=trainable,
        block_parameters=block,
        root_parameters=root,
        param_bytes=4 * local,
        grad_bytes=4 * local_trainable,
        optimizer_bytes=2 * 4 * local_trainable,
        gathered_bytes=compute * (root + 2 * block),
        grad_buffer_bytes=grad_buffers,
        unsharded_grad_bytes=reduce * trainable,
        lora=lora,
        tokens=tokens,
        bucket=f"{batch} x {bucket}",
        activation_bytes=int((checkpointed if t.activation_checkpointing else layers * one_block + rest) + ring_kept),
        activation_bytes_without_checkpointing=int(layers * one_block + rest + ring_kept),
        device_bytes=int(t.device_memory_gb * GB),
        activation_checkpointing=t.activation_checkpointing,
        context_parallel=cp.degree,
        ring=cp.ring,
        ring_bytes=ring_bytes,
    )


def print_plans(cfg: Config, expert: str, log=print) -> bool:
    """Print the memory plan of `high`, `low` or `both`; True when every one fits."""
    from wanray import context_parallel, models
    from wanray.train.runs import selected

    model_path = models.check_model_dir(cfg.model.path)
    per_token = models.read_kind(model_path).expand_timesteps  # TI2V-5B: a timestep per token
    activations = measure_activations(
        cfg.train.worker.dtype, context_parallel.training_backend(cfg), per_token=per_token
    )
    fits = True
    for e in selected(expert, models.read_kind(model_path)):
        plan = plan_training(cfg, model_path, e, activations)
        for line in plan.lines():
            log(f"[plan] {line}")
        fits = fits and plan.fits
    return fits
