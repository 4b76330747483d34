"""The Wan2.2 contract (boundary source, switch rule), the device Ray assigned, the attention backend."""

import json
import shutil

import pytest
import torch
from conftest import ROOT, tiny_config

from wanray.backends import attention_backend
from wanray.config import load_config
from wanray.devices import apply_attention_backend, assigned_device_index
from wanray.errors import ConfigError
from wanray.models import read_contract
from wanray.sections import ModelConfig
from wanray.wan import resolve_boundary


@pytest.mark.parametrize(
    "kind, env, assigned, index",
    [
        ("cuda", {}, [], 0),  # not a Ray worker with a device
        ("npu", {"ASCEND_RT_VISIBLE_DEVICES": "3"}, ["3"], 0),  # Ray isolates each worker's NPU
        ("cuda", {"CUDA_VISIBLE_DEVICES": "5"}, ["5"], 0),
        ("cuda", {"CUDA_VISIBLE_DEVICES": "0,1,2,3"}, ["2"], 2),  # Ray Train shares a node's GPU ids
        ("cuda", {"CUDA_VISIBLE_DEVICES": "2,3"}, ["2"], 0),
        ("npu", {"ASCEND_RT_VISIBLE_DEVICES": "4,5,6,7"}, ["6", "7"], 2),  # two devices: the first one
        ("npu", {}, ["6"], 6),  # RAY_EXPERIMENTAL_NOSET_*: ids are indices
        ("cpu", {"CUDA_VISIBLE_DEVICES": "1"}, [], 0),
    ],
)
def test_device_is_the_assigned_ones_place_among_the_visible(kind, env, assigned, index):
    assert assigned_device_index(kind, env, assigned) == index


def test_an_assigned_device_that_is_not_visible_is_an_error():
    with pytest.raises(RuntimeError, match="does not include the npu device Ray assigned"):
        assigned_device_index("npu", {"ASCEND_RT_VISIBLE_DEVICES": "0,1"}, ["3"])


def test_boundary_comes_from_the_directory_and_a_contradiction_is_an_error():
    assert resolve_boundary(0.875, None, False) == (0.875, "model_index.json")
    assert resolve_boundary(0.875, 0.875, False)[0] == 0.875
    assert resolve_boundary(None, 0.9, False) == (0.9, "model.boundary (model_index.json has none)")
    with pytest.raises(ConfigError, match="contradicts the model directory's boundary_ratio 0.875"):
        resolve_boundary(0.875, 0.9, False)
    assert resolve_boundary(0.875, 0.9, True)[0] == 0.9
    with pytest.raises(ConfigError, match="has no boundary_ratio: set model.boundary"):
        resolve_boundary(None, None, False)


def test_contract_of_a_model_directory(tiny_model, tmp_path):
    c = read_contract(tiny_model, ModelConfig())
    assert (c.boundary, c.boundary_timestep, c.num_train_timesteps) == (0.875, 875.0, 1000)
    assert c.latent_shape(16, 81, 480, 832) == (1, 16, 21, 60, 104) and c.text_tokens == 512
    assert c.uses_high_expert(torch.tensor([875.0, 874.9])).tolist() == [True, False]
    assert c.timestep_range("low") == (0.0, 875.0) and c.describe_range("high") == "t in [875, 1000]"
    z = torch.randn(2, 16, 3, 4, 4)
    torch.testing.assert_close(c.denormalize(c.normalize(z)), z)
    other = tmp_path / "model"
    shutil.copytree(tiny_model, other, ignore=shutil.ignore_patterns("*.safetensors"))
    index = json.loads((other / "model_index.json").read_text())
    del index["boundary_ratio"]
    (other / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ConfigError, match="set model.boundary"):
        read_contract(other, ModelConfig())
    assert read_contract(other, ModelConfig(boundary=0.9)).boundary == 0.9


def test_removed_and_bad_model_keys_are_one_line_errors(tiny_model):
    with pytest.raises(ConfigError, match="'data.max_text_tokens' was removed: Wan2.2's text length is fixed"):
        load_config(ROOT / "configs" / "tiny.yaml", ["data.max_text_tokens=256"])
    with pytest.raises(ConfigError, match="model.attention_backend 'fast' is not one wanray can use"):
        load_config(ROOT / "configs" / "tiny.yaml", ["model.attention_backend=fast"])


@pytest.mark.parametrize(
    "configured, device, dtype, training, expect",
    [
        (None, "npu", "bfloat16", True, "_native_npu"),
        (None, "npu", "float32", False, "native"),  # torch_npu's fused kernel takes half precision only
        (None, "cuda", "bfloat16", True, "native"),
        (None, "cpu", "float32", True, "native"),
        ("flash", "cuda", "bfloat16", True, "flash"),
        ("sage", "cuda", "bfloat16", False, "sage"),
        ("_native_npu", "cpu", "bfloat16", True, "runs on npu only, but training runs on cpu"),
        ("flash", "cuda", "float32", False, "takes bfloat16 or float16 only, but inference computes in float32"),
        ("sage", "cuda", "bfloat16", True, "has no backward pass"),
    ],
)
def test_attention_backend_per_stage(configured, device, dtype, training, expect):
    if expect.startswith(("_", "native", "flash", "sage")):
        assert attention_backend(configured, device, dtype, training) == expect
    else:
        with pytest.raises(ConfigError, match=expect):
            attention_backend(configured, device, dtype, training)


def test_a_training_run_refuses_an_attention_backend_for_another_device(tiny_model, tmp_path):
    from wanray.train.trainer import make_trainer

    cfg = tiny_config(tiny_model, "model.attention_backend=_native_npu")
    with pytest.raises(ConfigError, match="runs on npu only, but training runs on cpu"):
        make_trainer(cfg, "high", tmp_path, tmp_path / "run")


def test_attention_backend_reaches_every_attention_and_an_unusable_one_is_a_config_error(tiny_model):
    from wanray.infer.sampler import ExpertStage
    from wanray.infer.spec import StageSpec
    from wanray.models import load_expert
    from wanray.train.parallel import build_on_meta

    spec = StageSpec.for_serving(tiny_model, tiny_config(tiny_model, "model.attention_backend=_native_math"))
    assert spec.attention == {"high": "_native_math", "low": "_native_math"}
    stage = ExpertStage(spec, "high")
    for model in (stage.expert, build_on_meta(tiny_model, "low", attention_backend="_native_math")):
        backends = {m.processor._attention_backend for m in model.modules() if hasattr(m, "processor")}
        assert {str(b.value) for b in backends} == {"_native_math"}
    assert StageSpec.for_batch(tiny_model, tiny_config(tiny_model)).attention == {"high": "native", "low": "native"}
    for backend, package in (("flash", "flash-attn"), ("sage", "sageattention"), ("_flash_3", "Flash Attention 3")):
        with pytest.raises(ConfigError, match=rf"'{backend}' cannot run here: .*{package}"):  # none installed here
            apply_attention_backend(load_expert(tiny_model, "high"), backend)
