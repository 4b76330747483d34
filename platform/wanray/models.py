"""Load the parts of a diffusers-format Wan2.2 directory; write the tiny preset as one.

The layout is exactly that of `Wan2.2-T2V-A14B-Diffusers`:
  model_index.json, transformer/ (high-noise expert), transformer_2/ (low-noise
  expert), vae/, text_encoder/, tokenizer/, scheduler/.
The tiny checkpoint uses the same classes with tiny dimensions, so every test goes
through the real loading path. Nothing is ever downloaded: loading is local-only, and weights load from safetensors
only (never a pickle: a .bin or .pt file can run code when unpickled).
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

EXPERT_SUBFOLDERS = {"high": "transformer", "low": "transformer_2"}
REQUIRED_PARTS = ("model_index.json", "transformer", "transformer_2", "vae", "text_encoder", "tokenizer", "scheduler")

# Wan2.2-T2V-A14B's diffusers scheduler: UniPC on flow sigmas. diffusers ships
# flow_shift 3.0; the official T2V sampler uses 12.0 (inference config can override).
SCHEDULER_CONFIG = dict(prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000, flow_shift=3.0)


class ModelDirError(ValueError):
    """A model directory that is missing or not a diffusers-format Wan2.2 directory."""


def check_model_dir(path: str | os.PathLike) -> Path:
    p = Path(path)
    missing = [part for part in REQUIRED_PARTS if not (p / part).exists()]
    if missing:
        raise ModelDirError(f"{p} is not a diffusers-format Wan2.2 directory (missing: {', '.join(missing)})")
    return p


def ensure_model(cfg_model) -> Path:
    """The model directory of `cfg_model` as an absolute path (workers run in other directories),
    writing the tiny checkpoint first when asked to."""
    p = Path(cfg_model.path).resolve()
    if cfg_model.create_tiny and not (p / "model_index.json").exists():
        write_tiny_checkpoint(p, seed=cfg_model.tiny_seed,
                              boundary=TINY_BOUNDARY if cfg_model.boundary is None else cfg_model.boundary)
    return check_model_dir(p)


def load_tokenizer(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(Path(path) / "tokenizer", local_files_only=True)


def load_text_encoder(path, dtype=torch.float32, device="cpu"):
    from transformers import UMT5EncoderModel

    model = UMT5EncoderModel.from_pretrained(Path(path) / "text_encoder", dtype=dtype, local_files_only=True,
                                             use_safetensors=True)
    return model.to(device).eval().requires_grad_(False)


def load_vae(path, dtype=torch.float32, device="cpu"):
    from diffusers import AutoencoderKLWan

    vae = AutoencoderKLWan.from_pretrained(path, subfolder="vae", torch_dtype=dtype, local_files_only=True,
                                           use_safetensors=True)
    return vae.to(device).eval().requires_grad_(False)


def load_expert(path, expert: str, dtype=torch.float32, device="cpu"):
    """The high- or low-noise expert DiT (transformer/ or transformer_2/)."""
    from diffusers import WanTransformer3DModel

    if expert not in EXPERT_SUBFOLDERS:
        raise ValueError(f"expert must be 'high' or 'low', got {expert!r}")
    model = WanTransformer3DModel.from_pretrained(
        path, subfolder=EXPERT_SUBFOLDERS[expert], torch_dtype=dtype, local_files_only=True, use_safetensors=True)
    return model.to(device)


def load_scheduler(path, flow_shift: float | None = None):
    from diffusers import UniPCMultistepScheduler

    kwargs = {} if flow_shift is None else {"flow_shift": flow_shift}
    return UniPCMultistepScheduler.from_pretrained(path, subfolder="scheduler", local_files_only=True, **kwargs)


# Tiny dimensions of the real architecture: DiT dim 96 (4 heads x 24; rope splits head_dim
# in 3; dim must exceed the 16 x 1 x 2 x 2 = 64 values of a patch, or the model cannot pass
# the noise through and the flow loss cannot fall), UMT5 d_model 32 (= DiT text_dim), VAE
# base_dim 8 with the real stride (4, 8, 8) and z_dim 16. About 0.8 M parameters in all.
TINY_TRANSFORMER = dict(patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=24, in_channels=16,
                        out_channels=16, text_dim=32, freq_dim=32, ffn_dim=192, num_layers=2)
TINY_VAE = dict(base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1, temperal_downsample=[False, True, True])
TINY_UMT5 = dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, relative_attention_num_buckets=8,
                 relative_attention_max_distance=32, dropout_rate=0.0, feed_forward_proj="gated-gelu")


TINY_BOUNDARY = 0.875  # T2V-A14B's


def write_tiny_checkpoint(path, seed: int = 0, boundary: float = TINY_BOUNDARY) -> Path:
    """Write a randomly initialised tiny Wan2.2-T2V as a diffusers directory (atomically)."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
    from transformers import ByT5Tokenizer, UMT5Config, UMT5EncoderModel

    path = Path(path)
    torch.manual_seed(seed)
    tokenizer = ByT5Tokenizer()  # needs no vocabulary file, unlike the real UMT5 SentencePiece one
    text_encoder = UMT5EncoderModel(UMT5Config(vocab_size=len(tokenizer), **TINY_UMT5)).eval()
    vae = AutoencoderKLWan(**TINY_VAE)
    high = WanTransformer3DModel(**TINY_TRANSFORMER)
    low = WanTransformer3DModel(**TINY_TRANSFORMER)
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae,
                       scheduler=UniPCMultistepScheduler(**SCHEDULER_CONFIG),
                       transformer=high, transformer_2=low, boundary_ratio=boundary)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    pipe.save_pretrained(tmp, safe_serialization=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(tmp, path)
    except OSError:  # another process won the race and wrote it first
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        check_model_dir(path)
    return path
