"""The Parquet contract: one row per clip, tensors as (bytes, shape, dtype).

Readable with plain pyarrow: `pq.read_table(shard)`; decode a tensor column with
`decode_tensor(row["latent"], row["latent_shape"], row["latent_dtype"])`. bfloat16
is stored as its raw 16-bit pattern, so it round-trips bit-exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from wanray.compat import TRAINING_READS
from wanray.errors import DataError

if TYPE_CHECKING:
    import torch  # imported where tensors are made: the decode and shard-writing workers never need it

SCHEMA_VERSION = "3"
"""3 added each clip's source frame range (cut_start, cut_end), motion and aesthetic scores and caption model; 2 each
clip's bucket
and its source's size (1 had one fixed size)."""
VERSION_KEY = b"wanray.schema_version"

# Stored dtype name -> the dtype its bytes travel as (numpy has no bfloat16: its bits go as int16).
_CARRIERS = {"float32": "float32", "bfloat16": "int16", "float16": "float16"}


def encode_tensor(t: torch.Tensor) -> tuple[bytes, list[int], str]:
    """A tensor as (raw bytes, shape, dtype name); never empty."""
    import torch

    t = t.detach().contiguous().cpu()
    if t.numel() == 0:
        raise ValueError(f"refusing to store an empty tensor of shape {tuple(t.shape)}")
    name = str(t.dtype).removeprefix("torch.")
    if name not in _CARRIERS:
        raise ValueError(f"cannot store dtype {t.dtype}; stored dtypes are {', '.join(_CARRIERS)}")
    return t.view(getattr(torch, _CARRIERS[name])).numpy().tobytes(), list(t.shape), name


def decode_tensor(data: bytes, shape, dtype: str) -> torch.Tensor:
    """Inverse of encode_tensor, in exactly the stored dtype."""
    import torch

    if dtype not in _CARRIERS:
        raise DataError(f"unknown stored dtype {dtype!r}")
    flat = torch.frombuffer(bytearray(data), dtype=getattr(torch, _CARRIERS[dtype]))
    return flat.view(getattr(torch, dtype)).reshape([int(s) for s in shape])


def _tensor_fields(name: str, nullable: bool = False) -> list[pa.Field]:
    return [
        pa.field(name, pa.binary(), nullable=nullable),
        pa.field(f"{name}_shape", pa.list_(pa.int32()), nullable=nullable),
        pa.field(f"{name}_dtype", pa.string(), nullable=nullable),
    ]


CLIP_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("caption", pa.string(), nullable=False),
        pa.field("fps", pa.float32(), nullable=False),
        pa.field("num_frames", pa.int32(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
        pa.field("width", pa.int32(), nullable=False),
        pa.field("bucket", pa.string(), nullable=False),
        pa.field("source_height", pa.int32(), nullable=False),
        pa.field("source_width", pa.int32(), nullable=False),
        pa.field("clip_start", pa.int32(), nullable=False),
        # the clip is source frames [cut_start, cut_end): the manifest's cut, a piece of a shot the video was
        # split into (data.max_clip_seconds), or the whole video; clip_start is the first frame it uses
        pa.field("cut_start", pa.int32(), nullable=False),
        pa.field("cut_end", pa.int32(), nullable=False),
        # mean optical-flow magnitude (wanray.data.motion.flow_motion), pixels per frame at 16 fps on a 256-pixel
        # wide copy; null for a still image. train.filters select on it
        pa.field("motion", pa.float32(), nullable=True),
        # data.aesthetic_model's score (wanray.data.aesthetic); null without one
        pa.field("aesthetic", pa.float32(), nullable=True),
        # the model that wrote the caption (caption.model's directory name); null for the manifest's caption
        pa.field("caption_model", pa.string(), nullable=True),
        *_tensor_fields("latent"),
        *_tensor_fields("text_embedding"),
        pa.field("text_tokens", pa.int32(), nullable=False),
        # image-to-video models (I2V-A14B): the normalised VAE latent of the clip's first frame followed
        # by zero frames, as WanImageToVideoPipeline conditions on it; null for text-to-video models
        *_tensor_fields("condition", nullable=True),
    ],
    metadata={VERSION_KEY: SCHEMA_VERSION.encode()},
)

NUMERIC_COLUMNS = tuple(f.name for f in CLIP_SCHEMA if pa.types.is_integer(f.type) or pa.types.is_floating(f.type))
"""The shards' numeric metadata columns (what train.filters may select on)."""

# The empty-prompt embedding (caption dropout in training, unconditional branch of guidance).
EMPTY_PROMPT_SCHEMA = pa.schema(
    [*_tensor_fields("text_embedding"), pa.field("text_tokens", pa.int32())],
    metadata={VERSION_KEY: SCHEMA_VERSION.encode()},
)


META_COLUMNS = (
    "id",
    "source",
    "caption",
    "fps",
    "num_frames",
    "height",
    "width",
    "bucket",
    "source_height",
    "source_width",
    "clip_start",
)
CURATION_COLUMNS = ("cut_start", "cut_end", "motion", "aesthetic", "caption_model")
"""Schema 3's metadata columns: (0, -1, None, None, None) for a shard of schema 1 or 2."""


@dataclass
class ClipRow:
    """One training clip as stored: metadata plus its normalised latent and unpadded text embedding."""

    id: str
    source: str
    caption: str
    fps: float
    num_frames: int
    height: int
    width: int
    bucket: str
    """"HEIGHTxWIDTHxFRAMES" (wanray.buckets)."""
    source_height: int
    source_width: int
    clip_start: int
    latent: torch.Tensor
    """(16, latent_frames, height/8, width/8), normalised with the VAE's latents_mean/std."""
    text_embedding: torch.Tensor
    """(text_tokens, text_dim): UMT5 output without padding."""
    condition: torch.Tensor | None = None
    """Image-to-video models: like `latent`, the first frame's latent then zero frames' (else None)."""
    cut_start: int = 0
    cut_end: int = -1
    """Source frames [cut_start, cut_end) the clip is cut from."""
    motion: float | None = None
    aesthetic: float | None = None
    caption_model: str | None = None

    def to_record(self) -> dict:
        rec = {k: getattr(self, k) for k in (*META_COLUMNS, *CURATION_COLUMNS)}
        for name in ("latent", "text_embedding", "condition"):
            value = getattr(self, name)
            rec[name], rec[f"{name}_shape"], rec[f"{name}_dtype"] = (
                (None, None, None) if value is None else encode_tensor(value)
            )
        rec["text_tokens"] = int(self.text_embedding.shape[0])
        return rec

    @classmethod
    def from_record(cls, rec: dict) -> ClipRow:
        tensors = {
            n: decode_tensor(rec[n], rec[f"{n}_shape"], rec[f"{n}_dtype"])
            for n in ("latent", "text_embedding", "condition")
            if rec.get(n) is not None
        }
        meta: dict[str, Any] = {k: rec[k] for k in META_COLUMNS}
        meta.update({k: rec[k] for k in CURATION_COLUMNS if k in rec})
        return cls(**meta, **tensors)  # type: ignore[arg-type]  # the columns are the fields, typed by the schema


def check_version(schema: pa.Schema, where: str, readable: tuple[str, ...] = (SCHEMA_VERSION,)) -> None:
    found = (schema.metadata or {}).get(VERSION_KEY)
    if found is None or found.decode() not in readable:
        raise DataError(
            f"{where}: schema version {found.decode() if found else None!r}, this wanray reads "
            f"{' or '.join(readable)}"
            + ("" if readable == TRAINING_READS else ": preprocess the videos again into a new directory")
        )


def pad_text_embedding(emb: torch.Tensor, length: int) -> torch.Tensor:
    """Zero-pad (tokens, dim) to (length, dim), as WanPipeline.encode_prompt does."""
    import torch

    return torch.cat([emb, emb.new_zeros(length - emb.shape[0], emb.shape[1])])
