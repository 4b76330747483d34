"""Batch generation (pipelines/generate.py) on Ray Data: one video per prompt line, WanPipeline's frames."""

import json
import subprocess
import sys

import av
import numpy as np
from conftest import ROOT, tiny_config
from reference import wanpipeline_frames

from wanray.infer.api import GenerateRequest, resolve
from wanray.model_files import TINY_BOUNDARY

PROMPTS = ["a red circle moving left to right", "a blue square moving top to bottom on a gray background"]
OVERRIDES = ["data.num_frames=9", "infer.negative_prompt=blurry, static", "infer.seed=11"]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "pipelines" / "generate.py"), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=400,
    )


def test_generate_writes_one_video_per_prompt_with_wanpipeline_frames(tiny_model, ray_cluster, tmp_path, s3):
    """A JSONL prompts file: the first line takes the configured settings, the second its own size
    (another bucket: portrait, 5 frames) and seed. The prompts file and the videos are in an S3 bucket."""
    second = {"prompt": PROMPTS[1], "height": 64, "width": 32, "num_frames": 5, "seed": 3}
    s3.create_bucket(Bucket="gen")
    body = json.dumps({"prompt": PROMPTS[0]}) + "\n\n" + json.dumps(second) + "\n"  # the blank line is skipped
    s3.put_object(Bucket="gen", Key="in/prompts.jsonl", Body=body)
    prompts, out = "s3://gen/in/prompts.jsonl", tmp_path / "videos"
    sets = [a for o in OVERRIDES for a in ("--set", o)]
    run = _run(
        "--config",
        str(ROOT / "configs" / "tiny.yaml"),
        "--model",
        str(tiny_model),
        *sets,
        "--prompts",
        prompts,
        "--out",
        "s3://gen/out",
        "--save-frames",
    )
    assert run.returncode == 0, run.stderr[-3000:]
    out.mkdir()
    for name in ("videos.jsonl", "00000.mp4", "00000.npy", "00001.mp4", "00001.npy"):
        s3.download_file("gen", f"out/{name}", str(out / name))
    index = [json.loads(line) for line in (out / "videos.jsonl").read_text().splitlines()]
    assert [(r["index"], r["prompt"], r["video"], r["seed"]) for r in index] == [
        (0, PROMPTS[0], "00000.mp4", 11),
        (1, PROMPTS[1], "00001.mp4", 3),
    ]
    cfg = tiny_config(tiny_model, *OVERRIDES)
    requests = [GenerateRequest(prompt=PROMPTS[0]), GenerateRequest(**second)]
    for i, (request, shape) in enumerate(zip(requests, [(9, 64, 64, 3), (5, 64, 32, 3)])):
        with av.open(str(out / f"{i:05d}.mp4")) as container:
            assert sum(1 for _ in container.decode(video=0)) == shape[0]
        frames = np.load(out / f"{i:05d}.npy")
        ref = wanpipeline_frames(tiny_model, resolve(request, cfg), TINY_BOUNDARY)
        assert frames.shape == shape and np.abs(frames - ref).max() <= 1e-4


def test_a_prompt_line_out_of_bounds_fails_before_any_work(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n" + "x" * 2001 + "\n")
    run = _run("--prompts", str(prompts), "--out", str(tmp_path / "out"))
    assert run.returncode == 2
    reason = "prompt has 2001 characters, at most 2000 are served"
    assert run.stderr.strip() == f"generate.py: error: {prompts} line 2: {reason}"
    assert not (tmp_path / "out").exists()
    missing = _run("--prompts", str(tmp_path / "none.txt"), "--out", str(tmp_path / "out"))
    assert missing.returncode == 2 and "prompts file not found" in missing.stderr


def test_calibrate_cache_writes_each_experts_ratios_and_prints_the_quality_gate(tiny_model, ray_cluster, tmp_path):
    """pipelines/calibrate_cache.py in a Ray task: each expert's ratios over its own steps (8 steps in all), the
    gate (PSNR, SSIM, speedup, forwards computed) printed and stored; the file is what infer.cache=magcache reads."""
    from wanray.infer.cache import Calibration
    from wanray.infer.spec import StageSpec

    prompts, out = tmp_path / "prompts.txt", tmp_path / "ratios.json"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    sets = [a for o in [*OVERRIDES, "infer.num_inference_steps=8"] for a in ("--set", o)]
    config = ["--config", str(ROOT / "configs" / "tiny.yaml"), "--set", f"model.path={tiny_model}", *sets]
    run = subprocess.run(
        [sys.executable, str(ROOT / "pipelines" / "calibrate_cache.py"), *config, "--prompts", str(prompts)]
        + ["--threshold", "0.3", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    calibration = Calibration.read(out)
    assert calibration.prompts == 2 and calibration.num_inference_steps == 8 and calibration.sampler == "unipc"
    assert sum(len(r) for r in calibration.ratios.values()) == 8 and set(calibration.ratios) == {"high", "low"}
    q = calibration.quality
    assert f"MagCache at threshold 0.3: PSNR {q['psnr_db']:.2f} dB, SSIM {q['ssim']:.4f}" in run.stdout
    assert f"wrote {out}: serve with infer.cache=magcache" in run.stdout
    cfg = tiny_config(tiny_model, "infer.cache=magcache", f"infer.cache_ratios={out}")
    assert StageSpec.for_batch(tiny_model, cfg).calibration == calibration
