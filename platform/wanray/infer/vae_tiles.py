"""Tiled Wan VAE decoding that gives the whole-frame decode's frames (infer.vae_tiling).

diffusers' own tiled decode (AutoencoderKLWan.enable_tiling) decodes each tile of the latent on its own and blends
the overlaps. The Wan decoder's middle block holds a self-attention over the whole frame, and a tile sees only its
part, so its frames differ from the whole decode: on the tiny model up to 0.25-0.6 of the [0, 1] range even with
large tiles. Here the decoder is cut where it becomes local: its input convolution and middle block (attention
included) run on the whole latent frame, which is small (latent resolution), and only the up path, where the
memory goes (full-resolution activations: 34 GB for 81x1280x1280), runs per tile. Each tile takes a halo of
latent pixels at least the up path's receptive radius, and only its interior is kept, so every kept pixel sees
exactly what it sees in the whole decode. Tiles run one after the other, each over all frames with its own
temporal cache (the decoder's causal convolutions run frame by frame, as diffusers' _decode does).
"""

from __future__ import annotations

import math

import torch


def up_path_radius(decoder) -> float:
    """Latent pixels of context an output pixel of the decoder's up path and head needs on each side: each
    spatial k x k convolution adds k // 2 pixels at its resolution (a latent pixel is 2^u pixels there, after u
    upsamplings); nearest upsampling, per-pixel norms and activations add none."""
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanResample

    radius, scale = 0.0, 1
    for module in [*decoder.up_blocks.modules(), decoder.conv_out]:
        if isinstance(module, WanResample) and module.mode.startswith("upsample"):
            scale *= 2  # the resample's own convolution runs after its upsampling
        elif isinstance(module, (torch.nn.Conv2d, torch.nn.Conv3d)):
            radius += (module.kernel_size[-1] // 2) / scale
    return radius


def _cached_conv(conv, x: torch.Tensor, cache: list, idx: list) -> torch.Tensor:
    """A causal convolution with its temporal cache, as WanDecoder3d.forward runs conv_in and conv_out."""
    i = idx[0]
    keep = x[:, :, -2:].clone()
    if keep.shape[2] < 2 and cache[i] is not None:
        keep = torch.cat([cache[i][:, :, -1:].to(keep.device), keep], dim=2)
    out = conv(x, cache[i])
    cache[i], idx[0] = keep, i + 1
    return out


@torch.no_grad()
def decode_tiled(vae, z: torch.Tensor, tile_pixels: int) -> torch.Tensor:
    """vae.decode(z)'s video (clamped to [-1, 1]), its up path computed in tiles of `tile_pixels` output pixels.

    The input convolution and middle block run first over every latent frame (latent resolution: 0.8 GB for
    81x1280x1280); then each tile runs the up path over all frames with its own temporal cache, dropped before
    the next tile (the caches hold two frames of every convolution's input: most of a whole decode's memory)."""
    from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify

    decoder, patch = vae.decoder, vae.config.patch_size
    scale = vae.spatial_compression_ratio // (patch or 1)  # the decoder's own upsampling
    tile = max(1, tile_pixels // vae.spatial_compression_ratio)
    halo = math.ceil(up_path_radius(decoder))
    _, _, frames, height, width = z.shape
    convs = vae._cached_conv_counts["decoder"]
    x, cache, middle = vae.post_quant_conv(z), [None] * convs, []
    for k in range(frames):
        idx = [0]
        first = _cached_conv(decoder.conv_in, x[:, :, k : k + 1], cache, idx)
        middle.append(decoder.mid_block(first, feat_cache=cache, feat_idx=idx))
    up_from, video = idx[0], None
    for r in range(0, height, tile):
        for c in range(0, width, tile):
            r0, c0 = max(r - halo, 0), max(c - halo, 0)
            cache, parts = [None] * convs, []
            for k, m in enumerate(middle):
                idx = [up_from]
                y = m[..., r0 : min(r + tile + halo, height), c0 : min(c + tile + halo, width)]
                for block in decoder.up_blocks:
                    y = block(y, feat_cache=cache, feat_idx=idx, first_chunk=k == 0)
                parts.append(_cached_conv(decoder.conv_out, decoder.nonlinearity(decoder.norm_out(y)), cache, idx))
            del cache
            part = torch.cat(parts, dim=2)
            del parts
            if video is None:
                video = part.new_empty((*part.shape[:3], height * scale, width * scale))
            rr, cc, h, w = (
                (r - r0) * scale,
                (c - c0) * scale,
                min(tile, height - r) * scale,
                min(tile, width - c) * scale,
            )
            video[..., r * scale : r * scale + h, c * scale : c * scale + w] = part[..., rr : rr + h, cc : cc + w]
    assert video is not None
    if patch is not None:
        video = unpatchify(video, patch_size=patch)
    return torch.clamp(video, min=-1.0, max=1.0)
