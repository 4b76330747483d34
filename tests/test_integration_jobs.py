"""`ray job submit` of preprocess, train and generate to a cluster started with `ray start --head`."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT

from wanray.runtime import free_port

RAY = [sys.executable, "-m", "ray.scripts.scripts"]


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """`ray start --head --block` with the job server; stopped by terminating that command (then its process group).

    Every port is picked free: another Ray on this machine already holds the default agent ports.
    """
    temp = str(tmp_path_factory.mktemp("rayhead"))
    port, dash = free_port(), free_port()
    # nodes run `python` from the environment Ray was started in, like an activated venv on a cluster
    env = {
        **os.environ,
        "RAY_USAGE_STATS_ENABLED": "0",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    env.pop("RAY_ADDRESS", None)
    log_path = Path(temp) / "ray-start.log"
    # --block: this process owns the cluster; terminating it stops every process it started (Ray's reaper),
    # so the fixture never has to find them by name. A pipe would close under the agent: a file.
    with log_path.open("w") as log:
        head = subprocess.Popen(
            RAY
            + [
                "start",
                "--head",
                "--block",
                f"--port={port}",
                "--num-cpus=2",
                f"--temp-dir={temp}",
                "--node-ip-address=127.0.0.1",
                "--include-dashboard=true",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={dash}",
                f"--dashboard-agent-listen-port={free_port()}",
                f"--dashboard-agent-grpc-port={free_port()}",
                f"--runtime-env-agent-port={free_port()}",
                f"--metrics-export-port={free_port()}",
                "--disable-usage-stats",
            ],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a process group of its own: every Ray process it starts, and nothing else
        )
    try:
        deadline = time.time() + 180
        while "Ray runtime started" not in log_path.read_text():
            assert head.poll() is None and time.time() < deadline, log_path.read_text()[-3000:]
            time.sleep(0.5)
        yield f"http://127.0.0.1:{dash}"
    finally:
        head.terminate()
        try:
            head.wait(timeout=1)
        except subprocess.TimeoutExpired:  # after jobs ran, its graceful stop takes ~30 s: its group goes at once
            os.killpg(head.pid, signal.SIGKILL)
            head.wait(timeout=60)


def submit(address: str, args: list[str], timeout: float = 600) -> str:
    """Submit like a user does, then follow the job through Ray's job API; returns its logs."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    runtime_env = json.dumps({"env_vars": {"PYTHONPATH": "platform", "RAY_USAGE_STATS_ENABLED": "0"}})
    env = {**os.environ, "RAY_AUTH_MODE": "token"}  # the client sends the cluster's token (~/.ray/auth_token)
    cmd = RAY + [
        "job",
        "submit",
        "--address",
        address,
        "--working-dir",
        str(ROOT),
        "--runtime-env-json",
        runtime_env,
        "--no-wait",
        "--",
        "python",
        *args,
    ]
    for _ in range(60):  # a fresh head's job agent takes a few seconds to come up
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
        if "No available agent" not in out.stderr:
            break
        time.sleep(2)
    assert out.returncode == 0, out.stderr[-2000:]
    job_id = re.search(r"raysubmit_[A-Za-z0-9]+", out.stdout + out.stderr).group(0)
    token = os.environ.get("RAY_AUTH_TOKEN") or (Path.home() / ".ray" / "auth_token").read_text().strip()
    client = JobSubmissionClient(address, headers={"Authorization": f"Bearer {token}"})
    deadline = time.time() + timeout
    while client.get_job_status(job_id) not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
        assert time.time() < deadline, f"job {job_id} still running after {timeout}s"
        time.sleep(1)
    logs = client.get_job_logs(job_id)
    assert client.get_job_status(job_id) == JobStatus.SUCCEEDED, logs[-3000:]
    return logs


def test_preprocess_train_generate_as_ray_jobs(head, tiny_model, synthetic, tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)  # another test's cluster: the job client would follow it
    common = ["--config", "configs/tiny.yaml", "--set", f"model.path={tiny_model}"]
    logs = submit(head, ["pipelines/preprocess.py", *common, "--data", str(synthetic), "--out", str(tmp_path / "prep")])
    assert "[preprocess] done: 8 written" in logs
    logs = submit(
        head,
        [
            "pipelines/train.py",
            *common,
            "--data",
            str(tmp_path / "prep"),
            "--expert",
            "low",
            "--out",
            str(tmp_path / "run"),
            "--set",
            "train.steps=4",
            "--set",
            "train.log_every=2",
        ],
    )
    assert "[train:low] step 4/4" in logs and "low-noise expert: latest checkpoint" in logs
    (tmp_path / "prompts.txt").write_text("a red circle\n\na blue square moving up\n")
    logs = submit(
        head,
        [
            "pipelines/generate.py",
            *common,
            "--prompts",
            str(tmp_path / "prompts.txt"),
            "--out",
            str(tmp_path / "videos"),
            "--set",
            "infer.num_inference_steps=2",
        ],
    )
    videos = sorted(p.name for p in (tmp_path / "videos").glob("*.mp4"))
    assert videos == ["00000.mp4", "00001.mp4"], logs[-2000:]
    assert all((tmp_path / "videos" / v).stat().st_size > 0 for v in videos)
