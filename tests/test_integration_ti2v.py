"""Wan2.2-TI2V-5B (tiny: one transformer, the 48-channel Wan2.2 VAE with 16x spatial compression)
through preprocessing, training and export on a real local Ray."""

import pytest
import torch
from conftest import tiny_config
from test_integration_train import metrics

from wanray import model_files, models
from wanray.data.preprocess import run_preprocess
from wanray.data.shards import read_clips
from wanray.errors import ConfigError, DataError
from wanray.infer.validation import RECORD_FILE, Validation
from wanray.schema import ClipRow
from wanray.train.export import diffusers_to_dcp, export_run
from wanray.train.runs import selected
from wanray.train.trainer import make_trainer, train_experts
from wanray.wan import KINDS


@pytest.fixture(scope="module")
def ti2v_model(tmp_path_factory):
    return model_files.write_tiny_checkpoint(tmp_path_factory.mktemp("ti2v") / "tiny-ti2v", kind="ti2v-5b")


@pytest.fixture(scope="module")
def ti2v_prep(ti2v_model, synthetic, ray_cluster, tmp_path_factory):
    out = tmp_path_factory.mktemp("ti2v_prep")
    run_preprocess(tiny_config(ti2v_model), str(synthetic), str(out), log=lambda _: None)
    return out


def test_ti2v_clips_are_48_channel_latents_at_16x_with_no_stored_condition(ti2v_model, ti2v_prep):
    from diffusers import AutoencoderKLWan

    rows = [ClipRow.from_record(r) for r in read_clips(ti2v_prep).to_pylist()]
    assert rows and all(r.condition is None for r in rows)  # the first latent frame is the condition
    for r in rows:
        assert r.latent.shape == (48, (r.num_frames - 1) // 4 + 1, r.height // 16, r.width // 16)
    vae = AutoencoderKLWan.from_pretrained(ti2v_model, subfolder="vae")
    # the first latent frame is the first video frame's own latent (causal VAE): what the sampler keeps clean
    from wanray.buckets import BucketSet
    from wanray.data.video import decode_clip
    from wanray.encoding import encode_latents, frames_to_video

    d = tiny_config(ti2v_model).data
    clip = decode_clip(rows[0].source, BucketSet.from_config(d, KINDS["ti2v-5b"]), d.fps)
    first = encode_latents(vae, frames_to_video(clip.frames[:1])[None])[0]
    torch.testing.assert_close(rows[0].latent[:, :1], first, atol=1e-5, rtol=1e-5)


def test_sizes_the_16x_vae_cannot_take_are_refused_before_any_decoding(ti2v_model, synthetic, tmp_path):
    with pytest.raises(ConfigError, match="multiples of 32 for Wan2.2-TI2V-5B, got 48x64"):
        run_preprocess(
            tiny_config(ti2v_model, "data.height=48"), str(synthetic), str(tmp_path / "out"), log=lambda _: None
        )


def test_ti2v_trains_its_one_transformer_and_exports_to_wan_pipeline(ti2v_model, ti2v_prep, tmp_path):
    from diffusers import WanImageToVideoPipeline, WanPipeline

    run = tmp_path / "run"
    cfg = tiny_config(
        ti2v_model,
        "train.workers=1",
        "train.steps=30",
        "train.checkpoint_every=30",
        "train.lr=3e-3",
        "train.log_every=1",
        "train.caption_dropout=0.0",
        "train.image_condition=0.5",
    )
    train_experts(cfg, "both", ti2v_prep, run, log=lambda _: None)
    assert not (run / "low").exists()
    losses = [m["loss"] for m in metrics(run)]
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5, losses
    out = export_run(cfg, run, tmp_path / "export", log=lambda _: None)
    pipe = WanPipeline.from_pretrained(out)
    base = WanPipeline.from_pretrained(ti2v_model)
    assert pipe.transformer_2 is None and pipe.config.expand_timesteps and pipe.config.boundary_ratio is None
    assert models.read_kind(out) == KINDS["ti2v-5b"]
    assert not torch.equal(pipe.transformer.proj_out.weight, base.transformer.proj_out.weight)  # trained
    WanImageToVideoPipeline.from_pretrained(out)  # the same directory serves image to video


def test_stills_among_videos_train_with_finite_loss_when_every_clip_is_drawn_image_conditioned(
    ti2v_model, synthetic, tmp_path
):
    """train.image_condition=1.0 (the TI2V preset's): a still has one latent frame, which as the clean condition
    would leave an empty loss mask (0/0) and write NaN into the weights. Stills are never image-conditioned."""
    import json
    import math

    from PIL import Image
    from test_integration_train import clip_counts

    from wanray.data.synthetic import SyntheticClip, render

    entries = [
        {"path": str(synthetic.parent / e["path"]), "cap": e["cap"]}
        for e in json.loads((synthetic.parent / "data.json").read_text())
    ]
    for name in ("still-a.png", "still-b.png"):
        frame = render(SyntheticClip(name, "", 64, 64, 16, 2, "square", "yellow", "navy", "left to right"))[0]
        Image.fromarray(frame).save(tmp_path / name)
        entries.append({"image": name, "cap": "a yellow square on a navy background"})
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(e) + "\n" for e in entries))
    prep = tmp_path / "prep"
    run_preprocess(tiny_config(ti2v_model), str(tmp_path / "data.jsonl"), str(prep), log=lambda _: None)
    rows = [ClipRow.from_record(r) for r in read_clips(prep).to_pylist()]
    stills = {r.id for r in rows if r.num_frames == 1}
    assert len(stills) == 2 and len(rows) == 10
    run = tmp_path / "run"
    # validation from a .jsonl of generate.py's lines: one from a first frame, one from text alone
    lines = [{"prompt": "a yellow square", "image": "still-a.png", "num_frames": 5}, {"prompt": "a red circle"}]
    (tmp_path / "validation.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    cfg = tiny_config(
        ti2v_model,
        "train.workers=1",
        f"train.steps={len(rows)}",
        f"train.checkpoint_every={len(rows)}",
        "train.log_every=1",
        "train.image_condition=1.0",
        f"train.validation.every={len(rows)}",
        f"train.validation.prompts_file={tmp_path / 'validation.jsonl'}",
        "train.validation.num_inference_steps=2",
    )
    train_experts(cfg, "high", prep, run, log=lambda _: None, validation=Validation(cfg, ti2v_model))
    assert all(math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"]) for m in metrics(run))
    assert stills <= set(clip_counts(run))  # both stills were trained on
    (record,) = [json.loads(line) for line in (run / "high" / "validation" / RECORD_FILE).read_text().splitlines()]
    assert "error" not in record and len(record["videos"]) == 2
    import av

    for video, frames in zip(record["videos"], (5, cfg.data.num_frames)):
        with av.open(video) as container:
            assert sum(1 for _ in container.decode(video=0)) == frames


def test_the_low_expert_of_a_one_transformer_model_and_data_of_another_vae_are_refused(
    ti2v_model, tiny_model, ti2v_prep, tmp_path
):
    ti2v = KINDS["ti2v-5b"]
    assert selected("both", ti2v) == selected("high", ti2v) == ("high",)
    with pytest.raises(ConfigError, match="Wan2.2-TI2V-5B has one transformer, no low-noise expert"):
        selected("low", ti2v)
    with pytest.raises(ConfigError, match="holds one transformer .Wan2.2-TI2V-5B.: it has no low-noise expert"):
        diffusers_to_dcp(ti2v_model, "low", tmp_path / "dcp")
    with pytest.raises(DataError, match="holds 48-channel latents; Wan2.2-T2V-A14B's VAE makes 16"):
        make_trainer(tiny_config(tiny_model), "high", ti2v_prep, tmp_path / "run")


def test_generate_renders_ti2v_from_text_and_from_a_photograph_with_diffusers_frames(ti2v_model, ray_cluster, tmp_path):
    """One JSONL, a line with a first image (a photograph) and one without: each video equals diffusers'
    pipeline for it (WanImageToVideoPipeline / WanPipeline with expand_timesteps)."""
    import base64
    import json
    import shutil
    import subprocess
    import sys

    import numpy as np
    from conftest import ROOT
    from gradio.media import get_image
    from reference import wanpipeline_frames

    from wanray.infer.api import GenerateRequest, resolve

    shutil.copy(get_image("lion.jpg"), tmp_path / "lion.jpg")
    lines = [
        {"prompt": "a lion looking around", "image": "lion.jpg", "num_frames": 5, "width": 96, "seed": 2},
        {"prompt": "a lion walking", "num_frames": 5, "seed": 3},
    ]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = tmp_path / "videos"
    run = subprocess.run(
        [
            sys.executable,
            str(ROOT / "pipelines" / "generate.py"),
            "--config",
            str(ROOT / "configs" / "tiny.yaml"),
            "--model",
            str(ti2v_model),
            "--prompts",
            str(tmp_path / "prompts.jsonl"),
            "--out",
            str(out),
            "--save-frames",
        ],
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    for i, line in enumerate(lines):
        frames = np.load(out / f"{i:05d}.npy")
        if "image" in line:
            line = {**line, "image": base64.b64encode((tmp_path / "lion.jpg").read_bytes()).decode()}
        params = resolve(GenerateRequest(**line), tiny_config(ti2v_model), KINDS["ti2v-5b"])
        assert (
            frames.shape == (5, 64, params.width, 3)
            and np.abs(frames - wanpipeline_frames(ti2v_model, params)).max() <= 1e-4
        )
