"""Validation videos while training: one actor per trained expert, beside the workers, renders the
validation prompts two-stage from each checkpoint the workers report.

    rank 0, once step N's checkpoint is reported ──submit(N)──► Validator actor (train.validation.worker)
      (a call that returns at once: the workers never          one render at a time; when it falls
       wait for it)                                              behind, only the newest step waits
                                                                 ▼
        runs/<run>/<expert>/validation/step_<N>/00.mp4 ...  prompts.json;  validations.jsonl

Each render loads the trained expert from step N's checkpoint and the other expert from its own
latest checkpoint when it is being trained too, else the base weights: the videos show what the
run would export at that step. Prompts, seed and size are the same at every step, so the videos
compare across steps. In a run directory on object storage the actor writes into a local working copy and
uploads each render's files when it ends (wanray.storage.WorkingCopy).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import threading
import time
from pathlib import Path

from wanray import models, storage
from wanray.config import Config
from wanray.errors import ConfigError, RequestError
from wanray.infer.api import GenerateRequest, resolve
from wanray.infer.batch import image_file, prompt_lines, read_prompts
from wanray.infer.request import GenerationParams
from wanray.infer.sampler import Sampler
from wanray.infer.scores import SCORES_VERSION, VideoScorer, mean_scores
from wanray.infer.spec import StageSpec
from wanray.infer.video import mp4_bytes
from wanray.io import write_bytes_atomic, write_json_atomic
from wanray.sections import EvalConfig
from wanray.train.tracking import Tracker

RECORD_FILE = "validations.jsonl"
PROMPTS_FILE = "prompts.json"
"""Beside each validation's videos: the prompts they show, in order."""


def validation_prompts(cfg: Config, model_dir) -> list[GenerationParams]:
    """train.validation's prompts as resolved requests, the validation settings their defaults: `prompts`
    and a plain prompts_file with train.validation.images as their first frames, then a .jsonl
    prompts_file's lines. A bad size, prompt or image fails here, in the driver."""
    v, d = cfg.train.validation, cfg.data
    frames = v.num_frames or d.num_frames
    try:  # the validation settings as every prompt's defaults (min_frames: a floor for clips, not requests)
        defaults = dataclasses.replace(
            cfg,
            data=dataclasses.replace(
                d, height=v.height or d.height, width=v.width or d.width, num_frames=frames, min_frames=1
            ),
            infer=dataclasses.replace(
                cfg.infer,
                num_inference_steps=v.num_inference_steps,
                seed=v.seed,
                guidance_scale=v.guidance_scale,
                guidance_scale_2=v.guidance_scale_2,
            ),
        )
    except ConfigError as e:
        raise ConfigError(f"train.validation: {e}") from None
    kind = models.read_kind(model_dir)
    texts, lines = list(v.prompts), []
    try:
        if v.prompts_file:
            path, found = prompt_lines(v.prompts_file)  # local or a URI; none there is an error, as missing is
            if path.lower().endswith(".jsonl"):
                lines = read_prompts(path, defaults, kind, split=1)
            else:
                texts += [line.strip() for _, line in found]
        if v.images and len(v.images) != len(texts):
            raise ConfigError(
                f"train.validation.images holds {len(v.images)} images for {len(texts)} prompts "
                "(train.validation.prompts and a plain prompts_file): give one per prompt"
            )
        images: list[str | None] = [image_file(path) for path in v.images] or [None] * len(texts)
        return [
            resolve(GenerateRequest(prompt=text, image=image), defaults, kind) for text, image in zip(texts, images)
        ] + lines
    except (RequestError, FileNotFoundError) as e:
        raise ConfigError(f"train.validation: {e}") from None


def under_adapters(name: str, own: set[str]) -> str:
    """A diffusers tensor name as the expert holds it: a layer a served adapter wraps (peft) keeps its weight as
    `<layer>.base_layer.weight`."""
    module, _, leaf = name.rpartition(".")
    wrapped = f"{module}.base_layer.{leaf}"
    return wrapped if name not in own and wrapped in own else name


class Validator:
    """The actor: renders in a thread of its own, so `submit` returns at once."""

    def __init__(
        self,
        spec: StageSpec,
        prompts: list[GenerationParams],
        expert: str,
        run_dir: str,
        fps: float,
        lora=None,
        tracker: str = "none",
        scoring: EvalConfig | None = None,
    ):
        self.sampler = Sampler(spec)
        scoring = scoring or EvalConfig()
        self.scorer = VideoScorer(scoring.clip_model, scoring.frames, spec.device("text"))
        self.prompts, self.expert, self.run_dir, self.fps, self.lora = prompts, expert, run_dir, fps, lora
        self.model_dir = spec.model_dir
        self.loaded: dict[str, Path | str] = {}
        self.files = storage.WorkingCopy(storage.join(run_dir, expert))
        self.files.pull(f"validation/{RECORD_FILE}")
        self.tracker = Tracker(tracker, self.files.local, "validation")
        self.tracker.text("validation/prompts", "\n".join(f"{i:02d}: {p.prompt}" for i, p in enumerate(prompts)))
        self.pending: tuple[int, str] | None = None  # (step, its checkpoint directory)
        self.busy = False
        self.records: list[dict] = []
        self.changed = threading.Condition()
        threading.Thread(target=self._serve, daemon=True, name="validation").start()

    def submit(self, step: int, checkpoint: str) -> None:
        """Render step `step` from its checkpoint directory when the current render ends (a newer step replaces a
        waiting one). Given, not looked up: a listing of the run would read the step file of every checkpoint,
        some of which Ray Train may be deleting."""
        with self.changed:
            if self.pending is None or step > self.pending[0]:
                self.pending = (step, checkpoint)
            self.changed.notify_all()

    def drain(self) -> list[dict]:
        """Wait for the waiting and running renders; the records of every render so far."""
        with self.changed:
            self.changed.wait_for(lambda: self.pending is None and not self.busy)
            return list(self.records)

    def close(self) -> None:
        """Remove the local working copy of a run directory in an object store (ray.kill runs no cleanup)."""
        self.files.close()

    def _serve(self) -> None:
        while True:
            with self.changed:
                self.changed.wait_for(lambda: self.pending is not None)
                assert self.pending is not None  # waited for
                (step, checkpoint), self.pending, self.busy = self.pending, None, True
            try:
                record = self._render(step, checkpoint)
            except Exception as e:  # a failed render is recorded; training goes on
                record = {"step": step, "error": f"{type(e).__name__}: {e}"}
            if "error" not in record:
                record = self._upload(record)
            records = self.files.local / "validation" / RECORD_FILE
            records.parent.mkdir(parents=True, exist_ok=True)
            with records.open("a") as f:
                f.write(json.dumps(record) + "\n")
            self.files.sync(f"validation/{RECORD_FILE}")  # a failed upload: a warning; the next sync carries it
            with self.changed:
                self.records.append(record)
                self.busy = False
                self.changed.notify_all()

    def _upload(self, record: dict) -> dict:
        """Upload a render's videos (before the record naming them) when the run directory is a URI; the local
        copies then go."""
        folder = f"validation/step_{record['step']}"
        try:
            self.files.push(folder, "tensorboard")
        except OSError as e:
            return {"step": record["step"], "error": f"uploading the videos to {self.files.root}: {e}"}
        if self.files.remote:
            shutil.rmtree(self.files.local / folder, ignore_errors=True)
        return record

    def _load(self, expert: str, checkpoint: Path | str) -> None:
        from wanray.train.export import expert_state_groups
        from wanray.train.runs import trained_lora

        if self.loaded.get(expert) == checkpoint:
            return
        stage = self.sampler.experts[expert]
        own = set(stage.expert.state_dict())
        lora = trained_lora(self.run_dir, expert, self.lora)  # the other expert's may be another run's settings
        for weights, _ in expert_state_groups(self.model_dir, expert, checkpoint, lora):
            weights = {under_adapters(k, own): v for k, v in weights.items()}
            missing = set(weights) - own
            if missing:
                raise KeyError(f"checkpoint tensors the expert does not have: {sorted(missing)[:3]}")
            stage.expert.load_state_dict(weights, strict=False)
        self.loaded[expert] = checkpoint

    def _render(self, step: int, checkpoint: str) -> dict:
        from wanray.train.runs import latest_checkpoint

        start = time.time()
        self._load(self.expert, checkpoint)
        for other in self.sampler.experts:
            if other != self.expert and storage.is_dir(storage.join(self.run_dir, other)):
                with contextlib.suppress(FileNotFoundError):  # no checkpoint yet: the other's base weights
                    self._load(other, latest_checkpoint(self.run_dir, other))
        folder = f"validation/step_{step}"
        out = self.files.local / folder
        out.mkdir(parents=True, exist_ok=True)
        videos, scores = [], []
        for i, params in enumerate(self.prompts):
            path, frames = out / f"{i:02d}.mp4", self.sampler(params)
            write_bytes_atomic(path, mp4_bytes(frames, self.fps))
            self.tracker.video(f"validation/{i:02d}", frames, step, self.fps)
            videos.append(path.name)
            scores.append(self.scorer(frames, params.prompt).as_dict())
        write_json_atomic([p.prompt for p in self.prompts], out / PROMPTS_FILE)
        means = mean_scores(scores)
        for name, value in means.items():
            self.tracker.scalar(f"validation/{name}", value, step)
        return {
            "step": step,
            "checkpoint": str(checkpoint),
            "videos": [storage.join(self.files.root, folder, v) for v in videos],
            "scores": scores,
            "scores_mean": means,
            "scores_version": SCORES_VERSION,
            "other": {e: str(c) for e, c in self.loaded.items() if e != self.expert},
            "started": start,
            "seconds": round(time.time() - start, 3),
        }


class Validation:
    """The driver's side: one Validator per trained expert (train_experts' `validation`), waited for at the end."""

    def __init__(self, cfg: Config, model_dir):
        self.cfg, self.model_dir = cfg, str(model_dir)
        self.prompts = validation_prompts(cfg, model_dir)
        self.spec = StageSpec.for_validation(self.model_dir, cfg)

    def start(self, expert: str, run_dir):
        import ray

        actor = ray.remote(Validator).options(**self.cfg.train.validation.worker.ray_options())
        return actor.remote(
            self.spec,
            self.prompts,
            expert,
            storage.absolute(run_dir),
            self.cfg.data.fps,
            self.cfg.train.lora,
            self.cfg.train.tracker,
            self.cfg.eval,
        )

    @staticmethod
    def finish(actor, log=print) -> list[dict]:
        import ray

        records = ray.get(actor.drain.remote())
        for r in records:
            log(
                f"[validate] step {r['step']}: "
                + (
                    r["error"]
                    if "error" in r
                    else f"{len(r['videos'])} video{'s' * (len(r['videos']) != 1)} in "
                    f"{storage.parent(r['videos'][0])} "
                    f"({r['seconds']:.1f} s)"
                )
            )
        Validation.stop(actor)
        return records

    @staticmethod
    def stop(actor) -> None:
        import ray

        with contextlib.suppress(Exception):  # a dead or stuck actor keeps its files; it is killed either way
            ray.get(actor.close.remote(), timeout=30)
        ray.kill(actor)
