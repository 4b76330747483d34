"""Fine-tune Wan2.2 experts with FSDP2 on Ray Train from preprocessed Parquet.

    python pipelines/train.py --config configs/tiny.yaml --data prep/ --expert high|low|both --out runs/exp1

Each expert is its own TorchTrainer over train.workers workers, trained on its own side of
the boundary. Starting the same command again resumes from the latest checkpoint in --out
(also with a different train.workers).

    python pipelines/train.py --config configs/t2v_a14b.yaml --plan [--set train.workers=8]

prints each expert's memory per rank against train.device_memory_gb instead (no weights, no
accelerator, no Ray: the model directory's config files only), and with train.validation.every set
the validation actor's; exit status 1 when one does not fit.
"""

import argparse
import sys

from wanray.config import add_config_args, load_config
from wanray.infer.plan import print_plan
from wanray.infer.validation import Validation
from wanray.model_files import ensure_model
from wanray.runtime import connect_ray, fail
from wanray.train.plan import print_plans
from wanray.train.trainer import train_experts


def get_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    parser.add_argument("--data", help="preprocess output directory (Parquet shards)")
    parser.add_argument("--expert", default="both", choices=["high", "low", "both"])
    parser.add_argument(
        "--out",
        help="run directory (local, shared or a URI such as s3://bucket/run): checkpoints and metrics per expert",
    )
    parser.add_argument("--plan", action="store_true", help="print the memory plan per rank instead of training")
    args = parser.parse_args()
    if not args.plan and not (args.data and args.out):
        parser.error("--data and --out are required (or --plan)")
    return args


def main(args):
    cfg = load_config(args.config, args.overrides)
    if args.plan:
        fits = print_plans(cfg, args.expert)
        if cfg.train.validation.renders:
            fits = print_plan(cfg, "validation") and fits
        sys.exit(0 if fits else 1)
    connect_ray(verbose=args.verbose)
    validation = Validation(cfg, ensure_model(cfg.model)) if cfg.train.validation.renders else None
    train_experts(cfg, args.expert, args.data, args.out, validation=validation)


if __name__ == "__main__":
    with fail(sys.argv[0]):
        main(get_args())
