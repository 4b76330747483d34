"""pipelines/evaluate.py's library on a real local Ray: models rendered with the same seeds, every video scored,
metrics.json and a report that headless Chromium shows with every video."""

import functools
import http.server
import json
import shutil
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch
from conftest import ROOT, tiny_config
from PIL import Image
from reference import tiny_adapter
from safetensors.torch import load_file, save_file

from wanray.errors import ConfigError, RequestError
from wanray.infer.evaluate import candidate_config, evaluate, parse_candidate, resolve_candidate
from wanray.model_files import TINY_SHAPES, write_tiny_clip

SCORES = {"motion", "sharpness", "clip_score", "temporal_consistency"}


def test_models_are_named_and_checked_before_anything_renders(tiny_model, tmp_path, s3):
    assert parse_candidate("ft=runs/exp1:best") == ("ft", "runs/exp1:best")
    assert parse_candidate("runs/exp1:best") == ("exp1", "runs/exp1:best")
    assert parse_candidate(f"{tiny_model}+runs/style/") == ("style", f"{tiny_model}+runs/style/")
    cfg = tiny_config(tiny_model)
    # names and the prompt file first: an A14B run's export takes long before a typo would show
    with pytest.raises(ConfigError, match="two models are named alike"):
        evaluate(cfg, ["/x/a/run", "/x/b/run:best"], tmp_path / "p.txt", tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="prompts file not found"):
        evaluate(cfg, ["nowhere"], tmp_path / "p.txt", tmp_path / "out")
    (tmp_path / "p.txt").write_text("\n \n")
    with pytest.raises(RequestError, match="holds no prompt"):
        evaluate(cfg, ["nowhere"], tmp_path / "p.txt", tmp_path / "out")
    (tmp_path / "p.txt").write_text("a red circle\n")
    with pytest.raises(ConfigError, match="does not exist"):
        evaluate(cfg, ["nowhere"], tmp_path / "p.txt", tmp_path / "out")
    with pytest.raises(ConfigError, match="nothing after '\\+'"):
        evaluate(cfg, [f"{tiny_model}+"], tmp_path / "p.txt", tmp_path / "out")
    with pytest.raises(ConfigError, match="neither a model directory"):
        evaluate(cfg, [str(tmp_path)], tmp_path / "p.txt", tmp_path / "out")
    s3.create_bucket(Bucket="models")  # a run may be in a bucket, a model directory is read from local disk
    s3.upload_file(str(tiny_model / "model_index.json"), "models", "tiny/model_index.json")
    with pytest.raises(ConfigError, match="neither a model directory \\(model_index.json, on local disk\\)"):
        evaluate(cfg, ["s3://models/tiny"], tmp_path / "p.txt", tmp_path / "out")
    with pytest.raises(ConfigError, match="':best' takes a run directory"):
        evaluate(cfg, [f"{tiny_model}:best"], tmp_path / "p.txt", tmp_path / "out")
    with pytest.raises(ConfigError, match="two models are named alike"):
        evaluate(cfg, [f"a={tiny_model}", f"a={tiny_model}"], tmp_path / "p.txt", tmp_path / "out")
    # the config's default adapters render every model (a 4-step distillation, say); BASE+ADAPTER adds its own
    served = tiny_config(
        tiny_model, "infer.loras={fast: /adapters/fast.safetensors}", "infer.default_loras=[{name: fast}]"
    )
    plain = candidate_config(served, resolve_candidate(served, f"base={tiny_model}", tmp_path))
    assert plain.infer.loras == served.infer.loras and plain.infer.default_loras == served.infer.default_loras
    styled = candidate_config(served, resolve_candidate(served, f"{tiny_model}+/adapters/x.safetensors", tmp_path))
    assert [u.name for u in styled.infer.default_loras] == list(styled.infer.loras) == ["fast", "evaluated"]


def test_the_same_model_scores_the_same_and_the_report_shows_every_video(tiny_model, ray_cluster, tmp_path):
    save_file(tiny_adapter(tiny_model, "high", 5), tmp_path / "adapter.safetensors")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle moving left to right\na blue square\n")
    cfg = tiny_config(
        tiny_model,
        "infer.num_inference_steps=3",
        f"eval.clip_model={write_tiny_clip(tmp_path / 'clip')}",
    )
    out = tmp_path / "eval"
    lines: list[str] = []
    given = [f"base={tiny_model}", f"again={tiny_model}", f"styled={tiny_model}+{tmp_path / 'adapter.safetensors'}"]
    results = evaluate(cfg, given, prompts, out, log=lines.append)

    assert json.loads((out / "metrics.json").read_text()) == results
    assert list(results) == ["base", "again", "styled"]
    for name, r in results.items():
        assert [p["prompt"] for p in r["prompts"]] == ["a red circle moving left to right", "a blue square"]
        assert all(set(p) >= SCORES and (out / p["video"]).is_file() for p in r["prompts"]), name
        assert set(r["mean"]) == SCORES
        assert r["mean"]["motion"] == pytest.approx(np.mean([p["motion"] for p in r["prompts"]]))
    # the same model and seeds: the same videos, so the same scores; an adapter on it changes them
    assert results["base"]["prompts"] == [
        {**p, "video": p["video"].replace("/again/", "/base/")} for p in results["again"]["prompts"]
    ]
    assert results["styled"]["mean"] != results["base"]["mean"] and results["styled"]["adapter"]
    assert any(line.startswith("[evaluate] wrote ") for line in lines)

    # the report, from a static file server over the directory: every video drawn in headless Chromium
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(out))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        shot = tmp_path / "report.png"
        run = subprocess.run(
            [
                sys.executable,
                str(ROOT / "scripts" / "screenshot.py"),
                "--url",
                f"http://127.0.0.1:{server.server_address[1]}/report.html",
                "--out",
                str(shot),
                "--wait-for",
                "video=6",
                "--wait-for-text",
                "a blue square",
            ],
            capture_output=True,
            text=True,
            timeout=240,
        )
    finally:
        server.shutdown()
    assert run.returncode == 0, run.stderr
    image = np.asarray(Image.open(shot).convert("RGB"), dtype=np.int32)
    saturated = image[(image.max(axis=2) - image.min(axis=2)) > 15]
    assert len(np.unique(saturated[:, 0] * 65536 + saturated[:, 1] * 256 + saturated[:, 2])) > 1000  # frames drawn


def test_a_noise_weight_model_scores_worse_than_the_quickstarts_fine_tune(quickstart, tmp_path):
    """The quickstart's run (the tiny model pretrained on the shapes, fine-tuned 20 steps) against a broken copy of
    its base (every transformer tensor replaced by Gaussian noise of its own RMS, as the README's evaluation
    makes it), scored with the CLIP pretrained beside the model: the broken one shows less of its prompts and
    holds together less from frame to frame, keeps less detail on average (its mean sharpness: per prompt, its
    blobs' many soft edges outscore three of the fine-tune's four blurred shapes, as the tiny VAE keeps 2-13% of a
    clip's sharpness; README, Evaluation); its motion is farther from the base's (motion has no better
    direction: flicker reads as flow, a collapsed model stops)."""
    _, out, base = quickstart
    broken = tmp_path / "broken"
    shutil.copytree(base, broken)
    torch.manual_seed(0)
    for f in sorted(broken.glob("transformer*/*.safetensors")):
        save_file({k: torch.randn(v.shape) * v.float().pow(2).mean().sqrt() for k, v in load_file(f).items()}, f)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(
        "a red circle moving left to right on a black background\n"
        "a blue square moving top to bottom on a olive background\n"
        "a yellow circle moving bottom to top on a gray background\n"
        "a white square moving right to left on a navy background\n"
    )
    cfg = tiny_config(base, f"eval.clip_model={TINY_SHAPES / 'clip'}")
    given = [f"base={base}", f"ft={out / 'run'}:best", f"broken={broken}"]
    means = {name: r["mean"] for name, r in evaluate(cfg, given, prompts, tmp_path / "eval").items()}
    for score in ("clip_score", "temporal_consistency", "sharpness"):
        assert means["broken"][score] < means["ft"][score], (score, means)
    moved = {name: abs(m["motion"] - means["base"]["motion"]) for name, m in means.items()}
    assert moved["broken"] > moved["ft"], means
