"""The configuration's sections: model, data, the resources a stage asks Ray for, preprocess, caption,
infer, train, ui and eval (wanray.config holds the root and the loader). Each section checks its own values when it
is made (`__post_init__`, so a `dataclasses.replace` is checked too): a value that cannot work is a
one-line ConfigError naming its key. What depends on the model directory (sizes its VAE takes, heads
a split needs) is checked where the directory is read."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from wanray.backends import ATTENTION_BACKENDS
from wanray.buckets import parse_shape
from wanray.errors import ConfigError
from wanray.schema import NUMERIC_COLUMNS
from wanray.wan import valid_frames

Device = Literal["cpu", "cuda", "npu"]
Dtype = Literal["float32", "bfloat16"]


@dataclass
class ModelConfig:
    path: str = ".wanray/tiny-wan2.2"
    """Diffusers-format Wan2.2 directory (model_index.json, transformer/ = high-noise
    expert, transformer_2/ = low-noise expert, vae/, text_encoder/, tokenizer/, scheduler/)."""
    create_tiny: bool = False
    """If `path` holds no model, write the tiny Wan2.2 there first."""
    tiny_weights: Literal["random", "shapes"] = "random"
    """The weights create_tiny writes: "random" (initialised from tiny_seed: every test's model), or "shapes"
    (the T2V model pretrained on the synthetic shapes by scripts/pretrain_tiny.py, whose VAE reconstructs them
    and whose experts draw them: configs/tiny.yaml's, so that a quickstart video shows its prompt and an
    evaluation can rank a fine-tune against a broken model)."""
    tiny_seed: int = 0
    """Seed of the tiny checkpoint's random initialisation."""
    tiny_kind: Literal["t2v-a14b", "i2v-a14b", "ti2v-5b"] = "t2v-a14b"
    """Which Wan2.2 model create_tiny writes, at toy width (wanray.wan.KINDS): two experts and the
    Wan2.1 VAE (T2V-A14B, I2V-A14B), or one transformer and the 48-channel Wan2.2 VAE (TI2V-5B)."""
    boundary: float | None = None
    """Expert switch as a fraction of 1000 train timesteps (high-noise expert for t >= boundary*1000).
    None: the model directory's boundary_ratio. A value that contradicts the directory is an error
    unless force_boundary is set (see wanray.wan)."""
    force_boundary: bool = False
    """Train or sample with model.boundary even where the model directory says otherwise."""
    attention_backend: str | None = None
    """diffusers attention backend of the experts (training, serving, batch generation): None picks
    _native_npu on NPU in bfloat16 and native (torch SDPA) elsewhere; see wanray.backends."""

    def __post_init__(self) -> None:
        if self.create_tiny and self.tiny_weights == "shapes" and self.tiny_kind != "t2v-a14b":
            raise ConfigError(
                f"model.tiny_weights 'shapes' are pretrained for tiny_kind t2v-a14b only: "
                f"set model.tiny_weights=random for a tiny {self.tiny_kind}"
            )
        if self.boundary is not None and not 0.0 < self.boundary < 1.0:
            raise ConfigError(f"model.boundary must lie in (0, 1), got {self.boundary}")
        if self.attention_backend is not None and self.attention_backend not in ATTENTION_BACKENDS:
            raise ConfigError(
                f"model.attention_backend {self.attention_backend!r} is not one wanray can use "
                f"(valid: {', '.join(ATTENTION_BACKENDS)}; null picks the device's default)"
            )


@dataclass
class DataConfig:
    height: int = 480
    """Clip height in pixels after resize + center crop (a multiple of the model's size multiple: 16 for the
    A14B models, 32 for TI2V-5B)."""
    width: int = 832
    """Clip width in pixels after resize + center crop (a multiple of the model's size multiple)."""
    num_frames: int = 81
    """Frames per clip, 4n+1 (81 frames -> 21 latent frames)."""
    min_frames: int = 81
    """Shorter videos give the longest 4n+1 clip they hold, down to this; below it they are rejected."""
    fps: float = 16.0
    """Clips are resampled to this frame rate."""
    buckets: list[str] = field(default_factory=list)
    """Shapes "HEIGHTxWIDTHxFRAMES" clips may be stored at (see wanray.buckets); empty: height x width
    with every 4n+1 frame count from min_frames to num_frames."""
    bucket_budget: int = 0
    """Tokens per sample (480x832x81 = 32,760): generate the buckets of aspect ratios 9:16 to 16:9 within
    it, frame counts from num_frames down to min_frames. 0: off."""
    min_resolution: int = 0
    """Curation: reject sources whose shorter side has fewer pixels (below_min_resolution). 0: off."""
    min_seconds: float = 0.0
    """Curation: reject videos shorter than this, within their cut (below_min_duration). 0: off."""
    min_motion: float = 0.0
    """Curation: reject clips whose mean absolute difference between consecutive frames, on the 0-255
    scale of the stored frames, is below this (static_clip): slideshows, frozen frames. 0: off."""
    max_clip_seconds: float = 0.0
    """Split every manifest line without a `cut` into clips: its shots (PySceneDetect), each cut into clips of
    at most this many seconds from first to last frame (wanray.data.scenes: 5.06 holds 81 frames at 16 fps); a
    line with a `cut` is kept as it is. 0: off."""
    min_clip_seconds: float = 0.0
    """Splitting: a piece of a shot shorter than this, or than the shortest video clip (data.min_frames, or with
    data.buckets its shortest video bucket) at data.fps, is no clip (rejected short_shot)."""
    scene_threshold: float = 27.0
    """Splitting: PySceneDetect ContentDetector's threshold, the HSV change between two frames that is a cut
    (lower finds more cuts)."""
    dedup: bool = False
    """Reject near-duplicate clips across the output directory's corpus (near_duplicate, naming the clip kept;
    wanray.data.dedup): perceptual hashes of 4 frames of each clip, compared with a Ray Data groupby."""
    aesthetic_model: str = ""
    """Directory of a CLIP model (transformers) with an aesthetic predictor head beside it
    (wanray.data.aesthetic, LAION's layout): every clip gets an `aesthetic` score column. Empty: off."""
    dedup_distance: int = 16
    """Dedup: two clips whose fingerprints (256 bits) differ in at most this many bits are near duplicates."""

    def __post_init__(self) -> None:
        """What holds for every model; the sizes a model's VAE takes are checked with its kind
        (wanray.buckets.BucketSet.from_config) where the model directory is known."""
        if not (valid_frames(self.num_frames) and valid_frames(self.min_frames)):
            raise ConfigError(
                f"data.num_frames and data.min_frames must be 4n+1, got {self.num_frames}, {self.min_frames}"
            )
        if self.min_frames > self.num_frames:
            raise ConfigError("data.min_frames must not exceed data.num_frames")
        if self.height <= 0 or self.width <= 0:
            raise ConfigError(f"data.height and data.width must be positive, got {self.height}x{self.width}")
        if self.min_resolution < 0 or self.min_seconds < 0 or self.min_motion < 0:
            raise ConfigError("data.min_resolution, min_seconds and min_motion must be >= 0 (0 turns each off)")
        if self.max_clip_seconds < 0 or self.min_clip_seconds < 0 or self.scene_threshold <= 0:
            raise ConfigError("data.max_clip_seconds and min_clip_seconds must be >= 0, data.scene_threshold > 0")
        if not 0 <= self.dedup_distance < 128:
            raise ConfigError(f"data.dedup_distance must be 0-127 bits of 256, got {self.dedup_distance}")
        if self.max_clip_seconds and self.min_clip_seconds > self.max_clip_seconds:
            raise ConfigError(
                f"data.min_clip_seconds ({self.min_clip_seconds:g}) exceeds data.max_clip_seconds "
                f"({self.max_clip_seconds:g}): no clip could be cut"
            )
        if self.bucket_budget < 0:
            raise ConfigError(f"data.bucket_budget must be a token count >= 0, got {self.bucket_budget}")
        if self.buckets and self.bucket_budget:
            raise ConfigError("give data.buckets or data.bucket_budget, not both")
        for text in self.buckets:
            parse_shape(text)


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

    def check(self, key: str) -> None:
        """A one-line ConfigError naming `key` (where these resources sit in the config) for a value Ray refuses."""
        if self.cpus < 0 or self.accelerators < 0:
            raise ConfigError(f"{key}.cpus and .accelerators must be >= 0, got {self.cpus} and {self.accelerators}")

    def bundle(self) -> dict:
        """These resources as a placement group bundle."""
        options = self.ray_options()
        bundle = {"CPU": options["num_cpus"], **options.get("resources", {})}
        if "num_gpus" in options:
            bundle["GPU"] = options["num_gpus"]
        return {k: v for k, v in bundle.items() if v}


@dataclass
class CaptionConfig:
    """Captions from a vision-language model for manifest lines without one (wanray.data.caption)."""

    model: str = ""
    """Directory of a transformers Qwen-VL model (Qwen2-VL, Qwen2.5-VL, Qwen3-VL: e.g. Qwen2.5-VL-7B-Instruct).
    Empty: off, and a manifest line without a caption is rejected (missing_caption)."""
    overwrite: bool = False
    """Caption every clip, also those the manifest gives a caption."""
    prompt: str = (
        "Describe this video in one paragraph: the subjects and what they do, how they move, the setting, "
        "the lighting and how the camera moves."
    )
    """What the model is asked, after the clip's frames."""
    frames: int = 8
    """Frames spread evenly over each clip that the model sees (as images, in order)."""
    size: int = 448
    """Frames are decoded with their longer side this many pixels (the model's image processor resizes them
    within its own pixel bounds)."""
    max_new_tokens: int = 160
    """Longest caption, in tokens (greedy decoding)."""
    actors: int = 1
    """Captioner actors in the pool."""
    batch_size: int = 4
    """Clips per generate call."""
    worker: Resources = field(default_factory=Resources)
    """Each captioner actor: device (a VLM wants an accelerator: cuda or npu), dtype (bfloat16 there), CPUs."""

    def __post_init__(self) -> None:
        self.worker.check("caption.worker")
        if min(self.frames, self.size, self.max_new_tokens, self.actors, self.batch_size) < 1:
            raise ConfigError("caption.frames, size, max_new_tokens, actors and batch_size must be >= 1")
        if not self.prompt.strip():
            raise ConfigError("caption.prompt is empty")


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
    aesthetic_actors: int = 1
    """Aesthetic scorer actors in the pool (data.aesthetic_model; on preprocess.encoders' device)."""

    def __post_init__(self) -> None:
        self.encoders.check("preprocess.encoders")
        counts = (self.clips_per_decode_task, self.vae_actors, self.vae_batch_size, self.text_actors)
        if min(*counts, self.text_batch_size, self.rows_per_shard, self.aesthetic_actors) < 1:
            raise ConfigError(
                "preprocess.clips_per_decode_task, vae_actors, vae_batch_size, text_actors, text_batch_size, "
                "rows_per_shard and aesthetic_actors must be >= 1"
            )
        if self.decode_cpus <= 0:
            raise ConfigError(f"preprocess.decode_cpus must be > 0, got {self.decode_cpus}")


STAGES = ("text", "high", "low", "vae")
"""The four Serve stages of a served model: UMT5 text encoder, high- and low-noise experts, VAE decoder."""


@dataclass
class StageConfig(Resources):
    """One Serve stage: the resources of each of its processes, and how many there are."""

    devices: int = 1
    """Expert stages: above 1, one replica holds that many ranks (a placement group of this stage's resources
    each) and runs the expert with Ulysses context parallelism over them. The text and VAE stages take 1."""
    replicas: int = 1
    """Replicas of the stage, each on its own device(s): 2 everywhere serves two pipelined model copies; Serve's
    router spreads the calls over a stage's replicas."""
    max_replicas: int = 0
    """Above `replicas`: Ray Serve autoscales the stage between the two on its ongoing requests; 0 keeps it
    fixed."""


@dataclass
class Stages:
    """The four Serve deployments of a served model, each its own processes and devices."""

    text: StageConfig = field(default_factory=StageConfig)
    """UMT5 text encoder."""
    high: StageConfig = field(default_factory=StageConfig)
    """High-noise expert."""
    low: StageConfig = field(default_factory=StageConfig)
    """Low-noise expert."""
    vae: StageConfig = field(default_factory=StageConfig)
    """VAE decoder; it decodes in float32 (wan.VAE_DTYPE), so its dtype must be float32."""

    def __getitem__(self, stage: str) -> StageConfig:
        """The stage named `stage` (one of STAGES)."""
        if stage not in STAGES:
            raise KeyError(f"no Serve stage {stage!r} (stages: {', '.join(STAGES)})")
        return {"text": self.text, "high": self.high, "low": self.low, "vae": self.vae}[stage]

    def __post_init__(self) -> None:
        for stage in STAGES:
            s = self[stage]
            s.check(f"infer.stages.{stage}")
            if s.replicas < 1 or (s.max_replicas and s.max_replicas < s.replicas):
                raise ConfigError(
                    f"infer.stages.{stage}.replicas must be >= 1 and .max_replicas 0 or >= it, got {s.replicas} "
                    f"and {s.max_replicas}"
                )
            if s.devices < 1 or (s.devices > 1 and stage in ("text", "vae")):
                raise ConfigError(
                    f"infer.stages.{stage}.devices must be 1{' or more' if stage in ('high', 'low') else ''}, "
                    f"got {s.devices}: only the expert stages split over devices"
                )
        if self.vae.dtype != "float32":
            raise ConfigError(
                "infer.stages.vae.dtype must be float32: the Wan VAE decodes in float32, as the official "
                "code and diffusers do (the experts' stages may run in bfloat16)"
            )


ADAPTER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
"""What an adapter may be called (infer.loras keys): letters, digits, `_`, `-`, at most 64. No `.`: peft keeps
an adapter's layers in a torch ModuleDict under its name, which refuses one (every request would fail)."""


@dataclass
class LoraSource:
    """Where an adapter served under a name comes from (wanray.infer.adapters reads it). `path`: a wanray
    run directory (train.py --out of a LoRA run: its latest checkpoint, or `step`'s), a wanray export
    (export.py --out: both experts' `lora/` folders), or one adapter file or folder applied to both
    experts. `high` / `low`: a file or folder per expert (published adapters for the A14B models come
    as a high-noise and a low-noise file); an expert with none runs without this adapter. Each may be a
    URI of an object store."""

    path: str = ""
    high: str = ""
    low: str = ""
    step: int = 0
    """A run directory's checkpoint at this step; 0 takes its latest."""

    def __post_init__(self) -> None:
        if bool(self.path) == bool(self.high or self.low):
            raise ConfigError(
                "an infer.loras entry takes either path (a run, an export or one adapter for both experts) "
                f"or high/low files, got path={self.path!r}, high={self.high!r}, low={self.low!r}"
            )
        if self.step < 0:
            raise ConfigError(f"an infer.loras entry's step must be >= 0 (0: the latest), got {self.step}")


@dataclass
class LoraUse:
    """An adapter a request applies: its infer.loras name and scale (stacked adapters add their deltas)."""

    name: str = ""
    scale: float = 1.0


def _check_scale(scale: float, where: str) -> None:
    if not math.isfinite(scale) or abs(scale) > MAX_LORA_SCALE:
        raise ConfigError(f"{where}: an adapter's scale must be finite and within +-{MAX_LORA_SCALE:g}, got {scale}")


MAX_LORA_SCALE = 10.0
MAX_STACKED_LORAS = 8
"""Most adapters one request may stack."""


@dataclass
class InferConfig:
    stages: Stages = field(default_factory=Stages)
    """Each serving stage: its resources, devices and replicas."""
    batched_guidance: bool = False
    """Run classifier-free guidance's conditional and unconditional passes as one forward of batch 2 (serving,
    batch generation, validation): fewer, larger kernels for twice an expert step's activations; --plan
    counts them."""
    cache: Literal["none", "first_block", "magcache"] = "none"
    """Step caching in every expert stage; it trades quality for speed (pipelines/calibrate_cache.py and
    benchmarks/serve.py measure both). first_block: diffusers' first-block cache, a step whose first block's
    output changed by less than cache_threshold (relative) reuses the previous step's other blocks; single-device
    stages only. magcache: MagCache through diffusers, a step whose accumulated residual-magnitude error
    (from the per-expert ratios pipelines/calibrate_cache.py wrote beside the model) stays under cache_threshold
    reuses the previous step's residual; the decision depends only on the ratios and the step, so every rank of a
    multi-device stage makes the same one."""
    cache_threshold: float = 0.06
    """first_block: relative change of the first block's output; magcache: accumulated error (MagCache's own
    default is 0.06; higher skips more)."""
    cache_ratios: str = ""
    """magcache: the calibration file; empty takes <model.path>/wanray_magcache.json (calibrate_cache.py's)."""
    quantize: Literal["none", "fp8"] = "none"
    """fp8: the experts' block Linear layers in float8 weights and dynamic float8 activations (torchao; CUDA GPUs of
    compute capability 8.9+, bfloat16 stages): half the expert weights, faster matmuls (wanray.infer.quantize)."""
    compile: bool = False
    """torch.compile each expert's transformer blocks (regional compilation: each block's forward, before the
    cache's and the split's hooks wrap it): the 40 blocks share one compiled graph; the first request of a size
    compiles (minutes on the real model), a request of a size seen before none; a second size recompiles once
    with dynamic shapes."""
    compile_backend: str = "inductor"
    """torch.compile backend of infer.compile (inductor on CUDA and CPU; on NPU, torch_npu's, e.g. npugraph_ex)."""
    vae_tiling: bool = False
    """Decode the VAE's up path in spatial tiles of vae_tile pixels, each with a halo of its receptive radius
    (wanray.infer.vae_tiles; the frames are the whole decode's): the decoder's working set no longer grows with
    the frame's area (--plan shows it)."""
    vae_tile: int = 256
    """Tile side in pixels with vae_tiling (a multiple of 64). Each tile also computes its halo (13 latent pixels
    a side): at 256, about 2.5x the up path's compute of a whole decode (Wan2.1's VAE) or 4-5x (Wan2.2's, 16x
    compression); 512 halves that for about 2.5x the working set."""
    max_queued: int = 8
    """The Serve application holds (max_queued + 1) x the fewest replicas of a stage requests at most (a stage
    replica runs one at a time, and a burst may wait at one stage); one more gets 503 with Retry-After at once."""
    queue_timeout_s: float = 600.0
    """A request that has waited this long in a stage's queue is dropped with 503 before the stage runs it."""
    drain_timeout_s: float = 1200.0
    """A replica Serve stops (a scale-down, a redeploy, an unhealthy replica) first finishes the requests it holds,
    for at most this long, before it is killed (Serve's graceful_shutdown_timeout_s, whose default is 20 s: less
    than one A14B video)."""
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
    max_frames_output_bytes: int = 2**30
    """Largest `"output": "frames"` answer (float32 frames: frames x height x width x 12 bytes); each passes the
    VAE stage, the object store and the ingress whole, several copies at once. Default 1 GiB: 81 frames of 720P
    fit (0.9 GB), 121 of 1280x1280 (2.4 GB) do not; mp4 has no such bound."""
    batch_actors: int = 1
    """Sampler actors of batch generation (generate.py); each holds the whole model."""
    batch_offload: bool = False
    """Keep only the running stage's model on a batch actor's device, the others in host memory (the
    whole Wan2.2-T2V-A14B, about 70 GB in bf16, does not fit a 64 GB device)."""
    device_memory_gb: float = 64.0
    """Memory of one inference device (Ascend 910B: 64 GB, H100: 80 GB), for the memory plan
    (serve.py / generate.py --plan)."""
    sampler: Literal["unipc", "euler"] = "unipc"
    """Scheduler of a request that names none: unipc (the model directory's multistep UniPC, as WanPipeline),
    or euler, the flow-matching Euler steps the 4-step distilled adapters were trained for (Wan2.2-Lightning:
    sigmas evenly spaced from 1 to 0 before the shift)."""
    loras: dict[str, LoraSource | str] = field(default_factory=dict)
    """Adapters served by name: a path (run directory, export or one adapter for both experts; see
    LoraSource) or a mapping {high, low} / {path, step}. `--set infer.loras.NAME=PATH` adds one."""
    default_loras: list[LoraUse] = field(default_factory=list)
    """Adapters applied to a request that names none (a request's `loras: []` applies none)."""
    max_loaded_loras: int = 4
    """Adapters each expert holds loaded at once (host or device memory, by --plan); the least recently used one
    is unloaded to load another."""

    def __post_init__(self) -> None:
        self.batch.check("infer.batch")
        self.loras = {k: LoraSource(path=v) if isinstance(v, str) else v for k, v in self.loras.items()}
        for name in self.loras:
            if not ADAPTER_NAME.fullmatch(name):
                raise ConfigError(f"infer.loras key {name!r} is not an adapter name (letters, digits, _ -; at most 64)")
        if self.max_loaded_loras < 1:
            raise ConfigError(f"infer.max_loaded_loras must be >= 1, got {self.max_loaded_loras}")
        names = [use.name for use in self.default_loras]
        if len(set(names)) != len(names):  # the rules of a request's loras (wanray.infer.api), which these fill
            raise ConfigError(f"infer.default_loras names an adapter twice: {names}")
        for use in self.default_loras:
            if use.name not in self.loras:
                raise ConfigError(
                    f"infer.default_loras names {use.name!r}, which infer.loras does not define "
                    f"(defined: {', '.join(self.loras) or 'none'})"
                )
            _check_scale(use.scale, f"infer.default_loras {use.name}")
        if len(names) > (most := min(MAX_STACKED_LORAS, self.max_loaded_loras)):
            raise ConfigError(
                f"infer.default_loras stacks {len(names)} adapters, at most {most} "
                f"(infer.max_loaded_loras {self.max_loaded_loras}, and {MAX_STACKED_LORAS} in all)"
            )
        if self.cache != "none" and not 0 < self.cache_threshold < 10:
            raise ConfigError(f"infer.cache_threshold must lie in (0, 10), got {self.cache_threshold}")
        if (
            self.cache == "first_block"
            and max(self.stages.high.devices, self.stages.low.devices, self.batch_devices) > 1
        ):
            raise ConfigError(
                "infer.cache first_block needs single-device expert stages: each rank would decide on its own "
                "shard of the tokens whether to skip, and the ranks' collectives would part (magcache works there)"
            )
        if self.vae_tile < 64 or self.vae_tile % 64:
            raise ConfigError(f"infer.vae_tile must be a multiple of 64 pixels, got {self.vae_tile}")
        if self.max_frames_output_bytes <= 0:
            raise ConfigError(f"infer.max_frames_output_bytes must be > 0, got {self.max_frames_output_bytes}")
        if self.max_queued < 0 or self.queue_timeout_s <= 0 or self.drain_timeout_s <= 0:
            raise ConfigError(
                f"infer.max_queued must be >= 0, infer.queue_timeout_s and infer.drain_timeout_s > 0, got "
                f"{self.max_queued}, {self.queue_timeout_s}, {self.drain_timeout_s}"
            )
        if self.batch_devices < 1:
            raise ConfigError(f"infer.batch_devices must be >= 1, got {self.batch_devices}")
        if self.flow_shift is not None and self.flow_shift <= 0:
            raise ConfigError(f"infer.flow_shift must be positive, got {self.flow_shift}")
        if not 1 <= self.num_inference_steps <= self.max_steps:
            raise ConfigError(
                f"infer.num_inference_steps must lie in [1, infer.max_steps], got {self.num_inference_steps}"
            )


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

    def __post_init__(self) -> None:
        if self.rank < 1 or self.alpha <= 0 or not self.target_modules:
            raise ConfigError(
                f"train.lora needs rank >= 1, alpha > 0 and target_modules, got rank {self.rank}, alpha {self.alpha}, "
                f"{len(self.target_modules)} target module(s)"
            )


@dataclass
class ContextParallel:
    ulysses: int = 1
    """Ulysses degree: ranks exchange sequence shards for head shards around each attention (all-to-all);
    must divide the attention heads (40 for A14B, 24 for TI2V-5B)."""
    ring: int = 1
    """Ring degree: key/value chunks travel around the ranks, no head constraint."""

    def __post_init__(self) -> None:
        if self.ulysses < 1 or self.ring < 1:
            raise ConfigError(f"train.context_parallel.ulysses and .ring must be >= 1, got {self.ulysses}, {self.ring}")

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
    holdout: str = ""
    """A preprocessed directory (preprocess.py --out) whose clips give the held-out loss at every validation
    step: fixed noise at `holdout_bands` fixed timesteps over the expert's range, so a checkpoint always gives
    the same value (`val_loss` in metrics.jsonl, TensorBoard and the Runs page)."""
    holdout_fraction: float = 0.0
    """Or this fraction of the training clips, kept out of training (chosen by a hash of each clip's id:
    the same clips whatever the shards' order). 0: none."""
    holdout_bands: int = 4
    """Timestep bands of the held-out loss: the loss at the middle of each of this many equal slices of the
    expert's (shifted) timestep range, and their mean."""

    @property
    def has_holdout(self) -> bool:
        return bool(self.holdout) or self.holdout_fraction > 0

    @property
    def renders(self) -> bool:
        """Whether validation renders videos (it has prompts), besides any held-out loss."""
        return bool(self.every) and bool(self.prompts or self.prompts_file)


FILTER_OPS = (">=", "<=", "==", "!=", ">", "<")


def parse_filter(text: str) -> tuple[str, str, float]:
    """A train.filters entry as (column, op, value); a ConfigError names what is wrong with it."""
    match = re.fullmatch(r"\s*([a-z_]+)\s*(>=|<=|==|!=|>|<)\s*(\S+)\s*", str(text))
    if not match:
        raise ConfigError(f"train.filters: {text!r} is not 'COLUMN OP NUMBER' (OP one of {' '.join(FILTER_OPS)})")
    column, op, value = match.groups()
    if column not in NUMERIC_COLUMNS:
        raise ConfigError(
            f"train.filters: {column!r} is no numeric column of the shards ({', '.join(NUMERIC_COLUMNS)})"
        )
    try:
        return column, op, float(value)
    except ValueError:
        raise ConfigError(f"train.filters: {value!r} in {text!r} is not a number") from None


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
    compile: bool = False
    """torch.compile each transformer block before FSDP2 shards it, as torchtitan does (the blocks share one graph;
    each new bucket shape recompiles once)."""
    compile_backend: str = "inductor"
    """torch.compile backend of train.compile (on NPU, torch_npu's)."""
    float8: bool = False
    """torchao float8 training of the blocks' Linear layers, with FSDP2's float8 all-gather (half the gathered
    bytes), as torchtitan trains: CUDA GPUs of compute capability 8.9+, bfloat16 workers, full fine-tuning;
    `pip install 'wanray[fp8]'`."""
    init_dcp: str = ""
    """DCP copy of the expert's weights (pipelines/export.py --to-dcp) for sharded loading; empty = safetensors."""
    checkpoint_every: int = 500
    """Save a DCP checkpoint every N steps (and at the end)."""
    keep_checkpoints: int = 2
    """Checkpoints kept per expert run: the latest ones, or with a held-out loss (train.validation.holdout) the
    ones of the lowest held-out loss, and the latest besides (to resume from)."""
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
    """Videos rendered beside the training workers from each validation step's checkpoint
    (wanray.infer.validation)."""
    filters: list[str] = field(default_factory=list)
    """Train only on the clips that pass every filter, "COLUMN OP NUMBER" on a numeric column of the shards
    (e.g. "motion >= 0.5", "num_frames > 1"; OP one of >= > <= < == !=), without preprocessing again. A clip
    whose value is null (a still's motion) fails."""
    context_parallel: ContextParallel = field(default_factory=ContextParallel)
    """Split each sample's tokens over ulysses x ring ranks (wanray.context_parallel); the workers form
    workers / (ulysses x ring) data-parallel groups."""

    def __post_init__(self) -> None:
        self.worker.check("train.worker")
        self.validation.worker.check("train.validation.worker")
        if min(self.steps, self.workers, self.batch_size, self.grad_accum, self.checkpoint_every) < 1:
            raise ConfigError("train.steps, workers, batch_size, grad_accum and checkpoint_every must be >= 1")
        cp = self.context_parallel
        if self.workers % cp.degree:
            raise ConfigError(
                f"train.context_parallel: ulysses x ring = {cp.degree} must divide train.workers ({self.workers})"
            )
        v = self.validation
        if v.every < 0 or (v.every and v.every % self.checkpoint_every):
            raise ConfigError(
                f"train.validation.every ({v.every}) must be 0 (off) or a multiple of "
                f"train.checkpoint_every ({self.checkpoint_every}): validation renders a checkpoint"
            )
        if v.every and not (v.prompts or v.prompts_file or v.has_holdout):
            raise ConfigError(
                "train.validation.every is set but there are no prompts and no held-out clips: set "
                "train.validation.prompts, prompts_file, holdout or holdout_fraction"
            )
        if v.holdout and v.holdout_fraction:
            raise ConfigError("give train.validation.holdout (a directory) or holdout_fraction, not both")
        if not 0.0 <= v.holdout_fraction < 1.0 or v.holdout_bands < 1:
            raise ConfigError(
                f"train.validation.holdout_fraction must lie in [0, 1) and holdout_bands be >= 1, got "
                f"{v.holdout_fraction} and {v.holdout_bands}"
            )
        if v.has_holdout and not v.every:
            raise ConfigError("train.validation.holdout is set but validation is off: set train.validation.every")
        if self.float8 and (self.worker.device != "cuda" or self.worker.dtype != "bfloat16" or self.lora.enabled):
            raise ConfigError(
                "train.float8 trains on CUDA GPUs of compute capability 8.9 or newer, in bfloat16, without LoRA, but "
                f"train.worker is {self.worker.device} in {self.worker.dtype}"
                + (" with train.lora.enabled" if self.lora.enabled else "")
                + (" (NPU: torch_npu has no float8 training)" if self.worker.device == "npu" else "")
            )
        if not 0.0 <= self.image_condition <= 1.0:
            raise ConfigError(f"train.image_condition must lie in [0, 1], got {self.image_condition}")
        for text in self.filters:
            parse_filter(text)
        if not 0.0 <= self.caption_dropout < 1.0 or self.timestep_shift <= 0:
            raise ConfigError("train.caption_dropout must lie in [0, 1) and train.timestep_shift be positive")


@dataclass
class EvalConfig:
    """How generated videos are scored (wanray.infer.scores): validation videos and evaluations."""

    clip_model: str = ""
    """A CLIP model directory in transformers' layout (e.g. openai/clip-vit-large-patch14, downloaded): the
    text-video alignment (clip_score) and temporal consistency of each video. Empty: those two are left out;
    motion and sharpness need no model. The tiny model pretrained on the synthetic shapes has its own:
    platform/wanray/assets/tiny_shapes/clip."""
    frames: int = 8
    """Frames sampled evenly from a video for its CLIP scores."""

    def __post_init__(self) -> None:
        if self.clip_model and Path(self.clip_model).expanduser().is_dir():  # as the driver sees it: actors
            self.clip_model = str(Path(self.clip_model).expanduser().resolve())  # run in other directories
        if self.frames < 2:
            raise ConfigError(f"eval.frames must be >= 2 (consecutive frames are compared), got {self.frames}")


@dataclass
class UIConfig:
    runs_roots: list[str] = field(default_factory=lambda: ["runs", "outputs"])
    """Directories the UI's Runs and Evaluate pages list training runs and evaluations under (relative: to the
    serve.py driver's working directory) or object-store URIs (s3://runs); nothing outside them is read. On a
    cluster local ones must be readable from the ingress's node."""
    data_roots: list[str] = field(default_factory=lambda: ["data", "outputs"])
    """Directories the UI's Data page lists preprocessed directories under, likewise."""
