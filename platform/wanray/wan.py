"""The Wan2.2 contract: the facts preprocessing, training, inference and export must agree on.

    model directory ──► models.read_contract ──► WanContract ──► preprocessing (text length, latent normalisation)
    (model_index.json,                                       ├─► training (boundary: each expert's timestep range)
     vae/config.json,                                        ├─► sampler stages (switch rule, text length, latent
     scheduler/)                                             │                  shape, de-normalisation)
    + model.boundary                                         └─► export (the boundary trained with: model_index.json)

The expert boundary comes from the directory's `boundary_ratio` (the experts were trained for
it); `model.boundary` only fills in for a directory that has none, and contradicting the
directory is an error unless `model.force_boundary` says so. The switch rule is diffusers'
`WanPipeline`: the high-noise expert runs the steps whose scheduler timestep t satisfies
t >= boundary * num_train_timesteps, the low-noise expert the rest.
"""

from __future__ import annotations

from dataclasses import dataclass

from wanray.errors import ConfigError

TEXT_TOKENS = 512
"""UMT5 sequence length of every Wan2.2 model: WanPipeline's max_sequence_length. Embeddings are
stored unpadded and zero-padded to it for training and sampling alike."""
EXPERTS = ("high", "low")
VAE_DTYPE = "float32"
VAE_STRIDE_TEMPORAL = 4
"""Video frames per latent frame after the first in every Wan2.2 VAE (Wan2.1's and Wan2.2's): clips are
4n+1 frames, 81 frames are 21 latent frames."""
PATCH = (1, 2, 2)
"""The DiT's patch over the latents (frames, height, width) in every Wan2.2 transformer."""


def latent_frames(frames: int) -> int:
    """Latent frames of a clip of `frames` (4n+1) video frames: 81 -> 21."""
    return (frames - 1) // VAE_STRIDE_TEMPORAL + 1


def valid_frames(frames: int) -> bool:
    """A frame count the VAE takes: 4n+1 (1 for a still image)."""
    return frames >= 1 and (frames - 1) % VAE_STRIDE_TEMPORAL == 0


def latent_tokens(latent_shape) -> int:
    """DiT tokens of a latent of shape (..., F, H, W): F x H/2 x W/2 (21 x 30 x 52 = 32,760 at 480x832x81)."""
    *_, f, h, w = latent_shape
    return f // PATCH[0] * (h // PATCH[1]) * (w // PATCH[2])


"""The Wan VAE encodes and decodes in float32 whatever the experts' dtype, as the official code and
diffusers' Wan examples run it; latents are stored in preprocess.encoders.dtype."""


@dataclass(frozen=True)
class ModelKind:
    """Which Wan2.2 model a directory holds, read from its config files (kind_from), never assumed."""

    name: str
    title: str
    experts: tuple[str, ...]
    """The transformers it has: ("high", "low") = transformer/ and transformer_2/, or ("high",) alone."""
    latent_channels: int
    """The VAE's z_dim: 16 (Wan2.1 VAE), 48 (Wan2.2 VAE, 16x spatial compression)."""
    in_channels: int
    """What the transformer takes: the noisy latents, plus for I2V a 4-channel frame mask and the
    16-channel first-frame condition (36)."""
    image: str
    """The first image: "none" (text to video), "required" (image to video), "optional" (both)."""
    expand_timesteps: bool
    """TI2V: per-token timesteps, the first latent frame (the image) kept clean at timestep 0."""
    pipeline: str
    """diffusers' pipeline class for it."""
    boundary: float | None
    """The official expert switch (wan/configs of Wan-Video/Wan2.2); None for one transformer."""
    size_multiple: int
    """Pixels per DiT token side (VAE stride x patch 2): heights and widths are multiples of it."""

    @property
    def one_transformer(self) -> bool:
        return len(self.experts) == 1

    def tokens(self, frames: int, height: int, width: int) -> int:
        """DiT tokens of a clip of frames x height x width pixels: latent frames x height/m x width/m,
        m = size_multiple (VAE stride x patch: 8 x 2 = 16 for A14B, 16 x 2 = 32 for TI2V-5B)."""
        return latent_frames(frames) // PATCH[0] * (height // self.size_multiple) * (width // self.size_multiple)

    @property
    def takes_last_image(self) -> bool:
        """A last frame besides the first (diffusers' `last_image`): I2V-A14B's mask and condition
        carry one; TI2V-5B's expand_timesteps path has no place for it."""
        return self.image == "required"


KINDS = {
    k.name: k
    for k in (
        ModelKind("t2v-a14b", "Wan2.2-T2V-A14B", ("high", "low"), 16, 16, "none", False, "WanPipeline", 0.875, 16),
        ModelKind(
            "i2v-a14b",
            "Wan2.2-I2V-A14B",
            ("high", "low"),
            16,
            36,
            "required",
            False,
            "WanImageToVideoPipeline",
            0.9,
            16,
        ),
        ModelKind("ti2v-5b", "Wan2.2-TI2V-5B", ("high",), 48, 48, "optional", True, "WanPipeline", None, 32),
    )
}


def has_second_transformer(model_index: dict) -> bool:
    """model_index.json names a transformer_2 (diffusers writes [null, null] for none)."""
    return model_index.get("transformer_2") not in (None, [None, None])


def kind_from(model_index: dict, transformer_config: dict, vae_config: dict, where: str) -> ModelKind:
    """The kind a model directory's facts describe; a ConfigError names them when they fit none."""
    two = has_second_transformer(model_index)
    facts = (
        model_index.get("_class_name"),
        two,
        int(transformer_config.get("in_channels", 16)),
        int(vae_config.get("z_dim", 16)),
        bool(model_index.get("expand_timesteps", False)),
    )
    for kind in KINDS.values():
        if facts == (
            kind.pipeline,
            len(kind.experts) == 2,
            kind.in_channels,
            kind.latent_channels,
            kind.expand_timesteps,
        ):
            return kind
    pipeline, _, in_channels, z, expand = facts
    raise ConfigError(
        f"{where}: {pipeline} with {'two transformers' if two else 'one transformer'}, transformer "
        f"in_channels {in_channels}, VAE z_dim {z}, expand_timesteps {expand} is none of the Wan2.2 "
        f"models wanray knows ({', '.join(k.title for k in KINDS.values())})"
    )


@dataclass(frozen=True)
class WanContract:
    boundary: float
    """Expert switch as a fraction of num_train_timesteps."""
    boundary_source: str
    """Where the boundary came from, in words (for logs and run records)."""
    num_train_timesteps: int
    vae_scale_temporal: int
    vae_scale_spatial: int
    latents_mean: tuple[float, ...]
    latents_std: tuple[float, ...]
    text_tokens: int = TEXT_TOKENS
    kind: ModelKind = KINDS["t2v-a14b"]

    @property
    def boundary_timestep(self) -> float:
        """t at and above which the high-noise expert runs: 875.0 for T2V-A14B."""
        return self.boundary * self.num_train_timesteps

    def uses_high_expert(self, t):
        """The switch rule, elementwise on a tensor of (shifted) timesteps."""
        return t >= self.boundary_timestep

    def timestep_range(self, expert: str) -> tuple[float, float]:
        """[low, high) of the timesteps `expert` owns (the high expert's range includes 1000)."""
        if expert not in EXPERTS:
            raise ValueError(f"expert must be 'high' or 'low', got {expert!r}")
        return (
            (self.boundary_timestep, float(self.num_train_timesteps))
            if expert == "high"
            else (0.0, self.boundary_timestep)
        )

    def describe_range(self, expert: str) -> str:
        low, high = self.timestep_range(expert)
        return f"t in [{low:g}, {high:g}{']' if expert == 'high' else ')'}"

    def latent_shape(self, channels: int, num_frames: int, height: int, width: int) -> tuple[int, ...]:
        """(1, channels, (frames-1)/4+1, height/8, width/8) with the real VAE's strides."""
        return (
            1,
            channels,
            (num_frames - 1) // self.vae_scale_temporal + 1,
            height // self.vae_scale_spatial,
            width // self.vae_scale_spatial,
        )

    def bucket_name(self, latent_shape: tuple[int, ...]) -> str:
        """ "HEIGHTxWIDTHxFRAMES" of a (C, F, H, W) latent shape, through the VAE's strides."""
        _, f, h, w = latent_shape
        s = self.vae_scale_spatial
        return f"{h * s}x{w * s}x{(f - 1) * self.vae_scale_temporal + 1}"

    def normalize(self, z):
        return normalize_latents(z, self.latents_mean, self.latents_std)

    def denormalize(self, latents):
        return denormalize_latents(latents, self.latents_mean, self.latents_std)


def _stats(like, mean, std):
    import torch

    shape = (1, len(mean), 1, 1, 1)
    return (
        torch.tensor(mean).view(shape).to(like.device, like.dtype),
        torch.tensor(std).view(shape).to(like.device, like.dtype),
    )


def normalize_latents(z, latents_mean, latents_std):
    """VAE posterior (B, z, F, H, W) -> the latents training and sampling work in: (z - mean) / std,
    with the VAE config's per-channel latents_mean / latents_std."""
    mean, std = _stats(z, latents_mean, latents_std)
    return (z - mean) / std


def denormalize_latents(latents, latents_mean, latents_std):
    """The inverse, in WanPipeline's exact expression (latents / (1 / std) + mean), before VAE decode."""
    mean, std = _stats(latents, latents_mean, latents_std)
    return latents / (1.0 / std) + mean


def first_frame_mask(latent_shape: tuple[int, ...], temporal_scale: int = 4, last: bool = False):
    """I2V-A14B's mask channels, as diffusers' WanImageToVideoPipeline.prepare_latents builds them:
    (B, temporal_scale, F, H, W), ones on the first latent frame (the given image), zeros elsewhere;
    with a `last` image also one on the video's last frame, the last channel of the last latent frame
    (the mask is per video frame, the first repeated temporal_scale times, folded into channels)."""
    import torch

    b, _, f, h, w = latent_shape
    mask = torch.zeros(b, temporal_scale, f, h, w)
    mask[:, :, 0] = 1.0
    if last:
        mask[:, -1, -1] = 1.0
    return mask


def clean_frame_mask(latent_shape: tuple[int, ...], first_frame):
    """TI2V-5B's frame mask, as diffusers' WanPipeline / WanImageToVideoPipeline(expand_timesteps=True)
    build it: (B, 1, F, H, W) float32 ones, zeros on the first latent frame of the clips `first_frame`
    (a (B,) bool tensor, or a bool for all) flags: those keep their clean first frame."""
    import torch

    mask = torch.ones(latent_shape[0], 1, *latent_shape[2:])
    mask[torch.as_tensor(first_frame).expand(latent_shape[0]), :, 0] = 0.0  # a plain bool would index a new dim
    return mask


def token_timesteps(mask, t):
    """Per-token timesteps (B, F x H/2 x W/2) of TI2V-5B: each patch's mask value x its clip's t ((B,) or
    a scalar), so a clean first frame's tokens are at timestep 0."""
    return (mask[:, 0, :: PATCH[0], :: PATCH[1], :: PATCH[2]] * t.reshape(-1, 1, 1, 1)).flatten(1)


def resolve_boundary(stored: float | None, configured: float | None, force: bool) -> tuple[float, str]:
    """(boundary, where it came from): the directory's, else the config's; a contradiction is an error
    unless forced."""
    if stored is None:
        if configured is None:
            raise ConfigError("the model directory's model_index.json has no boundary_ratio: set model.boundary")
        return configured, "model.boundary (model_index.json has none)"
    if configured is None or configured == stored:
        return stored, "model_index.json"
    if not force:
        raise ConfigError(
            f"model.boundary={configured} contradicts the model directory's boundary_ratio {stored} "
            "(its experts were trained for it); drop model.boundary, or set model.force_boundary=true "
            "to train or sample with another boundary"
        )
    return configured, f"model.boundary, forced over model_index.json's {stored}"


def contract_from(
    model_index: dict,
    vae_config: dict,
    scheduler_config: dict,
    boundary: float | None,
    force_boundary: bool = False,
    where: str = "the VAE config",
    transformer_config: dict | None = None,
) -> WanContract:
    """The contract of a Wan2.2 directory from its model_index.json, vae/config.json,
    scheduler/scheduler_config.json and transformer/config.json (wanray.models.read_contract reads
    them) under model.boundary and model.force_boundary. A one-transformer model (TI2V-5B) runs every
    step: boundary 0."""
    kind = kind_from(model_index, transformer_config or {}, vae_config, "the model directory")
    if len(kind.experts) == 1:
        if boundary is not None:
            raise ConfigError(f"model.boundary does not apply to {kind.title}: it has one transformer")
        resolved, source = 0.0, f"{kind.title} has one transformer, which runs every step"
    else:
        resolved, source = resolve_boundary(model_index.get("boundary_ratio"), boundary, force_boundary)
    z = vae_config.get("z_dim", 16)
    mean, std = vae_config.get("latents_mean"), vae_config.get("latents_std")
    if not (isinstance(mean, list) and isinstance(std, list) and len(mean) == len(std) == z):
        raise ConfigError(f"{where} must list z_dim={z} latents_mean and latents_std values")
    return WanContract(
        boundary=float(resolved),
        boundary_source=source,
        num_train_timesteps=int(scheduler_config.get("num_train_timesteps", 1000)),
        vae_scale_temporal=int(vae_config.get("scale_factor_temporal", 4)),
        vae_scale_spatial=int(vae_config.get("scale_factor_spatial", 8)),
        latents_mean=tuple(map(float, mean)),
        latents_std=tuple(map(float, std)),
        kind=kind,
    )
