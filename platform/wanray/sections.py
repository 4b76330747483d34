"""The configuration's sections below `model` and `data`: the resources a stage asks Ray for, and the
preprocess, infer, train and ui sections (wanray.config holds the root, its checks and the loader)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Device = Literal["cpu", "cuda", "npu"]
Dtype = Literal["float32", "bfloat16"]


@dataclass
class Resources:
    """Where one stage's processes compute and what each asks Ray for."""

    device: Device = "cpu"
    """cpu, cuda or npu: the device Ray assigns the process (see wanray.devices)."""
    dtype: Dtype = "float32"
    """Compute dtype of the stage's model."""
    cpus: float = 1.0
    """CPUs per process (fractions share a small machine)."""
    accelerators: float = 1.0
    """NPUs / GPUs per process when device is npu / cuda."""

    def ray_options(self) -> dict:
        """Ray remote / actor options asking for these resources."""
        options: dict = {"num_cpus": self.cpus}
        if self.device == "cuda":
            options["num_gpus"] = self.accelerators
        elif self.device == "npu":
            options["resources"] = {"NPU": self.accelerators}
        return options

    def bundle(self) -> dict:
        """These resources as a placement group bundle."""
        options = self.ray_options()
        bundle = {"CPU": options["num_cpus"], **options.get("resources", {})}
        if "num_gpus" in options:
            bundle["GPU"] = options["num_gpus"]
        return {k: v for k, v in bundle.items() if v}


@dataclass
class PreprocessConfig:
    encoders: Resources = field(default_factory=Resources)
    """The VAE and text encoder actors; `dtype` is also the dtype latents and text embeddings are stored in."""
    decode_cpus: float = 1.0
    """CPUs per decode task (decord is single-threaded per video)."""
    clips_per_decode_task: int = 16
    """Clips one decode task takes in turn: larger tasks amortise Ray's per-task overhead, smaller ones spread
    better."""
    vae_actors: int = 1
    """VAE encoder actors in the pool."""
    vae_batch_size: int = 4
    """Clips per VAE encoder batch."""
    text_actors: int = 1
    """Text encoder actors in the pool."""
    text_batch_size: int = 16
    """Captions per text encoder batch."""
    rows_per_shard: int = 64
    """Clips per Parquet shard."""


@dataclass
class StageReplicas:
    """A count per Serve stage."""

    text: int = 1
    high: int = 1
    low: int = 1
    vae: int = 1


@dataclass
class StageResources:
    """The four Serve deployments of a served model, each its own process and device."""

    text: Resources = field(default_factory=Resources)
    """UMT5 text encoder."""
    high: Resources = field(default_factory=Resources)
    """High-noise expert."""
    low: Resources = field(default_factory=Resources)
    """Low-noise expert."""
    vae: Resources = field(default_factory=Resources)
    """VAE decoder; it decodes in float32 (wan.VAE_DTYPE), so its dtype must be float32."""


@dataclass
class InferConfig:
    stages: StageResources = field(default_factory=StageResources)
    """Resources of each serving stage."""
    high_devices: int = 1
    """Devices of the served high-noise expert stage: above 1, one replica holds that many ranks (a placement
    group of infer.stages.high each) and runs the expert with Ulysses context parallelism over them."""
    low_devices: int = 1
    """Likewise for the low-noise expert stage."""
    replicas: StageReplicas = field(default_factory=StageReplicas)
    """Replicas of each Serve stage, each on its own device(s): 2 everywhere serves two pipelined model copies;
    Serve's router spreads the calls over a stage's replicas."""
    max_replicas: StageReplicas = field(default_factory=lambda: StageReplicas(0, 0, 0, 0))
    """Above a stage's replicas: Ray Serve autoscales it between the two on its ongoing requests; 0 keeps it fixed."""
    batched_guidance: bool = False
    """Run classifier-free guidance's conditional and unconditional passes as one forward of batch 2 (serving,
    batch generation, validation): fewer, larger kernels for twice an expert step's activations; --plan
    counts them."""
    first_block_cache: float = 0.0
    """Step caching through diffusers' first-block cache in every expert stage: a step whose first transformer
    block's output changed by less than this (relative) reuses the previous step's remaining blocks; 0 is off.
    It trades quality for speed (benchmarks/serve.py measures both); not with multi-device expert stages."""
    max_queued: int = 8
    """The Serve application holds (max_queued + 1) x the fewest replicas of a stage requests at most (a stage
    replica runs one at a time, and a burst may wait at one stage); one more gets 503 with Retry-After at once."""
    queue_timeout_s: float = 600.0
    """A request that has waited this long in a stage's queue is dropped with 503 before the stage runs it."""
    batch: Resources = field(default_factory=Resources)
    """Resources of each batch-generation actor (generate.py), which runs all four stages."""
    batch_devices: int = 1
    """Devices of each batch actor: above 1, the actor (rank 0: text encoder, VAE, experts) starts that many
    minus one ranks of infer.batch each on its node, and both experts run with Ulysses over all of them."""
    flow_shift: float | None = None
    """Sampling shift of the scheduler's flow sigmas; None keeps the model directory's own value
    (diffusers ships 3.0, the official Wan2.2 T2V sampler uses 12.0)."""
    num_inference_steps: int = 40
    """Denoising steps when a request names none (Wan2.2 T2V: 40)."""
    guidance_scale: float = 4.0
    """Classifier-free guidance of the high-noise expert; guidance runs (in both stages) only when this is > 1."""
    guidance_scale_2: float = 3.0
    """Classifier-free guidance of the low-noise expert."""
    negative_prompt: str = ""
    """Negative prompt when a request names none."""
    seed: int = 0
    """Seed when a request names none. Height, width and frames default to data.*, the trained clip size."""
    torch_threads: int = 0
    """Intra-op torch threads in each stage process; 0 leaves torch's default (Ray sets it from the CPU request)."""
    ingress_cpus: float = 1.0
    """CPUs of the HTTP ingress (REST API and Gradio UI)."""
    host: str = "127.0.0.1"
    """Address the Serve HTTP proxy binds; 0.0.0.0 exposes it to the network."""
    port: int = 8000
    """Port of the Serve HTTP proxy."""
    api_token: str = ""
    """Bearer token that /v1/* and the UI require (wanray.infer.api.serving_token); empty: the
    WANRAY_API_TOKEN environment variable of the driver, and with neither, none."""
    max_height: int = 1280
    """Largest height a request may ask for (pixels)."""
    max_width: int = 1280
    """Largest width a request may ask for (pixels)."""
    max_frames: int = 121
    """Largest frame count a request may ask for (4n+1)."""
    max_steps: int = 100
    """Most denoising steps a request may ask for."""
    max_image_bytes: int = 20 * 2**20
    """Largest first image (image-to-video models) a request may carry."""
    max_prompt_chars: int = 2000
    """Longest prompt or negative prompt, in characters (UMT5 keeps 512 tokens of it)."""
    batch_actors: int = 1
    """Sampler actors of batch generation (generate.py); each holds the whole model."""
    batch_offload: bool = False
    """Keep only the running stage's model on a batch actor's device, the others in host memory (the
    whole Wan2.2-T2V-A14B, about 70 GB in bf16, does not fit a 64 GB device)."""
    device_memory_gb: float = 64.0
    """Memory of one inference device (Ascend 910B: 64 GB, H100: 80 GB), for the memory plan
    (serve.py / generate.py --plan)."""


@dataclass
class LoraConfig:
    enabled: bool = False
    """Train LoRA adapters only (peft); the expert's own weights stay frozen."""
    rank: int = 32
    """Adapter rank r."""
    alpha: float = 32.0
    """Adapter scale numerator: delta W = (alpha / rank) * B @ A."""
    target_modules: list[str] = field(
        default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2"]
    )
    """Module name suffixes that get adapters: attention projections and the FFN by default."""


@dataclass
class ContextParallel:
    ulysses: int = 1
    """Ulysses degree: ranks exchange sequence shards for head shards around each attention (all-to-all);
    must divide the attention heads (40 for A14B, 24 for TI2V-5B)."""
    ring: int = 1
    """Ring degree: key/value chunks travel around the ranks, no head constraint."""

    @property
    def degree(self) -> int:
        """Ranks that share one sample: ulysses x ring."""
        return self.ulysses * self.ring


@dataclass
class ValidationConfig:
    every: int = 0
    """Render validation videos every N steps, from the checkpoint of that step (a multiple of
    train.checkpoint_every); 0 turns validation off."""
    prompts: list[str] = field(default_factory=list)
    """The prompts, the same at every validation so the videos compare across steps."""
    prompts_file: str = ""
    """Or a file of them (added after `prompts`): one per line, or a .jsonl of generate.py's prompt lines
    (any of the REST API's fields; `image` a path relative to the file): the way to give each its own
    size, seed or first frame."""
    images: list[str] = field(default_factory=list)
    """Image-to-video models (I2V-A14B, TI2V-5B): the first frame of each prompt of `prompts` and of a plain
    prompts_file, one image path per prompt in order (a .jsonl names its own)."""
    num_inference_steps: int = 20
    guidance_scale: float = 4.0
    guidance_scale_2: float = 3.0
    seed: int = 0
    height: int = 0
    """0: data.height."""
    width: int = 0
    """0: data.width."""
    num_frames: int = 0
    """0: data.num_frames."""
    worker: Resources = field(default_factory=Resources)
    """The validation actor's resources (its own device: training never waits for it)."""
    offload: bool = False
    """Keep the text encoder, experts and VAE in host memory and put each on the device only while it runs,
    as infer.batch_offload: two A14B experts with UMT5-XXL are ~69 GB resident. `train.py --plan` says
    whether the validation actor fits train.device_memory_gb either way."""


@dataclass
class TrainConfig:
    steps: int = 5000
    """Optimizer steps per expert."""
    batch_size: int = 1
    """Clips per worker per micro-batch (clips of one latent shape are batched together)."""
    scale_batch_by_tokens: bool = False
    """With buckets: a bucket's micro-batches hold batch_size x (tokens of the largest bucket / its
    tokens) clips, so every micro-batch costs about the same (short clips and images go many at a time)."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    lr: float = 1e-5
    """Peak learning rate (MindSpeed-MM recipe: 1e-5 constant)."""
    lr_schedule: Literal["constant", "cosine"] = "constant"
    """constant or cosine (to 0 at `steps`), after `warmup_steps` of linear warmup."""
    warmup_steps: int = 0
    """Linear warmup steps from 0 to `lr`."""
    weight_decay: float = 1e-2
    """AdamW weight decay."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW betas."""
    eps: float = 1e-8
    """AdamW epsilon."""
    clip_grad: float = 1.0
    """Max global gradient norm (0 disables clipping)."""
    timestep_shift: float = 5.0
    """Shift of the training timestep schedule (DiffSynth / MindSpeed: 5)."""
    caption_dropout: float = 0.1
    """Probability of training a clip on the empty-prompt embedding (for guidance)."""
    image_condition: float = 1.0
    """TI2V-5B only: probability of training a clip as image to video (its first latent frame clean, at
    timestep 0 and out of the loss, as the sampler treats a given image); the others train as text to
    video. 1.0 is MindSpeed-MM's ti2v recipe, 0.0 its t2v one."""
    seed: int = 0
    """Seed of the data order and of each batch's noise, timesteps and caption dropout (with epoch and batch)."""
    workers: int = 1
    """Ray Train workers (FSDP2 ranks) per expert."""
    worker: Resources = field(default_factory=Resources)
    """Each worker: device (cpu: gloo, cuda: nccl, npu: hccl), compute dtype of the parameters
    (bfloat16 on accelerators; master weights stay float32), CPUs and accelerators."""
    reduce_dtype: Dtype = "float32"
    """Gradient reduce-scatter dtype."""
    activation_checkpointing: bool = False
    """Recompute each transformer block in backward instead of keeping its activations."""
    init_dcp: str = ""
    """DCP copy of the expert's weights (pipelines/export.py --to-dcp) for sharded loading; empty = safetensors."""
    checkpoint_every: int = 500
    """Save a DCP checkpoint every N steps (and at the end)."""
    keep_checkpoints: int = 2
    """Checkpoints kept per expert run."""
    max_failures: int = 3
    """Automatic restarts from the last checkpoint after a worker failure."""
    log_every: int = 10
    """Report metrics every N steps."""
    device_memory_gb: float = 64.0
    """Memory of one training device (Ascend 910B: 64 GB, H100: 80 GB), for the memory plan (train.py --plan)."""
    cache_bytes: int = 2 * 1024**3
    """Keep a worker's decoded clips in memory across epochs when they fit in this many bytes (0: always stream)."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    tracker: Literal["tensorboard", "none"] = "tensorboard"
    """Where scalars, the config and validation videos go besides metrics.jsonl: TensorBoard event files in
    <run>/<expert>/tensorboard/ (wanray.train.tracking), or nowhere."""
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    """Videos rendered beside the training workers from the latest checkpoint (wanray.train.validation)."""
    context_parallel: ContextParallel = field(default_factory=ContextParallel)
    """Split each sample's tokens over ulysses x ring ranks (wanray.context_parallel); the workers form
    workers / (ulysses x ring) data-parallel groups."""


@dataclass
class UIConfig:
    runs_roots: list[str] = field(default_factory=lambda: ["runs", "outputs"])
    """Directories the UI's Runs page lists training runs under (relative: to the serve.py driver's working
    directory); nothing outside them is read. On a cluster they must be readable from the ingress's node."""
    data_roots: list[str] = field(default_factory=lambda: ["data", "outputs"])
    """Directories the UI's Data page lists preprocessed directories under, likewise."""
