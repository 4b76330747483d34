"""The whole loop on the embedded default: synthetic videos -> preprocessing.

    python pipelines/quickstart.py [--out outputs/quickstart] [--clips 16]

Uses configs/tiny.yaml (a tiny random-init Wan2.2 written on first use) and a local
Ray instance (or the cluster in RAY_ADDRESS); prints where every artifact is.
"""
import argparse
import sys
from pathlib import Path

from wanray.config import add_config_args, load_config
from wanray.data.preprocess import run_preprocess
from wanray.data.synthetic import write_dataset
from wanray.runtime import connect_ray, fail


def get_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    parser.add_argument("--out", default="outputs/quickstart", help="where all artifacts go")
    parser.add_argument("--clips", type=int, default=16, help="synthetic clips to generate")
    return parser.parse_args()


def main(args):
    cfg = load_config(args.config, args.overrides)
    out = Path(args.out).resolve()
    print(f"[quickstart] 1/2 writing {args.clips} synthetic captioned clips")
    manifest = write_dataset(out / "videos", count=args.clips)
    connect_ray()
    print("[quickstart] 2/2 preprocessing on Ray Data")
    run_preprocess(cfg, str(manifest), str(out / "preprocessed"))
    print("[quickstart] artifacts:")
    print(f"  model       {Path(cfg.model.path).resolve()}")
    print(f"  videos      {manifest}")
    print(f"  parquet     {out / 'preprocessed'}  (summary.json, rejects.jsonl)")


if __name__ == "__main__":
    with fail(sys.argv[0]):
        main(get_args())
