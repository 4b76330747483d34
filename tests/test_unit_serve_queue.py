"""A Serve stage's queue and the ingress's admission, with fake stages in one asyncio loop (no Ray): calls run
one at a time in arrival order, a call queued past its timeout is dropped unrun, a cancelled call is dropped
if queued and stopped at its next step if running, earlier stages' seconds travel with the result, and the
pipeline admits (max_queued + 1) x replicas requests."""

import asyncio
import threading

import pytest

from wanray.infer.api import Busy
from wanray.infer.request import Cancelled
from wanray.infer.serve import Admission, ExpertDeployment, TextDeployment, Timed


class FakeText:
    """Encodes by waiting for its gate; records the order calls ran in."""

    def __init__(self, gate: threading.Event, ran: list):
        self.gate, self.ran = gate, ran
        self.should_stop = lambda: False

    def encode(self, prompt):
        self.ran.append(("start", prompt))
        self.gate.wait(timeout=30)
        self.ran.append(("end", prompt))
        return f"emb({prompt})"


class FakeExpert:
    """Runs steps until the stage's stop flag is set, as ExpertStage asks should_stop() before each step."""

    def __init__(self, started: threading.Event):
        self.started, self.steps = started, 0
        self.should_stop = lambda: False

    def denoise(self, params, text, state, condition):
        self.started.set()
        while self.steps < 10_000:
            if self.should_stop():
                raise Cancelled(f"cancelled before step {self.steps + 1} of 10000")
            self.steps += 1
            threading.Event().wait(0.001)
        return "latents"


def run(coro):
    return asyncio.run(coro)


def test_calls_run_one_at_a_time_in_arrival_order():
    gate, ran = threading.Event(), []
    stage = TextDeployment("text", 30.0, FakeText, gate, ran)

    async def main():
        calls = [asyncio.create_task(stage.encode(p)) for p in ("a", "b", "c")]
        await asyncio.sleep(0)  # all three queued behind the gate
        assert await stage.depth() == {"waiting": 2, "running": 1}
        gate.set()
        return [c.value for c in await asyncio.gather(*calls)]

    assert run(main()) == ["emb(a)", "emb(b)", "emb(c)"]
    assert ran == [("start", "a"), ("end", "a"), ("start", "b"), ("end", "b"), ("start", "c"), ("end", "c")]


def test_a_call_queued_past_its_timeout_is_dropped_and_never_runs():
    gate, ran = threading.Event(), []
    stage = TextDeployment("text", 0.2, FakeText, gate, ran)

    async def main():
        first = asyncio.create_task(stage.encode("long"))
        await asyncio.sleep(0)
        with pytest.raises(Busy, match=r"in the text queue \(infer.queue_timeout_s 0.2\)"):
            await stage.encode("late")  # dropped while "long" still holds the stage
        gate.set()
        return (await first).value

    assert run(main()) == "emb(long)"
    assert ("start", "late") not in ran and stage.waiting == 0


def test_a_cancelled_call_is_dropped_if_queued_and_stopped_at_its_next_step_if_running():
    started = threading.Event()
    stage = ExpertDeployment("high", 30.0, FakeExpert, started)

    async def main():
        running = asyncio.create_task(stage.denoise("p", "text"))
        queued = asyncio.create_task(stage.denoise("q", "text"))
        await asyncio.to_thread(started.wait, 30)
        queued.cancel()  # Serve cancels a call when its client disconnects
        running.cancel()
        for call in (queued, running):
            with pytest.raises(asyncio.CancelledError):
                await call
        while stage.running:  # the running one stops at its next step
            await asyncio.sleep(0.01)

    run(main())
    assert 0 < stage.stage.steps < 10_000 and stage.waiting == 0


def test_an_earlier_stages_result_is_unwrapped_and_its_seconds_travel_on():
    gate, ran = threading.Event(), []
    gate.set()
    stage = TextDeployment("text", 30.0, FakeText, gate, ran)
    out = run(stage.encode(Timed("prompt", {"before": 1.5})))
    assert out.value == "emb(prompt)" and out.seconds["before"] == 1.5 and set(out.seconds) == {"before", "text"}


def test_admission_holds_max_queued_plus_one_per_replica_and_paces_retry_after():
    admission = Admission(max_queued=2, replicas=2)  # 6 places
    for _ in range(6):
        admission.enter()
    with pytest.raises(Busy, match="6 requests are in the pipeline") as busy:
        admission.enter()
    assert busy.value.retry_after == 1  # no request finished yet
    admission.leave({"text": 0.5, "high": 7.2})  # the slowest stage sets the pace
    admission.leave({"text": 0.5, "high": 3.1})
    assert admission.admitted == 4 and admission.retry_after() == 6  # ceil((7.2 + 3.1) / 2)
    admission.enter()
    assert admission.admitted == 5
