"""Every error a user can cause with what they pass in. Drivers report these as one line and exit
with status 2 (wanray.runtime.fail); the REST API answers a RequestError with a 422."""

from __future__ import annotations

from collections.abc import Sequence


class ConfigError(ValueError):
    """A config file or override that does not fit the schema, or contradicts the model directory."""


class ManifestError(ValueError):
    """The manifest as a whole cannot be read (missing file, unknown format, no usable columns)."""


class ModelDirError(ValueError):
    """A model directory that is missing or not a diffusers-format Wan2.2 directory."""


class DataError(ValueError):
    """Preprocessed data or a training run directory this wanray cannot read (another schema version,
    a checkpoint without the data position of the seeded order)."""


class NonFiniteLoss(DataError):
    """A training step whose loss or gradients are not finite (a corrupt latent, an empty loss mask, a
    diverging learning rate): stopped before the optimizer wrote them into the weights."""

    def __init__(self, message: str, clips: Sequence[str] = (), step_clips: Sequence[str] = ()):
        super().__init__(message)
        self.clips = list(clips)
        """The clips whose micro-batch loss is not finite."""
        self.step_clips = list(step_clips)
        """Every clip of the step (the suspects when no micro-batch loss is itself non-finite)."""


class RequestError(ValueError):
    """A generation request the platform will not run (out of the configured bounds, malformed);
    the server sends the message back to the client as is."""


USER_ERRORS = (ConfigError, ManifestError, ModelDirError, DataError, RequestError, FileNotFoundError)
