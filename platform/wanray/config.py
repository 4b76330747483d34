"""Typed configuration: nested dataclasses, a YAML preset, `--set a.b=c` overrides.

Precedence is CLI override > YAML file > dataclass default. Every key must name a
field: an unknown key is a `ConfigError`, never silently ignored.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from wanray.buckets import BucketSet
from wanray.errors import ConfigError
from wanray.sections import InferConfig, PreprocessConfig, TrainConfig, UIConfig

# Keys that no longer exist, with what replaced them: a one-line error instead of "unknown key".
REMOVED_KEYS = {
    "data.max_text_tokens": "Wan2.2's text length is fixed at 512 tokens (wanray.wan.TEXT_TOKENS)",
    "preprocess.device": "use preprocess.encoders.device",
    "preprocess.dtype": "use preprocess.encoders.dtype",
    "preprocess.encoder_cpus": "use preprocess.encoders.cpus",
    "preprocess.encoder_accelerators": "use preprocess.encoders.accelerators",
    "infer.device": "each stage has its own: infer.stages.{text,high,low,vae}.device and infer.batch.device",
    "infer.dtype": "each stage has its own: infer.stages.{text,high,low,vae}.dtype and infer.batch.dtype",
    **{
        f"infer.{stage}_{old}": f"use infer.stages.{stage}.{new}"
        for stage in ("text", "high", "low", "vae")
        for old, new in (("cpus", "cpus"), ("accelerators", "accelerators"))
    },
    "infer.batch_cpus": "use infer.batch.cpus",
    "infer.batch_accelerators": "use infer.batch.accelerators",
    "train.device": "use train.worker.device",
    "train.param_dtype": "use train.worker.dtype",
    "train.cpus_per_worker": "use train.worker.cpus",
    "train.accelerators_per_worker": "use train.worker.accelerators",
}


@dataclass(frozen=True)
class AttentionBackend:
    devices: tuple[str, ...]
    half_only: bool = False
    """Takes bfloat16 / float16 inputs only."""
    trains: bool = True
    """Has a backward pass (sage's kernels are inference only)."""


# diffusers attention backends (diffusers.models.attention_dispatch.AttentionBackendName) wanray can
# select. The *_hub backends are left out: they download kernels at run time.
ATTENTION_BACKENDS = {
    "native": AttentionBackend(("cpu", "cuda", "npu")),
    "_native_math": AttentionBackend(("cpu", "cuda", "npu")),
    "_native_flash": AttentionBackend(("cpu", "cuda"), half_only=True),
    "_native_efficient": AttentionBackend(("cuda",)),
    "_native_cudnn": AttentionBackend(("cuda",), half_only=True),
    "flex": AttentionBackend(("cpu", "cuda")),
    "_native_npu": AttentionBackend(("npu",), half_only=True),
    "flash": AttentionBackend(("cuda",), half_only=True),
    "flash_varlen": AttentionBackend(("cuda",), half_only=True),
    "_flash_3": AttentionBackend(("cuda",), half_only=True),
    "_flash_varlen_3": AttentionBackend(("cuda",), half_only=True),
    "sage": AttentionBackend(("cuda",), half_only=True, trains=False),
    "sage_varlen": AttentionBackend(("cuda",), half_only=True, trains=False),
    "xformers": AttentionBackend(("cuda",)),
}


def attention_backend(configured: str | None, device: str, dtype: str, training: bool) -> str:
    """The backend a stage computing in `dtype` on `device` uses: model.attention_backend, else
    _native_npu (torch_npu's fused kernel) on NPU in bfloat16 and native (torch SDPA) otherwise.
    A backend that cannot run there is a ConfigError, raised by the driver before any worker starts."""
    if configured is None:
        return "_native_npu" if device == "npu" and dtype != "float32" else "native"
    backend, where = ATTENTION_BACKENDS[configured], "training" if training else "inference"
    if device not in backend.devices:
        raise ConfigError(
            f"model.attention_backend {configured!r} runs on {' or '.join(backend.devices)} only, "
            f"but {where} runs on {device}"
        )
    if backend.half_only and dtype == "float32":
        raise ConfigError(
            f"model.attention_backend {configured!r} takes bfloat16 or float16 only, but {where} computes in float32"
        )
    if training and not backend.trains:
        raise ConfigError(f"model.attention_backend {configured!r} has no backward pass: use it for inference only")
    return configured


@dataclass
class ModelConfig:
    path: str = ".wanray/tiny-wan2.2"
    """Diffusers-format Wan2.2 directory (model_index.json, transformer/ = high-noise
    expert, transformer_2/ = low-noise expert, vae/, text_encoder/, tokenizer/, scheduler/)."""
    create_tiny: bool = False
    """If `path` holds no model, write the tiny random-init Wan2.2 there first."""
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
    _native_npu on NPU in bfloat16 and native (torch SDPA) elsewhere; see ATTENTION_BACKENDS."""


@dataclass
class DataConfig:
    height: int = 480
    """Clip height in pixels after resize + center crop (multiple of 16)."""
    width: int = 832
    """Clip width in pixels after resize + center crop (multiple of 16)."""
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


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    infer: InferConfig = field(default_factory=InferConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    ui: UIConfig = field(default_factory=UIConfig)

    def validate(self) -> Config:
        d = self.data
        if d.num_frames % 4 != 1 or d.min_frames % 4 != 1:
            raise ConfigError(f"data.num_frames and data.min_frames must be 4n+1, got {d.num_frames}, {d.min_frames}")
        if d.min_frames > d.num_frames:
            raise ConfigError("data.min_frames must not exceed data.num_frames")
        if d.height % 16 or d.width % 16:
            raise ConfigError(f"data.height and data.width must be multiples of 16, got {d.height}x{d.width}")
        if d.min_resolution < 0 or d.min_seconds < 0 or d.min_motion < 0:
            raise ConfigError("data.min_resolution, min_seconds and min_motion must be >= 0 (0 turns each off)")
        if d.bucket_budget < 0:
            raise ConfigError(f"data.bucket_budget must be a token count >= 0, got {d.bucket_budget}")
        BucketSet.from_config(d)  # a bucket list or budget that cannot work is a one-line error here
        for stage, n in vars(self.infer.replicas).items():
            top = getattr(self.infer.max_replicas, stage)
            if n < 1 or (top and top < n):
                raise ConfigError(
                    f"infer.replicas.{stage} must be >= 1 and infer.max_replicas.{stage} 0 or >= it, got {n} and {top}"
                )
        if self.infer.first_block_cache < 0:
            raise ConfigError(f"infer.first_block_cache must be >= 0 (0 is off), got {self.infer.first_block_cache}")
        if (
            self.infer.first_block_cache
            and max(self.infer.high_devices, self.infer.low_devices, self.infer.batch_devices) > 1
        ):
            raise ConfigError(
                "infer.first_block_cache needs single-device expert stages: each rank would decide on "
                "its own shard of the tokens whether to skip, and the ranks' collectives would part"
            )
        if self.infer.max_queued < 0 or self.infer.queue_timeout_s <= 0:
            raise ConfigError(
                f"infer.max_queued must be >= 0 and infer.queue_timeout_s > 0, got "
                f"{self.infer.max_queued}, {self.infer.queue_timeout_s}"
            )
        if min(self.infer.high_devices, self.infer.low_devices, self.infer.batch_devices) < 1:
            raise ConfigError(
                "infer.high_devices, low_devices and batch_devices must be >= 1, got "
                f"{self.infer.high_devices}, {self.infer.low_devices}, {self.infer.batch_devices}"
            )
        if self.infer.flow_shift is not None and self.infer.flow_shift <= 0:
            raise ConfigError(f"infer.flow_shift must be positive, got {self.infer.flow_shift}")
        if not 1 <= self.infer.num_inference_steps <= self.infer.max_steps:
            raise ConfigError(
                f"infer.num_inference_steps must lie in [1, infer.max_steps], got {self.infer.num_inference_steps}"
            )
        t = self.train
        if t.steps < 1 or t.workers < 1 or t.batch_size < 1 or t.grad_accum < 1 or t.checkpoint_every < 1:
            raise ConfigError("train.steps, workers, batch_size, grad_accum and checkpoint_every must be >= 1")
        cp = t.context_parallel
        if cp.ulysses < 1 or cp.ring < 1:
            raise ConfigError(f"train.context_parallel.ulysses and .ring must be >= 1, got {cp.ulysses}, {cp.ring}")
        if t.workers % cp.degree:
            raise ConfigError(
                f"train.context_parallel: ulysses x ring = {cp.degree} must divide train.workers ({t.workers})"
            )
        v = t.validation
        if v.every < 0 or (v.every and v.every % t.checkpoint_every):
            raise ConfigError(
                f"train.validation.every ({v.every}) must be 0 (off) or a multiple of "
                f"train.checkpoint_every ({t.checkpoint_every}): validation renders a checkpoint"
            )
        if v.every and not (v.prompts or v.prompts_file):
            raise ConfigError(
                "train.validation.every is set but there are no prompts: set train.validation.prompts "
                "or train.validation.prompts_file"
            )
        if not 0.0 <= t.image_condition <= 1.0:
            raise ConfigError(f"train.image_condition must lie in [0, 1], got {t.image_condition}")
        if not 0.0 <= t.caption_dropout < 1.0 or t.timestep_shift <= 0:
            raise ConfigError("train.caption_dropout must lie in [0, 1) and train.timestep_shift be positive")
        if self.model.boundary is not None and not 0.0 < self.model.boundary < 1.0:
            raise ConfigError(f"model.boundary must lie in (0, 1), got {self.model.boundary}")
        self._validate_attention_backend()
        if self.infer.stages.vae.dtype != "float32":
            raise ConfigError(
                "infer.stages.vae.dtype must be float32: the Wan VAE decodes in float32, as the official "
                "code and diffusers do (the experts' stages may run in bfloat16)"
            )
        return self

    def _validate_attention_backend(self) -> None:
        name = self.model.attention_backend
        if name is None:
            return
        if name not in ATTENTION_BACKENDS:
            raise ConfigError(
                f"model.attention_backend {name!r} is not one wanray can use "
                f"(valid: {', '.join(ATTENTION_BACKENDS)}; null picks the device's default)"
            )


def _coerce(value, tp, where: str):
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{where}: expected one of {', '.join(map(str, typing.get_args(tp)))}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return _build(tp, value, f"{where}.")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item,) = set(typing.get_args(tp)) - {Ellipsis}
        return origin(_coerce(v, item, f"{where}[]") for v in value)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(tp):
            return None
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
        return _coerce(value, tp, where)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML 1.1 reads "1e-5" as a string
        try:
            return float(value)
        except ValueError:
            pass
    if tp in (int, float, str, bool) and not (isinstance(value, tp) and not (tp is int and isinstance(value, bool))):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
    return value


def _build(cls, values: dict, where: str = ""):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    for key in unknown:
        if where + key in REMOVED_KEYS:
            raise ConfigError(f"config key {where + key!r} was removed: {REMOVED_KEYS[where + key]}")
    if unknown:
        raise ConfigError(f"unknown config key {where + unknown[0]!r} (valid: {', '.join(sorted(names))})")
    return cls(**{k: _coerce(v, hints[k], f"{where}{k}") for k, v in values.items()})


def _merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for k, v in override.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def parse_override(text: str) -> dict:
    """`a.b=c` -> {"a": {"b": c}}, with c parsed as a YAML scalar (1, 0.5, true, [1, 2])."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key=value")
    key, raw = text.split("=", 1)
    value = yaml.safe_load(raw) if raw.strip() else ""
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {text!r} has an empty key part")
    tree: dict = {parts[-1]: value}
    for part in reversed(parts[:-1]):
        tree = {part: tree}
    return tree


def load_config(path: str | os.PathLike | None = None, overrides: typing.Sequence[str] = ()) -> Config:
    """Defaults <- YAML file <- `key=value` overrides; unknown keys raise ConfigError."""
    values: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {p} is not valid YAML: {e}".splitlines()[0]) from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {p} must hold a mapping at the top level")
        values = loaded
    for text in overrides:
        values = _merge(values, parse_override(text))
    return _build(Config, values).validate()


def add_config_args(parser: argparse.ArgumentParser, default: str = "configs/tiny.yaml") -> None:
    parser.add_argument("--config", default=default, help=f"YAML preset (default {default})")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set data.fps=24 (repeatable)",
    )
    parser.add_argument("--verbose", action="store_true", help="also print Ray's own log lines and worker output")


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)
