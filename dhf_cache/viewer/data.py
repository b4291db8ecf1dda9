"""ViewerData: what `dhf-cache view` was given, opened once and read-only, and every answer its
pages ask for (the server only routes requests here and encodes the answers).

Served is only what was given: an image is looked up by its id among the cache's images and the
data sets' records (whose paths `safe_join` made from annotations), an evaluation, pair,
checkpoint or map by its index or key; no text of a request ever becomes a path. Nothing is
written: the cache is opened read-only (its store refuses writes), run and evaluation folders
are only read, computed descriptors stay in memory (`Memo`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dhf_cache import __version__
from dhf_cache.config import EVAL_LOAD_SIZE, MIN_LOAD_SIZE
from dhf_cache.correspondence.matching import PreparedTarget, prepare_target
from dhf_cache.datasets import Dataset, open_dataset
from dhf_cache.device import resolve_device
from dhf_cache.datasets.images import load_image
from dhf_cache.errors import DhfCacheError, UsageError, first_line
from dhf_cache.viewer.clicks import Click, click_similarity
from dhf_cache.viewer.descriptors import CachedImages, CheckpointDescriptors, UnknownItem, parse_raw_key, raw_key_of
from dhf_cache.viewer.evals import EvalPair, Evaluation, open_evaluation
from dhf_cache.viewer.memo import Memo
from dhf_cache.viewer.pictures import data_url, heatmap_png, pca_rgb, photo_jpeg, png_bytes
from dhf_cache.viewer.uploads import MAX_UPLOAD_BYTES, Uploads

# Clicks answer with a load x load similarity map; eval allows up to MAX_LOAD_SIZE (2048), but a
# 2048^2 heatmap is 16 MB of floats per click and seconds of encoding: the page stops at 1024.
VIEW_MAX_LOAD = 1024
GiB = 1 << 30


@dataclass(frozen=True)
class ViewerInputs:
    """What `dhf-cache view` was given."""

    cache: str
    dataset: str | None = None
    checkpoints: tuple[Path, ...] = ()
    evals: tuple[Path, ...] = ()
    storage_options: dict = field(default_factory=dict)
    device: str = "cpu"
    max_upload_bytes: int = MAX_UPLOAD_BYTES


def check_load_size(load_size: int) -> int:
    if not MIN_LOAD_SIZE <= int(load_size) <= VIEW_MAX_LOAD:
        raise UsageError(f"load size {load_size}: expected {MIN_LOAD_SIZE} to {VIEW_MAX_LOAD} pixels (the paper: "
                         f"{EVAL_LOAD_SIZE})")
    return int(load_size)


class ViewerData:
    def __init__(self, inputs: ViewerInputs, log: Callable[[str], None] = print):
        self.inputs = inputs
        self.log = log
        self.device = resolve_device(inputs.device)
        self.images = CachedImages(inputs.cache, inputs.storage_options)
        self.checkpoints = [CheckpointDescriptors(i, Path(p), self.images, self.device, log)
                            for i, p in enumerate(inputs.checkpoints)]
        datasets: dict[str, Dataset] = {}
        self.evals: list[Evaluation] = [open_evaluation(Path(p), inputs.dataset, datasets) for p in inputs.evals]
        _unique_labels(self.evals)
        self.photos = _photo_paths(inputs.dataset, self.evals, datasets)
        self.defaults = [self._default_descriptor(e) for e in self.evals]
        self.uploads = Uploads(self.checkpoints, self.device, log, inputs.max_upload_bytes)
        self._descriptors = Memo(GiB)  # (key, image id) -> (P, h, w) float32
        self._prepared = Memo(GiB // 2)  # (key, image id, load) -> PreparedTarget
        self._chunks = Memo(GiB)  # (source, layer, image id) -> (T, C, H, W) float16 of the cache
        self._photos = Memo(GiB // 8)  # image id -> JPEG bytes

    # ------------------------------------------------------------------ what there is
    def info(self) -> dict[str, Any]:
        return {
            "version": __version__, "cache": self.images.url,
            "sources": [{"name": name, "timesteps": list(cache.timesteps),
                         "layers": [layer.as_dict() for layer in cache.layers]}
                        for name, cache in self.images.sources.items()],
            "checkpoints": [c.describe() for c in self.checkpoints],
            "evals": [{**e.summary(i), "default": self.defaults[i]} for i, e in enumerate(self.evals)],
            "images": len(self.images.image_ids()), "load_size": EVAL_LOAD_SIZE, "min_load": MIN_LOAD_SIZE,
            "max_load": VIEW_MAX_LOAD, "max_upload_bytes": self.uploads.max_bytes,
        }

    def image_list(self) -> list[dict[str, Any]]:
        return [{"id": i, "photo": self.has_photo(i)} for i in self.images.image_ids()]

    def evaluation(self, index: int) -> Evaluation:
        if not 0 <= index < len(self.evals):
            raise UnknownItem(f"evaluation {index}: the viewer was given {len(self.evals)} (--eval DIR)")
        return self.evals[index]

    def pair(self, eval_index: int, pair_index: int) -> EvalPair:
        evaluation = self.evaluation(eval_index)
        if not 0 <= pair_index < len(evaluation.pairs):
            raise UnknownItem(f"pair {pair_index} of evaluation {evaluation.label}: it has {len(evaluation.pairs)}")
        return evaluation.pairs[pair_index]

    def pair_rows(self, eval_index: int) -> list[dict[str, Any]]:
        return [p.row(k) for k, p in enumerate(self.evaluation(eval_index).pairs)]

    def pair_detail(self, eval_index: int, pair_index: int) -> dict[str, Any]:
        detail = self.pair(eval_index, pair_index).detail(pair_index)
        detail["photos"] = {side: bool(detail[side]) and self.has_photo(detail[side]) for side in ("src", "trg")}
        return detail

    def _default_descriptor(self, evaluation: Evaluation) -> str | None:
        """The descriptor the evaluation scored, when the viewer has it: its checkpoint (same
        fingerprint) or its raw map; else the first checkpoint, or None."""
        fingerprint = evaluation.checkpoint_fingerprint
        for entry in self.checkpoints:
            if fingerprint and entry.fingerprint == fingerprint:
                return entry.key
        text = evaluation.descriptor
        if text.startswith("raw ") and not text.startswith("raw fused"):
            key = raw_key_of(text.removeprefix("raw ").removeprefix("best: ").strip(), self.images)
            if key:
                return key
        return self.checkpoints[0].key if self.checkpoints else None

    # ------------------------------------------------------------------ photos
    def has_photo(self, image_id: str) -> bool:
        return image_id in self.photos or (self.images.primary.is_generated and image_id in self.images.indexes[
            self.images.primary.name])

    def photo(self, image_id: str) -> bytes:
        """JPEG of an image the viewer knows (data set record or generation cache), else UnknownItem."""
        if not self.has_photo(image_id):
            raise UnknownItem(f"image {image_id!r}: no photo of it was given (pass --dataset with its files)")
        return self._photos.get(image_id, lambda: photo_jpeg(self._load_photo(image_id)))

    def _load_photo(self, image_id: str):
        from PIL import Image

        if image_id in self.photos:
            return load_image(self.photos[image_id])
        cache = self.images.primary
        pixels, _, _ = cache.generated_image(self.images.index(cache.name, image_id))
        return Image.fromarray(np.asarray(pixels, dtype=np.uint8))

    # ------------------------------------------------------------------ descriptors
    def descriptor(self, key: str, image_id: str) -> torch.Tensor:
        """(P, h, w) float32 map of one image for a descriptor key (module doc of descriptors.py)."""
        return self._descriptors.get((key, image_id), lambda: self._compute(key, image_id))

    def _compute(self, key: str, image_id: str) -> torch.Tensor:
        kind, _, rest = key.partition(":")
        if kind == "ckpt":
            return self.checkpoint(rest)(image_id)
        if kind == "raw":
            choice = parse_raw_key(key, self.images)
            chunk = self._chunks.get((choice.source, choice.layer, image_id),
                                     lambda: self.images.raw_chunk(choice.source, choice.layer, image_id))
            return torch.from_numpy(np.asarray(chunk[choice.position], dtype=np.float32))
        raise UnknownItem(f"descriptor {key!r}: expected ckpt:I (a --checkpoint) or raw:SOURCE:LAYER@T")

    def checkpoint(self, index: str | int) -> CheckpointDescriptors:
        try:
            i = int(index)
        except ValueError:
            i = -1
        if not 0 <= i < len(self.checkpoints):
            raise UnknownItem(f"checkpoint {index!r}: the viewer was given {len(self.checkpoints)} (--checkpoint RUN)")
        return self.checkpoints[i]

    def fit(self, key: str) -> str:
        """How the images behind a descriptor key were made square (Preprocessing.fit of its source)."""
        kind, _, rest = key.partition(":")
        source = self.checkpoint(rest).source if kind == "ckpt" else parse_raw_key(key, self.images).source
        cache = self.images.sources.get(source)
        return cache.spec.preprocessing.fit if cache is not None else "stretch"

    def prepared(self, key: str, image_id: str, load_size: int) -> PreparedTarget:
        return self._prepared.get((key, image_id, load_size),
                                  lambda: prepare_target(self.descriptor(key, image_id), load_size))

    # ------------------------------------------------------------------ answers
    def click(self, eval_index: int, pair_index: int, key: str, point: tuple[float, float],
              load_size: int) -> dict[str, Any]:
        """The similarity map over the pair's target of one source point, with its argmax."""
        load_size = check_load_size(load_size)
        pair = self.pair(eval_index, pair_index)
        record = pair.record
        if record is None:
            raise UnknownItem(f"pair {pair.name}: {pair.problem}")
        started = time.perf_counter()
        click = click_similarity(self.descriptor(key, record.src), self.prepared(key, record.trg, load_size),
                                 point, record.src_size, record.trg_size, self.fit(key))
        return self._answer(click, key, point, load_size, started)

    def upload_click(self, job_id: str, point: tuple[float, float], load_size: int) -> dict[str, Any]:
        load_size = check_load_size(load_size)
        started = time.perf_counter()
        click, job = self.uploads.click(job_id, point, load_size)
        return self._answer(click, f"ckpt:{job.checkpoint}", point, load_size, started)

    @staticmethod
    def _answer(click: Click, key: str, point, load_size: int, started: float) -> dict[str, Any]:
        png, low, high = heatmap_png(click.similarity)
        return {"key": key, "load_size": load_size, "click": [float(point[0]), float(point[1])],
                "load_pixel": list(click.load_pixel), "argmax": list(click.argmax),
                "argmax_load": list(click.argmax_load), "score": click.score,
                "range": [low, high], "heatmap": data_url(png, "image/png"),
                "ms": round(1000 * (time.perf_counter() - started), 1)}

    def pca(self, key: str, image_id: str) -> dict[str, Any]:
        """The first three principal components of one image's map, as an RGB picture."""
        desc = self.descriptor(key, image_id)
        rgb, explained = pca_rgb(desc)
        return {"key": key, "image": image_id, "shape": list(desc.shape), "explained": explained,
                "pca": data_url(png_bytes(rgb), "image/png")}

    def mixing(self, index: str | int) -> dict[str, Any]:
        entry = self.checkpoint(index)
        return {"checkpoint": entry.key, "label": str(entry.path), "tables": entry.mixing()}

    def close(self) -> None:
        self.uploads.close()


def _unique_labels(evals: list[Evaluation]) -> None:
    """Each evaluation's label is its folder's name, or its path where two names agree."""
    names = [e.label for e in evals]
    for evaluation in evals:
        if names.count(evaluation.label) > 1:
            evaluation.label = str(evaluation.path)


def _photo_paths(dataset: str | None, evals: list[Evaluation], datasets: dict[str, Dataset]) -> dict[str, Path]:
    """Image id -> file, from the records of the data sets (paths made by `safe_join`; records
    a data set marks unusable are left out): each evaluation's split, and every split of
    --dataset when no evaluation reads it."""
    wanted: dict[str, set[str | None]] = {}
    for evaluation in evals:
        wanted.setdefault(evaluation.dataset, set()).add(evaluation.split)
    if dataset and dataset not in wanted:
        wanted[dataset] = {None}
    paths: dict[str, Path] = {}
    for spec, splits in wanted.items():
        try:
            if spec not in datasets:
                datasets[spec] = open_dataset(spec)
            for split in splits:
                for record in datasets[spec].images(split):
                    if record.path is not None and not record.error:
                        paths[record.id] = record.path
        except DhfCacheError as exc:
            raise UsageError(f"--dataset {spec}: its images cannot be listed ({first_line(exc)})") from None
    return paths

