"""FP8 experts for inference (infer.quantize: fp8), through torchao.

Every Linear layer of the transformer blocks (attention projections, feed-forward) gets float8 (e4m3) weights with
one scale per output row and float8 activations quantized per row as they come (torchao's
Float8DynamicActivationFloat8WeightConfig, PerRow: the recipe torchao and diffusers document for diffusion
transformers); the matmuls run on the GPU's float8 tensor cores (torch._scaled_mm: compute capability 8.9 or newer,
Ada, Hopper, Blackwell). The patch embedding, the time and text embedders, the output projection, the norms and
the modulation tables stay as diffusers keeps them. An expert's weights go from 28.6 to about 14.5 GB.

NPU: torch_npu offers int8 weight and activation matmuls on the 910B (npu_quant_matmul) and int8/int4
weight-only ones (npu_weight_quant_batchmatmul); wanray does not wire them in yet (their semantics cannot be
checked without the device), so fp8 there, as on CPU, is a one-line ConfigError.
"""

from __future__ import annotations

import torch

from wanray.errors import ConfigError
from wanray.models import block_linear


def check_fp8(device: str, dtype: str, where: str) -> None:
    """A ConfigError unless `where` runs on CUDA in bfloat16 (the driver's check; the GPU's generation is checked
    where the stage starts, by check_fp8_gpu)."""
    if device != "cuda":
        npu = (
            " (on NPU, torch_npu's int8 matmuls are not wired in yet; see wanray.infer.quantize)"
            if device == "npu"
            else ""
        )
        raise ConfigError(
            f"infer.quantize fp8 runs on CUDA GPUs of compute capability 8.9 or newer, but {where} runs on "
            f"{device}{npu}: set infer.quantize none"
        )
    if dtype != "bfloat16":
        raise ConfigError(f"infer.quantize fp8 computes around bfloat16, but {where} runs in {dtype}")


def check_fp8_gpu(device: torch.device) -> None:
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        raise ConfigError(
            f"infer.quantize fp8 needs float8 tensor cores (compute capability 8.9 or newer: L4/L40, H100/H200, "
            f"B200), but {torch.cuda.get_device_name(device)} is {major}.{minor}: set infer.quantize none"
        )


def quantize_fp8(model: torch.nn.Module) -> int:
    """Convert the expert's block Linear layers in place (torchao quantize_); the number converted."""
    try:
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_
    except ImportError:
        raise ConfigError(
            "infer.quantize fp8 needs torchao on the expert stages' nodes: pip install 'wanray[fp8]'"
        ) from None

    count = sum(block_linear(m, n) for n, m in model.named_modules())
    quantize_(model, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()), filter_fn=block_linear)
    return count


def fp8_saved_bytes(model: torch.nn.Module) -> int:
    """Bytes quantize_fp8 takes off the model's weights: each converted weight goes to one byte per element plus a
    float32 scale per output row (biases stay)."""
    saved = 0
    for name, module in model.named_modules():
        if block_linear(module, name):
            w = module.weight
            saved += w.numel() * (w.element_size() - 1) - 4 * w.shape[0]
    return saved
