"""The Wan2.2 family: each model kind read from its directory's config files, tiny checkpoints of
each that diffusers' own pipelines run, the presets, the sampler against diffusers' pipeline of each
image model, and requests that carry an image only where the model takes one."""

import io
import json
import os
import subprocess
import sys
import typing
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, tiny_config
from PIL import Image

from wanray import model_files, models
from wanray.config import load_config
from wanray.errors import ConfigError
from wanray.infer.scores import VideoScorer
from wanray.sections import ModelConfig
from wanray.wan import KINDS


@pytest.fixture(scope="module")
def tiny_kinds(tmp_path_factory):
    root = tmp_path_factory.mktemp("kinds")
    return {k: model_files.write_tiny_checkpoint(root / k, kind=k) for k in KINDS}


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
        args = dict(
            prompt="a red circle",
            height=64,
            width=64,
            num_frames=5,
            num_inference_steps=2,
            output_type="np",
            generator=torch.Generator().manual_seed(0),
        )
        if kind.image == "required":
            args["image"] = Image.fromarray(np.full((64, 64, 3), 128, np.uint8))
        frames = pipe(**args).frames[0]
        assert frames.shape == (5, 64, 64, 3) and np.isfinite(frames).all(), name


def test_directories_that_are_no_known_kind_and_boundaries_that_do_not_apply(tiny_kinds, tmp_path):
    with pytest.raises(ConfigError, match="model.boundary does not apply to Wan2.2-TI2V-5B"):
        models.read_contract(tiny_kinds["ti2v-5b"], ModelConfig(boundary=0.9))
    odd = model_files.write_config_dir(tmp_path / "odd", {**model_files.A14B_TRANSFORMER, "in_channels": 20})
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


def test_the_pretrained_tiny_model_reconstructs_the_shapes_and_only_its_kind_takes_its_weights(tmp_path):
    """configs/tiny.yaml's weights (model.tiny_weights: shapes): its VAE gives back a synthetic clip where a random
    one gives texture, and a tiny I2V or TI2V asked for them is a one-line config error, not a crash on load."""
    from wanray.data.synthetic import SyntheticClip, render
    from wanray.encoding import encode_latents, frames_to_video
    from wanray.wan import denormalize_latents

    clip = SyntheticClip("", "", 64, 64, 16, 17, "square", "yellow", "gray", "top to bottom")
    video = frames_to_video(render(clip))[None]
    error = {}
    for weights in ("shapes", "random"):
        vae = models.load_vae(model_files.write_tiny_checkpoint(tmp_path / weights, weights=weights))
        with torch.no_grad():
            z = denormalize_latents(encode_latents(vae, video), vae.config.latents_mean, vae.config.latents_std)
            error[weights] = float((vae.decode(z).sample - video).abs().mean())
    assert error["shapes"] < 0.1 < error["random"], error
    assert load_config(ROOT / "configs" / "tiny.yaml").model.tiny_weights == "shapes"
    with pytest.raises(ConfigError, match="set model.tiny_weights=random for a tiny ti2v-5b"):
        load_config(ROOT / "configs" / "tiny.yaml", ["model.tiny_kind=ti2v-5b"])
    assert load_config(ROOT / "configs" / "tiny.yaml", ["model.tiny_kind=ti2v-5b", "model.tiny_weights=random"])
    # its CLIP named from the repository root, as the README's evaluation does: absolute for actors elsewhere
    relative = os.path.relpath(model_files.TINY_SHAPES / "clip")
    clip = load_config(ROOT / "configs" / "tiny.yaml", [f"eval.clip_model={relative}"]).eval.clip_model
    assert Path(clip).is_absolute() and Path(clip) == (model_files.TINY_SHAPES / "clip").resolve()


@pytest.mark.integration  # a script run of its own (26 s): not in the unit tier's 2 minutes
def test_the_pretraining_script_writes_what_the_tiny_model_is_built_from(tmp_path, monkeypatch):
    """scripts/pretrain_tiny.py, one step a stage, the transformer again in a second run that reads the first's
    VAE: its files are the ones write_tiny_checkpoint and eval.clip_model read."""
    out = tmp_path / "weights"
    steps = ["--vae-steps", "1", "1", "1", "--transformer-steps", "1", "--clip-steps", "1"]
    script = [sys.executable, str(ROOT / "scripts" / "pretrain_tiny.py"), "--out", str(out), *steps]
    for stages in (["vae", "transformer"], ["transformer", "clip"]):
        run = subprocess.run(
            [*script, "--stages", *stages],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert run.returncode == 0, run.stderr[-2000:]
        written = [line for line in run.stdout.splitlines() if line.startswith("[pretrain] wrote")]
        assert len(written) == len(stages) and all(str(out) in line for line in written), run.stdout
    monkeypatch.setattr(model_files, "TINY_SHAPES", out)
    model = model_files.write_tiny_checkpoint(tmp_path / "tiny", weights="shapes")
    stats = json.loads((out / "latents.json").read_text())
    assert models.load_vae(model).config.latents_std == stats["latents_std"]
    assert VideoScorer(str(out / "clip"))(np.zeros((2, 32, 32, 3), np.uint8), "a red circle").clip_score is not None


def test_the_sampler_gives_wan_image_to_video_pipelines_frames_for_an_image(tiny_kinds, tmp_path):
    """Image to video through the four stages (condition from the VAE stage, then both experts) equals
    diffusers' WanImageToVideoPipeline with the same weights, image, prompts and seed, including the
    switch at the I2V boundary 0.9."""
    import base64

    from reference import wanpipeline_frames

    from wanray.data.synthetic import SyntheticClip, render
    from wanray.infer.request import GenerationParams
    from wanray.infer.sampler import Sampler
    from wanray.infer.spec import StageSpec

    path = tiny_kinds["i2v-a14b"]
    frame = render(SyntheticClip("x", "", 80, 48, 16, 2, "circle", "red", "gray", "left to right"))[0]
    params = GenerationParams(
        prompt="a red circle",
        negative_prompt="blurry",
        height=64,
        width=48,
        num_frames=9,
        num_inference_steps=8,
        guidance_scale=3.5,
        guidance_scale_2=3.5,
        seed=5,
        image=base64.b64encode(_png(frame)).decode(),
    )  # 80x48, resized as diffusers does
    spec = StageSpec.for_batch(path, tiny_config(path))
    ours = Sampler(spec)(params)
    ref = wanpipeline_frames(path, params, spec.contract.boundary)
    assert ours.shape == (9, 64, 48, 3) and np.abs(ours - ref).max() <= 1e-4
    other = Sampler(spec)(
        GenerationParams(
            **{**params.__dict__, "image": base64.b64encode(_png(np.full((80, 48, 3), 30, np.uint8))).decode()}
        )
    )
    assert np.abs(other - ours).max() > 1e-3  # the image reaches the frames
    both = GenerationParams(**{**params.__dict__, "last_image": photo("lion.jpg")})  # and a last frame
    ours_last = Sampler(spec)(both)
    assert np.abs(ours_last - wanpipeline_frames(path, both, spec.contract.boundary)).max() <= 1e-4
    assert np.abs(ours_last - ours).max() > 1e-3


def test_the_last_frame_mask_is_the_one_wan_image_to_video_pipeline_builds(tiny_kinds):
    from diffusers import WanImageToVideoPipeline

    from wanray.wan import first_frame_mask

    pipe = WanImageToVideoPipeline.from_pretrained(tiny_kinds["i2v-a14b"])
    image = torch.zeros(1, 3, 32, 32)
    for last in (None, image):
        _, condition = pipe.prepare_latents(
            image, 1, 16, 32, 32, 13, torch.float32, torch.device("cpu"), last_image=last
        )
        assert torch.equal(first_frame_mask(condition.shape, last=last is not None), condition[:, :4])


def photo(name: str = "cheetah1.jpg") -> str:
    """A real photograph as base64 (one of the images gradio, a dependency, ships)."""
    import base64

    from gradio.media import get_image

    with open(get_image(name), "rb") as f:
        return base64.b64encode(f.read()).decode()


def test_ti2v_sampler_gives_diffusers_frames_with_and_without_a_first_image(tiny_kinds):
    """TI2V-5B: one transformer for every step, per-token timesteps, the 16x VAE. Text only equals
    WanPipeline(expand_timesteps=True); with a photograph as the first image it equals
    WanImageToVideoPipeline(expand_timesteps=True), whose first latent frame stays the image's."""
    from reference import wanpipeline_frames

    from wanray.infer.request import GenerationParams
    from wanray.infer.sampler import Sampler
    from wanray.infer.spec import StageSpec

    path = tiny_kinds["ti2v-5b"]
    spec = StageSpec.for_batch(path, tiny_config(path))
    sampler = Sampler(spec)
    assert sampler.low is None
    text = GenerationParams(
        prompt="a cheetah running",
        negative_prompt="blurry",
        height=64,
        width=96,
        num_frames=9,
        num_inference_steps=6,
        guidance_scale=5.0,
        guidance_scale_2=5.0,
        seed=4,
    )
    image = GenerationParams(**{**text.__dict__, "image": photo()})
    frames = {}
    for name, params in (("text", text), ("image", image)):
        frames[name] = sampler(params)
        ref = wanpipeline_frames(path, params)
        assert frames[name].shape == (9, 64, 96, 3) and np.abs(frames[name] - ref).max() <= 1e-4, name
    assert np.abs(frames["image"] - frames["text"]).max() > 1e-3  # the image reaches the frames


def _png(array) -> bytes:
    import io

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _png_header(width: int, height: int) -> str:
    """A base64 PNG whose header declares width x height, with no pixel data."""
    import base64
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return base64.b64encode(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")).decode()


def test_requests_and_prompt_files_carry_an_image_only_where_the_model_takes_one(tiny_kinds, tmp_path):
    import base64

    from wanray.errors import RequestError
    from wanray.infer.api import GenerateRequest, resolve
    from wanray.infer.batch import read_prompts

    cfg, t2v, i2v = tiny_config(tiny_kinds["t2v-a14b"]), KINDS["t2v-a14b"], KINDS["i2v-a14b"]
    png = base64.b64encode(_png(np.zeros((16, 16, 3), np.uint8))).decode()
    assert resolve(GenerateRequest(prompt="x", image=png), cfg, i2v).image == png
    ti2v = KINDS["ti2v-5b"]  # the image is optional
    assert resolve(GenerateRequest(prompt="x", image=png), cfg, ti2v).image == png
    assert resolve(GenerateRequest(prompt="x"), cfg, ti2v).image is None
    assert resolve(GenerateRequest(prompt="x", image=png, last_image=png), cfg, i2v).last_image == png
    for request, kind, message in (
        (GenerateRequest(prompt="x", image=png, last_image=png), ti2v, "Wan2.2-TI2V-5B takes no last_image"),
        (GenerateRequest(prompt="x", last_image=png), ti2v, "takes no last_image"),
        (GenerateRequest(prompt="x", image=png, last_image="@@"), i2v, "last_image is not a base64-encoded"),
    ):
        with pytest.raises(RequestError, match=message):
            resolve(request, cfg, kind)
    for request, kind, message in (
        (GenerateRequest(prompt="x", image=png), t2v, "Wan2.2-T2V-A14B takes no image"),
        (GenerateRequest(prompt="x"), i2v, "Wan2.2-I2V-A14B needs an image"),
        (GenerateRequest(prompt="x", image="not base64!"), i2v, "not a base64-encoded"),
        (
            GenerateRequest(prompt="x", image=base64.b64encode(b"text").decode()),
            i2v,
            "not a base64-encoded PNG, JPEG or WebP",
        ),
    ):
        with pytest.raises(RequestError, match=message):
            resolve(request, cfg, kind)
    with pytest.raises(RequestError, match="at most 10 are served"):
        resolve(
            GenerateRequest(prompt="x", image=png), tiny_config(tiny_kinds["t2v-a14b"], "infer.max_image_bytes=10"), i2v
        )
    gif = io.BytesIO()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(gif, format="GIF")
    for request, message in (
        # a few bytes that declare a huge image: refused from the header, before anything is allocated
        (GenerateRequest(prompt="x", image=_png_header(9000, 9000)), "^image is 9000x9000 pixels, at most 67108864"),
        (GenerateRequest(prompt="x", image=_png_header(20000, 10000)), "^image has more than 67108864 pixels"),
        (GenerateRequest(prompt="x", image=base64.b64encode(gif.getvalue()).decode()), "not a base64-encoded PNG"),
        (GenerateRequest(prompt="x", image=png, last_image=png, num_frames=1), "last_image needs num_frames of 5"),
    ):
        with pytest.raises(RequestError, match=message):
            resolve(request, cfg, i2v)
    # float32 frames pass the VAE stage, the object store and the ingress whole: bounded on their own
    small = tiny_config(tiny_kinds["t2v-a14b"], "infer.max_frames_output_bytes=100000")
    big = GenerateRequest(prompt="x", height=64, width=64, num_frames=9, output="frames")  # 9 x 64 x 64 x 12 bytes
    with pytest.raises(RequestError, match=r'"output": "frames" of 9x64x64 is 0.4 MB of float32, at most 0.1 MB'):
        resolve(big, small, t2v)
    assert resolve(big.model_copy(update={"output": "mp4"}), small, t2v).num_frames == 9
    assert resolve(big, cfg, t2v).num_frames == 9  # 442 kB: within the default 1 GiB

    (tmp_path / "first.png").write_bytes(_png(np.zeros((16, 16, 3), np.uint8)))
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "a", "image": "first.png"}\n{"prompt": "b", "image": "missing.png"}\n')
    with pytest.raises(RequestError, match="line 2: image file not found"):
        read_prompts(prompts, cfg, i2v)
    prompts.write_text(
        '{"prompt": "a", "image": "first.png"}\n{"prompt": "b", "image": "first.png", "last_image": "last.png"}\n'
    )
    (tmp_path / "last.png").write_bytes(_png(np.ones((16, 16, 3), np.uint8)))
    first, both = read_prompts(prompts, cfg, i2v)
    assert base64.b64decode(first.image) == (tmp_path / "first.png").read_bytes() and first.last_image is None
    assert base64.b64decode(both.last_image) == (tmp_path / "last.png").read_bytes()
