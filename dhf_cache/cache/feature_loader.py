"""Reading cached feature maps for training and eval: only the chunks a step needs, ahead of time.

`FeatureReader` reads one image's selected layers and timesteps (one chunk per layer, native
resolution, fp16; upsampling happens later on the device). `Prefetcher` runs the reads for
the next few steps in background threads, so the step rarely waits, and holds at most `depth`
results, so memory stays bounded whatever the cache size.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Generic, TypeVar

import numpy as np
import torch

from dhf_cache.cache.feature_cache import FeatureCache
from dhf_cache.errors import UsageError
from dhf_cache.cache.layers import LayerInfo

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class FeatureSelection:
    """Which cached layers (by name) and time positions (indices into the cache's T axis)."""

    layers: tuple[LayerInfo, ...]
    positions: tuple[int, ...]
    timesteps: tuple[int, ...]  # UNet t of each position, for configs and plots

    @property
    def layer_names(self) -> list[str]:
        return [layer.name for layer in self.layers]


def select_features(cache: FeatureCache, layers: Sequence[str] | None = None,
                    timesteps: Sequence[int] | None = None) -> FeatureSelection:
    """A subset of what the cache holds (all by default); refuses names or steps it lacks."""
    by_name = {layer.name: layer for layer in cache.layers}
    prefix = f"{cache.name}:"  # SOURCE:LAYER names this cache's layer as well
    chosen = [n[len(prefix):] if n.startswith(prefix) else n for n in layers] if layers else list(by_name)
    unknown = [name for name in chosen if name not in by_name]
    if unknown:
        raise UsageError(f"--layers {', '.join(unknown)}: not in the cache; it holds {', '.join(by_name)}")
    steps = list(timesteps) if timesteps is not None and len(timesteps) else list(cache.timesteps)
    missing = [t for t in steps if t not in cache.timesteps]
    if missing:
        raise UsageError(
            f"--timesteps {', '.join(map(str, missing))}: not in the cache; it holds UNet t = "
            f"{', '.join(map(str, cache.timesteps))}"
        )
    if len(set(chosen)) != len(chosen) or len(set(steps)) != len(steps):
        raise UsageError("--layers/--timesteps name an entry twice")
    return FeatureSelection(
        layers=tuple(by_name[name] for name in chosen),
        positions=tuple(cache.timesteps.index(t) for t in steps),
        timesteps=tuple(steps),
    )


class FeatureReader:
    """One image's selected maps as CPU tensors {layer: (T', C, H, W) float16}.

    A missing or damaged chunk raises CacheError naming the image and layer (FeatureCache.
    read_features); `check_finite` also refuses NaN or inf in the maps read (eval turns it on:
    a NaN map would score silently as a wrong match; its cost, a pass over every value read, is
    paid once per image there, but would be paid every step in training; docs/benchmarks.md)."""

    def __init__(self, cache: FeatureCache, selection: FeatureSelection, check_finite: bool = False):
        self.cache = cache
        self.selection = selection
        self.check_finite = check_finite
        self._all_positions = list(selection.positions) == list(range(len(cache.timesteps)))

    def read(self, index: int) -> dict[str, torch.Tensor]:
        # one chunk per layer (every step of one image), all layers fetched concurrently
        positions = None if self._all_positions else self.selection.positions
        chunks = self.cache.read_features(index, [layer.name for layer in self.selection.layers], positions,
                                          check_finite=self.check_finite)
        return {name: torch.from_numpy(chunk) for name, chunk in chunks.items()}


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 2


def default_loader_workers() -> int:
    """Reader threads for training and eval: half the usable cores, 2 to 8. zstd decoding
    releases the GIL and scales with threads, and at SD 1.5 size one core's decoding of an image
    takes longer than a GPU training step, so fewer than two threads would bound the step
    (figures: docs/benchmarks.md)."""
    return max(2, min(8, usable_cores() // 2))


class Prefetcher(Generic[T, R]):
    """Yields fn(item) for each item in order, computing up to `depth` ahead in threads.

    `workers` defaults to `default_loader_workers()` and `depth` to workers + 2, so every worker
    stays busy. `wait_seconds` is the time the consumer spent blocked on results: the loader's
    share of a training step is wait_seconds / total time.
    """

    def __init__(self, fn: Callable[[T], R], items: Iterable[T], depth: int | None = None,
                 workers: int | None = None):
        workers = default_loader_workers() if workers is None else workers
        depth = workers + 2 if depth is None else depth
        if depth < 1 or workers < 1:
            raise UsageError("prefetch depth and workers must be at least 1")
        self.fn = fn
        self.items = items
        self.depth = depth
        self.workers = workers
        self.wait_seconds = 0.0

    def __iter__(self) -> Iterator[R]:
        items = iter(self.items)
        with ThreadPoolExecutor(self.workers, thread_name_prefix="dhf-cache-prefetch") as pool:
            pending = deque(pool.submit(self.fn, item) for _, item in zip(range(self.depth), items))
            try:
                while pending:
                    future = pending.popleft()
                    start = time.perf_counter()
                    result = future.result()
                    self.wait_seconds += time.perf_counter() - start
                    for item in items:
                        pending.append(pool.submit(self.fn, item))
                        break
                    yield result
            finally:
                for future in pending:
                    future.cancel()


# ------------------------------------------------------------------------------ several sources


@dataclass(frozen=True)
class SourcesSelection:
    """The maps one aggregator reads from several sources of a cache: a FeatureSelection per
    source, in the network's source order (the first source's positions index the images)."""

    selections: dict[str, FeatureSelection]

    def source_maps(self) -> list:
        from dhf_cache.aggregator.network import SourceMaps

        return [SourceMaps(name, sel.layers, len(sel.positions)) for name, sel in self.selections.items()]

    @property
    def n_maps(self) -> int:
        return sum(len(sel.layers) * len(sel.positions) for sel in self.selections.values())


def select_across_sources(caches: dict[str, FeatureCache], sources: Sequence[str],
                          layers: Sequence[str] | None = None,
                          timesteps: Sequence[int] | None = None) -> SourcesSelection:
    """Maps of `sources` (in that order). `layers` entries are `SOURCE:LAYER`, or a bare layer name
    held by exactly one of them; a source none of the entries names contributes all its layers.
    `timesteps` applies to sources with a time axis (T > 1); a source without one has T = 1."""
    unknown = [s for s in sources if s not in caches]
    if unknown:
        raise UsageError(f"--source {', '.join(unknown)}: not in the cache; it holds {', '.join(caches)}")
    if len(set(sources)) != len(sources):
        raise UsageError(f"--source names a source twice: {', '.join(sources)}")
    chosen: dict[str, list[str]] = {s: [] for s in sources}
    for entry in layers or ():
        source, sep, name = entry.partition(":")
        if sep:
            if source not in chosen:
                raise UsageError(f"--layers {entry}: source {source} is not among --source {', '.join(sources)}")
        else:
            name = entry
            holders = [s for s in sources if name in {l.name for l in caches[s].layers}]
            if len(holders) != 1:
                listing = "; ".join(f"{s}: {', '.join(l.name for l in caches[s].layers)}" for s in sources)
                raise UsageError(f"--layers {entry}: {'held by ' + ' and '.join(holders) + ', write SOURCE:LAYER' if holders else 'in none of the sources'} ({listing})")
            source = holders[0]
        chosen[source].append(name)
    selections = {}
    for source in sources:
        cache = caches[source]
        steps = timesteps if len(cache.timesteps) > 1 else None
        try:
            selections[source] = select_features(cache, chosen[source] or None, steps)
        except UsageError as exc:
            raise UsageError(f"source {source}: {exc}") from None
    return SourcesSelection(selections)


def done_in_all(caches: Sequence[FeatureCache]) -> np.ndarray:
    """Per index of the first cache's images: done there and in every other source (found by id)."""
    primary = caches[0]
    done = primary.done_mask().copy()
    for cache in caches[1:]:
        index, flags = cache.index_of(), cache.done_mask()
        done &= np.array([i in index and bool(flags[index[i]]) for i in primary.image_ids], dtype=bool)
    return done


def shared_fit(caches: Mapping[str, FeatureCache], what: str) -> str:
    """The Preprocessing.fit of sources read together. A keypoint must land on the same place of
    every source's maps, so their fits must agree (their load sizes may differ: a stretched or
    padded placement is proportional to its square); `what` names them in the UsageError."""
    fits = {name: cache.spec.preprocessing.fit for name, cache in caches.items()}
    if len(set(fits.values())) > 1:
        raise UsageError(f"{what}: the sources' images were made square differently ("
                         + ", ".join(f"{n}: fit {f}" for n, f in fits.items())
                         + "); read together only sources built with the same --fit")
    return next(iter(fits.values()))


class SourcesReader:
    """One image's selected maps of several sources, keyed `map_key(source, layer)`; images are
    addressed by their index in the first source and found in the others by id."""

    def __init__(self, caches: dict[str, FeatureCache], selection: SourcesSelection, check_finite: bool = False):
        from dhf_cache.aggregator.network import map_key

        self.caches = {name: caches[name] for name in selection.selections}
        self.primary = next(iter(self.caches.values()))
        self.readers = {name: FeatureReader(self.caches[name], sel, check_finite)
                        for name, sel in selection.selections.items()}
        self._key = map_key
        ids = self.primary.image_ids
        self._positions = {}
        for name, cache in self.caches.items():  # primary index -> this source's index (-1: absent)
            index = cache.index_of()
            self._positions[name] = np.array([index.get(i, -1) for i in ids], dtype=np.int64)

    def done_mask(self) -> np.ndarray:
        """Per primary index: done in every source (an image missing from a source is not done)."""
        return done_in_all(list(self.caches.values()))

    def read(self, index: int) -> dict[str, torch.Tensor]:
        maps = {}
        for name, reader in self.readers.items():
            position = int(self._positions[name][index])
            for layer, tensor in reader.read(position).items():
                maps[self._key(name, layer)] = tensor
        return maps
