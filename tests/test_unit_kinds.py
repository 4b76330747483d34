"""The Wan2.2 family: each model kind read from its directory's config files, tiny checkpoints of
each that diffusers' own pipelines run, the presets, and a clear refusal where wanray's stages do
not handle a kind yet."""
import json
import typing

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT, tiny_config
from wanray import models
from wanray.config import ModelConfig, load_config
from wanray.errors import ConfigError
from wanray.wan import KINDS, SUPPORTED_KINDS


@pytest.fixture(scope="module")
def tiny_kinds(tmp_path_factory):
    root = tmp_path_factory.mktemp("kinds")
    return {k: models.write_tiny_checkpoint(root / k, kind=k) for k in KINDS}


def test_each_tiny_kind_is_read_back_as_itself_and_runs_in_its_diffusers_pipeline(tiny_kinds):
    from diffusers import DiffusionPipeline

    for name, path in tiny_kinds.items():
        kind = KINDS[name]
        contract = models.read_contract(path, ModelConfig())
        assert contract.kind == kind
        assert contract.boundary == (kind.boundary or 0.0)
        assert contract.vae_scale_spatial == (16 if kind.latent_channels == 48 else 8)
        pipe = DiffusionPipeline.from_pretrained(path)
        assert type(pipe).__name__ == kind.pipeline and (pipe.transformer_2 is None) == (len(kind.experts) == 1)
        pipe.set_progress_bar_config(disable=True)
        args = dict(prompt="a red circle", height=64, width=64, num_frames=5, num_inference_steps=2, output_type="np",
                    generator=torch.Generator().manual_seed(0))
        if kind.image == "required":
            args["image"] = Image.fromarray(np.full((64, 64, 3), 128, np.uint8))
        frames = pipe(**args).frames[0]
        assert frames.shape == (5, 64, 64, 3) and np.isfinite(frames).all(), name


def test_stages_that_do_not_handle_a_kind_yet_refuse_it_in_one_line(tiny_kinds):
    from wanray.infer.sampler import StageSpec

    for name, path in tiny_kinds.items():
        if name in SUPPORTED_KINDS["sampler"]:
            StageSpec.for_serving(path, tiny_config(path))
            continue
        with pytest.raises(ConfigError, match=f"^the model is {KINDS[name].title}: wanray's sampler handles "
                                              "Wan2.2-T2V-A14B only so far$"):
            StageSpec.for_serving(path, tiny_config(path))
    contract = models.read_contract(tiny_kinds["ti2v-5b"], ModelConfig())
    for what in ("preprocessing", "training", "export"):
        with pytest.raises(ConfigError, match=f"wanray's {what} handles Wan2.2-T2V-A14B, Wan2.2-I2V-A14B only"):
            contract.check_supported(what)


def test_directories_that_are_no_known_kind_and_boundaries_that_do_not_apply(tiny_kinds, tmp_path):
    with pytest.raises(ConfigError, match="model.boundary does not apply to Wan2.2-TI2V-5B"):
        models.read_contract(tiny_kinds["ti2v-5b"], ModelConfig(boundary=0.9))
    odd = models.write_config_dir(tmp_path / "odd", {**models.A14B_TRANSFORMER, "in_channels": 20})
    with pytest.raises(ConfigError, match="in_channels 20, VAE z_dim 16.*none of the Wan2.2 models wanray knows"):
        models.read_contract(odd, ModelConfig())
    index = json.loads((tiny_kinds["i2v-a14b"] / "model_index.json").read_text())
    assert index["boundary_ratio"] == 0.9  # the official I2V switch


def test_presets_and_the_tiny_kind_setting_name_every_kind():
    literal = typing.get_args(typing.get_type_hints(ModelConfig)["tiny_kind"])
    assert set(literal) == set(KINDS)
    i2v, ti2v = (load_config(ROOT / "configs" / f"{n}.yaml") for n in ("i2v_a14b", "ti2v_5b"))
    assert (i2v.infer.flow_shift, i2v.infer.guidance_scale, i2v.infer.guidance_scale_2) == (5.0, 3.5, 3.5)
    assert (ti2v.data.height, ti2v.data.width, ti2v.data.num_frames, ti2v.data.fps) == (704, 1280, 121, 24.0)
    assert (ti2v.infer.flow_shift, ti2v.infer.num_inference_steps, ti2v.infer.guidance_scale) == (5.0, 50, 5.0)
