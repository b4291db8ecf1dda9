"""The similarity map of one clicked source pixel over the target, by eval's matching protocol.

`match_points` (dhf_cache/correspondence/matching.py) reduces each similarity map to its first
maximum; the viewer needs the map itself, so `click_similarity` takes it from the same
function (`similarity_maps`) and runs the same peak search:

1. the clicked point [x, y] in original source pixels goes to the load size, is clipped to
   [0, load - 1] and rounded half to even (`source_px`), exactly as a source keypoint;
2. the source descriptor at that load pixel comes from its four grid neighbours (`lookup`,
   bilinear upsampling without upsampling the whole map) and is L2-normalised;
3. its dot products with the target grid are upsampled to load x load (bilinear,
   align_corners=False) and multiplied by 1 / |upsampled target| (`PreparedTarget.inv_norm`):
   the cosine similarity of the upsampled maps at every load pixel;
4. the first maximum (`peaks`, no refinement) is mapped back to original target pixels.

So the argmax is, bit for bit, what `match_points` returns for that point (tests check it on
grids of pixels and from the browser).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from dhf_cache.correspondence.matching import PreparedTarget, peaks, similarity_maps, source_px, to_original
from dhf_cache.errors import UsageError


@dataclass(frozen=True)
class Click:
    """One click's answer: the (load, load) similarity map and where its first maximum lies."""

    similarity: torch.Tensor  # (load, load) float32 cosine similarity over the target
    load_pixel: tuple[int, int]  # the source pixel [x, y] at the load size the click became
    argmax_load: tuple[int, int]  # [x, y] of the first maximum at the load size
    argmax: tuple[float, float]  # the same in original target pixels (what match_points returns)
    score: float  # the similarity at the maximum


def click_similarity(src_desc: torch.Tensor, target: PreparedTarget, point: tuple[float, float],
                     src_size: tuple[int, int], trg_size: tuple[int, int], fit: str = "stretch") -> Click:
    """The similarity map of source point [x, y] (original source pixels) over `target`; `fit`
    is how the descriptors' images were made square (the cache's Preprocessing.fit)."""
    x, y = float(point[0]), float(point[1])
    if not (np.isfinite(x) and np.isfinite(y)):
        raise UsageError(f"point ({x}, {y}): both coordinates must be finite numbers of source pixels")
    load = target.load_size
    valid, px = source_px(np.array([[x, y]]), src_size, load, fit)
    try:
        sim = similarity_maps(src_desc, target, px)
    except ValueError as exc:  # descriptor channels differ
        raise UsageError(str(exc)) from None
    xy, score = peaks(sim, None, load)
    original = to_original(xy, valid, load, trg_size, fit)[0]
    return Click(similarity=sim[0], load_pixel=(int(px[0, 0]), int(px[0, 1])),
                 argmax_load=(int(xy[0, 0]), int(xy[0, 1])), argmax=(float(original[0]), float(original[1])),
                 score=float(score[0]))
