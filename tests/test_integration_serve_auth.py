"""A served model behind a token, on a real local Ray: /v1/* and the UI refuse a missing or wrong token and
accept the right one; binding beyond loopback without one is a warning."""

import pytest
import requests
from conftest import tiny_config

from ui.app import build_ui
from wanray.infer.api import exposure_warning, serving_token, token_matches
from wanray.runtime import free_port

TOKEN = "s3cret-token"
BODY = {
    "prompt": "a red circle",
    "height": 32,
    "width": 32,
    "num_frames": 1,
    "num_inference_steps": 1,
    "output": "frames",
}


@pytest.fixture(scope="module")
def server(tiny_model, ray_cluster):
    from ray import serve

    from wanray.infer.serve import APP_NAME, start

    url = start(
        tiny_config(tiny_model, f"infer.port={free_port()}", f"infer.api_token={TOKEN}"), str(tiny_model), build_ui
    )
    yield url
    serve.delete(APP_NAME)
    serve.shutdown()


@pytest.mark.parametrize(
    "header,status",
    [(None, 401), ("Bearer wrong", 401), (f"Basic {TOKEN}", 401), (f"Bearer {TOKEN}x", 401), (f"Bearer {TOKEN}", 200)],
)
def test_the_rest_api_takes_the_bearer_token_only(server, header, status):
    headers = {} if header is None else {"Authorization": header}
    health = requests.get(f"{server}/v1/health", headers=headers, timeout=30)
    assert health.status_code == status
    generate = requests.post(f"{server}/v1/generate", json=BODY, headers=headers, timeout=120)
    assert generate.status_code == status, generate.text
    if status == 401:
        assert "missing or wrong bearer token" in generate.json()["detail"]
        assert generate.headers["www-authenticate"] == "Bearer"


def test_the_ui_asks_for_the_token(server):
    from gradio_client import Client
    from gradio_client.exceptions import AuthenticationError

    with pytest.raises(AuthenticationError, match="credentials were not provided"):
        Client(f"{server}/ui/", verbose=False)  # the page's API is behind the login
    with pytest.raises(ValueError, match="Could not login to"):  # Gradio's login answers 400, not 401
        Client(f"{server}/ui/", auth=("me", "wrong"), verbose=False)
    client = Client(f"{server}/ui/", auth=("me", TOKEN), verbose=False)
    assert client.predict("a red circle", "", 1, 1, 1.0, 1.0, 32, 32, 1, api_name="/generate")


def test_token_sources_and_the_exposure_warning(tiny_model, monkeypatch):
    monkeypatch.delenv("WANRAY_API_TOKEN", raising=False)
    cfg = tiny_config(tiny_model)
    assert serving_token(cfg) == "" and exposure_warning(cfg, "") is None  # loopback: no warning
    exposed = tiny_config(tiny_model, "infer.host=0.0.0.0")
    assert "without a token: anyone who can reach port 8000 can generate" in exposure_warning(exposed, "")
    monkeypatch.setenv("WANRAY_API_TOKEN", "from-env")
    assert serving_token(exposed) == "from-env" and exposure_warning(exposed, "from-env") is None
    assert serving_token(tiny_config(tiny_model, "infer.api_token=from-config")) == "from-config"
    assert token_matches("bearer abc", "abc") and not token_matches("Bearer abd", "abc")
    assert not token_matches("", "abc") and not token_matches("Bearer", "abc")
