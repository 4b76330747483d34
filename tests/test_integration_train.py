"""Training on a real local Ray: FSDP2 sharding, loss, failure recovery, resume, export, LoRA."""
import json
import shutil
import signal
import subprocess
import sys
import time

import psutil
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, tiny_config
from wanray.data.preprocess import run_preprocess
from wanray.data.shards import EMPTY_PROMPT_FILE, shard_paths
from wanray.train.checkpoint import export_diffusers, full_expert_state
from wanray.train.trainer import latest_checkpoint, train_experts

FAST = ["train.log_every=1", "train.caption_dropout=0.0"]


def metrics(run, expert="high"):
    return [json.loads(line) for line in (run / expert / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def prep(tmp_path_factory, tiny_model, synthetic, ray_cluster):
    out = tmp_path_factory.mktemp("train_prep")
    run_preprocess(tiny_config(tiny_model), str(synthetic), str(out), log=lambda _: None)
    return out


@pytest.fixture(scope="module")
def one_clip(prep, tmp_path_factory):
    out = tmp_path_factory.mktemp("one_clip")
    table = pq.read_table(shard_paths(prep)[0]).slice(0, 1)
    pq.write_table(table, out / "part-0.parquet")
    shutil.copy(prep / EMPTY_PROMPT_FILE, out / EMPTY_PROMPT_FILE)
    return out


def test_loss_halves_on_one_clip_and_export_changes_generation(one_clip, tiny_model, tmp_path):
    from diffusers import WanPipeline

    cfg = tiny_config(tiny_model, *FAST, "train.workers=1", "train.steps=60", "train.lr=3e-3",
                      "train.checkpoint_every=60")
    train_experts(cfg, "high", one_clip, tmp_path / "run", log=lambda _: None)
    losses = [m["loss"] for m in metrics(tmp_path / "run")]
    assert len(losses) == 60
    first, last = sum(losses[:8]) / 8, sum(losses[-8:]) / 8
    assert last <= 0.5 * first, (first, last)

    out = export_diffusers(tiny_model, tmp_path / "export", {"high": latest_checkpoint(tmp_path / "run", "high")})
    kwargs = dict(prompt="a red circle", height=64, width=64, num_frames=9, num_inference_steps=4,
                  output_type="pt", generator=None)
    videos = []
    for path in (tiny_model, out):
        pipe = WanPipeline.from_pretrained(path)
        videos.append(pipe(**{**kwargs, "generator": torch.Generator().manual_seed(0)}).frames[0])
    assert videos[0].shape == videos[1].shape
    assert (videos[0] - videos[1]).abs().max() > 1e-3


def test_two_workers_shard_the_expert_then_resume_on_one(prep, tiny_model, tmp_path):
    from wanray.models import load_expert

    run = tmp_path / "run"
    cfg = tiny_config(tiny_model, *FAST, "train.workers=2", "train.steps=6", "train.checkpoint_every=3")
    train_experts(cfg, "high", prep, run, log=lambda _: None)
    m = metrics(run)
    unsharded = sum(p.numel() * p.element_size() for p in load_expert(tiny_model, "high").parameters())
    assert m[-1]["params_sharded_over"] == 2 and m[-1]["world_size"] == 2
    # AdamW keeps two moments per parameter: unsharded that is 3x the parameter bytes
    assert m[-1]["param_bytes"] + m[-1]["optimizer_bytes"] <= 0.6 * 3 * unsharded

    cfg1 = tiny_config(tiny_model, *FAST, "train.workers=1", "train.steps=10", "train.checkpoint_every=3")
    train_experts(cfg1, "high", prep, run, log=lambda _: None)
    m = metrics(run)
    resumed = [x for x in m if x["world_size"] == 1]
    assert [x["step"] for x in resumed] == [7, 8, 9, 10]
    assert resumed[0]["params_sharded_over"] == 1
    assert json.loads((latest_checkpoint(run, "high") / "wanray_step.json").read_text())["step"] == 10


def test_killed_worker_restarts_from_its_checkpoint(prep, tiny_model, tmp_path):
    run = tmp_path / "run"
    steps, every = 40, 10
    cmd = [sys.executable, str(ROOT / "pipelines" / "train.py"), "--config", str(ROOT / "configs" / "tiny.yaml"),
           "--data", str(prep), "--expert", "high", "--out", str(run), "--set", f"model.path={tiny_model}",
           "--set", f"train.steps={steps}", "--set", f"train.checkpoint_every={every}", "--set", "train.workers=2"]
    cmd += [a for s in FAST for a in ("--set", s)]
    log = (tmp_path / "train.log").open("w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    path, deadline, killed = run / "high" / "metrics.jsonl", time.time() + 300, None
    while time.time() < deadline and proc.poll() is None and killed is None:
        done = [json.loads(x)["step"] for x in path.read_text().splitlines()] if path.exists() else []
        if done and done[-1] >= every + 3:
            workers = [p for p in psutil.process_iter(["cmdline"]) if "RayTrainWorker" in " ".join(p.info["cmdline"] or [])]
            assert workers, "no Ray Train worker process found"
            killed = done[-1]
            workers[-1].send_signal(signal.SIGKILL)
        time.sleep(0.1)
    assert killed is not None, (tmp_path / "train.log").read_text()[-3000:]
    assert proc.wait(timeout=300) == 0, (tmp_path / "train.log").read_text()[-3000:]
    seen = [x["step"] for x in metrics(run)]
    restart = next(i for i in range(1, len(seen)) if seen[i] <= seen[i - 1])
    assert seen[restart] - 1 == every * ((seen[restart] - 1) // every) and seen[restart] > every
    assert seen[restart:] == list(range(seen[restart], steps + 1))
    assert json.loads((latest_checkpoint(run, "high") / "wanray_step.json").read_text())["step"] == steps


def test_lora_trains_only_adapters_and_merged_export_is_base_plus_delta(prep, tiny_model, tmp_path):
    run = tmp_path / "run"
    cfg = tiny_config(tiny_model, *FAST, "train.workers=2", "train.steps=4", "train.checkpoint_every=4",
                      "train.lora.enabled=true", "train.lora.rank=4", "train.lora.alpha=8", "train.lr=1e-2")
    train_experts(cfg, "low", prep, run, log=lambda _: None)
    ckpt = latest_checkpoint(run, "low")
    base = load_file(tiny_model / "transformer_2" / "diffusion_pytorch_model.safetensors")

    import torch.distributed.checkpoint as dcp
    from wanray.train.parallel import build_on_meta
    model = build_on_meta(tiny_model, "low", cfg.train.lora)
    model.to_empty(device="cpu")
    raw = {"model": model.state_dict()}
    dcp.load(raw, checkpoint_id=str(ckpt), no_dist=True)
    raw = raw["model"]
    for key, value in raw.items():
        if ".lora_" not in key:  # every base weight is bit-identical to the checkpoint it started from
            assert torch.equal(value, base[key.replace(".base_layer.", ".")]), key
    assert any(v.abs().sum() > 0 for k, v in raw.items() if ".lora_B." in k)  # B starts at 0: it trained

    out = export_diffusers(tiny_model, tmp_path / "export", {"low": ckpt}, cfg.train.lora)
    merged = load_file(out / "transformer_2" / "diffusion_pytorch_model.safetensors")
    adapter = load_file(out / "transformer_2" / "lora" / "pytorch_lora_weights.safetensors")
    assert set(merged) == set(base)
    changed = 0
    for key in base:
        module = key[: -len(".weight")]
        a = adapter.get(f"transformer.{module}.lora_A.weight")
        want = base[key] if a is None else base[key] + (8 / 4) * adapter[f"transformer.{module}.lora_B.weight"] @ a
        torch.testing.assert_close(merged[key], want)
        changed += a is not None
    assert changed == 20  # 2 blocks x (2 attentions x 4 projections + 2 FFN linears)
    assert full_expert_state(tiny_model, "low", ckpt, cfg.train.lora)[1] is not None
