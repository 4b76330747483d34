"""The Gradio page on its own (no Ray): what its event settings do to users who share it."""

import asyncio
import socket
import threading
import time

import numpy as np
from conftest import chromium, tiny_config

from ui.app import build_ui
from wanray.infer.api import Generated
from wanray.infer.video import mp4_bytes


def _serve_page(generate, model):
    """The page on its own Gradio server: (the demo to close, its address)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    demo = build_ui(generate, tiny_config(model), str(model))
    demo.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    return demo, f"http://127.0.0.1:{port}/"


def test_two_pages_generate_at_the_same_time(tiny_model, monkeypatch):
    """Gradio runs one click of an event at a time unless told otherwise: a second user's request would wait
    for the first's whole video, and two requests would never share the two expert stages. Here the first
    request finishes only once the second has started."""
    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    from gradio_client import Client

    started, both = [], asyncio.Event()

    async def generate(params, output, on_stage):
        started.append(params.seed)
        if len(started) == 2:
            both.set()
        await asyncio.wait_for(both.wait(), 30)  # TimeoutError: the requests ran one after the other
        return Generated(mp4_bytes(np.zeros((5, 32, 48, 3), np.float32), 16), {})

    demo, url = _serve_page(generate, tiny_model)
    try:
        client = Client(url, verbose=False)
        jobs = [
            client.submit("a red circle", "", seed, 4, 4.0, 3.0, 32, 48, 5, api_name="/generate") for seed in (1, 2)
        ]
        videos = [job.result(timeout=90) for job in jobs]
    finally:
        demo.close()
    assert sorted(started) == [1, 2] and all(str(v).endswith(".mp4") for v in videos)


def test_closing_the_tab_or_stop_ends_its_generation_and_leaves_the_other_pages(tiny_model, monkeypatch):
    """Gradio runs an event to its end after its page is gone: a closed (or reloaded) tab would hold an expert
    for a video no one sees. Three tabs of a real Chromium each click Generate; while all three render, the
    first is closed and the third's Stop is clicked: both generations are cancelled (the stages then drop or
    stop the request: test_integration_serve_traffic), and the second's runs on to its video."""
    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    from playwright.sync_api import sync_playwright

    started = {seed: threading.Event() for seed in (1, 2, 3)}
    cancelled: list[int] = []
    release = threading.Event()  # the second tab's generation ends once the test has seen the first's cancelled

    async def generate(params, output, on_stage):
        started[params.seed].set()
        try:
            end = time.monotonic() + 60
            while not (params.seed == 2 and release.is_set()) and time.monotonic() < end:
                await asyncio.sleep(0.05)
        except asyncio.CancelledError:
            cancelled.append(params.seed)
            raise
        return Generated(mp4_bytes(np.zeros((5, 32, 48, 3), np.float32), 16), {})

    def wait(done, what: str, seconds: float = 30) -> None:
        end = time.monotonic() + seconds
        while not done() and time.monotonic() < end:
            time.sleep(0.1)
        assert done(), what

    demo, url = _serve_page(generate, tiny_model)
    try:
        with sync_playwright() as p:
            browser = chromium(p)
            tabs = {}
            for seed in (1, 2, 3):
                tab = tabs[seed] = browser.new_page()
                tab.goto(url)
                tab.get_by_label("Prompt", exact=True).fill("a red circle")
                tab.get_by_label("Seed").fill(str(seed))
                tab.get_by_label("Seed").press("Tab")
                tab.get_by_role("button", name="Generate").click()
                wait(started[seed].is_set, f"tab {seed}'s generation did not start")
            tabs[1].close()
            wait(lambda: 1 in cancelled, "the closed tab's generation was not cancelled")
            tabs[3].get_by_role("button", name="Stop").click()
            wait(lambda: 3 in cancelled, "Stop did not cancel its tab's generation")
            assert cancelled == [1, 3] and not release.is_set()
            release.set()
            tabs[2].locator("video").wait_for(timeout=30_000)
            assert cancelled == [1, 3]
            browser.close()
    finally:
        demo.close()
