"""Preprocess a captioned video corpus into training Parquet on Ray Data.

    python pipelines/preprocess.py --config configs/tiny.yaml --data data.txt --out prep/

Runs on the cluster in RAY_ADDRESS, else on a local Ray it starts. Re-running on the
same --out resumes: clips already written (or rejected) are skipped.
"""

import argparse
import sys

from wanray.config import add_config_args, load_config
from wanray.data.preprocess import PreprocessRun
from wanray.runtime import connect_ray, fail


def get_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    parser.add_argument(
        "--data",
        required=True,
        help="manifest: data.txt, annotation .json, .jsonl or .csv; a path or a URI (s3://bucket/corpus/data.jsonl)",
    )
    parser.add_argument("--out", required=True, help="output directory for Parquet shards, rejects and summary")
    return parser.parse_args()


def main(args):
    cfg = load_config(args.config, args.overrides)
    run = PreprocessRun.prepare(cfg, args.data, args.out)  # bad input fails here, before joining Ray
    connect_ray(verbose=args.verbose)
    run.execute()


if __name__ == "__main__":
    with fail(sys.argv[0]):
        main(get_args())
