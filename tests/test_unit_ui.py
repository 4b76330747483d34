"""The Gradio page on its own (no Ray): what its event settings do to users who share it."""

import asyncio
import socket

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
