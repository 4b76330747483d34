"""The UI's Runs, Data and Evaluate pages on a real Serve: a fine-tune with validation videos, a preprocessed
directory with rejects and an evaluation, read through gradio_client and photographed by headless Chromium;
paths outside the configured roots (`..`, a symlink out, an absolute path elsewhere) are refused."""

import json
import os
import subprocess
import sys

import av
import numpy as np
import pytest
from conftest import ROOT, tiny_config
from test_integration_train import FAST

from ui.app import build_ui
from wanray.runtime import free_port

SETS = (
    *FAST,
    "train.workers=1",
    "train.steps=10",
    "train.checkpoint_every=5",
    "train.validation.every=5",
    "train.validation.prompts=[a red circle moving right]",
    "train.validation.num_frames=9",
    "train.validation.num_inference_steps=3",
)


@pytest.fixture(scope="module")
def roots(tmp_path_factory, tiny_model, ray_cluster):
    """<root>/data/prep: 4 synthetic clips and 2 rejects; <root>/runs/ft: 10 steps of the high-noise expert
    with validation videos at steps 5 and 10; and outside/ft: a run outside the roots, linked from inside."""
    from wanray.data.preprocess import run_preprocess
    from wanray.data.synthetic import write_dataset
    from wanray.infer.validation import Validation
    from wanray.train.trainer import train_experts

    root = tmp_path_factory.mktemp("ui_roots")
    videos = write_dataset(root / "videos", count=4, seed=3).parent
    annotation = json.loads((videos / "data.json").read_text())
    (videos / "truncated.mp4").write_bytes((videos / annotation[0]["path"]).read_bytes()[:2000])
    annotation += [{"path": "missing.mp4", "cap": "gone"}, {"path": "truncated.mp4", "cap": "cut short"}]
    (videos / "data.json").write_text(json.dumps(annotation))
    cfg = tiny_config(tiny_model, *SETS)
    run_preprocess(cfg, str(videos / "data.txt"), str(root / "data" / "prep"), log=lambda _: None)
    train_experts(
        cfg,
        "high",
        root / "data" / "prep",
        root / "runs" / "ft",
        log=lambda _: None,
        validation=Validation(cfg, tiny_model),
    )
    outside = tmp_path_factory.mktemp("outside")
    train_dir = root / "runs" / "ft" / "high"
    (outside / "ft" / "high").mkdir(parents=True)
    for name in ("wanray_run.json", "metrics.jsonl", "config.yaml"):
        (outside / "ft" / "high" / name).write_bytes((train_dir / name).read_bytes())
    os.symlink(outside / "ft", root / "runs" / "linked")
    _evaluation(root / "runs" / "eval", sorted((train_dir / "validation").glob("step_*/00.mp4")))
    return root, outside


def _evaluation(out, videos):
    """An evaluation directory as wanray.infer.evaluate writes it (its report_html), of two models ("a", "b")
    and one prompt each, from two existing videos (rendering them is test_integration_evaluate's part)."""
    from wanray.infer.evaluate import report_html
    from wanray.infer.scores import SCORES_VERSION

    results = {}
    for name, video in zip(("a", "b"), videos):
        (out / "videos" / name).mkdir(parents=True)
        (out / "videos" / name / "00000.mp4").write_bytes(video.read_bytes())
        scores = {"motion": 1.0 + len(results), "sharpness": 100.0}
        prompt = {"prompt": "a red circle moving right", "seed": 0, "video": f"videos/{name}/00000.mp4", **scores}
        results[name] = {
            "source": str(video),
            "model": "m",
            "adapter": "",
            "mean": scores,
            "prompts": [prompt],
            "scores_version": SCORES_VERSION,
        }
    (out / "metrics.json").write_text(json.dumps(results))
    (out / "report.html").write_text(report_html(results))


@pytest.fixture(scope="module")
def ui_server(roots, tiny_model):
    from ray import serve

    from wanray.infer.serve import APP_NAME, start

    root, _ = roots
    cfg = tiny_config(
        tiny_model, f"infer.port={free_port()}", f"ui.runs_roots=[{root / 'runs'}]", f"ui.data_roots=[{root / 'data'}]"
    )
    url = start(cfg, str(tiny_model), build_ui)
    yield url
    serve.delete(APP_NAME)
    serve.shutdown()


def test_runs_page_shows_curves_validation_videos_and_config_and_refuses_paths_outside(roots, ui_server):
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    root, outside = roots
    client = Client(f"{ui_server}/ui/", verbose=False)
    run = str(root / "runs" / "ft")
    assert client.predict(api_name="/rescan_runs")["choices"] == [[run, run]]  # the link out is not listed
    loss, grad_norm, lr, speed, gallery, scores, config = client.predict(run, api_name="/show_run")
    metrics = [json.loads(line) for line in (root / "runs" / "ft" / "high" / "metrics.jsonl").read_text().splitlines()]
    assert loss["value"]["columns"] == ["step", "loss", "expert"]
    assert loss["value"]["data"] == [[m["step"], pytest.approx(m["loss"]), "high"] for m in metrics]
    assert len(grad_norm["value"]["data"]) == len(lr["value"]["data"]) == len(speed["value"]["data"]) == 10
    # the step axis spans the run's 10 planned steps widened to 20, so its ticks fall on whole steps
    assert loss["x_lim"] == grad_norm["x_lim"] == [0, 20]
    videos = gallery["value"]
    assert [item["caption"].split(" · ")[:2] for item in videos] == [["step 5", "high"], ["step 10", "high"]]
    for item in videos:  # the videos themselves, as rendered at those steps
        with av.open(item["video"]) as container:
            assert sum(1 for _ in container.decode(video=0)) == 9
    assert "# high-noise expert" in config and "validation:" in config and "every: 5" in config
    # each validation's scores (no eval.clip_model here: motion and sharpness), as validations.jsonl has them
    records = [json.loads(line) for line in (root / "runs" / "ft" / "high" / "validation" / "validations.jsonl")
               .read_text().splitlines()]  # fmt: skip
    assert scores["headers"] == ["step", "expert", "motion", "sharpness"]
    assert scores["data"] == [
        [r["step"], "high", pytest.approx(r["scores_mean"]["motion"], abs=1e-4),
         pytest.approx(r["scores_mean"]["sharpness"], abs=1e-4)] for r in records
    ]  # fmt: skip
    for path in (str(outside / "ft"), str(root / "runs" / "linked"), f"{root}/runs/../../{outside.name}/ft", "/etc"):
        with pytest.raises(AppError, match="is outside ui.runs_roots"):
            client.predict(path, api_name="/show_run")
    with pytest.raises(AppError, match="is not a training run"):
        client.predict(str(root / "runs"), api_name="/show_run")


def test_evaluate_page_shows_an_evaluations_means_and_videos_side_by_side(roots, ui_server):
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    root, outside = roots
    client = Client(f"{ui_server}/ui/", verbose=False)
    report = str(root / "runs" / "eval")
    means, videos = client.predict(report, api_name="/show_report")
    assert means["headers"] == ["model", "source", "motion", "sharpness"]
    assert [row[0] for row in means["data"]] == ["a", "b"] and [row[2] for row in means["data"]] == [1.0, 2.0]
    assert [item["caption"] for item in videos["value"]] == [f"{m} · a red circle moving right" for m in ("a", "b")]
    for item in videos["value"]:
        with av.open(item["video"]) as container:
            assert sum(1 for _ in container.decode(video=0)) == 9
    with pytest.raises(AppError, match="is outside ui.runs_roots"):
        client.predict(str(outside), api_name="/show_report")
    with pytest.raises(AppError, match="is not an evaluation"):
        client.predict(str(root / "runs" / "ft"), api_name="/show_report")


def test_data_page_shows_summary_rejects_clips_and_a_preview_decoded_from_a_latent(roots, ui_server):
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    root, outside = roots
    client = Client(f"{ui_server}/ui/", verbose=False)
    prep = str(root / "data" / "prep")
    summary, rejects, clips, picker = client.predict(prep, 0, api_name="/show_data")
    assert "**4 clips** from 6 in the manifest" in summary and "file_not_found: 1" in summary
    assert sorted(row[1] for row in rejects["data"]) == ["corrupt_video", "file_not_found"]
    assert len(clips["data"]) == 4 and {"id", "caption", "bucket", "latent_shape"} <= set(clips["headers"])
    # the curation columns: each clip's source range and motion (no aesthetic model, manifest captions: empty)
    assert {"cut_start", "cut_end", "motion", "aesthetic", "caption_model"} <= set(clips["headers"])
    assert all(row[clips["headers"].index("motion")] > 0 for row in clips["data"])
    clip_id = picker["value"]
    assert clip_id == clips["data"][0][clips["headers"].index("id")]
    video = client.predict(prep, clip_id, api_name="/preview")
    bucket = clips["data"][0][clips["headers"].index("bucket")]  # HxWxF
    height, width, frames = map(int, bucket.split("x"))
    with av.open(video) as container:
        decoded = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(decoded) == frames and decoded[0].shape == (height, width, 3)
    assert np.asarray(decoded).std() > 5  # the clip's moving shape, not a flat frame
    with pytest.raises(AppError, match="is outside ui.data_roots"):
        client.predict(str(outside), 0, api_name="/show_data")
    with pytest.raises(AppError, match="no clip 'nope'"):
        client.predict(prep, "nope", api_name="/preview")


TABS = 'button[role="tab"]'
X_TICKS = '.vega-embed g.role-axis[aria-label^="X-axis"] .role-axis-label text'


def _screenshot(url: str, out, *wait_for: str, text: tuple[str, ...] = ()):
    """The page as an RGB array, and the visible tab buttons' and plot x-axis labels' texts."""
    from PIL import Image

    waits = [a for w in wait_for for a in ("--wait-for", w)] + [a for t in text for a in ("--wait-for-text", t)]
    run = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "screenshot.py"),
            "--url",
            url,
            "--out",
            str(out),
            "--height",
            "1400",
            *waits,
            "--texts",
            TABS,
            "--texts",
            X_TICKS,
        ],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert run.returncode == 0, run.stderr
    return np.asarray(Image.open(out).convert("RGB"), dtype=np.int32), json.loads(out.with_suffix(".json").read_text())


def _curve_pixels(image: np.ndarray) -> int:
    """Pixels of the plots' line colour (Vega's first category colour, #4c78a8)."""
    return int((np.abs(image - np.array([76, 120, 168])).max(axis=2) < 30).sum())


def _colours(image: np.ndarray) -> int:
    """Distinct saturated colours: a few hundred for a page of text and widgets, thousands with video frames."""
    pixels = image[(image.max(axis=2) - image.min(axis=2)) > 15]
    return len(np.unique(pixels[:, 0] * 65536 + pixels[:, 1] * 256 + pixels[:, 2]))


def test_screenshots_of_both_pages_show_the_curves_and_the_videos(roots, ui_server, tmp_path):
    """Opened by address on the fine-tune and on the preprocessed directory, against the Generate page."""
    root, _ = roots
    generate, _ = _screenshot(f"{ui_server}/ui/", tmp_path / "generate.png", "button=3")
    # once the four plots are drawn and the two validation videos are in the gallery
    runs, on_runs = _screenshot(
        f"{ui_server}/ui/?run={root / 'runs' / 'ft'}",
        tmp_path / "runs.png",
        ".vega-embed canvas, .vega-embed svg=4",
        "video=2",
    )
    # once the summary, the rejects and the clips are shown
    data, on_data = _screenshot(
        f"{ui_server}/ui/?data={root / 'data' / 'prep'}",
        tmp_path / "data.png",
        text=("4 clips", "corrupt_video", "64x64x17"),
    )
    print("screenshots:", tmp_path)
    # each tab once (the menu overflow drew the selected last tab twice); steps labelled as whole steps
    assert on_runs[TABS] == on_data[TABS] == ["Generate", "Runs", "Data", "Evaluate"]
    ticks = on_runs[X_TICKS]
    assert len(ticks) >= 4 * 3 and all(t.replace(",", "").isdigit() for t in ticks), ticks
    # each of the four axes counts up without repeating a label (half steps shown as whole ones would repeat)
    steps = [int(t.replace(",", "")) for t in ticks]
    assert sum(b < a for a, b in zip(steps, steps[1:])) == 4 - 1 and all(a != b for a, b in zip(steps, steps[1:]))
    assert _curve_pixels(generate) < 50 and _curve_pixels(runs) > 1000  # four curves drawn
    assert _colours(runs) > 5 * _colours(generate)  # the validation videos' frames
    assert np.abs(data - generate).mean() > 5 and np.abs(data - runs).mean() > 5  # a page of its own
