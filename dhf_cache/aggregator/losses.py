"""The training loss of Diffusion Hyperfeatures (METHOD.md, "Training").

A CLIP-style symmetric cross-entropy over keypoints with a fixed temperature of 0.07, as the
reference's `compute_clip_loss`: each source keypoint classifies its target location among all
target pixels by cosine similarity, each target keypoint its source location among all source
pixels, and the two mean losses are averaged.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from dhf_cache.datasets.images import place_points
from dhf_cache.errors import UsageError

TEMPERATURE = 0.07  # fixed in the reference (logit scale 1/0.07, never learned)


def _grid_wh(grid: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(grid, int):
        return grid, grid
    gw, gh = (int(v) for v in grid)
    return gw, gh


def grid_keypoints(
    kps: torch.Tensor | np.ndarray | Sequence[Sequence[float]],
    image_size: Sequence[float],
    grid: int | Sequence[int] = 64,
    fit: str = "stretch",
    load_size: int | None = None,
) -> torch.Tensor:
    """Keypoints [x, y] in original pixels -> (K, 2) long [x, y] on the descriptor grid.

    As the reference (`rescale_points` then `points_to_idxs`): scale by grid/size per axis (no
    half-pixel shift), clip to [0, grid-1], then round half to even (numpy's and torch's round:
    2.5 -> 2, 3.5 -> 4). Computed in float64 so ties fall exactly as in the reference.
    `image_size` and `grid` are (W, H); an int grid is square. With `fit="pad"` (the cache's
    images padded to squares of side `load_size`) the keypoints are first placed in that square
    (datasets/images.py `place_points`), then scaled to the grid.
    """
    pts = torch.as_tensor(np.asarray(kps, dtype=np.float64))
    if pts.dim() != 2 or pts.shape[1] != 2:
        raise UsageError(f"keypoints have shape {tuple(pts.shape)}; expected (K, 2) as [x, y]")
    width, height = (float(v) for v in image_size)
    if width <= 0 or height <= 0:
        raise UsageError(f"image_size={tuple(image_size)!r}: width and height must be positive")
    if fit == "pad":
        if load_size is None:
            raise UsageError("fit pad: grid_keypoints needs the load size the images were padded at")
        pts = torch.as_tensor(place_points(pts.numpy(), image_size, int(load_size), "pad"))
        width = height = float(load_size)
    gw, gh = _grid_wh(grid)
    x = (pts[:, 0] * (gw / width)).clamp(0, gw - 1)
    y = (pts[:, 1] * (gh / height)).clamp(0, gh - 1)
    return torch.stack([x.round(), y.round()], dim=1).long()


def _flat_indices(grid_kps: torch.Tensor, height: int, width: int, what: str) -> torch.Tensor:
    """Row-major pixel index y * w + x of [x, y] grid keypoints (the reference flattens (C, H*W))."""
    if grid_kps.dim() != 2 or grid_kps.shape[1] != 2 or grid_kps.is_floating_point():
        raise UsageError(f"{what} keypoints: shape {tuple(grid_kps.shape)} dtype {grid_kps.dtype}; "
                         "expected (K, 2) integer [x, y] from grid_keypoints")
    x, y = grid_kps[:, 0].long(), grid_kps[:, 1].long()
    bad = (x < 0) | (x >= width) | (y < 0) | (y >= height)
    if bool(bad.any()):
        raise UsageError(f"{what} keypoints {grid_kps[bad].tolist()} fall outside the {width}x{height} "
                         "descriptor grid; rescale them with grid_keypoints")
    return y * width + x


def symmetric_ce_loss(
    src_desc: torch.Tensor,
    trg_desc: torch.Tensor,
    src_grid_kps: torch.Tensor,
    trg_grid_kps: torch.Tensor,
    temperature: float = TEMPERATURE,
) -> torch.Tensor:
    """Symmetric cross-entropy of one pair: descriptors (P, h, w), keypoints (K, 2) long [x, y].

    logits = cos(src_k, every target pixel) / temperature, label = target keypoint k; likewise
    from target to source; each direction is a mean over K; the result is their average. Only the
    K keypoint rows of the reference's full (h*w)^2 similarity matrix are computed: same value.
    """
    if not temperature > 0:
        raise UsageError(f"temperature={temperature!r}: must be positive (the method uses 0.07)")
    for what, desc in (("source", src_desc), ("target", trg_desc)):
        if desc.dim() != 3:
            raise UsageError(f"{what} descriptors have shape {tuple(desc.shape)}; expected (P, h, w)")
    if src_desc.shape[0] != trg_desc.shape[0]:
        raise UsageError(f"descriptor dims differ: source {src_desc.shape[0]}, target {trg_desc.shape[0]}")
    if src_grid_kps.shape != trg_grid_kps.shape or src_grid_kps.shape[0] == 0:
        raise UsageError(f"keypoints: source {tuple(src_grid_kps.shape)} and target "
                         f"{tuple(trg_grid_kps.shape)} must be the same non-empty (K, 2)")
    p, hs, ws = src_desc.shape
    _, ht, wt = trg_desc.shape
    src_idx = _flat_indices(src_grid_kps.to(src_desc.device), hs, ws, "source")
    trg_idx = _flat_indices(trg_grid_kps.to(trg_desc.device), ht, wt, "target")
    src = F.normalize(src_desc.reshape(p, hs * ws).t(), dim=1)  # (Ns, P), unit rows
    trg = F.normalize(trg_desc.reshape(p, ht * wt).t(), dim=1)  # (Nt, P)
    scale = 1.0 / temperature
    src_logits = scale * (src[src_idx] @ trg.t())  # (K, Nt)
    trg_logits = scale * (trg[trg_idx] @ src.t())  # (K, Ns)
    loss_src = F.cross_entropy(src_logits, trg_idx)
    loss_trg = F.cross_entropy(trg_logits, src_idx)
    return (loss_src + loss_trg) / 2
