"""Wan2.2-I2V-A14B (tiny) through preprocessing, training and export on a real local Ray: the stored
first-frame condition is diffusers' own, the experts train on it, the export loads in
WanImageToVideoPipeline."""

import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from conftest import tiny_config
from test_integration_train import metrics

from wanray import model_files
from wanray.buckets import BucketSet
from wanray.data.preprocess import run_preprocess
from wanray.data.shards import read_clips, shard_paths
from wanray.data.video import decode_clip
from wanray.errors import DataError
from wanray.schema import ClipRow
from wanray.train.export import export_run
from wanray.train.trainer import make_trainer, train_experts
from wanray.wan import KINDS, first_frame_mask


@pytest.fixture(scope="module")
def i2v_model(tmp_path_factory):
    return model_files.write_tiny_checkpoint(tmp_path_factory.mktemp("i2v") / "tiny-i2v", kind="i2v-a14b")


@pytest.fixture(scope="module")
def i2v_prep(i2v_model, synthetic, ray_cluster, tmp_path_factory):
    out = tmp_path_factory.mktemp("i2v_prep")
    run_preprocess(tiny_config(i2v_model), str(synthetic), str(out), log=lambda _: None)
    return out


def test_the_stored_condition_is_the_one_wan_image_to_video_pipeline_builds(i2v_model, i2v_prep):
    from diffusers import WanImageToVideoPipeline

    pipe = WanImageToVideoPipeline.from_pretrained(i2v_model)
    d = tiny_config(i2v_model).data
    for rec in read_clips(i2v_prep).to_pylist()[:2]:
        row = ClipRow.from_record(rec)
        clip = decode_clip(row.source, BucketSet.from_config(d, KINDS["i2v-a14b"]), d.fps)
        image = torch.from_numpy(clip.frames[0]).permute(2, 0, 1)[None].float() / 127.5 - 1  # what preprocess() gives
        _, condition = pipe.prepare_latents(
            image, 1, 16, row.height, row.width, row.num_frames, torch.float32, torch.device("cpu")
        )
        assert row.condition is not None and row.condition.shape == row.latent.shape
        torch.testing.assert_close(row.condition, condition[0, 4:], atol=1e-5, rtol=1e-5)
        assert torch.equal(first_frame_mask(condition.shape)[:, :, :], condition[:, :4])


def test_i2v_experts_train_on_the_condition_and_export_to_wan_image_to_video(i2v_model, i2v_prep, tmp_path):
    from diffusers import WanImageToVideoPipeline
    from PIL import Image

    from wanray.data.synthetic import SyntheticClip, render
    from wanray.errors import ConfigError
    from wanray.infer.validation import RECORD_FILE, Validation

    run = tmp_path / "run"
    frame = render(SyntheticClip("x", "", 64, 64, 16, 2, "circle", "red", "gray", "left to right"))[0]
    Image.fromarray(frame).save(tmp_path / "first.png")
    # validation with a first frame per prompt, offloaded as the A14B presets have it
    validating = [
        "train.validation.every=30",
        "train.validation.prompts=[a red circle]",
        f"train.validation.images=[{tmp_path / 'first.png'}]",
        "train.validation.num_frames=5",
        "train.validation.num_inference_steps=2",
        "train.validation.offload=true",
    ]
    cfg = tiny_config(
        i2v_model,
        "train.workers=1",
        "train.steps=30",
        "train.checkpoint_every=30",
        "train.lr=3e-3",
        "train.log_every=1",
        "train.caption_dropout=0.0",
        *validating,
    )
    with pytest.raises(ConfigError, match="train.validation: Wan2.2-I2V-A14B needs an image"):
        Validation(tiny_config(i2v_model, *validating[:2]), i2v_model)
    with pytest.raises(ConfigError, match="train.validation.images holds 1 images for 2 prompts"):
        Validation(tiny_config(i2v_model, *validating, "train.validation.prompts=[a, b]"), i2v_model)
    train_experts(cfg, "high", i2v_prep, run, log=lambda _: None, validation=Validation(cfg, i2v_model))
    (record,) = [json.loads(line) for line in (run / "high" / "validation" / RECORD_FILE).read_text().splitlines()]
    assert record["step"] == 30 and "error" not in record
    import av

    with av.open(record["videos"][0]) as container:
        assert sum(1 for _ in container.decode(video=0)) == 5
    losses = [m["loss"] for m in metrics(run)]
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5, losses
    out = export_run(cfg, run, tmp_path / "export", log=lambda _: None)
    pipe = WanImageToVideoPipeline.from_pretrained(out)
    base = WanImageToVideoPipeline.from_pretrained(i2v_model)
    assert pipe.transformer.config.in_channels == 36 and pipe.config.boundary_ratio == 0.9
    assert not torch.equal(pipe.transformer.proj_out.weight, base.transformer.proj_out.weight)  # trained
    assert torch.equal(pipe.transformer_2.proj_out.weight, base.transformer_2.proj_out.weight)  # not trained


def test_data_without_the_condition_is_refused_before_any_worker_starts(i2v_model, i2v_prep, tmp_path):
    plain = tmp_path / "plain"
    plain.mkdir()
    for p in shard_paths(i2v_prep):
        pq.write_table(
            pq.read_table(p).drop_columns(["condition", "condition_shape", "condition_dtype"]),
            plain / Path(p).name,
            row_group_size=1,
        )
    shutil.copy(i2v_prep / "empty_prompt.parquet", plain)
    with pytest.raises(DataError, match="holds no first-frame condition for Wan2.2-I2V-A14B"):
        make_trainer(tiny_config(i2v_model), "high", plain, tmp_path / "run")


def test_generate_renders_image_to_video_from_a_jsonl_of_images_with_wan_image_to_video_frames(
    i2v_model, ray_cluster, tmp_path
):
    import base64
    import json
    import subprocess
    import sys

    import numpy as np
    from conftest import ROOT
    from PIL import Image
    from reference import wanpipeline_frames

    from wanray.data.synthetic import SyntheticClip, render
    from wanray.infer.api import GenerateRequest, resolve
    from wanray.wan import KINDS

    frame = render(SyntheticClip("x", "", 64, 64, 16, 2, "square", "blue", "olive", "top to bottom"))[0]
    Image.fromarray(frame).save(tmp_path / "first.jpg")
    line = {"prompt": "a blue square moving down", "image": "first.jpg", "num_frames": 5, "seed": 2}
    (tmp_path / "prompts.jsonl").write_text(json.dumps(line) + "\n")
    out = tmp_path / "videos"
    run = subprocess.run(
        [
            sys.executable,
            str(ROOT / "pipelines" / "generate.py"),
            "--config",
            str(ROOT / "configs" / "tiny.yaml"),
            "--model",
            str(i2v_model),
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
    frames = np.load(out / "00000.npy")
    request = GenerateRequest(**{**line, "image": base64.b64encode((tmp_path / "first.jpg").read_bytes()).decode()})
    params = resolve(request, tiny_config(i2v_model), KINDS["i2v-a14b"])
    ref = wanpipeline_frames(i2v_model, params, 0.9)
    assert frames.shape == (5, 64, 64, 3) and np.abs(frames - ref).max() <= 1e-4
