"""MagCache calibration (pipelines/calibrate_cache.py): the per-expert residual ratios of a model, and the
quality and speed the cache then gives on the same prompts."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import numpy as np
import torch

from wanray.infer.cache import Calibration, ResidualRatios, StepCache
from wanray.infer.request import GenerationParams
from wanray.infer.sampler import Sampler
from wanray.infer.spec import StageSpec


def frame_quality(cached: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    """PSNR (dB) and SSIM of (F, H, W, 3) frames in [0, 1] against the reference (torchmetrics): the PSNR of one
    MSE over every frame (a per-frame mean would be infinite once one frame is exact), the SSIM the frames' mean."""
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    a, b = (torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2).double() for x in (cached, reference))
    psnr = peak_signal_noise_ratio(a, b, data_range=1.0).item()
    # SSIM's Gaussian window (sigma 1.5: 11 pixels; torchmetrics ignores kernel_size with a Gaussian kernel)
    ssim = structural_similarity_index_measure(a, b, data_range=1.0)
    assert isinstance(ssim, torch.Tensor)  # a tuple only with return_full_image or return_contrast_sensitivity
    return psnr, ssim.item()


class _Computed:
    """Counts the forwards an expert really computes: its last block's feed-forward runs only then."""

    def __init__(self, expert: Any):
        self.count = 0
        self._handle = expert.blocks[-1].ffn.register_forward_hook(self._seen)

    def _seen(self, *_) -> None:
        self.count += 1

    def close(self) -> int:
        self._handle.remove()
        return self.count


def passes(params: GenerationParams, spec: StageSpec) -> int:
    """Forwards of an expert per step: the conditional and unconditional ones with guidance (batched: one)."""
    return 2 if params.guided and not spec.batched_guidance else 1


def speedup(uncached: list[float], cached: list[float]) -> float:
    """Uncached over cached seconds, without the first prompt when there are more: the uncached pass renders
    first, and its first prompt also loads the adapters and compiles (infer.compile) for both passes."""
    first = 1 if len(uncached) > 1 else 0
    return sum(uncached[first:]) / sum(cached[first:])


def calibrate(spec: StageSpec, prompts: list[GenerationParams], threshold: float, log=print) -> Calibration:
    """Render each prompt uncached while recording each expert's residual ratios (their mean over the prompts is
    the calibration), then again with MagCache at `threshold`: PSNR and SSIM of those frames against the uncached
    ones, the speedup, and how many of each expert's forwards were computed, in `quality`."""
    if len({p.num_inference_steps for p in prompts}) != 1:
        raise ValueError("calibrate the prompts at one step count")
    if len({p.loras for p in prompts}) != 1:
        raise ValueError("calibrate the prompts with one set of adapters")
    if len({(p.sampler, p.flow_shift) for p in prompts}) != 1:
        raise ValueError("calibrate the prompts with one sampler and flow_shift")
    sampler = Sampler(spec)
    stages = {"high": sampler.high, **({"low": sampler.low} if sampler.low is not None else {})}
    recorded: dict[str, list[list[float]]] = {e: [] for e in stages}
    uncached, seconds = [], []
    for k, params in enumerate(prompts):
        recorders = {e: ResidualRatios(s.expert, passes(params, spec)) for e, s in stages.items()}
        start = time.perf_counter()
        uncached.append(sampler(params))
        seconds.append(time.perf_counter() - start)
        for e, r in recorders.items():
            recorded[e].append(r.close())
        log(f"[calibrate] prompt {k + 1}/{len(prompts)} uncached in {time.perf_counter() - start:.1f} s")
    ratios = {e: np.mean(np.array(runs, dtype=np.float64), axis=0).round(5).tolist() for e, runs in recorded.items()}
    calibration = Calibration(
        ratios,
        prompts[0].num_inference_steps,
        prompts[0].sampler,
        spec.flow_shift if prompts[0].flow_shift is None else prompts[0].flow_shift,
        len(prompts),
        loras=[[name, scale] for name, scale in prompts[0].loras],
    )

    plain = {e: s.cache for e, s in stages.items()}
    counters = {e: _Computed(s.expert) for e, s in stages.items()}
    for e, s in stages.items():
        s.cache = StepCache(s.expert, "magcache", threshold, ratios[e])
    scores, cached_seconds = [], []
    try:
        for params, reference in zip(prompts, uncached):
            start = time.perf_counter()
            frames = sampler(params)
            cached_seconds.append(time.perf_counter() - start)
            scores.append(frame_quality(frames, reference))
    finally:
        for e, s in stages.items():
            s.expert.disable_cache()
            s.cache = plain[e]
    computed = {e: c.close() for e, c in counters.items()}
    forwards = {e: len(r) * sum(passes(p, spec) for p in prompts) for e, r in ratios.items()}
    quality = {
        "threshold": threshold,
        "psnr_db": float(np.mean([p for p, _ in scores])),
        "ssim": float(np.mean([s for _, s in scores])),
        "speedup": speedup(seconds, cached_seconds),
        "computed_forwards": {e: f"{computed[e]}/{forwards[e]}" for e in stages},
    }
    return dataclasses.replace(calibration, quality=quality)
