"""pipelines/serve.py as a user runs it: it hands ui/app.py to the Serve app, and SIGTERM, even
while the deployments are starting, removes the application and exits cleanly."""

import signal
import subprocess
import sys
import time

import pytest
import requests
from conftest import ROOT

from wanray.runtime import free_port


def serve_driver(tiny_model, port, log):
    return subprocess.Popen(
        [sys.executable, str(ROOT / "pipelines" / "serve.py"), "--model", str(tiny_model), "--port", str(port)],
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
    )


@pytest.fixture
def clean_serve(ray_cluster):
    """The test cluster holds no Serve instance before or after (another module's fixture starts its own)."""
    from ray import serve

    yield
    serve.shutdown()


def wait_for(log_path, text, timeout=240, poll=0.5) -> None:
    deadline = time.time() + timeout
    while text not in log_path.read_text():
        assert time.time() < deadline, log_path.read_text()[-3000:]
        time.sleep(poll)


def applications() -> list[str]:
    """The Serve applications on the test cluster (none when no Serve instance runs)."""
    from ray import serve
    from ray.serve.exceptions import RayServeException

    try:
        return list(serve.status().applications)
    except RayServeException:
        return []


def test_sigterm_at_any_moment_of_the_start_exits_cleanly(tiny_model, clean_serve, tmp_path):
    """Killed while its imports load (0.5 s after launch), before Serve's controller exists (0 s, 0.05 s after
    "starting the deployments": the driver ended with return code 1, serve.delete finding no Serve instance),
    while it deploys (0.5 s) and while the replicas load (2 s): exit status 0 and no application left. Each try
    starts from a cluster without Serve."""
    from ray import serve

    log_path = tmp_path / "serve.log"
    for delay in (None, 0.0, 0.05, 0.5, 2.0):
        with log_path.open("w") as log:
            proc = serve_driver(tiny_model, free_port(), log)
            if delay is None:
                time.sleep(0.5)
            else:
                wait_for(log_path, "starting the deployments", poll=0.01)
                time.sleep(delay)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=120) == 0, (delay, log_path.read_text()[-3000:])
        assert "wanray" not in applications()
        serve.shutdown()


def test_driver_serves_the_ui_and_sigterm_removes_the_app(tiny_model, clean_serve, tmp_path):
    port, log_path = free_port(), tmp_path / "serve.log"
    with log_path.open("w") as log:
        proc = serve_driver(tiny_model, port, log)
        wait_for(log_path, "wanray is serving")
        url = f"http://127.0.0.1:{port}"
        assert requests.get(f"{url}/v1/health", timeout=30).json()["model"] == str(tiny_model.resolve())
        page = requests.get(f"{url}/ui/", timeout=30)
        assert page.status_code == 200 and "gradio" in page.text.lower()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0, log_path.read_text()[-3000:]
    assert "wanray" not in applications()
