"""cpu / cuda / npu: the torch device, the distributed backend and the Ray resource of each."""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch

KINDS = ("cpu", "cuda", "npu")


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
        return {"cpu": None, "cuda": "GPU", "npu": "NPU"}[self.kind]

    def ray_resources(self, cpus: float, accelerators: float) -> dict:
        """Ray remote options asking for `cpus` CPUs and `accelerators` devices of this kind."""
        opts: dict = {"num_cpus": cpus}
        if self.kind == "cuda":
            opts["num_gpus"] = accelerators
        elif self.kind == "npu":
            opts["resources"] = {"NPU": accelerators}
        return opts

    def torch_device(self, local_index: int = 0) -> torch.device:
        """The device this process should compute on; sets the current device on accelerators."""
        if self.kind == "cpu":
            return torch.device("cpu")
        if self.kind == "npu":
            import torch_npu  # noqa: F401  registers torch.npu

            torch.npu.set_device(local_index)
            return torch.device("npu", local_index)
        torch.cuda.set_device(local_index)
        return torch.device("cuda", local_index)

    def peak_memory_bytes(self) -> int | None:
        """Peak allocated device memory of this process, None on CPU (read RSS instead)."""
        if self.kind == "cuda":
            return torch.cuda.max_memory_allocated()
        if self.kind == "npu":
            return torch.npu.max_memory_allocated()
        return None


def accelerator(kind: str) -> Accelerator:
    if kind not in KINDS:
        raise ValueError(f"unknown device {kind!r}: expected one of {', '.join(KINDS)}")
    if kind == "npu" and importlib.util.find_spec("torch_npu") is None:
        raise ValueError("device 'npu' needs torch_npu: pip install 'wanray[npu]' on a node with CANN")
    return Accelerator(kind)


def torch_dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
