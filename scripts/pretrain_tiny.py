"""Pretrain the tiny Wan2.2 on the synthetic shapes world, so that it draws what its prompts say.

    .venv/bin/python scripts/pretrain_tiny.py [--out platform/wanray/assets/tiny_shapes]

The tiny model's random-init VAE decodes any latent into coloured texture, so nothing rendered with it can
show whether a fine-tune did better or worse than its base or a broken model (issue 28). This script trains,
on every clip of wanray.data.synthetic at 64x64 and 17 frames (2 shapes x 6 colours x 4 backgrounds x 4
motions = 192 clips):

1. the tiny AutoencoderKLWan (wanray.model_files.TINY_VAE) to reconstruct them: L1 + MSE on random crops,
   5 frames x 32x32, then 9 frames x 32x32 (the later chunks of the causal cache), then the same with 5x the
   weight on the shapes' pixels; its latents' per-channel mean and std go into its config;
2. the seed-0 random tiny model's first expert (write_tiny_checkpoint) on their latents, with that model's
   random UMT5 text encoder (saved with the rest), by flow matching over all 1000 timesteps with the training
   config's shift and caption dropout: both experts start from it;
3. a tiny CLIPModel (wanray.model_files.write_tiny_clip's architecture) on the clips' frames and captions
   (contrastive): the `eval.clip_model` of an evaluation of the tiny model (README, Evaluation).

It writes vae.safetensors, text_encoder.safetensors, transformer.safetensors, latents.json and clip/ under
--out; `model.tiny_weights: shapes` (configs/tiny.yaml) builds the tiny model from them. About 50 minutes
on 2 CPU cores. Every stage is seeded; the committed weights were trained stage by stage, with the same
settings and seeds. `--stages` trains some of them: the others' files stay as they are under --out, and the
transformer trains on the latents of the VAE there (`--stages transformer` after a change to that stage
retrains the experts' start without retraining the VAE).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from wanray.data.synthetic import BACKGROUNDS, COLORS, MOTIONS, SHAPES, SyntheticClip, render
from wanray.model_files import TINY_SHAPES, TINY_VAE, write_tiny_checkpoint, write_tiny_clip
from wanray.schema import pad_text_embedding
from wanray.train.flow import noisy_latents, shift_sigma

SIZE, FRAMES = 64, 17
STAGES = ("vae", "transformer", "clip")


def world() -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Every synthetic clip at SIZE x SIZE and FRAMES frames: (192, 3, FRAMES, SIZE, SIZE) in [-1, 1], where each
    shows its shape (192, 1, FRAMES, SIZE, SIZE: 1 off the background), and the captions."""
    clips = [
        SyntheticClip("", f"a {c} {s} moving {m} on a {b} background", SIZE, SIZE, 16, FRAMES, s, c, b, m)
        for s in SHAPES
        for c in COLORS
        for b in BACKGROUNDS
        for m in MOTIONS
    ]
    videos = torch.stack([torch.from_numpy(render(c)).permute(3, 0, 1, 2).float() / 127.5 - 1 for c in clips])
    backgrounds = torch.tensor([BACKGROUNDS[c.background] for c in clips]).float() / 127.5 - 1
    shape = ((videos - backgrounds[:, :, None, None, None]).abs().amax(1, keepdim=True) > 0.05).float()
    return videos, shape, [c.caption for c in clips]


def train_vae(vae, videos: torch.Tensor, weights: torch.Tensor, steps: int, frames: int, log) -> None:
    """Random crops of `frames` frames x 32x32, each pixel's L1 + MSE times `weights`; lr 1e-3, then 3e-4 for
    the last 30%."""
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0)
    t0 = time.time()
    for i in range(steps):
        idx = torch.randint(0, len(videos), (4,))
        t = int(torch.randint(0, FRAMES - frames + 1, (1,)))
        y, x = int(torch.randint(0, 5, (1,))) * 8, int(torch.randint(0, 5, (1,))) * 8
        clip = videos[idx][:, :, t : t + frames, y : y + 32, x : x + 32]
        weight = weights[idx][:, :, t : t + frames, y : y + 32, x : x + 32]
        posterior = vae.encode(clip).latent_dist
        z = posterior.mode() + 0.05 * torch.randn_like(posterior.mode())  # a decoder that tolerates small errors
        rec = vae.decode(z).sample
        error = (weight * ((rec - clip).abs() + (rec - clip) ** 2)).mean()
        loss = error + 1e-4 * posterior.kl().mean() / z[0].numel()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i == int(steps * 0.7):
            for group in opt.param_groups:
                group["lr"] = 3e-4
        if i % 250 == 0:
            log(f"vae ({frames} frames) step {i}/{steps}: loss {loss.item():.4f} ({time.time() - t0:.0f} s)")


def encode_world(vae, videos: torch.Tensor) -> torch.Tensor:
    """The modes of the VAE latents of every clip, 16 at a time."""
    with torch.no_grad():
        return torch.cat([vae.encode(videos[i : i + 16]).latent_dist.mode() for i in range(0, len(videos), 16)])


def train_transformer(dit, latents: torch.Tensor, text: torch.Tensor, empty: torch.Tensor, steps: int, log):
    """Flow matching on normalised latents, every timestep (shift 5, as configs/tiny.yaml trains), batch 16,
    10% caption dropout to the empty prompt (classifier-free guidance); lr 1e-3 with cosine decay."""
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(dit.parameters(), lr=1e-3, weight_decay=0)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    t0, running = time.time(), 0.0
    for i in range(steps):
        idx = torch.randint(0, len(latents), (16,), generator=g)
        x0, context = latents[idx], text[idx].clone()
        context[torch.rand(16, generator=g) < 0.1] = empty
        timesteps = shift_sigma(torch.rand(16, generator=g), 5.0) * 1000
        xt, target = noisy_latents(x0, torch.randn(x0.shape, generator=g), timesteps, 1000)
        loss = ((dit(xt, timesteps, context, return_dict=False)[0] - target) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(dit.parameters(), 1.0)
        opt.step()
        schedule.step()
        running = 0.98 * running + 0.02 * loss.item()
        if i % 500 == 0:
            log(f"transformer step {i}/{steps}: loss {running / (1 - 0.98 ** (i + 1)):.4f} ({time.time() - t0:.0f} s)")


def train_clip(path: Path, videos: torch.Tensor, captions: list[str], steps: int, log) -> None:
    """Contrastive, batch 64 of (a random frame, its clip's caption); lr 2e-3."""
    from transformers import CLIPModel, CLIPProcessor

    torch.manual_seed(0)
    write_tiny_clip(path, seed=0)
    model, processor = CLIPModel.from_pretrained(path), CLIPProcessor.from_pretrained(path)
    frames = ((videos.permute(0, 2, 3, 4, 1) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
    n, t = frames.shape[:2]
    pixels = processor(images=list(frames.reshape(n * t, SIZE, SIZE, 3)), return_tensors="pt")["pixel_values"]
    pixels = pixels.reshape(n, t, *pixels.shape[1:])
    tokens = processor(text=captions, return_tensors="pt", padding=True)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
    g = torch.Generator().manual_seed(0)
    for i in range(steps):
        idx, frame = torch.randperm(n, generator=g)[:64], torch.randint(0, t, (64,), generator=g)
        out = model(
            input_ids=tokens["input_ids"][idx],
            attention_mask=tokens["attention_mask"][idx],
            pixel_values=pixels[idx, frame],
            return_loss=True,
        )
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        if i % 500 == 0:
            log(f"clip step {i}/{steps}: loss {out.loss.item():.4f}")
    model.save_pretrained(path)


def main() -> None:
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from safetensors.torch import load_model, save_model
    from transformers import ByT5Tokenizer, UMT5EncoderModel

    from wanray.encoding import encode_text

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=TINY_SHAPES)
    parser.add_argument(
        "--vae-steps", type=int, nargs=3, default=(2000, 3000, 1500), help="5-frame, 9-frame, 9-frame shape-weighted"
    )
    parser.add_argument("--transformer-steps", type=int, default=6000)
    parser.add_argument("--clip-steps", type=int, default=2000)
    parser.add_argument(
        "--stages",
        nargs="+",
        choices=STAGES,
        default=list(STAGES),
        help="the stages to train; the transformer reads the VAE from --out when the vae stage is not among them",
    )
    args = parser.parse_args()
    torch.set_num_threads(2)
    args.out.mkdir(parents=True, exist_ok=True)

    def log(line: str) -> None:
        print(f"[pretrain] {line}", flush=True)

    videos, shape, captions = world()
    z = None  # the world's latents: encoded once, by the VAE trained here or the one under --out
    if "vae" in args.stages:
        torch.manual_seed(0)
        vae = AutoencoderKLWan(**TINY_VAE)
        train_vae(vae, videos, torch.ones_like(shape), args.vae_steps[0], 5, log)
        torch.manual_seed(0)
        train_vae(vae, videos, torch.ones_like(shape), args.vae_steps[1], 9, log)
        torch.manual_seed(0)  # then 5x the weight on the shapes: the colours of a shape were the last to come
        train_vae(vae, videos, 1 + 4 * shape, args.vae_steps[2], 9, log)
        z = encode_world(vae.eval(), videos)
        stats = {"latents_mean": z.mean((0, 2, 3, 4)).tolist(), "latents_std": z.std((0, 2, 3, 4)).tolist()}
        save_model(vae, str(args.out / "vae.safetensors"))
        (args.out / "latents.json").write_text(json.dumps(stats, indent=1) + "\n")
        log(f"wrote the VAE under {args.out}")

    if "transformer" in args.stages:
        stats = json.loads((args.out / "latents.json").read_text())
        if z is None:
            vae = AutoencoderKLWan(**TINY_VAE, **stats).eval()
            load_model(vae, str(args.out / "vae.safetensors"))
            z = encode_world(vae, videos)
        mean, std = (torch.tensor(stats[k])[:, None, None, None] for k in ("latents_mean", "latents_std"))
        latents = (z - mean) / std
        with tempfile.TemporaryDirectory() as tmp:  # the seed-0 random tiny model: its text encoder, its first expert
            random_init = write_tiny_checkpoint(Path(tmp) / "tiny", seed=0)
            tokenizer = ByT5Tokenizer.from_pretrained(random_init / "tokenizer")
            text_encoder = UMT5EncoderModel.from_pretrained(random_init / "text_encoder").eval()
            dit = WanTransformer3DModel.from_pretrained(random_init / "transformer")
        text = torch.stack([pad_text_embedding(e, 512) for e in encode_text(tokenizer, text_encoder, captions)])
        empty = pad_text_embedding(encode_text(tokenizer, text_encoder, [""])[0], 512)
        train_transformer(dit, latents, text, empty, args.transformer_steps, log)
        save_model(text_encoder, str(args.out / "text_encoder.safetensors"))
        save_model(dit, str(args.out / "transformer.safetensors"))
        log(f"wrote the text encoder and transformer under {args.out}")

    if "clip" in args.stages:
        train_clip(args.out / "clip", videos, captions, args.clip_steps, log)
        log(f"wrote the CLIP under {args.out / 'clip'}")


if __name__ == "__main__":
    main()
