"""Context parallelism in training on a real local Ray, gloo on CPU: a sample's tokens split over 2 or 3
ranks give the loss, gradient norm and updated weights of the unsplit run; a 2x2 (data x context) run
resumes at another layout; configurations that cannot work fail in one line before any worker starts."""

import pytest
import torch
from conftest import tiny_config
from test_integration_train import FAST, checkpoint_state, metrics

from wanray import context_parallel
from wanray.errors import ConfigError
from wanray.train.runs import latest_checkpoint
from wanray.train.trainer import make_trainer, train_experts


@pytest.fixture(scope="module")
def cp_prep(tmp_path_factory, tiny_model, synthetic, ray_cluster):
    from wanray.data.preprocess import run_preprocess

    out = tmp_path_factory.mktemp("cp_prep")
    # 9 frames: 3 latent frames of 4 x 4 patches, 48 tokens, which 2, 3 and 4 ranks can share
    run_preprocess(tiny_config(tiny_model, "data.num_frames=9"), str(synthetic), str(out), log=lambda _: None)
    return out


def _train(tiny_model, prep, run, *sets):
    train_experts(tiny_config(tiny_model, *FAST, "train.lr=3e-3", *sets), "high", prep, run, log=lambda _: None)
    return metrics(run)


@pytest.fixture(scope="module")
def unsplit(tiny_model, cp_prep, tmp_path_factory):
    """One worker, whole samples: 2 steps."""
    run = tmp_path_factory.mktemp("cp_unsplit")
    return run, _train(tiny_model, cp_prep, run, "train.workers=1", "train.steps=2")


@pytest.mark.parametrize("ulysses,ring", [(2, 1), (1, 3)], ids=["ulysses2", "ring3"])
def test_a_split_sample_trains_as_the_whole_one(tiny_model, cp_prep, unsplit, tmp_path, ulysses, ring):
    """Ring 3 trained on wrong key/value gradients with diffusers 0.42.1's own ring backward. (Ring 2 and 4 take
    the same path through training; test_unit_ring_attention checks each layout's gradients.)"""
    base_run, base = unsplit
    run = tmp_path / "run"
    workers = ulysses * ring
    split = _train(
        tiny_model,
        cp_prep,
        run,
        f"train.workers={workers}",
        "train.steps=2",
        f"train.context_parallel.ulysses={ulysses}",
        f"train.context_parallel.ring={ring}",
    )
    assert [m["world_size"] for m in split] == [workers, workers]
    for a, b in zip(base, split):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5) and b["grad_norm"] == pytest.approx(
            a["grad_norm"], rel=1e-4
        )
        assert b["samples_per_s"] > 0 and a["buckets"] == b["buckets"]
    assert_same_gradients(
        checkpoint_state(latest_checkpoint(base_run, "high"), tmp_path),
        checkpoint_state(latest_checkpoint(run, "high"), tmp_path),
    )


def assert_same_gradients(a: dict, b: dict) -> None:
    """AdamW's moments agree to 1e-4 of each tensor's largest value in gradient units (the second moment,
    quadratic in the gradients, through its square root), and the weights to 1e-4 (1/30 of one lr=3e-3
    step): Adam divides each moment by its root square, so a near-zero moment turns fp32 reduction-order
    noise into a visible update."""
    for key, tol in (("optim", None), ("model", 1e-4)):
        ta, tb = (flatten(state[key]) for state in (a, b))
        assert set(ta) == set(tb) and ta
        for name, x in ta.items():
            y = tb[name]
            if name.endswith("exp_avg_sq"):
                x, y = x.sqrt(), y.sqrt()
            scale = float(x.abs().max()) if tol is None else 1.0
            assert float((x.float() - y.float()).abs().max()) <= (tol or 1e-4) * max(scale, 1e-12), name


def flatten(tree, prefix="") -> dict:
    if torch.is_tensor(tree):
        return {prefix: tree}
    return (
        {k: v for key, sub in tree.items() for k, v in flatten(sub, f"{prefix}.{key}").items()}
        if isinstance(tree, dict)
        else {}
    )


def test_two_by_two_resumes_at_another_layout_where_the_straight_run_ends(tiny_model, cp_prep, tmp_path):
    """4 workers as 2 data-parallel groups of ulysses 2 for 3 steps, then 2 plain workers (the same 2
    data-parallel ranks, so the same batches) for 3 more: the weights and optimizer state of 6 straight
    steps on 2 workers."""
    common = ["train.checkpoint_every=3", "train.batch_size=1"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    _train(tiny_model, cp_prep, straight, *common, "train.workers=2", "train.steps=6")
    first = _train(
        tiny_model, cp_prep, resumed, *common, "train.workers=4", "train.steps=3", "train.context_parallel.ulysses=2"
    )
    assert [m["world_size"] for m in first] == [4, 4, 4]
    after = _train(tiny_model, cp_prep, resumed, *common, "train.workers=2", "train.steps=6")
    assert [m["step"] for m in after] == [1, 2, 3, 4, 5, 6]
    a = checkpoint_state(latest_checkpoint(straight, "high"), tmp_path)
    b = checkpoint_state(latest_checkpoint(resumed, "high"), tmp_path)
    assert b["train"]["step"] == 6
    assert_same_gradients(a, b)


def test_layouts_that_cannot_work_fail_in_one_line_before_any_worker(tiny_model, cp_prep, tmp_path):
    with pytest.raises(ConfigError, match=r"ulysses x ring = 4 must divide train.workers \(2\)"):
        tiny_config(tiny_model, "train.workers=2", "train.context_parallel.ulysses=4")
    with pytest.raises(ConfigError, match="ulysses = 8 must divide the transformer's 4 attention heads"):
        make_trainer(
            tiny_config(tiny_model, "train.workers=8", "train.context_parallel.ulysses=8"),
            "high",
            cp_prep,
            tmp_path / "run",
        )
    with pytest.raises(ConfigError, match="ulysses x ring = 32 must divide every sample's tokens; bucket 64x64x"):
        make_trainer(
            tiny_config(tiny_model, "train.workers=32", "train.context_parallel.ring=32"),
            "high",
            cp_prep,
            tmp_path / "run",
        )
    # held-out clips from a directory of their own: their shapes too (else the first validation step fails)
    import dataclasses

    from wanray.train.data import ClipIndex

    odd = dataclasses.replace(ClipIndex.from_dir(cp_prep), shapes=[(16, 1, 6, 6)])  # 1 x 3 x 3 = 9 tokens
    with pytest.raises(ConfigError, match="ulysses x ring = 2 must divide every sample's tokens; bucket .* has 9"):
        make_trainer(
            tiny_config(tiny_model, "train.workers=2", "train.context_parallel.ulysses=2"),
            "high",
            cp_prep,
            tmp_path / "run",
            holdout=odd,
        )
    with pytest.raises(ConfigError, match="attention backend 'flex' has no context-parallel backward"):
        context_parallel.check(2, 1, 40, {"480x832x81": 32760}, "flex")
    context_parallel.check(8, 1, 40, {"480x832x81": 32760}, "native")  # A14B: 40 heads, 32,760 tokens
    context_parallel.check(2, 1, 40, {}, "_native_npu", training=False)  # serving may use the NPU kernel
    from wanray.infer.spec import StageSpec

    with pytest.raises(
        ConfigError, match="infer.stages.high.devices: ulysses = 3 must divide the transformer's 4 attention"
    ):
        StageSpec.for_serving(tiny_model, tiny_config(tiny_model, "infer.stages.high.devices=3"))


def test_serve_runs_each_expert_over_two_devices_with_the_single_device_frames(tiny_model, ray_cluster):
    """infer.stages.{high,low}.devices=2: each expert stage is one replica holding 2 ranks in a placement
    group (Ulysses over 2 gloo ranks); the served frames equal diffusers' (the single-device sampler's)."""
    import io
    import json

    import numpy as np
    import requests
    from ray import serve
    from reference import wanpipeline_frames

    from wanray.infer.request import GenerationParams
    from wanray.infer.serve import APP_NAME, start
    from wanray.runtime import free_port

    cfg = tiny_config(
        tiny_model, f"infer.port={free_port()}", "infer.stages.high.devices=2", "infer.stages.low.devices=2"
    )
    url = start(cfg, str(tiny_model))
    try:
        health = requests.get(f"{url}/v1/health", timeout=30).json()
        assert health["stages"]["high"]["devices"] == health["stages"]["low"]["devices"] == 2
        from ray._private.state import actors  # the GCS's table: the state API needs the dashboard

        helpers = [a for a in actors().values() if a["ActorClassName"].endswith("ExpertRank") and a["State"] == "ALIVE"]
        assert len(helpers) == 2  # rank 1 of each expert stage, beside its replica (rank 0)
        body = dict(
            prompt="a red circle moving left",
            negative_prompt="blurry",
            height=64,
            width=64,
            num_frames=9,
            num_inference_steps=6,
            guidance_scale=4.0,
            guidance_scale_2=3.0,
            seed=7,
        )
        r = requests.post(
            f"{url}/v1/generate",
            data=json.dumps({**body, "output": "frames"}),
            timeout=300,
            headers={"content-type": "application/json"},
        )
        assert r.status_code == 200, r.text
        frames = np.load(io.BytesIO(r.content))
        ref = wanpipeline_frames(tiny_model, GenerationParams(**body))
        assert frames.shape == (9, 64, 64, 3) and np.abs(frames - ref).max() <= 1e-4
        odd = requests.post(f"{url}/v1/generate", json={**body, "num_frames": 1, "height": 48, "width": 48}, timeout=60)
        assert odd.status_code == 422 and "9 tokens, which the 2 devices of an expert stage" in odd.json()["detail"]
    finally:
        serve.delete(APP_NAME)
        serve.shutdown()


def test_a_batch_actor_runs_both_experts_over_two_devices_with_the_single_device_frames(
    tiny_model, ray_cluster, tmp_path
):
    """infer.batch_devices=2: the Ray Data batch actor is rank 0 and starts rank 1 on its node; both experts
    run with Ulysses over the 2 gloo ranks and the video's frames equal diffusers' (<= 1e-4), a line naming an
    adapter too (both ranks activate it). A prompt whose tokens the 2 devices cannot share evenly is refused with
    its line before any actor starts."""
    import numpy as np
    from reference import tiny_adapter, wanpipeline_frames
    from safetensors.torch import save_file

    from wanray.errors import RequestError
    from wanray.infer.batch import generate_videos, read_prompts

    cfg = tiny_config(
        tiny_model,
        "infer.batch_devices=2",
        "data.num_frames=9",
        "infer.num_inference_steps=6",
        "infer.negative_prompt=blurry",
        "infer.seed=5",
        f"infer.loras.a={tmp_path / 'a.safetensors'}",
    )
    save_file(tiny_adapter(tiny_model, "high", 5), tmp_path / "a.safetensors")  # one adapter for both experts
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        '{"prompt": "a red circle moving left"}\n'
        '{"prompt": "a blue square", "guidance_scale": 1.0, "loras": [{"name": "a", "scale": 0.9}]}\n'
    )
    params = read_prompts(prompts, cfg)
    done = generate_videos(cfg, str(tiny_model), params, tmp_path / "out", save_frames=True)
    assert [r["video"] for r in done] == ["00000.mp4", "00001.mp4"]
    adapters = [None, {"a": dict.fromkeys(("high", "low"), str(tmp_path / "a.safetensors"))}]
    for i, p in enumerate(params):
        frames = np.load(tmp_path / "out" / f"{i:05d}.npy")
        ref = wanpipeline_frames(tiny_model, p, adapters=adapters[i])
        assert frames.shape == (9, 64, 64, 3) and np.abs(frames - ref).max() <= 1e-4
    odd = tmp_path / "odd.jsonl"
    odd.write_text('{"prompt": "a cat"}\n{"prompt": "a dog", "num_frames": 1, "height": 48, "width": 48}\n')
    with pytest.raises(RequestError, match=r"odd.jsonl line 2: .*9 tokens, which the 2 devices"):
        read_prompts(odd, cfg)


def test_a_group_whose_rank_fails_in_a_request_refuses_the_next_instead_of_hanging(tiny_model, ray_cluster):
    """Rank 0 of a 2-device expert fails in the middle of a request while rank 1 waits in that step's
    collective: the group kills rank 1 and refuses every later request at once (the Serve replica's health
    check then fails), where the next request's collectives would have paired with rank 1's stale one."""
    import threading

    import ray
    import torch
    import torch.distributed as dist

    from wanray.infer.api import GenerateRequest, resolve
    from wanray.infer.group import RankGroup
    from wanray.infer.request import TextEmbeddings
    from wanray.infer.spec import StageSpec
    from wanray.models import read_kind

    cfg = tiny_config(tiny_model, "infer.stages.high.devices=2", "infer.stages.low.devices=2")
    spec = StageSpec.for_serving(str(tiny_model), cfg)
    request = GenerateRequest(prompt="x", height=64, width=64, num_frames=9, num_inference_steps=4, guidance_scale=4)
    params = resolve(request, cfg, read_kind(str(tiny_model)), split=2)
    group = RankGroup(spec, ("high",), 2, lambda rank: {"num_cpus": 0})
    try:
        expert, stage = group.expert("high"), group.stages["high"]
        dim = stage.expert.config.text_dim
        text = TextEmbeddings(torch.randn(1, 512, dim), torch.randn(1, 512, dim))
        # an adapter that fails to load on rank 0: both ranks raise it together, and the group keeps serving
        from wanray.infer.request import AgreedFailure

        activate = stage.adapters.activate

        def unreadable(loras):
            raise OSError("AWS Error NETWORK_CONNECTION during GetObject")

        stage.adapters.activate = unreadable
        with pytest.raises(AgreedFailure, match="NETWORK_CONNECTION"):
            expert.denoise(params, text)
        stage.adapters.activate = activate
        assert not expert.broken and expert.denoise(params, text).step > 0
        forward, calls = stage._forward, []

        def failing(*args, **kwargs):  # the unconditional pass of step 1: rank 1 waits in its collective
            calls.append(1)
            if len(calls) == 2:
                raise RuntimeError("out of memory (injected)")
            return forward(*args, **kwargs)

        stage._forward = failing
        with pytest.raises(RuntimeError, match="ranks are out of step .rank 0: RuntimeError: out of memory"):
            expert.denoise(params, text)
        stage._forward = forward
        outcome: list = []
        later = threading.Thread(target=lambda: outcome.append(_raised(lambda: expert.denoise(params, text))))
        later.start()
        later.join(timeout=60)
        assert outcome and outcome[0].startswith("StageUnavailable: high expert's ranks are out of step")
        assert "out of memory (injected)" in expert.broken
        with pytest.raises(ray.exceptions.RayActorError):  # rank 1 was killed: no collective waits on it
            ray.get(group.ranks[0].__ray_ready__.remote(), timeout=30)
    finally:
        dist.destroy_process_group()


def _raised(call) -> str:
    try:
        call()
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    return "no error"
