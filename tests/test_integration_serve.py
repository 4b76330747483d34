"""The Serve application on a real local Ray: REST API, parity, bad requests, Gradio UI, screenshot."""

import io
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import av
import numpy as np
import pytest
import requests
from conftest import ROOT, tiny_config
from reference import tiny_adapter, wanpipeline_frames

from ui.app import build_ui
from wanray.infer.request import GenerationParams
from wanray.model_files import TINY_BOUNDARY
from wanray.runtime import free_port

BODY = dict(
    prompt="a red circle moving left to right",
    negative_prompt="blurry, static",
    height=64,
    width=48,
    num_frames=9,
    num_inference_steps=8,
    guidance_scale=4.0,
    guidance_scale_2=3.0,
    seed=7,
)
CHEAP = dict(prompt="a dot", height=16, width=16, num_frames=1, num_inference_steps=1)


@pytest.fixture(scope="module")
def adapter_files(tiny_model, tmp_path_factory) -> dict[str, dict[str, str]]:
    """Adapter "a": a file per expert; "b": one file for both."""
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("adapters")
    files = {"a": {e: root / f"a_{e}.safetensors" for e in ("high", "low")}, "b": {"both": root / "b.safetensors"}}
    for seed, (name, expert) in enumerate((("a", "high"), ("a", "low"), ("b", "both"))):
        save_file(tiny_adapter(tiny_model, "high" if expert == "both" else expert, seed), files[name][expert])
    return {name: {e: str(p) for e, p in per.items()} for name, per in files.items()}


@pytest.fixture(scope="module")
def server(tiny_model, ray_cluster, adapter_files):
    """One Serve application for the module, on the test's own Ray instance, serving two adapters; removed
    afterwards."""
    from ray import serve

    from wanray.infer.serve import APP_NAME, start

    a = adapter_files["a"]
    cfg = tiny_config(
        tiny_model,
        f"infer.port={free_port()}",
        f"infer.loras.a.high={a['high']}",
        f"infer.loras.a.low={a['low']}",
        f"infer.loras.b={adapter_files['b']['both']}",
    )
    url = start(cfg, str(tiny_model), build_ui)
    yield url, cfg
    serve.delete(APP_NAME)
    serve.shutdown()


def _generate(url: str, body, **kw) -> requests.Response:
    data = body if isinstance(body, (str, bytes)) else json.dumps(body)
    return requests.post(
        f"{url}/v1/generate", data=data, headers={"content-type": "application/json"}, timeout=300, **kw
    )


def test_health_names_the_model(server, tiny_model):
    url, _ = server
    r = requests.get(f"{url}/v1/health", timeout=30)
    assert r.status_code == 200 and r.json()["status"] == "ok" and r.json()["model"] == str(tiny_model.resolve())


def test_serve_frames_equal_wanpipeline(server, tiny_model):
    url, cfg = server
    r = _generate(url, {**BODY, "output": "frames"})
    assert r.status_code == 200 and r.headers["content-type"] == "application/x-npy"
    frames = np.load(io.BytesIO(r.content))
    ref = wanpipeline_frames(tiny_model, GenerationParams(**BODY), TINY_BOUNDARY)
    assert frames.shape == (9, 64, 48, 3) and np.abs(frames - ref).max() <= 1e-4


def test_one_deployment_serves_each_request_its_own_adapters(server, tiny_model, adapter_files):
    """GET /v1/loras and /v1/health list the adapters; requests naming a, b, none, then a again each get their own
    frames: a's equal diffusers' with load_lora_weights + set_adapters, none's the base model's."""
    url, _ = server
    listed = requests.get(f"{url}/v1/loras", timeout=30).json()
    b = adapter_files["b"]["both"]
    assert listed["loras"] == [
        {"name": "a", "experts": {"high": adapter_files["a"]["high"], "low": adapter_files["a"]["low"]}},
        {"name": "b", "experts": {"high": b, "low": b}},
    ]
    assert listed["default"] == [] and requests.get(f"{url}/v1/health", timeout=30).json()["loras"] == ["a", "b"]
    body = {**BODY, "height": 32, "width": 32, "num_frames": 5, "num_inference_steps": 4, "output": "frames"}
    uses = [
        [{"name": "a", "scale": 0.8}],
        [{"name": "b"}, {"name": "a", "scale": 0.5}],
        [],
        [{"name": "a", "scale": 0.8}],
    ]
    frames = []
    for loras in uses:
        r = _generate(url, {**body, "loras": loras})
        assert r.status_code == 200, r.text
        frames.append(np.load(io.BytesIO(r.content)))
    assert np.array_equal(frames[0], frames[3])
    stages = requests.get(f"{url}/v1/health", timeout=30).json()["stages"]
    assert stages["high"]["adapters_loaded"] == stages["low"]["adapters_loaded"] == ["b", "a"]  # a used last
    params = GenerationParams(**{k: v for k, v in body.items() if k != "output"}, loras=(("a", 0.8),))
    ref = wanpipeline_frames(tiny_model, params, TINY_BOUNDARY, adapters={"a": adapter_files["a"]})
    assert np.abs(frames[0] - ref).max() <= 1e-4
    base = wanpipeline_frames(tiny_model, GenerationParams(**{k: v for k, v in body.items() if k != "output"}))
    assert np.abs(frames[2] - base).max() <= 1e-4
    assert np.abs(frames[1] - frames[0]).max() > 1e-3 and np.abs(frames[0] - frames[2]).max() > 1e-3


def test_mp4_has_the_requested_size_and_frames(server):
    url, _ = server
    r = _generate(url, {**BODY, "num_frames": 13, "height": 32, "width": 64})
    assert r.status_code == 200 and r.headers["content-type"] == "video/mp4"
    with av.open(io.BytesIO(r.content)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == 13 and frames[0].shape == (32, 64, 3)


def test_concurrent_requests_each_get_their_own_video(server):
    """Requests overlap in the stages; each must still get exactly the video it would get alone."""
    url, _ = server
    bodies = [{**BODY, "seed": s, "num_inference_steps": 4, "output": "frames"} for s in (1, 2, 3)]
    alone = [np.load(io.BytesIO(_generate(url, b).content)) for b in bodies]
    with ThreadPoolExecutor(3) as pool:
        together = [np.load(io.BytesIO(r.content)) for r in pool.map(lambda b: _generate(url, b), bodies)]
    for a, t in zip(alone, together):
        assert np.array_equal(a, t)
    assert not np.array_equal(alone[0], alone[1])


@pytest.mark.parametrize(
    "body, status, message",
    [
        ('{"prompt": "a cat", ', 400, "request body is not valid JSON"),
        ("not json at all", 400, "request body is not valid JSON"),
        ({"prompt": ""}, 422, "prompt must not be empty"),
        ({"negative_prompt": "x"}, 422, "prompt: Field required"),
        ({"prompt": "x" * 2001}, 422, "at most 2000 are served"),
        ({"prompt": "a cat", "height": 60}, 422, "height must be a multiple of 16"),
        ({"prompt": "a cat", "width": 512}, 422, "width must lie in [16, 256]"),
        ({"prompt": "a cat", "num_frames": 16}, 422, "num_frames must be 4n+1"),
        ({"prompt": "a cat", "num_frames": 37}, 422, "num_frames must lie in [1, 33]"),
        ({"prompt": "a cat", "num_inference_steps": 0}, 422, "num_inference_steps must lie in [1, 50]"),
        ({"prompt": "a cat", "num_inference_steps": 51}, 422, "num_inference_steps must lie in [1, 50]"),
        ({"prompt": "a cat", "guidance_scale": -2}, 422, "guidance_scale must be a finite number >= 0"),
        ({"prompt": "a cat", "seed": -5}, 422, "seed must lie in"),
        ({"prompt": "a cat", "height": "tall"}, 422, "height: Input should be a valid integer"),
        ({"prompt": "a cat", "steps": 4}, 422, "steps: Extra inputs are not permitted"),
        ({"prompt": "a cat", "output": "gif"}, 422, "output: Input should be 'mp4' or 'frames'"),
        ({"prompt": "a cat", "loras": [{"name": "c"}]}, 422, "no adapter named 'c' is served (served: a, b"),
        ({"prompt": "a cat", "loras": [{"name": "a", "rank": 2}]}, 422, "loras.0.rank: Extra inputs"),
        ([1, 2], 422, "valid dictionary"),
    ],
)
def test_bad_request_gets_4xx_with_reason_and_server_keeps_serving(server, body, status, message):
    url, _ = server
    r = _generate(url, body)
    assert r.status_code == status and message in r.json()["detail"], r.text
    after = _generate(url, CHEAP)
    assert after.status_code == 200 and after.content[4:8] == b"ftyp"


def test_each_generate_request_has_an_id_in_its_response_and_one_log_line(server):
    import glob
    import time

    import ray

    url, _ = server
    small = {
        "prompt": "a tiny red circle",
        "height": 32,
        "width": 32,
        "num_frames": 1,
        "num_inference_steps": 1,
        "output": "frames",
    }
    echoed = requests.post(f"{url}/v1/generate", json=small, headers={"X-Request-Id": "client-42"}, timeout=120)
    fresh = requests.post(f"{url}/v1/generate", json=small, timeout=120)
    refused = requests.post(f"{url}/v1/generate", json={**small, "height": 30}, timeout=60)
    assert (echoed.status_code, fresh.status_code, refused.status_code) == (200, 200, 422)
    assert echoed.headers["X-Request-Id"] == "client-42" and fresh.headers["X-Request-Id"] not in ("", "client-42")
    logs = ray._private.worker._global_node.get_logs_dir_path()
    deadline, text = time.time() + 30, ""
    while time.time() < deadline and refused.headers["X-Request-Id"] not in text:
        time.sleep(0.5)
        text = "".join(Path(p).read_text() for p in glob.glob(f"{logs}/serve/replica_wanray_Ingress_*.log"))
    lines = {
        rid: [line for line in text.splitlines() if rid in line and "generate: prompt" in line]
        for rid in ("client-42", fresh.headers["X-Request-Id"], refused.headers["X-Request-Id"])
    }
    assert all(len(found) == 1 for found in lines.values()), lines
    assert (
        "generate: prompt 17 chars, 1x32x32, 1 steps, " in lines["client-42"][0]
        and "status 200" in lines["client-42"][0]
    )
    assert (
        "not resolved" in lines[refused.headers["X-Request-Id"]][0]
        and "status 422" in lines[refused.headers["X-Request-Id"]][0]
    )


def test_gradio_client_generates_a_video_through_the_ui(server):
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    url, _ = server
    client = Client(f"{url}/ui/", verbose=False)
    path = client.predict("a red circle", "blurry", 3, 4, 4.0, 3.0, 32, 48, 5, api_name="/generate")
    with av.open(path) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == 5 and frames[0].shape == (32, 48, 3)
    with pytest.raises(AppError, match="num_frames must be 4n\\+1"):
        client.predict("a red circle", "", 3, 4, 4.0, 3.0, 32, 48, 6, api_name="/generate")
    # the adapter picker and its scales, and the sampler: the same request as REST's
    args = ("a red circle", "blurry", 3, 4, 4.0, 3.0, 32, 48, 5)
    path = client.predict(*args, ["b", "a"], "0.5, 1", "euler", api_name="/generate")
    with av.open(path) as container:
        assert sum(1 for _ in container.decode(video=0)) == 5
    with pytest.raises(AppError, match="2 adapters chosen but 1 scales given"):
        client.predict(*args, ["b", "a"], "0.5", "unipc", api_name="/generate")
    with pytest.raises(AppError, match="'c' .* is not in the list of choices"):
        client.predict(*args, ["c"], "", "unipc", api_name="/generate")
    page = requests.get(f"{url}/ui/", timeout=30).text
    assert "wanray" in page


def test_screenshot_script_captures_the_ui(server, tmp_path):
    url, _ = server
    out = tmp_path / "ui.png"
    run = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "screenshot.py"), "--url", f"{url}/ui/", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert run.returncode == 0, run.stderr
    from PIL import Image

    image = np.asarray(Image.open(out).convert("L"), dtype=np.float32)
    assert image.shape == (900, 1280)
    assert image.std() > 10  # a rendered page, not a blank window
