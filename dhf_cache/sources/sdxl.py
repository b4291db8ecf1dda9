"""Stable Diffusion XL as a feature source: loading, conditioning, the UNet call, the latents.

SDXL's UNet differs from SD 1.x/2.x's in what it is called with: besides the cross-attention
states (both text encoders' penultimate hidden states, concatenated: 768 + 1280 = 2048 wide) it
needs `added_cond_kwargs` = {"text_embeds": the pooled projection of text_encoder_2 (B, 1280),
"time_ids": (original size, crop corner, target size) (B, 6)}; without them it raises. Everything
here is computed as diffusers' `StableDiffusionXLPipeline` computes it for one prompt without
classifier-free guidance (tests compare against a real pipeline's UNet inputs and outputs), but
without building a pipeline object. SDXL's VAE overflows in fp16 (`force_upcast`), so it
encodes in float32 whatever the compute dtype, as diffusers does.

`write_tiny_sdxl` saves an SDXL-shaped pipeline with seeded random weights (SDXL's block
layout, two CLIP text encoders, byte-level tokenizers) that the real
`StableDiffusionXLPipeline.from_pretrained` loads: weights cannot be downloaded in tests.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from dhf_cache.sources.sd.backbone import read_prediction_type

from dhf_cache.sources.loading import load_hub_id, quiet_libraries, weights_sha256
from dhf_cache.sources.sd.capture import resnet_names
from dhf_cache.config import Frozen
from dhf_cache.errors import ModelNotFoundError, UsageError, first_line
from dhf_cache.sources.sd.tiny_model import SD15_VAE_CONFIG, TINY_TEXT_CONFIG, TINY_VAE_CONFIG, build_tokenizer

SDXL_MODEL_ID = "stabilityai/stable-diffusion-xl-base-1.0"
N_TIME_IDS = 6  # original (h, w) + crop corner (top, left) + target (h, w)

# The tiny model's two text encoders: CLIP ViT-L-like (quick_gelu) and OpenCLIP bigG-like
# (gelu, with a projection); other widths so that a swapped concatenation shows.
TINY_SDXL_TEXT_CONFIG = {**TINY_TEXT_CONFIG, "hidden_act": "quick_gelu"}
TINY_SDXL_TEXT_2_CONFIG = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 77,
    "projection_dim": 48,
    "hidden_act": "gelu",
}
TINY_ADDITION_TIME_EMBED_DIM = 8

# SDXL base's block types, order, layers_per_block and transformer depths per level (1, 2, 10
# there); widths small. The widths the conditioning fixes are derived, not typed twice.
TINY_SDXL_UNET_CONFIG = {
    "sample_size": 8,  # 64 px (SDXL: 128 latent = 1024 px)
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (32, 64, 64),
    "layers_per_block": 2,
    "transformer_layers_per_block": (1, 1, 2),
    "norm_num_groups": 16,
    "attention_head_dim": (2, 4, 4),
    "use_linear_projection": True,
    "cross_attention_dim": TINY_SDXL_TEXT_CONFIG["hidden_size"] + TINY_SDXL_TEXT_2_CONFIG["hidden_size"],
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": TINY_ADDITION_TIME_EMBED_DIM,
    "projection_class_embeddings_input_dim": N_TIME_IDS * TINY_ADDITION_TIME_EMBED_DIM
    + TINY_SDXL_TEXT_2_CONFIG["projection_dim"],
}

# SDXL's VAE layout is SD's; what differs is the scaling factor and the fp16 overflow flag.
TINY_SDXL_VAE_CONFIG = {**TINY_VAE_CONFIG, "scaling_factor": 0.13025, "force_upcast": True}

# SDXL base 1.0's UNet config (diffusers' defaults spelled out): for shape checks and GPU
# benchmarks with random weights (2.6B parameters: not instantiated in the tests).
SDXL_UNET_CONFIG = {
    **TINY_SDXL_UNET_CONFIG,
    "sample_size": 128,
    "block_out_channels": (320, 640, 1280),
    "transformer_layers_per_block": (1, 2, 10),
    "norm_num_groups": 32,
    "attention_head_dim": (5, 10, 20),
    "cross_attention_dim": 2048,  # 768 (CLIP ViT-L) + 1280 (OpenCLIP bigG)
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,  # 6 * 256 + 1280
}

# SDXL base's VAE: SD's network at 1024 px with its own scaling factor, run in fp32 (force_upcast).
SDXL_VAE_CONFIG = {**SD15_VAE_CONFIG, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True}

# The scheduler SDXL base ships (Euler, epsilon); the inversion uses its own DDIM settings.
SDXL_SCHEDULER_CONFIG = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "interpolation_type": "linear",
    "use_karras_sigmas": False,
    "timestep_spacing": "leading",
    "steps_offset": 1,
}

# What load_sdxl reads from a hub repository (safetensors weights, no fp16/.bin copies).
SDXL_HUB_FILES = (
    "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
    "vae/config.json", "vae/diffusion_pytorch_model.safetensors",
    "text_encoder/config.json", "text_encoder/model.safetensors",
    "text_encoder_2/config.json", "text_encoder_2/model.safetensors",
    "tokenizer/*", "tokenizer_2/*", "scheduler/scheduler_config.json",
)


def sdxl_download_command(model: str) -> str:
    """The `hf download` command that fetches exactly SDXL_HUB_FILES of `model`."""
    return f"hf download {model} " + " ".join(f'--include "{pattern}"' for pattern in SDXL_HUB_FILES)


# --------------------------------------------------------------------------- the tiny SDXL


def build_tiny_sdxl_pipeline(seed: int = 0, prediction_type: str = "epsilon"):
    """The tiny SDXL pipeline in memory; weights are a pure function of `seed`."""
    quiet_libraries()
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    tokenizer = build_tokenizer()
    tokenizer_2 = build_tokenizer()
    tokenizer_2.pad_token = "!"  # as SDXL's tokenizer_2 (OpenCLIP pads with "!", id 0 here)

    def text_config(tok, config):
        return CLIPTextConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                              pad_token_id=tok.pad_token_id, **config)

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**TINY_SDXL_UNET_CONFIG)
    vae = AutoencoderKL(**TINY_SDXL_VAE_CONFIG)
    text_encoder = CLIPTextModel(text_config(tokenizer, TINY_SDXL_TEXT_CONFIG))
    text_encoder_2 = CLIPTextModelWithProjection(text_config(tokenizer_2, TINY_SDXL_TEXT_2_CONFIG))
    scheduler = EulerDiscreteScheduler(**SDXL_SCHEDULER_CONFIG, prediction_type=prediction_type)
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,  # as SDXL base's model_index.json
        add_watermarker=False,
    )


def write_tiny_sdxl(path: str | Path, seed: int = 0, prediction_type: str = "epsilon") -> Path:
    """Save the tiny SDXL pipeline with `save_pretrained` (loads like any SDXL hub model)."""
    path = Path(path)
    build_tiny_sdxl_pipeline(seed, prediction_type).save_pretrained(path, safe_serialization=True)
    return path


# --------------------------------------------------------------------------- loading


class SdxlIdentity(Frozen):
    """What SDXL features depend on: the weights (rounded to fp16), not where they came from."""

    unet_class: str
    unet_sha256: str
    vae_sha256: str
    text_encoder_sha256: str
    text_encoder_2_sha256: str


@dataclass
class SdxlBackbone:
    unet: nn.Module
    vae: nn.Module
    text_encoder: nn.Module
    text_encoder_2: nn.Module
    tokenizer: object
    tokenizer_2: object
    scheduler_config: dict
    source: str
    prediction_type: str = "epsilon"  # what the UNet predicts (inversion.PREDICTION_TYPES)
    _identity: SdxlIdentity | None = field(default=None, repr=False)

    def identity(self) -> SdxlIdentity:
        if self._identity is None:
            self._identity = SdxlIdentity(
                unet_class=type(self.unet).__name__,
                unet_sha256=weights_sha256(self.unet),
                vae_sha256=weights_sha256(self.vae, extra=f"scaling_factor={self.vae.config.scaling_factor}"),
                text_encoder_sha256=weights_sha256(self.text_encoder),
                text_encoder_2_sha256=weights_sha256(self.text_encoder_2),
            )
        return self._identity

    @property
    def vae_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def to(self, device: str | torch.device) -> SdxlBackbone:
        for module in (self.unet, self.vae, self.text_encoder, self.text_encoder_2):
            module.to(device=device).eval().requires_grad_(False)
        return self


def _not_sdxl(model: str, why: str) -> UsageError:
    return UsageError(f"--model {model}: not an SDXL base pipeline ({why}); pass {SDXL_MODEL_ID} or a folder "
                      "saved from a StableDiffusionXLPipeline (SD 1.x/2.x models are the sd source)")


def _check_sdxl_unet(model: str, source: str, local_files_only: bool) -> None:
    """Refuse a pipeline whose UNet lacks SDXL's text_time conditioning (SD 1.x/2.x, ...)."""
    from diffusers import UNet2DConditionModel

    config = UNet2DConditionModel.load_config(source, subfolder="unet", local_files_only=local_files_only)
    kind = config.get("addition_embed_type")
    if kind != "text_time":
        raise _not_sdxl(model, f"its UNet's addition_embed_type is {kind!r}, SDXL's is 'text_time'")


def _check_prediction_type(backbone: SdxlBackbone, model: str) -> SdxlBackbone:
    from dhf_cache.sources.sd.inversion import PREDICTION_TYPES

    if backbone.prediction_type not in PREDICTION_TYPES:
        raise UsageError(
            f"--model {model}: its scheduler config says the UNet predicts {backbone.prediction_type!r}; dhf-cache "
            f"inverts models that predict {' or '.join(PREDICTION_TYPES)}"
        )
    return backbone


def _read_scheduler_config(source: str, local_files_only: bool) -> dict:
    from diffusers import DDIMScheduler

    try:
        return dict(DDIMScheduler.load_config(source, subfolder="scheduler", local_files_only=local_files_only))
    except (OSError, ValueError):
        return {}


def _load_components(model: str, source: str, local_files_only: bool, dtype: torch.dtype) -> SdxlBackbone:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    quiet_libraries()
    _check_sdxl_unet(model, source, local_files_only)
    kwargs = {"local_files_only": local_files_only}
    weights = {**kwargs, "torch_dtype": dtype}
    backbone = SdxlBackbone(
        unet=UNet2DConditionModel.from_pretrained(source, subfolder="unet", **weights),
        vae=AutoencoderKL.from_pretrained(source, subfolder="vae", **weights),
        text_encoder=CLIPTextModel.from_pretrained(source, subfolder="text_encoder", **weights),
        text_encoder_2=CLIPTextModelWithProjection.from_pretrained(source, subfolder="text_encoder_2", **weights),
        tokenizer=CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", **kwargs),
        tokenizer_2=CLIPTokenizer.from_pretrained(source, subfolder="tokenizer_2", **kwargs),
        scheduler_config=_read_scheduler_config(source, local_files_only),
        source=source,
        prediction_type=read_prediction_type(source, local_files_only),
    )
    return _check_prediction_type(backbone, model)


def load_sdxl(model: str, dtype: torch.dtype = torch.float32) -> SdxlBackbone:
    """Load an SDXL base pipeline (a local folder or a hub id, the local HF cache first) on the CPU."""
    path = Path(model).expanduser()
    if path.exists():
        if not (path / "unet" / "config.json").is_file():
            raise ModelNotFoundError(
                f"--model {model}: {path} exists but is not a diffusers pipeline directory (no unet/config.json); "
                f"pass a folder written by `save_pretrained` or `hf download --local-dir`, or a hub id such as "
                f"{SDXL_MODEL_ID}"
            )
        _check_sdxl_unet(model, str(path), True)
        missing = [d for d in ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2") if not (path / d).is_dir()]
        if missing:  # e.g. the SDXL refiner: text_encoder_2 only
            raise _not_sdxl(model, f"no {', '.join(d + '/' for d in missing)}")
        try:
            return _load_components(model, str(path), True, dtype)
        except (OSError, ValueError) as exc:
            raise ModelNotFoundError(f"--model {model}: could not load the SDXL pipeline in {path}: "
                                     f"{first_line(exc)}") from None
    if model.startswith((".", "/", "~")) or model.count("/") > 1:  # a path, not an org/name id
        raise ModelNotFoundError(f"--model {model}: no such directory. Pass an existing pipeline directory or a hub id.")
    return load_hub_id(model, lambda local_only: _load_components(model, model, local_only, dtype),
                       sdxl_download_command(model))


# --------------------------------------------------------------------------- conditioning


@dataclass
class SdxlConditioning:
    """What SDXL's UNet is called with besides (x, t), for one prompt, batch rows alike."""

    encoder_hidden_states: torch.Tensor  # (B, 77, D1 + D2): both encoders' penultimate states
    added_cond_kwargs: dict[str, torch.Tensor]  # text_embeds (B, P2): pooled; time_ids (B, 6)

    @property
    def batch(self) -> int:
        return int(self.encoder_hidden_states.shape[0])

    def expand(self, batch: int) -> SdxlConditioning:
        """The same conditioning for `batch` rows (from one row)."""
        if batch == self.batch:
            return self
        if self.batch != 1:
            raise ValueError(f"conditioning of batch {self.batch} cannot serve a batch of {batch}")
        return SdxlConditioning(
            self.encoder_hidden_states.expand(batch, -1, -1),
            {k: v.expand(batch, *v.shape[1:]) for k, v in self.added_cond_kwargs.items()},
        )


def sdxl_time_ids(height: int, width: int) -> list[int]:
    """SDXL's micro-conditioning: original size (h, w), crop corner (0, 0), target size (h, w)."""
    return [int(height), int(width), 0, 0, int(height), int(width)]


def _module_device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


@torch.no_grad()
def sdxl_conditioning(backbone: SdxlBackbone, prompt: str, height: int, width: int, batch: int,
                      device: str | torch.device, dtype: torch.dtype) -> SdxlConditioning:
    """`StableDiffusionXLPipeline.encode_prompt` + `_get_add_time_ids` for one prompt, no guidance.

    Each tokenizer pads and truncates the prompt to its max length; the hidden states each text
    encoder gives before its last layer are concatenated (text_encoder first); the pooled output
    is text_encoder_2's projection. `height`, `width` are the image's pixel size.
    """
    unet_config = backbone.unet.config
    projection_dim = int(backbone.text_encoder_2.config.projection_dim)
    passed = unet_config.addition_time_embed_dim * N_TIME_IDS + projection_dim
    expected = backbone.unet.add_embedding.linear_1.in_features
    if passed != expected:  # as diffusers' _get_add_time_ids checks
        raise UsageError(f"{backbone.source}: the UNet expects an added embedding of {expected} values, the text "
                         f"encoders and time ids give {passed}: not an SDXL base pipeline")
    states, pooled = [], None
    for tokenizer, encoder in ((backbone.tokenizer, backbone.text_encoder), (backbone.tokenizer_2, backbone.text_encoder_2)):
        ids = tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids
        out = encoder(ids.to(_module_device(encoder)), output_hidden_states=True)
        states.append(out.hidden_states[-2])
        pooled = getattr(out, "text_embeds", None)  # the last encoder's (text_encoder_2's)
    if pooled is None or pooled.ndim != 2:
        raise UsageError(f"{backbone.source}: text_encoder_2 gives no pooled projection (CLIPTextModelWithProjection)")
    embeds = torch.cat(states, dim=-1).to(device=device, dtype=dtype)
    time_ids = torch.tensor([sdxl_time_ids(height, width)], dtype=dtype, device=device)
    return SdxlConditioning(
        encoder_hidden_states=embeds.repeat(batch, 1, 1),
        added_cond_kwargs={"text_embeds": pooled.to(device=device, dtype=dtype).repeat(batch, 1),
                           "time_ids": time_ids.repeat(batch, 1)},
    )


# --------------------------------------------------------------------------- UNet and VAE


def sdxl_unet_call(backbone: SdxlBackbone, x: torch.Tensor, t: float | torch.Tensor,
                   cond: SdxlConditioning) -> torch.Tensor:
    """The UNet's prediction at (x, t) (the noise, or v for a v-predicting model), in the UNet's
    dtype. A one-row `cond` serves any batch. Callers choose the grad mode (inference_mode)."""
    unet = backbone.unet
    cond = cond.expand(x.shape[0])
    dtype = unet.dtype
    timestep = torch.as_tensor(t, device=x.device)
    return unet(
        x.to(dtype),
        timestep,
        encoder_hidden_states=cond.encoder_hidden_states.to(device=x.device, dtype=dtype),
        added_cond_kwargs={k: v.to(device=x.device, dtype=dtype) for k, v in cond.added_cond_kwargs.items()},
        return_dict=False,
    )[0]


@contextlib.contextmanager
def _vae_in_float32(vae: nn.Module):
    """The VAE in float32 for the block when its config says it overflows in lower precision
    (`force_upcast`, SDXL's VAE), back to its dtype after (exact: fp16 -> fp32 -> fp16)."""
    original = vae.dtype
    upcast = bool(getattr(vae.config, "force_upcast", False)) and original != torch.float32
    if upcast:
        vae.to(dtype=torch.float32)
    try:
        yield torch.float32 if upcast else original
    finally:
        if upcast:
            vae.to(dtype=original)


@torch.no_grad()
def encode_image_latents(backbone: SdxlBackbone, pixels: torch.Tensor,
                         generator: torch.Generator | Sequence[torch.Generator] | None = None) -> torch.Tensor:
    """Sampled (not mean) VAE latents of `pixels` (B, 3, H, W) in [-1, 1], times the VAE's scaling
    factor (and shifted by latents_mean/std where the config has them); float32 (B, 4, H/8, W/8).

    `generator`: one for the batch (as `latent_dist.sample(generator)`), or one per image (as
    diffusers' list of generators; a row then never depends on its batch)."""
    vae = backbone.vae
    device = _module_device(vae)
    with _vae_in_float32(vae) as vae_dtype:
        dist = vae.encode(pixels.to(device=device, dtype=vae_dtype)).latent_dist
        if isinstance(generator, Sequence):
            if len(generator) != pixels.shape[0]:
                raise ValueError(f"{len(generator)} generators for a batch of {pixels.shape[0]} images")
            mean, std = dist.mean, dist.std
            noise = torch.stack([
                torch.randn(mean.shape[1:], generator=g, device=g.device, dtype=mean.dtype) for g in generator
            ]).to(device)
            latents = mean + std * noise
        else:
            latents = dist.sample(generator)
    latents = latents.float()
    config = vae.config
    mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
    if mean is not None and std is not None:
        channels = latents.shape[1]
        mean = torch.tensor(mean, device=latents.device).view(1, channels, 1, 1)
        std = torch.tensor(std, device=latents.device).view(1, channels, 1, 1)
        return (latents - mean) * float(config.scaling_factor) / std
    return latents * float(config.scaling_factor)


# --------------------------------------------------------------------------- layers


def up_block_layers(unet: nn.Module) -> list[str]:
    """The up blocks' resnets (`up_blocks.0.resnets.0`, ...) in forward order: SDXL's 3 x 3, named
    and captured (conv2) as capture.py does for SD (its `up` layer set is the same list)."""
    return [name for name in resnet_names(unet) if name.startswith("up_blocks.")]


# --------------------------------------------------------------------------- stage one


def model_identity(backbone: SdxlBackbone):
    """The SDXL identity as the cache's `ModelIdentity` (the second text encoder's hash set)."""
    from dhf_cache.config import ModelIdentity

    ident = backbone.identity()
    return ModelIdentity(unet_class=ident.unet_class, unet_sha256=ident.unet_sha256, vae_sha256=ident.vae_sha256,
                         text_encoder_sha256=ident.text_encoder_sha256,
                         text_encoder_2_sha256=ident.text_encoder_2_sha256)


def sdxl_extractor_class():
    """`SdxlExtractor`: METHOD.md's inversion (extract.FeatureExtractor) with SDXL's conditioning,
    UNet call and VAE. Defined on first use so that importing this module does not import the
    SD extractor's dependencies."""
    from dhf_cache.sources.sd.extract import FeatureExtractor, image_seed

    class SdxlExtractor(FeatureExtractor):
        @torch.inference_mode()
        def encode_prompt(self, prompt: str) -> SdxlConditioning:
            size = self.preprocessing.image_size
            return sdxl_conditioning(self.backbone, prompt, size, size, 1, self.device, self.dtype)

        @torch.inference_mode()
        def encode_latents(self, pixels: torch.Tensor, image_ids: list[str]) -> torch.Tensor:
            """Each image's latent sampled with its own generator (seed, image id), as for SD."""
            generators = [torch.Generator().manual_seed(image_seed(self.preprocessing.seed, i)) for i in image_ids]
            return encode_image_latents(self.backbone, pixels.to(self.device), generators).to(self.device)

        def unet_output(self, x: torch.Tensor, t: int, conditioning: SdxlConditioning | None = None) -> torch.Tensor:
            cond = self.prompt_embedding.expand(x.shape[0]) if conditioning is None else conditioning
            return sdxl_unet_call(self.backbone, x.to(self.dtype), torch.tensor(t, device=self.device), cond).float()

    return SdxlExtractor
