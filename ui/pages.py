"""The UI's Runs and Data pages (tabs beside Generate): training runs and preprocessed data under the
configured roots (ui.runs_roots, ui.data_roots), read through wanray.infer.browse.

A page can be opened on one run or directory by its address: /ui/?run=<path> or /ui/?data=<path>.
Files are copied into this process's own temporary directory before Gradio serves them, so Gradio
never serves a path from the roots itself (the roots check is the only gate).
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import inspect
import shutil
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path, PurePosixPath

import gradio as gr
import pandas as pd
import torch

from wanray import storage
from wanray.config import Config
from wanray.errors import RequestError
from wanray.infer.browse import DataView, ReportView, Roots, RunView, list_datasets, list_reports, list_runs
from wanray.wan import ModelKind

CURVES = (("loss", "Loss"), ("grad_norm", "Gradient norm"), ("lr", "Learning rate"), ("samples_per_s", "Samples/s"))
REFRESH_S = 10.0  # the Runs page reads the run again this often, while the run is going
MIN_STEP_AXIS = 20
"""The curves' step axis spans at least this many steps (0 to the run's train.steps, or more). Vega puts a tick
about every 40 pixels, so a short span (10 steps on a 500-pixel plot) would be labelled 1.5, 2.5, ...; over 20
steps the ticks fall on whole steps on plots up to ~1,100 pixels wide (a 2,400-pixel window)."""
CLIPS_PER_PAGE = 20
MAX_COLUMNS = 6  # validation steps side by side; more wrap onto the next row
Preview = Callable[[torch.Tensor], Awaitable[bytes]]
"""A stored latent (C, latent frames, h, w) -> the mp4 the VAE stage decodes from it."""
_SERVED = Path(tempfile.mkdtemp(prefix="wanray-ui-files-"))


def _served_copy(path: str) -> str:
    """A copy of `path` (already checked against the roots; local or in a store) in this process's temporary
    directory."""
    fs, inner = storage.filesystem(path)
    info = fs.get_file_info(inner)
    key = hashlib.sha256(f"{path}:{info.mtime_ns}:{info.size}".encode()).hexdigest()[:16]
    copy = _SERVED / f"{key}{PurePosixPath(inner).suffix}"
    if not copy.exists():
        handle, partial = tempfile.mkstemp(dir=_SERVED, suffix=".part")  # two pages may copy one file at once
        try:
            with open(handle, "wb") as dst, fs.open_input_stream(inner) as src:
                shutil.copyfileobj(src, dst, 8 * 1024**2)
            Path(partial).replace(copy)
        finally:
            Path(partial).unlink(missing_ok=True)
    return str(copy)


def _shown(fn):
    """`fn` (sync or async) with a RequestError (a path outside the roots, a missing clip) as the page's
    one-line error, not a server traceback."""

    async def call_async(*args):
        try:
            return await fn(*args)
        except RequestError as e:
            raise gr.Error(str(e), print_exception=False) from None

    def call(*args):
        try:
            return fn(*args)
        except RequestError as e:
            raise gr.Error(str(e), print_exception=False) from None

    return functools.wraps(fn)(call_async if inspect.iscoroutinefunction(fn) else call)


def curve(metrics: pd.DataFrame, key: str) -> pd.DataFrame:
    """One plot's points (step, key, expert) from a run's metrics.jsonl records; the loss plot also draws each
    expert's held-out loss (records with val_loss) as a series of its own, "<expert> held-out"."""
    if key not in metrics:
        return pd.DataFrame(columns=["step", key, "expert"])
    points = metrics[["step", key, "expert"]].dropna()
    if key == "loss" and "val_loss" in metrics:
        held = metrics[["step", "val_loss", "expert"]].dropna()
        held = pd.DataFrame({"step": held["step"], key: held["val_loss"], "expert": held["expert"] + " held-out"})
        points = pd.concat([points, held], ignore_index=True)
    return points


def runs_page(cfg: Config) -> gr.Dropdown:
    """The Runs tab; returns its run picker (the address's ?run= sets it)."""
    roots = Roots(cfg.ui.runs_roots, "ui.runs_roots")
    with gr.Tab("Runs", id="runs"):
        with gr.Row():
            run = gr.Dropdown(list_runs(roots), value=None, label="Run", allow_custom_value=True, scale=4)
            rescan = gr.Button("Rescan roots", scale=1)
        plots = []
        for pair in (CURVES[:2], CURVES[2:]):
            with gr.Row():
                plots += [
                    gr.LinePlot(x="step", y=key, color="expert", title=title, height=260, x_axis_format="d")
                    for key, title in pair
                ]
        gallery = gr.Gallery(
            label="Validation videos: a row per expert and prompt, its steps side by side (the same "
            "prompts and seed at every step)",
            columns=2,
            height=360,
            object_fit="contain",
        )
        scores = gr.Dataframe(
            label="Validation scores, the mean over the prompts (motion: optical flow in pixels per frame; "
            "sharpness: Laplacian detail kept from frame to frame; clip_score and temporal_consistency with "
            "eval.clip_model)",
            interactive=False,
        )
        config = gr.Code(label="Config used (config.yaml of each expert)", language="yaml")
        # inside the tab: a Timer made after it would be a child of the Tabs, whose tab bar then drew the
        # next tab (Data) twice
        refresh = gr.Timer(REFRESH_S)

    @_shown
    def show(path):
        if not path:
            return [pd.DataFrame(columns=["step", k, "expert"]) for k, _ in CURVES] + [[], None, ""]
        view = RunView.open(roots, path)
        metrics = pd.DataFrame(view.metrics())
        axis = [0, max(view.planned_steps(), int(metrics["step"].max()) if "step" in metrics else 0, MIN_STEP_AXIS)]
        curves = [gr.LinePlot(curve(metrics, k), x_lim=axis) for k, _ in CURVES]
        validations = view.validations()  # a row per expert and prompt, its steps side by side
        cells = sorted(
            ((expert, i, step), video, prompt)
            for expert, step, videos in validations
            for i, (video, prompt) in enumerate(videos)
        )
        items = [
            (_served_copy(video), f"step {step} · {expert} · {prompt[:60]}")
            for (expert, _, step), video, prompt in cells
        ]
        steps = len({step for _, step, _ in validations})
        gallery_value = gr.Gallery(value=items, columns=max(1, min(steps, MAX_COLUMNS)))
        return curves + [gallery_value, pd.DataFrame(view.scores()).round(4), view.config()]

    outputs = plots + [gallery, scores, config]
    run.change(show, run, outputs, api_name="show_run")
    refresh.tick(show, run, outputs, api_name=False, show_progress="hidden")
    rescan.click(lambda: gr.Dropdown(choices=list_runs(roots)), None, run, api_name="rescan_runs")
    return run


def evaluate_page(cfg: Config) -> gr.Dropdown:
    """The Evaluate tab: an evaluation (pipelines/evaluate.py --out) under ui.runs_roots, its means and its
    videos side by side; returns its picker (the address's ?report= sets it)."""
    roots = Roots(cfg.ui.runs_roots, "ui.runs_roots")
    with gr.Tab("Evaluate", id="evaluate"):
        with gr.Row():
            report = gr.Dropdown(list_reports(roots), value=None, label="Evaluation", allow_custom_value=True, scale=4)
            rescan = gr.Button("Rescan roots", scale=1)
        means = gr.Dataframe(label="Each model's mean scores (wanray.infer.scores)", interactive=False)
        videos = gr.Gallery(
            label="A row per prompt, the models side by side (the same seed each)",
            columns=2,
            height=480,
            object_fit="contain",
        )

    @_shown
    def show(path):
        if not path:
            return None, []
        view = ReportView.open(roots, path)
        table = pd.DataFrame(view.means()).round(4)
        items = [(_served_copy(video), caption) for video, caption in view.videos()]
        return table, gr.Gallery(value=items, columns=max(1, min(len(view.results), MAX_COLUMNS)))

    report.change(show, report, [means, videos], api_name="show_report")
    rescan.click(lambda: gr.Dropdown(choices=list_reports(roots)), None, report, api_name="rescan_reports")
    return report


def data_page(cfg: Config, kind: ModelKind, preview: Preview | None) -> gr.Dropdown:
    """The Data tab; returns its directory picker (the address's ?data= sets it)."""
    roots = Roots(cfg.ui.data_roots, "ui.data_roots")
    with gr.Tab("Data", id="data"):
        with gr.Row():
            data = gr.Dropdown(
                list_datasets(roots), value=None, label="Preprocessed directory", allow_custom_value=True, scale=4
            )
            rescan = gr.Button("Rescan roots", scale=1)
        summary = gr.Markdown()
        rejects = gr.Dataframe(label="Rejects", headers=["input", "reason", "detail"], interactive=False)
        with gr.Row():
            page = gr.Number(0, precision=0, minimum=0, label=f"Page ({CLIPS_PER_PAGE} clips each)")
            clip = gr.Dropdown([], label="Clip to preview (its id)", allow_custom_value=True, scale=3)
            show_clip = gr.Button("Decode its latent with the VAE", variant="primary")
        clips = gr.Dataframe(label="Clips", interactive=False)
        video = gr.Video(label="Preview (decoded from the stored latent)", autoplay=True)

    @_shown
    def show(path, number):
        if not path:
            return "", None, None, gr.Dropdown(choices=[])
        view = DataView.open(roots, path)
        s = view.summary()
        rows, total = view.clips(int(number or 0), CLIPS_PER_PAGE)
        reasons = ", ".join(f"{r}: {n}" for r, n in s.get("rejects_by_reason", {}).items()) or "none"
        buckets = ", ".join(f"{b}: {n}" for b, n in s.get("clips_by_bucket", {}).items())
        text = (
            f"**{s.get('rows_in_output', total)} clips** from {s.get('clips_in_manifest', '?')} in the manifest "
            f"(`{s.get('manifest', '?')}`"
            + (f", split into {s['clips_after_split']} clips" if "clips_after_split" in s else "")
            + f"); rejected: {reasons}.  \nBuckets: {buckets}.  \n"
            f"Throughput of the last run: {s.get('clips_per_second', 0):.2f} clips/s, "
            f"{s.get('frames_per_second', 0):.1f} frames/s over {s.get('seconds', 0):.1f} s."
        )
        table = pd.DataFrame([{**r, "latent_shape": "x".join(map(str, r["latent_shape"]))} for r in rows])
        ids = [r["id"] for r in rows]
        return (
            text,
            pd.DataFrame(view.rejects(), columns=["input", "reason", "detail"]),
            table,
            gr.Dropdown(choices=ids, value=ids[0] if ids else None),
        )

    @_shown
    async def decode(path, clip_id):
        if preview is None:
            raise RequestError("previews need the served VAE stage")
        if not (path and clip_id):
            raise RequestError("pick a preprocessed directory and a clip")
        # in a thread: it reads the shards (local or a bucket), which would hold the server's event loop
        latent = await asyncio.to_thread(lambda: DataView.open(roots, path).latent(clip_id))
        if latent.shape[0] != kind.latent_channels:
            raise RequestError(
                f"clip {clip_id} has {latent.shape[0]}-channel latents; the served {kind.title} "
                f"VAE takes {kind.latent_channels}"
            )
        out = _SERVED / f"preview-{hashlib.sha256(f'{path}:{clip_id}'.encode()).hexdigest()[:16]}.mp4"
        out.write_bytes(await preview(latent))
        return str(out)

    data.change(show, [data, page], [summary, rejects, clips, clip], api_name="show_data")
    page.change(show, [data, page], [summary, rejects, clips, clip], api_name=False)
    show_clip.click(decode, [data, clip], video, api_name="preview")
    rescan.click(lambda: gr.Dropdown(choices=list_datasets(roots)), None, data, api_name="rescan_data")
    return data
