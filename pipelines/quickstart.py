"""The whole loop on the embedded default, in one command:

    synthetic captioned videos -> preprocessing (Ray Data) -> brief training of both experts
    (Ray Train, FSDP2) -> export to a diffusers directory -> two-stage generation of a video

    python pipelines/quickstart.py [--out outputs/quickstart] [--clips 16] [--prompt "..."]

Uses configs/tiny.yaml (a tiny Wan2.2 pretrained on the synthetic shapes, written on first use) and a local Ray
instance (or the cluster in RAY_ADDRESS); prints where every artifact is.
"""

import argparse
import dataclasses
import sys
from pathlib import Path

from wanray.config import add_config_args, load_config
from wanray.data.preprocess import run_preprocess
from wanray.data.synthetic import write_dataset
from wanray.infer.api import GenerateRequest, resolve
from wanray.infer.batch import generate_videos
from wanray.infer.validation import Validation
from wanray.model_files import ensure_model
from wanray.runtime import connect_ray, fail
from wanray.train.export import export_run
from wanray.train.runs import best_checkpoint
from wanray.train.trainer import train_experts


def get_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    parser.add_argument("--out", default="outputs/quickstart", help="where all artifacts go")
    parser.add_argument("--clips", type=int, default=16, help="synthetic clips to generate")
    parser.add_argument("--prompt", default="a red circle moving left to right on a black background")
    return parser.parse_args()


def main(args):
    cfg = load_config(args.config, args.overrides)
    if not cfg.train.validation.every:  # validation at every checkpoint: videos of its prompt, the held-out loss
        v = dataclasses.replace(
            cfg.train.validation, every=cfg.train.checkpoint_every, prompts=[args.prompt], holdout_fraction=0.2
        )
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, validation=v))
    out = Path(args.out).resolve()
    model = ensure_model(cfg.model)
    print(f"[quickstart] 1/5 writing {args.clips} synthetic captioned clips", flush=True)
    manifest = write_dataset(out / "videos", count=args.clips)
    connect_ray(verbose=args.verbose)
    print("[quickstart] 2/5 preprocessing on Ray Data", flush=True)
    run_preprocess(cfg, str(manifest), str(out / "preprocessed"))
    print(f"[quickstart] 3/5 training both experts for {cfg.train.steps} steps on Ray Train", flush=True)
    validation = Validation(cfg, model) if cfg.train.validation.renders else None
    train_experts(cfg, "both", out / "preprocessed", out / "run", validation=validation)
    if cfg.train.validation.has_holdout:
        lowest = {e: best_checkpoint(out / "run", e)[1:] for e in ("high", "low") if (out / "run" / e).is_dir()}
        print(
            "[quickstart] held-out loss, lowest: "
            + ", ".join(f"{e}-noise expert {loss:.4f} at step {step}" for e, (step, loss) in lowest.items()),
            flush=True,
        )
    print("[quickstart] 4/5 exporting to a diffusers-format directory", flush=True)
    exported = export_run(cfg, out / "run", out / "exported")
    print("[quickstart] 5/5 two-stage generation with the fine-tuned experts", flush=True)
    (video,) = generate_videos(
        cfg, str(exported), [resolve(GenerateRequest(prompt=args.prompt), cfg)], out / "generated"
    )
    print("[quickstart] artifacts:")
    for name, path in [
        ("base model", model),
        ("videos", manifest),
        ("parquet", out / "preprocessed"),
        ("checkpoints", out / "run"),
        ("metrics", out / "run" / "high" / "metrics.jsonl"),
        ("validation", out / "run" / "high" / "validation"),
        ("exported", exported),
        ("video", out / "generated" / video["video"]),
    ]:
        print(f"  {name:<12}{path}")


if __name__ == "__main__":
    with fail(sys.argv[0]):
        main(get_args())
