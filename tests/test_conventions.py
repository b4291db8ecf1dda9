"""The convention matrix on hand-computed cases, each protocol's rule against the formula of the
code it names (written from that code, cited), and the bootstrap intervals."""

from __future__ import annotations

import numpy as np
import pytest

from dhf_cache.correspondence.conventions import (PairTable, bootstrap_weights, convention_matrix, headline_tables,
                                                  interval)
from dhf_cache.correspondence.pck import PCKAccumulator
from dhf_cache.correspondence.protocols import PROTOCOLS, get_protocol
from dhf_cache.errors import UsageError


def _hand_table() -> PairTable:
    """Category A: two pairs, B: one; alpha 0.1 with bbox L = 100 (threshold 10) everywhere.

    a1: distances 10 (exactly on the threshold) and 5; image 200 x 100 (threshold 20); its two
        keypoints span 20 px (kps threshold 2): 2/2 with <=, 1/2 with <; img 2/2; kps 0/2.
    a2: one keypoint 50 px off and a NaN (invisible or padded) one that is dropped, so its
        keypoint box has no extent: kps leaves the pair out.
    b1: distances 0, 30, 30: 1/3 under every rule.
    """
    acc = PCKAccumulator((0.1,))
    gt = np.array([[10.0, 10.0], [30.0, 10.0]])
    acc.add("a1", "A", gt + [[10.0, 0.0], [0.0, 5.0]], gt, (0, 0, 100, 50), (200, 100))
    acc.add("a2", "A", [[90.0, 40.0], [0.0, 0.0]], [[40.0, 40.0], [np.nan, np.nan]], (0, 0, 100, 80), (150, 100))
    gt_b = np.array([[0.0, 0.0], [100.0, 0.0], [0.0, 60.0]])
    acc.add("b1", "B", gt_b + [[0.0, 0.0], [0.0, 30.0], [30.0, 0.0]], gt_b, (0, 0, 100, 100), (300, 300))
    return PairTable(acc.pairs)


def _row(rows, name):
    return next(r for r in rows if r["name"] == name)


def test_the_matrix_on_hand_computed_pairs():
    rows = convention_matrix(_hand_table(), (0.1,))
    assert len(rows) == 3 * 2 * 5  # bases x inequalities x averagings
    want = {  # bbox <=: a1 2/2, a2 0/1, b1 1/3
        "bbox<=0.1 per_point": 3 / 6, "bbox<=0.1 per_image": (1 + 0 + 1 / 3) / 3,
        "bbox<=0.1 per_category_per_point": (2 / 3 + 1 / 3) / 2,
        "bbox<=0.1 per_category_per_image": ((1 + 0) / 2 + 1 / 3) / 2,
        "bbox<=0.1 per_category_weighted": (2 * (2 / 3) + 1 * (1 / 3)) / 3,
        # the point exactly on the threshold is wrong under <
        "bbox<0.1 per_point": 2 / 6, "bbox<0.1 per_image": (0.5 + 0 + 1 / 3) / 3,
        # image threshold 20 for a1 (2/2), 15 for a2 (0/1), 30 for b1 (3/3: 30 <= 30)
        "img<=0.1 per_point": 5 / 6, "img<0.1 per_point": 3 / 6,
        # keypoint box: a1 spans 20 (threshold 2, 0/2); a2 has one keypoint left: no box, left out;
        # b1 spans 100 (1/3)
        "kps<=0.1 per_point": 1 / 5, "kps<=0.1 per_image": (0 + 1 / 3) / 2,
    }
    for name, value in want.items():
        assert _row(rows, name)["value"] == pytest.approx(value), name
    assert _row(rows, "kps<=0.1 per_point")["n_pairs"] == 2 and _row(rows, "bbox<=0.1 per_point")["n_pairs"] == 3
    assert _row(rows, "bbox<=0.1 per_point")["n_points"] == 6  # a2's NaN keypoint was dropped, not counted


def _random_accumulator(n_pairs: int, seed: int, categories=("cat", "dog", "bus"), gts: list | None = None) -> PCKAccumulator:
    """Random pairs; `gts` (if given) receives each pair's ground truth."""
    rng = np.random.default_rng(seed)
    acc = PCKAccumulator((0.05, 0.1))
    for i in range(n_pairs):
        k = int(rng.integers(1, 9))
        gt = rng.uniform(0, 200, size=(k, 2)).round()
        if gts is not None:
            gts.append(gt)
        pred = gt + rng.normal(0, 12, size=(k, 2)).round()  # integer offsets: some land exactly on a threshold
        w, h = int(rng.integers(150, 400)), int(rng.integers(150, 400))
        box = (rng.uniform(0, 50), rng.uniform(0, 50), rng.uniform(100, 200), rng.uniform(100, 200))
        acc.add(f"p{i}", categories[int(rng.integers(len(categories)))], pred, gt, box, (w, h),
                {"occlusion": int(rng.integers(0, 2))})
    return acc


def _value(table: PairTable, protocol: str, averaging: str, dataset_threshold: str = "bbox") -> float:
    p = get_protocol(protocol)
    return table.counts(p.threshold_base(dataset_threshold), p.inequality, p.alpha).values()[averaging]


def test_each_protocol_reproduces_its_codes_formula():
    gts: list = []
    acc = _random_accumulator(120, seed=4, gts=gts)
    table, pairs = PairTable(acc.pairs), acc.pairs
    alpha = 0.1
    bbox = [p.lengths["bbox"] for p in pairs]
    dists = [p.distances for p in pairs]

    # DHF archs/correspondence_utils.py compute_pck: `distances <= pck_threshold * max(w, h)` of the
    # bbox per pair, concatenated over pairs, `.sum() / len(...)` (train_hyperfeatures.py validate)
    flat = np.concatenate([d <= alpha * b for d, b in zip(dists, bbox)])
    assert _value(table, "dhf", "per_point") == pytest.approx(flat.sum() / len(flat))

    # DIFT eval_spair.py: `if (dist / threshold) <= 0.1: correct += 1`; per pair
    # `cat_pck.append(correct / total)`, `total_pck.extend(cat_pck)`, "All per image" = np.mean(total_pck);
    # "All per point" = all_correct / all_total
    per_pair = [np.sum(d / b <= 0.1) / len(d) for d, b in zip(dists, bbox)]
    assert _value(table, "dift", "per_image") == pytest.approx(np.mean(per_pair))
    assert _value(table, "dift", "per_point") == pytest.approx(flat.sum() / len(flat))

    # SD+DINO pck_spair_pascal.py: per category `correct = err < threshold` over the category's
    # points, `correct.sum() / len(...)` -> pcks; "Average PCK" = np.average(pcks), "Weighted" =
    # np.average(pcks, weights=pairs per category)
    cats = sorted({p.category for p in pairs})
    pcks, weights = [], []
    for c in cats:
        members = [i for i, p in enumerate(pairs) if p.category == c]
        err = np.concatenate([dists[i] for i in members])
        thr = np.concatenate([np.full(len(dists[i]), alpha * bbox[i]) for i in members])
        pcks.append(np.sum(err < thr) / len(err))
        weights.append(len(members))
    assert _value(table, "sd-dino", "per_category_per_point") == pytest.approx(np.average(pcks))
    assert _value(table, "sd-dino", "per_category_weighted") == pytest.approx(np.average(pcks, weights=weights))

    # GeoAware-SC pck_train.py: `(err < alpha * bbox_size).float().mean(dim=-1)` per pair, averaged per
    # category, categories weighted by their pairs (`np.average(pcks, weights=img_correct counts)`)
    cat_means, counts = [], []
    for c in cats:
        vals = [np.mean(dists[i] < alpha * bbox[i]) for i, p in enumerate(pairs) if p.category == c]
        cat_means.append(np.mean(vals))
        counts.append(len(vals))
    assert _value(table, "geoaware", "per_image") == pytest.approx(np.average(cat_means, weights=counts))

    # HPF model/evaluation.py: `correct_pts = torch.le(l2dist, thres * alpha)`, pair pck = ncorrect /
    # npts, mean over pairs; thres per benchmark: PF-PASCAL the image's max(H, W), PF-WILLOW the
    # keypoint box max(x_max - x_min, y_max - y_min)
    img = [p.lengths["img"] for p in pairs]
    assert _value(table, "hpf", "per_image", "img") == pytest.approx(
        np.mean([np.mean(d <= alpha * L) for d, L in zip(dists, img)]))
    kps_box = [max(np.ptp(g[:, 0]), np.ptp(g[:, 1])) for g in gts]
    kept = [(d, L) for d, L in zip(dists, kps_box) if L > 0]
    assert _value(table, "hpf", "per_image", "kps") == pytest.approx(np.mean([np.mean(d <= alpha * L) for d, L in kept]))


def test_bootstrap_intervals_contain_the_estimate_shrink_with_pairs_and_repeat():
    small = headline_tables(PairTable(_random_accumulator(40, seed=1).pairs), "bbox", "<=", 0.1, ("per_point",))
    large = headline_tables(PairTable(_random_accumulator(640, seed=1).pairs), "bbox", "<=", 0.1, ("per_point",))
    for tables in (small, large):
        row = tables["headline"][0]
        lo, hi = row["ci95"]
        assert lo <= row["value"] <= hi and lo < hi
    width = lambda t: t["headline"][0]["ci95"][1] - t["headline"][0]["ci95"][0]  # noqa: E731
    assert width(large) < width(small) / 2.5  # ~1/sqrt(16) of the width
    again = headline_tables(PairTable(_random_accumulator(40, seed=1).pairs), "bbox", "<=", 0.1, ("per_point",))
    assert again == small  # seeded: the same interval every time
    other = headline_tables(PairTable(_random_accumulator(40, seed=1).pairs), "bbox", "<=", 0.1, ("per_point",), seed=7)
    assert other["headline"][0]["ci95"] != small["headline"][0]["ci95"]


def test_breakdowns_by_category_and_flag_add_up():
    acc = _random_accumulator(90, seed=2)
    table = PairTable(acc.pairs)
    tables = headline_tables(table, "bbox", "<=", 0.1, ("per_point",), resamples=200)
    assert set(tables["categories"]) == {"bus", "cat", "dog"}
    assert sum(c["n_pairs"] for c in tables["categories"].values()) == 90
    occ = tables["flags"]["occlusion"]
    assert set(occ) == {"0", "1"} and occ["0"]["n_pairs"] + occ["1"]["n_pairs"] == 90
    # pooled per point: the flag subsets' correct points add up to the whole
    total = tables["headline"][0]["value"] * tables["headline"][0]["n_points"]
    assert sum(v["value"] * v["n_points"] for v in occ.values()) == pytest.approx(total)
    for entry in (*tables["categories"].values(), *occ.values()):
        lo, hi = entry["ci95"]
        assert lo <= entry["value"] <= hi


def test_bootstrap_weights_are_resamples_of_the_pairs():
    w = bootstrap_weights(50, resamples=30, seed=3)
    assert w.shape == (30, 50) and (w.sum(1) == 50).all() and (w >= 0).all()
    assert interval(np.array([np.nan, np.nan])) is None


def test_protocols_are_named_after_code_and_unknown_ones_refused():
    assert set(PROTOCOLS) == {"dhf", "dift", "sd-dino", "geoaware", "hpf"}
    assert all("/" in p.code for p in PROTOCOLS.values())
    with pytest.raises(UsageError, match="--protocol 'pck'"):
        get_protocol("pck")
