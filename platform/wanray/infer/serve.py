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
import functools
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

from ray import serve

from wanray.config import Config, Resources
from wanray.infer.api import Generate, OnStage, OutputFormat, build_api, serving_token, token_matches
from wanray.infer.group import ExpertGroup
from wanray.infer.sampler import ExpertStage, GenerationParams, PromptEncoder, StageSpec, VideoDecoder
from wanray.infer.video import mp4_bytes, npy_bytes

APP_NAME = "wanray"
UI_PATH = "/ui"
# Stages of a request as the UI's progress bar shows them: (fraction done after it, what finished).
PROGRESS = ((0.05, "prompt encoded"), (0.55, "high-noise expert done"), (0.9, "low-noise expert done"))
ONE_TRANSFORMER = ((0.05, "prompt encoded"), (0.9, "transformer done"))
STAGE_QUEUE = 32  # requests a stage replica holds (one running, the rest waiting); more wait in Serve's router
BuildUI = Callable[[Generate, Config, str], object]
"""(generate, config, model directory) -> a gradio.Blocks page, e.g. ui/app.py's build_ui."""


class VideoStage(VideoDecoder):
    """The VAE decoder stage: decodes and encodes the video where the frames are, so only bytes travel."""

    def render(self, state, output: OutputFormat, fps: float) -> bytes:
        frames = self.decode(state)
        return mp4_bytes(frames, fps) if output == "mp4" else npy_bytes(frames)


class QueuedStage:
    """The deployment around one sampler stage: calls run one at a time, in arrival order, on one thread.

    The queue lives here, in the replica, rather than in Serve's router: a router whose replicas
    are all busy polls them again with a back-off of up to 0.5 s, during which the device would
    idle. Queued here, the next request starts the moment one ends, its inputs already fetched.
    """

    def __init__(self, stage_cls: type, *args):
        self.stage = stage_cls(*args)
        self.runner = ThreadPoolExecutor(max_workers=1, thread_name_prefix=stage_cls.__name__)

    async def run(self, method: str, *args):
        """`stage.method(*args)`, e.g. run("denoise", params, text), after the calls before it."""
        call = functools.partial(getattr(self.stage, method), *args)
        return await asyncio.get_running_loop().run_in_executor(self.runner, call)


@serve.deployment(max_ongoing_requests=64)
@serve.ingress()
class Ingress:
    """HTTP entry point: validates requests, moves each through the four stages, serves the UI."""

    def __init__(self, text_encoder, high, low, vae, cfg: Config, model_dir: str, ui: BuildUI | None, token: str = ""):
        self.text_encoder, self.high, self.low, self.vae = text_encoder, high, low, vae
        self.cfg, self.model_dir, self.ui, self.token = cfg, model_dir, ui, token

    async def generate(self, params: GenerationParams, output: OutputFormat, on_stage: OnStage | None) -> bytes:
        text = self.text_encoder.run.remote("encode", params)
        # image to video: the VAE stage encodes the first image while the text encoder runs
        condition = None if params.image is None else self.vae.run.remote("condition", params)
        high = self.high.run.remote("denoise", params, text, None, condition)
        low = high if self.low is None else self.low.run.remote("denoise", params, text, high)
        video = self.vae.run.remote("render", low, output, self.cfg.data.fps)
        if on_stage is not None:  # the UI's progress: wait on each stage (this fetches its result here)
            stages = zip(PROGRESS, (text, high, low)) if self.low is not None else zip(ONE_TRANSFORMER, (text, high))
            for (fraction, what), response in stages:
                await response
                on_stage(fraction, what)
        return await video

    def __serve_build_asgi_app__(self):
        app = build_api(self.generate, self.cfg, self.model_dir, self.token)
        if self.ui is None:
            return app
        import gradio as gr

        login = {}
        if self.token:  # the page asks for the token as its password (any user name)
            login = dict(auth=lambda _user, password: token_matches(f"Bearer {password}", self.token),
                         auth_message="wanray: enter the server's API token as the password (any user name)")
        return gr.mount_gradio_app(app, self.ui(self.generate, self.cfg, self.model_dir), path=UI_PATH,
                                   ssr_mode=False, **login)


def build_app(cfg: Config, model_dir: str, ui: BuildUI | None = None):
    """The bound Serve application for `model_dir`, with the page `ui` builds mounted at /ui.

    `ui` is the driver's (pipelines/serve.py passes ui/app.py's build_ui); Serve pickles it by
    reference, so its module must be importable on the cluster: the driver ships ui/ with
    `runtime_env={"py_modules": [".../ui"]}`, which the deployments inherit.
    """
    model_dir = str(Path(model_dir).resolve())  # replicas may run elsewhere: never a path relative to here
    spec = StageSpec.for_serving(model_dir, cfg)  # a contradicting boundary fails here, not in a replica

    def stage(name: str, resources: Resources, devices: int = 1):
        group = {"placement_group_bundles": [resources.bundle()] * devices} if devices > 1 else {}
        return serve.deployment(QueuedStage, name=name, max_ongoing_requests=STAGE_QUEUE,
                                ray_actor_options=resources.ray_options(), **group)

    def expert(name: str, e: str):  # on several devices: one replica holding a group of ranks
        n = spec.devices[e]
        return stage(name, getattr(cfg.infer.stages, e), n).bind(ExpertGroup if n > 1 else ExpertStage, spec, e)

    stages = cfg.infer.stages
    text = stage("text_encoder", stages.text).bind(PromptEncoder, spec)
    high = expert("high_noise_expert", "high")
    low = None if spec.contract.kind.one_transformer else expert("low_noise_expert", "low")
    vae = stage("vae_decoder", stages.vae).bind(VideoStage, spec)
    ingress = Ingress.options(ray_actor_options={"num_cpus": cfg.infer.ingress_cpus})
    return ingress.bind(text, high, low, vae, cfg, str(model_dir), ui, serving_token(cfg))


def start(cfg: Config, model_dir: str, ui: BuildUI | None = None) -> str:
    """Deploy on the connected Ray (HTTP bound to infer.host:infer.port) and return the base URL."""
    serve.start(http_options={"host": cfg.infer.host, "port": cfg.infer.port})
    serve.run(build_app(cfg, model_dir, ui), name=APP_NAME, route_prefix="/", blocking=False)
    return f"http://{cfg.infer.host}:{cfg.infer.port}"
