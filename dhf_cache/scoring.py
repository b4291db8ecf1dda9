"""Scoring keypoint pairs with descriptor maps: METHOD.md's matching, then PCK.

Shared by training's validation and by `dhf-cache eval`. Pairs are visited grouped by target
image: each target's per-image preparation (norm map at the load size) happens once, and the
source keypoints of all its pairs go through one matmul, then the load-size work (upsample,
x 1/|target|, argmax) runs on chunks of keypoints. Same arithmetic per keypoint as
`matching.match_points` (bench/eval_scaling.py measured 100% identical predictions), at about
half the cost for SPair-sized evaluations.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from dhf_cache.datasets import PairRecord
from dhf_cache.descriptors import DescriptorFn
from dhf_cache.matching import (EPS, PreparedTarget, WindowSoftArgmax, _as_map, _axis_weights, _lookup, _peaks,
                                _source_px, _to_original, prepare_target)
from dhf_cache.pck import PCKAccumulator

CHUNK_KEYPOINTS = 64  # keypoints upsampled together: a few MB at load 224, stays in the CPU cache


def _source_rows(desc, trg: PreparedTarget, px: np.ndarray) -> torch.Tensor:
    """Unit-norm upsampled source descriptors at integer load pixels px (k, 2) -> (k, P)."""
    s_map = _as_map(desc).to(trg.device)
    if s_map.shape[0] != trg.desc.shape[0]:
        raise ValueError(f"descriptor channels differ: source {s_map.shape[0]}, target {trg.desc.shape[0]}")
    rows = _axis_weights(s_map.shape[1], trg.load_size, str(s_map.device))
    cols = _axis_weights(s_map.shape[2], trg.load_size, str(s_map.device))
    s = _lookup(s_map, rows, cols, torch.as_tensor(px, dtype=torch.long, device=trg.device).reshape(-1, 2))
    return s / s.norm(dim=1, keepdim=True).clamp_min(EPS)


def _match_rows(rows: list[torch.Tensor], trg: PreparedTarget, refine: WindowSoftArgmax | None) -> torch.Tensor:
    """Unit source rows (k_i, P) of each pair -> (sum k_i, 2) target load-pixel positions [x, y]."""
    load = trg.load_size
    p, h, w = trg.desc.shape
    flat = trg.desc.reshape(p, h * w)
    # one matmul for every keypoint of the target; (k, 1, h, w) maps as match_points upsamples
    # them (another layout can round differently and flip near-tied argmaxes)
    dots = (torch.cat(rows) @ flat).reshape(-1, 1, h, w)
    s = dots[:, 0]
    out = []
    for start in range(0, s.shape[0], CHUNK_KEYPOINTS):
        sim = F.interpolate(dots[start:start + CHUNK_KEYPOINTS], size=(load, load), mode="bilinear",
                            align_corners=False)[:, 0]
        sim.mul_(trg.inv_norm)
        out.append(_peaks(sim, refine, load)[0])
    return torch.cat(out) if out else s.new_zeros(0, 2)


def score_pairs(
    pairs: Sequence[PairRecord],
    descriptors: DescriptorFn,
    load_size: int,
    alphas: Sequence[float] = (0.1,),
    refine: WindowSoftArgmax | None = None,
    on_pair: Callable[[], None] | None = None,
) -> tuple[PCKAccumulator, list[np.ndarray]]:
    """PCK over `pairs` and the predicted target keypoints of each (original pixels, in order)."""
    accumulator = PCKAccumulator(alphas)
    predictions: list[np.ndarray] = [np.zeros((0, 2))] * len(pairs)
    order = sorted(range(len(pairs)), key=lambda i: (pairs[i].trg, pairs[i].src))
    groups: list[list[int]] = []
    for i in order:
        if groups and pairs[groups[-1][0]].trg == pairs[i].trg:
            groups[-1].append(i)
        else:
            groups.append([i])
    for group in groups:
        trg = prepare_target(descriptors(pairs[group[0]].trg), load_size)
        rows, metas = [], []
        for i in group:
            valid, px = _source_px(pairs[i].src_kps, pairs[i].src_size, trg.load_size)
            rows.append(_source_rows(descriptors(pairs[i].src), trg, px))
            metas.append((i, valid, len(px)))
        xy = _match_rows(rows, trg, refine)
        offset = 0
        for i, valid, k in metas:
            predictions[i] = _to_original(xy[offset:offset + k], valid, trg.load_size, pairs[i].trg_size)
            offset += k
            accumulator.add_record(pairs[i], predictions[i])
            if on_pair is not None:
                on_pair()
    return accumulator, predictions
