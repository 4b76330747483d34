"""The console a person reads: the quickstart prints wanray's own lines, each once, and none of Ray's
unless --verbose."""

import json
import math
import re
import subprocess
import sys
from collections import Counter

from conftest import ROOT

OURS = re.compile(r"^(\[(quickstart|preprocess|train(:\w+)?|validate|export|\d+/\d+)\] |  \S)")
RAY = re.compile(r"INFO|WARNING|\(raylet\)|pid=|\.cc:\d+|\.py:\d+ --")


def _run(script: str, *args: str) -> list[str]:
    run = subprocess.run(
        [sys.executable, str(ROOT / "pipelines" / script), *args], capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return [line for line in (run.stdout + run.stderr).splitlines() if line.strip()]


def test_the_quickstart_prints_its_own_lines_once_and_no_ray_lines(tiny_model, ray_cluster, tmp_path):
    lines = _run("quickstart.py", "--out", str(tmp_path / "qs"), "--clips", "8", "--set", f"model.path={tiny_model}")
    assert [line for line in lines if not OURS.match(line)] == []
    assert [line for line, n in Counter(lines).items() if n > 1] == []
    for expected in (
        "[quickstart] 5/5",
        "[train:high] step 20/20",
        "[train:low] step 20/20",
        "[validate] step 20:",
        "[preprocess] done:",
        "[train] held-out loss on ",
        "[train:high] step 10 held-out loss ",
        "[train:low] step 20 held-out loss ",
        "[quickstart] held-out loss, lowest: high-noise expert ",
    ):
        assert any(line.startswith(expected) for line in lines), expected

    # each expert's best.json names its lowest held-out loss of metrics.jsonl; export.py --best takes that step
    from conftest import tiny_config

    from wanray.infer.evaluate import resolve_candidate

    run = tmp_path / "qs" / "run"
    for expert in ("high", "low"):
        records = [json.loads(line) for line in (run / expert / "metrics.jsonl").read_text().splitlines()]
        held = {r["step"]: r["val_loss"] for r in records if "val_loss" in r}
        assert sorted(held) == [10, 20] and all(math.isfinite(v) for v in held.values())
        best = json.loads((run / expert / "best.json").read_text())
        assert best == {"step": min(held, key=held.get), "val_loss": min(held.values())}
    # an evaluation's model RUN:best (wanray.infer.evaluate) is that export
    said: list[str] = []
    ft = resolve_candidate(tiny_config(tiny_model), f"ft={run}:best", tmp_path / "eval", log=said.append)
    step = json.loads((run / "high" / "best.json").read_text())["step"]
    assert f"[export] high-noise expert: step {step} has the lowest held-out loss" in "\n".join(said)
    assert ft.model_dir == tmp_path / "eval" / "models" / "ft" and (ft.model_dir / "model_index.json").is_file()


def test_verbose_brings_rays_own_lines_back(tiny_model, synthetic, ray_cluster, tmp_path):
    """(Without --verbose, none: the quickstart above preprocesses, trains and generates without one Ray line.)"""
    args = ["--data", str(synthetic), "--set", f"model.path={tiny_model}"]
    verbose = _run("preprocess.py", *args, "--out", str(tmp_path / "verbose"), "--verbose")
    assert any(RAY.search(line) for line in verbose) and any(line.startswith("[preprocess] done:") for line in verbose)
