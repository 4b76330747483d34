"""Calibrate MagCache for a model: each expert's residual ratios, written beside the model for infer.cache=magcache.

    python pipelines/calibrate_cache.py --config configs/t2v_a14b.yaml --prompts prompts.txt
    python pipelines/calibrate_cache.py --config configs/tiny.yaml --prompts prompts.txt --threshold 0.1 --out r.json

Renders each prompt (a text file, one per line, or generate.py's .jsonl) at infer.num_inference_steps with
infer.sampler in one Ray task on infer.batch's resources, uncached, recording each expert's ratios; then again
with MagCache at --threshold (default infer.cache_threshold) and prints the quality gate: PSNR and SSIM of the
cached frames against the uncached ones, the speedup and the forwards computed. Writes <model.path>/
wanray_magcache.json (or --out, or infer.cache_ratios). Serve with infer.cache=magcache.
"""

import argparse
import dataclasses
import sys

from wanray.config import add_config_args, load_config
from wanray.infer.batch import read_prompts
from wanray.infer.cache import ratios_path
from wanray.model_files import ensure_model
from wanray.models import expected_kind
from wanray.runtime import connect_ray, fail


def get_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    parser.add_argument("--prompts", required=True, help="text file, one prompt per line; or generate.py's .jsonl")
    parser.add_argument(
        "--threshold", type=float, help="MagCache threshold of the quality gate (infer.cache_threshold)"
    )
    parser.add_argument("--out", help="calibration file to write (default: infer.cache_ratios, else beside the model)")
    return parser.parse_args()


def run(cfg, model_dir: str, prompts: list, threshold: float):
    from wanray.infer.calibrate import calibrate
    from wanray.infer.spec import StageSpec

    # one process: the ratios are the model's, whatever the devices it is later served over
    spec = dataclasses.replace(StageSpec.for_batch(model_dir, cfg), calibration=None, devices={"high": 1, "low": 1})
    return calibrate(spec, prompts, threshold, log=lambda line: print(line, flush=True))


def main(args):
    cfg = load_config(args.config, [*args.overrides, "infer.cache=none"])
    threshold = cfg.infer.cache_threshold if args.threshold is None else args.threshold
    if not 0 < threshold < 10:
        raise SystemExit(f"--threshold must lie in (0, 10), got {threshold}")
    steps, sampler = cfg.infer.num_inference_steps, cfg.infer.sampler
    prompts = [
        dataclasses.replace(p, num_inference_steps=steps, sampler=sampler)
        for p in read_prompts(args.prompts, cfg, expected_kind(cfg.model))
    ]
    model_dir = str(ensure_model(cfg.model))
    connect_ray(verbose=args.verbose)
    import ray

    loras = ", ".join(f"{n} at {s:g}" for n, s in prompts[0].loras) or "none"
    print(
        f"[calibrate] {len(prompts)} prompts at {steps} {sampler} steps on {cfg.infer.batch.device}, adapters: {loras} "
        "(the ratios fit requests with these)",
        flush=True,
    )
    task = ray.remote(**cfg.infer.batch.ray_options())(run)
    calibration = ray.get(task.remote(cfg, model_dir, prompts, threshold))
    out = args.out or ratios_path(cfg.infer.cache_ratios, model_dir)
    calibration.write(out)
    q = calibration.quality
    computed = ", ".join(f"{e} {n}" for e, n in q["computed_forwards"].items())
    print(
        f"[calibrate] MagCache at threshold {threshold:g}: PSNR {q['psnr_db']:.2f} dB, SSIM {q['ssim']:.4f} against "
        f"the uncached frames, {q['speedup']:.2f}x faster; forwards computed: {computed}",
        flush=True,
    )
    print(f"[calibrate] wrote {out}: serve with infer.cache=magcache", flush=True)


if __name__ == "__main__":
    with fail(sys.argv[0]):
        main(get_args())
