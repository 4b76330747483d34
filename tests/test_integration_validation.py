"""Validation videos while training, on a real local Ray: an actor beside the workers renders the
validation prompts from each validation step's checkpoint, and the workers do not wait for it."""

import io
import json

import av
import pytest
from conftest import tiny_config
from test_integration_train import FAST, metrics

from wanray.errors import ConfigError
from wanray.infer.validation import RECORD_FILE, Validation
from wanray.model_files import write_tiny_clip
from wanray.train.trainer import train_experts


@pytest.fixture(scope="module")
def val_prep(t2v_prep):
    return t2v_prep


def test_validation_videos_of_every_checkpoint_step_land_beside_training(tiny_model, val_prep, tmp_path):
    """Every prompt also applies a served adapter (infer.default_loras): the expert under training takes each
    checkpoint's weights beneath it."""
    from reference import tiny_adapter
    from safetensors.torch import save_file

    save_file(tiny_adapter(tiny_model, "high", 9), tmp_path / "adapter.safetensors")
    cfg = tiny_config(
        tiny_model,
        f"infer.loras.a={tmp_path / 'adapter.safetensors'}",
        "infer.default_loras=[{name: a, scale: 0.5}]",
        *FAST,
        "train.workers=1",
        "train.steps=10",
        "train.checkpoint_every=5",
        "train.validation.every=5",
        "train.validation.prompts=[a red circle, a blue square]",
        "train.validation.num_frames=9",
        "train.validation.num_inference_steps=3",
        f"eval.clip_model={write_tiny_clip(tmp_path / 'clip')}",
    )
    run = tmp_path / "run"
    lines = []
    train_experts(cfg, "high", val_prep, run, log=lines.append, validation=Validation(cfg, tiny_model))
    records = [json.loads(line) for line in (run / "high" / "validation" / RECORD_FILE).read_text().splitlines()]
    assert [r["step"] for r in records] == [5, 10] and not any("error" in r for r in records), records
    for step in (5, 10):
        out = run / "high" / "validation" / f"step_{step}"
        assert json.loads((out / "prompts.json").read_text()) == ["a red circle", "a blue square"]
        for name in ("00.mp4", "01.mp4"):
            with av.open(str(out / name)) as container:
                assert sum(1 for _ in container.decode(video=0)) == 9
    assert any("[validate] step 10: 2 videos" in line for line in lines)
    # every video scored (wanray.infer.scores), and each score's mean over the step's videos
    scored = {"motion", "sharpness", "clip_score", "temporal_consistency"}
    assert all(len(r["scores"]) == 2 and all(set(v) == scored for v in r["scores"]) for r in records)
    assert records[0]["scores_mean"]["motion"] == pytest.approx(sum(v["motion"] for v in records[0]["scores"]) / 2)
    # the render of step 5 took longer than the training step after it: the workers did not wait for it
    times = {m["step"]: m["time"] for m in metrics(run)}
    assert times[6] - times[5] < records[0]["seconds"], (times, records[0])
    assert records[0]["started"] < times[10]  # it rendered while training went on

    # the tracker: every logged loss, the config, and each validation video (an animated GIF) at its step
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "high" / "tensorboard"), size_guidance={"images": 0, "scalars": 0}).Reload()
    losses = {e.step: e.value for e in events.Scalars("train/loss")}
    assert losses == pytest.approx({m["step"]: m["loss"] for m in metrics(run)})
    assert [e.step for e in events.Images("validation/01")] == [5, 10]
    for name in scored:
        assert [e.step for e in events.Scalars(f"validation/{name}")] == [5, 10], name
    gif = events.Images("validation/00")[0]
    assert gif.encoded_image_string[:6] == b"GIF89a" and (gif.height, gif.width) == (64, 64)
    from PIL import Image

    assert Image.open(io.BytesIO(gif.encoded_image_string)).n_frames == 9
    assert {"config/text_summary", "validation/prompts/text_summary"} <= set(events.Tags()["tensors"])


def test_validation_settings_that_cannot_work_fail_before_training(tiny_model, val_prep, tmp_path):
    with pytest.raises(ConfigError, match=r"train.validation.every \(3\) must be 0 \(off\) or a multiple of"):
        tiny_config(tiny_model, "train.validation.every=3", "train.validation.prompts=[x]")
    with pytest.raises(ConfigError, match="there are no prompts"):
        tiny_config(tiny_model, "train.validation.every=10")
    cfg = tiny_config(tiny_model, "train.validation.every=10", "train.validation.prompts=[x]")
    with pytest.raises(ConfigError, match="pass a Validation"):
        train_experts(cfg, "high", val_prep, tmp_path / "run", log=lambda _: None)
    with pytest.raises(ConfigError, match="train.validation: height must be a multiple of 16"):
        Validation(
            tiny_config(
                tiny_model, "train.validation.every=10", "train.validation.prompts=[x]", "train.validation.height=40"
            ),
            tiny_model,
        )
