"""What a generation request is as it moves through the sampler's stages: its resolved parameters, the text
embeddings, the denoising state between the expert stages, and how a request is stopped."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


class Cancelled(Exception):
    """The request was cancelled (its client went away) while an expert stage ran it: it stopped at a step."""


class AgreedFailure(RuntimeError):
    """Every rank of a multi-device stage raised it at the same point, before any other collective (an adapter
    that failed to load on one of them): the ranks are still in step, and the next request runs."""


class StageUnavailable(Exception):
    """A stage replica that can run no request now (a multi-device expert whose ranks fell out of step, until
    Serve replaces it): 503 with Retry-After."""


IMAGE_FORMATS = ("PNG", "JPEG", "WEBP")
MAX_IMAGE_PIXELS = 64 * 1024 * 1024
"""The most pixels an input image may have (8192 x 8192): its size is read from the header, before anything is
decoded, so a small file that declares a huge image (a decompression bomb) is refused without allocating it."""


def image_from_base64(data: str, name: str = "image"):
    """A base64-encoded PNG, JPEG or WebP file (GenerationParams.image) as an RGB PIL image; RequestError,
    naming the field `name`, if it is none, or larger than MAX_IMAGE_PIXELS."""
    import base64
    import binascii
    import io

    from PIL import Image

    from wanray.errors import RequestError

    try:
        # formats: only these decoders (Pillow would otherwise try every format it knows, EPS's Ghostscript too)
        with Image.open(io.BytesIO(base64.b64decode(data, validate=True)), formats=IMAGE_FORMATS) as img:
            w, h = img.size
            if w * h > MAX_IMAGE_PIXELS:
                raise RequestError(f"{name} is {w}x{h} pixels, at most {MAX_IMAGE_PIXELS} pixels are served")
            return img.convert("RGB")
    except RequestError:  # the size check above (a ValueError too: kept as it is)
        raise
    except Image.DecompressionBombError:  # Image.open's own bound (twice PIL.Image.MAX_IMAGE_PIXELS) came first
        raise RequestError(f"{name} has more than {MAX_IMAGE_PIXELS} pixels, more than are served") from None
    except (binascii.Error, ValueError, OSError, SyntaxError) as e:  # PIL: UnidentifiedImageError is an OSError
        raise RequestError(
            f"{name} is not a base64-encoded PNG, JPEG or WebP file: {str(e).splitlines()[0][:120]}"
        ) from None


# UniPC state that set_timesteps and step keep on the compute device: timesteps, and the multistep
# history (last solver_order model outputs, their timesteps, the last sample). sigmas stay on the CPU.
SCHEDULER_DEVICE_STATE = ("timesteps", "model_outputs", "timestep_list", "last_sample")
EULER_DEVICE_STATE = ("timesteps", "sigmas")


def multistep(scheduler) -> bool:
    """UniPC (a multistep history of model outputs), not flow-matching Euler (none)."""
    return hasattr(scheduler, "model_outputs")


@dataclass(frozen=True)
class GenerationParams:
    """One video to generate, every value resolved (see `wanray.infer.api.resolve`)."""

    prompt: str
    negative_prompt: str
    height: int
    width: int
    num_frames: int
    num_inference_steps: int
    guidance_scale: float
    """High-noise expert's guidance."""
    guidance_scale_2: float
    """Low-noise expert's guidance."""
    seed: int
    image: str | None = None
    """Image-to-video models: the first frame, an image file's bytes (PNG, JPEG, WebP) in base64."""
    last_image: str | None = None
    """I2V-A14B: the last frame too, likewise (diffusers' last_image)."""
    loras: tuple[tuple[str, float], ...] = ()
    """Adapters (infer.loras names) and their scales, stacked; none: the base experts."""
    sampler: str = "unipc"
    """The scheduler: unipc (the model directory's) or euler (the distilled adapters' flow-matching steps)."""
    flow_shift: float | None = None
    """Shift of the scheduler's flow sigmas; None: the model directory's."""

    def __post_init__(self) -> None:  # from JSON (a batch actor's rows) the adapters come as lists
        object.__setattr__(self, "loras", tuple((str(n), float(s)) for n, s in self.loras))

    @property
    def guided(self) -> bool:
        """Classifier-free guidance on: diffusers decides it from guidance_scale alone, for both stages."""
        return self.guidance_scale > 1.0


@dataclass
class TextEmbeddings:
    prompt: torch.Tensor
    """(1, 512, text_dim), zero-padded like WanPipeline.encode_prompt, in the text encoder's dtype."""
    negative: torch.Tensor | None
    """The negative prompt's, None when guidance is off."""


@dataclass
class DenoiseState:
    """What the high-noise stage hands the low-noise stage: latents and the scheduler's state."""

    latents: torch.Tensor
    """(1, 16, (frames-1)/4+1, height/8, width/8), float32 like WanPipeline's."""
    scheduler: Any
    """The request's own scheduler: its timesteps and multistep history (model outputs, last sample)."""
    step: int
    """Index of the next timestep to run."""
    condition: torch.Tensor | None = None
    """The first image, as VideoDecoder.condition gives it: I2V-A14B's (1, 4 + 16, F, H, W) mask and
    condition latents, concatenated to the latents at every step; TI2V-5B's (1, 48, 1, H, W) image
    latent, which stands in for the first latent frame (WanImageToVideoPipeline does both)."""

    def to(self, device: torch.device) -> DenoiseState:
        """Move the latents and the scheduler's per-request tensors (the rest stays on the CPU, as in diffusers)."""

        def move(v):
            return [move(x) for x in v] if isinstance(v, list) else v.to(device) if torch.is_tensor(v) else v

        # flow-matching Euler keeps its timesteps and sigmas where set_timesteps put them
        on_device = () if self.scheduler is None else EULER_DEVICE_STATE
        for name in SCHEDULER_DEVICE_STATE if multistep(self.scheduler) else on_device:
            setattr(self.scheduler, name, move(getattr(self.scheduler, name)))
        self.latents = self.latents.to(device)
        if self.condition is not None:
            self.condition = self.condition.to(device)
        return self
