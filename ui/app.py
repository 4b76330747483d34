"""The Gradio page, mounted on the Serve ingress at /ui: Generate (prompt in, video out), and the
Runs and Data pages of ui/pages.py.

`build_ui` gets the ingress's `generate` (the same path as POST /v1/generate) and the
config, so the page's defaults and slider ranges are the served ones and a request the
REST API would refuse is refused here with the same message.
"""

from __future__ import annotations

import asyncio
import base64
import tempfile
from pathlib import Path

import gradio as gr
from pydantic import ValidationError

from ui.pages import Preview, data_page, evaluate_page, runs_page
from wanray.config import Config
from wanray.errors import RequestError
from wanray.infer.api import IMAGE_DECODES, Busy, Generate, GenerateRequest, cause, resolve, served_split
from wanray.models import read_kind

MAX_GUIDANCE = 20.0  # slider range; the REST API takes any finite scale >= 0


def _request_error(e: Exception) -> gr.Error:
    if isinstance(e, ValidationError):
        return gr.Error("; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors()))
    return gr.Error(str(e))


def adapter_uses(names: list[str] | None, scales: str | None) -> list[dict]:
    """The Generate page's adapters: the names chosen and their scales ("1, 0.8"; blank: 1 each) as the REST
    API's `loras`; a RequestError when the scales do not match the names."""
    names, text = names or [], (scales or "").strip()
    try:
        values = [float(x) for x in text.split(",")] if text else [1.0] * len(names)
    except ValueError:
        raise RequestError(f"adapter scales must be numbers separated by commas, got {text!r}") from None
    if len(values) != len(names):
        raise RequestError(f"{len(names)} adapters chosen but {len(values)} scales given: one scale per adapter")
    return [{"name": n, "scale": v} for n, v in zip(names, values)]


PAGE_CHECK_S = 1.0
"""How often a generation looks whether its page is still open."""


def page_open(page: gr.Blocks, session_hash: str | None) -> bool:
    """False once Gradio has seen every event of this page's session go: the page's event stream closed (a
    closed or reloaded tab), so no one will see the video. Gradio itself runs the event to its end. Reads the
    queue's active events (Gradio internals: where they are missing, the page counts as open)."""
    active = getattr(getattr(page, "_queue", None), "active_jobs", None) or []
    events = [e for job in active if job for e in job if getattr(e, "session_hash", None) == session_hash]
    return not events or any(getattr(e, "alive", True) for e in events)


LINKED = (("run", "runs"), ("data", "data"), ("report", "evaluate"))
"""The page's address parameters, each opening its tab on the directory it names."""


def build_ui(generate: Generate, cfg: Config, model_dir: str, preview: Preview | None = None) -> gr.Blocks:
    """The page: Generate (through `generate`), Runs and Data (ui.pages; `preview` decodes a stored latent)."""
    inf, data = cfg.infer, cfg.data
    kind = read_kind(model_dir)
    decoding = asyncio.Semaphore(IMAGE_DECODES)

    async def run(
        prompt,
        negative_prompt,
        seed,
        steps,
        guidance_scale,
        guidance_scale_2,
        height,
        width,
        num_frames,
        extra_1=None,
        extra_2=None,
        extra_3=None,
        extra_4=None,
        extra_5=None,
        progress=gr.Progress(),  # noqa: B008  (Gradio injects the page's progress bar through this default)
        session: gr.Request = None,  # Gradio injects the page's session (it goes by this type)
    ):
        """extra_*, in order: the image inputs the model takes (first frame, last frame), the chosen adapters and
        their scales where adapters are served, then the sampler; each may be left out (None: its default)."""
        encode = lambda path: base64.b64encode(Path(path).read_bytes()).decode() if path else None
        *rest, sampler = [extra_1, extra_2, extra_3, extra_4, extra_5][: len(images) + len(adapters) + 1]
        image, last_image = [*rest[: len(images)], None, None][:2]
        try:
            loras = adapter_uses(*rest[len(images) :]) if inf.loras else None
            request = GenerateRequest(
                prompt=prompt,
                negative_prompt=negative_prompt,
                seed=seed,
                num_inference_steps=steps,
                guidance_scale=guidance_scale,
                guidance_scale_2=guidance_scale_2,
                height=height,
                width=width,
                num_frames=num_frames,
                image=encode(image),
                last_image=encode(last_image),
                loras=loras,
                sampler=sampler,
            )
            # in a thread (decoding the images would hold the event loop every request and the REST API share),
            # a few at once (IMAGE_DECODES: each may take hundreds of MB)
            async with decoding:
                params = await asyncio.to_thread(resolve, request, cfg, kind, served_split(cfg))
        except (RequestError, ValidationError) as e:
            raise _request_error(e) from None
        progress(0.0, desc="encoding prompt")
        rendering = asyncio.ensure_future(generate(params, "mp4", lambda fraction, what: progress(fraction, desc=what)))
        try:  # Stop cancels this coroutine: the finally passes it on to the rendering
            while not (await asyncio.wait({rendering}, timeout=PAGE_CHECK_S))[0]:
                if not page_open(page, session.session_hash):
                    rendering.cancel()  # the stages drop the request or stop it at the next step, as for Stop
                    await asyncio.wait({rendering})
                    if not rendering.cancelled():  # it ended first: its error, if any, is no one's to see
                        rendering.exception()
                    return
            video = rendering.result().data
        except Exception as e:  # a full pipeline or a timed-out queue: the REST API's 503, as a message
            if isinstance(cause(e), Busy):
                raise gr.Error(str(cause(e)), print_exception=False) from None
            raise
        finally:
            rendering.cancel()
        with tempfile.TemporaryDirectory(prefix="wanray-ui-") as tmp:
            path = Path(tmp) / f"wanray-seed{params.seed}.mp4"
            path.write_bytes(video)
            yield str(path)  # Gradio copies the file into its cache before it resumes us

    with gr.Blocks(title="wanray", delete_cache=(3600, 3600)) as page:
        experts = inf.stages.high
        stages = (
            "one transformer for every step"
            if kind.one_transformer
            else "two stages: high-noise expert, then low-noise expert"
        )
        first = {"required": " Give the first frame.", "optional": " A first frame is optional."}.get(kind.image, "")
        gr.Markdown(
            f"# wanray: {kind.title}\nModel directory: `{model_dir}` "
            f"({experts.device}, {experts.dtype}); {stages}.{first}"
        )
        with gr.Tabs() as tabs:
            with gr.Tab("Generate", id="generate"):
                with gr.Row():
                    with gr.Column():
                        prompt = gr.Textbox(label="Prompt", lines=3, placeholder="a red circle moving left to right")
                        # image-to-video models: the first frame (resized to the requested size)
                        images = []
                        if kind.image != "none":
                            optional = " (optional)" if kind.image == "optional" else ""
                            images.append(gr.Image(label="First frame" + optional, type="filepath"))
                        if kind.takes_last_image:
                            images.append(gr.Image(label="Last frame (optional)", type="filepath"))
                        negative = gr.Textbox(label="Negative prompt", value=inf.negative_prompt, lines=2)
                        with gr.Row():
                            m = kind.size_multiple
                            height = gr.Slider(m, inf.max_height, value=data.height, step=m, label="Height")
                            width = gr.Slider(m, inf.max_width, value=data.width, step=m, label="Width")
                            frames = gr.Slider(1, inf.max_frames, value=data.num_frames, step=4, label="Frames (4n+1)")
                        with gr.Row():
                            steps = gr.Slider(1, inf.max_steps, value=inf.num_inference_steps, step=1, label="Steps")
                            seed = gr.Number(value=inf.seed, precision=0, minimum=0, label="Seed")
                        with gr.Row():
                            guidance = gr.Slider(
                                0,
                                MAX_GUIDANCE,
                                value=inf.guidance_scale,
                                step=0.5,
                                label="Guidance" if kind.one_transformer else "Guidance, high-noise expert",
                            )
                            guidance_2 = gr.Slider(
                                0,
                                MAX_GUIDANCE,
                                value=inf.guidance_scale_2,
                                step=0.5,
                                label="Guidance, low-noise expert",
                                visible=not kind.one_transformer,
                            )
                        with gr.Row():
                            sampler = gr.Radio(
                                ["unipc", "euler"],
                                value=inf.sampler,
                                label="Sampler (euler: the 4-step distilled adapters' steps)",
                            )
                        adapters = []
                        if inf.loras:
                            with gr.Row():
                                adapters = [
                                    gr.Dropdown(
                                        sorted(inf.loras),
                                        value=[u.name for u in inf.default_loras],
                                        multiselect=True,
                                        label="Adapters (LoRA), stacked",
                                    ),
                                    gr.Textbox(
                                        value=", ".join(f"{u.scale:g}" for u in inf.default_loras),
                                        label="Their scales",
                                        placeholder="1 each, or one per adapter in order: 1, 0.8",
                                    ),
                                ]
                        with gr.Row():
                            button = gr.Button("Generate", variant="primary", scale=3)
                            stop = gr.Button("Stop", variant="stop", scale=1)
                    video = gr.Video(label="Video", autoplay=True)
                inputs = [
                    prompt,
                    negative,
                    seed,
                    steps,
                    guidance,
                    guidance_2,
                    height,
                    width,
                    frames,
                    *images,
                    *adapters,
                ]
                # concurrency_limit=None: Gradio's default runs one click at a time for every page, so no two
                # UI requests would share the stages; the stage queues (infer.max_queued) bound them instead
                generating = button.click(
                    run, inputs=[*inputs, sampler], outputs=video, api_name="generate", concurrency_limit=None
                )
                # the request leaves its stage queue, or its expert stops at the next step
                stop.click(None, cancels=[generating])
            run_picker = runs_page(cfg)
            data_picker = data_page(cfg, kind, preview)
            report_picker = evaluate_page(cfg)

        def open_linked(request: gr.Request):  # /ui/?run=, ?data= or ?report=<path>: that page, that directory
            q = request.query_params
            tab = next((t for k, t in LINKED if q.get(k)), "generate")
            return gr.Tabs(selected=tab), *(q.get(k) or None for k, _ in LINKED)

        page.load(open_linked, None, [tabs, run_picker, data_picker, report_picker])
    return page
