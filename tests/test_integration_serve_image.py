"""Serving the image models (tiny Wan2.2-I2V-A14B and TI2V-5B) on a real local Ray: the REST API and
the UI take a first image (a photograph and a rendered frame), and the served frames equal diffusers'
pipelines' (WanImageToVideoPipeline; WanPipeline for TI2V-5B without an image)."""

import base64
import io
import json

import av
import numpy as np
import pytest
import requests
from conftest import tiny_config
from PIL import Image
from reference import wanpipeline_frames
from test_unit_kinds import photo

from ui.app import build_ui
from wanray import model_files, models
from wanray.data.synthetic import SyntheticClip, render
from wanray.infer.request import GenerationParams
from wanray.runtime import free_port

BODY = {
    "i2v-a14b": dict(
        prompt="a green circle moving up",
        negative_prompt="blurry",
        height=48,
        width=64,
        num_frames=5,
        num_inference_steps=6,
        guidance_scale=3.5,
        guidance_scale_2=3.5,
        seed=9,
    ),
    "ti2v-5b": dict(
        prompt="a cheetah",
        negative_prompt="blurry",
        height=64,
        width=96,
        num_frames=9,
        num_inference_steps=5,
        guidance_scale=5.0,
        guidance_scale_2=5.0,
        seed=3,
    ),
}


@pytest.fixture(scope="module")
def image_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("image") / "first.png"
    Image.fromarray(render(SyntheticClip("x", "", 60, 80, 16, 2, "circle", "green", "black", "bottom to top"))[0]).save(
        path
    )
    return path


@pytest.fixture(scope="module", params=["i2v-a14b", "ti2v-5b"])
def server(request, ray_cluster, tmp_path_factory):
    """One served model at a time: the I2V tests, then the TI2V ones."""
    from ray import serve

    from wanray.infer.serve import APP_NAME, start

    model = model_files.write_tiny_checkpoint(tmp_path_factory.mktemp(request.param) / "tiny", kind=request.param)
    cfg = tiny_config(model, f"infer.port={free_port()}")
    url = start(cfg, str(model), build_ui)
    yield url, model, request.param
    serve.delete(APP_NAME)
    serve.shutdown()


def _post(url, body):
    return requests.post(
        f"{url}/v1/generate", data=json.dumps(body), headers={"content-type": "application/json"}, timeout=300
    )


def test_served_frames_equal_diffusers_pipelines_with_a_photograph_as_the_first_image(server):
    url, model, kind = server
    health = requests.get(f"{url}/v1/health", timeout=30).json()
    assert (health["kind"], health["image"]) == (kind, models.read_kind(model).image)
    assert ("low" in health["stages"]) == (kind == "i2v-a14b")
    body = BODY[kind]
    # I2V: also with a last frame; TI2V: also from text alone
    images = (
        [{"image": photo("tower.jpg")}, {"image": photo("tower.jpg"), "last_image": photo("lion.jpg")}]
        if kind == "i2v-a14b"
        else [{"image": photo("tower.jpg")}, {}]
    )
    for image in images:
        r = _post(url, {**body, **image, "output": "frames"})
        assert r.status_code == 200, r.text
        frames = np.load(io.BytesIO(r.content))
        ref = wanpipeline_frames(model, GenerationParams(**body, **image))
        assert frames.shape == (body["num_frames"], body["height"], body["width"], 3)
        assert np.abs(frames - ref).max() <= 1e-4


def test_a_missing_or_broken_image_is_a_422_naming_it(server):
    url, _, kind = server
    if kind == "i2v-a14b":
        missing = _post(url, BODY[kind])
        assert missing.status_code == 422 and "Wan2.2-I2V-A14B needs an image" in missing.json()["detail"]
    broken = _post(url, {**BODY[kind], "image": base64.b64encode(b"not an image").decode()})
    assert broken.status_code == 422 and "not a base64-encoded PNG, JPEG or WebP" in broken.json()["detail"]
    if kind == "ti2v-5b":
        odd = _post(url, {**BODY[kind], "height": 48})
        assert odd.status_code == 422 and "height must be a multiple of 32 for Wan2.2-TI2V-5B" in odd.json()["detail"]


def test_the_ui_takes_the_first_frame(server, image_file):
    from gradio_client import Client, handle_file

    url, _, _ = server
    client = Client(f"{url}/ui/", verbose=False)
    video = client.predict(
        "a green circle", "", 1, 2, 3.5, 3.5, 32, 32, 5, handle_file(str(image_file)), api_name="/generate"
    )
    path = video["video"] if isinstance(video, dict) else video
    with av.open(path) as container:
        assert sum(1 for _ in container.decode(video=0)) == 5
