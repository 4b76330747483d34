"""The bucket histogram of a preprocessed directory, or the buckets a config would make.

    python pipelines/buckets.py --data prep/                            # clips per bucket
    python pipelines/buckets.py --config configs/t2v_a14b.yaml --set data.bucket_budget=32760   # the set

Each bucket is HEIGHTxWIDTHxFRAMES with its DiT tokens per sample (see wanray.buckets).
"""
import argparse
import sys

from wanray.buckets import Bucket, BucketSet
from wanray.config import add_config_args, load_config
from wanray.data.shards import bucket_counts
from wanray.runtime import fail


def histogram(counts: dict[str, int], width: int = 40) -> list[str]:
    total, most = sum(counts.values()), max(counts.values(), default=0)
    lines = [f"{'bucket':>14} {'tokens':>8} {'clips':>7} {'share':>6}"]
    for name, n in counts.items():
        bar = "#" * max(1, round(width * n / most))
        lines.append(f"{name:>14} {Bucket.parse(name).tokens:>8,} {n:>7,} {n / total:>6.1%} {bar}")
    lines.append(f"{'total':>14} {'':>8} {total:>7,}")
    return lines


def main(args):
    if args.data:
        counts = bucket_counts(args.data)
        if not counts:
            raise FileNotFoundError(f"no preprocessed clips (part-*.parquet) in {args.data}")
        print("\n".join(histogram(counts)))
        return
    cfg = load_config(args.config, args.overrides)
    buckets = BucketSet.from_config(cfg.data)
    n = len(buckets.buckets)
    print(f"{n} bucket{'' if n == 1 else 's'}, at most {buckets.max_tokens:,} tokens: {buckets.describe()}")


def get_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    parser.add_argument("--data", help="preprocess output directory: print its clips per bucket")
    return parser.parse_args()


if __name__ == "__main__":
    with fail(sys.argv[0]):
        main(get_args())
