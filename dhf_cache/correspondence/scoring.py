"""Scoring keypoint pairs with descriptor maps: METHOD.md's matching, then PCK.

Shared by training's validation and by `dhf-cache eval`. Pairs are visited grouped by target
image: each target's per-image preparation (norm map at the load size) happens once, and the
source keypoints of all its pairs go through one matmul, then the load-size work (upsample,
x 1/|target|, argmax) runs on cache-sized chunks of keypoints. Targets are spread over two
worker threads. Same arithmetic per keypoint as `matching.match_points` (tests/test_scoring.py;
bench/eval_scaling.py checks it at scale; its figures: docs/benchmarks.md).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F

from dhf_cache.datasets import PairRecord
from dhf_cache.correspondence.descriptors import DescriptorFn
from dhf_cache.correspondence.matching import (EPS, Grid, PreparedTarget, WindowSoftArgmax, as_map, check_fit,
                                                grid_wh, lookup, match_grid, peaks, prepare_target, source_px, to_original)
from dhf_cache.correspondence.pck import PCKAccumulator

# Similarity maps upsampled, scaled and searched together: ~2 MB of float32, so the three passes
# over them stay in the CPU cache (bench/eval_scaling.py: a few keypoints per chunk beat many).
CHUNK_PIXELS = 1 << 19


def keypoints_per_chunk(size: Grid) -> int:
    w, h = grid_wh(size)
    return max(1, CHUNK_PIXELS // (w * h))


def _source_rows(desc, trg: PreparedTarget, px: np.ndarray, grid: Grid) -> torch.Tensor:
    """Unit-norm upsampled source descriptors at integer pixels px (k, 2) of the source's grid -> (k, P)."""
    s_map = as_map(desc).to(trg.device)
    if s_map.shape[0] != trg.desc.shape[0]:
        raise ValueError(f"descriptor channels differ: source {s_map.shape[0]}, target {trg.desc.shape[0]}")
    s = lookup(s_map, grid, torch.as_tensor(px, dtype=torch.long, device=trg.device).reshape(-1, 2))
    return s / s.norm(dim=1, keepdim=True).clamp_min(EPS)


def _match_rows(rows: list[torch.Tensor], trg: PreparedTarget, refine: WindowSoftArgmax | None) -> torch.Tensor:
    """Unit source rows (k_i, P) of each pair -> (sum k_i, 2) target grid positions [x, y]."""
    p, h, w = trg.desc.shape
    flat = trg.desc.reshape(p, h * w)
    # one matmul for every keypoint of the target; (k, 1, h, w) maps as match_points upsamples
    # them (another layout can round differently and flip near-tied argmaxes)
    dots = (torch.cat(rows) @ flat).reshape(-1, 1, h, w)
    s = dots[:, 0]
    out = []
    chunk = keypoints_per_chunk(trg.size)
    for start in range(0, s.shape[0], chunk):
        sim = F.interpolate(dots[start:start + chunk], size=trg.size[::-1], mode="bilinear",
                            align_corners=False)[:, 0]
        sim.mul_(trg.inv_norm)
        out.append(peaks(sim, refine, trg.size)[0])
    return torch.cat(out) if out else s.new_zeros(0, 2)


def scoring_workers() -> tuple[int, int]:
    """(worker threads, torch threads in each) for `score_pairs` on this process's torch threads.

    Two workers with half the threads each: the per-target work mixes torch kernels with Python
    glue that holds the GIL, so one worker leaves cores idle; two 1-thread workers overlap one's
    glue with the other's kernels (docs/benchmarks.md, "Eval cost vs pairs and images").
    """
    threads = torch.get_num_threads()
    workers = 2 if threads >= 2 else 1
    return workers, max(1, threads // workers)


def _grouped_by_target(pairs: Sequence[PairRecord]) -> list[list[int]]:
    order = sorted(range(len(pairs)), key=lambda i: (pairs[i].trg, pairs[i].src))
    groups: list[list[int]] = []
    for i in order:
        if groups and pairs[groups[-1][0]].trg == pairs[i].trg:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def score_pairs(
    pairs: Sequence[PairRecord],
    descriptors: DescriptorFn,
    load_size: int,
    alphas: Sequence[float] = (0.1,),
    refine: WindowSoftArgmax | None = None,
    on_pair: Callable[[], None] | None = None,
    workers: int | None = None,
    match_at: str = "load",
    fit: str = "stretch",
) -> tuple[PCKAccumulator, list[np.ndarray]]:
    """PCK over `pairs` and the predicted target keypoints of each (original pixels, in order).

    Targets are matched by `workers` threads (default `scoring_workers()`); `descriptors` is
    called under one lock, so providers need not be thread-safe and no image is computed twice
    at once. Predictions and PCK do not depend on the number of workers (tests/test_scoring.py).
    `match_at` (matching.MATCH_AT) sets each image's grid: the load square (Ref), its own size or
    the aspect-preserving one of long side `load_size`. `fit` is how the descriptors' images were
    made square (the cache's Preprocessing.fit): keypoints map to the grid through it.
    """
    check_fit(fit, match_at)
    accumulator = PCKAccumulator(alphas)
    predictions: list[np.ndarray] = [np.zeros((0, 2))] * len(pairs)
    auto_workers, threads = scoring_workers()
    workers = auto_workers if workers is None else max(1, int(workers))
    caller_threads = torch.get_num_threads()
    lock = threading.Lock()

    def descriptor(image_id: str):
        with lock:  # one at a time, with the caller's threads (a provider may run a network)
            inside = torch.get_num_threads()
            torch.set_num_threads(caller_threads)
            try:
                return descriptors(image_id)
            finally:
                torch.set_num_threads(inside)

    def match_group(group: list[int]) -> list[tuple[int, np.ndarray]]:
        first = pairs[group[0]]
        trg = prepare_target(descriptor(first.trg), match_grid(match_at, load_size, first.trg_size))
        rows, metas = [], []
        for i in group:
            grid = match_grid(match_at, load_size, pairs[i].src_size)
            valid, px = source_px(pairs[i].src_kps, pairs[i].src_size, grid, fit)
            rows.append(_source_rows(descriptor(pairs[i].src), trg, px, grid))
            metas.append((i, valid, len(px)))
        xy = _match_rows(rows, trg, refine)
        out, offset = [], 0
        for i, valid, k in metas:
            out.append((i, to_original(xy[offset:offset + k], valid, trg.size, pairs[i].trg_size, fit)))
            offset += k
        return out

    def in_worker(group: list[int]) -> list[tuple[int, np.ndarray]]:
        before = torch.get_num_threads()  # thread-local in torch's OpenMP build; restored for later threads
        torch.set_num_threads(threads)
        try:
            return match_group(group)
        finally:
            torch.set_num_threads(before)

    groups = _grouped_by_target(pairs)
    if workers == 1:
        results = map(match_group, groups)
        pool = None
    else:
        pool = ThreadPoolExecutor(workers, thread_name_prefix="dhf-score")
        results = pool.map(in_worker, groups)
    try:
        for group_result in results:  # bookkeeping in this thread, in a fixed order
            for i, prediction in group_result:
                predictions[i] = prediction
                accumulator.add_record(pairs[i], prediction)
                if on_pair is not None:
                    on_pair()
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    return accumulator, predictions
