"""Export trained experts to a diffusers-format Wan2.2 directory, or convert one expert to DCP.

    python pipelines/export.py --config configs/tiny.yaml --run runs/exp1 --out exported/
    python pipelines/export.py --config configs/t2v_a14b.yaml --to-dcp high --out ckpt/high-dcp

The first form copies model.path to --out with the latest checkpoint (--best: the one of the lowest
held-out loss) of each expert trained in --run in place (safetensors; LoRA runs also write the adapter) and the boundary
they trained with in model_index.json; the result loads with `WanPipeline.from_pretrained`. The
second writes one expert of model.path as a DCP directory for sharded loading in training (--set train.init_dcp=...).
"""

import argparse
import sys

from wanray import model_files
from wanray.config import add_config_args, load_config
from wanray.errors import ConfigError
from wanray.runtime import fail
from wanray.train.export import diffusers_to_dcp, export_run
from wanray.wan import EXPERTS


def get_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    parser.add_argument("--run", help="training run directory (pipelines/train.py --out)")
    parser.add_argument("--to-dcp", choices=EXPERTS, help="convert this expert of model.path to DCP instead")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument(
        "--best",
        action="store_true",
        help="export each expert's checkpoint of the lowest held-out loss (the run's <expert>/best.json) "
        "instead of its latest",
    )
    return parser.parse_args()


def main(args):
    cfg = load_config(args.config, args.overrides)
    model_path = model_files.ensure_model(cfg.model)
    if args.to_dcp:
        out = diffusers_to_dcp(model_path, args.to_dcp, args.out)
        print(f"[export] {args.to_dcp}-noise expert of {model_path} -> DCP {out}")
        return
    if not args.run:
        raise ConfigError("give --run RUN_DIR to export, or --to-dcp EXPERT to convert")
    export_run(cfg, args.run, args.out, best=args.best)


if __name__ == "__main__":
    with fail(sys.argv[0]):
        main(get_args())
