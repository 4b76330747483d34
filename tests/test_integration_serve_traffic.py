"""Serving under real traffic on a real Serve: a bounded pipeline (503 + Retry-After when full, never 500),
queue timeouts, cancellation of a request whose client hung up or whose page was closed, queue depths in
/v1/health, Prometheus metrics. Loopback only; every client call is bounded in time."""

import io
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
from conftest import chromium, tiny_config

from ui.app import build_ui
from wanray.runtime import free_port

MAX_QUEUED = 5
CAPACITY = MAX_QUEUED + 1  # requests in the pipeline at most
BODY = dict(
    prompt="a red circle moving left to right",
    height=64,
    width=48,
    num_frames=9,
    num_inference_steps=6,
    seed=3,
    output="frames",
)
LONG = dict(BODY, num_frames=33, num_inference_steps=1500)  # seconds of high-noise steps on the CPU


@pytest.fixture(scope="module")
def traffic_server(tiny_model, ray_cluster):
    from ray import serve

    from wanray.infer.serve import APP_NAME, start

    cfg = tiny_config(
        tiny_model,
        f"infer.port={free_port()}",
        f"infer.max_queued={MAX_QUEUED}",
        "infer.queue_timeout_s=4",
        "infer.max_steps=5000",
    )
    url = start(cfg, str(tiny_model), build_ui)  # the page too: a closed tab's generation (the last test)
    yield url
    serve.delete(APP_NAME)
    serve.shutdown()


def _post(url: str, body: dict, timeout: float = 120) -> requests.Response:
    return requests.post(
        f"{url}/v1/generate", data=json.dumps(body), headers={"content-type": "application/json"}, timeout=timeout
    )


def _idle(url: str, timeout: float = 60) -> dict:
    """The health report once no request is in the pipeline."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        health = requests.get(f"{url}/v1/health", timeout=10).json()
        if health["queue"]["in_pipeline"] == 0 and all(s["running"] == 0 for s in health["stages"].values()):
            return health
        time.sleep(0.2)
    raise AssertionError(f"the pipeline did not drain: {health}")


def test_a_burst_at_four_times_capacity_gets_200_or_503_and_health_answers_throughout(traffic_server):
    url = traffic_server
    alone = np.load(io.BytesIO(_post(url, BODY).content))
    health = _idle(url)
    assert health["queue"]["capacity"] == CAPACITY and set(health["stages"]) == {"text", "high", "low", "vae"}
    assert all(s["waiting"] == 0 for s in health["stages"].values())

    answers, stop = [], threading.Event()

    def watch():  # /v1/health while the burst is served: every answer 200 within its 5 s timeout
        while not stop.is_set():
            r = requests.get(f"{url}/v1/health", timeout=5)
            answers.append(
                (
                    r.status_code,
                    r.json()["queue"]["in_pipeline"],
                    max(s["waiting"] for s in r.json()["stages"].values()),
                )
            )
            time.sleep(0.05)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with ThreadPoolExecutor(4 * CAPACITY) as pool:
            burst = list(pool.map(lambda _: _post(url, BODY, timeout=120), range(4 * CAPACITY)))
    finally:
        stop.set()
        watcher.join(timeout=30)
    statuses = [r.status_code for r in burst]
    assert set(statuses) <= {200, 503} and statuses.count(200) >= CAPACITY and 503 in statuses, statuses
    for r in burst:
        if r.status_code == 503:
            assert int(r.headers["Retry-After"]) >= 1 and "try again later" in r.json()["detail"]
        else:  # served under load: the frames of the same request served alone
            assert np.array_equal(np.load(io.BytesIO(r.content)), alone)
    assert answers and all(status == 200 for status, _, _ in answers)
    assert max(n for _, n, _ in answers) <= CAPACITY and max(w for _, _, w in answers) <= MAX_QUEUED
    _idle(url)


def test_a_request_waiting_past_the_queue_timeout_is_dropped_with_503(traffic_server):
    url = traffic_server
    with ThreadPoolExecutor(2) as pool:
        long = pool.submit(_post, url, LONG)
        time.sleep(1.0)  # the long one holds the low-noise stage well past infer.queue_timeout_s (4 s)
        late = _post(url, BODY)
        assert late.status_code == 503 and "infer.queue_timeout_s" in late.json()["detail"], late.text
        assert not long.done()  # dropped at its timeout, while the long one still ran: not when its turn came
        assert int(late.headers["Retry-After"]) >= 1
        assert long.result().status_code == 200
    _idle(url)


def test_a_client_that_hangs_up_frees_the_stage_at_the_next_step(traffic_server, ray_cluster):
    """A long request is cancelled when its client disconnects: the high-noise stage stops it at its next step
    (its replica logs the step it stopped before, far short of the 1,500 asked), and the next request is
    served. The queue logic itself is unit-tested with fake stages (tests/test_unit_serve_queue.py)."""
    import glob
    import re
    from pathlib import Path

    import ray

    url = traffic_server
    with pytest.raises(requests.exceptions.ReadTimeout):
        _post(url, LONG, timeout=2.0)  # the client gives up (and closes its connection) 2 s in
    assert _post(url, BODY).status_code == 200
    logs = ray._private.worker._global_node.get_logs_dir_path()
    text = "".join(Path(p).read_text() for p in glob.glob(f"{logs}/serve/replica_wanray_high_noise_expert_*.log"))
    stopped = [int(n) for n in re.findall(r"cancelled before step (\d+) of 1500", text)]
    assert stopped and max(stopped) < 1500, stopped
    _idle(url)


def test_prometheus_metrics_count_outcomes_and_time_stages(traffic_server, ray_cluster):
    """Ray Serve's metrics exporter on the node's metrics port: requests by outcome, stage latency
    histograms, queue depth gauges (all scraped from http://<node>:<metrics_export_port>/metrics)."""
    import ray

    url = traffic_server
    assert _post(url, BODY).status_code == 200
    assert _post(url, dict(BODY, num_frames=6)).status_code == 422
    port = ray._private.worker.global_worker.node.metrics_export_port

    def missing(lines: list[str]) -> list[str]:
        """What the scrape does not show yet: each process (ingress, every stage) exports on its own schedule."""
        wanted = {
            "requests ok": ("ray_wanray_requests_total{", 'outcome="ok"'),
            "requests invalid": ("ray_wanray_requests_total{", 'outcome="invalid"'),
        }
        for stage in ("text", "high", "low", "vae"):
            wanted[f"{stage} seconds"] = ("ray_wanray_stage_seconds_count{", f'stage="{stage}"')
            wanted[f"{stage} queue depth"] = ("ray_wanray_stage_queue_depth{", f'stage="{stage}"')
        return [k for k, (head, label) in wanted.items() if not any(x.startswith(head) and label in x for x in lines)]

    deadline, lines = time.monotonic() + 90, []
    while time.monotonic() < deadline:  # the exporters publish every few seconds
        text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        lines = [line for line in text.splitlines() if line.startswith("ray_wanray_")]
        if not missing(lines):
            break
        time.sleep(2)
    assert missing(lines) == [], lines


def test_closing_the_page_frees_the_stage_at_the_next_step(traffic_server):
    """A generation started on the page whose tab is then closed: Gradio alone would run it to the end for no
    one; the page's handler sees its session's event stream end (through Serve's proxy) and cancels it, so the
    high-noise stage stops at its next step, far short of the 1,400 asked (about a minute on this CPU)."""
    import glob
    import re
    from pathlib import Path

    import ray
    from playwright.sync_api import sync_playwright

    url = traffic_server
    _idle(url)
    with sync_playwright() as p:
        browser = chromium(p)
        tab = browser.new_page()
        tab.goto(f"{url}/ui/")
        tab.get_by_label("Prompt", exact=True).fill("a red circle")
        for name, value in (("Steps", "1400"), ("Frames (4n+1)", "33")):
            box = tab.get_by_role("spinbutton", name=name)
            box.fill(value)
            box.press("Enter")
        tab.get_by_role("button", name="Generate").click()
        end = time.monotonic() + 60
        while requests.get(f"{url}/v1/health", timeout=10).json()["queue"]["in_pipeline"] == 0:
            assert time.monotonic() < end, "the page's generation did not start"
            time.sleep(0.2)
        time.sleep(2)
        tab.close()
        closed = time.monotonic()
        _idle(url, timeout=30)
        browser.close()
    logs = ray._private.worker._global_node.get_logs_dir_path()
    text = "".join(Path(p).read_text() for p in glob.glob(f"{logs}/serve/replica_wanray_high_noise_expert_*.log"))
    stopped = [int(n) for n in re.findall(r"cancelled before step (\d+) of 1400", text)]
    assert stopped and max(stopped) < 1400, (stopped, time.monotonic() - closed)
