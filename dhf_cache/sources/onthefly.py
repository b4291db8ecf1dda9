"""Descriptors for images that are in no cache: stage one's extraction, run on the fly.

A checkpoint records the build spec of the cache it was trained on (`feature_space_spec`,
`preprocessing`). `OnTheFlyExtractor` rebuilds that spec, loads the backbone, refuses a model
whose weights differ from the spec's (features of another model mean something else to the
aggregator), and runs the same preprocessing, inversion and layer capture as `dhf-cache build`,
so an image gives the descriptors it would give from a cache (given the same image id, which
seeds the sampled latent).

Only the checkpoint's layers are captured and the inversion stops at its noisiest timestep:
what a UNet call computes does not depend on which layers are hooked or on later calls, so the
result is the same at a fraction of the cost.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from PIL import Image

from dhf_cache.sources.sd.backbone import Backbone, load_backbone

from dhf_cache.sources.loading import DTYPES
from dhf_cache.aggregator.checkpoint import Checkpoint
from dhf_cache.config import DEFAULT_STEPS, FeatureSpace, Preprocessing, SchedulerSpec
from dhf_cache.correspondence.descriptors import aggregate
from dhf_cache.device import resolve_device
from dhf_cache.errors import CheckpointError, FeatureError, ModelNotFoundError, UsageError
from dhf_cache.sources.sd.extract import FeatureExtractor
from dhf_cache.datasets.images import to_rgb, preprocess


def pixel_id(image: Image.Image) -> str:
    """An image id from the pixels (size + RGB bytes): the same picture seeds the same latent."""
    rgb = to_rgb(image)
    digest = hashlib.sha256(f"{rgb.width}x{rgb.height}:".encode())
    digest.update(rgb.tobytes())
    return f"sha256:{digest.hexdigest()}"


def derive_save_steps(timesteps: Sequence[int], steps: int = DEFAULT_STEPS,
                      scheduler: SchedulerSpec = SchedulerSpec()) -> tuple[int, ...]:
    """Inversion step indices (clean first) whose UNet calls are at `timesteps` in a `steps` schedule."""
    from dhf_cache.sources.sd.inversion import make_schedule

    schedule = make_schedule(scheduler, steps)
    step_of = {schedule.timestep_of_step(s): s for s in range(steps)}
    missing = [t for t in timesteps if t not in step_of]
    if missing:
        raise CheckpointError(
            f"checkpoint timesteps {missing}: not UNet calls of the {steps}-step DDIM inversion "
            f"(those are {', '.join(str(schedule.call_timesteps[i]) for i in range(min(steps, 6)))}, ...); "
            "the feature space cannot be reconstructed. Re-import it with `dhf-cache import-checkpoint "
            "--cache URL` to bind it to the cache it reads"
        )
    return tuple(sorted({step_of[t] for t in timesteps}, reverse=True))


def on_the_fly_only_sd(checkpoint: Checkpoint) -> None:
    """Features are extracted on the fly from SD UNets only: a checkpoint that reads another
    source's maps (or fuses several) is evaluated from a cache instead; one line saying so."""
    if checkpoint.fused or any(binding.kind for binding in checkpoint.bindings.values()):
        raise UsageError(f"{checkpoint.run}: this checkpoint reads maps of {', '.join(checkpoint.bindings)}; "
                         "extraction on the fly covers SD models only: build a cache of your images with each "
                         "source (`dhf-cache build --dataset folder:DIR --source NAME`) and use `dhf-cache eval`")


def checkpoint_spec(checkpoint: Checkpoint) -> tuple[FeatureSpace | None, Preprocessing | None]:
    """The (feature space, preprocessing) the checkpoint's cache was built with; (None, None)
    for an imported checkpoint that was never bound to a cache."""
    on_the_fly_only_sd(checkpoint)
    binding = checkpoint.binding
    spec = binding.feature_space_spec
    if spec is None:
        if binding.feature_space is not None:
            raise CheckpointError(
                f"{checkpoint.path}: config.json binds a feature space ({binding.feature_space[:12]}...) "
                "but does not record its spec (feature_space_spec), so features cannot be extracted on the fly; "
                "retrain or re-import the checkpoint with this version of dhf-cache"
            )
        return None, None
    try:
        space = FeatureSpace.model_validate(spec)
        pre = Preprocessing.model_validate(binding.preprocessing or {})
    except ValueError as exc:
        raise CheckpointError(f"{checkpoint.path}: config.json holds an unreadable build spec ({exc})") from None
    return space, pre


def _looks_like_hub_id(source: str) -> bool:
    """`name` or `org/name`: what load_backbone tries in the Hugging Face cache (not a path)."""
    return not source.startswith((".", "/", "~")) and source.count("/") <= 1


def recorded_model(checkpoint: Checkpoint) -> tuple[str, list[str]]:
    """(the backbone the checkpoint records, the folders tried for it).

    New checkpoints record a local folder as an absolute path. A relative one (older
    checkpoints stored the cache's `model_source` as given) is looked for under the run folder,
    then the working folder; a hub id is returned as is for load_backbone. ModelNotFoundError
    in one line, naming what was tried, when none of these can be the model."""
    recorded = checkpoint.binding.model_source
    if not recorded:
        raise CheckpointError(
            f"{checkpoint.path}: the checkpoint records no model it was built with; pass the backbone "
            "with --model ID|DIR (e.g. stable-diffusion-v1-5/stable-diffusion-v1-5)"
        )
    path = Path(recorded).expanduser()
    candidates = [path] if path.is_absolute() else [checkpoint.run / path, Path.cwd() / path]
    for candidate in candidates:
        if candidate.is_dir():
            return str(candidate.resolve()), []
    tried = [f"{candidate} (no such folder)" for candidate in candidates]
    if path.is_absolute() or not _looks_like_hub_id(recorded):
        raise ModelNotFoundError(
            f"{checkpoint.run}: the checkpoint's model {recorded!r} was not found (tried {'; '.join(tried)}); "
            "pass --model ID|DIR with the backbone it was trained with"
        )
    return recorded, tried


def identity_differences(want: dict, have: dict) -> list[str]:
    """`field: checkpoint <hash>, loaded model <hash>` for every field of the identity that differs."""
    return [f"{key}: checkpoint {want.get(key)}, loaded model {have.get(key)}"
            for key in sorted(set(want) | set(have)) if want.get(key) != have.get(key)]


class OnTheFlyExtractor:
    """Checkpoint descriptors for arbitrary images, extracted with the checkpoint's build spec.

    `model` overrides the checkpoint's recorded `model_source` (hub id or folder), e.g. when
    the cache was built on another machine. `preprocessing` overrides the recorded load/image
    size (a checkpoint binds to the feature space, not to a load size: the paper trains at 64
    and tests at 224); imported checkpoints that record none default to 512/512.
    `log` receives one-line notes (e.g. that an unbound checkpoint skipped the identity check).
    """

    def __init__(self, checkpoint: Checkpoint, model: str | None = None, device: str | torch.device = "auto",
                 preprocessing: Preprocessing | None = None, batch_size: int = 4,
                 log: Callable[[str], None] = lambda _: None):
        if batch_size < 1:
            raise UsageError(f"batch_size={batch_size!r}: must be at least 1")
        self.checkpoint = checkpoint
        self.batch_size = batch_size
        self.device = resolve_device(device) if isinstance(device, str) else torch.device(device)
        self.dtype = DTYPES["float16"] if self.device.type == "cuda" else DTYPES["float32"]
        self.notes: list[str] = []
        space, pre = checkpoint_spec(checkpoint)
        self.bound = space is not None
        if model:
            source = model
            self.backbone: Backbone = load_backbone(source, self.dtype)
        else:
            source, tried = recorded_model(checkpoint)
            try:
                self.backbone = load_backbone(source, self.dtype)
            except ModelNotFoundError:
                if not tried:  # the folder was found: its own error says what is wrong with it
                    raise
                raise ModelNotFoundError(
                    f"{checkpoint.run}: the checkpoint's model {checkpoint.binding.model_source!r} was not found "
                    f"(tried {'; '.join(tried + ['the Hugging Face cache'])}); pass --model ID|DIR with the "
                    "backbone it was trained with"
                ) from None
        identity = self.backbone.identity  # hashed on the CPU, rounded to fp16 (device-independent)
        if space is not None:
            problems = identity_differences(space.model.model_dump(), identity.model_dump())
            if problems:
                raise CheckpointError(
                    f"model {source} is not the model the checkpoint's features came from (weights differ):\n  "
                    + "\n  ".join(problems)
                    + "\nPass --model with the model the cache was built with"
                    + (f" ({checkpoint.binding.model_source})" if checkpoint.binding.model_source else "")
                )
        else:
            space = FeatureSpace(model=identity, steps=DEFAULT_STEPS,
                                 save_steps=derive_save_steps(checkpoint.timesteps), layers=tuple(checkpoint.layer_names))
            pre = Preprocessing()
            self._note(f"{checkpoint.path}: imported checkpoint bound to no feature space; the model's identity "
                       f"cannot be checked, assuming {source} is the model it was trained with "
                       f"(SD 1.5 settings, {DEFAULT_STEPS}-step inversion)", log)
        self.feature_space = space
        self.preprocessing = preprocessing or pre
        self.backbone.to(self.device)
        self._check_layers()
        self.extractor = FeatureExtractor(self.backbone, self._narrowed(space), self.preprocessing, self.device, self.dtype)
        positions = {t: i for i, t in enumerate(self.extractor.timesteps)}
        self.positions = [positions[t] for t in checkpoint.timesteps]
        self.network = checkpoint.network.to(self.device).eval()
        if not self.bound:
            self._check_channels()

    def _note(self, message: str, log: Callable[[str], None]) -> None:
        self.notes.append(message)
        log(message)

    def _narrowed(self, space: FeatureSpace) -> FeatureSpace:
        """The spec restricted to the checkpoint's layers and steps (same values, less work)."""
        from dhf_cache.sources.sd.inversion import make_schedule

        schedule = make_schedule(space.scheduler, space.steps)
        by_t = {schedule.timestep_of_step(s): s for s in space.save_steps}
        missing = [t for t in self.checkpoint.timesteps if t not in by_t]
        if missing:
            raise CheckpointError(
                f"{self.checkpoint.path}: timesteps {missing} are not saved steps of its feature space "
                f"(UNet t = {sorted(by_t)}); the checkpoint's config.json is inconsistent"
            )
        keep = tuple(s for s in space.save_steps if schedule.timestep_of_step(s) in self.checkpoint.timesteps)
        return FeatureSpace.model_validate({**space.model_dump(), "save_steps": keep,
                                            "layers": tuple(self.checkpoint.layer_names)})

    def _check_layers(self) -> None:
        modules = dict(self.backbone.unet.named_modules())
        unknown = [n for n in self.checkpoint.layer_names if n not in modules]
        if unknown:
            raise CheckpointError(
                f"layers {unknown} of the checkpoint are not modules of the UNet of {self.backbone.source}; "
                "pass the --model the checkpoint was trained with"
            )

    def _check_channels(self) -> None:
        have = {layer.name: layer.channels for layer in self.extractor.layer_table()}
        bad = [f"{layer.name}: {have[layer.name]} channels in the model, {layer.channels} in the checkpoint"
               for layer in self.checkpoint.network.layers if have.get(layer.name) != layer.channels]
        if bad:
            raise CheckpointError(f"model {self.backbone.source} does not fit the checkpoint: " + "; ".join(bad))

    @property
    def timesteps(self) -> list[int]:
        """UNet t of the extracted steps, clean first."""
        return self.extractor.timesteps

    def features(self, images: Sequence[Image.Image], image_ids: Sequence[str] | None = None) -> list[dict[str, torch.Tensor]]:
        """The checkpoint's selection of each image's maps: {layer: (T, C, H, W) float16}, T in
        the checkpoint's timestep order."""
        images = list(images)
        ids = list(image_ids) if image_ids is not None else [pixel_id(im) for im in images]
        if len(ids) != len(images):
            raise UsageError(f"{len(ids)} image ids for {len(images)} images")
        pre = self.preprocessing
        out = []
        for start in range(0, len(images), self.batch_size):
            batch = images[start:start + self.batch_size]
            pixels = torch.stack([preprocess(to_rgb(im), pre.load_size, pre.image_size, pre.fit) for im in batch])
            for image_id, result in zip(ids[start:start + self.batch_size], self.extractor.extract(pixels, ids[start:start + self.batch_size])):
                if result.error:
                    raise FeatureError(f"image {image_id}: {result.error}")
                out.append({name: torch.from_numpy(result.features[name][self.positions])
                            for name in self.checkpoint.layer_names})
        return out

    def descriptors(self, images: Sequence[Image.Image], image_ids: Sequence[str] | None = None) -> list[torch.Tensor]:
        """(P, S, S) float32 CPU descriptor maps, one per image.

        `image_ids` seed each image's sampled latent (default: a hash of its pixels); pass the
        cache's id of an image to reproduce its cached features exactly.
        """
        return [aggregate(self.network, feats, self.device) for feats in self.features(images, image_ids)]
