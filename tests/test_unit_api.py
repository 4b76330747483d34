"""The REST app on its own (no Ray): what it does with a request before any stage sees it."""

import asyncio
import json

import pytest
from conftest import tiny_config

from wanray.infer.api import Generated, build_api, max_body_bytes

TOKEN = "s3cret"


def call(app, method: str, path: str, body: bytes = b"", token: str | None = None) -> tuple[int, dict, int]:
    """One request through the ASGI app: (status, JSON body, how many times the app read the request body)."""
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if token is not None:
        headers.append((b"authorization", f"Bearer {token}".encode()))
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": headers,
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
    }
    chunks = [body[i : i + 2**16] for i in range(0, len(body), 2**16)] or [b""]
    reads, sent = [], []

    async def receive():
        reads.append(1)
        if len(reads) <= len(chunks):
            return {"type": "http.request", "body": chunks[len(reads) - 1], "more_body": len(reads) < len(chunks)}
        return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    payload = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return status, json.loads(payload) if payload.startswith(b"{") else {}, len(reads)


@pytest.fixture(scope="module")
def app(tiny_model):
    async def generate(params, output, on_stage):
        return Generated(b"{}", {})

    return build_api(generate, tiny_config(tiny_model), str(tiny_model), TOKEN, open_prefix="/ui")


def test_a_request_without_the_token_is_refused_before_its_body_is_read(app):
    lifespan = []  # Serve starts the app with a lifespan scope (no path, no headers) before any request

    async def receive():
        return {"type": "lifespan.startup"} if not lifespan else {"type": "lifespan.shutdown"}

    async def send(message):
        lifespan.append(message["type"])

    asyncio.run(app({"type": "lifespan", "asgi": {"version": "3.0"}}, receive, send))
    assert lifespan[:1] == ["lifespan.startup.complete"]

    body = json.dumps({"prompt": "x" * 10**6}).encode()  # a megabyte a client without the token sends
    status, answer, reads = call(app, "POST", "/v1/generate", body)
    assert (status, reads) == (401, 0) and "missing or wrong bearer token" in answer["detail"]
    for path in ("/docs", "/redoc", "/openapi.json", "/v1/health"):  # the docs too: they show the model's path
        assert call(app, "GET", path)[0] == 401, path
    assert call(app, "GET", "/docs", token=TOKEN)[0] == 200
    assert call(app, "GET", "/ui/nothing")[0] == 404  # the UI asks for the token on its own page
    assert call(app, "GET", "/uix")[0] == 401


def test_a_body_over_the_limit_is_a_413_before_it_is_all_read(tiny_model, app):
    limit = max_body_bytes(tiny_config(tiny_model))
    assert limit > 2 * 20 * 2**20 * 4 / 3  # two images at infer.max_image_bytes fit
    status, _, reads = call(app, "POST", "/v1/generate", b"x" * (limit + 2**20), token=TOKEN)
    assert status == 413 and reads < (limit + 2**20) / 2**16
    status, answer, _ = call(app, "POST", "/v1/generate", json.dumps({"prompt": ""}).encode(), token=TOKEN)
    assert status == 422 and answer["detail"] == "prompt must not be empty"


def test_a_stage_replica_that_stops_under_a_request_is_a_503_to_retry(tiny_model):
    """Serve stops a replica on a scale-down, a redeploy or a failed health check; after infer.drain_timeout_s it
    kills one still running: the request's client gets a 503 to retry (another replica takes it), not a 500."""
    from ray.exceptions import ActorDiedError

    async def generate(params, output, on_stage):
        raise ActorDiedError()

    app = build_api(generate, tiny_config(tiny_model), str(tiny_model))
    status, answer, _ = call(app, "POST", "/v1/generate", json.dumps({"prompt": "a cat"}).encode())
    assert status == 503 and "replica stopped while running the request" in answer["detail"]
    from wanray.infer.request import StageUnavailable

    async def out_of_step(params, output, on_stage):  # a multi-device expert until Serve replaces it
        raise StageUnavailable("high expert's ranks are out of step (rank 0: OOM): the stage restarts")

    app = build_api(out_of_step, tiny_config(tiny_model), str(tiny_model))
    status, answer, _ = call(app, "POST", "/v1/generate", json.dumps({"prompt": "a cat"}).encode())
    assert status == 503 and answer["detail"].endswith("the stage restarts: try again")
