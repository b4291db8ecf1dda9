"""Matching: coordinate mapping, the fast path against the plain protocol, known answers, refinement."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dhf_cache.errors import UsageError
from dhf_cache.correspondence.matching import (
    WindowSoftArgmax,
    first_argmax,
    from_load,
    match_load_points,
    match_points,
    match_points_reference,
    parse_refine,
    prepare_target,
    rescale_points,
    source_pixels,
    to_load,
    window_soft_argmax,
)


def rand_map(seed: int, p: int = 24, h: int = 12, w: int | None = None) -> torch.Tensor:
    return torch.randn(p, h, w or h, generator=torch.Generator().manual_seed(seed))


def test_rescale_round_trip_is_exact():
    pts = np.random.default_rng(0).uniform(0, 500, size=(50, 2))
    for size in [(500, 375), (333, 500), (224, 224)]:
        for load in (64, 224, 512):
            back = from_load(to_load(pts, size, load), load, size)
            np.testing.assert_allclose(back, pts, rtol=0, atol=1e-9)
    np.testing.assert_array_equal(rescale_points([[100.0, 30.0]], (200, 60), (50, 120)), [[25.0, 60.0]])
    assert rescale_points(np.zeros((0, 2)), (10, 10), (5, 5)).shape == (0, 2)


def test_source_pixels_clip_then_round_half_to_even():
    load = np.array([[2.5, 3.5], [-4.0, 40.2], [0.49, 38.51]])
    np.testing.assert_array_equal(source_pixels(load, 40), [[2, 4], [0, 39], [0, 39]])


@pytest.mark.parametrize("h,load", [(12, 37), (16, 56), (8, 8)])
def test_prepared_norm_map_equals_upsampled_norm(h, load):
    t = rand_map(1, h=h)
    up = F.interpolate(t[None], size=(load, load), mode="bilinear", align_corners=False)[0].norm(dim=0)
    torch.testing.assert_close(1 / prepare_target(t, load).inv_norm, up, rtol=2e-6, atol=0)


def reference_sim_at(src, trg, kp, src_size, load, xy_trg_load):
    """Cosine similarity of Ref's upsampled maps, at integer target load pixels."""
    up_s = F.interpolate(src[None].float(), size=(load, load), mode="bilinear")[0]
    up_t = F.interpolate(trg[None].float(), size=(load, load), mode="bilinear")[0]
    x, y = source_pixels(to_load(kp[None], src_size, load), load)[0]
    s = up_s[:, y, x] / up_s[:, y, x].norm()
    t = up_t[:, xy_trg_load[1], xy_trg_load[0]]
    return float(s @ t / t.norm())


@pytest.mark.parametrize("h,w,load,dtype", [(12, 12, 37, torch.float32), (16, 16, 56, torch.float16),
                                            (10, 14, 40, torch.float32), (8, 8, 8, torch.float32)])
def test_fast_matches_reference(h, w, load, dtype):
    src, trg = rand_map(2, h=h, w=w).to(dtype), rand_map(3, h=h, w=w).to(dtype)
    src_size, trg_size = (300, 200), (250, 410)
    kps = np.random.default_rng(1).uniform(-10, 310, size=(40, 2))  # includes points outside the image
    ref = match_points_reference(src, trg, kps, src_size, trg_size, load)
    fast = match_points(src, prepare_target(trg, load), kps, src_size, trg_size, load)
    differ = np.nonzero(np.abs(ref - fast).max(axis=1) > 1e-9)[0]
    assert len(differ) <= 4, f"{len(differ)} of 40 predictions differ"
    # only where exact arithmetic ties (e.g. pixels past the last cell centre share one
    # descriptor) and float rounding picks a different one of the tied pixels
    for i in differ:
        a, b = (np.round(to_load(p[i:i + 1], trg_size, load)[0]).astype(int) for p in (ref, fast))
        sim_a, sim_b = (reference_sim_at(src, trg, kps[i], src_size, load, xy) for xy in (a, b))
        assert sim_a == pytest.approx(sim_b, abs=2e-6)


def test_shifted_copy_gives_exact_predictions():
    # target = source moved 3 cells right and 2 down; at 4x upsampling that is 12 and 8 load pixels
    src = rand_map(4, p=16, h=16)
    trg = rand_map(5, p=16, h=16)
    trg[:, 2:, 3:] = src[:, :-2, :-3]
    load, src_size, trg_size = 64, (320, 240), (160, 480)
    load_px = np.array([[20, 20], [30, 41], [45, 33], [44, 50]])  # away from the borders, also after the shift
    kps = from_load(load_px, load, src_size)
    expected = from_load(load_px + [12, 8], load, trg_size)
    for matcher in (match_points_reference, match_points):
        np.testing.assert_allclose(matcher(src, trg, kps, src_size, trg_size, load), expected, atol=1e-9)
    xy, score = match_load_points(src, prepare_target(trg, load), load_px)
    np.testing.assert_array_equal(xy.numpy(), load_px + [12, 8])
    torch.testing.assert_close(score, torch.ones(4), rtol=0, atol=1e-5)


def test_prepared_inputs_reused_and_checked():
    src, trg = rand_map(6), rand_map(7)
    kps = np.random.default_rng(2).uniform(0, 100, size=(5, 2))
    ps, pt = prepare_target(src, 30), prepare_target(trg, 30)
    raw = match_points(src, trg, kps, (100, 100), (100, 100), 30)
    np.testing.assert_array_equal(match_points(ps, pt, kps, (100, 100), (100, 100), 30), raw)
    with pytest.raises(ValueError, match="prepared for grid"):
        match_points(src, pt, kps, (100, 100), (100, 100), 40)
    with pytest.raises(ValueError, match="channels"):
        match_points(rand_map(8, p=5), pt, kps, (100, 100), (100, 100), 30)


def test_nan_and_empty_keypoints():
    src, trg = rand_map(9), rand_map(10)
    kps = np.array([[10.0, 10.0], [np.nan, 5.0]])
    for matcher in (match_points_reference, match_points):
        out = matcher(src, trg, kps, (50, 50), (80, 60), 24)
        assert np.isfinite(out[0]).all() and np.isnan(out[1]).all()
        assert matcher(src, trg, np.zeros((0, 2)), (50, 50), (80, 60), 24).shape == (0, 2)


def test_first_argmax_equals_flat_argmax_with_ties_and_nan():
    gen = torch.Generator().manual_seed(0)
    sim = torch.randint(0, 4, (64, 9, 7), generator=gen).float()  # many exact ties per map
    sim[3] = 0.0
    sim[5, 2, 1] = sim[5, 6, 0] = 9.0  # the earlier row wins, though its column is later
    sim[7, 4, 2], sim[7, 8, 6] = float("nan"), float("nan")  # NaN counts as the maximum, first one
    sim[9] = -float("inf")
    want = sim.reshape(64, -1).argmax(dim=1)
    torch.testing.assert_close(first_argmax(sim), want, rtol=0, atol=0)
    assert first_argmax(sim)[[3, 5, 7, 9]].tolist() == [0, 2 * 7 + 1, 4 * 7 + 2, 0]
    assert first_argmax(sim[:0]).shape == (0,)


def test_window_soft_argmax_finds_subpixel_peak():
    ys, xs = torch.meshgrid(torch.arange(40.0), torch.arange(40.0), indexing="ij")
    x0, y0 = 10.3, 20.7
    sim = 1 - 0.01 * ((xs - x0) ** 2 + (ys - y0) ** 2)  # softmax(sim / 0.02): a Gaussian of sigma 1
    hard = window_soft_argmax(sim[None], radius=0)
    assert hard.tolist() == [[10.0, 21.0]]
    soft = window_soft_argmax(sim[None], radius=6, beta=0.02)
    torch.testing.assert_close(soft, torch.tensor([[x0, y0]]), rtol=0, atol=1e-3)
    corner = window_soft_argmax((-(xs ** 2 + ys ** 2))[None], radius=5)  # window cut by the border
    assert torch.isfinite(corner).all() and (corner >= 0).all()


def test_refine_option_in_matching():
    src, trg = rand_map(11), rand_map(12)
    kps = np.random.default_rng(3).uniform(0, 100, size=(6, 2))
    args = (kps, (100, 100), (90, 120), 36)
    hard = match_points(src, trg, *args)
    soft = match_points(src, trg, *args, refine=WindowSoftArgmax())
    np.testing.assert_allclose(soft, match_points_reference(src, trg, *args, refine=WindowSoftArgmax()), atol=1e-3)
    assert not np.allclose(soft, hard)
    np.testing.assert_allclose(match_points(src, trg, *args, refine=WindowSoftArgmax(half_window=0)), hard)
    assert parse_refine("none") is None and parse_refine("window-softargmax") == WindowSoftArgmax()
    with pytest.raises(UsageError, match="--refine"):
        parse_refine("softmax")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fast_matches_reference_on_cuda():
    src, trg = rand_map(13).cuda().half(), rand_map(14).cuda().half()
    kps = np.random.default_rng(4).uniform(0, 100, size=(20, 2))
    ref = match_points_reference(src, trg, kps, (100, 100), (100, 100), 40)
    fast = match_points(src, trg, kps, (100, 100), (100, 100), 40)
    assert (np.abs(ref - fast).max(axis=1) > 1e-9).sum() <= 1
    np.testing.assert_allclose(match_points(src.cpu(), trg.cpu(), kps, (100, 100), (100, 100), 40), fast)


@pytest.mark.parametrize("match_at", ["original", "square"])
def test_other_grids_equal_the_plain_protocol_on_that_grid(match_at):
    """DIFT matches at each image's own size, SD+DINO in the aspect-preserving square: the fast
    path equals the plain upsample-everything protocol on those grids too."""
    from dhf_cache.correspondence.matching import match_grid

    src, trg = rand_map(11, h=12, w=10), rand_map(12, h=9, w=12)
    kps = np.random.default_rng(5).uniform(0, 60, size=(12, 2))
    src_size, trg_size = (61, 75), (90, 67)
    assert match_grid("original", 40, trg_size) == (90, 67)
    assert match_grid("square", 40, trg_size) == (40, 30) and match_grid("square", 40, src_size) == (33, 40)
    fast = match_points(src, trg, kps, src_size, trg_size, 40, match_at=match_at)
    plain = match_points_reference(src, trg, kps, src_size, trg_size, 40, match_at=match_at)
    np.testing.assert_allclose(fast, plain, rtol=0, atol=1e-6)
    # a different grid really gives other predictions than the load square
    assert not np.allclose(fast, match_points(src, trg, kps, src_size, trg_size, 40))
