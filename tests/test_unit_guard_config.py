"""platform/ guard, config loading and overrides, devices."""

import subprocess
import sys

import pytest
from conftest import ROOT

from wanray.config import load_config, parse_override
from wanray.devices import accelerator
from wanray.errors import ConfigError
from wanray.sections import Resources


def test_platform_dir_never_shadows_stdlib_platform():
    assert not (ROOT / "platform" / "__init__.py").exists()
    code = "import platform, torch, ray; platform.python_version(); print(platform.__file__)"
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": f"{ROOT}:{ROOT / 'platform'}", "PATH": ""},
    )
    assert out.returncode == 0, out.stderr
    assert not out.stdout.strip().startswith(str(ROOT / "platform")), out.stdout


@pytest.mark.parametrize("preset", ["tiny.yaml", "t2v_a14b.yaml"])
def test_presets_load(preset):
    cfg = load_config(ROOT / "configs" / preset)
    assert cfg.data.num_frames % 4 == 1 and cfg.model.boundary is None  # the model directory's boundary_ratio


def test_a14b_preset_has_the_published_numbers():
    cfg = load_config(ROOT / "configs" / "t2v_a14b.yaml")
    assert (cfg.data.height, cfg.data.width, cfg.data.num_frames, cfg.data.fps) == (480, 832, 81, 16.0)


def test_overrides_are_typed_and_win_over_the_file():
    cfg = load_config(
        ROOT / "configs" / "tiny.yaml", ["data.fps=24", "preprocess.encoders.dtype=bfloat16", "model.path=/x y"]
    )
    assert cfg.data.fps == 24.0 and isinstance(cfg.data.fps, float)
    assert cfg.preprocess.encoders.dtype == "bfloat16" and cfg.model.path == "/x y"
    assert parse_override("a.b=[1, 2]") == {"a": {"b": [1, 2]}}


@pytest.mark.parametrize(
    "override,message",
    [
        ("data.fpz=3", "unknown config key 'data.fpz'"),
        ("modle.path=x", "unknown config key 'modle'"),
        ("data.num_frames=16", "4n+1"),
        ("data.height=-8", "must be positive"),
        ("data.fps=fast", "expected float"),
        ("train.worker.device=tpu", "train.worker.device: expected one of cpu, cuda, npu, got 'tpu'"),
        ("infer.stages.vae.dtype=fp8", "expected one of float32, bfloat16"),
        ("train.lr_schedule=linear", "expected one of constant, cosine"),
        ("train.param_dtype=bfloat16", "'train.param_dtype' was removed: use train.worker.dtype"),
        ("infer.high_cpus=2", "'infer.high_cpus' was removed: use infer.stages.high.cpus"),
        ("preprocess.device=npu", "'preprocess.device' was removed: use preprocess.encoders.device"),
        ("infer.device=npu", "each stage has its own: infer.stages"),
        ("infer.high_devices=2", "'infer.high_devices' was removed: use infer.stages.high.devices"),
        (
            "infer.replicas.low=2",
            "'infer.replicas' was removed: each stage has its own: infer.stages.{text,high,low,vae}",
        ),
        ("infer.max_replicas.low=4", "'infer.max_replicas' was removed"),
        ("infer.stages.text.devices=2", "infer.stages.text.devices must be 1, got 2: only the expert stages split"),
        ("infer.stages.low.replicas=2", None),
        ("infer.stages.low.replicas=0", "infer.stages.low.replicas must be >= 1 and .max_replicas 0 or >= it"),
        ("preprocess.vae_actors=0", "preprocess.clips_per_decode_task, vae_actors, vae_batch_size"),
        ("preprocess.encoders.cpus=-1", "preprocess.encoders.cpus and .accelerators must be >= 0, got -1.0"),
        ("infer.stages.high.accelerators=-1", "infer.stages.high.cpus and .accelerators must be >= 0"),
        ("train.validation.worker.cpus=-2", "train.validation.worker.cpus and .accelerators must be >= 0"),
        ("train.lora.rank=0", "train.lora needs rank >= 1, alpha > 0 and target_modules, got rank 0"),
        ("nokey", "key=value"),
    ],
)
def test_bad_config_is_a_clear_error(override, message):
    if message is None:  # the one that works, beside its refused neighbours
        assert load_config(ROOT / "configs" / "tiny.yaml", [override]).infer.stages.low.replicas == 2
        return
    with pytest.raises(ConfigError, match=message.replace("+", r"\+").replace("{", r"\{").replace("}", r"\}")):
        load_config(ROOT / "configs" / "tiny.yaml", [override])


def test_every_section_checks_itself_when_made_or_replaced():
    """A section's own check runs in __post_init__: on load, and on a dataclasses.replace too."""
    import dataclasses

    from wanray.sections import ContextParallel, InferConfig, TrainConfig

    cfg = load_config(ROOT / "configs" / "tiny.yaml")
    with pytest.raises(ConfigError, match="must lie in \\[1, infer.max_steps\\]"):
        dataclasses.replace(cfg.infer, num_inference_steps=0)
    with pytest.raises(ConfigError, match=r"ulysses x ring = 3 must divide train.workers \(2\)"):
        dataclasses.replace(cfg.train, context_parallel=ContextParallel(ring=3))
    with pytest.raises(ConfigError, match="data.min_frames must not exceed data.num_frames"):
        dataclasses.replace(cfg.data, min_frames=cfg.data.num_frames + 4)
    assert InferConfig().num_inference_steps == 40 and TrainConfig().workers == 1  # the defaults pass their checks


def test_unknown_key_in_file_is_an_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  height: 64\n  hieght: 32\n")
    with pytest.raises(ConfigError, match="data.hieght"):
        load_config(bad)


def test_devices():
    assert accelerator("cpu").dist_backend == "gloo"
    assert Resources("cuda", cpus=1, accelerators=1).ray_options() == {"num_cpus": 1, "num_gpus": 1}
    assert Resources("npu", cpus=2, accelerators=0.5).ray_options() == {"num_cpus": 2, "resources": {"NPU": 0.5}}
    assert Resources("cpu", cpus=0.5, accelerators=1).ray_options() == {"num_cpus": 0.5}
    with pytest.raises(ValueError, match="unknown device"):
        accelerator("tpu")


def test_shards_of_several_clips_per_row_group_are_read_with_a_warning():
    """An earlier wanray's shards (several clips per Parquet row group) train, with the warning that says why
    they read slowly; this one's (one clip per row group) say nothing."""
    from wanray.compat import row_group_warning

    assert row_group_warning("data/x", 1) is None
    assert row_group_warning("data/x", 3).startswith(
        "[train] warning: the shards in data/x hold up to 3 clips per Parquet row group"
    )
