"""Is the fine-tune better? Every model renders every prompt of one file with the same seeds (the batch path),
every video is scored (wanray.infer.scores), and DIR gets:

    DIR/metrics.json        per model: where it came from, each score's mean, and each prompt's scores and video
    DIR/report.html         the means as a table, then a row per prompt with every model's video side by side
    DIR/videos/<model>/     the videos (report.html links them relatively: any static file server shows DIR)

A model is `NAME=SPEC` or `SPEC` (named after its last path part): a diffusers-format model directory, a
wanray run directory (train.py --out; its latest checkpoints, or `RUN:best` for those of the lowest held-out
loss, exported into DIR/models/<name> against model.path), or `BASE+ADAPTER`: a model directory with an
adapter (any infer.loras source: a LoRA run, an export, an adapter file) applied to every prompt at scale 1.
Runs, adapters, the prompt file and DIR may be URIs of an object store; a model directory is local. The actors
write the videos straight into DIR and score them where they rendered them; report.html, then metrics.json
come last. A run is exported on the driver (into DIR/models, or a local temporary directory when DIR is a URI),
where the actors must read it.
"""

from __future__ import annotations

import dataclasses
import html
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from wanray import models, storage
from wanray.config import Config
from wanray.errors import ConfigError
from wanray.infer.batch import generate_videos, prompt_lines, read_prompts
from wanray.infer.scores import SCORES_VERSION, mean_scores
from wanray.sections import LoraSource, LoraUse
from wanray.train.runs import trained_experts

ADAPTER = "evaluated"
"""The infer.loras name a `BASE+ADAPTER` model's adapter is served under."""
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


@dataclass(frozen=True)
class Candidate:
    """One model of an evaluation: its name, what the user gave, and how it renders."""

    name: str
    source: str
    model_dir: Path
    adapter: str = ""
    """An infer.loras source applied to every prompt, or none."""


def parse_candidate(text: str) -> tuple[str, str]:
    """(name, spec) of `NAME=SPEC` or `SPEC` (named after the spec's last path part, without ':best')."""
    name, sep, spec = text.partition("=")
    if spec.endswith("+") or text.endswith("+"):
        raise ConfigError(f"--models {text!r}: nothing after '+' (BASE+ADAPTER names an adapter)")
    if not sep:
        spec = text
        name = Path(spec.split("+")[-1].removesuffix(":best").rstrip("/")).name
    if not NAME.fullmatch(name):
        raise ConfigError(f"--models {text!r}: {name!r} is not a model name (letters, digits, _ . -; at most 64)")
    return name, spec


def resolve_candidate(cfg: Config, text: str, work: Path, log=print) -> Candidate:
    """The model `text` names, a run exported under work/models/<name> first."""
    from wanray.train.export import export_run

    name, spec = parse_candidate(text)
    base, plus, adapter = spec.partition("+")
    best = base.endswith(":best")
    location = base.removesuffix(":best")
    local = not storage.is_uri(location)
    if local:
        location = str(Path(location).expanduser())
        if not Path(location).exists():
            raise ConfigError(f"--models {text!r}: {location} does not exist")
    if trained_experts(location):
        if plus:
            raise ConfigError(f"--models {text!r}: an adapter goes on a model directory, not on a run")
        log(f"[evaluate] {name}: exporting the run {location} ({'lowest held-out loss' if best else 'latest'})")
        export_run(cfg, location, work / "models" / name, log=log, best=best)  # `work` is local
        return Candidate(name, text, work / "models" / name)
    if best:
        raise ConfigError(f"--models {text!r}: ':best' takes a run directory (train.py --out), {location} is none")
    if not local or not (Path(location) / "model_index.json").is_file():
        raise ConfigError(
            f"--models {text!r}: {location} is neither a model directory (model_index.json, on local disk) "
            "nor a wanray run directory"
        )
    return Candidate(name, text, Path(location).resolve(), adapter)


def candidate_config(cfg: Config, candidate: Candidate) -> Config:
    """cfg rendering `candidate`: its model directory, and its adapter (if any) served and applied to every
    prompt on top of the config's infer.default_loras. Those apply to every model alike, as the steps and
    guidance do (a distilled adapter that renders in 4 steps, say)."""
    model = dataclasses.replace(cfg.model, path=str(candidate.model_dir), create_tiny=False)
    infer = cfg.infer
    if candidate.adapter:
        infer = dataclasses.replace(
            infer,
            loras={**infer.loras, ADAPTER: LoraSource(path=candidate.adapter)},
            default_loras=[*infer.default_loras, LoraUse(ADAPTER, 1.0)],
        )
    return dataclasses.replace(cfg, model=model, infer=infer)


def evaluate(cfg: Config, models_given: list[str], prompts_file, out_dir, log=print) -> dict:
    """Render and score every model (on the connected Ray); write metrics.json and report.html; the metrics.
    Every model's name and the prompt file are checked before any run is exported."""
    named = [parse_candidate(text)[0] for text in models_given]
    if len(set(named)) != len(named):
        raise ConfigError(f"--models: two models are named alike ({', '.join(named)}): name them NAME=SPEC")
    prompt_lines(prompts_file)
    if not storage.is_uri(out_dir):
        out = Path(out_dir).resolve()
        out.mkdir(parents=True, exist_ok=True)
        results = _evaluate(cfg, models_given, prompts_file, str(out), out, log)
    else:
        work = Path(tempfile.mkdtemp(prefix="wanray-evaluate-"))  # exports of runs
        try:
            results = _evaluate(cfg, models_given, prompts_file, storage.absolute(out_dir), work, log)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    log(f"[evaluate] wrote {storage.join(out_dir, 'metrics.json')} and {storage.join(out_dir, 'report.html')}")
    return results


def _evaluate(cfg: Config, models_given: list[str], prompts_file, out: str, work: Path, log) -> dict:
    """evaluate() into `out` (a local directory or a URI); runs are exported under work/models."""
    candidates = [resolve_candidate(cfg, text, work, log) for text in models_given]
    results: dict = {}
    for c in candidates:
        ccfg = candidate_config(cfg, c)
        params = read_prompts(prompts_file, ccfg, models.expected_kind(ccfg.model))
        log(f"[evaluate] {c.name}: {len(params)} prompts from {c.model_dir}{f' + {c.adapter}' if c.adapter else ''}")
        videos = f"videos/{c.name}"
        rows = generate_videos(ccfg, str(c.model_dir), params, storage.join(out, videos), log=log, score=cfg.eval)
        scored = [
            {"prompt": r["prompt"], "seed": r["seed"], "video": f"{videos}/{r['video']}", **r["scores"]} for r in rows
        ]
        means = mean_scores([r["scores"] for r in rows])
        results[c.name] = {
            "source": c.source,
            "model": str(c.model_dir),
            "adapter": c.adapter,
            "mean": means,
            "prompts": scored,
            "scores_version": SCORES_VERSION,
        }
        log(f"[evaluate] {c.name}: " + ", ".join(f"{k} {v:.4f}" for k, v in means.items()))
    # metrics.json last: with it, the rest is there (an object store has no rename)
    storage.write_bytes(storage.join(out, "report.html"), report_html(results).encode())
    storage.write_json(results, storage.join(out, "metrics.json"))
    return results


def report_html(results: dict) -> str:
    """The report: a table of each model's means, then a row per prompt with every model's video and scores."""
    names = list(results)
    keys = sorted({k for r in results.values() for k in r["mean"]})
    e = html.escape
    head = "".join(f"<th>{e(k)}</th>" for k in keys)
    means = "".join(
        f"<tr><th>{e(n)}</th><td class='src'>{e(results[n]['source'])}</td>"
        + "".join(f"<td>{results[n]['mean'].get(k, float('nan')):.4f}</td>" for k in keys)
        + "</tr>"
        for n in names
    )
    rows = []
    for i, first in enumerate(results[names[0]]["prompts"]):
        cells = []
        for n in names:
            p = results[n]["prompts"][i]
            scores = " · ".join(f"{k} {p[k]:.3f}" for k in keys if k in p)
            cells.append(
                f"<td><video src='{e(p['video'])}' controls loop muted autoplay playsinline></video>"
                f"<div class='scores'>{e(scores)}</div></td>"
            )
        rows.append(f"<tr><th class='prompt'>{e(first['prompt'])}<br>seed {first['seed']}</th>{''.join(cells)}</tr>")
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>wanray evaluation: {e(", ".join(names))}</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; }}
table {{ border-collapse: collapse; margin-bottom: 2em; }}
th, td {{ border: 1px solid #ccc; padding: 0.4em; vertical-align: top; text-align: left; }}
video {{ width: 320px; display: block; background: #000; }}
.scores, .src {{ font-size: 0.8em; color: #444; }}
.prompt {{ max-width: 16em; font-weight: normal; }}
</style></head><body>
<h1>wanray evaluation</h1>
<p>Every model rendered every prompt with the same seed; scores as wanray.infer.scores defines them.</p>
<table id="means"><tr><th>model</th><th>source</th>{head}</tr>{means}</table>
<table id="videos"><tr><th>prompt</th>{"".join(f"<th>{e(n)}</th>" for n in names)}</tr>{"".join(rows)}</table>
</body></html>
"""
