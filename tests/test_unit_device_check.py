"""benchmarks/device_check.py: its FLOP count, its random models, and a CPU run end to end at tiny sizes."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import ROOT

from wanray import model_files

sys.path.insert(0, str(ROOT / "benchmarks"))
from device_check import TINY_EXPERT, expert_forward_flops


@pytest.mark.parametrize("frames, height, width, text_tokens", [(3, 8, 8, 512), (2, 6, 10, 77)])
def test_the_stated_flop_count_is_what_torch_counts(frames, height, width, text_tokens):
    from diffusers import WanTransformer3DModel
    from torch.utils.flop_counter import FlopCounterMode

    from wanray.devices import apply_attention_backend

    config = {**TINY_EXPERT, "num_layers": 3}
    model = WanTransformer3DModel.from_config(config)
    apply_attention_backend(model, "_native_math")  # attention as bmm, which the counter sees
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(
            hidden_states=torch.randn(1, 16, frames, height, width),
            timestep=torch.tensor([500.0]),
            encoder_hidden_states=torch.randn(1, text_tokens, config["text_dim"]),
            return_dict=False,
        )
    tokens = frames * (height // 2) * (width // 2)
    assert expert_forward_flops(config, tokens, text_tokens) == counter.get_total_flops()


def test_random_experts_are_laid_out_as_from_pretrained_loads_them(tmp_path):
    from diffusers import WanTransformer3DModel

    from wanray import models

    WanTransformer3DModel(**model_files.TINY_TRANSFORMER).save_pretrained(tmp_path / "transformer")
    loaded = models.load_expert(tmp_path, "high", torch.bfloat16)
    built = models.expert_from_config(dict(loaded.config), torch.bfloat16)
    layout = lambda m: {n: (t.dtype, t.shape) for n, t in [*m.named_parameters(), *m.named_buffers()]}
    assert layout(built) == layout(loaded)
    assert {t.dtype for t in built.parameters()} == {torch.bfloat16, torch.float32}  # float32: _keep_in_fp32_modules


@pytest.mark.integration  # the benchmark driver, run as a user runs it
def test_the_device_check_runs_end_to_end_at_tiny_size(tmp_path):
    out = tmp_path / "figures.json"
    run = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "device_check.py"), "--tiny", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    r = json.loads(out.read_text())
    train, denoise, vae = r["train"], r["denoise"], r["vae"]
    assert train["tokens"] == 3 * 4 * 4 and torch.isfinite(torch.tensor(train["loss"])) and train["plan_gb"] > 0
    assert denoise["steps"] == 2 and denoise["finite"] and "native" in denoise["step_s_by_attention_backend"]
    assert vae["frames"] == [9, 64, 64, 3] and vae["tiled_max_diff"] <= 1e-5 and "tiled (infer.vae_tiling" in run.stdout
    assert denoise["levers"] == {}  # compile and FP8 are timed on CUDA only
    assert "anchor: NeMo FSDP" in run.stdout and "VAE decode of 3 latent frames" in run.stdout
    assert "a 9x64x64 video end to end" in run.stdout and "4-step distilled" in run.stdout


def test_without_an_accelerator_the_real_size_refuses_with_one_line():
    run = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "device_check.py"), "--device", "cpu"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 2 and "use --tiny on the CPU" in run.stdout
