"""Shared fixtures: a tiny Wan2.2 checkpoint, synthetic videos, a real local Ray cluster."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def pytest_collection_modifyitems(items) -> None:
    """tests/test_integration_*.py start Ray, Ray Train or Serve, or run a pipeline: marked `integration`, so
    `pytest -m "not integration"` runs the fast unit tests alone."""
    for item in items:
        if item.path.name.startswith("test_integration_"):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    from wanray.model_files import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("model") / "tiny-wan2.2")


@pytest.fixture(scope="session")
def synthetic(tmp_path_factory) -> Path:
    """data.txt of 8 synthetic captioned mp4 clips (varied size, fps and length)."""
    from wanray.data.synthetic import write_dataset

    return write_dataset(tmp_path_factory.mktemp("synthetic"), count=8, seed=1)


@pytest.fixture(scope="session")
def t2v_prep(tiny_model, synthetic, ray_cluster, tmp_path_factory) -> Path:
    """The `synthetic` clips preprocessed for `tiny_model` (configs/tiny.yaml): the training and validation tests
    read it, none writes into it."""
    from wanray.data.preprocess import run_preprocess

    out = tmp_path_factory.mktemp("t2v_prep")
    run_preprocess(tiny_config(tiny_model), str(synthetic), str(out), log=lambda _: None)
    return out


@pytest.fixture(scope="session")
def quickstart(ray_cluster, tmp_path_factory) -> tuple[list[str], Path, Path]:
    """pipelines/quickstart.py run once as the README's first command runs it (configs/tiny.yaml: the tiny model
    pretrained on the shapes, written on first use; 16 clips; 20 steps): its console lines, its --out directory
    and the model it wrote."""
    root = tmp_path_factory.mktemp("quickstart")
    model, out = root / "tiny-shapes", root / "qs"
    return run_pipeline("quickstart.py", "--out", str(out), "--set", f"model.path={model}"), out, model


def run_pipeline(script: str, *args: str) -> list[str]:
    """Run pipelines/SCRIPT in a subprocess (a driver of its own, joining the test's Ray through RAY_ADDRESS);
    its non-blank console lines."""
    run = subprocess.run(
        [sys.executable, str(ROOT / "pipelines" / script), *args], capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return [line for line in (run.stdout + run.stderr).splitlines() if line.strip()]


def chromium(playwright):
    """The system's headless Chromium as scripts/screenshot.py drives it (its flags: quiet and offline)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("screenshot", ROOT / "scripts" / "screenshot.py")
    assert spec is not None and spec.loader is not None
    screenshot = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(screenshot)
    return playwright.chromium.launch(executable_path=screenshot.find_browser(), args=screenshot.FLAGS)


def tiny_config(model: Path, *overrides: str):
    """configs/tiny.yaml on `model`, at the learning rate of a random-init tiny model (the tests' own): 1e-3,
    not the 1e-4 that fine-tunes the pretrained one."""
    from wanray.config import load_config

    return load_config(ROOT / "configs" / "tiny.yaml", [f"model.path={model}", "train.lr=1e-3", *overrides])


@pytest.fixture(scope="session")
def s3():
    """A real S3-compatible server on loopback (moto's server mode: boto3, pyarrow and Ray workers speak HTTP to
    it), found through the standard AWS_* variables, which it sets in this process before Ray starts (the
    workers inherit them). Yields a boto3 client; each test makes its own bucket."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {
        "AWS_ACCESS_KEY_ID": "wanray-test",
        "AWS_SECRET_ACCESS_KEY": "wanray-test",
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    before = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield boto3.client("s3")
    for k, v in before.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    server.stop()


@pytest.fixture(scope="session")
def ray_cluster(s3):
    """A real local Ray instance (2 CPUs), joined by subprocess drivers through RAY_ADDRESS; its workers reach
    the `s3` server.

    Started with ray.init rather than `ray start`, so shutdown stops only this instance. It also
    declares 2 GPUs and 2 NPUs that do not exist: Ray hands out their ids and sets the visible-device
    variables as on a real accelerator node (nothing that runs on CPU asks for them).
    """
    import ray

    from wanray.runtime import connect_ray

    # Ray Train V2's controller polls its workers every 2 s and registers a reported checkpoint only
    # then; the tiny model's steps take 0.1 s, so the kill-and-resume test wants it sooner.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    # the drivers' settings (connect_ray), with Ray's own lines shown in the test output
    connect_ray(
        verbose=True,
        num_cpus=2,
        num_gpus=2,
        resources={"NPU": 2},
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
    )
    address = ray.get_runtime_context().gcs_address
    os.environ["RAY_ADDRESS"] = address
    yield address
    os.environ.pop("RAY_ADDRESS", None)
    ray.shutdown()


def driver_plan(script: str, *argv: str) -> tuple[int, str]:
    """pipelines/<script>.py run with `--plan` in this process (its memory plans are cached here, where a new
    process would build them again): (the exit status main gives, what it printed)."""
    import contextlib
    import importlib
    import io
    import sys
    from unittest import mock

    module = importlib.import_module(f"pipelines.{script}")
    out = io.StringIO()
    argv_of = mock.patch.object(sys, "argv", [f"{script}.py", "--plan", *argv])
    with argv_of, contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exited:
        module.main(module.get_args())
    return exited.value.code, out.getvalue()
