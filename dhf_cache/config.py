"""Typed, frozen configs: built once at the CLI edge and passed down.

`BuildSpec` is what a cache *is* (it is stored in the cache and fingerprinted); `BuildOptions`
is how one run builds it (device, batch size, ...), which never changes the stored values.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, field_validator, model_serializer, model_validator

from dhf_cache.errors import UsageError

# 2: one group per feature source under sources/<name>; 1 (still read): one SD source at the root
FORMAT_VERSION = 2

SD15_MODEL_ID = "stable-diffusion-v1-5/stable-diffusion-v1-5"
# METHOD.md: saved inversion step indices (49 = cleanest), stored clean first.
SD15_SAVE_STEPS = (49, 45, 40, 35, 30, 25, 20, 15, 10, 5, 0)
DEFAULT_STEPS = 50
DEFAULT_LAYERS = "up"  # METHOD.md: the 12 up-block resnets
# `--layers` when not given, per source family: SD and SDXL as METHOD.md, DINOv2 its final layernorm
FAMILY_DEFAULT_LAYERS = {"sd": DEFAULT_LAYERS, "sdxl": DEFAULT_LAYERS, "dinov2": "last"}
EVAL_LOAD_SIZE = 224  # METHOD.md: the paper tests at load size 224 (descriptors upsampled to it)
PCK_ALPHAS = (0.05, 0.1, 0.15)  # METHOD.md reports alpha = 0.1; its neighbours are customary
PROJECTION_DIM, DESCRIPTOR_GRID, NORM_GROUPS = 384, 64, 32  # METHOD.md: 384 x 64 x 64 descriptors, GN(32)
MAX_PIXELS = 89_478_485  # PIL's decompression-bomb limit


class Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class SchedulerSpec(Frozen):
    """DDIM settings of METHOD.md (not the model's own scheduler config, whose offset is 1)."""

    kind: Literal["ddim"] = "ddim"
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    num_train_timesteps: int = 1000
    steps_offset: int = 0
    timestep_spacing: Literal["leading"] = "leading"
    # What the model's UNet predicts; None means the noise (epsilon, METHOD.md's SD 1.5), left out
    # of fingerprints so that every cache built before this field keeps its fingerprint.
    prediction_type: Literal["v_prediction"] | None = None


class ModelIdentity(Frozen):
    """What the features depend on, not where the model was loaded from.

    Weights are hashed after rounding to fp16, so the fp32 files and the fp16 variant of the
    same checkpoint (and a CPU fp32 or GPU fp16 build of them) share one identity.
    """

    unet_class: str
    unet_sha256: str
    vae_sha256: str
    text_encoder_sha256: str
    text_encoder_2_sha256: str | None = None  # SDXL's second text encoder (null, unfingerprinted, for SD)


class GenerationSpec(Frozen):
    """How synthetic images are generated (METHOD.md: guidance 7.5 with a negative prompt)."""

    guidance: float = Field(7.5, ge=1.0)
    negative_prompt: str = ""


class FeatureSpace(Frozen):
    """Everything that decides what a stored feature means; a checkpoint binds to this.

    `kind` is "sdxl" for an SDXL UNet (two text encoders, pooled embeddings and time ids as
    conditioning); None for SD 1.x/2.x, left out of fingerprints like every null field."""

    kind: Literal["sdxl"] | None = None
    model: ModelIdentity
    scheduler: SchedulerSpec = SchedulerSpec()
    source: Literal["inversion", "generation"] = "inversion"
    generation: GenerationSpec | None = None  # set exactly when source == "generation"
    steps: int = Field(DEFAULT_STEPS, ge=1)
    save_steps: tuple[int, ...] = SD15_SAVE_STEPS
    layers: tuple[str, ...]
    capture: Literal["resnet.conv2"] = "resnet.conv2"
    prompt: str = ""
    storage_dtype: Literal["float16"] = "float16"

    @model_validator(mode="after")
    def _check_steps(self) -> FeatureSpace:
        if (self.source == "generation") != (self.generation is not None):
            raise ValueError("generation settings go with source 'generation', and only with it")
        validate_save_steps(self.steps, self.save_steps)
        if not self.layers:
            raise ValueError("at least one layer must be captured")
        return self


class Preprocessing(Frozen):
    """How an image file becomes the latent the inversion starts from."""

    load_size: int = Field(512, ge=8)
    image_size: int = Field(512, ge=8)
    resampling: Literal["bilinear"] = "bilinear"
    latent: Literal["sample"] = "sample"
    seed: int = 0
    # stretch (METHOD.md) or pad: keep the aspect ratio and centre on a black square (SD+DINO,
    # GeoAware-SC); recorded only when pad, so every stretch spec and fingerprint stays as it was
    fit: Literal["stretch", "pad"] = "stretch"

    @model_serializer(mode="wrap")
    def _without_default_fit(self, handler):
        data = handler(self)
        if self.fit == "stretch":
            data.pop("fit", None)
        return data
    # image_size's other constraint is the family's: a multiple of 8 for SD's VAE (BuildSpec),
    # of the patch size for DINOv2 (Dinov2FeatureSpace); DINOv2's own 518 is no multiple of 8


VAE_FACTOR = 8  # SD's VAE downsamples 8x: SD and SDXL image sizes are multiples of it


def check_vae_size(image_size: int, error: type[Exception] = ValueError) -> int:
    if image_size % VAE_FACTOR:
        raise error(f"image_size must be a multiple of {VAE_FACTOR} (the VAE factor), got {image_size}")
    return image_size


class ComputeSpec(Frozen):
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"


class CodecSpec(Frozen):
    """How feature chunks are stored. `zstd` is lossless; `bitround` first rounds each fp16
    value's 10-bit mantissa to `keepbits` bits (relative error <= 2^-(keepbits+1)), which makes
    zstd far more effective; `quant8` stores each (timestep, channel) map as uint8 codes with
    its own minimum and step (absolute error <= 1/510 of the map's range; dhf_cache/cache/quant8.py).
    Latents are always stored losslessly."""

    name: Literal["zstd", "bitround", "quant8"] = "zstd"
    level: int = Field(3, ge=1, le=22)
    keepbits: int | None = Field(None, ge=1, le=9)
    checksum: Literal["crc32c"] = "crc32c"

    @model_validator(mode="after")
    def _keepbits_with_bitround(self) -> CodecSpec:
        if (self.name == "bitround") != (self.keepbits is not None):
            raise ValueError("keepbits (1..9) goes with codec bitround, and only with it")
        return self


class StorageSpec(Frozen):
    codec: CodecSpec = CodecSpec()


DINOV2_LAYER_NAME = re.compile(r"encoder\.layer\.(0|[1-9][0-9]*)|layernorm")


class Dinov2Identity(Frozen):
    """What DINOv2 features depend on, not where the model was loaded from.

    `weights_sha256` covers the weights rounded to fp16 (so fp32 and fp16 copies agree) and the
    config values in dhf_cache.sources.dinov2's _ARCHITECTURE_KEYS.
    """

    model_class: str
    weights_sha256: str
    patch_size: int
    num_register_tokens: int


class Dinov2FeatureSpace(Frozen):
    """Everything that decides what a stored DINOv2 map means; a checkpoint binds to this."""

    kind: Literal["dinov2"]
    model: Dinov2Identity
    layers: tuple[str, ...]
    image_size: int  # the model input is image_size x image_size
    normalization: Literal["imagenet"] = "imagenet"
    tokens: Literal["patch"] = "patch"
    storage_dtype: Literal["float16"] = "float16"

    @field_validator("layers")
    @classmethod
    def _layer_names(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if not v:
            raise ValueError("at least one layer must be captured")
        bad = [name for name in v if not DINOV2_LAYER_NAME.fullmatch(name)]
        if bad:
            raise ValueError(f"layers {bad} are not DINOv2 layer names (encoder.layer.<i> or layernorm)")
        if len(set(v)) != len(v):
            raise ValueError(f"layers names a layer twice: {list(v)}")
        return v

    @model_validator(mode="after")
    def _image_size_in_patches(self) -> Dinov2FeatureSpace:
        check_image_size(self.image_size, self.model.patch_size, error=ValueError)
        return self


def check_image_size(image_size: int, patch_size: int, error: type[Exception] = UsageError) -> int:
    """`image_size` if it is a positive multiple of `patch_size`, else `error` saying why."""
    if image_size < patch_size or image_size % patch_size:
        lower = max(patch_size, image_size // patch_size * patch_size)
        raise error(
            f"image_size {image_size} is not a positive multiple of the patch size {patch_size} "
            f"(e.g. {lower} or {lower + patch_size})"
        )
    return image_size


def _feature_space_family(value) -> str:
    kind = value.get("kind") if isinstance(value, dict) else getattr(value, "kind", None)
    return "dinov2" if kind == "dinov2" else "sd"


class BuildSpec(Frozen):
    """The whole spec of a cache source; stored in its attributes and fingerprinted. The feature
    space says the source's family: SD 1.x/2.x (`FeatureSpace`, no `kind`, as in format 1) or
    DINOv2 (`kind: "dinov2"`)."""

    # the family decides which model validates ("kind": "dinov2", else SD's FeatureSpace), so a
    # bad spec's error names the fields of that family only
    feature_space: Annotated[Annotated[FeatureSpace, Tag("sd")] | Annotated[Dinov2FeatureSpace, Tag("dinov2")],
                             Discriminator(_feature_space_family)]
    preprocessing: Preprocessing = Preprocessing()
    compute: ComputeSpec = ComputeSpec()
    storage: StorageSpec = StorageSpec()

    @model_validator(mode="after")
    def _vae_multiple(self) -> BuildSpec:
        if getattr(self.feature_space, "kind", None) != "dinov2":
            check_vae_size(self.preprocessing.image_size)
        return self


class BuildOptions(Frozen):
    """How one run builds (never changes stored values)."""

    batch_size: int = Field(1, ge=1)
    device: str = "cpu"
    max_pixels: int = Field(MAX_PIXELS, ge=1)
    limit: int | None = Field(None, ge=1)
    progress: bool = True
    shard: tuple[int, int] | None = None  # (i, n): build the i-th (0-based) of n disjoint shards
    threads: int | None = Field(None, ge=1)  # torch intra-op threads (CPU results depend on it)
    prepare_only: bool = False  # create or check the cache, build nothing (coordinator step)
    # speed levers on the network (sources/acceleration.py): values stay within fp16 rounding
    channels_last: bool = False
    attention: Literal["auto", "flash", "efficient", "cudnn", "math"] = "auto"
    compile: Literal["off", "default", "reduce-overhead", "max-autotune"] = "off"

    @field_validator("shard")
    @classmethod
    def _shard_in_range(cls, v):
        if v is not None and not (v[1] >= 1 and 0 <= v[0] < v[1]):
            raise ValueError(f"shard {v[0]}/{v[1]}: needs 0 <= I < N")
        return v


def source_kind(spec: BuildSpec) -> str:
    """The family of a source's model: "sd" (SD 1.x/2.x UNets), or the `kind` its feature space names."""
    return getattr(spec.feature_space, "kind", None) or "sd"


def validate_save_steps(steps: int, save_steps: tuple[int, ...]) -> None:
    """Save steps are inversion step indices in [0, steps), listed clean first (descending)."""
    if not save_steps:
        raise ValueError("save_steps must name at least one step")
    bad = [s for s in save_steps if not 0 <= s < steps]
    if bad:
        raise ValueError(f"save_steps {bad} outside 0..{steps - 1} for {steps} steps")
    if len(set(save_steps)) != len(save_steps):
        raise ValueError(f"save_steps has duplicates: {list(save_steps)}")
    if list(save_steps) != sorted(save_steps, reverse=True):
        raise ValueError(
            f"save_steps must be listed clean first (descending indices), got {list(save_steps)}"
        )


def default_save_steps(steps: int) -> tuple[int, ...]:
    """METHOD.md's 11 indices for 50 steps; otherwise up to 11 evenly spaced, clean first."""
    if steps == DEFAULT_STEPS:
        return SD15_SAVE_STEPS
    n = min(11, steps)
    if n == 1:
        return (steps - 1,)
    picks = {round((steps - 1) * (1 - k / (n - 1))) for k in range(n)}
    return tuple(sorted(picks, reverse=True))


# Matching allocates per keypoint one similarity map of LOAD_SIZE^2 float32, and per image a
# LOAD_SIZE^2 norm map and a bilinear corner table (4 indices + 4 weights, 48 bytes) per load
# pixel: memory grows with the square of the load size. At 2048 a keypoint's map is 16 MiB and
# the table 192 MiB, within a laptop's memory; 100000 would need 37 GiB per keypoint. Nothing is
# gained beyond it either: predictions are scaled back to the original image (SPair-71k images
# are at most 500 px a side), and the paper uses 224. Eval and training's validation share it.
MIN_LOAD_SIZE = 8
MAX_LOAD_SIZE = 2048


class TrainOptions(Frozen):
    """Everything that decides what a training run computes (stored in the run's config.json)."""

    split: str = "trn"
    val_split: str | None = "val"
    steps: int = Field(5000, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    pairs_per_step: int = Field(1, ge=1)
    layers: tuple[str, ...] | None = None  # None: every layer the cache holds
    timesteps: tuple[int, ...] | None = None  # UNet t values; None: every stored step
    projection_dim: int = Field(PROJECTION_DIM, ge=4)
    output_size: int = Field(DESCRIPTOR_GRID, ge=1)  # the descriptor grid side
    norm_groups: int = Field(NORM_GROUPS, ge=1)  # GroupNorm groups; must divide projection_dim / 4
    val_every: int = Field(1000, ge=1)
    val_pairs_per_category: int = Field(20, ge=1)
    val_load_size: int = Field(EVAL_LOAD_SIZE, ge=MIN_LOAD_SIZE, le=MAX_LOAD_SIZE)
    seed: int = 0
    skip_missing: bool = False
    # the training step's forward pass: fp32 (the reference), or bf16 autocast with fp32 weights,
    # optimizer, loss and validation (pipelines/train.py `_train_step`)
    precision: Literal["fp32", "bf16"] = "fp32"
