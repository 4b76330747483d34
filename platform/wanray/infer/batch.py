"""Batch generation on Ray Data: one video per line of a prompts file.

    prompts.txt ─► read + validate (all lines, before any work) ─► Ray Data rows
        ─► map_batches(VideoWriter actors: the whole Sampler, loaded once each) ─► out/00000.mp4, ...
        ─► out/videos.jsonl (index, prompt, seed, video file, seconds)

Like the reference inference script: every prompt uses the configured seed, steps,
guidance scales and size, so a line always gives the same video.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import time
from pathlib import Path

import numpy as np

from wanray import storage
from wanray.config import Config
from wanray.errors import RequestError
from wanray.infer.api import GenerateRequest, resolve
from wanray.infer.group import batch_group
from wanray.infer.request import GenerationParams
from wanray.infer.sampler import Sampler
from wanray.infer.spec import StageSpec
from wanray.infer.video import mp4_bytes
from wanray.sections import EvalConfig
from wanray.wan import KINDS, ModelKind

INDEX_FILE = "videos.jsonl"


def read_prompts(
    path: str | os.PathLike, cfg: Config, kind: ModelKind = KINDS["t2v-a14b"], split: int | None = None
) -> list[GenerationParams]:
    """One GenerationParams per non-blank line; RequestError names the first line that is out of bounds.

    A .jsonl file holds one JSON object per line: `prompt` and any of the REST API's fields
    (`negative_prompt`, `height`, `width`, `num_frames`, `num_inference_steps`, `guidance_scale`,
    `guidance_scale_2`, `seed`) for that video, e.g. a size of another bucket, and for an image-to-video
    model `image`, the path of its first frame (relative to the prompts file), and for I2V-A14B
    `last_image`, of its last frame; any other file, one
    prompt per line with the configured settings. split: the devices an expert's tokens are shared over
    (infer.batch_devices when None)."""
    from pydantic import ValidationError

    p, lines = prompt_lines(path)
    jsonl = p.lower().endswith(".jsonl")
    params = []
    for number, line in lines:
        try:
            if jsonl:
                fields = json.loads(line)
                if not isinstance(fields, dict) or "output" in fields:
                    raise RequestError("expected a JSON object of the REST API's fields (all but output)")
                for name in ("image", "last_image"):
                    if isinstance(fields.get(name), str):
                        fields[name] = image_file(storage.join(storage.parent(p), fields[name]))
                request = GenerateRequest.model_validate(fields)
            else:
                request = GenerateRequest(prompt=line.strip())
            params.append(resolve(request, cfg, kind, cfg.infer.batch_devices if split is None else split))
        except json.JSONDecodeError as e:
            raise RequestError(f"{p} line {number}: not JSON: {e}") from None
        except ValidationError as e:
            where = lambda err: ".".join(map(str, err["loc"])) or "line"
            raise RequestError(
                f"{p} line {number}: " + "; ".join(f"{where(err)}: {err['msg']}" for err in e.errors())
            ) from None
        except RequestError as e:
            raise RequestError(f"{p} line {number}: {e}") from None
    return params


def prompt_lines(path: str | os.PathLike) -> tuple[str, list[tuple[int, str]]]:
    """(the file's absolute path or URI, its non-blank lines with their numbers); a missing file is a
    FileNotFoundError and one without a prompt a RequestError."""
    p = storage.absolute(path)  # a local path or a URI (wanray.storage)
    if not storage.is_file(p):
        raise FileNotFoundError(f"prompts file not found: {p}")
    lines = [(n, line) for n, line in enumerate(storage.read_text(p).splitlines(), start=1) if line.strip()]
    if not lines:
        raise RequestError(f"{p} holds no prompt (one prompt per line)")
    return p, lines


def image_file(path: str | os.PathLike) -> str:
    """An image file's bytes (a local path or a URI) in base64, as GenerationParams.image holds them."""
    import base64

    if not storage.is_file(path):
        raise RequestError(f"image file not found: {path}")
    return base64.b64encode(storage.read_bytes(path)).decode()


class VideoWriter:
    """Ray Data actor: rows (index, GenerationParams as JSON) -> videos on disk; rows (index, video, seconds) out.
    With spec.devices above 1 it is rank 0 of its experts' group, the other ranks actors of `rank_options`
    on its node (wanray.infer.group)."""

    def __init__(
        self,
        spec: StageSpec,
        fps: float,
        out_dir: str,
        save_frames: bool,
        rank_options: dict,
        score: EvalConfig | None = None,
    ):
        experts = None
        if (world := spec.devices["high"]) > 1:
            group = batch_group(spec, spec.contract.kind.experts, world, rank_options)
            experts = {e: group.expert(e) for e in spec.contract.kind.experts}
        self.sampler = Sampler(spec, experts)
        self.out_dir, self.fps, self.save_frames = out_dir, fps, save_frames
        self.scorer = None
        if score is not None:
            from wanray.infer.scores import VideoScorer

            self.scorer = VideoScorer(score.clip_model, score.frames, spec.device("text"))

    def __call__(self, batch: dict) -> dict:
        videos, seconds, scores = [], [], []
        for index, text in zip(batch["index"], batch["params"]):
            params = GenerationParams(**json.loads(text))
            start = time.perf_counter()
            frames = self.sampler(params)
            name = f"{int(index):05d}"
            storage.write_bytes(storage.join(self.out_dir, f"{name}.mp4"), mp4_bytes(frames, self.fps))
            if self.save_frames:
                array = io.BytesIO()
                np.save(array, frames)
                storage.write_bytes(storage.join(self.out_dir, f"{name}.npy"), array.getvalue())
            videos.append(f"{name}.mp4")
            seconds.append(time.perf_counter() - start)  # rendering: the scores below are not counted
            scores.append(json.dumps(self.scorer(frames, params.prompt).as_dict()) if self.scorer else "{}")
        return {
            "index": batch["index"],
            "video": np.array(videos, dtype=object),
            "seconds": np.array(seconds),
            "scores": np.array(scores, dtype=object),
        }


def generate_videos(
    cfg: Config,
    model_dir: str,
    params: list[GenerationParams],
    out_dir: str | os.PathLike,
    save_frames: bool = False,
    log=print,
    score: EvalConfig | None = None,
) -> list[dict]:
    """Generate every video on `cfg.infer.batch_actors` actors of the connected Ray (each over
    infer.batch_devices devices); return (and write) the index, in prompt order. `log` gets a line per video.
    With `score`, each actor also scores its videos (wanray.infer.scores) where it rendered them, and every row
    holds them under "scores"."""
    import ray

    out = storage.absolute(out_dir)  # a local directory or a URI (wanray.storage)
    storage.make_dirs(out)
    inf = cfg.infer
    rows = [{"index": i, "params": json.dumps(dataclasses.asdict(p))} for i, p in enumerate(params)]
    ds = ray.data.from_items(rows, override_num_blocks=len(rows)).map_batches(
        VideoWriter,
        batch_size=1,
        compute=ray.data.ActorPoolStrategy(size=inf.batch_actors),
        batch_format="numpy",
        fn_constructor_kwargs=dict(
            spec=StageSpec.for_batch(Path(model_dir).resolve(), cfg),
            fps=cfg.data.fps,
            out_dir=out,
            save_frames=save_frames,
            rank_options=inf.batch.ray_options(),
            score=score,
        ),
        **inf.batch.ray_options(),
    )
    done = []
    for row in ds.iter_rows():
        p = params[int(row["index"])]
        done.append(
            {
                "index": int(row["index"]),
                "prompt": p.prompt,
                "seed": p.seed,
                "video": str(row["video"]),
                "seconds": round(float(row["seconds"]), 3),
                **({"scores": json.loads(row["scores"])} if score is not None else {}),
            }
        )
        log(f"[{len(done)}/{len(rows)}] {storage.join(out, str(row['video']))}  ({float(row['seconds']):.1f} s)")
    done.sort(key=lambda r: int(r["index"]))
    storage.write_text(storage.join(out, INDEX_FILE), "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in done))
    return done
