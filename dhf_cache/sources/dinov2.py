"""DINOv2 as a feature source: loading (hub id or folder), identity, preprocessing, maps.

A *map* of a DINOv2 layer is the grid of its patch tokens for one image: a (C, h, w) tensor
with C = hidden_size and h = w = S / patch_size for an S x S input, token (r, c) of the
patch grid at [:, r, c] (tokens are row-major, as the patch embedding's flatten leaves them).
The CLS token and the register tokens are not stored. `extract_dinov2` returns them as
(B, T, C, h, w) with T = 1, the time axis of the cache format (a DINOv2 map has one "step").

Layer names:

- `encoder.layer.<i>`: the output of transformer block i (0-based), before the final
  layernorm; transformers' `output_hidden_states` entry i + 1 (entry 0 is the embeddings).
- `layernorm`: the model's `last_hidden_state`, the last block's output after the final
  layernorm: the `x_norm_patchtokens` DINOv2 users commonly take.

A hub id is looked up in the local Hugging Face cache first and downloaded only when that
misses and HF_HUB_OFFLINE is not set (as `dhf_cache.sources.sd.backbone.load_backbone` does for SD). A
folder or repository whose model is not a `Dinov2Model` / `Dinov2WithRegistersModel` is
refused from its config.json, before any weights are read.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors import SafetensorError
from torch import nn

from dhf_cache.sources.loading import load_hub_id, weights_sha256
from dhf_cache.config import Dinov2FeatureSpace, Dinov2Identity, check_image_size
from dhf_cache.errors import ModelNotFoundError, UsageError, first_line
from dhf_cache.cache.layers import LayerInfo
from dhf_cache.datasets.images import fit_image

DINOV2_MODEL_ID = "facebook/dinov2-base"
MODEL_CLASSES = ("Dinov2Model", "Dinov2WithRegistersModel")
# config.json's model_type -> the class AutoModel builds for it (configs without `architectures`)
_MODEL_TYPES = {"dinov2": "Dinov2Model", "dinov2_with_registers": "Dinov2WithRegistersModel"}
# What load_dinov2 reads from a hub repository (facebook/dinov2-* also hold pytorch_model.bin).
HUB_FILES = ("config.json", "model.safetensors", "preprocessor_config.json")
# DINOv2's ImageNet normalisation (facebook/dinov2-*'s preprocessor_config.json)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Config values that change the features without changing any weight's name or shape: they go
# into the weights hash with the weights (as backbone.py adds the VAE's scaling factor).
_ARCHITECTURE_KEYS = ("num_attention_heads", "layer_norm_eps", "hidden_act", "use_swiglu_ffn", "qkv_bias")

TINY_DINOV2_CONFIG = {
    "hidden_size": 32,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "mlp_ratio": 4,
    "patch_size": 14,
    "image_size": 56,  # a 4 x 4 patch grid; other multiples of 14 interpolate the positions
}
TINY_REGISTER_TOKENS = 4


def download_command(model: str) -> str:
    """The `hf download` command (huggingface_hub's CLI) that fetches exactly HUB_FILES of `model`."""
    return f"hf download {model} " + " ".join(f'--include "{pattern}"' for pattern in HUB_FILES)


# --------------------------------------------------------------------------------------------
# The tiny offline model (tests, demos)


def write_tiny_dinov2(path: str | Path, seed: int = 0, registers: bool = False) -> Path:
    """A randomly initialised tiny DINOv2 (TINY_DINOV2_CONFIG) saved with `save_pretrained`.

    Same seed, same bytes. With `registers`, a Dinov2WithRegistersModel with 4 register tokens
    (given random values: transformers initialises them to zero).
    """
    from transformers import (
        Dinov2Config,
        Dinov2Model,
        Dinov2WithRegistersConfig,
        Dinov2WithRegistersModel,
    )

    _quiet_transformers()
    path = Path(path)
    torch.manual_seed(seed)
    if registers:
        model = Dinov2WithRegistersModel(
            Dinov2WithRegistersConfig(**TINY_DINOV2_CONFIG, num_register_tokens=TINY_REGISTER_TOKENS)
        )
        with torch.no_grad():
            nn.init.normal_(model.embeddings.register_tokens, std=0.02)
    else:
        model = Dinov2Model(Dinov2Config(**TINY_DINOV2_CONFIG))
    model.save_pretrained(path)
    side = TINY_DINOV2_CONFIG["image_size"]
    preprocessor = {  # facebook/dinov2-base's, at the tiny model's size
        "crop_size": {"height": side, "width": side},
        "do_center_crop": True,
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": list(IMAGENET_MEAN),
        "image_processor_type": "BitImageProcessor",
        "image_std": list(IMAGENET_STD),
        "resample": 3,
        "rescale_factor": 1 / 255,
        "size": {"shortest_edge": side * 256 // 224},
    }
    (path / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2, sort_keys=True) + "\n")
    return path


# --------------------------------------------------------------------------------------------
# Loading and identity


@dataclass
class Dinov2Backbone:
    model: nn.Module  # in eval mode, requires_grad off
    patch_size: int
    hidden_size: int
    num_layers: int
    num_register_tokens: int  # 0 without registers
    model_class: str
    source: str = ""  # what --model said (provenance only; never part of the identity)
    _identity: Dinov2Identity | None = field(default=None, repr=False, compare=False)

    def identity(self) -> Dinov2Identity:
        if self._identity is None:
            config = self.model.config
            extra = ";".join(f"{key}={getattr(config, key, None)!r}" for key in _ARCHITECTURE_KEYS)
            self._identity = Dinov2Identity(
                model_class=self.model_class,
                weights_sha256=weights_sha256(self.model, extra=extra),
                patch_size=self.patch_size,
                num_register_tokens=self.num_register_tokens,
            )
        return self._identity

    def to(self, device: str | torch.device) -> Dinov2Backbone:
        self.model.to(device=device).eval().requires_grad_(False)
        return self


def load_dinov2(model: str, dtype: torch.dtype = torch.float32) -> Dinov2Backbone:
    """Load `model` (a folder, or a hub id such as facebook/dinov2-base) on the CPU in `dtype`."""
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelNotFoundError(f"--model {model}: {path} is a file, not a model folder; {_what_to_pass()}")
        _check_model_class(model, _folder_config(model, path), str(path))
        try:
            return _load(model, str(path), True, dtype)
        except _LOAD_ERRORS as exc:
            raise ModelNotFoundError(f"--model {model}: could not load the model in {path}: {_why(exc)}") from None
    if model.startswith((".", "/", "~")) or model.count("/") > 1:  # a path, not an org/name id
        raise ModelNotFoundError(f"--model {model}: no such directory; {_what_to_pass()}")
    return load_hub_id(model, lambda local_only: _load_from_hub(model, local_only, dtype), download_command(model),
                       errors=_LOAD_ERRORS, why=_why)


def _what_to_pass() -> str:
    return (f"pass a DINOv2 folder written by `save_pretrained` or `hf download --local-dir`, "
            f"or a hub id such as {DINOV2_MODEL_ID}")


def _folder_config(model: str, path: Path) -> dict:
    config = path / "config.json"
    if config.is_file():
        return _read_config(model, config)
    index = path / "model_index.json"  # a diffusers pipeline (e.g. Stable Diffusion)
    if index.is_file():
        return {"_class_name": _read_config(model, index).get("_class_name") or "diffusers pipeline"}
    raise ModelNotFoundError(f"--model {model}: {path} holds no config.json, so no transformers model; {_what_to_pass()}")


def _read_config(model: str, file: Path) -> dict:
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelNotFoundError(f"--model {model}: {file} cannot be read as JSON ({first_line(exc)})") from None
    if not isinstance(config, dict):
        raise ModelNotFoundError(f"--model {model}: {file} is not a JSON object")
    return config


def _model_class(config: dict) -> str:
    """The class a config names: its `architectures`, else the class of its model_type."""
    architectures = config.get("architectures")
    if isinstance(architectures, list) and architectures:
        return ", ".join(str(a) for a in architectures)
    model_type = config.get("model_type")
    if model_type in _MODEL_TYPES:
        return _MODEL_TYPES[model_type]
    if config.get("_class_name"):  # diffusers
        return str(config["_class_name"])
    return f"model of type {model_type!r}" if model_type else "model of unknown class"


def _check_model_class(model: str, config: dict, where: str) -> None:
    cls = _model_class(config)
    if cls not in MODEL_CLASSES:
        raise UsageError(
            f"--model {model}: {where} holds a {cls}, not a DINOv2 model ({' or '.join(MODEL_CLASSES)}); "
            + _what_to_pass()
        )


def _load_from_hub(model: str, local_files_only: bool, dtype: torch.dtype) -> Dinov2Backbone:
    from huggingface_hub import hf_hub_download

    config_file = hf_hub_download(model, "config.json", local_files_only=local_files_only)
    _check_model_class(model, _read_config(model, Path(config_file)), f"hub repository {model}")
    return _load(model, model, local_files_only, dtype)


def _load(model: str, source: str, local_files_only: bool, dtype: torch.dtype) -> Dinov2Backbone:
    from transformers import AutoModel

    _quiet_transformers()
    loaded, info = AutoModel.from_pretrained(
        source, local_files_only=local_files_only, dtype=dtype, output_loading_info=True
    )
    cls = type(loaded).__name__
    if cls not in MODEL_CLASSES:  # config.json said otherwise; AutoModel had the last word
        raise UsageError(f"--model {model}: loads as a {cls}, not a DINOv2 model; {_what_to_pass()}")
    # A weight missing from the files would be left at random init: features without meaning.
    # The mask token is the exception: only masked pre-training uses it (initialised to zeros).
    missing = [k for k in info.get("missing_keys", ()) if not k.endswith("mask_token")]
    if missing:
        raise ModelNotFoundError(
            f"--model {model}: its weights lack {len(missing)} tensor(s) of a {cls} (e.g. {min(missing)}); "
            "the folder is incomplete or holds another architecture"
        )
    config = loaded.config
    patch = config.patch_size
    if isinstance(patch, (list, tuple)):
        if len(set(patch)) != 1:
            raise UsageError(f"--model {model}: non-square patches {tuple(patch)} are not supported")
        patch = patch[0]
    loaded.eval().requires_grad_(False)
    return Dinov2Backbone(
        model=loaded,
        patch_size=int(patch),
        hidden_size=int(config.hidden_size),
        num_layers=int(config.num_hidden_layers),
        num_register_tokens=int(getattr(config, "num_register_tokens", 0) or 0),  # Dinov2Config has none
        model_class=cls,
        source=model,
    )


def _quiet_transformers() -> None:
    """Keep transformers' info logs and loading/saving bars out of our output (as backbone.py's
    quiet_libraries does, without importing diffusers)."""
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


# What from_pretrained raises for files it cannot use: missing or unreadable (OSError), bad
# values (ValueError), weights whose shapes do not fit config.json (RuntimeError), a corrupt
# safetensors file (SafetensorError).
_LOAD_ERRORS = (OSError, ValueError, RuntimeError, SafetensorError)


def _why(exc: BaseException) -> str:
    if isinstance(exc, RuntimeError) and "mismatched_sizes" in str(exc):
        return "its weights' shapes do not fit its config.json"
    if isinstance(exc, SafetensorError):
        return f"corrupt safetensors file ({first_line(exc)})"
    return first_line(exc)


# --------------------------------------------------------------------------------------------
# Feature space and layers


def available_layers(backbone: Dinov2Backbone) -> list[str]:
    """Every layer name of this model, in forward order: the blocks, then the final layernorm."""
    return [f"encoder.layer.{i}" for i in range(backbone.num_layers)] + ["layernorm"]


def check_layers(backbone: Dinov2Backbone, layers: Sequence[str]) -> tuple[str, ...]:
    """`layers` as a tuple if each is a layer of this model (once), else a UsageError listing them."""
    names = tuple(layers)
    available = available_layers(backbone)
    if not names:
        raise UsageError("--layers is empty; available: " + ", ".join(available))
    unknown = [name for name in names if name not in available]
    if unknown:
        raise UsageError(
            f"--layers: unknown layer(s) {unknown} for this {backbone.model_class} "
            f"({backbone.num_layers} blocks); available: " + ", ".join(available)
        )
    if len(set(names)) != len(names):
        raise UsageError(f"--layers names a layer twice: {list(names)}")
    return names


def layer_table(backbone: Dinov2Backbone, image_size: int, layers: Sequence[str] | None = None) -> list[LayerInfo]:
    """The layer table of `layers` (default: all) at an image_size x image_size input."""
    side = check_image_size(image_size, backbone.patch_size) // backbone.patch_size
    names = available_layers(backbone) if layers is None else check_layers(backbone, layers)
    return [LayerInfo(name, backbone.hidden_size, side, side) for name in names]


def feature_space(backbone: Dinov2Backbone, layers: Sequence[str], image_size: int) -> Dinov2FeatureSpace:
    """The feature space of `layers` of `backbone` at `image_size`, layers checked against the model."""
    names = check_layers(backbone, layers)
    check_image_size(image_size, backbone.patch_size)
    return Dinov2FeatureSpace(kind="dinov2", model=backbone.identity(), layers=names, image_size=image_size)


# --------------------------------------------------------------------------------------------
# Preprocessing and extraction


def preprocess_dinov2(image: Image.Image, image_size: int, fit: str = "stretch") -> torch.Tensor:
    """PIL bilinear to image_size^2 (as images.preprocess for SD; `fit="pad"` keeps the aspect
    ratio and pads, images.fit_image), to [0, 1], ImageNet-normalised.

    Returns a float32 tensor (3, image_size, image_size).
    """
    if image.mode != "RGB":
        image = image.convert("RGB")
    resized = fit_image(image, image_size, fit)
    x = torch.from_numpy(np.asarray(resized, dtype=np.float32).copy()).permute(2, 0, 1) / 255.0
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32).view(3, 1, 1)
    return (x - mean) / std


def extract_dinov2(
    backbone: Dinov2Backbone, pixel_values: torch.Tensor, layers: Sequence[str]
) -> dict[str, torch.Tensor]:
    """The maps of `layers` for a batch: {layer: (B, 1, C, h, w) float32}, h = w = S / patch_size.

    `pixel_values` is (B, 3, S, S), preprocessed (`preprocess_dinov2`); it is moved to the
    model's device and dtype. One forward pass with `output_hidden_states` serves all layers.
    """
    names = check_layers(backbone, layers)
    if pixel_values.ndim != 4 or pixel_values.shape[1] != 3 or pixel_values.shape[2] != pixel_values.shape[3]:
        raise UsageError(f"pixel_values must be (B, 3, S, S), got {tuple(pixel_values.shape)}")
    batch, size = pixel_values.shape[0], pixel_values.shape[2]
    side = check_image_size(size, backbone.patch_size) // backbone.patch_size
    weight = next(backbone.model.parameters())
    with torch.inference_mode():
        out = backbone.model(pixel_values=pixel_values.to(device=weight.device, dtype=weight.dtype),
                             output_hidden_states=True)
        # hidden_states[0] is the embeddings, hidden_states[i + 1] block i's output
        if len(out.hidden_states) != backbone.num_layers + 1:
            raise RuntimeError(f"expected {backbone.num_layers + 1} hidden states, got {len(out.hidden_states)}")
        # Token order in every hidden state: [CLS, register_1..register_R, patches row-major]
        first_patch = 1 + backbone.num_register_tokens
        maps = {}
        for name in names:
            tokens = out.last_hidden_state if name == "layernorm" else out.hidden_states[int(name.rsplit(".", 1)[1]) + 1]
            patches = tokens[:, first_patch:]
            if patches.shape[1] != side * side:  # a wrong register count would land here
                raise RuntimeError(f"{name}: {patches.shape[1]} patch tokens, expected {side}x{side}")
            grid = patches.reshape(batch, side, side, backbone.hidden_size).permute(0, 3, 1, 2)
            maps[name] = grid.unsqueeze(1).to(torch.float32).contiguous()
    return maps


# --------------------------------------------------------------------------------------------
# Stage one: the build's extractor (the same duck interface as extract.FeatureExtractor)


class Dinov2Extractor:
    """Preprocesses images and extracts the stored maps of one DINOv2 feature space in batches.

    The build loop calls `preprocess(image)` per image and `extract(pixels, ids)` per batch, as
    it does for SD; DINOv2 has no latent and no time axis (T = 1, stored timestep 0)."""

    timesteps = [0]  # the one position of the time axis; a DINOv2 map has no diffusion step
    latent_shape = None  # nothing to store beside the maps

    def __init__(self, backbone: Dinov2Backbone, space: Dinov2FeatureSpace, preprocessing, device: torch.device | str):
        self.backbone = backbone
        self.space = space
        self.preprocessing = preprocessing
        self.device = torch.device(device)

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """METHOD.md's chain for the sizes (PIL bilinear to load_size^2, then bilinear to the
        model input), with DINOv2's ImageNet normalisation instead of SD's [-1, 1]."""
        pre = self.preprocessing
        x = preprocess_dinov2(image, pre.load_size, pre.fit)
        if pre.load_size != pre.image_size:
            x = torch.nn.functional.interpolate(x[None], size=(pre.image_size, pre.image_size), mode="bilinear",
                                                align_corners=False)[0]
        return x

    def accelerate(self, channels_last: bool = False, attention: str = "auto", compile: str = "off",
                   backend: str = "inductor") -> None:
        """Apply the speed levers (sources.acceleration) to the ViT."""
        from dhf_cache.sources.acceleration import accelerate

        accelerate(self.backbone.model, channels_last, attention, compile, backend)

    def extract(self, pixels: torch.Tensor, image_ids: list[str]) -> list:
        from dhf_cache.sources.sd.extract import ExtractedImage

        maps = extract_dinov2(self.backbone, pixels, self.space.layers)
        results = []
        for i in range(pixels.shape[0]):
            features = {name: maps[name][i].to(torch.float16).cpu().numpy() for name in self.space.layers}
            bad = [name for name, value in features.items() if not np.isfinite(value).all()]
            error = f"non-finite values (NaN or inf) in the maps of {', '.join(bad)}" if bad else None
            results.append(ExtractedImage(latent=None, features=features, error=error))
        return results

    def layer_table(self) -> list[LayerInfo]:
        return layer_table(self.backbone, self.space.image_size, self.space.layers)


def resolve_dinov2_layers(backbone: Dinov2Backbone, layers: str | Sequence[str]) -> tuple[str, ...]:
    """`--layers` for DINOv2: `last` (the final layernorm's patch tokens, the default), `all`, or
    comma-separated names (encoder.layer.<i>, layernorm)."""
    if isinstance(layers, str):
        if layers == "last":
            return ("layernorm",)
        if layers == "all":
            return tuple(available_layers(backbone))
        layers = [part.strip() for part in layers.split(",") if part.strip()]
    return check_layers(backbone, layers)
