"""The preprocessing job on Ray Data: manifest -> decode -> VAE -> UMT5 -> Parquet shards.

    read manifest (driver) -> with data.max_clip_seconds / data.dedup, split long videos into clips and reject
      near duplicates (wanray.data.curate)
      -> with caption.model, caption the clips without one (wanray.data.caption)
      -> skip clips already written or rejected (resume)
      -> decode: CPU tasks (video.decode_source), clips_per_decode_task clips each; rejects recorded where they happen
      -> with data.aesthetic_model, AestheticScorer actor pool (the `aesthetic` column)
      -> LatentEncoder actor pool (VAE; NPU / GPU / CPU per config)
      -> TextEncoder actor pool (UMT5)
      -> write_shard tasks: rows_per_shard clips per atomically written shard

Everything here runs on the Ray the driver connected to (wanray.runtime.connect_ray).
`run_preprocess` starts the encoder actor pools inside the run, so each run pays for their
processes starting and loading the models. A `Preprocessor` loads the same encoders once, as
actors kept until it closes, and each of its runs hands batches to them from Ray Data tasks:
for many runs from one driver (incremental ingestion, many small manifests).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import ray

from wanray import model_files, models, storage
from wanray.buckets import BucketSet
from wanray.config import Config
from wanray.data.aesthetic import AestheticScorer
from wanray.data.caption import caption_clips
from wanray.data.curate import Curated, curate_sources
from wanray.data.encode import LatentEncoder, TextEncoder
from wanray.data.manifest import ClipSource, read_manifest
from wanray.data.shards import (
    EMPTY_PROMPT_FILE,
    bucket_counts,
    collect_rejects,
    forget_retried,
    record_reject,
    rejected_keys,
    shard_paths,
    write_shard,
    written_ids,
)
from wanray.data.video import decode_source
from wanray.errors import ConfigError, DataError
from wanray.schema import check_version
from wanray.wan import ModelKind


def _empty_prompt_task(model_path: str, device: str, dtype: str, out_dir: str) -> None:
    TextEncoder(model_path, device, dtype, empty_prompt_dir=out_dir)


def _check_settings(cfg: Config, out_dir: str) -> None:
    """An output directory holds clips of one model and one data setting; mixing them is an error."""
    settings = {
        "model": str(Path(cfg.model.path).resolve()),
        "data": dataclasses.asdict(cfg.data),
        "dtype": cfg.preprocess.encoders.dtype,
    }
    if cfg.caption.model:  # what makes a caption; not where or how many captioners run
        c = cfg.caption
        settings["caption"] = {
            "model": storage.absolute(c.model),
            **{k: getattr(c, k) for k in ("overwrite", "prompt", "frames", "size", "max_new_tokens")},
        }
    for shard in shard_paths(out_dir)[:1]:  # every shard of a directory is written by one wanray
        try:
            check_version(storage.read_schema(shard), str(shard))
        except DataError as e:
            raise ConfigError(str(e)) from None
    path = storage.join(out_dir, "settings.json")
    if storage.is_file(path):
        before = json.loads(storage.read_text(path))
        # a data key this wanray no longer has (data.max_text_tokens) does not make the settings differ
        before["data"] = {k: v for k, v in before.get("data", {}).items() if k in settings["data"]}
        # nor does one it did not have yet (data.max_clip_seconds), left at its default
        for key, default in dataclasses.asdict(type(cfg.data)()).items():
            before["data"].setdefault(key, default)
        if before != settings:
            changed = sorted(k for k in {*settings, *before} if before.get(k) != settings.get(k))
            raise ConfigError(
                f"{out_dir} was preprocessed with other {', '.join(changed)} settings; use a new --out directory"
            )
    else:
        storage.write_json(settings, path)


def encode_on(batch: dict, actors: list, batch_size: int) -> dict:
    """Ray Data task: a block of clip rows, cut into batches of `batch_size` that a Preprocessor's
    loaded encoder actors encode at once. Batches go round the actors by the clips' place in the
    run (`seq`), so each actor has an even share and one block keeps several of them busy."""
    first, rows = int(batch["seq"][0]) // batch_size, len(batch["seq"])
    parts = ray.get(
        [
            actors[(first + j) % len(actors)].__call__.remote({k: v[i : i + batch_size] for k, v in batch.items()})
            for j, i in enumerate(range(0, rows, batch_size))
        ]
    )
    return {k: np.concatenate([part[k] for part in parts]) for k in parts[0]}


def _encode_stage(
    cls, actors: list | None, count: int, batch_size: int, init: dict, options: dict, blocks: int
) -> dict:
    """map_batches arguments of one encode stage: a Ray Data actor pool of `count` `cls` actors
    loading the model for this run, or tasks handing whole blocks to a Preprocessor's `actors`."""
    if actors is None:  # no more actors than blocks come in: an extra one would only load its model
        return {
            "fn": cls,
            "fn_constructor_kwargs": init,
            "batch_size": batch_size,
            "compute": ray.data.ActorPoolStrategy(size=min(count, blocks)),
            **options,
        }
    # the tasks wait in ray.get, which holds no CPU; no more of them than blocks come in
    return {
        "fn": encode_on,
        "fn_kwargs": {"actors": actors, "batch_size": batch_size},
        "batch_size": None,
        "num_cpus": 0.05,
        "concurrency": min(2 * len(actors), blocks),
    }


def decode_blocks(todo: list[ClipSource], cfg: Config) -> int:
    return max(1, -(-len(todo) // cfg.preprocess.clips_per_decode_task))  # one decode task per block


def decode_dataset(todo: list[ClipSource], cfg: Config, out_dir: str, kind: ModelKind) -> ray.data.Dataset:
    """The decode stage: clip rows with their frames (at the buckets of data.* for a model of `kind`),
    rejects recorded in out_dir as they happen."""
    items = [{**dataclasses.asdict(s), "seq": i} for i, s in enumerate(todo)]
    ds = ray.data.from_items(items, override_num_blocks=decode_blocks(todo, cfg))
    return ds.flat_map(
        decode_source,
        fn_kwargs={"cfg": cfg, "out_dir": out_dir, "kind": kind},
        num_cpus=cfg.preprocess.decode_cpus,
    )


def build_dataset(
    todo: list[ClipSource], cfg: Config, model_path: str, out_dir: str, encoders: Preprocessor | None = None
) -> ray.data.Dataset:
    p, enc, blocks = cfg.preprocess, cfg.preprocess.encoders, decode_blocks(todo, cfg)
    ds = decode_dataset(todo, cfg, out_dir, models.read_kind(model_path))
    if cfg.data.aesthetic_model:
        ds = ds.map_batches(
            AestheticScorer,
            fn_constructor_kwargs={"model_dir": cfg.data.aesthetic_model, "device": enc.device},
            batch_size=p.vae_batch_size,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=min(p.aesthetic_actors, blocks)),
            **enc.ray_options(),
        )
    vae = _encode_stage(
        LatentEncoder,
        encoders.vae if encoders else None,
        p.vae_actors,
        p.vae_batch_size,
        {"model_path": model_path, "device": enc.device, "dtype": enc.dtype},
        enc.ray_options(),
        blocks,
    )
    ds = ds.map_batches(batch_format="numpy", **vae)
    text = _encode_stage(
        TextEncoder,
        encoders.text if encoders else None,
        p.text_actors,
        p.text_batch_size,
        {"model_path": model_path, "device": enc.device, "dtype": enc.dtype, "empty_prompt_dir": out_dir},
        enc.ray_options(),
        blocks,
    )
    ds = ds.map_batches(batch_format="numpy", **text)
    return ds.map_batches(
        write_shard, fn_kwargs={"out_dir": out_dir}, batch_size=p.rows_per_shard, num_cpus=0.1, batch_format="numpy"
    )


class Preprocessor:
    """Preprocessing runs that share one set of loaded encoders.

        with Preprocessor(cfg) as pre:
            pre.run("batch-01/data.txt", "prep/batch-01")
            pre.run("batch-02/data.txt", "prep/batch-02")

    The VAE and UMT5 actors (preprocess.vae_actors / text_actors, with the resources of
    preprocess.encoders) start once and stay loaded until close(); every run has the same
    config. On Ray errors they restart and the call is retried.
    """

    def __init__(self, cfg: Config, log: Callable[[str], None] = print):
        """Starts the encoder actors on the connected Ray (the driver's connect_ray)."""
        self.cfg, self.log = cfg, log
        self.model_path = str(model_files.ensure_model(cfg.model))
        p, enc = cfg.preprocess, cfg.preprocess.encoders
        options = {**enc.ray_options(), "max_restarts": 3, "max_task_retries": 3}
        log(
            f"[preprocess] loading {p.vae_actors} VAE and {p.text_actors} text encoder actors "
            f"({enc.device}, {enc.dtype}); they stay loaded until this Preprocessor closes"
        )
        start = time.perf_counter()
        self.vae = [
            ray.remote(LatentEncoder).options(**options).remote(self.model_path, enc.device, enc.dtype)
            for _ in range(p.vae_actors)
        ]
        self.text = [
            ray.remote(TextEncoder).options(**options).remote(self.model_path, enc.device, enc.dtype)
            for _ in range(p.text_actors)
        ]
        try:
            ray.get([a.__ray_ready__.remote() for a in self.vae + self.text])  # a load error surfaces here
        except BaseException:
            self.close()
            raise
        log(f"[preprocess] encoders loaded in {time.perf_counter() - start:.1f}s")

    def run(self, manifest: str, out_dir: str) -> dict:
        if not self.vae:
            raise RuntimeError("this Preprocessor is closed")
        return run_preprocess(self.cfg, manifest, out_dir, self.log, encoders=self)

    def write_empty_prompt(self, out_dir: str) -> None:
        ray.get(self.text[0].write_empty_prompt.remote(out_dir))

    def close(self) -> None:
        for actor in self.vae + self.text:
            ray.kill(actor)
        self.vae, self.text = [], []

    def __enter__(self) -> Preprocessor:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass
class PreprocessRun:
    """One manifest into one output directory. `prepare` reads and checks everything the user passed
    in without Ray (bad input fails fast); `execute` needs the driver's connected Ray."""

    cfg: Config
    manifest: str
    out: str
    """The output directory: a resolved local path or a URI (wanray.storage)."""
    model_path: str
    sources: list[ClipSource]
    manifest_rejects: list

    @classmethod
    def prepare(cls, cfg: Config, manifest: str, out_dir: str) -> PreprocessRun:
        sources, manifest_rejects = read_manifest(manifest, uncaptioned=bool(cfg.caption.model))
        out = storage.absolute(out_dir)
        storage.make_dirs(out)
        model_path = str(model_files.ensure_model(cfg.model))
        kind = models.read_contract(model_path, cfg.model).kind
        BucketSet.from_config(cfg.data, kind)  # sizes the model cannot take fail here
        _check_settings(cfg, out)
        return cls(cfg, storage.absolute(manifest), out, model_path, sources, manifest_rejects)

    def execute(self, log: Callable[[str], None] = print, encoders: Preprocessor | None = None) -> dict:
        """Run (or resume): clips already written or rejected are skipped. Returns the summary it writes."""
        out = self.out
        if retried := forget_retried(out):
            log(f"[preprocess] trying {retried} input(s) again whose storage read failed in an earlier run")
        done, rejected = written_ids(out), rejected_keys(out)
        for r in self.manifest_rejects:
            record_reject(out, r)
        kind = models.read_kind(self.model_path)
        log(f"[preprocess] buckets: {BucketSet.from_config(self.cfg.data, kind).describe()}")
        written, frames, elapsed = 0, 0, 0.0  # elapsed: encoding and writing only
        curated = self._curate(rejected, done, log)
        clips, after_split, stored = curated.clips, len(curated.clips), done
        while True:
            # with the rejects of the split, and this run's storage errors: retried by the next run, not this one
            skip = rejected_keys(out, retried=True)
            if self.cfg.caption.model:
                clips = caption_clips(clips, self.cfg, str(out), skip | stored, log)
                skip = rejected_keys(out, retried=True)
            todo = [c for c in clips if c.id not in stored and c.id not in skip]
            log(
                f"[preprocess] {len(self.sources)} entries in manifest, {len(self.manifest_rejects)} bad"
                + (f", split into {after_split} clips" if after_split != len(self.sources) else "")
                + f"; {len(clips) - len(todo)} already done or rejected, {len(todo)} to process"
            )
            written_before, started = written, time.perf_counter()
            for shard in build_dataset(todo, self.cfg, self.model_path, str(out), encoders).iter_rows() if todo else []:
                written, frames = written + shard["rows"], frames + shard["frames"]
                rate = (written - written_before) / (time.perf_counter() - started)
                eta = (len(todo) - written + written_before) / rate if rate > 0 else float("nan")
                log(
                    f"[preprocess] {written - written_before}/{len(todo)} clips written ({shard['shard']}), "
                    f"{rate:.2f} clips/s, at most {eta:.0f}s left"
                )
            elapsed += time.perf_counter() - started
            if not (lost := curated.keepers & rejected_keys(out)):
                break
            # their near duplicates were rejected as copies of a clip that is not stored: curate again
            log(f"[preprocess] {len(lost)} clip(s) kept among near duplicates were rejected: deduplicating again")
            stored = written_ids(out)
            curated = self._curate(rejected_keys(out), stored, log, curated.pairs)
            clips = curated.clips
        self._ensure_empty_prompt(encoders)
        records = collect_rejects(out)
        summary: dict[str, Any] = {
            "manifest": self.manifest,
            "clips_in_manifest": len(self.sources),
            "clips_after_split": after_split,
            "outcomes": {
                "written": written,
                "already_written": len(done & {c.id for c in clips}),
                "rejected": len(records),
            },
            "rejects_by_reason": dict(Counter(r["reason"] for r in records)),
            "rows_in_output": len(written_ids(out)),
            "clips_by_bucket": bucket_counts(out),
            "seconds": round(elapsed, 3),
            "clips_per_second": round(written / elapsed, 3) if elapsed > 0 else None,
            "frames_per_second": round(frames / elapsed, 3) if elapsed > 0 else None,
            "rejected_this_run": len(rejected_keys(out, retried=True) - rejected),
        }
        storage.write_json(summary, storage.join(out, "summary.json"))
        log(
            f"[preprocess] done: {written} written, {len(records)} rejected "
            f"({', '.join(f'{k}: {v}' for k, v in sorted(summary['rejects_by_reason'].items())) or 'none'}); "
            f"{summary['rows_in_output']} clips in {out}; by bucket: "
            f"{', '.join(f'{k}: {v}' for k, v in summary['clips_by_bucket'].items()) or 'none'}"
        )
        return summary

    def _curate(self, rejected: set[str], done: set[str], log: Callable[[str], None], pairs: Any = None) -> Curated:
        """The manifest's sources, split and deduplicated with data.max_clip_seconds / data.dedup
        (curate_sources; `pairs` from an earlier pass of the run)."""
        if self.cfg.data.max_clip_seconds or self.cfg.data.dedup:
            return curate_sources(self.sources, self.cfg, str(self.out), rejected, done, log, pairs)
        return Curated(self.sources)

    def _ensure_empty_prompt(self, encoders: Preprocessor | None) -> None:
        """A one-shot run's text encoder actors write it as they start; none start if every clip was done."""
        if storage.is_file(storage.join(self.out, EMPTY_PROMPT_FILE)):
            return
        if encoders is not None:  # the Preprocessor's loaded text encoder writes it
            encoders.write_empty_prompt(str(self.out))
            return
        enc = self.cfg.preprocess.encoders
        task = ray.remote(_empty_prompt_task).options(**enc.ray_options())
        ray.get(task.remote(self.model_path, enc.device, enc.dtype, str(self.out)))


def run_preprocess(
    cfg: Config, manifest: str, out_dir: str, log: Callable[[str], None] = print, encoders: Preprocessor | None = None
) -> dict:
    """Run (or resume) preprocessing of `manifest` into `out_dir` on the connected Ray; returns the
    summary written there. The encoders load inside the run, or are those of `encoders` (see Preprocessor)."""
    if encoders is not None and encoders.cfg != cfg:  # before prepare writes settings.json
        raise ConfigError("a Preprocessor runs with the config its encoders were loaded with")
    return PreprocessRun.prepare(cfg, manifest, out_dir).execute(log, encoders)
