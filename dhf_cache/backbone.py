"""Loading a Stable Diffusion backbone (hub id or local directory) and naming its identity.

Only the parts the inversion needs are loaded: UNet, VAE, text encoder and tokenizer (no
safety checker). A hub id is looked up in the local Hugging Face cache first and downloaded
only when that misses and offline mode is off; a model that cannot be found raises
`ModelNotFoundError` saying what was tried and how to fix it.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from dataclasses import dataclass, field
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch
from torch import nn

from dhf_cache.config import ModelIdentity
from dhf_cache.errors import ModelNotFoundError, UsageError, first_line

T = TypeVar("T")

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
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


def weights_sha256(module: nn.Module, extra: str = "") -> str:
    """sha256 over (name, shape, fp16 bytes) of every tensor in the state dict, in name order.

    Rounding to fp16 makes the fp32 and fp16 files of one checkpoint hash the same.
    """
    digest = hashlib.sha256(extra.encode())
    state = module.state_dict()
    for name in sorted(state):
        tensor = state[name]
        digest.update(f"{name}:{tuple(tensor.shape)}:".encode())
        if tensor.is_floating_point():
            tensor = tensor.to(torch.float16)
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def hub_unreachable(timeout: float = 5.0) -> str | None:
    """Why the Hub cannot be reached (its host name does not resolve: no network), else None.
    Without this a download attempt retries with back-off for ~25 s and prints every retry."""
    import socket
    import threading
    from urllib.parse import urlparse

    from huggingface_hub import constants

    host = urlparse(constants.ENDPOINT).hostname or constants.ENDPOINT
    outcome: list[BaseException | None] = []

    def resolve() -> None:
        try:
            socket.getaddrinfo(host, 443)
            outcome.append(None)
        except OSError as exc:
            outcome.append(exc)

    # a daemon thread: a resolver that hangs must not hold up the answer or the process's exit
    thread = threading.Thread(target=resolve, daemon=True, name="dhf-cache-hub-check")
    thread.start()
    thread.join(timeout)
    if not outcome:
        return f"{host} did not resolve within {timeout:.0f} s (no network here?)"
    if outcome[0] is not None:
        exc = outcome[0]
        return f"{host} cannot be resolved ({getattr(exc, 'strerror', None) or exc}; no network here?)"
    return None


def quiet_libraries() -> None:
    """Keep diffusers/transformers info logs and loading bars out of our progress output."""
    import diffusers
    import transformers

    # huggingface_hub warns that diffusers passes a deprecated argument; nothing a user can act on
    warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks.*", category=UserWarning)
    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


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
    from dhf_cache.inversion import PREDICTION_TYPES

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


def load_hub_id(model: str, load: Callable[[bool], T], download: str,
                errors: tuple[type[BaseException], ...] = (OSError, ValueError),
                why: Callable[[BaseException], str] | None = None) -> T:
    """`load(local_files_only)` of a hub id, for every source family: the local Hugging Face
    cache first, then the Hub unless HF_HUB_OFFLINE is set or it cannot be reached. Nothing
    found: ModelNotFoundError listing what was tried and the `hf download` command to run."""
    why = why or first_line
    tried = [f"local directory {Path(model).expanduser().resolve()} (does not exist)"]
    try:
        return load(True)
    except errors as exc:
        tried.append(f"the Hugging Face cache ({_hf_cache_dir()}): {why(exc)}")
    if hub_offline():
        tried.append("download: skipped, HF_HUB_OFFLINE is set")
    elif unreachable := hub_unreachable():
        tried.append(f"download: skipped, {unreachable}")
    else:
        try:
            return load(False)
        except errors as exc:
            tried.append(f"download from the Hugging Face Hub: {why(exc)}")
    raise ModelNotFoundError(  # one line, whatever the family
        f"--model {model}: model not found (tried: " + "; ".join(tried) + f"). Fix: on a machine with internet run "
        f"`{download}` (and copy the cache here), or pass a local model folder with --model DIR."
    )


def _hf_cache_dir() -> str:
    try:
        from huggingface_hub.constants import HF_HUB_CACHE

        return str(HF_HUB_CACHE)
    except ImportError:  # pragma: no cover - huggingface_hub always ships with diffusers
        return "~/.cache/huggingface/hub"


def local_snapshot(model: str) -> Path | None:
    """The folder of `model` (a hub id) in the local Hugging Face cache, if it holds one."""
    if model.count("/") != 1 or model.startswith((".", "/", "~")):
        return None
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model, local_files_only=True, allow_patterns=["*.json"]))
    except Exception:  # noqa: BLE001 - any miss (not cached, offline, malformed) means "not known here"
        return None
