"""Load the parts of a diffusers-format Wan2.2 directory; write the tiny preset as one.

The layout is exactly that of `Wan2.2-T2V-A14B-Diffusers`:
  model_index.json, transformer/ (high-noise expert), transformer_2/ (low-noise
  expert), vae/, text_encoder/, tokenizer/, scheduler/.
The tiny checkpoint uses the same classes with tiny dimensions, so every test goes
through the real loading path. Nothing is ever downloaded: loading is local-only, and weights load from safetensors
only (never a pickle: a .bin or .pt file can run code when unpickled).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
from pathlib import Path

import torch

from wanray.errors import ConfigError, ModelDirError
from wanray.io import atomic_path, write_text_atomic
from wanray.wan import KINDS, WanContract, contract_from, has_second_transformer, kind_from

EXPERT_SUBFOLDERS = {"high": "transformer", "low": "transformer_2"}
REQUIRED_PARTS = ("model_index.json", "transformer", "vae", "text_encoder", "tokenizer", "scheduler")
"""What every Wan2.2 directory has; transformer_2 too where model_index.json names one (the A14B models)."""

# Wan2.2-T2V-A14B's diffusers scheduler: UniPC on flow sigmas. diffusers ships
# flow_shift 3.0; the official T2V sampler uses 12.0 (inference config can override).
SCHEDULER_CONFIG = dict(
    prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000, flow_shift=3.0
)


def check_model_dir(path: str | os.PathLike) -> Path:
    p = Path(path)
    missing = [part for part in REQUIRED_PARTS if not (p / part).exists()]
    if not missing and has_second_transformer(read_json(p, "model_index.json")) and not (p / "transformer_2").exists():
        missing.append("transformer_2")
    if missing:
        raise ModelDirError(f"{p} is not a diffusers-format Wan2.2 directory (missing: {', '.join(missing)})")
    return p


def ensure_model(cfg_model) -> Path:
    """The model directory of `cfg_model` as an absolute path (workers run in other directories),
    writing the tiny checkpoint first when asked to."""
    p = Path(cfg_model.path).resolve()
    if cfg_model.create_tiny and not (p / "model_index.json").exists():
        write_tiny_checkpoint(p, seed=cfg_model.tiny_seed, boundary=cfg_model.boundary, kind=cfg_model.tiny_kind)
    return check_model_dir(p)


def read_json(model_dir, name: str) -> dict:
    """A JSON file of the model directory (e.g. "vae/config.json"); a missing or broken one is a ConfigError."""
    path = Path(model_dir) / name
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path} not found: model.path must name a diffusers-format Wan2.2 directory") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from None


def read_contract(model_dir, model_cfg) -> WanContract:
    """The Wan2.2 contract of `model_dir` under the `model.*` settings (see wanray.wan)."""
    return contract_from(
        read_json(model_dir, "model_index.json"),
        read_json(model_dir, "vae/config.json"),
        read_json(model_dir, "scheduler/scheduler_config.json"),
        model_cfg.boundary,
        model_cfg.force_boundary,
        where=str(Path(model_dir) / "vae" / "config.json"),
        transformer_config=read_json(model_dir, "transformer/config.json"),
    )


def read_kind(model_dir):
    """Which Wan2.2 model `model_dir` holds (wanray.wan.KINDS), from its config files."""
    return kind_from(
        read_json(model_dir, "model_index.json"),
        read_json(model_dir, "transformer/config.json"),
        read_json(model_dir, "vae/config.json"),
        str(model_dir),
    )


def expected_kind(cfg_model):
    """The kind model.path holds, or the one create_tiny will write there: known before any model is written."""
    if cfg_model.create_tiny and not (Path(cfg_model.path) / "model_index.json").exists():
        return KINDS[cfg_model.tiny_kind]
    return read_kind(check_model_dir(cfg_model.path))


def write_boundary(model_dir, boundary: float) -> None:
    """Record the boundary the experts of `model_dir` were trained with in its model_index.json."""
    index = read_json(model_dir, "model_index.json")
    index["boundary_ratio"] = boundary
    write_text_atomic(Path(model_dir) / "model_index.json", json.dumps(index, indent=2, sort_keys=True) + "\n")


def expert_config(model_dir, expert: str) -> dict:
    """The expert's transformer config (its dimensions), without its weights; a ConfigError for the
    low-noise expert of a one-transformer model."""
    from diffusers import WanTransformer3DModel

    if expert == "low" and not has_second_transformer(read_json(model_dir, "model_index.json")):
        raise ConfigError(
            f"{model_dir} holds one transformer ({read_kind(model_dir).title}): it has no low-noise "
            "expert; name the high one"
        )
    return WanTransformer3DModel.load_config(model_dir, subfolder=EXPERT_SUBFOLDERS[expert], local_files_only=True)


def expert_weight_files(model_dir, expert: str) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it (one file, or shards listed by an index)."""
    folder = Path(model_dir) / EXPERT_SUBFOLDERS[expert]
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    if index.exists():
        return {k: folder / f for k, f in json.loads(index.read_text())["weight_map"].items()}
    single = folder / "diffusion_pytorch_model.safetensors"
    from safetensors import safe_open

    with safe_open(single, "pt") as f:
        return dict.fromkeys(f.keys(), single)


class ExpertWeights:
    """An expert's tensors by diffusers name, read from its safetensors (one file, or the shards its
    index lists), each file opened once; use as a context manager."""

    def __init__(self, model_dir, expert: str):
        self.model_dir, self.expert = model_dir, expert
        self.files = expert_weight_files(model_dir, expert)
        self._handles: dict[Path, object] = {}

    def _open(self, name: str):
        from safetensors import safe_open

        if name not in self.files:
            raise KeyError(f"{name} missing from the {self.expert}-noise expert's weights in {self.model_dir}")
        path = self.files[name]
        if path not in self._handles:
            self._handles[path] = safe_open(path, "pt")
        return self._handles[path]

    def get(self, name: str) -> torch.Tensor:
        return self._open(name).get_tensor(name)

    def get_slice(self, name: str):
        """A lazy view of the tensor: index it to read only those rows."""
        return self._open(name).get_slice(name)

    def __enter__(self) -> ExpertWeights:
        return self

    def __exit__(self, *exc) -> None:
        self._handles.clear()


def copy_model_dir(src, dst, without_weights_of: list[str]) -> None:
    """Copy a model directory, leaving out the weight files of the experts named (their new weights
    are written next: no need to copy 28 GB only to overwrite it)."""
    import shutil

    skipped = {str(Path(src) / EXPERT_SUBFOLDERS[e]) for e in without_weights_of}

    def weights_of_skipped(folder, names):
        return [n for n in names if n.startswith("diffusion_pytorch_model")] if folder in skipped else []

    shutil.copytree(src, dst, ignore=weights_of_skipped)


class WeightShards:
    """Writes an expert's weights in diffusers' layout, holding at most one shard in memory:
    diffusion_pytorch_model.safetensors, or diffusion_pytorch_model-0000k-of-0000n.safetensors files
    with diffusion_pytorch_model.safetensors.index.json when they exceed `max_bytes`."""

    def __init__(self, model_dir, expert: str, max_bytes: int):
        self.folder, self.max_bytes = Path(model_dir) / EXPERT_SUBFOLDERS[expert], max_bytes
        self.pending: dict = {}
        self.pending_bytes = self.total = 0
        self.files: list[tuple[Path, list[str]]] = []

    def add(self, tensors: dict) -> None:
        for name, tensor in tensors.items():
            if self.pending and self.pending_bytes + tensor.nbytes > self.max_bytes:
                self._flush()
            self.pending[name] = tensor.contiguous()
            self.pending_bytes += tensor.nbytes

    def _flush(self) -> None:
        from safetensors.torch import save_file

        path = self.folder / f".shard-{len(self.files):05d}.safetensors"
        save_file(self.pending, path)
        self.files.append((path, list(self.pending)))
        self.total += self.pending_bytes
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> Path:
        """Name the shards as diffusers does (and write the index when there are several); the folder."""
        if self.pending:
            self._flush()
        base = "diffusion_pytorch_model"
        if len(self.files) == 1:
            self.files[0][0].rename(self.folder / f"{base}.safetensors")
            return self.folder
        weight_map = {}
        for k, (path, names) in enumerate(self.files, start=1):
            name = f"{base}-{k:05d}-of-{len(self.files):05d}.safetensors"
            path.rename(self.folder / name)
            weight_map.update(dict.fromkeys(names, name))
        index = {"metadata": {"total_size": self.total}, "weight_map": weight_map}
        (self.folder / f"{base}.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True))
        return self.folder


def load_tokenizer(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(Path(path) / "tokenizer", local_files_only=True)


def load_text_encoder(path, dtype=torch.float32, device="cpu"):
    from transformers import UMT5EncoderModel

    model = UMT5EncoderModel.from_pretrained(
        Path(path) / "text_encoder", dtype=dtype, local_files_only=True, use_safetensors=True
    )
    return model.to(device).eval().requires_grad_(False)


def load_vae(path, dtype=torch.float32, device="cpu"):
    from diffusers import AutoencoderKLWan

    vae = AutoencoderKLWan.from_pretrained(
        path, subfolder="vae", torch_dtype=dtype, local_files_only=True, use_safetensors=True
    )
    return vae.to(device).eval().requires_grad_(False)


def load_expert(path, expert: str, dtype=torch.float32, device="cpu"):
    """The high- or low-noise expert DiT (transformer/ or transformer_2/)."""
    from diffusers import WanTransformer3DModel

    if expert not in EXPERT_SUBFOLDERS:
        raise ValueError(f"expert must be 'high' or 'low', got {expert!r}")
    model = WanTransformer3DModel.from_pretrained(
        path, subfolder=EXPERT_SUBFOLDERS[expert], torch_dtype=dtype, local_files_only=True, use_safetensors=True
    )
    return model.to(device)


def expert_from_config(config: dict, dtype=torch.float32, device=None):
    """An expert with freshly initialised weights, laid out as load_expert returns it: parameters in
    `dtype` except the modules diffusers keeps in float32 (_keep_in_fp32_modules). Built on `device`
    (the current default when None: the device check's accelerator, or a FakeTensorMode's)."""
    from diffusers import WanTransformer3DModel

    with torch.device(device) if device is not None else contextlib.nullcontext():
        model = WanTransformer3DModel.from_config(config)
    keep = model._keep_in_fp32_modules or []
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not any(m in name.split(".") for m in keep):
                p.data = p.data.to(dtype)
    return model.eval()


def vae_from_config(config: dict, device=None):
    """The Wan VAE with freshly initialised weights, in float32."""
    from diffusers import AutoencoderKLWan

    with torch.device(device) if device is not None else contextlib.nullcontext():
        return AutoencoderKLWan.from_config(config).eval().requires_grad_(False)


def text_encoder_from_config(config: dict, dtype=torch.float32):
    """UMT5's encoder with freshly initialised weights in `dtype` (its embedding tied as loaded)."""
    from transformers import UMT5Config, UMT5EncoderModel

    model = UMT5EncoderModel(UMT5Config(**{k: v for k, v in config.items() if k != "architectures"}))
    model.tie_weights()
    with torch.no_grad():
        for p in model.parameters():  # per tensor, as Module.to cannot swap a FakeTensorMode's tensors
            p.data = p.data.to(dtype)
    return model.eval()


def load_scheduler(path, flow_shift: float | None = None):
    from diffusers import UniPCMultistepScheduler

    kwargs = {} if flow_shift is None else {"flow_shift": flow_shift}
    return UniPCMultistepScheduler.from_pretrained(path, subfolder="scheduler", local_files_only=True, **kwargs)


# Tiny dimensions of the real architecture: DiT dim 96 (4 heads x 24; rope splits head_dim
# in 3; dim must exceed the 16 x 1 x 2 x 2 = 64 values of a patch, or the model cannot pass
# the noise through and the flow loss cannot fall), UMT5 d_model 32 (= DiT text_dim), VAE
# base_dim 8 with the real stride (4, 8, 8) and z_dim 16. About 0.8 M parameters in all.
TINY_TRANSFORMER = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=4,
    attention_head_dim=24,
    in_channels=16,
    out_channels=16,
    text_dim=32,
    freq_dim=32,
    ffn_dim=192,
    num_layers=2,
)
TINY_VAE = dict(base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1, temperal_downsample=[False, True, True])
TINY_WAN22_VAE = dict(
    base_dim=8,
    z_dim=48,
    in_channels=12,
    out_channels=12,
    is_residual=True,
    patch_size=2,
    dim_mult=[1, 2, 2, 2],
    num_res_blocks=1,
    temperal_downsample=[False, True, True],
    scale_factor_spatial=16,
    scale_factor_temporal=4,
    latents_mean=[0.0] * 48,
    latents_std=[1.0] * 48,
)
"""The Wan2.2 VAE's layout (TI2V-5B: 48 channels, 2x2 patchify then 8x: 16x spatial) at toy width."""
TINY_UMT5 = dict(
    d_model=32,
    d_kv=8,
    d_ff=64,
    num_layers=2,
    num_heads=4,
    relative_attention_num_buckets=8,
    relative_attention_max_distance=32,
    dropout_rate=0.0,
    feed_forward_proj="gated-gelu",
)


TINY_BOUNDARY = KINDS["t2v-a14b"].boundary  # 0.875

# The published config files of Wan-AI/Wan2.2-T2V-A14B-Diffusers (both experts share one; the VAE is
# Wan2.1's): the real dimensions without the weights, for the memory plans and the device check.
A14B_TRANSFORMER = {
    "_class_name": "WanTransformer3DModel",
    "added_kv_proj_dim": None,
    "attention_head_dim": 128,
    "cross_attn_norm": True,
    "eps": 1e-06,
    "ffn_dim": 13824,
    "freq_dim": 256,
    "image_dim": None,
    "in_channels": 16,
    "num_attention_heads": 40,
    "num_layers": 40,
    "out_channels": 16,
    "patch_size": [1, 2, 2],
    "pos_embed_seq_len": None,
    "qk_norm": "rms_norm_across_heads",
    "rope_max_seq_len": 1024,
    "text_dim": 4096,
}
A14B_VAE = {
    "_class_name": "AutoencoderKLWan",
    "base_dim": 96,
    "z_dim": 16,
    "dim_mult": [1, 2, 4, 4],
    "num_res_blocks": 2,
    "attn_scales": [],
    "temperal_downsample": [False, True, True],
    "dropout": 0.0,
    "latents_mean": [
        -0.7571,
        -0.7089,
        -0.9113,
        0.1075,
        -0.1745,
        0.9653,
        -0.1517,
        1.5508,
        0.4134,
        -0.0715,
        0.5517,
        -0.3632,
        -0.1922,
        -0.9497,
        0.2503,
        -0.2921,
    ],
    "latents_std": [
        2.8184,
        1.4541,
        2.3275,
        2.6558,
        1.2196,
        1.7708,
        2.6052,
        2.0743,
        3.2687,
        2.1526,
        2.8652,
        1.5579,
        1.6382,
        1.1253,
        2.8251,
        1.916,
    ],
}

A14B_UMT5 = {
    "architectures": ["UMT5EncoderModel"],
    "model_type": "umt5",
    "d_ff": 10240,
    "d_kv": 64,
    "d_model": 4096,
    "num_heads": 64,
    "num_layers": 24,
    "num_decoder_layers": 24,
    "vocab_size": 256384,
    "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128,
    "feed_forward_proj": "gated-gelu",
    "dense_act_fn": "gelu_new",
    "is_gated_act": True,
    "layer_norm_epsilon": 1e-06,
    "scalable_attention": True,
    "tie_word_embeddings": False,
    "dropout_rate": 0.1,
    "pad_token_id": 0,
    "eos_token_id": 1,
    "decoder_start_token_id": 0,
}
"""UMT5-XXL's encoder (google/umt5-xxl), the text encoder of every Wan2.2 model."""


def write_config_dir(
    path,
    transformer: dict = A14B_TRANSFORMER,
    vae: dict = A14B_VAE,
    text_encoder: dict = A14B_UMT5,
    boundary: float | None = TINY_BOUNDARY,
) -> Path:
    """A model directory holding config files only, no weights (tokenizer/ stays empty): enough for
    the memory plans, which build the models on the meta device, and for the device check's random
    weights."""
    path = Path(path)
    index = {
        "_class_name": "WanPipeline",
        "boundary_ratio": boundary,
        "transformer": ["diffusers", "WanTransformer3DModel"],
        "transformer_2": ["diffusers", "WanTransformer3DModel"],
    }
    files = {
        "model_index.json": index,
        "transformer/config.json": transformer,
        "transformer_2/config.json": transformer,
        "vae/config.json": {"_class_name": "AutoencoderKLWan", **vae},
        "text_encoder/config.json": text_encoder,
        "scheduler/scheduler_config.json": {"_class_name": "UniPCMultistepScheduler", **SCHEDULER_CONFIG},
    }
    for name, content in files.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path / name, json.dumps(content, indent=2) + "\n")
    (path / "tokenizer").mkdir(exist_ok=True)
    return path


@contextlib.contextmanager
def _no_progress_bars():
    """transformers' "Writing model shards" bar (the UMT5 text encoder's save) off while the tiny model is
    written: one shard, instant."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        transformers_logging.enable_progress_bar()


def write_tiny_checkpoint(path, seed: int = 0, boundary: float | None = None, kind: str = "t2v-a14b") -> Path:
    """Write a randomly initialised tiny Wan2.2 model of `kind` (wanray.wan.KINDS) as a diffusers
    directory (atomically); `boundary` None takes the kind's official one."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
    from transformers import ByT5Tokenizer, UMT5Config, UMT5EncoderModel

    spec = KINDS[kind]
    path = Path(path)
    torch.manual_seed(seed)
    tokenizer = ByT5Tokenizer()  # needs no vocabulary file, unlike the real UMT5 SentencePiece one
    text_encoder = UMT5EncoderModel(UMT5Config(vocab_size=len(tokenizer), **TINY_UMT5)).eval()
    vae = AutoencoderKLWan(**(TINY_VAE if spec.latent_channels == 16 else TINY_WAN22_VAE))
    experts = [
        WanTransformer3DModel(
            **{**TINY_TRANSFORMER, "in_channels": spec.in_channels, "out_channels": spec.latent_channels}
        )
        for _ in spec.experts
    ]
    parts = dict(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        scheduler=UniPCMultistepScheduler(**SCHEDULER_CONFIG),
        transformer=experts[0],
        transformer_2=experts[1] if len(experts) == 2 else None,
        boundary_ratio=(spec.boundary if boundary is None else boundary) if len(experts) == 2 else None,
    )
    if spec.pipeline == "WanImageToVideoPipeline":
        from diffusers import WanImageToVideoPipeline  # imported only here: transformers warns about its CLIP parts

        pipe = WanImageToVideoPipeline(**parts, image_processor=None, image_encoder=None)
    else:
        pipe = WanPipeline(**parts, expand_timesteps=spec.expand_timesteps)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_path(path) as tmp, _no_progress_bars():
            pipe.save_pretrained(tmp, safe_serialization=True)
    except OSError as e:
        if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise
        check_model_dir(path)  # another process won the race and wrote it first
    return path
