"""An offline Stable-Diffusion-shaped pipeline with seeded random weights.

Model weights cannot be downloaded in tests, CI or the demo, so they use this pipeline: the
same block types and order as SD 1.5 (4 down blocks, cross-attention mid block, 4 up blocks of
3 resnets each), the same VAE factor and scaling, a real CLIP text encoder and a byte-level CLIP
tokenizer built from a vocabulary written here. `StableDiffusionPipeline.from_pretrained(DIR)`
loads what `write_tiny_model` saves. The same seed gives the same weights, byte for byte.
"""

from __future__ import annotations

import inspect
import json
import tempfile
from pathlib import Path

import torch

# Same block types, order and layers_per_block as SD 1.5; only widths are small.
TINY_UNET_CONFIG = {
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": (
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ),
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": (
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    ),
    "block_out_channels": (32, 32, 64, 64),
    "layers_per_block": 2,
    "norm_num_groups": 16,
    "cross_attention_dim": 32,
    "attention_head_dim": 4,
}

TINY_VAE_CONFIG = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (8, 16, 16, 16),
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "latent_channels": 4,
    "sample_size": 64,
    "scaling_factor": 0.18215,
}

TINY_TEXT_CONFIG = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 77,
    "projection_dim": 32,
}

# SD 1.5's UNet config (diffusers' defaults spelled out): for shape tests and benchmarks with
# random weights, since the real weights cannot be downloaded here.
SD15_UNET_CONFIG = {
    **TINY_UNET_CONFIG,
    "sample_size": 64,
    "block_out_channels": (320, 640, 1280, 1280),
    "norm_num_groups": 32,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
}

# SD 1.5's VAE config (diffusers' AutoencoderKL as shipped in stable-diffusion-v1-5/vae), for
# benchmarks with random weights; SDXL's VAE is the same network (sdxl.SDXL_VAE_CONFIG).
SD15_VAE_CONFIG = {
    **TINY_VAE_CONFIG,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "sample_size": 512,
}

# The scheduler shipped with SD 1.5 (the build uses METHOD.md's own DDIM settings regardless).
SD15_SCHEDULER_CONFIG = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from bytes to printable unicode characters."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes)))


def build_tokenizer():
    """A CLIP tokenizer over single bytes (no merges): tokenizes any text, needs no download."""
    from transformers import CLIPTokenizer

    chars = list(_bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if "vocab_file" not in inspect.signature(CLIPTokenizer.__init__).parameters:
        tokenizer = CLIPTokenizer(vocab=vocab, merges=[])  # transformers >= 5
    else:  # transformers 4.x reads the vocabulary from files
        with tempfile.TemporaryDirectory() as tmp:
            vocab_file = Path(tmp) / "vocab.json"
            merges_file = Path(tmp) / "merges.txt"
            vocab_file.write_text(json.dumps(vocab), encoding="utf-8")
            merges_file.write_text("#version: 0.2\n", encoding="utf-8")
            tokenizer = CLIPTokenizer(vocab_file=str(vocab_file), merges_file=str(merges_file))
    tokenizer.model_max_length = TINY_TEXT_CONFIG["max_position_embeddings"]
    return tokenizer


def build_tiny_pipeline(seed: int = 0, prediction_type: str = "epsilon"):
    """Build the tiny pipeline in memory; weights are a pure function of `seed`.
    `prediction_type` is what its scheduler config says the UNet predicts (SD 2.x at 768 px:
    v_prediction); with random weights the UNet is the same either way."""
    from dhf_cache.sources.loading import quiet_libraries

    quiet_libraries()
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**TINY_UNET_CONFIG)
    vae = AutoencoderKL(**TINY_VAE_CONFIG)
    text_config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **TINY_TEXT_CONFIG,
    )
    text_encoder = CLIPTextModel(text_config)
    scheduler = DDIMScheduler(**{**SD15_SCHEDULER_CONFIG, "prediction_type": prediction_type})
    return StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def build_sd15_unet(seed: int = 0):
    """An SD 1.5-shaped UNet (860M parameters) with seeded random weights."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(**SD15_UNET_CONFIG)


def write_tiny_model(directory: str | Path, seed: int = 0, prediction_type: str = "epsilon") -> Path:
    """Save the tiny pipeline with `save_pretrained` so it loads like any hub model."""
    directory = Path(directory)
    pipe = build_tiny_pipeline(seed, prediction_type)
    pipe.save_pretrained(directory, safe_serialization=True)
    return directory
