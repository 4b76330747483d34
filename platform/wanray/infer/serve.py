"""The Ray Serve application: one deployment per stage, and an ingress that pipelines requests.

    HTTP ─► proxy ─► Ingress (FastAPI: /v1/generate, /v1/health; Gradio at /ui)
                       │ text  = text_encoder: encode(params)
                       │ (cond = vae_decoder: condition(params), image-to-video only)
                       │ high  = high_noise_expert: denoise(params, text, cond)  each stage: its own
                       │ low   = low_noise_expert: denoise(params, text, high)   replica, device and
                       └ video = vae_decoder: render(low)                        one request at a time

A one-transformer model (TI2V-5B) has no low-noise stage: its transformer, deployed as the
high-noise stage, runs every step and hands its state to the VAE stage.

The ingress chains the calls without waiting on them: Serve holds each call until its
inputs exist, then hands the object refs straight to the next stage's replica, so the
latents and scheduler state go stage to stage through the object store, not through
the ingress. Each stage runs one request at a time (a device runs one denoising loop),
so while request 1 is in the low-noise stage request 2 already runs in the high-noise stage.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from ray import serve
from ray.serve.config import BackpressureConfig

from wanray.config import Config
from wanray.infer.api import Busy, Generate, Generated, OnStage, OutputFormat, build_api, serving_token, token_matches
from wanray.infer.browse import absolute_roots
from wanray.infer.group import ExpertGroup
from wanray.infer.request import Cancelled, DenoiseState, GenerationParams
from wanray.infer.sampler import ExpertStage, PromptEncoder, VideoDecoder
from wanray.infer.spec import StageSpec
from wanray.infer.video import mp4_bytes, npy_bytes
from wanray.sections import STAGES

logger = logging.getLogger("ray.serve")  # a replica's log (logs/serve/replica_wanray_<stage>_*.log)
APP_NAME = "wanray"
UI_PATH = "/ui"
# Stages of a request as the UI's progress bar shows them: (fraction done after it, what finished).
PROGRESS = ((0.05, "prompt encoded"), (0.55, "high-noise expert done"), (0.9, "low-noise expert done"))
ONE_TRANSFORMER = ((0.05, "prompt encoded"), (0.9, "transformer done"))
SECONDS_BUCKETS = [0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 50, 100, 250, 500, 1000]
"""Latency histogram bounds, seconds: a tiny model's request to a 720P A14B one."""
BuildUI = Callable[[Generate, Config, str, Callable], object]
"""(generate, config, model directory, preview) -> a gradio.Blocks page, e.g. ui/app.py's build_ui; preview
decodes a stored clip latent (the Data page) on the VAE stage."""


class VideoStage(VideoDecoder):
    """The VAE decoder stage: decodes and encodes the video where the frames are, so only bytes travel."""

    def render(self, state, output: OutputFormat, fps: float) -> bytes:
        frames = self.decode(state)
        return mp4_bytes(frames, fps) if output == "mp4" else npy_bytes(frames)


@dataclass
class Timed:
    """A stage's result on its way to the next stage, with the seconds each stage so far ran the request."""

    value: object
    seconds: dict[str, float]


class QueuedStage:
    """The deployment around one sampler stage: calls run one at a time, in arrival order, on one thread.

    The queue lives here, in the replica, rather than in Serve's router: a router whose replicas
    are all busy polls them again with a back-off of up to 0.5 s, during which the device would
    idle. Queued here, the next request starts the moment one ends, its inputs already fetched.
    A call still queued after infer.queue_timeout_s is dropped then (Busy, never run); a cancelled call
    (its client went away) is dropped if still queued, else stopped at its next step.
    """

    def __init__(self, name: str, timeout_s: float, stage_cls, *args):
        from ray.serve.metrics import Gauge, Histogram

        self.name, self.timeout_s = name, timeout_s
        self.stage = stage_cls(*args)
        self.runner = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self.lock = threading.Lock()
        self.waiting, self.running = 0, 0
        self.depth_gauge = Gauge(
            "wanray_stage_queue_depth", "Requests waiting in a stage replica's queue", tag_keys=("stage",)
        )
        self.depth_gauge.set_default_tags({"stage": name})
        self.seconds = Histogram(
            "wanray_stage_seconds",
            "Seconds a stage replica ran a request",
            boundaries=SECONDS_BUCKETS,
            tag_keys=("stage",),
        )
        self.seconds.set_default_tags({"stage": name})
        self.depth_gauge.set(0)

    def _count(self, waiting: int = 0, running: int = 0) -> None:
        with self.lock:
            self.waiting += waiting
            self.running += running
            self.depth_gauge.set(self.waiting)

    async def depth(self) -> dict:
        """This replica's queue: requests waiting, and running (0 or 1)."""
        return {"waiting": self.waiting, "running": self.running}

    async def _queued(self, method: Callable, *args) -> Timed:
        """`method(*args)` (a method of the stage) after the calls before it; a Timed argument (an earlier
        stage's result) is passed as its value."""
        seconds = {k: v for a in args if isinstance(a, Timed) for k, v in a.seconds.items()}
        values = [a.value if isinstance(a, Timed) else a for a in args]
        stop, queued = threading.Event(), time.monotonic()

        def work():
            self._count(waiting=-1, running=1)
            try:
                if stop.is_set():
                    raise Cancelled("cancelled while queued")
                self.stage.should_stop = stop.is_set  # an expert stage asks it before every step
                start = time.monotonic()
                try:
                    result = method(*values)
                except Cancelled as e:  # its caller is gone: this replica's log is the only trace
                    logger.info("%s: %s", self.name, e)
                    raise
                ran = time.monotonic() - start
                self.seconds.observe(ran)
                return Timed(result, {**seconds, self.name: round(ran, 3)})
            finally:
                self._count(running=-1)

        self._count(waiting=1)
        call = self.runner.submit(work)
        result = asyncio.wrap_future(call)
        try:
            done, _ = await asyncio.wait({result}, timeout=self.timeout_s)
            if not done and call.cancel():  # still queued after infer.queue_timeout_s: it never runs
                self._count(waiting=-1)
                raise Busy(
                    f"waited {time.monotonic() - queued:.0f} s in the {self.name} queue (infer.queue_timeout_s "
                    f"{self.timeout_s:g}): try again later",
                    retry_after=max(1, round(self.timeout_s / 10)),
                )
            return await result  # running by now: it finishes
        except asyncio.CancelledError:  # Serve cancels the call when the request's client disconnects
            stop.set()
            if call.cancel():  # still queued: it never runs
                self._count(waiting=-1)
            raise


class TextDeployment(QueuedStage):
    """The text encoder stage's deployment."""

    async def encode(self, params: GenerationParams) -> Timed:
        return await self._queued(self.stage.encode, params)


class ExpertDeployment(QueuedStage):
    """An expert stage's deployment (one device, or a group of ranks: wanray.infer.group)."""

    async def denoise(self, params: GenerationParams, text, state=None, condition=None) -> Timed:
        return await self._queued(self.stage.denoise, params, text, state, condition)

    async def depth(self) -> dict:
        """This replica's queue, and the adapters its expert holds loaded now (least recently used first)."""
        return {**await super().depth(), "adapters_loaded": list(self.stage.adapters.names)}

    def check_health(self) -> None:
        """Serve's periodic health check: a multi-device expert whose ranks fell out of step (one failed in a
        request) can run nothing again, so this replica is replaced (with new ranks)."""
        if broken := getattr(self.stage, "broken", ""):
            raise RuntimeError(f"{self.name} stage's ranks are out of step: {broken}")


class VaeDeployment(QueuedStage):
    """The VAE stage's deployment: a request's first-frame condition, and its video."""

    async def condition(self, params: GenerationParams) -> Timed:
        return await self._queued(self.stage.condition, params)

    async def render(self, state, output: OutputFormat, fps: float) -> Timed:
        return await self._queued(self.stage.render, state, output, fps)


class Admission:
    """The ingress's bound on requests in the pipeline: (infer.max_queued + 1) x the fewest replicas of a
    stage. A request's call reaches a stage when its inputs exist, so all of them may wait at one stage
    (the first, in a burst) beside the ones it runs: with one replica per stage, no queue is longer than
    infer.max_queued."""

    def __init__(self, max_queued: int, replicas: int = 1):
        self.capacity, self.admitted = (max_queued + 1) * replicas, 0
        self.request_seconds: list[float] = []

    def enter(self) -> None:
        if self.admitted >= self.capacity:
            raise Busy(
                f"{self.admitted} requests are in the pipeline, its capacity ((infer.max_queued + 1) x "
                "replicas): try again later",
                self.retry_after(),
            )
        self.admitted += 1

    def leave(self, seconds: dict[str, float] | None = None) -> None:
        self.admitted -= 1
        if seconds:  # the slowest stage sets the pace at which places free up
            self.request_seconds = (self.request_seconds + [max(seconds.values())])[-16:]

    def retry_after(self) -> int:
        """Seconds until a place is likely free: the recent pace of the slowest stage (1 before any request)."""
        recent = self.request_seconds
        return max(1, math.ceil(sum(recent) / len(recent))) if recent else 1


# Connections beyond these (the UI's and health calls too) get Serve's own 503 from the proxy, not an unbounded wait.
@serve.deployment(
    max_ongoing_requests=64,
    max_queued_requests=64,
    backpressure_config=BackpressureConfig(status_code=503, retry_after_s=1),
)
@serve.ingress()
class Ingress:
    """HTTP entry point: validates requests, moves each through the four stages, serves the UI."""

    def __init__(
        self,
        text_encoder,
        high,
        low,
        vae,
        cfg: Config,
        model_dir: str,
        ui: BuildUI | None,
        token: str = "",
        loras: dict[str, dict[str, str]] | None = None,
    ):
        from ray.serve.metrics import Counter, Histogram

        self.text_encoder, self.high, self.low, self.vae = text_encoder, high, low, vae
        self.cfg, self.model_dir, self.ui, self.token, self.loras = cfg, model_dir, ui, token, loras or {}
        self.stages = {
            k: v for k, v in (("text", text_encoder), ("high", high), ("low", low), ("vae", vae)) if v is not None
        }  # TI2V-5B: no low-noise stage
        self.admission = Admission(cfg.infer.max_queued, min(cfg.infer.stages[s].replicas for s in self.stages))
        self.requests = Counter("wanray_requests_total", "/v1/generate requests by outcome", tag_keys=("outcome",))
        self.latency = Histogram(
            "wanray_request_seconds",
            "Seconds from request to response, by outcome",
            boundaries=SECONDS_BUCKETS,
            tag_keys=("outcome",),
        )

    def count(self, outcome: str, seconds: float) -> None:
        self.requests.inc(tags={"outcome": outcome})
        self.latency.observe(seconds, tags={"outcome": outcome})

    async def queues(self) -> dict:
        async def depth(handle):
            try:
                return await asyncio.wait_for(handle.depth.remote(), timeout=5)
            except Exception as e:
                return {"error": f"{type(e).__name__}"}

        depths = await asyncio.gather(*(depth(h) for h in self.stages.values()))
        return {
            "in_pipeline": self.admission.admitted,
            "capacity": self.admission.capacity,
            "stages": dict(zip(self.stages, depths)),
        }

    async def generate(self, params: GenerationParams, output: OutputFormat, on_stage: OnStage | None) -> Generated:
        self.admission.enter()  # Busy (503) when the pipeline is full
        calls, seconds = [], None
        try:
            text = self.text_encoder.encode.remote(params)
            # image to video: the VAE stage encodes the first image while the text encoder runs
            condition = None if params.image is None else self.vae.condition.remote(params)
            high = self.high.denoise.remote(params, text, None, condition)
            low = high if self.low is None else self.low.denoise.remote(params, text, high)
            video = self.vae.render.remote(low, output, self.cfg.data.fps)
            calls = [c for c in (text, condition, high, low, video) if c is not None]
            if on_stage is not None:  # the UI's progress: wait on each stage (this fetches its result here)
                stages = (
                    zip(PROGRESS, (text, high, low)) if self.low is not None else zip(ONE_TRANSFORMER, (text, high))
                )
                for (fraction, what), response in stages:
                    await response
                    on_stage(fraction, what)
            done = await video
            seconds = done.seconds
            return Generated(done.value, seconds)
        except asyncio.CancelledError:  # the client went away (or the UI's Stop): free its places
            for c in calls:
                c.cancel()
            raise
        finally:
            self.admission.leave(seconds)

    async def preview(self, latent: torch.Tensor) -> bytes:
        """A preprocessed clip's stored latent (C, latent frames, h, w), normalised, as the VAE stage's mp4."""
        state = DenoiseState(latent[None].float(), None, 0)
        return (await self.vae.render.remote(state, "mp4", self.cfg.data.fps)).value

    def __serve_build_asgi_app__(self):
        app = build_api(
            self.generate,
            self.cfg,
            self.model_dir,
            self.token,
            self.queues,
            self.count,
            self.loras,
            open_prefix=None if self.ui is None else UI_PATH,  # the page asks for the token itself
        )
        if self.ui is None:
            return app
        import gradio as gr

        login = {}
        if self.token:  # the page asks for the token as its password (any user name)
            login = dict(
                auth=lambda _user, password: token_matches(f"Bearer {password}", self.token),
                auth_message="wanray: enter the server's API token as the password (any user name)",
            )
        return gr.mount_gradio_app(
            app, self.ui(self.generate, self.cfg, self.model_dir, self.preview), path=UI_PATH, ssr_mode=False, **login
        )


def build_app(cfg: Config, model_dir: str, ui: BuildUI | None = None):
    """The bound Serve application for `model_dir`, with the page `ui` builds mounted at /ui.

    `ui` is the driver's (pipelines/serve.py passes ui/app.py's build_ui); Serve pickles it by
    reference, so its module must be importable on the cluster: the driver ships ui/ with
    `runtime_env={"py_modules": [".../ui"]}`, which the deployments inherit.
    """
    model_dir = str(Path(model_dir).resolve())  # replicas may run elsewhere: never a path relative to here
    cfg = absolute_roots(cfg)  # the UI's roots likewise
    spec = StageSpec.for_serving(model_dir, cfg)  # a contradicting boundary fails here, not in a replica

    # a stage replica takes every admitted request (Admission) and its health calls: none waits in the router
    ongoing = (cfg.infer.max_queued + 1) * max(cfg.infer.stages[s].replicas for s in STAGES) + 8

    def stage(name: str, short: str, deployment: type[QueuedStage], stage_cls, *args):
        resources, devices = cfg.infer.stages[short], spec.devices.get(short, 1)
        group = {"placement_group_bundles": [resources.bundle()] * devices} if devices > 1 else {}
        n, top = resources.replicas, resources.max_replicas
        scale = (
            {"num_replicas": n}
            if not top
            else {"autoscaling_config": {"min_replicas": n, "max_replicas": top, "target_ongoing_requests": 1}}
        )
        return serve.deployment(
            deployment,
            name=name,
            max_ongoing_requests=ongoing,
            graceful_shutdown_timeout_s=cfg.infer.drain_timeout_s,
            ray_actor_options=resources.ray_options(),
            **group,
            **scale,
        ).bind(short, cfg.infer.queue_timeout_s, stage_cls, *args)

    def expert(name: str, e: str):  # on several devices: one replica holding a group of ranks
        return stage(name, e, ExpertDeployment, ExpertGroup if spec.devices[e] > 1 else ExpertStage, spec, e)

    text = stage("text_encoder", "text", TextDeployment, PromptEncoder, spec)
    high = expert("high_noise_expert", "high")
    low = None if spec.contract.kind.one_transformer else expert("low_noise_expert", "low")
    vae = stage("vae_decoder", "vae", VaeDeployment, VideoStage, spec)
    ingress = Ingress.options(  # type: ignore[attr-defined]  # a Serve deployment
        ray_actor_options={"num_cpus": cfg.infer.ingress_cpus}, graceful_shutdown_timeout_s=cfg.infer.drain_timeout_s
    )
    loras = {name: {e: f.label for e, f in files.items()} for name, files in spec.adapters.items()}
    return ingress.bind(text, high, low, vae, cfg, str(model_dir), ui, serving_token(cfg), loras)


def start(cfg: Config, model_dir: str, ui: BuildUI | None = None) -> str:
    """Deploy on the connected Ray (HTTP bound to infer.host:infer.port) and return the base URL."""
    serve.start(http_options={"host": cfg.infer.host, "port": cfg.infer.port})
    serve.run(build_app(cfg, model_dir, ui), name=APP_NAME, route_prefix="/", blocking=False)
    return f"http://{cfg.infer.host}:{cfg.infer.port}"


def remove_app() -> None:
    """Remove the application from the connected Ray, whatever signal arrives meanwhile: SIGINT and SIGTERM
    are ignored from here on, since a KeyboardInterrupt inside the removal would end the driver half done
    (by SIGINT, return code -2). A start interrupted before Serve's controller existed has nothing to remove."""
    import signal

    from ray.serve.exceptions import RayServeException

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    with contextlib.suppress(RayServeException):  # "There is no Serve instance running on this Ray cluster"
        serve.delete(APP_NAME)
