"""Is the fine-tune better? Render one prompt file with every model and the same seeds, score every video,
and write a side-by-side report.

    python pipelines/evaluate.py --config configs/t2v_a14b.yaml --prompts prompts.txt --out eval/ \\
        --models base=/models/Wan2.2 ft=runs/exp1:best style=/models/Wan2.2+runs/style

A model is NAME=SPEC or SPEC: a diffusers-format model directory; a run directory (train.py --out; its latest
checkpoints, or RUN:best for those of the lowest held-out loss; exported against model.path); or BASE+ADAPTER
(a model directory with an adapter: a LoRA run, an export or an adapter file, at scale 1). --prompts is
generate.py's prompt file (a line per prompt, or a .jsonl with per-prompt settings and seeds). Scores: motion
and sharpness always, text alignment and temporal consistency with eval.clip_model (wanray.infer.scores).
Writes OUT/metrics.json, OUT/report.html (open it through any static file server over OUT) and OUT/videos/.
Runs, adapters, --prompts and --out may be object-store URIs (s3://...); model directories are local.
"""

import argparse
import sys

from wanray.config import add_config_args, load_config
from wanray.infer.evaluate import evaluate
from wanray.runtime import connect_ray, fail


def get_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    parser.add_argument("--models", nargs="+", required=True, help="NAME=SPEC or SPEC, two or more to compare")
    parser.add_argument("--prompts", required=True, help="prompt file: a line per prompt, or generate.py's .jsonl")
    parser.add_argument("--out", required=True, help="report directory")
    return parser.parse_args()


def main(args):
    cfg = load_config(args.config, args.overrides)
    connect_ray(verbose=args.verbose)
    evaluate(cfg, args.models, args.prompts, args.out)


if __name__ == "__main__":
    with fail(sys.argv[0]):
        main(get_args())
