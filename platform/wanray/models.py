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
import json
import os
from pathlib import Path

import torch

from wanray.errors import ConfigError, ModelDirError
from wanray.io import write_text_atomic
from wanray.wan import KINDS, WanContract, contract_from, has_second_transformer, kind_from

EXPERT_SUBFOLDERS = {"high": "transformer", "low": "transformer_2"}
REQUIRED_PARTS = ("model_index.json", "transformer", "vae", "text_encoder", "tokenizer", "scheduler")
"""What every Wan2.2 directory has; transformer_2 too where model_index.json names one (the A14B models)."""


def check_model_dir(path: str | os.PathLike) -> Path:
    p = Path(path)
    missing = [part for part in REQUIRED_PARTS if not (p / part).exists()]
    if not missing and has_second_transformer(read_json(p, "model_index.json")) and not (p / "transformer_2").exists():
        missing.append("transformer_2")
    if missing:
        raise ModelDirError(f"{p} is not a diffusers-format Wan2.2 directory (missing: {', '.join(missing)})")
    return p


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


def block_linear(module: torch.nn.Module, name: str) -> bool:
    """The Linear layers inside an expert's transformer blocks (attention projections, feed-forward): the layers
    float8 converts (infer.quantize fp8, train.float8); embedders, norms, modulation and the output stay."""
    return isinstance(module, torch.nn.Linear) and name.startswith("blocks.")


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


def load_scheduler(path, flow_shift: float | None = None, sampler: str = "unipc"):
    """The model directory's UniPC scheduler (`sampler` unipc), or flow-matching Euler at the same shift (euler:
    the step-distilled adapters' sampler); `flow_shift` None keeps the directory's shift."""
    from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

    kwargs = {} if flow_shift is None else {"flow_shift": flow_shift}
    unipc = UniPCMultistepScheduler.from_pretrained(path, subfolder="scheduler", local_files_only=True, **kwargs)
    if sampler == "unipc":
        return unipc
    if sampler != "euler":
        raise ValueError(f"sampler must be unipc or euler, got {sampler!r}")
    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=unipc.config.num_train_timesteps, shift=unipc.config.flow_shift
    )
