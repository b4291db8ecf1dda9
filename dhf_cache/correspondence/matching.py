"""Nearest-neighbour keypoint matching, as the Diffusion Hyperfeatures evaluation does it.

The protocol (Ref: `archs/correspondence_utils.py` `find_nn_source_correspondences`,
`points_to_idxs`, `rescale_points`, and `train_hyperfeatures.py` `validate`):

1. Both descriptor maps (P, h, w) are upsampled to load x load with `F.interpolate(...,
   mode="bilinear")` (align_corners=False, no antialias).
2. Source keypoints [x, y] are scaled from the original source size to the load size
   (`x * (load / W)`, `y * (load / H)`), clipped to [0, load - 1] and rounded half to even
   (`np.round`); the source descriptor is the upsampled map at that pixel.
3. Cosine similarity against every pixel of the upsampled target map; hard argmax (first maximum
   on exact ties, as `torch.argmax`); no soft-argmax, no mutual check.
4. The winning pixel index (x, y) is scaled to the original target size (`x * (W / load)`):
   no half-pixel offset, exactly as Ref.

`match_points_reference` does exactly that. `match_points` gives the same argmax without ever
upsampling a P-channel map: bilinear upsampling is linear, so `s . up(T) = up(s . T)` (one
channel), the norm of `up(T)` at every load pixel comes from inner products of neighbouring
descriptors (`prepare_target`, once per image), and the source descriptor at a load pixel is a
bilinear combination of four 64x64 descriptors. Per pair cost is K x P x h x w plus K x load^2,
instead of 2 x P x load^2 (upsampling) + K x P x load^2 (similarities).

Deliberate difference from Ref: norms are clamped at 1e-12 (as `F.normalize`), so an all-zero
descriptor (possible after the aggregator's final ReLU) scores 0 instead of NaN.

Where matching happens (`MATCH_AT`, docs/evaluation.md): `load` is the above (a load x load
square, Ref's); `original` upsamples each map to its own image's W x H (DIFT); `square` to the
aspect-preserving size whose long side is the load size, i.e. the image part of a padded square
(SD+DINO, GeoAware-SC), so distances there are the original ones times load / max(W, H), which
is the threshold scaling those codes apply. Every function below takes a grid as an int (a
square) or a (width, height) pair; the square case is the arithmetic above, unchanged.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from dhf_cache.correspondence.points import as_points
from dhf_cache.datasets.images import place_points, unplace_points
from dhf_cache.errors import UsageError

EPS = 1e-12
REFINE_CHOICES = ("none", "window-softargmax")
MATCH_AT = ("load", "original", "square")

Grid = int | tuple[int, int]  # a square side, or (width, height)


def grid_wh(grid: Grid) -> tuple[int, int]:
    """(width, height) of a grid given as a square side or a pair."""
    if isinstance(grid, tuple):
        return int(grid[0]), int(grid[1])
    return int(grid), int(grid)


def match_grid(where: str, load_size: int, image_size) -> tuple[int, int]:
    """(width, height) an image of `image_size` (W, H) is matched on, for each of MATCH_AT."""
    if where == "load":
        return int(load_size), int(load_size)
    w, h = (float(v) for v in image_size)
    if not (np.isfinite(w) and np.isfinite(h) and w > 0 and h > 0):
        raise UsageError(f"--match-at {where}: image size {image_size!r} is not a usable (W, H); use --match-at load")
    if where == "original":
        return max(1, int(round(w))), max(1, int(round(h)))
    if where == "square":
        scale = load_size / max(w, h)
        return max(1, int(round(w * scale))), max(1, int(round(h * scale)))
    raise UsageError(f"--match-at {where!r}: unknown; use one of {', '.join(MATCH_AT)}")


# --------------------------------------------------------------------------- coordinates


def rescale_points(points, from_size: tuple[float, float], to_size: tuple[float, float]) -> np.ndarray:
    """[x, y] points from an image of size (W, H) to one of size (W', H').

    The scale is computed first and then multiplied (`x * (W' / W)`), as Ref does, so that
    exact halves round the same way when the result is rounded to a pixel.
    """
    pts = as_points(points)
    scale = np.array([to_size[0] / from_size[0], to_size[1] / from_size[1]], dtype=np.float64)
    return pts * scale


def to_load(points, size: tuple[float, float], load_size: Grid, fit: str = "stretch") -> np.ndarray:
    """Original image pixels -> grid pixels (the load-size square the features were made from;
    with `fit="pad"` the aspect-kept image inside it, datasets/images.py `placement`)."""
    if fit == "pad":
        return place_points(as_points(points), size, grid_wh(load_size)[0], fit)
    return rescale_points(points, size, grid_wh(load_size))


def from_load(points, load_size: Grid, size: tuple[float, float], fit: str = "stretch") -> np.ndarray:
    """Grid pixels -> original image pixels (inverse of `to_load`)."""
    if fit == "pad":
        return unplace_points(as_points(points), grid_wh(load_size)[0], size, fit)
    return rescale_points(points, grid_wh(load_size), size)


def check_fit(fit: str, match_at: str) -> None:
    """Padded features are matched on their own square (SD+DINO's way): only `--match-at load`."""
    if fit == "pad" and match_at != "load":
        raise UsageError(f"--match-at {match_at}: this cache's images were padded to squares (fit pad), so "
                         "matching happens on that square, as SD+DINO does: use --match-at load")


def source_pixels(load_points, load_size: Grid) -> np.ndarray:
    """Grid [x, y] -> integer pixel [x, y]: clip to [0, side - 1], then round half to even (Ref)."""
    w, h = grid_wh(load_size)
    pts = as_points(load_points)
    pts = np.stack([np.clip(pts[:, 0], 0, w - 1), np.clip(pts[:, 1], 0, h - 1)], axis=1) if len(pts) else pts
    return np.round(pts).astype(np.int64)


# --------------------------------------------------------------------------- refinement


@dataclass(frozen=True)
class WindowSoftArgmax:
    """Soft-argmax in a window around the hard argmax (GeoAware-SC's `--SOFT_EVAL`).

    GeoAware-SC (`utils/utils_correspondence.py` `get_flow` / `soft_argmax`) keeps a
    (2r+1)^2 window around the argmax of the cosine-similarity map, applies a softmax with
    temperature `beta` = 0.02 and returns the expected pixel position; r = 7 patches of a
    60-patch grid. Here the map is the load-size similarity map, so the half-window is a
    fraction of the load size (default 7/60, the same share of the image). Pixels outside the
    window are excluded (GeoAware sets them to 0 and keeps them in the softmax, a difference of
    order e^(-max sim / beta)); the window is truncated at the image border. Off by default.
    """

    half_window: float = 7 / 60
    beta: float = 0.02

    def radius(self, load_size: Grid) -> int:
        """Half-window in pixels: the share of the grid's long side (the padded square's side)."""
        return max(0, int(round(self.half_window * max(grid_wh(load_size)))))


def parse_refine(name: str | None) -> WindowSoftArgmax | None:
    """The `--refine` option: `none` (Ref's hard argmax, default) or `window-softargmax`."""
    if name is None or name == "none":
        return None
    if name == "window-softargmax":
        return WindowSoftArgmax()
    raise UsageError(f"--refine {name!r}: unknown; use one of {', '.join(REFINE_CHOICES)}")


def window_soft_argmax(sim: torch.Tensor, radius: int, beta: float = 0.02,
                       peak: torch.Tensor | None = None) -> torch.Tensor:
    """Sub-pixel peaks of K similarity maps (K, H, W) -> (K, 2) float [x, y] in pixel indices.

    Hard argmax (first maximum; `peak` when the caller has it already), then the
    softmax(sim / beta)-weighted mean position over the pixels within `radius` of it (Chebyshev
    distance, truncated at the border). radius 0 gives the hard argmax.
    """
    k, h, w = sim.shape
    flat = first_argmax(sim) if peak is None else peak
    py, px = flat // w, flat % w
    off = torch.arange(-radius, radius + 1, device=sim.device)
    ys = py[:, None, None] + off[None, :, None]  # (K, 2r+1, 1)
    xs = px[:, None, None] + off[None, None, :]  # (K, 1, 2r+1)
    ys, xs = torch.broadcast_tensors(ys, xs)
    inside = (ys >= 0) & (ys < h) & (xs >= 0) & (xs < w)
    flat_idx = (ys.clamp(0, h - 1) * w + xs.clamp(0, w - 1)).reshape(k, -1)
    vals = sim.reshape(k, -1).gather(1, flat_idx).reshape(inside.shape)
    vals = torch.where(inside, vals / beta, torch.full_like(vals, -torch.inf)).reshape(k, -1)
    weights = torch.softmax(vals, dim=1)
    x = (weights * xs.reshape(k, -1).to(weights.dtype)).sum(1)
    y = (weights * ys.reshape(k, -1).to(weights.dtype)).sum(1)
    return torch.stack([x, y], dim=1)


def first_argmax(sim: torch.Tensor) -> torch.Tensor:
    """Flat index of the first maximum of each map (K, H, W) -> (K,), as `reshape(K, -1).argmax(1)`.

    Same answer (first maximum in row-major order, NaN counting as the maximum, as torch's
    argmax), about 5x cheaper on CPU: torch's argmax reduction is scalar code while `amax` is
    vectorised, so take the row maxima, the first row holding the overall maximum, then the
    first maximum within that one row.
    """
    k, _, w = sim.shape
    if k == 0:
        return torch.zeros(0, dtype=torch.long, device=sim.device)
    row = sim.amax(dim=2).argmax(dim=1)  # first row whose maximum is the overall maximum
    within = sim[torch.arange(k, device=sim.device), row].argmax(dim=1)
    return row * w + within


def peaks(sim: torch.Tensor, refine: WindowSoftArgmax | None, load_size: Grid) -> tuple[torch.Tensor, torch.Tensor]:
    """(K, H, W) similarity -> ((K, 2) float [x, y] grid pixels, (K,) similarity at the argmax)."""
    k, _, w = sim.shape
    if k == 0:
        return sim.new_zeros(0, 2), sim.new_zeros(0)
    flat = sim.reshape(k, -1)
    idx = first_argmax(sim)  # first maximum on exact ties, as Ref
    score = flat.gather(1, idx[:, None])[:, 0]
    if refine is not None:
        return window_soft_argmax(sim, refine.radius(load_size), refine.beta, peak=idx), score
    return torch.stack([idx % w, idx // w], dim=1).to(sim.dtype), score


# --------------------------------------------------------------------------- descriptors


def as_map(desc) -> torch.Tensor:
    """(P, h, w) or (1, P, h, w), any float dtype -> (P, h, w) float32 on its device."""
    t = torch.as_tensor(desc)
    if t.ndim == 4 and t.shape[0] == 1:
        t = t[0]
    if t.ndim != 3:
        raise ValueError(f"descriptor map must have shape (P, h, w), got {tuple(t.shape)}")
    return t.to(torch.float32)


@functools.lru_cache(maxsize=32)
def _axis_weights(n_in: int, n_out: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """F.interpolate's 1-D bilinear resize (align_corners=False) n_in -> n_out, as each output
    index's lower neighbour i0 (n_out,) and its weights on (i0, i0 + 1) (n_out, 2).

    Read off the resize of the identity, so these are whatever weights this torch uses. At the
    clamped border all weight sits on i0 (the second weight is 0 and i0 + 1 may be n_in).
    """
    eye = torch.eye(n_in, dtype=torch.float32, device=device)[:, None, :, None]
    matrix = F.interpolate(eye, size=(n_out, 1), mode="bilinear", align_corners=False)[:, 0, :, 0].T
    i0 = (matrix > 0).to(torch.uint8).argmax(dim=1)  # first non-zero; rows are (i0, i0 + 1) only
    rows = torch.arange(n_out, device=matrix.device)
    w0 = matrix[rows, i0]
    w1 = torch.where(i0 + 1 < n_in, matrix[rows, (i0 + 1).clamp(max=n_in - 1)], torch.zeros_like(w0))
    return i0, torch.stack([w0, w1], dim=1)


@dataclass(frozen=True, eq=False)
class PreparedTarget:
    """Per-image state for `match_points`, computed once per image and reused by every pair.

    Serves as the source side too (only `desc` and the interpolation weights are used there).
    Size: P*h*w*4 bytes + load^2*4 (about 6.3 MB + 0.2 MB for 384x64x64 at load 224).
    """

    desc: torch.Tensor  # (P, h, w) float32
    size: tuple[int, int]  # (width, height) of the grid it is matched on
    inv_norm: torch.Tensor  # (height, width): 1 / |upsampled descriptor| at each grid pixel

    @property
    def load_size(self) -> int:
        """The side of a square grid (Ref's load size); the long side otherwise."""
        return max(self.size)

    @property
    def device(self) -> torch.device:
        return self.desc.device


def _upsampled_norm(desc: torch.Tensor, rows, cols) -> torch.Tensor:
    """|up(T)| at every load pixel from inner products of neighbouring descriptors.

    up(T)[i, j] = sum over the corners c = (dy, dx) in {0, 1}^2 of wy[i, dy] wx[j, dx] T[a_i + dy, b_j + dx],
    so |up(T)[i, j]|^2 = sum_{c, c'} w_c w_c' <T_c, T_c'>: ten inner-product maps at h x w, all
    shifts of five (self, right, down, down-right, down-left neighbour). Replicate padding stands
    in for the clamped border, where the second weight is zero.
    """
    h, w = desc.shape[1:]
    (ay, wgt_y), (ax, wgt_x) = rows, cols
    t = F.pad(desc[None], (0, 1, 0, 1), mode="replicate")[0]  # (P, h + 1, w + 1)
    self_ = (t * t).sum(0)
    right = (t[:, :, :-1] * t[:, :, 1:]).sum(0)
    down = (t[:, :-1, :] * t[:, 1:, :]).sum(0)
    diag = (t[:, :-1, :-1] * t[:, 1:, 1:]).sum(0)
    anti = (t[:, :-1, 1:] * t[:, 1:, :-1]).sum(0)
    # (corner, corner') -> <T_corner, T_corner'> on the h x w grid of lower-left cells
    gram = {
        ((0, 0), (0, 0)): self_[:h, :w], ((0, 1), (0, 1)): self_[:h, 1:],
        ((1, 0), (1, 0)): self_[1:, :w], ((1, 1), (1, 1)): self_[1:, 1:],
        ((0, 0), (0, 1)): right[:h], ((1, 0), (1, 1)): right[1:],
        ((0, 0), (1, 0)): down[:, :w], ((0, 1), (1, 1)): down[:, 1:],
        ((0, 0), (1, 1)): diag, ((0, 1), (1, 0)): anti,
    }
    norm2 = torch.zeros(ay.shape[0], ax.shape[0], dtype=torch.float32, device=desc.device)
    for (ci, cj), g in gram.items():
        g = g.index_select(0, ay).index_select(1, ax)  # index_select: advanced indexing is slow on CPU
        coef = (wgt_y[:, ci[0]] * wgt_y[:, cj[0]])[:, None] * (wgt_x[:, ci[1]] * wgt_x[:, cj[1]])[None, :]
        norm2 += (1.0 if ci == cj else 2.0) * coef * g
    return norm2.clamp_min(0).sqrt()


@functools.lru_cache(maxsize=8)
def _corner_table(h: int, w: int, out_w: int, out_h: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """For every grid pixel (row-major, out_h x out_w of them): the flat indices of its four
    neighbouring descriptors on the h x w map (n, 4) and their bilinear weights (n, 4), from
    `_axis_weights`. Built once per grid size, so a lookup is a handful of tensor ops."""
    (ay, wgt_y), (ax, wgt_x) = _axis_weights(h, out_h, device), _axis_weights(w, out_w, device)
    y0, x0 = ay[:, None], ax[None, :]
    y1, x1 = (y0 + 1).clamp(max=h - 1), (x0 + 1).clamp(max=w - 1)
    idx = torch.stack([y0 * w + x0, y0 * w + x1, y1 * w + x0, y1 * w + x1], dim=-1)
    wy0, wy1, wx0, wx1 = wgt_y[:, 0, None], wgt_y[:, 1, None], wgt_x[None, :, 0], wgt_x[None, :, 1]
    weights = torch.stack([wy0 * wx0, wy0 * wx1, wy1 * wx0, wy1 * wx1], dim=-1)
    return idx.reshape(-1, 4), weights.reshape(-1, 4)


def lookup(desc: torch.Tensor, load_size: Grid, px: torch.Tensor) -> torch.Tensor:
    """Upsampled descriptors at integer grid pixels px (k, 2) [x, y] -> (k, P), from 4 neighbours."""
    p, h, w = desc.shape
    out_w, out_h = grid_wh(load_size)
    idx, weights = _corner_table(h, w, out_w, out_h, str(desc.device))
    pix = px[:, 1] * out_w + px[:, 0]
    # index_select, not advanced indexing: the latter is far slower on CPU here
    corners = desc.reshape(p, h * w).index_select(1, idx.index_select(0, pix).reshape(-1)).reshape(p, -1, 4)
    return (corners * weights.index_select(0, pix)).sum(-1).T


def prepare_target(desc, load_size: Grid) -> PreparedTarget:
    """Once per image: float32 map, bilinear weights and the grid's norm map."""
    out_w, out_h = grid_wh(load_size)
    if min(out_w, out_h) < 1:
        raise UsageError(f"--load-size {load_size!r}: must be a positive number of pixels, e.g. 224")
    t = as_map(desc)
    rows = _axis_weights(t.shape[1], out_h, str(t.device))
    cols = _axis_weights(t.shape[2], out_w, str(t.device))
    inv_norm = 1.0 / _upsampled_norm(t, rows, cols).clamp_min(EPS)
    return PreparedTarget(desc=t, size=(out_w, out_h), inv_norm=inv_norm)


# --------------------------------------------------------------------------- matching


def source_px(src_kps, src_size, load_size: Grid, fit: str = "stretch") -> tuple[np.ndarray, np.ndarray]:
    """(valid mask (K,), integer grid pixels [x, y] of the valid keypoints)."""
    load = to_load(src_kps, src_size, load_size, fit)
    valid = np.isfinite(load).all(axis=1)
    return valid, source_pixels(load[valid], load_size)


def to_original(load_xy: torch.Tensor, valid: np.ndarray, load_size: Grid, trg_size, fit: str = "stretch") -> np.ndarray:
    out = np.full((valid.shape[0], 2), np.nan)
    out[valid] = from_load(load_xy.detach().cpu().double().numpy().reshape(-1, 2), load_size, trg_size, fit)
    return out


def match_points_reference(src_desc, trg_desc, src_kps, src_size, trg_size, load_size: int,
                           refine: WindowSoftArgmax | None = None, match_at: str = "load",
                           fit: str = "stretch") -> np.ndarray:
    """Ref's protocol written plainly (upsample both maps in full). Returns (K, 2) [x, y] in
    original target pixels; NaN where the source keypoint is NaN. Slow: for tests and checks."""
    check_fit(fit, match_at)
    src = as_map(src_desc)
    trg = as_map(trg_desc).to(src.device)
    if src.shape[0] != trg.shape[0]:
        raise ValueError(f"descriptor channels differ: source {src.shape[0]}, target {trg.shape[0]}")
    src_grid, trg_grid = match_grid(match_at, load_size, src_size), match_grid(match_at, load_size, trg_size)
    up_s = F.interpolate(src[None], size=src_grid[::-1], mode="bilinear", align_corners=False)[0]
    up_t = F.interpolate(trg[None], size=trg_grid[::-1], mode="bilinear", align_corners=False)[0]
    valid, px = source_px(src_kps, src_size, src_grid, fit)
    pxt = torch.from_numpy(px).to(src.device)
    s = up_s[:, pxt[:, 1], pxt[:, 0]].T  # (k, P)
    s = s / s.norm(dim=1, keepdim=True).clamp_min(EPS)
    t = up_t.reshape(up_t.shape[0], -1)
    t = t / t.norm(dim=0, keepdim=True).clamp_min(EPS)
    sim = (s @ t).reshape(-1, *trg_grid[::-1])
    xy, _ = peaks(sim, refine, trg_grid)
    return to_original(xy, valid, trg_grid, trg_size, fit)


def similarity_maps(src: PreparedTarget | torch.Tensor, trg: PreparedTarget, px, *,
                    src_grid: Grid | None = None) -> torch.Tensor:
    """Cosine similarity over the target's grid (k, H, W) of integer source grid pixels px (k, 2)
    [x, y] (on `src_grid`, default the target's grid): the map `match_points` takes the peak of."""
    src_grid = trg.size if src_grid is None else grid_wh(src_grid)
    if isinstance(src, PreparedTarget):
        if src.size != src_grid:
            raise ValueError(f"source prepared for grid {src.size}, matched on {src_grid}")
        s_map = src.desc.to(trg.device)
    else:
        s_map = as_map(src).to(trg.device)
    if s_map.shape[0] != trg.desc.shape[0]:
        raise ValueError(f"descriptor channels differ: source {s_map.shape[0]}, target {trg.desc.shape[0]}")
    pxt = torch.as_tensor(np.asarray(px), dtype=torch.long, device=trg.device).reshape(-1, 2)
    s = lookup(s_map, src_grid, pxt)
    s = s / s.norm(dim=1, keepdim=True).clamp_min(EPS)
    p, h, w = trg.desc.shape
    dots = (s @ trg.desc.reshape(p, h * w)).reshape(-1, 1, h, w)
    return F.interpolate(dots, size=trg.size[::-1], mode="bilinear", align_corners=False)[:, 0] * trg.inv_norm


def match_load_points(src: PreparedTarget | torch.Tensor, trg: PreparedTarget, px, *,
                      refine: WindowSoftArgmax | None = None,
                      src_grid: Grid | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Core of `match_points`: integer source grid pixels (k, 2) [x, y] -> target grid
    positions (k, 2) float [x, y] and the cosine similarity at the argmax (k,)."""
    return peaks(similarity_maps(src, trg, px, src_grid=src_grid), refine, trg.size)


def match_points(src_desc: PreparedTarget | torch.Tensor, trg_desc: PreparedTarget | torch.Tensor,
                 src_kps, src_size, trg_size, load_size: int,
                 refine: WindowSoftArgmax | None = None, match_at: str = "load", fit: str = "stretch") -> np.ndarray:
    """Same result as `match_points_reference`, at a fraction of the cost.

    Pass `PreparedTarget`s (from `prepare_target`, once per image) to reuse per-image work
    across pairs; raw (P, h, w) maps are prepared on the fly. Computes in float32 on the
    target's device. Returns (K, 2) [x, y] in original target pixels, NaN for NaN keypoints.
    """
    check_fit(fit, match_at)
    src_grid, trg_grid = match_grid(match_at, load_size, src_size), match_grid(match_at, load_size, trg_size)
    trg = trg_desc if isinstance(trg_desc, PreparedTarget) else prepare_target(trg_desc, trg_grid)
    if trg.size != trg_grid:
        raise ValueError(f"target prepared for grid {trg.size}, asked to match on {trg_grid}")
    valid, px = source_px(src_kps, src_size, src_grid, fit)
    xy, _ = match_load_points(src_desc, trg, px, refine=refine, src_grid=src_grid)
    return to_original(xy, valid, trg_grid, trg_size, fit)
