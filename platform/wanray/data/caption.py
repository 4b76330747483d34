"""Captions from a vision-language model, as a Ray Data actor pool between curation and decoding.

    clips without a caption (all of them with caption.overwrite), not yet captioned
      -> Captioner actors (caption.actors, on caption.worker's device): caption.frames frames of each clip,
         the prompt, greedy generation
      -> captions/part-<hash>.parquet: (id, caption, caption_model), written whole per batch
    a resumed run captions only the clips no captions file holds.

The model is any of the Qwen-VL family in transformers (Qwen2-VL, Qwen2.5-VL, Qwen3-VL), loaded with
AutoModelForImageTextToText. The frames go to it as images of one user message, in order, followed by the
prompt: transformers' video processors need torchvision, which has no build for a CPU-only torch, while
the image processors run on PIL; every Qwen-VL reads a sequence of images as well. Inputs are made as the
model's own processor makes them: its chat template, then each image's `<|image_pad|>` placeholder repeated
once per merged patch (image_grid_thw / merge_size^2).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow as pa
import ray

from wanray import storage
from wanray.data.curate import clip_name
from wanray.data.manifest import ClipSource, Reject
from wanray.data.shards import part_name, record_reject, write_table_atomic
from wanray.data.video import ClipRejected, is_image, open_image, sample_frames
from wanray.errors import ConfigError

CAPTIONS_DIR = "captions"
CAPTION_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("caption", pa.string(), nullable=False),
        pa.field("caption_model", pa.string(), nullable=False),
    ]
)
QWEN_VL = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")


def model_name(path: str) -> str:
    """What each caption records as its model: the model directory's name."""
    return storage.name(storage.absolute(path))


def clip_frames(row: dict, frames: int, size: int) -> list[np.ndarray]:
    """The frames of one clip row the model sees (an image: itself once). Raises ClipRejected."""
    if is_image(row["path"]):
        image = open_image(row["path"])
        image.thumbnail((size, size))
        return [np.asarray(image, dtype=np.uint8)]
    return list(sample_frames(row["path"], frames, size, row["cut_start"], row["cut_end"], square=False))


class Captioner:
    """Ray Data actor: clip rows (id, path, cut_start, cut_end) -> (id, caption, caption_model); a clip that
    cannot be read, or that the model gives an empty caption, is recorded as a reject in out_dir instead."""

    def __init__(self, cfg, out_dir: str):
        import torch
        from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

        from wanray.devices import accelerator, torch_dtype

        c = cfg.caption
        self.c, self.out_dir, self.name = c, out_dir, model_name(c.model)
        self.device = accelerator(c.worker.device).torch_device()
        self.tokenizer = AutoTokenizer.from_pretrained(c.model)
        self.tokenizer.padding_side = "left"  # generation continues every prompt from its end
        self.images = AutoImageProcessor.from_pretrained(c.model)
        self.model = AutoModelForImageTextToText.from_pretrained(c.model, dtype=torch_dtype(c.worker.dtype))
        self.model.to(self.device).eval()
        if self.model.config.model_type not in QWEN_VL:
            raise ConfigError(
                f"caption.model {c.model} is a {self.model.config.model_type} model; the captioner runs the "
                f"Qwen-VL family ({', '.join(QWEN_VL)})"
            )
        self.image_token = self.tokenizer.convert_ids_to_tokens(self.model.config.image_token_id)
        self.merge = self.images.merge_size**2
        self.torch = torch

    def prompt(self, images: int) -> str:
        content = [*({"type": "image"} for _ in range(images)), {"type": "text", "text": self.c.prompt}]
        messages = [{"role": "user", "content": content}]
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows, frames = [], []
        for row in batch.to_pylist():
            try:
                frames.append(clip_frames(row, self.c.frames, self.c.size))
                rows.append(row)
            except ClipRejected as e:
                record_reject(self.out_dir, Reject(row["name"], e.reason, e.detail), key=row["id"])
        captions = self.generate(frames) if rows else []
        done = []
        for row, caption in zip(rows, captions):
            if caption:
                done.append(row)
            else:
                detail = f"{self.name} wrote no caption"
                record_reject(self.out_dir, Reject(row["name"], "empty_caption", detail), key=row["id"])
        kept = [c for c in captions if c]
        return pa.table(
            {"id": [r["id"] for r in done], "caption": kept, "caption_model": [self.name] * len(done)},
            schema=CAPTION_SCHEMA,
        )

    def generate(self, clips: list[list[np.ndarray]]) -> list[str]:
        """One caption per clip (a list of frames), stripped."""
        pixels = self.images(images=[f for frames in clips for f in frames], return_tensors="pt")
        tokens = iter((pixels["image_grid_thw"].prod(-1) // self.merge).tolist())
        texts = []
        for frames in clips:  # each placeholder becomes as many as the image has merged patches
            parts = self.prompt(len(frames)).split(self.image_token)
            texts.append(parts[0] + "".join(self.image_token * next(tokens) + part for part in parts[1:]))
        inputs = self.tokenizer(texts, padding=True, return_tensors="pt")
        with self.torch.inference_mode():
            out = self.model.generate(
                **inputs.to(self.device),
                pixel_values=pixels["pixel_values"].to(self.device, self.model.dtype),
                image_grid_thw=pixels["image_grid_thw"].to(self.device),
                max_new_tokens=self.c.max_new_tokens,
                do_sample=False,
            )
        new = out[:, inputs["input_ids"].shape[1] :].cpu()
        return [" ".join(text.split()) for text in self.tokenizer.batch_decode(new, skip_special_tokens=True)]


def write_captions(batch: pa.Table, out_dir: str) -> dict:
    """Ray Data map_batches: one batch of captions becomes one captions file."""
    folder = storage.join(out_dir, CAPTIONS_DIR)
    storage.make_dirs(folder)
    write_table_atomic(batch.cast(CAPTION_SCHEMA), storage.join(folder, part_name(batch.column("id").to_pylist())))
    return {"captions": np.array([batch.num_rows])}


def read_captions(out_dir) -> dict[str, tuple[str, str]]:
    """{clip id: (caption, caption_model)} of every captions file."""
    found = {}
    for path in storage.list_files(storage.join(out_dir, CAPTIONS_DIR), "part-*.parquet"):
        for r in storage.read_table(path, schema=CAPTION_SCHEMA).to_pylist():
            found[r["id"]] = (r["caption"], r["caption_model"])
    return found


def needs_caption(clip: ClipSource, cfg) -> bool:
    return bool(cfg.caption.model) and (cfg.caption.overwrite or not clip.caption)


def caption_clips(clips: list[ClipSource], cfg, out_dir: str, skip: set[str], log) -> list[ClipSource]:
    """`clips` with the captions of the captions files, those that need one and have none (and are not in
    `skip`, the rejected and written) captioned on Ray Data first; clips left without a caption are dropped
    (their rejects are recorded)."""
    done = read_captions(out_dir)
    todo = [c for c in clips if needs_caption(c, cfg) and c.id not in done and c.id not in skip]
    if todo:
        c = cfg.caption
        name = model_name(c.model)
        log(f"[preprocess] captioning {len(todo)} clips with {name} ({c.actors} actors, {c.worker.device})")
        items = [
            {"id": x.id, "path": x.path, "cut_start": x.cut_start, "cut_end": x.cut_end, "name": clip_name(x)}
            for x in todo
        ]
        ds = ray.data.from_items(items, override_num_blocks=max(1, -(-len(todo) // c.batch_size)))
        captioned = ds.map_batches(
            Captioner,
            fn_constructor_kwargs={"cfg": cfg, "out_dir": out_dir},
            batch_size=c.batch_size,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=min(c.actors, len(todo))),
            **c.worker.ray_options(),
        ).map_batches(write_captions, fn_kwargs={"out_dir": out_dir}, batch_size=None, batch_format="pyarrow")
        count = 0
        for row in captioned.iter_rows():
            count += int(row["captions"])
            log(f"[preprocess] captioned {count}/{len(todo)} clips")
        done = read_captions(out_dir)
    out = []
    for clip in clips:
        if not needs_caption(clip, cfg):
            out.append(clip)
        elif clip.id in done:
            caption, model = done[clip.id]
            out.append(dataclasses.replace(clip, caption=caption, caption_model=model))
    return out
