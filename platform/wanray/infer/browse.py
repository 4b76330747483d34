"""What the UI's Runs, Data and Evaluate pages read: training runs, preprocessed directories and evaluations
under configured roots.

    ui.runs_roots ─► runs: directories whose <expert>/ holds RUN_FILE ─► metrics.jsonl, config.yaml,
                                                                        validation/validations.jsonl + videos
    ui.data_roots ─► preprocessed directories (summary.json) ─► summary, rejects.jsonl, a page of clips,
                                                                 one clip's stored latent (previewed by the VAE)
    ui.runs_roots ─► evaluations (evaluate.py --out: metrics.json + report.html) ─► means, videos side by side

A root may be a local directory or a URI of an object store (s3://runs/team-a), read through
wanray.storage. Every path comes from a browser, so each is resolved (symlinks followed; a URI's `..`
folded away) and must lie inside one of the resolved roots; a path outside them, or a file that
resolves outside them, is a RequestError. Listings look a few directories deep (MAX_DEPTH), skip
checkpoints and do not follow symlinks, so a large root stays cheap.
"""

from __future__ import annotations

import dataclasses
import json
import os
import posixpath
from dataclasses import dataclass
from pathlib import Path

import torch

from wanray import storage
from wanray.config import Config
from wanray.data.shards import shard_paths
from wanray.errors import RequestError
from wanray.infer.scores import comparable
from wanray.infer.validation import PROMPTS_FILE, RECORD_FILE
from wanray.schema import decode_tensor
from wanray.train.runs import CONFIG_FILE, RUN_FILE, trained_experts
from wanray.wan import EXPERTS

MAX_DEPTH = 3
"""Directories below a root a run or preprocessed directory may sit at (root/a/b/c)."""
SUMMARY_FILE, REJECTS_FILE = "summary.json", "rejects.jsonl"
REPORT_FILES = ("metrics.json", "report.html")
"""What makes a directory an evaluation (wanray.infer.evaluate writes both)."""
CLIP_COLUMNS = [
    "id",
    "caption",
    "bucket",
    "num_frames",
    "height",
    "width",
    "source",
    "cut_start",
    "cut_end",
    "motion",
    "aesthetic",
    "caption_model",
    "latent_shape",
]
"""What the Data tab lists of each clip (a shard of schema 1 or 2 lacks the curation columns: left out)."""
SKIP = ("checkpoint_", "data_order", "tensorboard", "validation", "videos")


class Roots:
    """The directories a page may read under; every path it is given is checked against them."""

    def __init__(self, roots: list[str], setting: str):
        self.roots = [_resolved(r) for r in roots]
        self.setting = setting

    def check(self, path: str | os.PathLike) -> str:
        """`path` resolved; a RequestError when it resolves outside every root (a `..` or a symlink out)."""
        resolved = _resolved(path)
        if storage.is_uri(resolved) and "%" in resolved:  # pyarrow decodes %2E%2E to .. for some stores
            raise RequestError(f"{path}: a percent-encoded path is not read")
        if not any(resolved == r or resolved.startswith(r.rstrip("/") + "/") for r in self.roots):
            raise RequestError(f"{path} is outside {self.setting} ({', '.join(self.roots)})")
        return resolved

    def find(self, is_match) -> list[str]:
        """Directories under the roots (at most MAX_DEPTH deep, symlinks not followed) that `is_match`."""
        found: list[str] = []

        def walk(directory: str, depth: int) -> None:
            try:
                subs = storage.list_dirs(directory)
            except OSError:  # a directory this process may not read is left out, as os.walk leaves it
                return
            for sub in subs:
                if storage.name(sub).startswith(SKIP) or (not storage.is_uri(sub) and os.path.islink(sub)):
                    continue
                try:
                    matched = is_match(sub)
                except OSError:
                    continue
                if matched:
                    found.append(sub)
                elif depth + 1 < MAX_DEPTH:
                    walk(sub, depth + 1)

        for root in self.roots:
            walk(root, 0)
        return sorted(found)


def _resolved(path: str | os.PathLike) -> str:
    """A local path resolved (symlinks followed); a URI with its `.` and `..` parts folded away."""
    text = str(path)
    if not storage.is_uri(text):
        return str(Path(text).resolve())
    scheme, rest = text.split("://", 1)
    return f"{scheme}://{posixpath.normpath(rest)}"


def _records(path: str) -> list[dict]:
    """A .jsonl file's records; a line cut short (the writer is mid-append) is left for the next read."""
    if not storage.is_file(path):
        return []
    out = []
    for line in storage.read_text(path).splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


@dataclass
class RunView:
    """One training run directory (train.py --out): an <expert>/ per trained expert."""

    roots: Roots
    path: str

    @classmethod
    def open(cls, roots: Roots, path: str) -> RunView:
        run = roots.check(path)
        if not _is_run(run):
            raise RequestError(f"{path} is not a training run (no <expert>/{RUN_FILE})")
        return cls(roots, run)

    @property
    def experts(self) -> list[str]:
        return trained_experts(self.path)

    def metrics(self) -> list[dict]:
        """Every logged step of every expert (metrics.jsonl), each with its expert."""
        return [{**r, "expert": e} for e in self.experts for r in _records(storage.join(self.path, e, "metrics.jsonl"))]

    def config(self) -> str:
        """Each expert's resolved config (config.yaml), under a heading per expert."""
        parts = []
        for e in self.experts:
            f = self.roots.check(storage.join(self.path, e, CONFIG_FILE))
            text = storage.read_text(f) if storage.is_file(f) else "(none recorded)\n"
            parts.append(f"# {e}-noise expert\n{text}")
        return "\n".join(parts)

    def planned_steps(self) -> int:
        """The most train.steps any expert's config.yaml plans (0 where none is recorded)."""
        import yaml

        planned = [0]
        for e in self.experts:
            f = self.roots.check(storage.join(self.path, e, CONFIG_FILE))
            if storage.is_file(f):
                config = yaml.safe_load(storage.read_text(f)) or {}
                planned.append(int((config.get("train") or {}).get("steps") or 0))
        return max(planned)

    def scores(self) -> list[dict]:
        """Each rendered validation's scores (wanray.infer.scores; the mean over its prompts), by step then
        expert: {"step", "expert", score: value, ...}."""
        out = [
            {"step": int(r["step"]), "expert": e, **comparable(r.get("scores_mean", {}), r.get("scores_version"))}
            for e in self.experts
            for r in _records(storage.join(self.path, e, "validation", RECORD_FILE))
            if "error" not in r
        ]
        return sorted(out, key=lambda r: (r["step"], EXPERTS.index(r["expert"])))

    def validations(self) -> list[tuple[str, int, list[tuple[str, str]]]]:
        """(expert, step, [(video, prompt), ...]) of every rendered validation, by step then expert."""
        out = []
        for e in self.experts:
            for record in _records(storage.join(self.path, e, "validation", RECORD_FILE)):
                if "error" in record:  # a validation that failed rendered nothing
                    continue
                videos = [self.roots.check(v) for v in record["videos"]]
                prompts: list[str] = []
                if videos and storage.is_file(
                    f := self.roots.check(storage.join(storage.parent(videos[0]), PROMPTS_FILE))
                ):
                    prompts = json.loads(storage.read_text(f))
                prompts += [""] * (len(videos) - len(prompts))
                out.append((e, int(record["step"]), list(zip(videos, prompts))))
        return sorted(out, key=lambda v: (v[1], EXPERTS.index(v[0])))


@dataclass
class DataView:
    """One preprocessed directory (preprocess.py --out)."""

    roots: Roots
    path: str

    @classmethod
    def open(cls, roots: Roots, path: str) -> DataView:
        data = roots.check(path)
        if not _is_data(data):
            raise RequestError(f"{path} is not a preprocessed directory (no {SUMMARY_FILE})")
        return cls(roots, data)

    def summary(self) -> dict:
        return json.loads(storage.read_text(self.roots.check(storage.join(self.path, SUMMARY_FILE))))

    def rejects(self) -> list[dict]:
        return _records(self.roots.check(storage.join(self.path, REJECTS_FILE)))

    def _shards(self) -> list[str]:
        return [self.roots.check(p) for p in shard_paths(self.path)]

    def clips(self, page: int, per_page: int) -> tuple[list[dict], int]:
        """Page `page` (from 0) of the clips' metadata, in shard order; and the number of clips."""
        rows = []
        for p in self._shards():
            names = storage.read_schema(p).names
            rows += storage.read_table(p, columns=[c for c in CLIP_COLUMNS if c in names]).to_pylist()
        return rows[page * per_page : (page + 1) * per_page], len(rows)

    def latent(self, clip_id: str) -> torch.Tensor:
        """The stored (normalised) latent of clip `clip_id`: (C, latent frames, H/8, W/8)."""
        for p in self._shards():
            table = storage.read_table(
                p, columns=["id", "latent", "latent_shape", "latent_dtype"], filters=[("id", "=", clip_id)]
            )
            if table.num_rows:
                row = table.slice(0, 1).to_pylist()[0]
                return decode_tensor(row["latent"], row["latent_shape"], row["latent_dtype"])
        raise RequestError(f"no clip {clip_id!r} in {self.path}")


def _is_run(d: str) -> bool:
    return bool(trained_experts(d))


def _is_data(d: str) -> bool:
    return storage.is_file(storage.join(d, SUMMARY_FILE))


@dataclass
class ReportView:
    """One evaluation directory (pipelines/evaluate.py --out; wanray.infer.evaluate)."""

    roots: Roots
    path: str
    results: dict

    @classmethod
    def open(cls, roots: Roots, path: str) -> ReportView:
        report = roots.check(path)
        if not _is_report(report):
            raise RequestError(f"{path} is not an evaluation (no {REPORT_FILES[0]} and {REPORT_FILES[1]})")
        return cls(roots, report, json.loads(storage.read_text(storage.join(report, REPORT_FILES[0]))))

    def means(self) -> list[dict]:
        """A row per model: its name, where it came from, each score's mean."""
        return [
            {"model": name, "source": r["source"], **comparable(r["mean"], r.get("scores_version"))}
            for name, r in self.results.items()
        ]

    def videos(self) -> list[tuple[str, str]]:
        """(video, caption) a row per prompt, its models side by side in the evaluation's order."""
        names = list(self.results)
        out = []
        for i, first in enumerate(self.results[names[0]]["prompts"] if names else []):
            for name in names:
                p = self.results[name]["prompts"][i]
                video = self.roots.check(storage.join(self.path, p["video"]))
                out.append((video, f"{name} · {first['prompt'][:60]}"))
        return out


def _is_report(d: str) -> bool:
    return all(storage.is_file(storage.join(d, f)) for f in REPORT_FILES)


def list_reports(roots: Roots) -> list[str]:
    return roots.find(_is_report)


def list_runs(roots: Roots) -> list[str]:
    return roots.find(_is_run)


def list_datasets(roots: Roots) -> list[str]:
    return roots.find(_is_data)


def absolute_roots(cfg: Config) -> Config:
    """cfg with ui.runs_roots and ui.data_roots absolute (relative ones: to this process's working directory)."""
    ui = cfg.ui
    absolute = lambda roots: [storage.absolute(r) for r in roots]
    return dataclasses.replace(
        cfg, ui=dataclasses.replace(ui, runs_roots=absolute(ui.runs_roots), data_roots=absolute(ui.data_roots))
    )
