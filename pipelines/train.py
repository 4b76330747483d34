"""Fine-tune Wan2.2 experts with FSDP2 on Ray Train from preprocessed Parquet.

    python pipelines/train.py --config configs/tiny.yaml --data prep/ --expert high|low|both --out runs/exp1

Each expert is its own TorchTrainer over train.workers workers, trained on its own side of
the boundary. Starting the same command again resumes from the latest checkpoint in --out
(also with a different train.workers).
"""
import argparse
import sys

from wanray.config import add_config_args, load_config
from wanray.runtime import connect_ray, fail
from wanray.train.trainer import train_experts


def get_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    parser.add_argument("--data", required=True, help="preprocess output directory (Parquet shards)")
    parser.add_argument("--expert", default="both", choices=["high", "low", "both"])
    parser.add_argument("--out", required=True, help="run directory: checkpoints and metrics per expert")
    return parser.parse_args()


def main(args):
    cfg = load_config(args.config, args.overrides)
    connect_ray()
    train_experts(cfg, args.expert, args.data, args.out)


if __name__ == "__main__":
    with fail(sys.argv[0]):
        main(get_args())
