"""The diffusers attention backends wanray can select (model.attention_backend), and which one a stage uses."""

from __future__ import annotations

from dataclasses import dataclass

from wanray.errors import ConfigError


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
