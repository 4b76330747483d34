"""Export streams a trained expert block by block into bounded safetensors shards: its peak host
memory stays near one shard and one block, not the whole expert."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import ROOT

# child processes that import torch and diffusers, measuring an expert of 0.9 GB: not the fast tier
pytestmark = pytest.mark.integration

SHARD = 64 * 2**20
# The child's peak anonymous resident memory (bytes) while `body` runs, sampled every 5 ms: what the
# process holds. Not RSS, which also counts the pages of files it maps (safetensors are read through
# mmap): those are page cache, which the kernel drops under pressure. (Nor ru_maxrss: Linux carries it
# over fork and exec, so a child reports at least its parent's peak.)
CHILD = """
import sys, threading, time
sys.path.insert(0, {platform!r})
from wanray.train.export import export_diffusers
from wanray.train.parallel import build_on_meta
peak, done = [0], threading.Event()
def anon():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:"))
def sample():
    while not done.is_set():
        peak[0] = max(peak[0], anon())
        time.sleep(0.005)
sampler = threading.Thread(target=sample)
sampler.start()
{body}
done.set()
sampler.join()
print(peak[0])
"""


def peak_anon(body: str) -> int:
    code = CHILD.format(platform=str(ROOT / "platform"), body=body)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return int(out.stdout.split()[-1])


@pytest.fixture(scope="module")
def medium(tiny_model, tmp_path_factory):
    """The tiny model directory with a 0.9 GB high-noise expert (16 blocks of dim 1024), and a DCP copy
    of that expert standing in for a training checkpoint."""
    from diffusers import WanTransformer3DModel

    from wanray.train.export import diffusers_to_dcp

    root = tmp_path_factory.mktemp("medium")
    model = root / "model"
    shutil.copytree(tiny_model, model, ignore=shutil.ignore_patterns("transformer"))
    torch.manual_seed(0)
    expert = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=8,
        attention_head_dim=128,
        in_channels=16,
        out_channels=16,
        text_dim=32,
        freq_dim=256,
        ffn_dim=2816,
        num_layers=16,
    )
    expert.save_pretrained(model / "transformer", safe_serialization=True)
    size = sum(p.numel() * p.element_size() for p in expert.parameters())
    del expert
    return model, diffusers_to_dcp(model, "high", root / "dcp"), size


@pytest.fixture(scope="module")
def baseline(medium) -> int:
    """A child's peak with the same imports and the expert's structure on the meta device, and nothing read."""
    return peak_anon(f"build_on_meta({str(medium[0])!r}, 'high')")


def test_export_peak_memory_stays_near_one_shard(medium, baseline, tmp_path):
    from diffusers import WanTransformer3DModel

    model, dcp_dir, size = medium
    out = tmp_path / "export"
    exported = peak_anon(
        f"export_diffusers({str(model)!r}, {str(out)!r}, {{'high': {str(dcp_dir)!r}}}, 0.875, max_shard_bytes={SHARD})"
    )
    assert size > 8e8
    assert exported - baseline < 0.35 * size, (exported - baseline, size)

    index = json.loads((out / "transformer" / "diffusion_pytorch_model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) >= 10 and all((out / "transformer" / s).stat().st_size <= SHARD + 2**20 for s in shards)
    source = WanTransformer3DModel.from_pretrained(model, subfolder="transformer").state_dict()
    loaded = WanTransformer3DModel.from_pretrained(out, subfolder="transformer").state_dict()
    assert set(source) == set(loaded) and all(torch.equal(source[k], loaded[k]) for k in source)


def test_conversion_to_dcp_holds_one_tensor_at_a_time(medium, baseline, tmp_path):
    """--to-dcp reads the expert's safetensors tensor by tensor into a DCP directory of one file per tensor."""
    import torch.distributed.checkpoint as dcp

    from wanray import models

    model, _, size = medium
    out = tmp_path / "dcp"
    converted = peak_anon(
        f"from wanray.train.export import diffusers_to_dcp; diffusers_to_dcp({str(model)!r}, 'high', {str(out)!r})"
    )
    assert converted - baseline < 0.2 * size, (converted - baseline, size)

    source = models.load_expert(model, "high").state_dict()
    state = {"model": {k: torch.empty_like(v) for k, v in source.items()}}
    dcp.load(state, checkpoint_id=str(out), no_dist=True)
    assert all(torch.equal(state["model"][k], v) for k, v in source.items())
    assert len(list(out.glob("*.distcp"))) == len(source)
