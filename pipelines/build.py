"""Stage one: invert every image once and store its feature maps in the cache.

The loop is plain: load a batch of images, run the shared inversion, hand the results to a
writer thread (so compression and disk writes overlap the next batch's UNet calls), and let the
writer set each image's `done` flag after all its arrays are written. Bad images become failure
records; the build goes on and reports them at the end.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from dhf_cache.sources.sd.backbone import load_backbone

from dhf_cache.sources.acceleration import check_levers, pad_batch
from dhf_cache.sources.loading import DTYPES
from dhf_cache.cache.feature_cache import FeatureCache
from dhf_cache.sources.sd.capture import resolve_layers
from dhf_cache.config import (DEFAULT_STEPS, FAMILY_DEFAULT_LAYERS, check_vae_size, BuildOptions, BuildSpec, ComputeSpec, FeatureSpace, GenerationSpec,
                              Preprocessing, SchedulerSpec, StorageSpec)
from dhf_cache.datasets import Dataset, ImageRecord
from dhf_cache.device import resolve_device
from dhf_cache.cache.disk_space import check_free_space
from dhf_cache.errors import DhfCacheError, ImageError, StorageError, UsageError, invalid_values
from dhf_cache.sources.sd.extract import ExtractedImage, FeatureExtractor
from dhf_cache.datasets.images import load_image
from dhf_cache.progress import progress_bar


@dataclass(frozen=True)
class BuildRequest:
    """What to build: the parts of the spec a user chooses (the model fills in the rest)."""

    dataset: Dataset | None  # None when generating from prompts
    cache_url: str
    model: str
    split: str | None = None
    prompts: tuple[str, ...] | None = None  # generation mode: one line of the prompts file each
    images_per_prompt: int = 1
    generation: GenerationSpec | None = None
    steps: int = DEFAULT_STEPS
    save_steps: tuple[int, ...] | None = None
    layers: str | tuple[str, ...] | None = None  # None: the family's default (config.FAMILY_DEFAULT_LAYERS)
    preprocessing: Preprocessing = Preprocessing()
    dtype: str = "auto"
    storage: StorageSpec = StorageSpec()
    storage_options: dict = field(default_factory=dict)
    family: str = "auto"  # the model's family: sd, dinov2 (auto: from the model's files or name)
    source: str | None = None  # the source's name in the cache (default: the family)


@dataclass
class BuildResult:
    url: str
    n_images: int
    n_skipped: int  # already done before this run
    n_built: int
    failures: list[tuple[str, str]]
    seconds: float
    interrupted: bool = False

    @property
    def ok(self) -> bool:
        return not self.failures and not self.interrupted


def check_steps(request: BuildRequest) -> tuple[int, ...]:
    """The saved steps of `request`, its --steps / --save-steps checked before any model loads
    (the same rules FeatureSpace applies once the model is known)."""
    from dhf_cache.config import default_save_steps, validate_save_steps

    if request.steps < 1:
        raise UsageError(f"--steps {request.steps}: needs at least 1 inversion step")
    save_steps = request.save_steps if request.save_steps is not None else default_save_steps(request.steps)
    try:
        validate_save_steps(request.steps, tuple(save_steps))
    except ValueError as exc:
        raise UsageError(f"--steps {request.steps} / --save-steps {list(save_steps)}: {exc}") from None
    return tuple(save_steps)


def make_spec(request: BuildRequest, extractor_layers: tuple[str, ...], identity, compute_dtype: str,
              prediction_type: str = "epsilon", kind: str | None = None) -> BuildSpec:
    save_steps = check_steps(request)
    source = "generation" if request.prompts is not None else "inversion"
    scheduler = SchedulerSpec(prediction_type=None if prediction_type == "epsilon" else prediction_type)
    try:
        space = FeatureSpace(kind=kind, model=identity, scheduler=scheduler, steps=request.steps, save_steps=save_steps,
                             layers=extractor_layers, source=source,
                             generation=request.generation if source == "generation" else None)
    except ValueError as exc:
        raise UsageError(f"--steps {request.steps} / --save-steps {list(save_steps)}: {invalid_values(exc)}") from None
    return BuildSpec(
        feature_space=space,
        preprocessing=request.preprocessing,
        compute=ComputeSpec(dtype=compute_dtype),
        storage=request.storage,
    )


def run_build(
    request: BuildRequest,
    options: BuildOptions = BuildOptions(),
    log: Callable[[str], None] = print,
) -> BuildResult:
    start = time.perf_counter()
    check_steps(request)  # a typo in --steps must not wait for the model to load
    if options.threads:
        torch.set_num_threads(options.threads)
    check_levers(resolve_device(options.device), options.attention, options.compile)  # before the model loads
    records = request_records(request)
    if options.limit:
        records = records[: options.limit]
    extractor, cache = open_build(request, [r.id for r in records], options.device, log)
    if options.prepare_only:
        log(f"cache {cache.url} ready for {len(records)} images; nothing built (--prepare-only)")
        return BuildResult(cache.url, len(records), 0, 0, [], time.perf_counter() - start)
    accelerate_extractor(extractor, options, log)
    if options.shard is not None:
        shard, n_shards = options.shard
        records = shard_records(records, cache.index_of(), options.batch_size, shard, n_shards)
        log(f"shard {shard}/{n_shards}: {len(records)} images")
    plan = plan_build(cache, records)
    check_free_space(cache, len(plan.todo), log)
    result = build_images(extractor, cache, records, options, log, plan=plan)
    result.seconds = time.perf_counter() - start
    return result


def request_records(request: BuildRequest) -> list[ImageRecord]:
    """The images to build: a data set's, or one per (prompt, variant) in generation mode.

    A generated image's id is `<prompt line>-<variant>.png` (what `export-images` writes), and
    its seed derives from (seed, prompt text, variant), so it does not depend on line order."""
    if request.prompts is None:
        return request.dataset.images(request.split)
    return [
        ImageRecord(f"{p:05d}-{k:02d}.png", None, prompt=prompt, seed_key=f"{prompt}\x00{k}")
        for p, prompt in enumerate(request.prompts) for k in range(request.images_per_prompt)
    ]


def load_extractor(request: BuildRequest, device_name: str, log: Callable[[str], None]) -> tuple[FeatureExtractor, BuildSpec]:
    """Load the backbone, resolve layers and steps into a full spec, and ready the extractor."""
    device = resolve_device(device_name)
    dtype_name = request.dtype if request.dtype != "auto" else ("float16" if device.type == "cuda" else "float32")
    family = model_family(request.model, request.family)
    if family != "dinov2":  # before the model loads: one line, nothing written
        size = request.preprocessing.image_size
        check_vae_size(size, lambda why: UsageError(f"--image-size {size}: {why}"))
    log(f"loading {family} model {request.model} on {device} ({dtype_name})")
    if family == "dinov2":
        return _load_dinov2_extractor(request, device, dtype_name)
    if family == "sdxl":
        return _load_sdxl_extractor(request, device, dtype_name)
    backbone = load_backbone(request.model, DTYPES[dtype_name])
    identity = backbone.identity  # hashed on the CPU, rounded to fp16 (see ModelIdentity)
    backbone.to(device)
    layers = resolve_layers(backbone.unet, request.layers or FAMILY_DEFAULT_LAYERS["sd"])
    spec = make_spec(request, layers, identity, dtype_name, backbone.prediction_type)
    extractor = FeatureExtractor(backbone, spec.feature_space, spec.preprocessing, device, DTYPES[dtype_name])
    return extractor, spec


def _load_dinov2_extractor(request: BuildRequest, device: torch.device, dtype_name: str):
    from dhf_cache.sources.dinov2 import Dinov2Extractor, feature_space, load_dinov2, resolve_dinov2_layers

    if request.prompts is not None:
        raise UsageError("--generate needs a diffusion model; DINOv2 reads images (--dataset)")
    backbone = load_dinov2(request.model, DTYPES[dtype_name])
    backbone.identity()  # hashed on the CPU (rounded to fp16) before the move; kept for the spec
    backbone.to(device)
    layers = resolve_dinov2_layers(backbone, request.layers or FAMILY_DEFAULT_LAYERS["dinov2"])
    space = feature_space(backbone, layers, request.preprocessing.image_size)
    spec = BuildSpec(feature_space=space, preprocessing=request.preprocessing, compute=ComputeSpec(dtype=dtype_name),
                     storage=request.storage)
    return Dinov2Extractor(backbone, space, request.preprocessing, device), spec


def _load_sdxl_extractor(request: BuildRequest, device: torch.device, dtype_name: str):
    from dhf_cache.sources.sdxl import load_sdxl, model_identity, sdxl_extractor_class

    if request.prompts is not None:
        raise UsageError("--generate supports SD 1.x/2.x models; SDXL features are built from images (--dataset)")
    backbone = load_sdxl(request.model, DTYPES[dtype_name])
    identity = model_identity(backbone)  # hashed on the CPU, rounded to fp16
    backbone.to(device)
    layers = resolve_layers(backbone.unet, request.layers or FAMILY_DEFAULT_LAYERS["sdxl"])
    spec = make_spec(request, layers, identity, dtype_name, backbone.prediction_type, kind="sdxl")
    return sdxl_extractor_class()(backbone, spec.feature_space, spec.preprocessing, device, DTYPES[dtype_name]), spec


def extractor_for_spec(model: str, spec: BuildSpec, device: torch.device, who: str = ""):
    """The extractor of an existing source's spec in another process (a dask worker), for any
    family: the model loaded, refused when its weights are not the spec's, and the extractor
    made from the cache's own spec (generation settings and all)."""
    from dhf_cache.config import source_kind
    from dhf_cache.errors import SpecMismatchError

    family, dtype = source_kind(spec), DTYPES[spec.compute.dtype]
    if family == "dinov2":
        from dhf_cache.sources.dinov2 import Dinov2Extractor, load_dinov2

        backbone = load_dinov2(model, dtype)
        identity = backbone.identity()
    elif family == "sdxl":
        from dhf_cache.sources.sdxl import load_sdxl, model_identity

        backbone = load_sdxl(model, dtype)
        identity = model_identity(backbone)
    else:
        backbone = load_backbone(model, dtype)
        identity = backbone.identity
    if identity != spec.feature_space.model:  # hashed on the CPU, before the move
        raise SpecMismatchError(f"{who}--model {model} loads weights that differ from the cache's model; "
                                "give every worker the same model", ["feature_space.model"])
    backbone.to(device)
    if family == "dinov2":
        return Dinov2Extractor(backbone, spec.feature_space, spec.preprocessing, device)
    if family == "sdxl":
        from dhf_cache.sources.sdxl import sdxl_extractor_class

        return sdxl_extractor_class()(backbone, spec.feature_space, spec.preprocessing, device, dtype)
    return FeatureExtractor(backbone, spec.feature_space, spec.preprocessing, device, dtype)


FAMILIES = ("sd", "sdxl", "dinov2")


def model_family(model: str, family: str = "auto") -> str:
    """The family of `model` (a folder or hub id): `family` if given, else read from the
    folder's (or the local HF cache's) config files, else guessed from the hub id's name."""
    import json
    from pathlib import Path

    if family != "auto":
        if family not in FAMILIES:
            raise UsageError(f"--family {family!r}: use auto, {', '.join(FAMILIES)}")
        return family
    folder = Path(model)
    if not folder.is_dir():
        from dhf_cache.sources.loading import local_snapshot

        folder = local_snapshot(model) or folder

    def field(file: str, key: str) -> str | None:  # None: no such file; "" when unreadable
        path = folder / file
        if not path.is_file():
            return None
        try:
            return str(json.loads(path.read_text()).get(key, ""))
        except (OSError, ValueError, AttributeError):
            return ""

    pipeline = field("model_index.json", "_class_name")
    if pipeline is not None:
        return "sdxl" if "XL" in pipeline else "sd"
    if (field("config.json", "model_type") or "").startswith("dinov2"):
        return "dinov2"
    name = model.lower()
    return "dinov2" if "dinov2" in name else "sdxl" if "xl" in name.split("/")[-1] else "sd"


def open_build(request: BuildRequest, image_ids: list[str], device_name: str,
               log: Callable[[str], None]) -> tuple[FeatureExtractor, FeatureCache]:
    """The coordinator's part: the extractor, and the cache created or checked for its spec."""
    extractor, spec = load_extractor(request, device_name, log)
    generating = getattr(spec.feature_space, "source", None) == "generation"
    timesteps = extractor.generator.timesteps if generating else extractor.timesteps
    cache = FeatureCache.prepare(
        request.cache_url,
        spec,
        extractor.layer_table(),
        timesteps,
        image_ids,
        latent_shape=extractor.latent_shape,
        provenance={"model_source": request.model,
                    "dataset": request.dataset.spec if request.dataset else f"{len(request.prompts)} prompts"},
        storage_options=request.storage_options,
        source=request.source,
    )
    return extractor, cache


@dataclass(frozen=True)
class BuildPlan:
    """What a build must do: cache positions of the ids, ids not done, indices with a failure record."""

    index: dict[str, int]
    todo: frozenset[str]
    failed_before: frozenset[int]


def plan_build(cache: FeatureCache, records: list[ImageRecord]) -> BuildPlan:
    index = cache.index_of()
    done = cache.done_mask()
    todo = frozenset(r.id for r in records if not done[index[r.id]])
    errors = cache.errors()
    return BuildPlan(index, todo, frozenset(index[i] for i in todo if errors[index[i]]))


def shard_records(records: list[ImageRecord], index: dict[str, int], batch_size: int,
                  shard: int, n_shards: int) -> list[ImageRecord]:
    """Shard `shard` of `n_shards` (0-based): every n-th fixed batch group, so shards never split a
    group and each image is computed with the same neighbours as in a serial build."""
    groups = batch_groups(records, index, batch_size)
    return [r for g, group in enumerate(groups) if g % n_shards == shard for r in group]


def accelerate_extractor(extractor, options: BuildOptions, log: Callable[[str], None] = print) -> None:
    """Apply the run's speed levers (sources/acceleration.py) to the extractor's network."""
    names = ("channels_last", "attention", "compile")
    levers = {name: getattr(options, name) for name in names}
    if levers != {name: getattr(BuildOptions(), name) for name in names}:
        extractor.accelerate(**levers)
        log("speed levers: " + ", ".join(f"{k}={v}" for k, v in levers.items())
            + ("; the first batch compiles the network (minutes)" if options.compile != "off" else ""))


def build_images(
    extractor: FeatureExtractor,
    cache: FeatureCache,
    records: list[ImageRecord],
    options: BuildOptions,
    log: Callable[[str], None] = print,
    plan: BuildPlan | None = None,
) -> BuildResult:
    """Compute and store every record not done yet; failures are recorded, not raised.

    `plan` (from `plan_build`, e.g. made once by a coordinator for many workers) saves reading
    the cache's done flags and failure records again."""
    start = time.perf_counter()
    plan = plan or plan_build(cache, records)
    index, todo = plan.index, plan.todo
    groups = batch_groups(records, index, options.batch_size)
    n_skipped = len(records) - len(todo)
    log(
        f"cache {cache.url}: {len(records)} images requested, {n_skipped} already done, "
        f"{len(todo)} to build ({len(cache.layers)} layers x {len(cache.timesteps)} steps)"
    )
    failures: list[tuple[str, str]] = []
    writer = _Writer(cache, failures, progress_bar(len(todo), "build", unit="img", enabled=options.progress),
                     depth=writer_depth(options.batch_size, cache.raw_bytes_per_image), failed_before=plan.failed_before)
    interrupted = False
    try:
        for group in groups:
            if not any(r.id in todo for r in group):
                continue
            if group[0].prompt is not None:  # generation mode: images come out of the model
                results = extractor.generator.generate([r.prompt for r in group], [r.seed_key for r in group])
                for record, result in zip(group, results):
                    if record.id in todo:
                        size = (result.image.shape[1], result.image.shape[0])
                        writer.put(index[record.id], result, size, result.error, record.id)
                continue
            loaded = []
            for record in group:
                try:
                    if record.error:
                        raise ImageError(f"{record.id}: {record.error}")
                    loaded.append((record, load_image(record.path, options.max_pixels)))
                except ImageError as exc:
                    if record.id in todo:
                        writer.put(index[record.id], None, None, str(exc), record.id)
            if not loaded:
                continue
            pixels = torch.stack([extractor.preprocess(im) for _, im in loaded])
            ids = [r.id for r, _ in loaded]
            if options.compile != "off":  # a compiled network keeps one batch shape (zip drops the padding)
                pixels, ids = pad_batch(pixels, ids, options.batch_size)
            results = extractor.extract(pixels, ids)
            for (record, image), result in zip(loaded, results):
                if record.id in todo:
                    writer.put(index[record.id], result, image.size, result.error, record.id)
    except KeyboardInterrupt:
        interrupted = True
        log("interrupted: finishing the writes already computed; rerun the same command to continue")
    finally:
        writer.close()
    return BuildResult(cache.url, len(records), n_skipped, writer.n_written, failures,
                       time.perf_counter() - start, interrupted)


def writer_depth(batch_size: int, bytes_per_image: int, memory_bytes: int | None = None) -> int:
    """Images the writer may hold queued: two batches, so the model never waits on a write while
    the writer keeps up, but no more than a quarter of the machine's memory (two SD 1.5 batches
    of 32 are ~10 GB of maps beside the batch in flight) and never less than one batch."""
    if memory_bytes is None:
        try:
            memory_bytes = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (AttributeError, OSError, ValueError):  # no sysconf (Windows): two batches
            return 2 * batch_size
    fits = (memory_bytes // 4) // max(1, bytes_per_image)
    return max(batch_size, min(2 * batch_size, fits))


def batch_groups(records: list[ImageRecord], index: dict[str, int], size: int) -> list[list[ImageRecord]]:
    """Fixed batches by cache position (index // size), so every run batches an image with the
    same neighbours: batched convolutions round differently for different batch compositions,
    and a resumed build must store exactly what an uninterrupted one stores. A batch with some
    images already done is recomputed whole; only its missing images are written."""
    groups: dict[int, list[ImageRecord]] = {}
    for record in sorted(records, key=lambda r: index[r.id]):
        groups.setdefault(index[record.id] // size, []).append(record)
    return list(groups.values())


class _Writer:
    """A thread that writes finished images (or failure records) while the next batch computes."""

    def __init__(self, cache: FeatureCache, failures: list, bar, depth: int = 4, failed_before: set[int] = frozenset()):
        self.cache = cache
        self.failures = failures
        self.bar = bar
        self.failed_before = failed_before  # only these need their old failure record cleared
        self.n_written = 0
        self.error: BaseException | None = None
        self._queue: queue.Queue = queue.Queue(maxsize=max(4, depth))  # a whole batch fits: no stall
        self._thread = threading.Thread(target=self._run, name="dhf-cache-writer", daemon=True)
        self._thread.start()

    def put(self, index: int, result: ExtractedImage | None, size, error: str | None, image_id: str) -> None:
        if self.error is not None:
            raise self._storage_error()
        self._queue.put((index, result, size, error, image_id))

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            if self.error is not None:
                continue  # drain after a failure; nothing more is written
            index, result, size, error, image_id = item
            try:
                if error:
                    self.cache.record_failure(index, error)
                    self.failures.append((image_id, error))
                else:
                    self.cache.write_image(index, result, size, clear_failure=index in self.failed_before)
                    self.n_written += 1
                self.bar.update(1)
                self.bar.set_postfix(failed=len(self.failures), refresh=False)
            except BaseException as exc:  # noqa: BLE001 - reported by the main thread
                self.error = exc

    def _storage_error(self) -> DhfCacheError:
        exc = self.error
        if isinstance(exc, DhfCacheError):
            return exc
        return StorageError(
            f"writing to {self.cache.url} failed: {type(exc).__name__}: {exc}. Images written so far "
            "are kept; fix the storage and rerun the same command to continue."
        )

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()
        self.bar.close()
        if self.error is not None:
            raise self._storage_error()
