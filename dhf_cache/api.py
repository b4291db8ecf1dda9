"""A small Python API over a trained aggregator: descriptors and matches for any image.

    from dhf_cache.api import Hyperfeatures
    hf = Hyperfeatures.from_checkpoint("runs/dhf")
    points_a, points_b = hf.match("a.jpg", "b.jpg", points=[[120, 80]])

Descriptors of images in a cache come from the stored features (`cached_descriptors`, no
diffusion model loaded); any other image is extracted on the fly with the checkpoint's build
spec (`descriptors`, the backbone is loaded on first use). See docs/python-api.md.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Union

import numpy as np
import torch
from PIL import Image

from dhf_cache.cache.feature_cache import FeatureCache
from dhf_cache.aggregator.checkpoint import Checkpoint, check_features_match, checkpoint_selection, load_checkpoint
from dhf_cache.config import EVAL_LOAD_SIZE, Preprocessing
from dhf_cache.correspondence.descriptors import aggregate
from dhf_cache.device import resolve_device
from dhf_cache.errors import CacheError, CheckpointError, UsageError
from dhf_cache.cache.feature_loader import FeatureReader, SourcesReader, SourcesSelection
from dhf_cache.datasets.images import load_image
from dhf_cache.correspondence.matching import match_points, parse_refine, prepare_target

ImageLike = Union[str, Path, Image.Image]


def open_image(image: ImageLike) -> Image.Image:
    """A PIL image as given, or the file loaded upright in RGB (`ImageError` when unreadable)."""
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, (str, Path)):
        return load_image(image)
    raise UsageError(f"image {image!r}: expected a file path or a PIL.Image")


def grid_points(size: tuple[int, int], n: int) -> np.ndarray:
    """n x n [x, y] points at the centres of an n x n grid of cells over a (W, H) image, row by row."""
    if not isinstance(n, (int, np.integer)) or n < 1:
        raise UsageError(f"--grid {n!r}: must be a positive number of points per side, e.g. 5")
    w, h = size
    xs, ys = (np.arange(n) + 0.5) * (w / n), (np.arange(n) + 0.5) * (h / n)
    return np.stack(np.meshgrid(xs, ys), axis=-1).reshape(-1, 2)


def check_points(points, size: tuple[int, int], name: str = "A") -> np.ndarray:
    """(K, 2) float [x, y] inside a (W, H) image: 0 <= x < W, 0 <= y < H; UsageError otherwise."""
    arr = np.asarray(points, dtype=np.float64)
    if arr.size == 0:
        raise UsageError(f"points on image {name}: none given; pass at least one [x, y]")
    if arr.ndim == 1 and arr.shape[0] == 2:
        arr = arr[None]
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise UsageError(f"points on image {name}: expected a list of [x, y] pairs, got shape {arr.shape}")
    w, h = size
    bad = [(x, y) for x, y in arr if not (np.isfinite(x) and np.isfinite(y) and 0 <= x < w and 0 <= y < h)]
    if bad:
        shown = ", ".join(f"({x:g}, {y:g})" for x, y in bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise UsageError(
            f"points {shown} lie outside image {name} ({w} x {h} px): each point needs 0 <= x < {w} "
            f"and 0 <= y < {h}, in image {name}'s own pixels"
        )
    return arr


class Hyperfeatures:
    """Descriptor maps and point matches from one aggregator checkpoint."""

    def __init__(self, checkpoint: Checkpoint, device: str | torch.device = "auto", model: str | None = None,
                 preprocessing: Preprocessing | None = None, log: Callable[[str], None] = lambda _: None):
        self.checkpoint = checkpoint
        self.device = resolve_device(device) if isinstance(device, str) else torch.device(device)
        self.checkpoint.network.to(self.device).eval()
        self.model = model
        self.preprocessing = preprocessing
        self.log = log
        self._extractor = None
        self._caches: dict[str, tuple[FeatureCache, FeatureReader]] = {}

    @classmethod
    def from_checkpoint(cls, run: str | Path, device: str = "auto", model: str | None = None,
                        **kwargs) -> Hyperfeatures:
        """Load RUN (its best/ weights if present, else last/; or a RUN/last folder).

        A malformed config.json, missing, damaged or ill-fitting weights raise CheckpointError
        naming the file (`dhf_cache.aggregator.checkpoint.load_checkpoint`)."""
        dev = resolve_device(device)
        return cls(load_checkpoint(run, dev), dev, model, **kwargs)

    @property
    def extractor(self):
        """The on-the-fly extractor, created (and the backbone loaded and checked) on first use."""
        if self._extractor is None:
            from dhf_cache.sources.onthefly import OnTheFlyExtractor

            self._extractor = OnTheFlyExtractor(self.checkpoint, self.model, self.device,
                                                preprocessing=self.preprocessing, log=self.log)
        return self._extractor

    def descriptors(self, image: ImageLike, image_id: str | None = None) -> torch.Tensor:
        """(P, S, S) float32 CPU descriptor map of any image, extracted on the fly.

        `image_id` seeds the sampled latent (default: a hash of the pixels); a cache's id
        reproduces that cache's features.
        """
        return self.extractor.descriptors([open_image(image)], None if image_id is None else [image_id])[0]

    def _reader(self, cache_url: str, storage_options: dict | None) -> tuple[FeatureCache, FeatureReader]:
        if cache_url not in self._caches:
            bindings = self.checkpoint.bindings  # the sources it reads, in the network's order
            if self.checkpoint.fused:
                everything = FeatureCache.open_all(cache_url, storage_options)
                missing = [name for name in bindings if name not in everything]
                if missing:
                    raise CheckpointError(f"checkpoint {self.checkpoint.path} fuses sources {', '.join(bindings)}; "
                                          f"{cache_url} lacks {', '.join(missing)}")
                caches = {name: everything[name] for name in bindings}
            else:
                name = next(iter(bindings))
                caches = {name: FeatureCache.open(cache_url, storage_options, prefer=name)}
            problems = [f"{name}: {p}" for name, binding in bindings.items()  # caches is keyed like bindings
                        for p in check_features_match(binding, caches[name])]
            if problems:
                raise CheckpointError(
                    f"checkpoint {self.checkpoint.path} cannot read the features of {cache_url}:\n  "
                    + "\n  ".join(problems)
                    + "\nUse a cache built with the checkpoint's model and settings, or descriptors() on the fly"
                )
            if self.checkpoint.fused:
                selections = {name: checkpoint_selection(binding, caches[name])[0] for name, binding in bindings.items()}
                reader = SourcesReader(caches, SourcesSelection(selections))
                self._caches[cache_url] = (reader.primary, reader)
            else:
                cache = caches[name]
                selection, _ = checkpoint_selection(self.checkpoint.binding, cache)
                self._caches[cache_url] = (cache, FeatureReader(cache, selection))
        return self._caches[cache_url]

    def cached_descriptors(self, cache_url: str, image_id: str, storage_options: dict | None = None) -> torch.Tensor:
        """(P, S, S) float32 CPU descriptor map of an image from a cache's stored features."""
        cache, reader = self._reader(cache_url, storage_options)
        index = cache.index_of().get(image_id)
        if index is None:
            near = [i for i in cache.image_ids if Path(i).name == Path(image_id).name][:3]
            hint = f"; did you mean {near}?" if near else "; ids look like <category>/<file name> (see the dataset)"
            raise CacheError(f"image id {image_id!r}: not in {cache_url}{hint}")
        if not cache.done_mask()[index]:
            raise CacheError(f"image {image_id!r}: listed in {cache_url} but not built yet; rerun its `dhf-cache build`")
        return aggregate(self.checkpoint.network, reader.read(index), self.device)

    def match(self, image_a: ImageLike, image_b: ImageLike, points=None, load_size: int = EVAL_LOAD_SIZE, grid: int = 5,
              refine: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Nearest-neighbour matches of points on A in B, as eval matches keypoints.

        `points` are [x, y] in A's pixels (default: the centres of a `grid` x `grid` grid on A).
        Returns (points_a (K, 2), points_b (K, 2)) in each image's own pixels.
        """
        a, b = open_image(image_a), open_image(image_b)
        pts = grid_points(a.size, grid) if points is None else check_points(points, a.size, "A")
        desc_a, desc_b = self.extractor.descriptors([a, b])
        fit = self.extractor.preprocessing.fit  # how the backbone's input was made square
        found = match_points(desc_a, prepare_target(desc_b, load_size), pts, a.size, b.size, load_size,
                             refine=parse_refine(refine), fit=fit)
        return pts, found
