"""Serving Wan2.2-I2V-A14B (tiny) on a real local Ray: the REST API and the UI take a first image,
and the served frames equal WanImageToVideoPipeline's."""
import base64
import io
import json

import av
import numpy as np
import pytest
import requests
from PIL import Image

from conftest import tiny_config
from ui.app import build_ui
from wanray import models
from wanray.data.synthetic import SyntheticClip, render
from wanray.infer.reference import wanpipeline_frames
from wanray.infer.sampler import GenerationParams
from wanray.runtime import free_port

BODY = dict(prompt="a green circle moving up", negative_prompt="blurry", height=48, width=64, num_frames=5,
            num_inference_steps=6, guidance_scale=3.5, guidance_scale_2=3.5, seed=9)


@pytest.fixture(scope="module")
def image_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("image") / "first.png"
    Image.fromarray(render(SyntheticClip("x", "", 60, 80, 16, 2, "circle", "green", "black", "bottom to top"))[0]) \
        .save(path)
    return path


@pytest.fixture(scope="module")
def server(ray_cluster, tmp_path_factory):
    from ray import serve

    from wanray.infer.serve import APP_NAME, start

    model = models.write_tiny_checkpoint(tmp_path_factory.mktemp("i2v") / "tiny-i2v", kind="i2v-a14b")
    cfg = tiny_config(model, f"infer.port={free_port()}")
    url = start(cfg, str(model), build_ui)
    yield url, model
    serve.delete(APP_NAME)
    serve.shutdown()


def _post(url, body):
    return requests.post(f"{url}/v1/generate", data=json.dumps(body), headers={"content-type": "application/json"},
                         timeout=300)


def test_served_image_to_video_frames_equal_wan_image_to_video_pipeline(server, image_file):
    url, model = server
    health = requests.get(f"{url}/v1/health", timeout=30).json()
    assert (health["kind"], health["image"]) == ("i2v-a14b", "required")
    image = base64.b64encode(image_file.read_bytes()).decode()
    r = _post(url, {**BODY, "image": image, "output": "frames"})
    assert r.status_code == 200, r.text
    frames = np.load(io.BytesIO(r.content))
    ref = wanpipeline_frames(model, GenerationParams(**BODY, image=image), 0.9)
    assert frames.shape == (5, 48, 64, 3) and np.abs(frames - ref).max() <= 1e-4


def test_a_missing_or_broken_image_is_a_422_naming_it(server):
    url, _ = server
    missing = _post(url, BODY)
    assert missing.status_code == 422 and "Wan2.2-I2V-A14B needs an image" in missing.json()["detail"]
    broken = _post(url, {**BODY, "image": base64.b64encode(b"not an image").decode()})
    assert broken.status_code == 422 and "not a base64-encoded PNG, JPEG or WebP" in broken.json()["detail"]


def test_the_ui_takes_the_first_frame(server, image_file):
    from gradio_client import Client, handle_file

    url, _ = server
    client = Client(f"{url}/ui/", verbose=False)
    video = client.predict("a green circle", "", 1, 2, 3.5, 3.5, 32, 32, 5, handle_file(str(image_file)),
                           api_name="/generate")
    path = video["video"] if isinstance(video, dict) else video
    with av.open(path) as container:
        assert sum(1 for _ in container.decode(video=0)) == 5
