"""PCK on hand-computed cases: thresholds, the inclusive boundary, each averaging, degenerate input."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from dhf_cache.datasets.base import PairRecord
from dhf_cache.errors import UsageError
from dhf_cache.correspondence.pck import PCKAccumulator, bbox_length, image_length

# target image 400 x 300, box 200 x 100: L_bbox = 200, L_img = 400
SIZE = (400, 300)
BOX = (100, 50, 300, 150)


def offsets(*distances: float) -> tuple[np.ndarray, np.ndarray]:
    """gt points in the box and predictions at the given distances (3-4-5 triangles: exact)."""
    gt = np.array([[150.0, 100.0]] * len(distances))
    pred = gt + np.array([[0.6 * d, 0.8 * d] for d in distances])
    return pred, gt


def test_bbox_and_image_thresholds_per_alpha():
    acc = PCKAccumulator()
    pred, gt = offsets(10, 20, 25, 35, 50)
    acc.add("p", "cat", pred, gt, BOX, SIZE)
    s = acc.summary()
    # bbox: thresholds 10, 20, 30; img: 20, 40, 60
    assert s["bbox@0.05"]["per_point"] == pytest.approx(1 / 5)
    assert s["bbox@0.1"]["per_point"] == pytest.approx(2 / 5)
    assert s["bbox@0.15"]["per_point"] == pytest.approx(3 / 5)
    assert s["img@0.05"]["per_point"] == pytest.approx(2 / 5)
    assert s["img@0.1"]["per_point"] == pytest.approx(4 / 5)
    assert s["img@0.15"]["per_point"] == pytest.approx(5 / 5)


def test_boundary_is_inclusive():
    acc = PCKAccumulator(alphas=[0.1])
    threshold = 0.1 * 200  # bbox max side 200
    beyond = np.nextafter(threshold, np.inf)
    gt = np.zeros((2, 2))  # at the origin, so the distance is the offset itself, exactly
    pred = np.array([[0.0, threshold], [0.0, beyond]])
    acc.add("p", "cat", pred, gt, BOX, SIZE)
    assert acc.summary()["bbox@0.1"]["per_point"] == 0.5  # exactly alpha*L is correct, one ulp more is not


def test_threshold_lengths():
    assert bbox_length((10, 20, 60, 220)) == 200
    assert bbox_length((10, 20, 10, 120)) == 100  # zero width, usable: the max side counts
    assert bbox_length((10, 20, 10, 20)) is None
    assert bbox_length((10, 20, 5, 120)) is None  # x2 < x1
    assert bbox_length((10, math.nan, 50, 120)) is None
    assert image_length((500, 375)) == 500
    assert image_length((0, 375)) is None


def test_averagings_differ_on_a_constructed_example():
    acc = PCKAccumulator(alphas=[0.1])
    # cat: A 4/4 correct, B 0/1; dog: C 1/4 (bbox threshold 20)
    acc.add("A", "cat", *offsets(1, 2, 3, 4), BOX, SIZE)
    acc.add("B", "cat", *offsets(30), BOX, SIZE)
    acc.add("C", "dog", *offsets(5, 30, 30, 30), BOX, SIZE)
    s = acc.summary()["bbox@0.1"]
    assert s["per_point"] == pytest.approx(5 / 9)  # (4 + 0 + 1) / 9
    assert s["per_image"] == pytest.approx((1 + 0 + 0.25) / 3)
    assert s["per_category_mean"] == pytest.approx((4 / 5 + 1 / 4) / 2)
    cats = acc.summary()["categories"]
    assert cats["cat"]["bbox@0.1"]["per_point"] == pytest.approx(4 / 5)
    assert cats["cat"]["bbox@0.1"]["per_image"] == pytest.approx(0.5)
    assert cats["dog"]["bbox@0.1"]["per_point"] == pytest.approx(1 / 4)
    assert cats["dog"]["n_pairs"] == 1 and cats["cat"]["n_points"] == 5


def test_degenerate_inputs_are_counted_not_raised():
    acc = PCKAccumulator(alphas=[0.1])
    acc.add("empty", "cat", np.zeros((0, 2)), np.zeros((0, 2)), BOX, SIZE)
    pred, gt = offsets(1, 1, 1)
    gt[1] = np.nan  # dropped
    pred[2] = np.nan  # counted wrong
    acc.add("nan", "cat", pred, gt, BOX, SIZE)
    acc.add("zero-box", "cat", *offsets(1, 100), (5, 5, 5, 5), SIZE)  # img only
    acc.add("line-box", "cat", *offsets(1, 45), (100, 50, 100, 550), SIZE)  # L_bbox 500: 45 px is within 0.1 * 500
    acc.add("no-size", "cat", *offsets(1), BOX, (0, 0))  # bbox only
    out_gt = np.array([[-5.0, 10.0], [410.0, 10.0]])
    acc.add("outside", "cat", out_gt + [1.0, 0.0], out_gt, BOX, SIZE)  # evaluated as is
    s = acc.summary()
    assert s["skipped"] == {
        "empty_pairs": 1, "invalid_gt_points": 1, "invalid_pred_points": 1, "gt_outside_image": 2,
        "pred_outside_image": 2, "invalid_bbox_pairs": 1, "invalid_size_pairs": 1,
    }
    assert s["n_pairs"] == 6 and s["n_points"] == 2 + 2 + 2 + 1 + 2
    # bbox: nan 1/2, line-box 2/2 (threshold 50), no-size 1/1, outside 2/2
    assert s["bbox@0.1"]["n_pairs"] == 4 and s["bbox@0.1"]["n_points"] == 7
    assert s["bbox@0.1"]["per_point"] == pytest.approx(6 / 7)
    # img (threshold 40): nan 1/2, zero-box 1/2, line-box 1/2, outside 2/2
    assert s["img@0.1"]["n_points"] == 8
    assert s["img@0.1"]["per_point"] == pytest.approx(5 / 8)
    json.dumps(s)  # plain types only


def test_empty_accumulator_gives_none_not_nan():
    s = PCKAccumulator().summary()
    assert s["bbox@0.1"]["per_point"] is None and s["img@0.05"]["per_category_mean"] is None
    assert s["n_pairs"] == 0 and s["categories"] == {}


def test_bad_input_raises():
    acc = PCKAccumulator()
    acc.add("p", "cat", *offsets(1), BOX, SIZE)
    with pytest.raises(ValueError, match="added twice"):
        acc.add("p", "cat", *offsets(1), BOX, SIZE)
    with pytest.raises(ValueError, match="predictions"):
        acc.add("q", "cat", np.zeros((2, 2)), np.zeros((3, 2)), BOX, SIZE)
    with pytest.raises(UsageError):
        PCKAccumulator(alphas=[0.1, -1])


def test_merge_equals_one_accumulator_and_records_work():
    rng = np.random.default_rng(0)
    pairs = []
    for i in range(6):
        gt = rng.uniform(0, 300, size=(5, 2))
        pairs.append(PairRecord(f"{i}-a-b:{'cat' if i % 2 else 'dog'}", "cat" if i % 2 else "dog", "a", "b",
                                gt, gt, BOX, BOX, SIZE, SIZE))
    preds = [p.trg_kps + rng.normal(0, 30, size=(5, 2)) for p in pairs]
    whole, left, right = PCKAccumulator(), PCKAccumulator(), PCKAccumulator()
    for i, (pair, pred) in enumerate(zip(pairs, preds)):
        whole.add_record(pair, pred)
        (left if i < 3 else right).add_record(pair, pred)
    left.merge(right)
    assert left.summary() == whole.summary()
    # per point = Ref's pooled mean of `distance <= alpha * max(bbox side)`
    dist = np.concatenate([np.linalg.norm(p - r.trg_kps, axis=1) for p, r in zip(preds, pairs)])
    assert whole.summary()["bbox@0.1"]["per_point"] == pytest.approx(np.mean(dist <= 20))
