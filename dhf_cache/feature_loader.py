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
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Generic, TypeVar

import torch

from dhf_cache.cache import FeatureCache
from dhf_cache.errors import UsageError
from dhf_cache.layers import LayerInfo

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
    chosen = list(layers) if layers else list(by_name)
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
    a NaN map would score silently as a wrong match; its cost, ~0.2 s per SD 1.5 image on one
    core, is paid once per image there, but would be paid every step in training)."""

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
    releases the GIL and scales with threads (measured: 2 threads 2.25x one), and at SD 1.5 size
    one core decodes ~0.28 s per image (157 MB), so on a GPU two threads would bound a training
    step at ~0.3 s while the step itself takes less."""
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
