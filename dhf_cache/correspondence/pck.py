"""PCK (percentage of correct keypoints), with every averaging the field uses, each labelled.

A predicted keypoint is correct when `||pred - gt|| <= alpha * L` (inclusive, as Ref's
`compute_pck`), in original target-image pixels, with L = max(x2 - x1, y2 - y1) of the target
bounding box (`bbox`) or max(W, H) of the target image (`img`).

Averagings (fractions in [0, 1]):
- `per_point`: correct points / all points, pooled over every pair. This is what Ref reports
  (it concatenates the per-point booleans of all pairs and takes their mean).
- `per_image`: mean over pairs of each pair's correct / points ("per image" in the field: one
  value per target image of a pair).
- `per_category_mean`: unweighted mean over categories of each category's per-point PCK.

Degenerate input is counted, never raised:
- a pair with no keypoints contributes nothing (`empty_pairs`);
- a NaN/inf ground-truth point is dropped (`invalid_gt_points`);
- a NaN/inf prediction is kept and counted wrong (`invalid_pred_points`): a failed match is a miss;
- points outside [0, W] x [0, H] are evaluated as they are and counted (`gt_outside_image`,
  `pred_outside_image`): Ref does not filter them either;
- a target box with a non-finite coordinate, x2 < x1, y2 < y1 or max side 0 has no threshold:
  the pair is left out of the `bbox` metrics only (`invalid_bbox_pairs`). A box with one side 0
  and the other positive is usable (only the max side matters);
- a target size with W or H not > 0 leaves the pair out of the `img` metrics (`invalid_size_pairs`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from dhf_cache.config import PCK_ALPHAS
from dhf_cache.errors import UsageError
from dhf_cache.correspondence.points import as_points

KINDS = ("bbox", "img")  # the threshold bases of `summary()` (metrics.json's "pck" keys)
# every threshold base a published convention uses (conventions.py): the two above and the box
# spanned by the target's scored keypoints (PF-WILLOW's in the HPF code)
BASES = ("bbox", "img", "kps")
COUNTERS = ("empty_pairs", "invalid_gt_points", "invalid_pred_points", "gt_outside_image",
            "pred_outside_image", "invalid_bbox_pairs", "invalid_size_pairs")


def bbox_length(bbox: Sequence[float]) -> float | None:
    """max(w, h) of an (x1, y1, x2, y2) box; None when the box gives no usable threshold."""
    x1, y1, x2, y2 = (float(v) for v in bbox)
    if not all(math.isfinite(v) for v in (x1, y1, x2, y2)) or x2 < x1 or y2 < y1:
        return None
    length = max(x2 - x1, y2 - y1)
    return length if length > 0 else None


def keypoints_length(points: np.ndarray) -> float | None:
    """max(w, h) of the box spanned by (K, 2) finite keypoints (the ones scored: padded or
    invisible keypoints were dropped by the data set, so they cannot inflate it); None when
    fewer than two distinct points give no extent."""
    if points.shape[0] == 0:
        return None
    length = float(max(np.ptp(points[:, 0]), np.ptp(points[:, 1])))
    return length if length > 0 else None


def image_length(size: Sequence[float]) -> float | None:
    """max(W, H) of a (W, H) image size; None unless both are finite and > 0."""
    w, h = (float(v) for v in size)
    if not (math.isfinite(w) and math.isfinite(h) and w > 0 and h > 0):
        return None
    return max(w, h)


def correct_mask(distances: np.ndarray, length: float, alpha: float) -> np.ndarray:
    """distance <= alpha * length (inclusive; NaN distances are wrong)."""
    return np.asarray(distances) <= alpha * length


def format_key(kind: str, alpha: float) -> str:
    return f"{kind}@{alpha:g}"


@dataclass(frozen=True)
class PairResult:
    """One evaluated pair: distances of its valid points and, per kind, the threshold length."""

    name: str
    category: str
    distances: np.ndarray = field(repr=False)  # (n,) pixels; NaN for invalid predictions
    lengths: dict[str, float | None]  # base (BASES) -> L, None when that base cannot be evaluated
    flags: dict[str, int] = field(default_factory=dict)  # the data set's breakdown labels (PairRecord.flags)

    @property
    def n_points(self) -> int:
        return int(self.distances.shape[0])

    def n_correct(self, kind: str, alpha: float) -> int | None:
        length = self.lengths[kind]
        return None if length is None else int(correct_mask(self.distances, length, alpha).sum())


class PCKAccumulator:
    """Collects pairs one at a time; `summary()` gives every averaging, labelled."""

    def __init__(self, alphas: Iterable[float] = PCK_ALPHAS):
        alphas = tuple(float(a) for a in alphas)
        bad = [a for a in alphas if not (math.isfinite(a) and a > 0)]
        if not alphas or bad:
            raise UsageError(f"PCK alphas {list(alphas)!r}: need one or more finite values > 0, e.g. 0.05,0.1,0.15")
        self.alphas = alphas
        self.pairs: list[PairResult] = []
        self.counts = dict.fromkeys(COUNTERS, 0)
        self._names: set[str] = set()

    def add(self, name: str, category: str, pred_kps, gt_kps, trg_bbox, trg_size,
            flags: dict[str, int] | None = None) -> PairResult | None:
        """Add one pair (points [x, y] in original target pixels). Returns None for an empty pair."""
        if name in self._names:
            raise ValueError(f"pair {name!r} added twice to the PCK accumulator")
        pred, gt = as_points(pred_kps), as_points(gt_kps)
        if pred.shape != gt.shape:
            raise ValueError(f"pair {name!r}: {pred.shape[0]} predictions for {gt.shape[0]} keypoints")
        self._names.add(name)
        keep = np.isfinite(gt).all(axis=1)
        self.counts["invalid_gt_points"] += int((~keep).sum())
        pred, gt = pred[keep], gt[keep]
        if gt.shape[0] == 0:
            self.counts["empty_pairs"] += 1
            return None
        pred_ok = np.isfinite(pred).all(axis=1)
        self.counts["invalid_pred_points"] += int((~pred_ok).sum())
        lengths = {"bbox": bbox_length(trg_bbox), "img": image_length(trg_size), "kps": keypoints_length(gt)}
        if lengths["img"] is not None:  # "outside" means nothing without a valid size
            w, h = (float(v) for v in trg_size)
            self.counts["gt_outside_image"] += int(_outside(gt, w, h).sum())
            self.counts["pred_outside_image"] += int((_outside(pred, w, h) & pred_ok).sum())
        distances = np.where(pred_ok, np.linalg.norm(pred - gt, axis=1), np.nan)
        self.counts["invalid_bbox_pairs"] += lengths["bbox"] is None
        self.counts["invalid_size_pairs"] += lengths["img"] is None
        result = PairResult(name=name, category=category, distances=distances, lengths=lengths, flags=dict(flags or {}))
        self.pairs.append(result)
        return result

    def add_record(self, record, pred_kps) -> PairResult | None:
        """Add a `PairRecord` (its target keypoints, box and size) with its predictions."""
        return self.add(record.name, record.category, pred_kps, record.trg_kps, record.trg_bbox, record.trg_size,
                        getattr(record, "flags", None))

    def merge(self, other: PCKAccumulator) -> None:
        """Fold in another accumulator (e.g. from another worker); same alphas required."""
        if other.alphas != self.alphas:
            raise ValueError(f"cannot merge PCK with alphas {other.alphas} into {self.alphas}")
        clash = self._names & other._names
        if clash:
            raise ValueError(f"pairs in both accumulators: {sorted(clash)[:5]}")
        self.pairs.extend(other.pairs)
        self._names |= other._names
        for key, value in other.counts.items():
            self.counts[key] += value

    def summary(self) -> dict:
        """`{"bbox@0.1": {"per_point", "per_image", "per_category_mean", "n_pairs", "n_points"}, ...,
        "categories": {cat: {"bbox@0.1": {"per_point", "per_image", "n_pairs", "n_points"}, ...}},
        "n_pairs", "n_points", "skipped": {counter: n}, "alphas"}`.

        Top-level `n_pairs` counts every pair added (empty ones too), `n_points` every valid
        ground-truth point; the per-metric counts are what that metric averaged over (the bbox
        metrics leave out pairs without a usable box). A fraction with nothing to average is None.
        """
        out: dict = {}
        categories = sorted({p.category for p in self.pairs})
        by_cat: dict[str, dict] = {c: {} for c in categories}
        for kind in KINDS:
            for alpha in self.alphas:
                key = format_key(kind, alpha)
                stats = _stats(self.pairs, kind, alpha)
                cat_stats = {c: _stats([p for p in self.pairs if p.category == c], kind, alpha) for c in categories}
                cat_pck = [s["per_point"] for s in cat_stats.values() if s["per_point"] is not None]
                stats["per_category_mean"] = float(np.mean(cat_pck)) if cat_pck else None
                out[key] = {k: stats[k] for k in ("per_point", "per_image", "per_category_mean", "n_pairs", "n_points")}
                for c in categories:
                    by_cat[c][key] = cat_stats[c]
        for c in categories:
            members = [p for p in self.pairs if p.category == c]
            by_cat[c]["n_pairs"] = len(members)
            by_cat[c]["n_points"] = sum(p.n_points for p in members)
        out["categories"] = by_cat
        out["n_pairs"] = len(self.pairs) + self.counts["empty_pairs"]
        out["n_points"] = sum(p.n_points for p in self.pairs)
        out["skipped"] = dict(self.counts)
        out["alphas"] = list(self.alphas)
        return out


def _outside(points: np.ndarray, w: float, h: float) -> np.ndarray:
    x, y = points[:, 0], points[:, 1]
    return (x < 0) | (y < 0) | (x > w) | (y > h)


def _stats(pairs: list[PairResult], kind: str, alpha: float) -> dict:
    correct = points = 0
    fractions = []
    for pair in pairs:
        n_correct = pair.n_correct(kind, alpha)
        if n_correct is None:
            continue
        correct += n_correct
        points += pair.n_points
        fractions.append(n_correct / pair.n_points)
    return {
        "per_point": correct / points if points else None,
        "per_image": float(np.mean(fractions)) if fractions else None,
        "n_pairs": len(fractions),
        "n_points": points,
    }
