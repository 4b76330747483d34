"""Batch generation: one video per line of a prompts file, on Ray Data actors.

    python pipelines/generate.py --config configs/tiny.yaml --prompts prompts.txt --out videos/
    python pipelines/generate.py --config configs/t2v_a14b.yaml --plan   # a batch actor's device memory

Writes out/00000.mp4, 00001.mp4, ... (line order, blank lines skipped) and out/videos.jsonl.
Size, steps, guidance scales, negative prompt and seed come from the config
(data.height/width/num_frames, infer.*), or per line from a .jsonl prompts file
({"prompt": ..., "height": ..., "width": ..., "num_frames": ..., "seed": ..., and for an image-to-video
model "image": the first frame's path}). Runs on the cluster in RAY_ADDRESS, else on a
local Ray it starts.
"""

import argparse
import sys

from wanray.config import add_config_args, load_config
from wanray.infer.batch import generate_videos, read_prompts
from wanray.infer.plan import print_plan
from wanray.model_files import ensure_model
from wanray.models import expected_kind
from wanray.runtime import connect_ray, fail


def get_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    parser.add_argument("--prompts", help="text file, one prompt per line; or .jsonl, one request object per line")
    parser.add_argument("--out", help="output directory for the videos and videos.jsonl")
    parser.add_argument("--model", help="diffusers-format Wan2.2 directory to load (sets model.path)")
    parser.add_argument("--save-frames", action="store_true", help="also write each video's float frames as .npy")
    parser.add_argument(
        "--plan", action="store_true", help="print a batch actor's device memory at data.* instead of generating"
    )
    args = parser.parse_args()
    if not args.plan and not (args.prompts and args.out):
        parser.error("--prompts and --out are required (or --plan)")
    return args


def main(args):
    overrides = args.overrides + ([f"model.path={args.model}", "model.create_tiny=false"] if args.model else [])
    cfg = load_config(args.config, overrides)
    if args.plan:
        sys.exit(0 if print_plan(cfg, "batch") else 1)
    params = read_prompts(args.prompts, cfg, expected_kind(cfg.model))  # images only for an image-to-video model
    model_dir = ensure_model(cfg.model)
    connect_ray(verbose=args.verbose)
    generate_videos(cfg, str(model_dir), params, args.out, args.save_frames, log=lambda line: print(line, flush=True))


if __name__ == "__main__":
    with fail(sys.argv[0]):  # a prompt line outside the configured bounds is a one-line error too
        main(get_args())
