"""Model directories wanray writes itself: the tiny Wan2.2 of each kind (the real architecture at toy width,
randomly initialised or, for the quickstart, pretrained on the synthetic shapes; written as a diffusers
directory that every test and the quickstart load through the real path), and directories holding the
published A14B config files only (for the memory plans and the device check). wanray.models reads every model
directory, these included."""

from __future__ import annotations

import contextlib
import errno
import json
from pathlib import Path

import torch

from wanray.io import atomic_path, write_text_atomic
from wanray.models import check_model_dir
from wanray.wan import KINDS

# Wan2.2-T2V-A14B's diffusers scheduler: UniPC on flow sigmas. diffusers ships
# flow_shift 3.0; the official T2V sampler uses 12.0 (inference config can override).
SCHEDULER_CONFIG = dict(
    prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000, flow_shift=3.0
)


def ensure_model(cfg_model) -> Path:
    """The model directory of `cfg_model` as an absolute path (workers run in other directories),
    writing the tiny checkpoint first when asked to."""
    p = Path(cfg_model.path).resolve()
    if cfg_model.create_tiny and not (p / "model_index.json").exists():
        write_tiny_checkpoint(
            p,
            seed=cfg_model.tiny_seed,
            boundary=cfg_model.boundary,
            kind=cfg_model.tiny_kind,
            weights=cfg_model.tiny_weights,
        )
    return check_model_dir(p)


# Tiny dimensions of the real architecture: DiT dim 96 (4 heads x 24; rope splits head_dim
# in 3; dim must exceed the 16 x 1 x 2 x 2 = 64 values of a patch, or the model cannot pass
# the noise through and the flow loss cannot fall), UMT5 d_model 32 (= DiT text_dim), VAE
# base_dim 8 with the real stride (4, 8, 8) and z_dim 16. About 0.8 M parameters in all.
TINY_TRANSFORMER = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=4,
    attention_head_dim=24,
    in_channels=16,
    out_channels=16,
    text_dim=32,
    freq_dim=32,
    ffn_dim=192,
    num_layers=2,
)
TINY_VAE = dict(base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1, temperal_downsample=[False, True, True])
TINY_WAN22_VAE = dict(
    base_dim=8,
    z_dim=48,
    in_channels=12,
    out_channels=12,
    is_residual=True,
    patch_size=2,
    dim_mult=[1, 2, 2, 2],
    num_res_blocks=1,
    temperal_downsample=[False, True, True],
    scale_factor_spatial=16,
    scale_factor_temporal=4,
    latents_mean=[0.0] * 48,
    latents_std=[1.0] * 48,
)
"""The Wan2.2 VAE's layout (TI2V-5B: 48 channels, 2x2 patchify then 8x: 16x spatial) at toy width."""
TINY_UMT5 = dict(
    d_model=32,
    d_kv=8,
    d_ff=64,
    num_layers=2,
    num_heads=4,
    relative_attention_num_buckets=8,
    relative_attention_max_distance=32,
    dropout_rate=0.0,
    feed_forward_proj="gated-gelu",
)


TINY_BOUNDARY = KINDS["t2v-a14b"].boundary  # 0.875
TINY_SHAPES = Path(__file__).parent / "assets" / "tiny_shapes"
"""Weights of the tiny T2V model pretrained on the synthetic shapes (scripts/pretrain_tiny.py): its VAE, text
encoder and one transformer both experts start from (model.tiny_weights: shapes), and the tiny CLIP trained
on the same clips (clip/), which an evaluation of the tiny model scores with (eval.clip_model)."""

# The published config files of Wan-AI/Wan2.2-T2V-A14B-Diffusers (both experts share one; the VAE is
# Wan2.1's): the real dimensions without the weights, for the memory plans and the device check.
A14B_TRANSFORMER = {
    "_class_name": "WanTransformer3DModel",
    "added_kv_proj_dim": None,
    "attention_head_dim": 128,
    "cross_attn_norm": True,
    "eps": 1e-06,
    "ffn_dim": 13824,
    "freq_dim": 256,
    "image_dim": None,
    "in_channels": 16,
    "num_attention_heads": 40,
    "num_layers": 40,
    "out_channels": 16,
    "patch_size": [1, 2, 2],
    "pos_embed_seq_len": None,
    "qk_norm": "rms_norm_across_heads",
    "rope_max_seq_len": 1024,
    "text_dim": 4096,
}
A14B_VAE = {
    "_class_name": "AutoencoderKLWan",
    "base_dim": 96,
    "z_dim": 16,
    "dim_mult": [1, 2, 4, 4],
    "num_res_blocks": 2,
    "attn_scales": [],
    "temperal_downsample": [False, True, True],
    "dropout": 0.0,
    "latents_mean": [
        -0.7571,
        -0.7089,
        -0.9113,
        0.1075,
        -0.1745,
        0.9653,
        -0.1517,
        1.5508,
        0.4134,
        -0.0715,
        0.5517,
        -0.3632,
        -0.1922,
        -0.9497,
        0.2503,
        -0.2921,
    ],
    "latents_std": [
        2.8184,
        1.4541,
        2.3275,
        2.6558,
        1.2196,
        1.7708,
        2.6052,
        2.0743,
        3.2687,
        2.1526,
        2.8652,
        1.5579,
        1.6382,
        1.1253,
        2.8251,
        1.916,
    ],
}

A14B_UMT5 = {
    "architectures": ["UMT5EncoderModel"],
    "model_type": "umt5",
    "d_ff": 10240,
    "d_kv": 64,
    "d_model": 4096,
    "num_heads": 64,
    "num_layers": 24,
    "num_decoder_layers": 24,
    "vocab_size": 256384,
    "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128,
    "feed_forward_proj": "gated-gelu",
    "dense_act_fn": "gelu_new",
    "is_gated_act": True,
    "layer_norm_epsilon": 1e-06,
    "scalable_attention": True,
    "tie_word_embeddings": False,
    "dropout_rate": 0.1,
    "pad_token_id": 0,
    "eos_token_id": 1,
    "decoder_start_token_id": 0,
}
"""UMT5-XXL's encoder (google/umt5-xxl), the text encoder of every Wan2.2 model."""


def write_config_dir(
    path,
    transformer: dict = A14B_TRANSFORMER,
    vae: dict = A14B_VAE,
    text_encoder: dict = A14B_UMT5,
    boundary: float | None = TINY_BOUNDARY,
) -> Path:
    """A model directory holding config files only, no weights (tokenizer/ stays empty): enough for
    the memory plans, which build the models on the meta device, and for the device check's random
    weights."""
    path = Path(path)
    index = {
        "_class_name": "WanPipeline",
        "boundary_ratio": boundary,
        "transformer": ["diffusers", "WanTransformer3DModel"],
        "transformer_2": ["diffusers", "WanTransformer3DModel"],
    }
    files = {
        "model_index.json": index,
        "transformer/config.json": transformer,
        "transformer_2/config.json": transformer,
        "vae/config.json": {"_class_name": "AutoencoderKLWan", **vae},
        "text_encoder/config.json": text_encoder,
        "scheduler/scheduler_config.json": {"_class_name": "UniPCMultistepScheduler", **SCHEDULER_CONFIG},
    }
    for name, content in files.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path / name, json.dumps(content, indent=2) + "\n")
    (path / "tokenizer").mkdir(exist_ok=True)
    return path


@contextlib.contextmanager
def _no_progress_bars():
    """transformers' "Writing model shards" bar (the UMT5 text encoder's save) off while the tiny model is
    written: one shard, instant."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        transformers_logging.enable_progress_bar()


def write_tiny_checkpoint(
    path, seed: int = 0, boundary: float | None = None, kind: str = "t2v-a14b", weights: str = "random"
) -> Path:
    """Write a tiny Wan2.2 model of `kind` (wanray.wan.KINDS) as a diffusers directory (atomically); `boundary`
    None takes the kind's official one. `weights` "random": randomly initialised from `seed`; "shapes": the
    T2V model pretrained on the synthetic shapes (TINY_SHAPES), which draws what its prompts say."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
    from safetensors.torch import load_model
    from transformers import ByT5Tokenizer, UMT5Config, UMT5EncoderModel

    spec = KINDS[kind]
    if weights not in ("random", "shapes") or (weights == "shapes" and kind != "t2v-a14b"):
        raise ValueError(f"no {weights!r} weights for a tiny {kind} (pretrained: 'shapes', for t2v-a14b)")
    path = Path(path)
    torch.manual_seed(seed)
    tokenizer = ByT5Tokenizer()  # needs no vocabulary file, unlike the real UMT5 SentencePiece one
    text_encoder = UMT5EncoderModel(UMT5Config(vocab_size=len(tokenizer), **TINY_UMT5)).eval()
    vae = AutoencoderKLWan(**(TINY_VAE if spec.latent_channels == 16 else TINY_WAN22_VAE))
    experts = [
        WanTransformer3DModel(
            **{**TINY_TRANSFORMER, "in_channels": spec.in_channels, "out_channels": spec.latent_channels}
        )
        for _ in spec.experts
    ]
    if weights == "shapes":
        vae = AutoencoderKLWan(**TINY_VAE, **json.loads((TINY_SHAPES / "latents.json").read_text()))
        for module, name in [(vae, "vae"), (text_encoder, "text_encoder"), *((e, "transformer") for e in experts)]:
            load_model(module, str(TINY_SHAPES / f"{name}.safetensors"))
    parts = dict(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        scheduler=UniPCMultistepScheduler(**SCHEDULER_CONFIG),
        transformer=experts[0],
        transformer_2=experts[1] if len(experts) == 2 else None,
        boundary_ratio=(spec.boundary if boundary is None else boundary) if len(experts) == 2 else None,
    )
    if spec.pipeline == "WanImageToVideoPipeline":
        from diffusers import WanImageToVideoPipeline  # imported only here: transformers warns about its CLIP parts

        pipe = WanImageToVideoPipeline(**parts, image_processor=None, image_encoder=None)
    else:
        pipe = WanPipeline(**parts, expand_timesteps=spec.expand_timesteps)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_path(path) as tmp, _no_progress_bars():
            pipe.save_pretrained(tmp, safe_serialization=True)
    except OSError as e:
        if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise
        check_model_dir(path)  # another process won the race and wrote it first
    return path


TINY_CLIP_TOWER = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4)
"""Each tower of a tiny CLIP of the real architecture (transformers' CLIPModel): what the tests score videos with."""


def write_tiny_clip(path, seed: int = 0, image_size: int = 32) -> Path:
    """A random-weight CLIPModel with a byte-level tokenizer (each byte a token: no merges) and an image
    processor of `image_size`, in transformers' layout: what `eval.clip_model` names (real weights: e.g.
    openai/clip-vit-large-patch14 downloaded to a directory)."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPProcessor, CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    chars = list(bytes_to_unicode().values())
    vocab = {t: i for i, t in enumerate([*chars, *(c + "</w>" for c in chars), "<|startoftext|>", "<|endoftext|>"])}
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[])
    images = CLIPImageProcessorPil(size={"shortest_edge": image_size}, crop_size=image_size)
    ends = {"bos_token_id": len(vocab) - 2, "eos_token_id": len(vocab) - 1, "pad_token_id": len(vocab) - 1}
    text = {**TINY_CLIP_TOWER, "vocab_size": len(vocab), "max_position_embeddings": 77, **ends}
    vision = {**TINY_CLIP_TOWER, "image_size": image_size, "patch_size": image_size // 4}
    torch.manual_seed(seed)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    with _no_progress_bars():
        model.save_pretrained(path)
    CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(path)
    return path


QWEN_VL_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>"]
# Qwen2.5-VL's chat template for text and image content (the real one also takes videos and system turns)
QWEN_VL_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def write_tiny_vlm(path, seed: int = 0) -> Path:
    """A random-weight Qwen2.5-VL (transformers' Qwen2_5_VLForConditionalGeneration: two vision blocks, two
    text layers, width 32) with a byte-level tokenizer (each byte a token: no merges), Qwen's chat template
    and a PIL image processor bounded to 56x56-112x112 pixels: what `caption.model` names in the tests (real
    weights: e.g. Qwen/Qwen2.5-VL-7B-Instruct downloaded to a directory)."""
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    vocab = {t: i for i, t in enumerate([*bytes_to_unicode().values(), *QWEN_VL_SPECIAL])}
    tokenizer = Qwen2Tokenizer(
        vocab=vocab, merges=[], eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None, bos_token=None
    )
    tokenizer.add_special_tokens({"additional_special_tokens": QWEN_VL_SPECIAL[1:]})
    tokenizer.chat_template = QWEN_VL_TEMPLATE
    ids = {t: vocab[t] for t in QWEN_VL_SPECIAL}
    text = {
        "vocab_size": len(vocab),
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "max_position_embeddings": 4096,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
    }
    vision = {"depth": 2, "hidden_size": 32, "intermediate_size": 32, "num_heads": 2, "out_hidden_size": 32}
    config = Qwen2_5_VLConfig(
        text_config=text,
        vision_config={**vision, "fullatt_block_indexes": [1]},
        image_token_id=ids["<|image_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config)
    with _no_progress_bars():
        model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=112 * 112).save_pretrained(path)
    return path


AESTHETIC_HEAD_FILE = "aesthetic_head.safetensors"
"""The aesthetic predictor's MLP weights beside its CLIP model (wanray.data.aesthetic)."""


def write_tiny_aesthetic(path, seed: int = 0) -> Path:
    """A tiny CLIP (write_tiny_clip) with a random MLP head in LAION's aesthetic predictor layout (Linear layers at
    0, 2, 4, 6 and 7): what `data.aesthetic_model` names in the tests."""
    import torch
    from safetensors.torch import save_file

    path = write_tiny_clip(path, seed)
    g = torch.Generator().manual_seed(seed)
    sizes = {0: (32, 16), 2: (16, 32), 4: (8, 16), 6: (4, 8), 7: (1, 4)}  # (out, in); 16: the CLIP's projection
    weights = {}
    for i, (out, inp) in sizes.items():
        weights[f"layers.{i}.weight"] = torch.randn(out, inp, generator=g) / inp**0.5
        weights[f"layers.{i}.bias"] = torch.full((out,), 5.0 if i == 7 else 0.0)
    save_file(weights, str(path / AESTHETIC_HEAD_FILE))
    return path
