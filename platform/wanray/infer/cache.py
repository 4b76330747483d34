"""Step caches of the expert stages (infer.cache), both diffusers' hooks on the transformer blocks:

- first_block: diffusers' first-block cache. A step whose first block's output changed by less than the
  threshold reuses the previous step's other blocks. The decision reads the hidden states, so it is
  single-device only (each rank of a split stage would see its own shard and decide on its own).
- magcache: MagCache (Ma et al., 2025) through diffusers' MagCacheConfig. The magnitude of the blocks' residual
  (last block's output minus first block's input) changes from step to step by a ratio that depends on the
  model and the step, not on the prompt; calibrated once per expert (pipelines/calibrate_cache.py), a step
  is skipped (the previous residual reused) while the accumulated error |1 - product of ratios| stays under
  the threshold, at most 3 steps in a row and never in the first fifth of an expert's steps. The decision
  depends on the ratios and the step index only, so every rank of a multi-device stage makes the same one
  with no collective.

Each expert keeps its own ratios over its own steps: the high-noise expert's steps 0..k-1 and the low-noise
expert's k..n-1 count from 0 in each (diffusers keeps one step counter per hooked transformer); a request with
another step count takes them by nearest-neighbour interpolation, as diffusers does.
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from wanray.errors import ConfigError
from wanray.io import write_text_atomic

RATIOS_FILE = "wanray_magcache.json"
"""The calibration beside the model (model_dir/wanray_magcache.json) unless infer.cache_ratios names another."""


@dataclass(frozen=True)
class Calibration:
    """What pipelines/calibrate_cache.py measured on a model: each expert's residual-magnitude ratio per own
    step, under the schedule it ran, and the quality the threshold gave on the calibration prompts."""

    ratios: dict[str, list[float]]
    """Expert -> one ratio per step of that expert (the first is 1.0)."""
    num_inference_steps: int
    sampler: str
    flow_shift: float | None
    prompts: int
    quality: dict = field(default_factory=dict)
    loras: list = field(default_factory=list)
    """The adapters the prompts rendered with, [name, scale] each (infer.default_loras, or a .jsonl's): an adapter
    changes the residuals, so the ratios fit requests with these."""
    """threshold, psnr_db, ssim, speedup, skipped steps per expert (see calibrate_cache.py)."""

    @classmethod
    def read(cls, path) -> Calibration:
        """The calibration file at `path`; a missing or malformed one is a one-line ConfigError."""
        p = Path(path)
        try:
            data = json.loads(p.read_text())
            calibration = cls(**data)
            ok = all(
                isinstance(r, list) and r and all(isinstance(x, (int, float)) and math.isfinite(x) for x in r)
                for r in calibration.ratios.values()
            )
        except FileNotFoundError:
            raise ConfigError(
                f"infer.cache is magcache but {p} does not exist: run pipelines/calibrate_cache.py on this model "
                "first (or point infer.cache_ratios at a calibration file)"
            ) from None
        except (json.JSONDecodeError, TypeError, AttributeError) as e:
            raise ConfigError(f"{p} is not a wanray MagCache calibration: {e}") from None
        if not ok:
            raise ConfigError(f"{p}: every expert's ratios must be a non-empty list of finite numbers")
        return calibration

    def write(self, path) -> None:
        write_text_atomic(Path(path), json.dumps(asdict(self), indent=2) + "\n")

    def expert(self, name: str, experts) -> list[float]:
        if name not in self.ratios:
            raise ConfigError(
                f"the MagCache calibration has ratios for {', '.join(self.ratios)}, not the {name}-noise expert "
                f"(this model's experts: {', '.join(experts)}): calibrate this model"
            )
        return self.ratios[name]


def ratios_path(configured: str, model_dir) -> Path:
    return Path(configured) if configured else Path(model_dir) / RATIOS_FILE


class StepCache:
    """One expert stage's cache: `begin(steps)` before a request's steps (MagCache takes the request's step
    count to map its ratios), `context(name, step)` around each forward (cond and uncond keep their own
    residuals, as in WanPipeline).

    Made before the stage's context parallelism is enabled: diffusers' hooks wrap a block's forward in the order
    they are registered, the last outermost, so the split of the tokens over the ranks (a hook on the first block)
    then runs before MagCache's and each rank's cache sees its own shard, as its last block returns it."""

    def __init__(self, expert: Any, mode: str, threshold: float, ratios: list[float] | None):
        """expert: a diffusers transformer (CacheMixin: enable_cache, cache_context)."""
        self.expert, self.mode, self.ratios, self.threshold = expert, mode, ratios, threshold
        self.config: Any = None
        if mode == "first_block":
            from diffusers import FirstBlockCacheConfig

            expert.enable_cache(FirstBlockCacheConfig(threshold=threshold))
        elif mode == "magcache":
            from diffusers import MagCacheConfig

            if not ratios:
                raise ConfigError("infer.cache magcache needs the expert's calibrated ratios")
            self.config = MagCacheConfig(threshold=threshold, num_inference_steps=len(ratios), mag_ratios=ratios)
            expert.enable_cache(self.config)

    @property
    def on(self) -> bool:
        return self.mode != "none"

    def begin(self, steps: int, skips: bool = True) -> None:
        """A new request in which this expert runs `steps` steps: fresh state (no residual of the last one), and
        the ratios mapped onto that many steps (the hooks share this config: they stay registered as they are).
        skips False: MagCache computes every step of this request (a threshold no accumulated error is under)."""
        if self.config is not None:
            self.config.threshold = self.threshold if skips else -1.0
        if self.config is not None and steps and steps != self.config.num_inference_steps:
            from diffusers.hooks.mag_cache import nearest_interp

            self.config.num_inference_steps = steps
            self.config.mag_ratios = nearest_interp(torch.tensor(self.ratios), steps)
        if self.on:
            self.expert._reset_stateful_cache()

    def context(self, name: str, step: int):
        return self.expert.cache_context(name, step_index=step) if self.on else contextlib.nullcontext()


class ResidualRatios:
    """Calibration: records, around an expert's blocks, the MagCache ratio of each forward (the mean over tokens
    of |residual| / |previous residual|, diffusers' formula), with `every` forwards per step (2 with classifier-free
    guidance: the conditional pass, first, is the one kept)."""

    def __init__(self, expert: Any, every: int):
        self.every, self.forwards = every, 0
        self.ratios: list[float] = []
        self._input: torch.Tensor | None = None
        self._previous: torch.Tensor | None = None
        blocks = expert.blocks
        self._handles = [
            blocks[0].register_forward_pre_hook(self._head, with_kwargs=True),
            blocks[-1].register_forward_hook(self._tail),
        ]

    def _head(self, module, args, kwargs) -> None:
        self._input = args[0] if args else kwargs["hidden_states"]

    def _tail(self, module, args, output) -> None:
        kept, self.forwards = self.forwards % self.every == 0, self.forwards + 1
        if not kept:
            return
        assert self._input is not None
        residual = (output[0] if isinstance(output, tuple) else output).float() - self._input.float()
        if self._previous is None:
            self.ratios.append(1.0)
        else:
            ratio = torch.linalg.norm(residual, dim=-1) / (torch.linalg.norm(self._previous, dim=-1) + 1e-8)
            self.ratios.append(ratio.mean().item())
        self._previous = residual

    def close(self) -> list[float]:
        for h in self._handles:
            h.remove()
        return self.ratios
