"""The Ray Serve application: one deployment per stage, and an ingress that pipelines requests.

    HTTP ─► proxy ─► Ingress (FastAPI: /v1/generate, /v1/health; Gradio at /ui)
                       │ text  = text_encoder: encode(params)
                       │ high  = high_noise_expert: denoise(params, text)        each stage: its own
                       │ low   = low_noise_expert: denoise(params, text, high)   replica, device and
                       └ video = vae_decoder: render(low)                        one request at a time

The ingress chains the calls without waiting on them: Serve holds each call until its
inputs exist, then hands the object refs straight to the next stage's replica, so the
latents and scheduler state go stage to stage through the object store, not through
the ingress. Each stage runs one request at a time (a device runs one denoising loop),
so while request 1 is in the low-noise stage request 2 already runs in the high-noise stage.
"""
from __future__ import annotations

import asyncio
import functools
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

from ray import serve

from wanray.config import Config
from wanray.devices import accelerator
from wanray.infer.api import OnStage, OutputFormat, build_api
from wanray.infer.sampler import ExpertStage, GenerationParams, PromptEncoder, StageSpec, VideoDecoder
from wanray.infer.video import mp4_bytes, npy_bytes

APP_NAME = "wanray"
UI_PATH = "/ui"
# Stages of a request as the UI's progress bar shows them: (fraction done after it, what finished).
PROGRESS = ((0.05, "prompt encoded"), (0.55, "high-noise expert done"), (0.9, "low-noise expert done"))
STAGE_QUEUE = 32  # requests a stage replica holds (one running, the rest waiting); more wait in Serve's router


class VideoStage(VideoDecoder):
    """The VAE decoder stage: decodes and encodes the video where the frames are, so only bytes travel."""

    def render(self, state, output: OutputFormat, fps: float) -> bytes:
        frames = self.decode(state)
        return mp4_bytes(frames, fps) if output == "mp4" else npy_bytes(frames)


class QueuedStage:
    """The deployment around one sampler stage: calls run one at a time, in arrival order, on one thread.

    The queue lives here, in the replica, rather than in Serve's router: a router whose replicas
    are all busy polls them again with a back-off of up to 0.5 s, which left the device idle for
    0.2-0.5 s between requests. Queued here, the next request starts the moment one ends, and
    its inputs are already fetched.
    """

    def __init__(self, stage_cls: type, *args):
        self.stage = stage_cls(*args)
        self.runner = ThreadPoolExecutor(max_workers=1, thread_name_prefix=stage_cls.__name__)

    async def run(self, method: Callable, *args):
        """`method(stage, *args)`, e.g. run(ExpertStage.denoise, params, text), after the calls before it."""
        call = functools.partial(method, self.stage, *args)
        return await asyncio.get_running_loop().run_in_executor(self.runner, call)


@serve.deployment(max_ongoing_requests=64)
@serve.ingress()
class Ingress:
    """HTTP entry point: validates requests, moves each through the four stages, serves the UI."""

    def __init__(self, text_encoder, high, low, vae, cfg: Config, model_dir: str, with_ui: bool):
        self.text_encoder, self.high, self.low, self.vae = text_encoder, high, low, vae
        self.cfg, self.model_dir, self.with_ui = cfg, model_dir, with_ui

    async def generate(self, params: GenerationParams, output: OutputFormat, on_stage: OnStage | None) -> bytes:
        text = self.text_encoder.run.remote(PromptEncoder.encode, params)
        high = self.high.run.remote(ExpertStage.denoise, params, text)
        low = self.low.run.remote(ExpertStage.denoise, params, text, high)
        video = self.vae.run.remote(VideoStage.render, low, output, self.cfg.data.fps)
        if on_stage is not None:  # the UI's progress: wait on each stage (this fetches its result here)
            for (fraction, what), response in zip(PROGRESS, (text, high, low)):
                await response
                on_stage(fraction, what)
        return await video

    def __serve_build_asgi_app__(self):
        app = build_api(self.generate, self.cfg, self.model_dir)
        if not self.with_ui:
            return app
        import gradio as gr
        from ui.app import build_ui  # shipped by the job's runtime_env (py_modules), see build_app

        return gr.mount_gradio_app(app, build_ui(self.generate, self.cfg, self.model_dir), path=UI_PATH,
                                   ssr_mode=False)


def build_app(cfg: Config, model_dir: str, with_ui: bool = True):
    """The bound Serve application for `model_dir`, with the Gradio page at /ui when `with_ui`.

    The page is the repo's ui/app.py: the driver ships it to the cluster with
    `ray.init(runtime_env={"py_modules": [".../ui"]})`, which Serve deployments inherit.
    """
    inf = cfg.infer
    device = accelerator(inf.device)
    model_dir = str(Path(model_dir).resolve())  # replicas may run elsewhere: never a path relative to here
    spec = StageSpec.resolve(model_dir, cfg)  # a boundary contradicting the directory fails here, not in a replica

    def stage(name: str, cpus: float, accelerators: float):
        return serve.deployment(QueuedStage, name=name, max_ongoing_requests=STAGE_QUEUE,
                                ray_actor_options=device.ray_resources(cpus, accelerators))

    text = stage("text_encoder", inf.text_cpus, inf.text_accelerators).bind(*spec.prompt_encoder())
    high = stage("high_noise_expert", inf.high_cpus, inf.high_accelerators).bind(*spec.expert("high"))
    low = stage("low_noise_expert", inf.low_cpus, inf.low_accelerators).bind(*spec.expert("low"))
    vae = stage("vae_decoder", inf.vae_cpus, inf.vae_accelerators).bind(*spec.decoder(VideoStage))
    ingress = Ingress.options(ray_actor_options={"num_cpus": inf.ingress_cpus})
    return ingress.bind(text, high, low, vae, cfg, str(model_dir), with_ui)


def start(cfg: Config, model_dir: str, with_ui: bool = True) -> str:
    """Deploy on the connected Ray (HTTP bound to infer.host:infer.port) and return the base URL."""
    serve.start(http_options={"host": cfg.infer.host, "port": cfg.infer.port})
    serve.run(build_app(cfg, model_dir, with_ui), name=APP_NAME, route_prefix="/", blocking=False)
    return f"http://{cfg.infer.host}:{cfg.infer.port}"
