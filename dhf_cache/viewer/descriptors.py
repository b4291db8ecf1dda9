"""The descriptor choices of the viewer and their maps per cached image, read-only.

A choice is named by a key the page sends back:

    ckpt:I                   the I-th --checkpoint: its descriptor map (P, S, S) of the image
    raw:SOURCE:LAYER@T       one cached map of the cache (UNet timestep T; sources without a
                             time axis, such as DINOv2, have T = 0), as `eval --raw` scores it

A checkpoint's maps come from the set `dhf-cache eval` stored in the cache under its fingerprint
when that set is complete and holds the image; otherwise they are computed from the cached
features (`api.Hyperfeatures.cached_descriptors`) and kept in memory. The cache is opened
read-only (its store refuses writes), and an incomplete set is never opened: opening one is
what an eval does to recreate it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dhf_cache.aggregator.checkpoint import Checkpoint, check_features_match, load_checkpoint
from dhf_cache.api import Hyperfeatures
from dhf_cache.cache.descriptor_store import KEY_LENGTH, DescriptorStore, holds_complete_set
from dhf_cache.cache.feature_cache import FeatureCache
from dhf_cache.errors import CacheError, UsageError, first_line


class UnknownItem(UsageError):
    """A request names an image, pair, evaluation, checkpoint or map the viewer was not given."""


class CachedImages:
    """The cache's sources, opened read-only: image ids, done flags, sizes and raw maps."""

    def __init__(self, url: str, storage_options: dict | None = None):
        self.url = url
        self.storage_options = storage_options or {}
        self.sources: dict[str, FeatureCache] = FeatureCache.open_all(url, self.storage_options)  # mode "r"
        if not self.sources:
            raise CacheError(f"{url} holds no feature source yet; build one with `dhf-cache build --cache {url}`")
        self.indexes = {name: cache.index_of() for name, cache in self.sources.items()}
        self.done = {name: cache.done_mask() for name, cache in self.sources.items()}
        first = next(iter(self.sources.values()))
        sizes = first.sizes()
        self.sizes = {image_id: (int(sizes[i][0]), int(sizes[i][1])) for i, image_id in enumerate(first.image_ids)}

    @property
    def primary(self) -> FeatureCache:
        return next(iter(self.sources.values()))

    def image_ids(self) -> list[str]:
        """Images built in every source, in the first source's order."""
        return [i for i in self.primary.image_ids if all(self.is_done(name, i) for name in self.sources)]

    def is_done(self, source: str, image_id: str) -> bool:
        index = self.indexes[source].get(image_id)
        return index is not None and bool(self.done[source][index])

    def index(self, source: str, image_id: str) -> int:
        """The image's index in one source: UnknownItem when the cache lacks it, CacheError when
        it is listed but not built."""
        index = self.indexes[source].get(image_id)
        if index is None:
            raise UnknownItem(f"image {image_id!r}: not in the cache {self.url}")
        if not self.done[source][index]:
            raise CacheError(f"image {image_id!r}: listed in {self.url} (source {source}) but not built yet; "
                             f"rerun its `dhf-cache build --cache {self.url}`")
        return index

    def raw_chunk(self, source: str, layer: str, image_id: str) -> np.ndarray:
        """(T, C, H, W) float16 maps of one layer, read through the cache's checked path: a missing
        or damaged chunk, or a NaN, is one CacheError line naming the image and layer."""
        cache = self.sources[source]
        return cache.read_features(self.index(source, image_id), [layer], check_finite=True)[layer]


@dataclass(frozen=True)
class RawChoice:
    source: str
    layer: str
    timestep: int
    position: int

    @property
    def key(self) -> str:
        return f"raw:{self.source}:{self.layer}@{self.timestep}"


def parse_raw_key(key: str, images: CachedImages) -> RawChoice:
    """`raw:SOURCE:LAYER@T` checked against the cache's sources, layers and timesteps."""
    _, _, rest = key.partition(":")
    source, sep, rest = rest.partition(":")
    layer, at, step = rest.rpartition("@")
    cache = images.sources.get(source)
    if not sep or not at or cache is None or layer not in {l.name for l in cache.layers}:
        raise UnknownItem(f"descriptor {key!r}: no such map; the cache holds " + "; ".join(
            f"{name}: {', '.join(l.name for l in c.layers)} @ {', '.join(map(str, c.timesteps))}"
            for name, c in images.sources.items()))
    try:
        timestep = int(step)
    except ValueError:
        raise UnknownItem(f"descriptor {key!r}: {step!r} is not a timestep of source {source} "
                          f"({', '.join(map(str, cache.timesteps))})") from None
    if timestep not in cache.timesteps:
        raise UnknownItem(f"descriptor {key!r}: timestep {timestep} is not in source {source} "
                          f"({', '.join(map(str, cache.timesteps))})")
    return RawChoice(source, layer, timestep, cache.timesteps.index(timestep))


def raw_key_of(text: str, images: CachedImages) -> str | None:
    """The key of a raw map as `eval --raw` names it (`[SOURCE:]LAYER@T`, or LAYER alone without
    a time axis), or None when no source of the cache holds it."""
    source, sep, rest = text.partition(":")
    names = [source] if sep else list(images.sources)
    rest = rest if sep else text
    layer, at, step = rest.rpartition("@")
    if not at:
        layer, step = rest, None
    for name in names:
        cache = images.sources.get(name)
        if cache is None or layer not in {l.name for l in cache.layers}:
            continue
        if step is None:
            return f"raw:{name}:{layer}@{cache.timesteps[0]}" if len(cache.timesteps) == 1 else None
        return f"raw:{name}:{layer}@{step}" if step.lstrip("-").isdigit() and int(step) in cache.timesteps else None
    return None


class CheckpointDescriptors:
    """One --checkpoint: its descriptor maps of cached images, stored ones first."""

    def __init__(self, index: int, path: Path, images: CachedImages, device: str | torch.device,
                 log: Callable[[str], None]):
        self.index = index
        self.path = path
        self.images = images
        self.checkpoint: Checkpoint = load_checkpoint(path, device)
        self.hf = Hyperfeatures(self.checkpoint, device)
        names = list(self.checkpoint.bindings)
        # the source whose group holds its stored set: the first it reads (as eval), or the only one
        self.source = names[0] if names[0] in images.sources else (next(iter(images.sources)) if len(images.sources) == 1
                                                                   else None)
        self.store = self._stored_set(log)
        self.stored = self.store.done_mask() if self.store is not None else None
        self.problems = self._fit_problems()
        if self.problems:
            log(f"--checkpoint {path} does not read the features of {images.url} ({'; '.join(self.problems)[:300]}): "
                + ("only its stored descriptors can be shown" if self.store is not None else
                   "its descriptors of cached images cannot be computed (uploaded photos still can)"))

    def _fit_problems(self) -> list[str]:
        """Why the cache's features do not fit this checkpoint (empty: they do)."""
        ckpt = self.checkpoint
        problems = []
        for name, binding in ckpt.bindings.items():
            cache = self.images.sources.get(name) or (self.images.sources.get(self.source) if not ckpt.fused else None)
            if cache is None:
                problems.append(f"the cache has no source {name}")
                continue
            problems += [f"{name}: {p}" if ckpt.fused else p for p in check_features_match(binding, cache)]
        return problems

    @property
    def key(self) -> str:
        return f"ckpt:{self.index}"

    @property
    def fingerprint(self) -> str:
        return self.checkpoint.fingerprint

    def _stored_set(self, log: Callable[[str], None]) -> DescriptorStore | None:
        """The complete descriptor set eval stored for this checkpoint, or None. Only a set with
        both arrays is opened (DescriptorStore recreates an incomplete one, a write)."""
        if self.source is None:
            return None
        cache = self.images.sources[self.source]
        key = self.fingerprint[:KEY_LENGTH]
        try:
            if not holds_complete_set(cache, self.fingerprint):
                return None
            net = self.checkpoint.network
            store = DescriptorStore(cache, self.fingerprint, (net.projection_dim, net.output_size, net.output_size), {})
        except (ValueError, KeyError, TypeError, OSError) as exc:
            log(f"--checkpoint {self.path}: its stored descriptor set {key} cannot be read ({first_line(exc)}); "
                "computing descriptors in memory")
            return None
        if not store.persistent:  # shorter than the cache, or another shape: would need a write
            log(f"--checkpoint {self.path}: its stored descriptor set {key} does not fit the cache as it is now "
                f"({store.reason}); computing descriptors in memory")
            return None
        return store

    def stored_count(self) -> int:
        return int(self.stored.sum()) if self.stored is not None else 0

    def __call__(self, image_id: str) -> torch.Tensor:
        """(P, S, S) float32 CPU map: the stored one (its chunk checked) or one computed now."""
        if self.store is not None:
            index = self.images.index(self.source, image_id)
            if index < len(self.stored) and self.stored[index]:
                return self.store.read(index)
        for name in self.checkpoint.bindings:
            if name in self.images.sources:
                self.images.index(name, image_id)  # unknown or unbuilt: the cache's own line
        return self.hf.cached_descriptors(self.images.url, image_id, self.images.storage_options)

    def describe(self) -> dict:
        ckpt = self.checkpoint
        return {"key": self.key, "label": str(self.path), "path": str(ckpt.path), "fused": ckpt.fused,
                "sources": list(ckpt.bindings), "stored": self.stored_count(), "problems": self.problems,
                "shape": [ckpt.network.projection_dim, ckpt.network.output_size, ckpt.network.output_size]}

    def mixing(self) -> list[dict]:
        """Its softmaxed mixing weights, one (T, L) table per source it reads (rows = timesteps,
        clean first), with the raw map key of every cell the cache holds."""
        net, ckpt = self.checkpoint.network, self.checkpoint
        if ckpt.fused:
            tables = list(zip(ckpt.bindings.items(), net.mixing_weights_tables().values()))
        else:
            tables = [(next(iter(ckpt.bindings.items())), net.mixing_weights_table())]
        out = []
        for (name, binding), table in tables:
            source = name if name in self.images.sources else self.source
            held = self.images.sources.get(source) if source else None
            keys = [[f"raw:{source}:{layer}@{t}" if held is not None and t in held.timesteps
                     and layer in {l.name for l in held.layers} else None
                     for layer in binding.layer_names] for t in binding.timesteps]
            out.append({"source": name, "layers": binding.layer_names, "timesteps": list(binding.timesteps),
                        "weights": [[float(v) for v in row] for row in table.detach().cpu().tolist()], "keys": keys})
        return out
