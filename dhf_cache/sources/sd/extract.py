"""Stage one's computation: image -> sampled latent -> DDIM inversion -> captured feature maps.

A batch of images shares every UNet call; each image's latent noise comes from its own
generator seeded from (seed, image id), so a feature never depends on which batch, worker or
device computed it.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass

import numpy as np
import torch

from dhf_cache.sources.sd.backbone import Backbone
from dhf_cache.sources.sd.capture import FeatureCapture
from dhf_cache.config import FeatureSpace, Preprocessing
from dhf_cache.errors import UsageError
from dhf_cache.sources.sd.inversion import InversionSchedule, ddim_inversion_step, make_schedule, noise_estimate
from dhf_cache.cache.layers import LayerInfo


@dataclass
class ExtractedImage:
    latent: np.ndarray | None  # (4, h, w) float32, the sampled and scaled initial latent (generation: the
    # noise); None for sources without one (DINOv2)
    features: dict[str, np.ndarray]  # layer -> (T, C, H, W) float16, clean first
    error: str | None = None  # set when the features cannot be stored faithfully
    image: np.ndarray | None = None  # (H, W, 3) uint8: the generated image (generation only)
    prompt: str | None = None
    seed: int | None = None


def image_seed(seed: int, image_id: str) -> int:
    """A 63-bit seed derived from (seed, image id): the same for every worker and batch."""
    digest = hashlib.sha256(f"{seed}\x00{image_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


class FeatureExtractor:
    """Runs the inversion of METHOD.md on batches of preprocessed images."""

    def __init__(
        self,
        backbone: Backbone,
        feature_space: FeatureSpace,
        preprocessing: Preprocessing,
        device: torch.device | str,
        dtype: torch.dtype,
    ):
        self.backbone = backbone
        self.space = feature_space
        self.preprocessing = preprocessing
        self.device = torch.device(device)
        self.dtype = dtype
        self.schedule: InversionSchedule = make_schedule(feature_space.scheduler, feature_space.steps)
        # call index -> position on the stored time axis (clean first)
        self.save_positions = {
            self.schedule.call_of_step(step): pos for pos, step in enumerate(feature_space.save_steps)
        }
        # What the UNet predicts, as the spec records it (None: the noise); a model loaded for a
        # spec of the other kind (e.g. `match` with a checkpoint's feature space) is refused.
        self.prediction_type = feature_space.scheduler.prediction_type or "epsilon"
        if backbone.prediction_type != self.prediction_type:
            raise UsageError(f"{backbone.source}: its UNet predicts {backbone.prediction_type!r}, but these features "
                             f"were made with a model that predicts {self.prediction_type!r}: not the same model")
        self.capture = FeatureCapture(backbone.unet, feature_space.layers)
        self.prompt_embedding = self.encode_prompt(feature_space.prompt)
        vae_config = backbone.vae.config
        self.vae_factor = 2 ** (len(vae_config.block_out_channels) - 1)
        self.scaling_factor = float(vae_config.scaling_factor)

    @functools.cached_property
    def generator(self):
        """The generation pass (noise to image) over this extractor's backbone and capture."""
        from dhf_cache.sources.sd.generation import FeatureGenerator

        return FeatureGenerator(self, self.space.generation)

    def preprocess(self, image) -> torch.Tensor:
        """One loaded image as the model input (METHOD.md's chain, images.preprocess)."""
        from dhf_cache.datasets.images import preprocess

        return preprocess(image, self.preprocessing.load_size, self.preprocessing.image_size, self.preprocessing.fit)

    def accelerate(self, channels_last: bool = False, attention: str = "auto", compile: str = "off",
                   backend: str = "inductor") -> None:
        """Apply the speed levers (sources.acceleration) to the UNet; a compiled one captures on
        every call (FeatureCapture.every_call)."""
        from dhf_cache.sources.acceleration import accelerate

        self.capture.every_call = accelerate(self.backbone.unet, channels_last, attention, compile, backend)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        side = self.preprocessing.image_size // self.vae_factor
        return (int(self.backbone.unet.config.in_channels), side, side)

    @property
    def timesteps(self) -> list[int]:
        """UNet t of each stored inversion step, clean first (e.g. -1, 60, ..., 960)."""
        return [self.schedule.timestep_of_step(s) for s in self.space.save_steps]

    @torch.inference_mode()
    def encode_prompt(self, prompt: str) -> torch.Tensor:
        tokenizer = self.backbone.tokenizer
        ids = tokenizer(
            prompt,
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(self.device)
        return self.backbone.text_encoder(ids)[0].to(self.dtype)

    @torch.inference_mode()
    def encode_latents(self, pixels: torch.Tensor, image_ids: list[str]) -> torch.Tensor:
        """Sample each image's latent (not the mean) with its own generator; float32 (B, 4, h, w)."""
        dist = self.backbone.vae.encode(pixels.to(self.device, self.dtype)).latent_dist
        mean, std = dist.mean.float(), dist.std.float()
        noise = torch.stack(
            [
                torch.randn(mean.shape[1:], generator=torch.Generator().manual_seed(image_seed(self.preprocessing.seed, i)))
                for i in image_ids
            ]
        ).to(self.device)
        return (mean + std * noise) * self.scaling_factor

    def unet_output(self, x: torch.Tensor, t: int, conditioning=None) -> torch.Tensor:
        """The one call of the UNet (float32 out): what it predicts at (x, t) under
        `conditioning` (default: the spec's prompt for every row). Inversion, generation and
        the layer table all call it; SDXL's extractor overrides it with SDXL's conditioning."""
        emb = self.prompt_embedding.expand(x.shape[0], -1, -1) if conditioning is None else conditioning
        timestep = torch.tensor(t, device=self.device)
        return self.backbone.unet(x.to(self.dtype), timestep, encoder_hidden_states=emb).sample.float()

    def unet_noise(self, x: torch.Tensor, t: int, conditioning=None) -> torch.Tensor:
        """The UNet's noise estimate at (x, t), whatever the model predicts (noise_estimate)."""
        return noise_estimate(self.unet_output(x, t, conditioning), x.float(), self.schedule.alpha(t), self.prediction_type)

    @torch.inference_mode()
    def invert(self, latents: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[int, str]]:
        """Run the inversion from clean to noisy: layer -> (B, T, C, H, W) fp16 on the CPU, and
        {batch index: reason} for images whose stored features would not be finite (checked on
        the device, before the copy, so the check overlaps nothing on the host)."""
        sched = self.schedule
        last_call = max(self.save_positions)  # no call after the last saved one is needed
        n_saved = len(self.save_positions)
        buffers: dict[str, torch.Tensor] = {}
        x = latents.float()
        for i in range(last_call + 1):
            t, t_next = sched.call_timesteps[i], sched.next_timesteps[i]
            pos = self.save_positions.get(i)
            self.capture.enabled = pos is not None
            eps = self.unet_noise(x, t)
            outputs = self.capture.after_call(saved=pos is not None)
            if outputs is not None:
                store_outputs(buffers, outputs, pos, n_saved)
            if i < last_call:
                x = ddim_inversion_step(x, eps, sched.alpha(t), sched.alpha(t_next))
        self.capture.enabled = False
        bad = nonfinite_reasons(buffers, self.space.layers, self.timesteps)
        return to_host({name: buffers[name] for name in self.space.layers}), bad

    def extract(self, pixels: torch.Tensor, image_ids: list[str]) -> list[ExtractedImage]:
        """Features of a batch of preprocessed images (B, 3, S, S) in [-1, 1]."""
        latents = self.encode_latents(pixels, image_ids)
        features, bad = self.invert(latents)
        latents_np = latents.cpu().numpy()
        results = []
        for b in range(len(image_ids)):
            per_layer = {name: feats[b].numpy() for name, feats in features.items()}
            results.append(ExtractedImage(latents_np[b], per_layer, bad.get(b)))
        return results

    @torch.inference_mode()
    def layer_table(self) -> list[LayerInfo]:
        """Shapes of each captured layer at this image size, from one dry UNet call."""
        size = self.preprocessing.image_size // self.vae_factor
        channels = self.backbone.unet.config.in_channels
        x = torch.zeros(1, channels, size, size, device=self.device)
        self.capture.enabled = True
        try:
            self.unet_noise(x, self.schedule.call_timesteps[0])
            outputs = self.capture.take()
        finally:
            self.capture.enabled = False
        return [LayerInfo(n, *(int(d) for d in outputs[n].shape[1:])) for n in self.space.layers]


def store_outputs(buffers: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor], position: int,
                  n_saved: int, rows: slice = slice(None)) -> None:
    """Copy captured outputs (rows of the batch) into fp16 buffers (B, T, C, H, W) at `position`."""
    for name, out in outputs.items():
        out = out[rows]
        if name not in buffers:
            buffers[name] = torch.empty((out.shape[0], n_saved, *out.shape[1:]), dtype=torch.float16, device=out.device)
        buffers[name][:, position] = out


def to_host(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors on the CPU. From CUDA through page-locked memory (torch's caching host
    allocator reuses it batch after batch): pageable copies of fresh host memory moved ~1.3 GB/s
    on an H200 machine, ~19% of an SD 1.5 build's time at batch 8 (docs/benchmarks.md)."""
    devices = {t.device for t in tensors.values()}
    if len(devices) != 1 or next(iter(devices)).type != "cuda":
        return {name: t.cpu() for name, t in tensors.items()}
    host = {name: torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for name, t in tensors.items()}
    for name, t in tensors.items():
        host[name].copy_(t, non_blocking=True)
    torch.cuda.current_stream(devices.pop()).synchronize()  # the copies are done before use
    return host


def nonfinite_reasons(buffers: dict[str, torch.Tensor], layers, timesteps: list[int]) -> dict[int, str]:
    """{batch index: why} for images with a non-finite stored (fp16) value, first layer found."""
    reasons: dict[int, str] = {}
    for name in layers:
        buf = buffers[name]
        finite = torch.isfinite(buf).flatten(2).all(dim=2)  # (B, T)
        for b in (~finite.all(dim=1)).nonzero().flatten().tolist():
            if b not in reasons:
                t = timesteps[int((~finite[b]).nonzero()[0])]
                reasons[b] = (
                    f"non-finite features (fp16 overflow or NaN) in layer {name} at t={t}; "
                    "the model's activations do not fit in fp16 storage"
                )
    return reasons
