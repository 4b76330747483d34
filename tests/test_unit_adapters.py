"""LoRA adapters served by name: the frames equal diffusers' WanPipeline with load_lora_weights + set_adapters, in
every format diffusers reads for Wan; requests with different adapters on one sampler; bad adapters refused; the
distilled 4-step recipe (no Ray)."""

import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, tiny_config
from reference import LORA_LAYERS, LORA_RANK, tiny_adapter, wanpipeline_frames
from safetensors.torch import save_file

from wanray.config import load_config
from wanray.errors import ConfigError, RequestError
from wanray.infer.api import GenerateRequest, resolve
from wanray.infer.request import GenerationParams
from wanray.infer.sampler import Sampler
from wanray.infer.spec import StageSpec

PARAMS = GenerationParams(
    prompt="a red circle moving left to right",
    negative_prompt="blurry, static",
    height=32,
    width=32,
    num_frames=5,
    num_inference_steps=4,
    guidance_scale=4.0,
    guidance_scale_2=3.0,
    seed=3,
)
LAYERS, RANK = LORA_LAYERS, LORA_RANK
FORMATS = ("diffusers", "wan", "musubi", "comfyui")


def in_format(state: dict[str, torch.Tensor], fmt: str) -> dict[str, torch.Tensor]:
    """The adapter renamed as the other formats write it: the original Wan code's keys ("diffusion_model.", lora_A/B),
    musubi-tuner / kohya ("lora_unet_blocks_0_self_attn_q.lora_down/up" with an alpha at the rank: scale 1), or
    ComfyUI's ("diffusion_model.blocks.0.self_attn.q.lora_down/up" with an alpha of half the rank: each delta
    halved, as the distilled Lightning files carry alphas)."""
    if fmt == "diffusers":
        return state
    out = {}
    for key, value in state.items():
        _, _, block, *rest = key.split(".")
        module, part = ".".join(rest).split(".lora_")
        wan = f"blocks.{block}.{LAYERS[module]}"
        if fmt == "wan":
            out[f"diffusion_model.{wan}.lora_{part}"] = value
        elif fmt == "comfyui":
            out[f"diffusion_model.{wan}.lora_{'down' if part.startswith('A') else 'up'}.weight"] = value
            out[f"diffusion_model.{wan}.alpha"] = torch.tensor(RANK / 2)
        else:  # musubi
            name = "lora_unet_" + wan.replace(".", "_")
            out[f"{name}.lora_{'down' if part.startswith('A') else 'up'}.weight"] = value
            out[f"{name}.alpha"] = torch.tensor(float(RANK))
    return out


@pytest.fixture(scope="module")
def adapter_files(tiny_model, tmp_path_factory):
    """Adapters "a" and "b", a file per expert, in each format."""
    root = tmp_path_factory.mktemp("adapters")
    files: dict[str, dict[str, dict[str, str]]] = {}
    for seed, name in enumerate(("a", "b")):
        for expert in ("high", "low"):
            state = tiny_adapter(tiny_model, expert, seed * 2 + (expert == "low"))
            for fmt in FORMATS:
                path = root / fmt / f"{name}_{expert}.safetensors"
                path.parent.mkdir(exist_ok=True)
                save_file(in_format(state, fmt), path)
                files.setdefault(fmt, {}).setdefault(name, {})[expert] = str(path)
    return files


def lora_sets(files: dict[str, dict[str, str]]) -> list[str]:
    return [f"infer.loras.{name}.{expert}={path}" for name, per in files.items() for expert, path in per.items()]


@pytest.mark.parametrize("fmt", FORMATS)
def test_stacked_adapters_give_wanpipelines_frames_in_every_format(tiny_model, adapter_files, fmt):
    files = adapter_files[fmt]
    spec = StageSpec.for_batch(tiny_model, tiny_config(tiny_model, *lora_sets(files)))
    halved = fmt == "comfyui"  # its alphas halve each delta: twice the scale gives the same weights
    params = replace(PARAMS, loras=(("a", 0.7 * (1 + halved)), ("b", 1.3 * (1 + halved))))
    ours = Sampler(spec)(params)
    ref = wanpipeline_frames(tiny_model, params, spec.contract.boundary, adapters=files)
    assert np.abs(ours - ref).max() <= 1e-4
    if halved:  # the alphas are applied: the diffusers-format adapters at 0.7 and 1.3 give these frames
        unhalved = replace(PARAMS, loras=(("a", 0.7), ("b", 1.3)))
        same = wanpipeline_frames(tiny_model, unhalved, spec.contract.boundary, adapters=adapter_files["diffusers"])
        assert np.abs(ours - same).max() <= 1e-4
    base = Sampler(spec)(PARAMS)
    assert np.abs(base - ours).max() > 100 * np.abs(ours - ref).max() + 1e-3  # the adapters change the frames


def test_interleaved_requests_each_get_their_own_adapters(tiny_model, adapter_files):
    """A, B, none, A on one sampler (with room for one adapter: every switch unloads one) equal each request
    served alone, and no adapter is read twice while it stays loaded."""
    sets = lora_sets(adapter_files["diffusers"])
    requests = [(("a", 1.0),), (("b", 0.5),), (), (("a", 1.0),)]
    alone = [
        Sampler(StageSpec.for_batch(tiny_model, tiny_config(tiny_model, *sets)))(replace(PARAMS, loras=r))
        for r in requests
    ]
    for most, loads in ((1, 3), (2, 2)):  # loaded at most 1: a, b, a; at most 2: a and b once
        sampler = Sampler(
            StageSpec.for_batch(tiny_model, tiny_config(tiny_model, *sets, f"infer.max_loaded_loras={most}"))
        )
        frames = [sampler(replace(PARAMS, loras=r)) for r in requests]
        for got, want in zip(frames, alone):
            np.testing.assert_array_equal(got, want)
        assert [sampler.high.adapters.loads, sampler.low.adapters.loads] == [loads, loads]
    assert np.abs(alone[0] - alone[2]).max() > 1e-3 and np.abs(alone[1] - alone[2]).max() > 1e-3


def test_an_adapter_for_one_expert_leaves_the_other_as_it_was(tiny_model, adapter_files, tmp_path):
    files = {"a": {"low": adapter_files["diffusers"]["a"]["low"]}}
    spec = StageSpec.for_batch(tiny_model, tiny_config(tiny_model, *lora_sets(files)))
    params = replace(PARAMS, loras=(("a", 1.0),))
    ref = wanpipeline_frames(tiny_model, params, spec.contract.boundary, adapters=files)
    assert np.abs(Sampler(spec)(params) - ref).max() <= 1e-4
    assert spec.adapters["a"].keys() == {"low"}
    # the export of a LoRA run that trained the low-noise expert alone: its transformer_2/lora only
    export = tmp_path / "export"
    (export / "transformer_2" / "lora").mkdir(parents=True)
    save_file(
        tiny_adapter(tiny_model, "low", 0), export / "transformer_2" / "lora" / "pytorch_lora_weights.safetensors"
    )
    assert StageSpec.for_batch(tiny_model, tiny_config(tiny_model, f"infer.loras.x={export}")).adapters["x"].keys() == {
        "low"
    }


def test_bad_adapters_are_one_line_errors_at_start(tiny_model, adapter_files, tmp_path):
    good = tiny_adapter(tiny_model, "high", 0)
    cases = {
        "no module": ({**good, "transformer.blocks.0.attn1.to_z.lora_A.weight": torch.zeros(RANK, 4)}, "matches no"),
        "wrong rank": (
            {k: v[:2] if k.endswith("attn1.to_q.lora_A.weight") and "blocks.0." in k else v for k, v in good.items()},
            "rank 2",
        ),
        "no lora_A": ({k: v for k, v in good.items() if "blocks.0.attn1.to_q.lora_A" not in k}, "but no lora_A"),
        "wrong width": (
            {k: torch.zeros(RANK, 3) if k.endswith("blocks.1.ffn.net.2.lora_A.weight") else v for k, v in good.items()},
            "takes",
        ),
    }
    for case, (state, message) in cases.items():
        path = tmp_path / f"{case.replace(' ', '_')}.safetensors"
        save_file(state, path)
        with pytest.raises(ConfigError, match=message) as e:
            StageSpec.for_batch(tiny_model, tiny_config(tiny_model, f"infer.loras.x.high={path}"))
        assert "infer.loras.x" in str(e.value) and "\n" not in str(e.value), case
    pickle = tmp_path / "adapter.bin"
    pickle.write_bytes(b"not read")
    for value, message in ((tmp_path / "missing.safetensors", "not found"), (pickle, "not a .safetensors")):
        with pytest.raises(ConfigError, match=message):
            StageSpec.for_batch(tiny_model, tiny_config(tiny_model, f"infer.loras.x={value}"))
    for bad, message in (
        (["infer.loras.x.path=/a", "infer.loras.x.high=/b"], "either path"),
        (["infer.loras.bad name=/a"], "not an adapter name"),
        (["infer.loras={v1.2: /a}"], "not an adapter name"),  # peft's ModuleDict refuses a '.' at the first request
        (["infer.default_loras=[{name: y}]"], "does not define"),
        # what every request that names no adapter would be refused for (a 422 each)
        (["infer.loras.a=/a", "infer.default_loras=[{name: a}, {name: a}]"], "names an adapter twice"),
        (
            ["infer.loras={a: /a, b: /b}", "infer.default_loras=[{name: a}, {name: b}]", "infer.max_loaded_loras=1"],
            "stacks 2 adapters, at most 1",
        ),
    ):
        with pytest.raises(ConfigError, match=message):
            tiny_config(tiny_model, *bad)


def test_an_adapter_overwritten_while_served_is_refused_not_mixed(tiny_model, adapter_files, tmp_path):
    """Each expert stage (each replica) reads an adapter on its first use of it, and again after unloading it: a
    file overwritten in between gave the two experts, or two replicas, different adapters under one name. Every
    reader now reads the version resolved at start, or refuses, and a refused one unloads no other."""
    path = tmp_path / "style.safetensors"
    save_file(tiny_adapter(tiny_model, "high", 0), path)
    os.utime(path, (1, 1))  # a copy's, or a touched file's, other modification time: the same version
    sets = [f"infer.loras.style={path}", f"infer.loras.a={adapter_files['diffusers']['a']['high']}"]
    sampler = Sampler(StageSpec.for_batch(tiny_model, tiny_config(tiny_model, *sets, "infer.max_loaded_loras=1")))
    sampler(replace(PARAMS, loras=(("style", 1.0),)))
    os.utime(path)
    sampler(replace(PARAMS, loras=(("a", 1.0),)))  # unloads style
    save_file({**tiny_adapter(tiny_model, "low", 1), "transformer.extra.lora_A.weight": torch.zeros(1, 1)}, path)
    with pytest.raises(ConfigError, match="overwritten after it was checked at start") as e:
        sampler(replace(PARAMS, loras=(("style", 1.0),)))
    assert str(path) in str(e.value) and "\n" not in str(e.value)
    assert sampler.high.adapters.names == ("a",) and sampler.high.adapters.loads == 2


def test_requests_name_served_adapters_only(tiny_model, adapter_files):
    cfg = tiny_config(tiny_model, *lora_sets(adapter_files["diffusers"]), "infer.max_loaded_loras=2")
    ok = resolve(GenerateRequest(prompt="p", loras=[{"name": "a", "scale": 0.5}, {"name": "b"}]), cfg)
    assert ok.loras == (("a", 0.5), ("b", 1.0))
    for loras, message in (
        ([{"name": "c"}], "no adapter named 'c'"),
        ([{"name": "a"}, {"name": "a"}], "named twice"),
        ([{"name": "a", "scale": 100}], "scale"),
    ):
        with pytest.raises(RequestError, match=message):
            resolve(GenerateRequest(prompt="p", loras=loras), cfg)
    defaults = tiny_config(
        tiny_model, *lora_sets(adapter_files["diffusers"]), "infer.default_loras=[{name: b, scale: 2}]"
    )
    assert resolve(GenerateRequest(prompt="p"), defaults).loras == (("b", 2.0),)
    assert resolve(GenerateRequest(prompt="p", loras=[]), defaults).loras == ()


def lightning_euler(shift: float):
    """Wan2.2-Lightning's sampler as a scheduler WanPipeline takes: sigmas evenly spaced from 1 to 0, shifted."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    class Scheduler(FlowMatchEulerDiscreteScheduler):
        def set_timesteps(self, num_inference_steps, device=None, **_):
            super().set_timesteps(sigmas=np.linspace(1, 0, num_inference_steps + 1)[:-1].tolist(), device=device)

    return Scheduler(num_train_timesteps=1000, shift=shift)


def test_the_distilled_recipe_runs_one_forward_per_step_on_lightnings_timesteps(tiny_model):
    """4 Euler steps at shift 5 and guidance 1.0: t = 1000, 937.5, 833.3, 625 (the high-noise expert takes the first
    two at boundary 0.875), one forward per step in both experts, and diffusers' frames with that scheduler."""
    preset = load_config(ROOT / "configs" / "t2v_a14b_lightning.yaml").infer  # the recipe as the preset states it
    assert [u.name for u in preset.default_loras] == ["lightning"]
    recipe = {k: getattr(preset, k) for k in ("sampler", "flow_shift", "num_inference_steps")}
    recipe |= {k: getattr(preset, k) for k in ("guidance_scale", "guidance_scale_2")}
    assert recipe == dict(
        sampler="euler", flow_shift=5.0, num_inference_steps=4, guidance_scale=1.0, guidance_scale_2=1.0
    )
    cfg = tiny_config(
        tiny_model, *(f"infer.{k}={v}" for k, v in recipe.items()), "model.boundary=0.875", "model.force_boundary=true"
    )
    params = resolve(GenerateRequest(prompt="a red circle", height=32, width=32, num_frames=5), cfg)
    spec = StageSpec.for_batch(tiny_model, cfg)
    sampler = Sampler(spec)
    seen: dict[str, list[float]] = {"high": [], "low": []}
    for name, stage in (("high", sampler.high), ("low", sampler.low)):
        stage.expert.register_forward_hook(
            lambda _m, _a, kwargs, _out, name=name: seen[name].append(float(kwargs["timestep"][0])), with_kwargs=True
        )
    ours = sampler(params)
    sigmas = [5 * s / (1 + 4 * s) for s in (1.0, 0.75, 0.5, 0.25)]
    assert seen == {
        "high": pytest.approx([1000 * s for s in sigmas[:2]]),
        "low": pytest.approx([1000 * s for s in sigmas[2:]]),
    }
    ref = wanpipeline_frames(tiny_model, params, 0.875, scheduler=lightning_euler(5.0))
    assert np.abs(ours - ref).max() <= 1e-4


def test_generate_py_lines_name_adapters_and_survive_the_batch_actors_json(tiny_model, adapter_files, tmp_path):
    import dataclasses
    import json

    from wanray.infer.batch import read_prompts

    cfg = tiny_config(tiny_model, *lora_sets(adapter_files["diffusers"]))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        '{"prompt": "a cat", "loras": [{"name": "a", "scale": 0.5}, {"name": "b"}], "sampler": "euler"}\n'
        '{"prompt": "a dog"}\n'
    )
    first, second = read_prompts(prompts, cfg)
    assert (first.loras, first.sampler, second.loras, second.sampler) == (
        (("a", 0.5), ("b", 1.0)),
        "euler",
        (),
        "unipc",
    )
    assert GenerationParams(**json.loads(json.dumps(dataclasses.asdict(first)))) == first  # the actor's copy
    prompts.write_text('{"prompt": "a cat", "loras": [{"name": "z"}]}\n')
    with pytest.raises(RequestError, match="line 1: no adapter named 'z'"):
        read_prompts(prompts, cfg)


def test_offloaded_experts_apply_adapters_as_resident_ones(tiny_model, adapter_files):
    sets = lora_sets(adapter_files["diffusers"])
    params = replace(PARAMS, loras=(("b", 1.0),))
    plain = Sampler(StageSpec.for_batch(tiny_model, tiny_config(tiny_model, *sets)))(params)
    offloaded = Sampler(StageSpec.for_batch(tiny_model, tiny_config(tiny_model, *sets, "infer.batch_offload=true")))
    np.testing.assert_array_equal(offloaded(params), plain)


def test_a_full_fine_tune_run_is_no_adapter(tiny_model, tmp_path):
    import dataclasses

    import yaml

    from wanray.train.runs import CONFIG_FILE, RUN_FILE

    cfg = tiny_config(tiny_model)
    (tmp_path / "run" / "high").mkdir(parents=True)
    (tmp_path / "run" / "high" / RUN_FILE).write_text("{}")
    (tmp_path / "run" / "high" / CONFIG_FILE).write_text(yaml.safe_dump(dataclasses.asdict(cfg)))
    with pytest.raises(ConfigError, match="fine-tuned the whole expert, not LoRA adapters"):
        StageSpec.for_batch(tiny_model, tiny_config(tiny_model, f"infer.loras.full={tmp_path / 'run'}"))


def test_the_memory_plan_counts_the_adapters_an_expert_holds_at_once(tiny_model, adapter_files):
    from wanray.infer.plan import plan_inference

    sets = lora_sets(adapter_files["diffusers"])
    sizes = {  # float32 bytes of each expert's two adapters
        e: [
            sum(t.numel() * 4 for t in tiny_adapter(tiny_model, e, seed * 2 + (e == "low")).values()) for seed in (0, 1)
        ]
        for e in ("high", "low")
    }
    for most in (1, 2):
        plan = plan_inference(tiny_config(tiny_model, *sets, f"infer.max_loaded_loras={most}"), tiny_model, "serve")
        for e in ("high", "low"):
            assert plan.stages[e].adapter_bytes == sum(sorted(sizes[e], reverse=True)[:most]) > 0
            assert (
                plan.stages[e].total_bytes
                == plan.stages[e].weight_bytes + plan.stages[e].adapter_bytes + plan.stages[e].working_bytes
            )
        assert any("adapters" in line for line in plan.lines())
    assert plan_inference(tiny_config(tiny_model), tiny_model, "serve").stages["high"].adapter_bytes == 0


def test_an_adapter_of_the_layer_that_gathers_split_tokens_is_refused_over_several_devices(tiny_model, tmp_path):
    """proj_out gathers a multi-device expert's tokens (diffusers' _cp_plan): an adapter of it would add its
    per-shard output to the gathered one. One device takes it; two refuse it at start."""
    from wanray.model_files import TINY_TRANSFORMER

    d = TINY_TRANSFORMER["num_attention_heads"] * TINY_TRANSFORMER["attention_head_dim"]
    out = TINY_TRANSFORMER["out_channels"] * 4  # proj_out: inner dim -> out_channels x the 1x2x2 patch
    state = {
        **tiny_adapter(tiny_model, "high", 0),
        "transformer.proj_out.lora_A.weight": torch.randn(RANK, d),
        "transformer.proj_out.lora_B.weight": torch.randn(out, RANK),
    }
    save_file(state, tmp_path / "head.safetensors")
    sets = [f"infer.loras.head={tmp_path / 'head.safetensors'}"]
    assert StageSpec.for_batch(tiny_model, tiny_config(tiny_model, *sets)).adapters["head"].keys() == {"high", "low"}
    with pytest.raises(ConfigError, match="adapts proj_out, where the expert's 2 devices gather"):
        StageSpec.for_batch(tiny_model, tiny_config(tiny_model, *sets, "infer.batch_devices=2"))


def _activate_rank(rank: int, out: str) -> None:
    """One of two gloo ranks of an expert stage whose rank 1 fails to load its adapter: what each rank raised."""
    from types import SimpleNamespace

    import torch.distributed as dist

    from wanray.infer.sampler import ExpertStage

    class Adapters:
        def activate(self, loras):
            if rank == 1:
                raise OSError("AWS Error NETWORK_CONNECTION during GetObject")

    dist.init_process_group("gloo", init_method=f"file://{out}/store", rank=rank, world_size=2)
    stage = SimpleNamespace(adapters=Adapters(), ranks=2, device=torch.device("cpu"), expert_name="high")
    try:
        ExpertStage._activate(stage, (("style", 1.0),))
        raised = "nothing"
    except Exception as e:
        raised = f"{type(e).__name__}: {e}"
    dist.destroy_process_group()
    Path(out, f"rank{rank}").write_text(raised)


def test_an_adapter_that_fails_on_one_rank_fails_the_request_on_every_rank(tmp_path):
    """Rank 0 raising alone would leave rank 1 in the request's first collective, where the next request's would
    pair with it; the ranks agree first, so both raise before any."""
    import torch.multiprocessing as mp

    mp.start_processes(_activate_rank, args=(str(tmp_path),), nprocs=2, start_method="spawn")
    # both an AgreedFailure: the group stays in step (wanray.infer.group keeps its ranks)
    assert (tmp_path / "rank1").read_text() == "AgreedFailure: OSError: AWS Error NETWORK_CONNECTION during GetObject"
    assert (tmp_path / "rank0").read_text() == "AgreedFailure: high expert: an adapter failed to load on another rank"
