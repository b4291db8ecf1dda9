"""Scoring keypoint pairs with descriptor maps: METHOD.md's matching, then PCK.

Shared by training's validation and by `dhf-cache eval`. Pairs are visited grouped by target
image, so each target's per-image preparation (norm map at the load size) happens once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from dhf_cache.datasets import PairRecord
from dhf_cache.descriptors import DescriptorFn
from dhf_cache.matching import WindowSoftArgmax, match_points, prepare_target
from dhf_cache.pck import PCKAccumulator


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
    prepared_id, prepared = None, None
    for i in order:
        pair = pairs[i]
        if pair.trg != prepared_id:
            prepared_id, prepared = pair.trg, prepare_target(descriptors(pair.trg), load_size)
        pred = match_points(descriptors(pair.src), prepared, pair.src_kps, pair.src_size, pair.trg_size,
                            load_size, refine)
        predictions[i] = pred
        accumulator.add_record(pair, pred)
        if on_pair is not None:
            on_pair()
    return accumulator, predictions
