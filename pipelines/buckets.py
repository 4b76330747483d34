"""The bucket histogram of a preprocessed directory, or the buckets a config would make.

    python pipelines/buckets.py --data prep/                            # clips per bucket
    python pipelines/buckets.py --config configs/t2v_a14b.yaml --set data.bucket_budget=32760   # the set

Each bucket is HEIGHTxWIDTHxFRAMES with its DiT tokens per sample (see wanray.buckets), counted for the
model kind of --kind (16 pixels per token side for the A14B models, 32 for TI2V-5B): by default the
config's model (model.path, or model.tiny_kind when the tiny model is to be written).
"""

import argparse
import sys

from wanray import models
from wanray.buckets import Bucket, BucketSet
from wanray.config import add_config_args, load_config
from wanray.data.shards import bucket_counts
from wanray.errors import ModelDirError
from wanray.runtime import fail
from wanray.wan import KINDS, ModelKind


def histogram(counts: dict[str, int], kind: ModelKind, width: int = 40) -> list[str]:
    total, most = sum(counts.values()), max(counts.values(), default=0)
    lines = [f"{'bucket':>14} {'tokens':>8} {'clips':>7} {'share':>6}"]
    for name, n in counts.items():
        bar = "#" * max(1, round(width * n / most))
        lines.append(f"{name:>14} {Bucket.parse(name, kind).tokens(kind):>8,} {n:>7,} {n / total:>6.1%} {bar}")
    lines.append(f"{'total':>14} {'':>8} {total:>7,}")
    return lines


def main(args):
    cfg = load_config(args.config, args.overrides)
    try:
        kind = KINDS[args.kind] if args.kind else models.expected_kind(cfg.model)
    except ModelDirError as e:
        raise ModelDirError(f"{e}: pass --kind to count tokens without the model") from None
    if args.data:
        counts = bucket_counts(args.data)
        if not counts:
            raise FileNotFoundError(f"no preprocessed clips (part-*.parquet) in {args.data}")
        print("\n".join(histogram(counts, kind)))
        return
    buckets = BucketSet.from_config(cfg.data, kind)
    n = len(buckets.buckets)
    print(f"{n} bucket{'' if n == 1 else 's'}, at most {buckets.max_tokens:,} tokens: {buckets.describe()}")


def get_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    parser.add_argument("--data", help="preprocess output directory: print its clips per bucket")
    parser.add_argument(
        "--kind", choices=sorted(KINDS), help="count tokens for this model kind (default: the config's)"
    )
    return parser.parse_args()


if __name__ == "__main__":
    with fail(sys.argv[0]):
        main(get_args())
