"""The Ray Serve application: one deployment per stage, and an ingress that pipelines requests.

    HTTP ─► proxy ─► Ingress (FastAPI: /v1/generate, /v1/health; Gradio at /ui)
                       │ text  = text_encoder.encode(params)
                       │ high  = high_noise_expert.denoise(params, text)        each stage: its own
                       │ low   = low_noise_expert.denoise(params, text, high)   replica, device and
                       └ video = vae_decoder.render(low)                        one request at a time

The ingress chains the calls without waiting on them: Serve holds each call until its
inputs exist, then hands the object refs straight to the next stage's replica, so the
latents and scheduler state go stage to stage through the object store, not through
the ingress. Each stage takes one request at a time (max_ongoing_requests=1, a device
runs one denoising loop), so while request 1 is in the low-noise stage request 2
already runs in the high-noise stage.
"""
from __future__ import annotations

from pathlib import Path

from ray import serve

from wanray.config import Config
from wanray.devices import accelerator
from wanray.infer.api import OnStage, OutputFormat, build_api
from wanray.infer.sampler import ExpertStage, GenerationParams, PromptEncoder, VideoDecoder, model_boundary
from wanray.infer.video import mp4_bytes, npy_bytes

APP_NAME = "wanray"
UI_PATH = "/ui"
# Stages of a request as the UI's progress bar shows them: (fraction done after it, what finished).
PROGRESS = ((0.05, "prompt encoded"), (0.55, "high-noise expert done"), (0.9, "low-noise expert done"))


class VideoStage(VideoDecoder):
    """The VAE decoder deployment: decodes and encodes the video where the frames are, so only bytes travel."""

    def render(self, state, output: OutputFormat, fps: float) -> bytes:
        frames = self.decode(state)
        return mp4_bytes(frames, fps) if output == "mp4" else npy_bytes(frames)


@serve.deployment(max_ongoing_requests=64)
@serve.ingress()
class Ingress:
    """HTTP entry point: validates requests, moves each through the four stages, serves the UI."""

    def __init__(self, text_encoder, high, low, vae, cfg: Config, model_dir: str, with_ui: bool):
        self.text_encoder, self.high, self.low, self.vae = text_encoder, high, low, vae
        self.cfg, self.model_dir, self.with_ui = cfg, model_dir, with_ui

    async def generate(self, params: GenerationParams, output: OutputFormat, on_stage: OnStage | None) -> bytes:
        text = self.text_encoder.encode.remote(params)
        high = self.high.denoise.remote(params, text)
        low = self.low.denoise.remote(params, text, high)
        video = self.vae.render.remote(low, output, self.cfg.data.fps)
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
    boundary = model_boundary(model_dir, cfg.model.boundary)

    def stage(cls, name: str, cpus: float, accelerators: float):
        return serve.deployment(cls, name=name, max_ongoing_requests=1,
                                ray_actor_options=device.ray_resources(cpus, accelerators))

    text = stage(PromptEncoder, "text_encoder", inf.text_cpus, inf.text_accelerators).bind(model_dir, inf)
    high = stage(ExpertStage, "high_noise_expert", inf.high_cpus, inf.high_accelerators).bind(
        model_dir, "high", inf, boundary)
    low = stage(ExpertStage, "low_noise_expert", inf.low_cpus, inf.low_accelerators).bind(
        model_dir, "low", inf, boundary)
    vae = stage(VideoStage, "vae_decoder", inf.vae_cpus, inf.vae_accelerators).bind(model_dir, inf)
    ingress = Ingress.options(ray_actor_options={"num_cpus": inf.ingress_cpus})
    return ingress.bind(text, high, low, vae, cfg, str(model_dir), with_ui)


def start(cfg: Config, model_dir: str, with_ui: bool = True) -> str:
    """Deploy on the connected Ray (HTTP bound to infer.host:infer.port) and return the base URL."""
    serve.start(http_options={"host": cfg.infer.host, "port": cfg.infer.port})
    serve.run(build_app(cfg, model_dir, with_ui), name=APP_NAME, route_prefix="/", blocking=False)
    return f"http://{cfg.infer.host}:{cfg.infer.port}"
