"""The inference memory plan of the real Wan2.2-T2V-A14B: fake tensors, no weights, no device."""

import pytest
import torch
from conftest import ROOT, driver_plan

from wanray import model_files, models
from wanray.config import load_config
from wanray.infer.plan import LiveBytes, plan_inference, plan_stage


@pytest.fixture(scope="module")
def a14b(tmp_path_factory):
    return model_files.write_config_dir(tmp_path_factory.mktemp("a14b") / "model")


def preset(model, *sets):
    return load_config(ROOT / "configs" / "t2v_a14b.yaml", [f"model.path={model}", *sets])


def test_live_bytes_counts_the_peak_of_new_tensors_and_not_views_of_existing_ones():
    weight = torch.ones(100, 100)  # 40,000 bytes, existing
    tracker = LiveBytes([weight])
    with tracker:
        a = weight.t()  # a view: no new storage
        b = a * 2  # 40,000
        c = b + 1  # 80,000 alive
        del b
        d = c.sum(0)  # 40,000 + 400
    assert tracker.peak == 80_000 and tracker.live == 40_400
    del a, c, d
    assert tracker.live == 0


def test_stage_weights_are_the_published_models_bytes(a14b):
    plan = plan_inference(preset(a14b), a14b, "batch")
    # experts: bf16, except the modules diffusers keeps in float32, plus the float32 rope tables
    expert = models.expert_from_config(model_files.A14B_TRANSFORMER, torch.bfloat16, "meta")
    keep_fp32 = sum(p.numel() for n, p in expert.named_parameters() if p.dtype == torch.float32)
    rope = sum(b.numel() for b in expert.buffers())
    assert plan.stages["high"].weight_bytes == 2 * (14_288_491_584 - keep_fp32) + 4 * (keep_fp32 + rope)
    assert 0 < keep_fp32 < 0.005 * 14_288_491_584  # time embedder, norms, modulation tables
    # UMT5-XXL's encoder in bf16: one 256,384 x 4,096 embedding and 24 layers of
    # q, k, v, o (4,096 x 4,096), gated FFN (2 x 4,096 x 10,240 in, 10,240 x 4,096 out), two norms, 32 x 64 biases
    d, f = 4096, 10240
    umt5 = 256_384 * d + 24 * (4 * d * d + 3 * d * f + 2 * d + 32 * 64) + d
    assert plan.stages["text"].weight_bytes == 2 * umt5
    assert plan.stages["vae"].dtype == "float32" and 0.4e9 < plan.stages["vae"].weight_bytes < 0.6e9


def test_a_plan_from_two_blocks_is_the_whole_depths(a14b):
    """Blocks free their activations in inference, and are alike: a plan measures a two-block expert and scales
    its weights to the depth. Here the whole 40-block expert, built and run on fake tensors, gives the same."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from wanray.infer.plan import _expert_bytes

    cfg = preset(a14b)
    contract, config = models.read_contract(a14b, cfg.model), models.expert_config(a14b, "high")
    with FakeTensorMode():
        whole = _expert_bytes(config, torch.bfloat16, "native", contract, 81, 480, 832, False)
    plan = plan_stage(a14b, "high", "bfloat16", contract, 81, 480, 832)
    fp8 = plan_stage(a14b, "high", "bfloat16", contract, 81, 480, 832, quantize="fp8")
    assert (plan.weight_bytes, plan.weight_bytes - fp8.weight_bytes, plan.working_bytes) == whole
    assert config["num_layers"] == 40


def test_offload_decides_whether_a_batch_actor_fits_and_serving_plans_the_largest_request(a14b):
    offload = plan_inference(preset(a14b), a14b, "batch")
    resident = plan_inference(preset(a14b, "infer.batch_offload=false"), a14b, "batch")
    stages = offload.stages.values()
    assert offload.devices() == {"batch actor": max(s.total_bytes for s in stages)} and offload.fits
    assert resident.devices() == {
        "batch actor": sum(s.weight_bytes for s in stages) + max(s.working_bytes for s in stages)
    }
    assert not resident.fits  # ~77 GB: UMT5-XXL, two 14B experts and the VAE on one 64 GB device
    serve = plan_inference(preset(a14b), a14b, "serve")
    assert (serve.frames, serve.height, serve.width) == (81, 1280, 1280)
    assert serve.stages["high"].working_bytes > 3 * offload.stages["high"].working_bytes  # 134,400 tokens, not 32,760
    assert set(serve.devices()) == {"text", "high", "low", "vae"}
    split = plan_inference(preset(a14b, "infer.stages.high.devices=4"), a14b, "serve").stages["high"]
    assert split.devices == 4 and split.total_bytes == split.weight_bytes + serve.stages["high"].working_bytes // 4
    batched = plan_inference(preset(a14b, "infer.batched_guidance=true"), a14b, "batch").stages["high"]
    assert 1.5 * offload.stages["high"].working_bytes < batched.working_bytes  # cond and uncond at once
    batch = plan_inference(preset(a14b, "infer.batch_devices=2"), a14b, "batch")  # both experts over 2 devices
    assert batch.stages["high"].devices == batch.stages["low"].devices == 2 and batch.stages["vae"].devices == 1
    assert (
        batch.stages["high"].total_bytes
        == offload.stages["high"].weight_bytes + offload.stages["high"].working_bytes // 2
    )


def test_plan_flags_of_serve_and_generate_print_the_verdict_and_exit_by_it(a14b):
    def run(script, *sets):
        argv = ["--config", str(ROOT / "configs" / "t2v_a14b.yaml"), "--set", f"model.path={a14b}"]
        return driver_plan(script, *argv, *(a for s in sets for a in ("--set", s)))

    (serve, served), (batch, batched) = run("serve"), run("generate")
    resident, resident_out = run("generate", "infer.batch_offload=false")
    assert serve == 0 and "[plan] high: 43.96 GB" in served, served
    assert batch == 0 and "batch actor: 32.38 GB" in batched, batched
    assert resident == 1 and "DOES NOT FIT" in resident_out and "turn on infer.batch_offload" in resident_out


def test_validation_of_the_a14b_models_fits_a_64_gb_device_only_offloaded(a14b):
    """UMT5-XXL and both 14B experts resident need ~77 GB at 480P; offloaded, the validation actor holds one
    stage at a time."""
    sets = ["train.validation.every=500", "train.validation.prompts=[a cat]"]
    resident = plan_inference(preset(a14b, *sets, "train.validation.offload=false"), a14b, "validation")
    offloaded = plan_inference(preset(a14b, *sets), a14b, "validation")  # the preset offloads
    assert (resident.frames, resident.height, resident.width) == (81, 480, 832)
    assert resident.device_bytes == 64e9 and not resident.fits
    assert resident.devices()["validation actor"] > 69e9
    assert offloaded.fits and offloaded.devices()["validation actor"] == max(
        p.total_bytes for p in offloaded.stages.values()
    )


def test_train_plan_exits_1_when_the_validation_actor_does_not_fit(a14b):
    sets = ["train.validation.every=500", "train.validation.prompts=[a cat]"]

    def plan(*more):
        argv = ["--config", str(ROOT / "configs" / "t2v_a14b.yaml"), "--expert", "high"]
        argv += ["--set", f"model.path={a14b}", "--set", "train.workers=16"]
        return driver_plan("train", *argv, *(a for s in (*sets, *more) for a in ("--set", s)))

    (too_big, too_big_out), (fits, fits_out) = plan("train.validation.offload=false"), plan()
    assert too_big == 1 and "validation actor: " in too_big_out
    assert "DOES NOT FIT" in too_big_out and "turn on train.validation.offload" in too_big_out
    assert fits == 0 and "train.validation.offload on" in fits_out


def test_vae_tiling_bounds_the_decoders_working_set(a14b, tmp_path):
    """--plan with infer.vae_tiling counts the tiled decode (decode_tiled on fake tensors): at 1024x1024 the
    whole-frame decode's working set is more than twice the tiled one's (19.2 against 7.0 GB in 512-pixel tiles)."""
    contract = models.read_contract(a14b, preset(a14b).model)
    whole, tiled = (plan_stage(a14b, "vae", "float32", contract, 5, 1024, 1024, "native", False, t) for t in (0, 512))
    assert whole.working_bytes > 2 * tiled.working_bytes
    # plan_inference passes the tile on (a 2-block expert and a small clip: the plan of each stage is quick)
    shallow = model_files.write_config_dir(tmp_path / "two-blocks", {**model_files.A14B_TRANSFORMER, "num_layers": 2})
    small = ["data.num_frames=5", "data.min_frames=5", "data.height=256", "data.width=256"]
    plan = plan_inference(preset(shallow, "infer.vae_tiling=true", "infer.vae_tile=128", *small), shallow, "batch")
    tiles = plan_stage(shallow, "vae", "float32", contract, 5, 256, 256, "native", False, 128)
    assert plan.stages["vae"].working_bytes == tiles.working_bytes
    assert tiles.working_bytes < plan_stage(shallow, "vae", "float32", contract, 5, 256, 256).working_bytes


def test_fp8_experts_put_the_whole_model_on_one_device_and_are_refused_off_cuda(a14b, monkeypatch):
    """infer.quantize fp8: the block Linear layers become torchao Float8Tensors (on the meta device, torchao's
    GPU check lifted: there is no float8 GPU here) whose bytes are what --plan counts; each expert's weights
    halve (28.6 -> about 14.5 GB), so a batch actor holds both experts, UMT5 and the VAE on one 64 GB device
    without offload, which bf16 does not. Off CUDA it is a one-line ConfigError, in --plan and in the stages."""
    monkeypatch.syspath_prepend(str(ROOT / ".venv" / "extras"))  # scripts/setup.sh --with-test-deps puts it there
    import torchao.quantization.quant_api as quant_api

    from wanray.errors import ConfigError
    from wanray.infer.quantize import fp8_saved_bytes, quantize_fp8
    from wanray.models import block_linear

    expert = models.expert_from_config({**model_files.A14B_TRANSFORMER, "num_layers": 2}, torch.bfloat16, "meta")
    before, saved = sum(t.nbytes for t in expert.state_dict().values()), fp8_saved_bytes(expert)
    monkeypatch.setattr(quant_api, "_check_hardware_support", lambda granularity: None)
    assert quantize_fp8(expert) == 2 * 10  # per block: q, k, v, out of both attentions, the FFN's two layers
    converted = {n for n, m in expert.named_modules() if type(getattr(m, "weight", None)).__name__ == "Float8Tensor"}
    assert converted == {n for n, m in expert.named_modules() if block_linear(m, n)} and len(converted) == 20
    assert expert.blocks[0].attn1.to_q.weight.qdata.dtype == torch.float8_e4m3fn
    assert type(expert.proj_out.weight).__name__ == "Parameter"  # embedders, output projection, norms: as they were
    after = sum(
        t.qdata.nbytes + t.scale.nbytes if hasattr(t, "qdata") else t.nbytes for t in expert.state_dict().values()
    )
    assert after == before - saved

    cuda = ["infer.batch.device=cuda", "infer.batch.dtype=bfloat16", "infer.batch_offload=false"]
    bf16 = plan_inference(preset(a14b, "infer.batch_offload=false"), a14b, "batch")  # as planned above: cached
    fp8 = plan_inference(preset(a14b, *cuda, "infer.device_memory_gb=64", "infer.quantize=fp8"), a14b, "batch")
    assert 14.2e9 < fp8.stages["high"].weight_bytes < 14.7e9 and bf16.stages["high"].weight_bytes > 28.5e9
    assert fp8.fits and not bf16.fits
    assert fp8.stages["high"].dtype == "fp8 weights, bfloat16"
    with pytest.raises(ConfigError, match="infer.quantize fp8 runs on CUDA GPUs of compute capability 8.9"):
        plan_inference(preset(a14b, "infer.quantize=fp8"), a14b, "batch")
    from wanray.infer.spec import StageSpec

    with pytest.raises(ConfigError, match="runs on npu .on NPU, torch_npu's int8 matmuls are not wired in yet"):
        StageSpec.for_batch(a14b, preset(a14b, "infer.quantize=fp8", "infer.batch.device=npu"))
    with pytest.raises(ConfigError, match="infer.quantize fp8 halves the experts: run without offload"):
        StageSpec.for_batch(a14b, preset(a14b, *cuda[:2], "infer.batch_offload=true", "infer.quantize=fp8"))


def test_a_ti2v_experts_plan_is_what_its_real_step_holds(tmp_path):
    """TI2V-5B runs a timestep per token (expand_timesteps), and diffusers keeps a (tokens, 6, dim) projection of
    them through the forward: the plan's working set of a guided step equals what the sampler's own step holds
    on the tiny model, measured on real tensors (a plan with one timestep held a quarter less here)."""
    from conftest import tiny_config

    from wanray.infer.api import GenerateRequest, resolve
    from wanray.infer.request import TextEmbeddings
    from wanray.infer.sampler import ExpertStage
    from wanray.infer.spec import StageSpec

    model = model_files.write_tiny_checkpoint(tmp_path / "ti2v", kind="ti2v-5b")
    cfg = tiny_config(model)
    spec = StageSpec.for_batch(model, cfg)
    stage = ExpertStage(spec, "high")
    request = GenerateRequest(prompt="x", height=128, width=128, num_frames=17, num_inference_steps=4, guidance_scale=4)
    state = stage.initial_state(resolve(request, cfg, models.read_kind(model)))
    dim = stage.expert.config.text_dim
    text = TextEmbeddings(torch.zeros(1, 512, dim), torch.zeros(1, 512, dim))
    held = [*stage.expert.parameters(), *stage.expert.buffers(), state.latents, text.prompt, text.negative]
    with LiveBytes(held) as step, torch.no_grad():
        stage._steps(state, text, 4.0, 1)
    plan = plan_stage(model, "high", "float32", spec.contract, 17, 128, 128)
    assert abs(plan.working_bytes - step.peak) <= 0.01 * step.peak
