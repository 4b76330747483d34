"""An OpenAPI-driven fuzz run (schemathesis) of /v1/generate, /v1/health and /v1/loras on a real Serve: whatever a
client sends, no 5xx and no server error in the ingress's log. The served bounds are tiny so that every
request the fuzzer gets accepted costs a fraction of a second; the example count is bounded."""

import glob
import os
import time
from pathlib import Path

import pytest
import schemathesis
from conftest import tiny_config
from hypothesis import HealthCheck, settings

from wanray.runtime import free_port

EXAMPLES = 40


@pytest.fixture(scope="module")
def fuzz_server(tiny_model, ray_cluster):
    from ray import serve

    from wanray.infer.serve import APP_NAME, start

    cfg = tiny_config(
        tiny_model,
        f"infer.port={free_port()}",
        "infer.max_height=32",
        "infer.max_width=32",
        "infer.max_frames=5",
        "infer.max_steps=2",
        "infer.num_inference_steps=2",
        "infer.max_prompt_chars=200",
    )
    started = time.time()
    url = start(cfg, str(tiny_model))
    yield url, started
    serve.delete(APP_NAME)
    serve.shutdown()


def test_no_request_the_schema_admits_gets_a_server_error(fuzz_server):
    """EXAMPLES generated requests for each operation (/v1/generate, /v1/health, /v1/loras) from the served OpenAPI
    document: valid and invalid bodies alike get a 2xx or 4xx."""
    from hypothesis import given

    url, _ = fuzz_server
    api = schemathesis.openapi.from_url(f"{url}/openapi.json")
    operations = [op.ok() for op in api.get_all_operations()]
    assert {(op.method.upper(), op.path) for op in operations} == {
        ("GET", "/v1/health"),
        ("GET", "/v1/loras"),
        ("POST", "/v1/generate"),
    }
    seen = {}
    for operation in operations:
        modes = [schemathesis.GenerationMode.POSITIVE]
        if operation.method.upper() == "POST":  # a body to break (health and loras take no input)
            modes.append(schemathesis.GenerationMode.NEGATIVE)
        for mode in modes:
            codes = seen.setdefault((operation.path, mode.value), [])

            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
            def call(case):
                response = case.call(base_url=url, timeout=60)
                codes.append(response.status_code)  # noqa: B023  (called within this iteration)
                assert response.status_code < 500, (case.body, response.status_code, response.text[:300])

            call()
    generated = seen[("/v1/generate", "positive")] + seen[("/v1/generate", "negative")]
    # the schema does not carry the served bounds (sizes, 4n+1 frames), so most bodies are refused: the point
    # is that nothing a client sends, well-formed or not, gets past validation into a server error
    assert len(generated) >= EXAMPLES and {400, 422} & set(generated), seen
    assert set(seen[("/v1/health", "positive")]) == set(seen[("/v1/loras", "positive")]) == {200}


def test_the_fuzzed_server_logged_no_error(fuzz_server):
    """Runs after the fuzz run (same module, file order): the ingress replica's log of this app has no
    failed generation and no traceback."""
    import ray

    _, started = fuzz_server
    logs = ray._private.worker._global_node.get_logs_dir_path()
    mine = [p for p in glob.glob(f"{logs}/serve/replica_wanray_Ingress_*.log") if os.path.getmtime(p) >= started]
    text = "".join(Path(p).read_text() for p in mine)
    assert "generate: prompt" in text  # the fuzz run's requests were logged here
    assert "generation failed" not in text and "Traceback" not in text and " ERROR " not in text
