"""The console a person reads: the quickstart prints wanray's own lines, each once, and none of Ray's
unless --verbose."""

import json
import math
import re
from collections import Counter

from conftest import run_pipeline

OURS = re.compile(r"^(\[(quickstart|preprocess|train(:\w+)?|validate|export|\d+/\d+)\] |  \S)")
RAY = re.compile(r"INFO|WARNING|\(raylet\)|pid=|\.cc:\d+|\.py:\d+ --")


def test_the_quickstart_prints_its_own_lines_once_and_no_ray_lines(quickstart, tmp_path):
    lines, out, model = quickstart
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

    run = out / "run"
    for expert in ("high", "low"):
        records = [json.loads(line) for line in (run / expert / "metrics.jsonl").read_text().splitlines()]
        held = {r["step"]: r["val_loss"] for r in records if "val_loss" in r}
        assert sorted(held) == [10, 20] and all(math.isfinite(v) for v in held.values())
        best = json.loads((run / expert / "best.json").read_text())
        assert best == {"step": min(held, key=held.get), "val_loss": min(held.values())}
    # an evaluation's model RUN:best (wanray.infer.evaluate) is that export
    said: list[str] = []
    ft = resolve_candidate(tiny_config(model), f"ft={run}:best", tmp_path / "eval", log=said.append)
    step = json.loads((run / "high" / "best.json").read_text())["step"]
    assert f"[export] high-noise expert: step {step} has the lowest held-out loss" in "\n".join(said)
    assert ft.model_dir == tmp_path / "eval" / "models" / "ft" and (ft.model_dir / "model_index.json").is_file()


def test_verbose_brings_rays_own_lines_back(tiny_model, synthetic, ray_cluster, tmp_path):
    """(Without --verbose, none: the quickstart above preprocesses, trains and generates without one Ray line.)"""
    args = ["--data", str(synthetic), "--set", f"model.path={tiny_model}"]
    verbose = run_pipeline("preprocess.py", *args, "--out", str(tmp_path / "verbose"), "--verbose")
    assert any(RAY.search(line) for line in verbose) and any(line.startswith("[preprocess] done:") for line in verbose)
