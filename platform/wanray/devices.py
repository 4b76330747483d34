"""cpu / cuda / npu: the device Ray assigned, the distributed backend and the Ray resource of each.

Ray hands every task, actor, Serve replica and Train worker that asks for accelerators their
ids, and restricts the process to them with CUDA_VISIBLE_DEVICES / ASCEND_RT_VISIBLE_DEVICES.
Torch numbers the visible devices from 0, so the device to compute on is the position of the
assigned id in the visible list: 0 when Ray made only that one visible (every Ray worker on NPU,
since Ray Train V2 shares no NPU ids), its position when several are visible (Ray Train shares
CUDA_VISIBLE_DEVICES among a node's GPU workers; this is `ray.train.torch.get_device()`'s rule).
`assigned_device_index` is that choice, a pure function of the environment.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

KINDS = ("cpu", "cuda", "npu")
VISIBLE_DEVICES_ENV = {"cuda": "CUDA_VISIBLE_DEVICES", "npu": "ASCEND_RT_VISIBLE_DEVICES"}
RAY_RESOURCE = {"cpu": None, "cuda": "GPU", "npu": "NPU"}


def assigned_device_index(kind: str, env: Mapping[str, str], assigned_ids: Sequence[str]) -> int:
    """Torch index of the device Ray assigned this process (its first one, as Ray Train's get_device).

    assigned_ids: Ray's ids for this process (`get_accelerator_ids()`), empty outside a Ray worker
    that holds a device (then the first visible device, index 0).
    """
    if kind == "cpu" or not assigned_ids:
        return 0
    var = VISIBLE_DEVICES_ENV[kind]
    raw = env.get(var, "")
    visible = [v.strip() for v in raw.split(",") if v.strip()] if raw not in ("", "NoDevFiles") else []
    first = str(assigned_ids[0])
    if not visible:  # Ray left visibility alone (RAY_EXPERIMENTAL_NOSET_*): ids are torch indices
        return int(first)
    if first not in visible:
        raise RuntimeError(
            f"{var}={raw} does not include the {kind} device Ray assigned ({first}); was {var} overridden?"
        )
    return visible.index(first)


def ray_assigned_ids(kind: str) -> list[str]:
    """Ray's accelerator ids for this process; none outside Ray (a Ray worker has always imported ray,
    and a process without Ray installed, such as the device check's, never has)."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return []
    return [str(i) for i in ray.get_runtime_context().get_accelerator_ids().get(RAY_RESOURCE[kind], [])]


@dataclass(frozen=True)
class Accelerator:
    kind: str
    """cpu, cuda or npu."""

    @property
    def dist_backend(self) -> str:
        return {"cpu": "gloo", "cuda": "nccl", "npu": "hccl"}[self.kind]

    @property
    def ray_resource(self) -> str | None:
        """Name of the Ray resource one device of this kind is, None for CPU."""
        return RAY_RESOURCE[self.kind]

    def torch_device(self) -> torch.device:
        """The device Ray assigned this process (see assigned_device_index), made the current device."""
        if self.kind == "cpu":
            return torch.device("cpu")
        index = assigned_device_index(self.kind, os.environ, ray_assigned_ids(self.kind))
        if self.kind == "npu":
            import torch_npu  # noqa: F401  registers torch.npu

            torch.npu.set_device(index)  # type: ignore[attr-defined]  # torch_npu adds torch.npu
            return torch.device("npu", index)
        torch.cuda.set_device(index)
        return torch.device("cuda", index)

    def peak_memory_bytes(self) -> int | None:
        """Peak allocated device memory of this process, None on CPU (read RSS instead)."""
        if self.kind == "cuda":
            return torch.cuda.max_memory_allocated()
        if self.kind == "npu":
            return torch.npu.max_memory_allocated()  # type: ignore[attr-defined]  # torch_npu's
        return None


def accelerator(kind: str) -> Accelerator:
    from wanray.errors import ConfigError

    if kind not in KINDS:
        raise ConfigError(f"unknown device {kind!r}: expected one of {', '.join(KINDS)}")
    if kind == "npu" and importlib.util.find_spec("torch_npu") is None:
        raise ConfigError("device 'npu' needs torch_npu: pip install 'wanray[npu]' on a node with CANN")
    return Accelerator(kind)


def torch_dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def apply_attention_backend(model, name: str) -> None:
    """Route the model's attention through diffusers' dispatcher backend `name` (see
    config.ATTENTION_BACKENDS); a backend whose package is missing here is a ConfigError."""
    from diffusers.models.attention_dispatch import AttentionBackendName, _check_attention_backend_requirements
    from diffusers.utils import logging as diffusers_logging

    from wanray.errors import ConfigError

    try:
        _check_attention_backend_requirements(AttentionBackendName(name))
    except (RuntimeError, ValueError) as e:
        raise ConfigError(f"model.attention_backend {name!r} cannot run here: {e}") from None
    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # "attention backends are an experimental feature", per model
    try:
        model.set_attention_backend(name)
    finally:
        diffusers_logging.set_verbosity(level)


def check_compile_backend(name: str, key: str) -> None:
    """A ConfigError unless torch.compile knows `name` in this process (NPU backends register with torch_npu)."""
    from torch._dynamo import list_backends

    from wanray.errors import ConfigError

    if name not in list_backends(exclude_tags=()):
        raise ConfigError(
            f"{key} {name!r} is not a torch.compile backend here (known: {', '.join(list_backends(exclude_tags=()))})"
        )
