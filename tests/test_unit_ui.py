"""The Gradio page on its own (no Ray): what its event settings do to users who share it."""

import asyncio
import socket
import threading
import time

import numpy as np
from conftest import tiny_config

from ui.app import build_ui
from wanray.infer.api import Generated
from wanray.infer.video import mp4_bytes


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

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    demo = build_ui(generate, tiny_config(tiny_model), str(tiny_model))
    demo.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        jobs = [
            client.submit("a red circle", "", seed, 4, 4.0, 3.0, 32, 48, 5, api_name="/generate") for seed in (1, 2)
        ]
        videos = [job.result(timeout=90) for job in jobs]
    finally:
        demo.close()
    assert sorted(started) == [1, 2] and all(str(v).endswith(".mp4") for v in videos)


def test_closing_the_tab_stops_its_generation(tiny_model, monkeypatch):
    """A user who closes (or reloads) the page while their video renders ends Gradio's heartbeat: the page's
    generation is cancelled as the Stop button cancels it (the stages then drop or stop the request:
    test_integration_serve_traffic), instead of holding an expert for a video no one will see. A second page's
    generation, running at the same time, is left alone."""
    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    monkeypatch.setenv("GRADIO_HEARTBEAT_INTERVAL", "1")  # Gradio sees a closed tab within it (default 15 s)
    from gradio_client import Client

    started = {1: threading.Event(), 2: threading.Event()}
    cancelled: list[int] = []
    release = threading.Event()  # the second page's generation ends once the test has seen the first cancelled

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

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    demo = build_ui(generate, tiny_config(tiny_model), str(tiny_model))
    demo.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        closing, staying = (
            Client(f"http://127.0.0.1:{port}/", verbose=False),
            Client(f"http://127.0.0.1:{port}/", verbose=False),
        )
        closing.submit("a red circle", "", 1, 4, 4.0, 3.0, 32, 48, 5, api_name="/generate")
        kept = staying.submit("a red circle", "", 2, 4, 4.0, 3.0, 32, 48, 5, api_name="/generate")
        end = time.monotonic() + 30
        while not all(e.is_set() for e in started.values()) and time.monotonic() < end:
            time.sleep(0.1)
        assert all(e.is_set() for e in started.values())
        closing.close()  # its heartbeat connection ends, as a closed tab's does
        while not cancelled and time.monotonic() < end:
            time.sleep(0.1)
        assert cancelled == [1] and not kept.done()
        release.set()
        assert str(kept.result(timeout=60)).endswith(".mp4") and cancelled == [1]
        staying.close()
    finally:
        demo.close()
