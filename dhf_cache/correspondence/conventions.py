"""Every published PCK convention over one set of predictions, and bootstrap intervals over pairs.

Papers report the same predictions under different rules (docs/evaluation.md names the code
behind each): which length the threshold scales (`bbox`: max side of the target's box; `img`: of
the target image; `kps`: of the box around the target's scored keypoints), whether a point
exactly on the threshold counts (`<=` or `<`), and how correct points are averaged:

    per_point               correct / points, pooled over every pair
    per_image               mean over pairs of each pair's correct / points
    per_category_per_point  mean over categories of each category's pooled per-point PCK
    per_category_per_image  mean over categories of each category's per-image PCK
    per_category_weighted   categories' per-point PCK weighted by their number of pairs

All of them come from the per-pair counts `(correct, points)` under one (base, inequality,
alpha), so the whole matrix is a few vector operations over the pairs (`PairTable`), and a
bootstrap resample is a weight vector over pairs applied to the same counts.

A pair without a usable length for a base (no box, no size, fewer than two distinct keypoints)
is left out of that base's numbers; `n_pairs` of each row says how many it averaged over.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from dhf_cache.correspondence.pck import BASES, PairResult

AVERAGINGS = ("per_point", "per_image", "per_category_per_point", "per_category_per_image", "per_category_weighted")
INEQUALITIES = ("<=", "<")
BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_SEED = 0


def row_name(base: str, inequality: str, alpha: float, averaging: str) -> str:
    """e.g. `bbox<=0.1 per_point`: the name a convention is reported under."""
    return f"{base}{inequality}{alpha:g} {averaging}"


@dataclass(frozen=True)
class PairCounts:
    """Per-pair counts under one (base, inequality, alpha): pairs without a length are dropped."""

    correct: np.ndarray  # (n,) float64 correct points of each kept pair
    points: np.ndarray  # (n,) float64 scored points of each kept pair (> 0)
    category: np.ndarray  # (n,) int index into PairTable.categories
    kept: np.ndarray  # (n,) indices of the kept pairs in PairTable order
    n_categories: int

    def values(self, weights: np.ndarray | None = None) -> dict[str, float | None]:
        """Every averaging, optionally with bootstrap weights (B, n_all) over all pairs -> (B,) each."""
        if weights is None:
            w = np.ones((1, self.kept.shape[0]))
        else:
            w = np.asarray(weights, dtype=np.float64)[:, self.kept]
        with np.errstate(invalid="ignore", divide="ignore"):
            per_point = (w @ self.correct) / (w @ self.points)
            per_image = (w @ (self.correct / self.points)) / w.sum(1)
            onehot = np.zeros((self.kept.shape[0], self.n_categories))
            onehot[np.arange(self.kept.shape[0]), self.category] = 1.0
            cat_pairs = w @ onehot  # (B, C) weighted pair counts per category
            cat_point = (w @ (onehot * self.correct[:, None])) / (w @ (onehot * self.points[:, None]))
            cat_image = (w @ (onehot * (self.correct / self.points)[:, None])) / cat_pairs
            present = cat_pairs > 0
            n_present = present.sum(1)
            cat_mean_point = np.where(present, cat_point, 0.0).sum(1) / n_present
            cat_mean_image = np.where(present, cat_image, 0.0).sum(1) / n_present
            weighted = np.where(present, cat_point * cat_pairs, 0.0).sum(1) / cat_pairs.sum(1)
        out = {"per_point": per_point, "per_image": per_image, "per_category_per_point": cat_mean_point,
               "per_category_per_image": cat_mean_image, "per_category_weighted": weighted}
        if weights is None:
            return {k: (None if not np.isfinite(v[0]) else float(v[0])) for k, v in out.items()}
        return out


class PairTable:
    """The scored pairs of one evaluation as arrays: distances per point, lengths per pair.

    Built once from the PCK accumulator's `PairResult`s (in their order); every convention and
    bootstrap resample reads these arrays only.
    """

    def __init__(self, pairs: Sequence[PairResult]):
        self.names = [p.name for p in pairs]
        self.categories = sorted({p.category for p in pairs})
        index = {c: i for i, c in enumerate(self.categories)}
        self.category = np.array([index[p.category] for p in pairs], dtype=np.int64)
        self.flags = [dict(p.flags) for p in pairs]
        self.n_points = np.array([p.n_points for p in pairs], dtype=np.int64)
        self.pair_of_point = np.repeat(np.arange(len(pairs)), self.n_points)
        self.distances = (np.concatenate([p.distances for p in pairs]) if pairs else np.zeros(0))
        self.lengths = {base: np.array([np.nan if p.lengths.get(base) is None else p.lengths[base] for p in pairs],
                                       dtype=np.float64) for base in BASES}

    def __len__(self) -> int:
        return len(self.names)

    def counts(self, base: str, inequality: str, alpha: float, subset: np.ndarray | None = None) -> PairCounts:
        """Per-pair (correct, points) under one rule; `subset` (bool per pair) restricts the pairs."""
        length = self.lengths[base]
        limit = alpha * length[self.pair_of_point]
        with np.errstate(invalid="ignore"):  # NaN distances (failed matches) and NaN limits are wrong
            ok = self.distances <= limit if inequality == "<=" else self.distances < limit
        correct = np.bincount(self.pair_of_point, weights=ok.astype(np.float64), minlength=len(self))
        keep = np.isfinite(length) & (self.n_points > 0)
        if subset is not None:
            keep &= subset
        kept = np.flatnonzero(keep)
        return PairCounts(correct=correct[kept], points=self.n_points[kept].astype(np.float64),
                          category=self.category[kept], kept=kept, n_categories=len(self.categories))


def convention_matrix(table: PairTable, alphas: Sequence[float], subset: np.ndarray | None = None) -> list[dict]:
    """One row per (base, inequality, alpha, averaging): `{"name", "base", "inequality", "alpha",
    "averaging", "value", "n_pairs", "n_points"}`; values are fractions in [0, 1] or None."""
    rows = []
    for base in BASES:
        for inequality in INEQUALITIES:
            for alpha in alphas:
                counts = table.counts(base, inequality, float(alpha), subset)
                values = counts.values()
                for averaging in AVERAGINGS:
                    rows.append({"name": row_name(base, inequality, float(alpha), averaging), "base": base,
                                 "inequality": inequality, "alpha": float(alpha), "averaging": averaging,
                                 "value": values[averaging], "n_pairs": int(counts.kept.shape[0]),
                                 "n_points": int(counts.points.sum())})
    return rows


def bootstrap_weights(n_pairs: int, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED) -> np.ndarray:
    """(resamples, n_pairs) multiplicities of each pair in each resample (pairs drawn with
    replacement, n_pairs per resample), from a seeded generator: the same seed and pairs give
    the same interval on every machine."""
    rng = np.random.default_rng(seed)
    if n_pairs == 0:
        return np.zeros((resamples, 0))
    return rng.multinomial(n_pairs, np.full(n_pairs, 1.0 / n_pairs), size=resamples).astype(np.float64)


def interval(samples: np.ndarray, level: float = 0.95) -> tuple[float, float] | None:
    """The percentile interval of bootstrap samples (NaN resamples, e.g. no pair kept, ignored)."""
    finite = samples[np.isfinite(samples)]
    if finite.size == 0:
        return None
    tail = (1.0 - level) / 2 * 100
    lo, hi = np.percentile(finite, [tail, 100 - tail])
    return float(lo), float(hi)


def bootstrap_interval(counts: PairCounts, averaging: str, weights: np.ndarray) -> tuple[float, float] | None:
    """95% percentile interval of one averaging under pair resampling (`bootstrap_weights`)."""
    return interval(counts.values(weights)[averaging])


def within_category(averaging: str) -> str:
    """The averaging a per-category or subset number uses under a headline averaging: the
    category means reduce to pooled (per_point) or per-pair (per_image) within one category."""
    return "per_image" if averaging in ("per_image", "per_category_per_image") else "per_point"


def _scored(counts: PairCounts, averaging: str, weights: np.ndarray | None) -> dict:
    value = counts.values()[averaging]
    out = {"value": value, "n_pairs": int(counts.kept.shape[0]), "n_points": int(counts.points.sum())}
    if weights is not None:
        out["ci95"] = None if value is None else bootstrap_interval(counts, averaging, weights)
    return out


def headline_tables(table: PairTable, base: str, inequality: str, alpha: float, averagings: Sequence[str],
                    resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED) -> dict:
    """The headline numbers of one rule with their bootstrap intervals, and its breakdowns:

    `{"headline": [{"name", "value", "ci95", "n_pairs", "n_points"}, ...],
      "categories": {category: {...}}, "flags": {flag: {value: {...}}}, "bootstrap": {...}}`.
    Categories and flag subsets use `within_category` of the first averaging, each with its own
    interval from the same resamples.
    """
    weights = bootstrap_weights(len(table), resamples, seed) if resamples > 0 else None
    counts = table.counts(base, inequality, alpha)
    headline = [{"name": row_name(base, inequality, alpha, a), **_scored(counts, a, weights)} for a in averagings]
    inner = within_category(averagings[0])
    categories = {}
    for i, category in enumerate(table.categories):
        categories[category] = _scored(table.counts(base, inequality, alpha, table.category == i), inner, weights)
    flags: dict[str, dict] = {}
    for key in sorted({k for f in table.flags for k in f}):
        values = np.array([f.get(key, -1) for f in table.flags])
        flags[key] = {str(v): _scored(table.counts(base, inequality, alpha, values == v), averagings[0], weights)
                      for v in sorted(set(values.tolist()) - {-1})}
    return {"headline": headline, "categories": categories, "flags": flags,
            "bootstrap": {"resamples": int(resamples), "seed": int(seed), "level": 0.95, "unit": "pairs"}}
