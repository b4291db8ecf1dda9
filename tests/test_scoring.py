"""score_pairs batches every keypoint of a target's pairs; it must give match_points' answers."""

from __future__ import annotations

import numpy as np
import torch

from dhf_cache.datasets import PairRecord
from dhf_cache.correspondence.matching import WindowSoftArgmax, match_points
from dhf_cache.correspondence.scoring import keypoints_per_chunk, score_pairs


def _pairs(rng, ids, n_pairs, n_kps):
    pairs = []
    for j in range(n_pairs):
        src, trg = rng.choice(ids, size=2, replace=False)
        kps = rng.uniform(0, 90, size=(n_kps, 2))
        kps[0] = np.nan  # an invisible keypoint stays NaN
        pairs.append(PairRecord(name=f"p{j}", category="c", src=str(src), trg=str(trg), src_kps=kps,
                                trg_kps=kps[:, ::-1].copy(), src_bbox=(0.0, 0.0, 99.0, 79.0),
                                trg_bbox=(0.0, 0.0, 119.0, 89.0), src_size=(100, 80), trg_size=(120, 90)))
    return pairs


def test_batched_scoring_equals_per_pair_matching():
    rng = np.random.default_rng(0)
    maps = {f"im{i}": torch.from_numpy(rng.standard_normal((16, 12, 10)).astype(np.float32)).relu() for i in range(5)}
    # more keypoints per target than one chunk, so chunk boundaries are crossed
    pairs = _pairs(rng, list(maps), 12, keypoints_per_chunk(56) // 2 + 1)
    for refine in (None, WindowSoftArgmax()):
        _, got = score_pairs(pairs, maps.__getitem__, 56, refine=refine)
        for pair, pred in zip(pairs, got):
            want = match_points(maps[pair.src], maps[pair.trg], pair.src_kps, pair.src_size, pair.trg_size, 56, refine)
            np.testing.assert_allclose(pred, want, rtol=0, atol=1e-4)
            assert np.isnan(pred[0]).all()
    # match_points against METHOD.md's plain protocol (up to float near-ties): tests/test_matching.py


def test_scoring_does_not_depend_on_workers():
    rng = np.random.default_rng(1)
    maps = {f"im{i}": torch.from_numpy(rng.standard_normal((32, 16, 16)).astype(np.float32)).relu() for i in range(6)}
    pairs = _pairs(rng, list(maps), 30, 9)
    calls = []

    def provider(image_id):
        calls.append(image_id)
        return maps[image_id]

    serial_acc, serial = score_pairs(pairs, provider, 64, alphas=(0.1,), workers=1)
    threads_before = torch.get_num_threads()
    parallel_acc, parallel = score_pairs(pairs, provider, 64, alphas=(0.1,), workers=3)
    assert torch.get_num_threads() == threads_before
    for a, b in zip(serial, parallel):
        np.testing.assert_array_equal(a, b)
    assert serial_acc.summary() == parallel_acc.summary()
    # one call per target and one per pair's source, in both runs
    assert len(calls) == 2 * (len({p.trg for p in pairs}) + len(pairs))


def test_batched_scoring_equals_per_pair_matching_at_every_grid():
    """--match-at original (DIFT) and square (SD+DINO): each image on its own grid."""
    rng = np.random.default_rng(3)
    maps = {f"im{i}": torch.from_numpy(rng.standard_normal((16, 12, 10)).astype(np.float32)).relu() for i in range(4)}
    pairs = _pairs(rng, list(maps), 6, 5)
    for match_at in ("original", "square"):
        _, got = score_pairs(pairs, maps.__getitem__, 56, match_at=match_at)
        for pair, pred in zip(pairs, got):
            want = match_points(maps[pair.src], maps[pair.trg], pair.src_kps, pair.src_size, pair.trg_size, 56,
                                match_at=match_at)
            np.testing.assert_allclose(pred, want, rtol=0, atol=1e-4)
