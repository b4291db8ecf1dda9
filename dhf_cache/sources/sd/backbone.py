"""Loading a Stable Diffusion backbone (hub id or local directory) and naming its identity.

Only the parts the inversion needs are loaded: UNet, VAE, text encoder and tokenizer (no
safety checker). A hub id goes through
`sources.loading.load_hub_id` (the local Hugging Face cache first).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from dhf_cache.config import ModelIdentity
from dhf_cache.errors import ModelNotFoundError, UsageError
from dhf_cache.sources.loading import load_hub_id, quiet_libraries, weights_sha256


# What load_backbone reads from a hub repository: the three models' configs and safetensors
# weights, the tokenizer and the scheduler config (for the UNet's prediction type). SD 1.5's repository also holds .bin copies, fp16 and EMA variants and
# a safety checker (~20 GB in all); these patterns fetch ~4 GB. Tested: a folder holding only
# these files loads.
HUB_FILES = (
    "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
    "vae/config.json", "vae/diffusion_pytorch_model.safetensors",
    "text_encoder/config.json", "text_encoder/model.safetensors",
    "tokenizer/*", "scheduler/scheduler_config.json",  # what the UNet predicts (epsilon or v)
)


def download_command(model: str) -> str:
    """The `hf download` command (huggingface_hub's CLI) that fetches exactly HUB_FILES of `model`."""
    return f"hf download {model} " + " ".join(f'--include "{pattern}"' for pattern in HUB_FILES)


@dataclass
class Backbone:
    unet: nn.Module
    vae: nn.Module
    text_encoder: nn.Module
    tokenizer: object
    source: str
    _identity: ModelIdentity | None = field(default=None, repr=False)
    prediction_type: str = "epsilon"  # what the UNet predicts (inversion.PREDICTION_TYPES)

    @property
    def identity(self) -> ModelIdentity:
        if self._identity is None:
            self._identity = ModelIdentity(
                unet_class=type(self.unet).__name__,
                unet_sha256=weights_sha256(self.unet),
                vae_sha256=weights_sha256(self.vae, extra=f"scaling_factor={self.vae.config.scaling_factor}"),
                text_encoder_sha256=weights_sha256(self.text_encoder),
            )
        return self._identity

    def to(self, device: str | torch.device) -> Backbone:
        for module in (self.unet, self.vae, self.text_encoder):
            module.to(device=device).eval().requires_grad_(False)
        return self


def _load_components(source: str, local_files_only: bool, dtype: torch.dtype) -> Backbone:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    quiet_libraries()
    kwargs = {"local_files_only": local_files_only}
    weights = {**kwargs, "torch_dtype": dtype}
    return Backbone(
        unet=UNet2DConditionModel.from_pretrained(source, subfolder="unet", **weights),
        vae=AutoencoderKL.from_pretrained(source, subfolder="vae", **weights),
        text_encoder=CLIPTextModel.from_pretrained(source, subfolder="text_encoder", **weights),
        tokenizer=CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", **kwargs),
        source=source,
        prediction_type=read_prediction_type(source, local_files_only),
    )


def read_prediction_type(source: str, local_files_only: bool) -> str:
    """What the model's UNet predicts, from its scheduler config (SD 1.x and 2.x-base: epsilon;
    SD 2.x at 768 px: v_prediction). A model without a scheduler config is taken as epsilon."""
    from diffusers import DDIMScheduler

    try:
        config = DDIMScheduler.load_config(source, subfolder="scheduler", local_files_only=local_files_only)
    except (OSError, ValueError):
        return "epsilon"
    return str(config.get("prediction_type") or "epsilon")


def check_prediction_type(backbone: Backbone, model: str) -> Backbone:
    """Refuse a UNet that predicts something the inversion cannot turn into a noise estimate."""
    from dhf_cache.sources.sd.inversion import PREDICTION_TYPES

    if backbone.prediction_type not in PREDICTION_TYPES:
        raise UsageError(
            f"--model {model}: its scheduler config says the UNet predicts {backbone.prediction_type!r}; dhf-cache "
            "inverts models that predict the noise (epsilon: SD 1.x, SD 2.x-base) or v (v_prediction: SD 2.x at 768 px)"
        )
    return backbone


def load_backbone(model: str, dtype: torch.dtype = torch.float32) -> Backbone:
    """Load `model` (a local pipeline directory or a hub id) on the CPU in `dtype`."""
    path = Path(model).expanduser()
    if path.exists():
        if not (path / "unet" / "config.json").is_file():
            raise ModelNotFoundError(
                f"--model {model}: {path} exists but is not a diffusers pipeline directory "
                "(no unet/config.json). Pass the folder written by `save_pretrained` or "
                "`hf download --local-dir`, or a hub id such as "
                "stable-diffusion-v1-5/stable-diffusion-v1-5."
            )
        try:
            return check_prediction_type(_load_components(str(path), True, dtype), model)
        except (OSError, ValueError) as exc:
            raise ModelNotFoundError(f"--model {model}: could not load the pipeline in {path}: {exc}") from None
    if model.startswith((".", "/", "~")) or model.count("/") > 1:  # a path, not an org/name id
        raise ModelNotFoundError(
            f"--model {model}: no such directory. Pass an existing pipeline directory or a hub id."
        )
    return load_hub_id(model, lambda local_only: check_prediction_type(_load_components(model, local_only, dtype), model),
                       download_command(model))


