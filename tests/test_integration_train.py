"""Training on a real local Ray: FSDP2 sharding, bf16, loss, exact resume, failure recovery, export, LoRA."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import replace

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import ROOT, tiny_config
from safetensors.torch import load_file

from wanray.config import load_config
from wanray.data.shards import EMPTY_PROMPT_FILE, read_empty_prompt, shard_paths
from wanray.errors import ConfigError
from wanray.infer.request import GenerationParams
from wanray.infer.sampler import Sampler
from wanray.infer.spec import StageSpec
from wanray.runtime import free_port
from wanray.train.export import diffusers_to_dcp, expert_state_groups, export_run
from wanray.train.runs import latest_checkpoint
from wanray.train.trainer import train_experts

FAST = ["train.log_every=1", "train.caption_dropout=0.0"]
A14B = load_config(ROOT / "configs" / "t2v_a14b.yaml").train
# The real preset's precision and memory options, and the options a run of it typically adds:
# gradient accumulation, cosine with warmup (and init_dcp, added per test).
PRESET = [
    f"train.worker.dtype={A14B.worker.dtype}",
    f"train.reduce_dtype={A14B.reduce_dtype}",
    f"train.activation_checkpointing={str(A14B.activation_checkpointing).lower()}",
    f"train.caption_dropout={A14B.caption_dropout}",
    f"train.timestep_shift={A14B.timestep_shift}",
    "train.grad_accum=2",
    "train.lr_schedule=cosine",
    "train.warmup_steps=4",
]


def metrics(run, expert="high"):
    return [json.loads(line) for line in (run / expert / "metrics.jsonl").read_text().splitlines()]


def checkpoint_state(ckpt, tmp_path) -> dict:
    """Everything a DCP checkpoint holds (model, optimizer, train state), unsharded."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = tmp_path / f"{ckpt.parent.name}-{ckpt.name}.pt"
    dcp_to_torch_save(str(ckpt), str(out))
    return torch.load(out, weights_only=True)


def assert_same_training_state(a: dict, b: dict, atol: float) -> None:
    """Weights and AdamW state (moments and step counts) of two checkpoints agree."""

    def tensors(state, key):
        flat = {}

        def walk(prefix, v):
            if isinstance(v, dict):
                for k, x in v.items():
                    walk(f"{prefix}.{k}", x)
            elif torch.is_tensor(v):
                flat[prefix] = v

        walk(key, state[key])
        return flat

    for key in ("model", "optim"):
        ta, tb = tensors(a, key), tensors(b, key)
        assert set(ta) == set(tb) and ta, key
        for name in ta:
            if atol == 0:
                assert torch.equal(ta[name], tb[name]), name
            else:
                torch.testing.assert_close(ta[name].float(), tb[name].float(), atol=atol, rtol=1e-4, msg=name)
    assert a["train"]["step"] == b["train"]["step"]
    assert (a["train"]["epoch"], a["train"]["batches_in_epoch"]) == (
        b["train"]["epoch"],
        b["train"]["batches_in_epoch"],
    )


def train_driver(model, data, expert: str, out, sets: list[str]) -> list[str]:
    """pipelines/train.py as a user runs it on the tiny preset."""
    cmd = [sys.executable, str(ROOT / "pipelines" / "train.py"), "--config", str(ROOT / "configs" / "tiny.yaml")]
    cmd += ["--data", str(data), "--expert", expert, "--out", str(out), "--set", f"model.path={model}"]
    return cmd + [a for s in sets for a in ("--set", s)]


def registered_checkpoint_steps(expert_dir) -> list[int]:
    """Steps of the checkpoints Ray Train's controller has registered (those a restart resumes from)."""
    try:
        snapshot = json.loads((expert_dir / "checkpoint_manager_snapshot.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):  # not written yet, or caught mid-write
        return []
    return sorted(r["metrics"]["step"] for r in snapshot["checkpoint_results"])


def clip_counts(run, expert="high") -> Counter:
    """How often each clip was trained on: the last record of every (rank, step) in data_order/
    (steps after the last checkpoint of a failed attempt are trained again)."""
    last = {}
    for path in sorted((run / expert / "data_order").glob("rank-*.jsonl")):
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            last[(path.name, rec["step"])] = rec["ids"]
    return Counter(i for ids in last.values() for i in ids)


@pytest.fixture(scope="module")
def prep(t2v_prep):
    return t2v_prep


@pytest.fixture(scope="module")
def one_clip(prep, tmp_path_factory):
    out = tmp_path_factory.mktemp("one_clip")
    table = pq.read_table(shard_paths(prep)[0]).slice(0, 1)
    pq.write_table(table, out / "part-0.parquet")
    shutil.copy(prep / EMPTY_PROMPT_FILE, out / EMPTY_PROMPT_FILE)
    return out


def test_loss_halves_on_one_clip_and_export_carries_the_boundary_it_trained_with(one_clip, tiny_model, tmp_path, s3):
    from diffusers import WanPipeline

    # a boundary forced over the directory's 0.875: the expert's range, the log and the export follow it
    cfg = tiny_config(
        tiny_model,
        *FAST,
        "train.workers=1",
        "train.steps=60",
        "train.lr=3e-3",
        "train.checkpoint_every=60",
        "model.boundary=0.9",
        "model.force_boundary=true",
    )
    train_experts(cfg, "high", one_clip, tmp_path / "run", log=lambda _: None)
    m = metrics(tmp_path / "run")
    losses = [x["loss"] for x in m]
    assert len(losses) == 60
    first, last = sum(losses[:8]) / 8, sum(losses[-8:]) / 8
    assert last <= 0.5 * first, (first, last)
    assert all(x["timestep_range"] == [900.0, 1000.0] and x["timesteps_seen"][0] >= 900 for x in m)

    out = export_run(cfg, tmp_path / "run", tmp_path / "export", log=lambda _: None)
    assert json.loads((out / "model_index.json").read_text())["boundary_ratio"] == 0.9
    assert json.loads((tiny_model / "model_index.json").read_text())["boundary_ratio"] == 0.875
    # the same export into an S3 bucket: every file, byte for byte
    s3.create_bucket(Bucket="exports")
    assert export_run(cfg, tmp_path / "run", "s3://exports/ft", log=lambda _: None) == "s3://exports/ft"
    listed = s3.list_objects_v2(Bucket="exports", Prefix="ft/")["Contents"]
    local = {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert {o["Key"].removeprefix("ft/") for o in listed} == set(local)
    for key, data in local.items():
        assert s3.get_object(Bucket="exports", Key=f"ft/{key}")["Body"].read() == data, key
    kwargs = dict(
        prompt="a red circle",
        height=64,
        width=64,
        num_frames=9,
        num_inference_steps=4,
        output_type="pt",
        generator=None,
    )
    videos = []
    for path in (tiny_model, out):
        pipe = WanPipeline.from_pretrained(path)
        videos.append(pipe(**{**kwargs, "generator": torch.Generator().manual_seed(0)}).frames[0])
    assert videos[0].shape == videos[1].shape
    assert (videos[0] - videos[1]).abs().max() > 1e-3


def test_a_non_finite_loss_stops_the_run_naming_its_step_and_clip_before_the_weights_change(prep, tiny_model, tmp_path):
    """Four clips on 2 workers per expert, both experts at once, the clip rank 1 draws at step 2 with a NaN in its
    latent: step 2 raises on every rank of each expert, naming that clip (gathered from the rank that read it), and
    the error reaches the caller as itself from the concurrent path (it read "failed: no result" while fit() ran
    in a bare thread); step 1's checkpoint stays the last, and finite."""
    import itertools

    import pyarrow as pa

    from wanray.errors import NonFiniteLoss
    from wanray.train.data import ClipIndex, DataPlan

    table = pq.read_table(shard_paths(prep)[0]).slice(0, 4)
    data = tmp_path / "data"
    data.mkdir()
    pq.write_table(table, data / "part-0.parquet", row_group_size=1)
    shutil.copy(prep / EMPTY_PROMPT_FILE, data / EMPTY_PROMPT_FILE)
    cfg = tiny_config(
        tiny_model, *FAST, "train.workers=2", "train.steps=2", "train.checkpoint_every=1", "train.max_failures=0"
    )
    plan = DataPlan(ClipIndex.from_dir(data), 1, cfg.train.seed, 2, 1, False)
    ((_, (position,)),) = next(itertools.islice(plan.steps(0, 0, 1), 1, None)).batches  # rank 1, step 2
    rows = table.to_pylist()
    latent = np.frombuffer(rows[position]["latent"], dtype=rows[position]["latent_dtype"]).copy()
    latent[0] = np.nan
    rows[position]["latent"] = latent.tobytes()
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), data / "part-0.parquet", row_group_size=1)
    run, bad, lines = tmp_path / "run", rows[position]["id"], []
    with pytest.raises(
        NonFiniteLoss,
        match=rf"^step 2: the loss is not finite \(gradient norm nan\); clips: {bad}\. "
        "Stopped before the optimizer step, so the weights are step 1's",
    ) as failed:
        train_experts(cfg, "both", data, run, log=lines.append)
    assert "[train] training both experts at once" in lines
    assert sum("expert stopped on an error; waiting for the other to end" in line for line in lines) == 1
    assert failed.value.clips == [bad]
    for expert in ("high", "low"):
        assert "error: step 2: the loss is not finite" in (run / expert / "console.log").read_text()
        assert [m["step"] for m in metrics(run, expert)] == [1]
        assert json.loads((latest_checkpoint(run, expert) / "wanray_step.json").read_text())["step"] == 1
        weights = checkpoint_state(latest_checkpoint(run, expert), tmp_path)["model"]
        assert weights and all(torch.isfinite(w).all() for w in weights.values() if torch.is_tensor(w))


def test_ctrl_c_while_both_experts_train_ends_the_driver_and_its_controllers(prep, tiny_model, tmp_path):
    """Both experts at once in pipelines/train.py, then SIGINT (Ctrl-C) once each has logged a step: the driver
    says "interrupted" and exits 130 within a minute, and no Ray Train controller or worker of it stays alive.
    While fit() ran in bare threads the driver waited for both runs to finish (1,000 steps here)."""
    from ray._private.state import actors  # the GCS's actor table: the state API needs the dashboard

    run, log_path = tmp_path / "run", tmp_path / "train.log"
    sets = ["train.steps=1000", "train.workers=1", "train.log_every=1", "train.checkpoint_every=1000"]
    cmd = train_driver(tiny_model, prep, "both", run, sets)
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.time() + 240
        while not all(f"[train:{e}] step " in log_path.read_text() for e in ("high", "low")):
            assert proc.poll() is None and time.time() < deadline, log_path.read_text()[-3000:]
            time.sleep(0.2)
        assert "training both experts at once" in log_path.read_text()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 130, log_path.read_text()[-3000:]
    assert "train.py: interrupted" in log_path.read_text()

    import ray

    mine = ray.get_runtime_context().get_job_id()  # this test process's runs keep their controllers: not the driver's

    def alive() -> list[str]:
        return [
            a["ActorClassName"]
            for a in actors().values()
            if a["State"] == "ALIVE"
            and a["JobID"] != mine
            and a["ActorClassName"].endswith(("TrainController", "RayTrainWorker"))
        ]

    deadline = time.time() + 60
    while alive():
        assert time.time() < deadline, alive()
        time.sleep(0.5)


GOLDEN = ROOT / "tests" / "assets" / "golden_tiny.json"
GOLDEN_SETS = ["train.workers=1", "train.steps=6", "train.log_every=1", "train.checkpoint_every=6", "train.lr=3e-3"]


def test_the_first_steps_of_both_experts_give_the_golden_losses(prep, tiny_model, tmp_path):
    """Golden numbers, as torchtitan keeps loss curves under tests/assets: the tiny model's first steps on CPU give
    the recorded losses, gradient norms and timesteps, so a change in the numerics shows as a diff. A change meant
    to alter them rewrites the file (WANRAY_UPDATE_GOLDEN=1 pytest -k golden) and the commit shows its diff."""
    run = tmp_path / "run"
    train_experts(tiny_config(tiny_model, *GOLDEN_SETS), "both", prep, run, log=lambda _: None)
    # the timestep each step drew (timesteps_seen is [min, max] of one clip's draw here)
    got = {
        e: {
            "loss": [m["loss"] for m in metrics(run, e)],
            "grad_norm": [m["grad_norm"] for m in metrics(run, e)],
            "timestep": [m["timesteps_seen"][0] for m in metrics(run, e)],
        }
        for e in ("high", "low")
    }
    if os.environ.get("WANRAY_UPDATE_GOLDEN"):
        GOLDEN.write_text(json.dumps({"sets": GOLDEN_SETS, **got}, indent=1) + "\n")
        pytest.skip(f"rewrote {GOLDEN}")
    golden = json.loads(GOLDEN.read_text())
    assert golden["sets"] == GOLDEN_SETS
    for e in ("high", "low"):
        assert len(got[e]["loss"]) == 6
        # float32 on CPU: reduction order differs between CPU kernels (AVX2, AVX-512) at ~1e-6 relative
        assert got[e]["loss"] == pytest.approx(golden[e]["loss"], rel=1e-4), e
        assert got[e]["grad_norm"] == pytest.approx(golden[e]["grad_norm"], rel=1e-3), e
        assert got[e]["timestep"] == pytest.approx(golden[e]["timestep"], rel=1e-6), e


@contextmanager
def one_rank_process_group():
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_bf16_training_gives_the_model_the_exact_float32_timesteps(prep, tiny_model, tmp_path):
    """FSDP2 with bfloat16 parameters, run in this process: the time embedding sees the very float32
    timesteps the noised latents were built from (bf16 would turn 874.9 into 876, a high-noise
    timestep), and no low-noise sample reaches the boundary."""
    from wanray.models import read_contract
    from wanray.train.data import ClipIndex, ClipLoader, ClipReader, DataPlan
    from wanray.train.loop import ExpertTrainer, LoopSpec

    cfg = tiny_config(tiny_model, *PRESET, "train.lr=1e-3")
    contract, index = read_contract(tiny_model, cfg.model), ClipIndex.from_dir(prep)
    cpu = torch.device("cpu")
    with one_rank_process_group():
        for expert in ("low", "high"):
            spec = LoopSpec(
                cfg, expert, str(tiny_model), contract, index, "native", read_empty_prompt(prep), str(tmp_path)
            )
            trainer = ExpertTrainer.build(spec, cpu, fresh=True)
            model = trainer.model
            seen, dtypes = [], {}
            model.condition_embedder.timesteps_proj.register_forward_hook(
                lambda m, args, out, seen=seen: seen.append(args[0].detach().clone())
            )
            model.condition_embedder.time_embedder.register_forward_hook(
                lambda m, args, out, dtypes=dtypes: dtypes.__setitem__("time_embedder", args[0].dtype)
            )
            model.blocks[0].register_forward_hook(
                lambda m, args, out, dtypes=dtypes: dtypes.__setitem__("block", out.dtype)
            )
            loader = ClipLoader(DataPlan(index, 1, 0, 1, 2), ClipReader(index, 0), 0, 0, 0, 512)
            before = model.blocks[0].attn1.to_q.weight.full_tensor().clone()
            for _ in range(3):
                result = trainer.step(loader.next())
                given = torch.cat(seen[-2:])  # two micro-batches per step
                assert given.dtype == torch.float32 and torch.equal(given, result.timesteps), (given, result)
                assert bool(torch.isfinite(result.loss))
            loader.close()
            assert dtypes == {"time_embedder": torch.float32, "block": torch.bfloat16}
            everything = torch.cat(seen)
            if expert == "low":
                assert bool((everything < contract.boundary_timestep).all())
            else:
                assert bool((everything >= contract.boundary_timestep).all())
            assert not torch.equal(before, model.blocks[0].attn1.to_q.weight.full_tensor())


def test_resume_on_another_worker_count_ends_where_the_uninterrupted_run_does(prep, tiny_model, tmp_path):
    """2 workers x 1 micro-batch and 1 worker x 2 micro-batches take the same global batches per step:
    stopped at step 3 and resumed on one worker, the run ends with the uninterrupted run's weights,
    optimizer state and clip counts."""
    from wanray.models import load_expert

    common = [*FAST, "train.checkpoint_every=3"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train_experts(
        tiny_config(tiny_model, *common, "train.workers=2", "train.steps=6"), "high", prep, straight, log=lambda _: None
    )
    train_experts(
        tiny_config(tiny_model, *common, "train.workers=2", "train.steps=3"), "high", prep, resumed, log=lambda _: None
    )
    m = metrics(resumed)
    unsharded = sum(p.numel() * p.element_size() for p in load_expert(tiny_model, "high").parameters())
    assert m[-1]["params_sharded_over"] == 2 and m[-1]["world_size"] == 2
    # AdamW keeps two moments per parameter: unsharded that is 3x the parameter bytes
    assert m[-1]["param_bytes"] + m[-1]["optimizer_bytes"] <= 0.6 * 3 * unsharded

    train_experts(
        tiny_config(tiny_model, *common, "train.workers=1", "train.grad_accum=2", "train.steps=6"),
        "high",
        prep,
        resumed,
        log=lambda _: None,
    )
    after = [x for x in metrics(resumed) if x["world_size"] == 1]
    assert [x["step"] for x in after] == [4, 5, 6] and after[0]["params_sharded_over"] == 1
    a = checkpoint_state(latest_checkpoint(straight, "high"), tmp_path)
    b = checkpoint_state(latest_checkpoint(resumed, "high"), tmp_path)
    assert a["train"]["step"] == 6
    assert_same_training_state(a, b, atol=1e-5)
    counts = clip_counts(straight)
    assert counts == clip_counts(resumed) and sum(counts.values()) == 12  # 6 steps x 2 clips, 8 clips shuffled


def test_killed_worker_resumes_to_the_uninterrupted_run_with_the_a14b_options(prep, tiny_model, tmp_path):
    """bf16 parameters, float32 reduction, activation checkpointing, 2 micro-batches, cosine with
    warmup, weights from a DCP copy: the loss falls, and a run whose worker is killed restarts from its
    checkpoint and ends exactly where the uninterrupted run ends."""
    dcp_dir = diffusers_to_dcp(tiny_model, "high", tmp_path / "high-dcp")
    steps, every = 40, 8
    sets = [
        *PRESET,
        f"train.init_dcp={dcp_dir}",
        "train.lr=3e-3",
        "train.log_every=1",
        "train.workers=2",
        f"train.steps={steps}",
        f"train.checkpoint_every={every}",
    ]
    straight, killed_run = tmp_path / "straight", tmp_path / "killed"
    train_experts(tiny_config(tiny_model, *sets), "high", prep, straight, log=lambda _: None)
    losses = [x["loss"] for x in metrics(straight)]
    assert sum(losses[-6:]) / 6 < 0.75 * sum(losses[:6]) / 6, losses

    cmd = train_driver(tiny_model, prep, "high", killed_run, sets)
    log = (tmp_path / "train.log").open("w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    path, deadline, killed = killed_run / "high" / "metrics.jsonl", time.time() + 300, None
    while time.time() < deadline and proc.poll() is None and killed is None:
        done = [json.loads(x)["step"] for x in path.read_text().splitlines()] if path.exists() else []
        saved = registered_checkpoint_steps(killed_run / "high")
        if saved and done and done[-1] >= saved[-1] + 2:  # a checkpoint Ray Train knows of, then 2 more steps
            from ray._private.state import actors  # the GCS's actor table: the state API needs the dashboard

            workers = [
                a["Pid"]
                for a in actors().values()
                if a["ActorClassName"].endswith("RayTrainWorker") and a["State"] == "ALIVE"
            ]
            assert workers, "no Ray Train worker alive"
            killed = done[-1]
            os.kill(max(workers), signal.SIGKILL)
        time.sleep(0.05)
    assert killed is not None, (tmp_path / "train.log").read_text()[-3000:]
    assert proc.wait(timeout=300) == 0, (tmp_path / "train.log").read_text()[-3000:]
    seen = [x["step"] for x in metrics(killed_run)]
    restart = next(i for i in range(1, len(seen)) if seen[i] <= seen[i - 1])
    assert seen[restart] - 1 == every * ((seen[restart] - 1) // every) and seen[restart] > every
    assert seen[restart:] == list(range(seen[restart], steps + 1))
    a = checkpoint_state(latest_checkpoint(straight, "high"), tmp_path)
    b = checkpoint_state(latest_checkpoint(killed_run, "high"), tmp_path)
    assert a["train"]["step"] == steps
    assert_same_training_state(a, b, atol=0)
    counts = clip_counts(straight)
    assert counts == clip_counts(killed_run) and sum(counts.values()) == steps * 4  # 2 workers x 2 micro-batches


def test_lora_adapters_load_in_diffusers_at_their_scale_and_match_the_merged_export(prep, tiny_model, tmp_path, s3):
    from diffusers import WanPipeline

    run, resumed = tmp_path / "run", tmp_path / "resumed"
    sets = [
        *FAST,
        "train.workers=1",
        "train.checkpoint_every=2",
        "train.lora.enabled=true",
        "train.lora.rank=4",
        "train.lora.alpha=8",
        "train.lr=1e-2",
    ]
    cfg = tiny_config(tiny_model, *sets, "train.steps=4")
    train_experts(cfg, "both", prep, run, log=lambda _: None)
    ckpt = latest_checkpoint(run, "low")
    base = load_file(tiny_model / "transformer_2" / "diffusion_pytorch_model.safetensors")

    # the checkpoint holds the adapters and their AdamW state, not the frozen base
    state = checkpoint_state(ckpt, tmp_path)
    assert state["model"] and all(".lora_" in k for k in state["model"]), sorted(state["model"])[:4]
    assert len(state["model"]) == 2 * 20  # A and B of 2 blocks x (2 attentions x 4 projections + 2 FFN linears)
    assert any(v.abs().sum() > 0 for k, v in state["model"].items() if ".lora_B." in k)  # B starts at 0: it trained
    # resumed from step 2 (the base loaded from the model directory again), it ends where the straight run does
    train_experts(tiny_config(tiny_model, *sets, "train.steps=2"), "low", prep, resumed, log=lambda _: None)
    train_experts(tiny_config(tiny_model, *sets, "train.steps=4"), "low", prep, resumed, log=lambda _: None)
    assert [x["step"] for x in metrics(resumed, "low")] == [1, 2, 3, 4]
    assert_same_training_state(state, checkpoint_state(latest_checkpoint(resumed, "low"), resumed), atol=0)

    # exported under the plain config: the adapters' rank and alpha are the run's, from its config.yaml
    exported: list[str] = []
    out = export_run(tiny_config(tiny_model), run, tmp_path / "export", log=exported.append)
    assert any("low-noise expert from" in line and line.endswith("LoRA rank 4 alpha 8") for line in exported)
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
    assert len({k for _, group in expert_state_groups(tiny_model, "low", ckpt, cfg.train.lora) for k in group}) == 40

    # what a diffusers user does with the adapters: base model + load_lora_weights per expert
    kwargs = dict(
        prompt="a red circle",
        negative_prompt="blurry",
        height=64,
        width=64,
        num_frames=9,
        num_inference_steps=6,
        output_type="np",
    )

    def frames(pipe):
        pipe.set_progress_bar_config(disable=True)
        return pipe(**kwargs, generator=torch.Generator().manual_seed(0)).frames[0]

    with_adapters = WanPipeline.from_pretrained(tiny_model)
    with_adapters.load_lora_weights(out / "transformer" / "lora")
    with_adapters.load_lora_weights(out / "transformer_2" / "lora", load_into_transformer_2=True)
    ours, base_frames = frames(with_adapters), frames(WanPipeline.from_pretrained(tiny_model))
    reference = frames(WanPipeline.from_pretrained(out))
    assert abs(ours - reference).max() <= 1e-4
    assert abs(base_frames - reference).max() > 100 * abs(ours - reference).max() + 1e-3

    # served by name: the run directory itself (its latest checkpoint, or step 2's) and the export's adapters
    served = tiny_config(
        tiny_model,
        f"infer.loras.run={run}",
        f"infer.loras.early.path={run}",
        "infer.loras.early.step=2",
        f"infer.loras.export={out}",
    )
    sampler = Sampler(StageSpec.for_batch(tiny_model, served))
    params = GenerationParams(kwargs["prompt"], kwargs["negative_prompt"], 64, 64, 9, 6, 5.0, 5.0, seed=0)
    for name in ("run", "export"):
        assert abs(sampler(replace(params, loras=((name, 1.0),))) - ours).max() <= 1e-4, name
    assert abs(sampler(replace(params, loras=(("early", 1.0),))) - ours).max() > 1e-3  # step 2's adapters
    with pytest.raises(ConfigError, match="no checkpoint at step 3 \\(steps: 2, 4\\)"):
        StageSpec.for_batch(tiny_model, tiny_config(tiny_model, f"infer.loras.x.path={run}", "infer.loras.x.step=3"))

    # the same run and export in a bucket, served from there: the same frames
    s3.create_bucket(Bucket="lora-served")
    for local, key in ((run, "run"), (out, "export")):
        for f in local.rglob("*"):
            if f.is_file():
                s3.upload_file(str(f), "lora-served", f"{key}/{f.relative_to(local)}")
    in_bucket = tiny_config(
        tiny_model,
        "infer.loras.run=s3://lora-served/run",
        "infer.loras.early.path=s3://lora-served/run",
        "infer.loras.early.step=2",
        "infer.loras.export=s3://lora-served/export",
        "infer.loras.file.high=s3://lora-served/export/transformer/lora/pytorch_lora_weights.safetensors",
    )
    from_bucket = Sampler(StageSpec.for_batch(tiny_model, in_bucket))
    for name in ("run", "early", "export"):
        np.testing.assert_array_equal(
            from_bucket(replace(params, loras=((name, 1.0),))), sampler(replace(params, loras=((name, 1.0),))), name
        )
    assert abs(from_bucket(replace(params, loras=(("file", 1.0),))) - ours).max() > 1e-3  # the high expert's only
