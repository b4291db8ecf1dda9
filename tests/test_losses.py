"""The training loss and the keypoint rescaling, on cases computed by hand from the formula."""

from __future__ import annotations

import inspect
import math

import pytest
import torch

from dhf_cache.errors import UsageError
from dhf_cache.aggregator.losses import grid_keypoints, symmetric_ce_loss


def desc_from_polar(angles_deg, norms, h=2, w=2):
    """(2, h, w) descriptors; pixel at flat index y * w + x gets the i-th 2-d vector."""
    vecs = [[n * math.cos(math.radians(a)), n * math.sin(math.radians(a))] for a, n in zip(angles_deg, norms)]
    return torch.tensor(vecs, dtype=torch.float64).t().reshape(2, h, w)


def ce(cosines, label, temperature=0.07):
    """-log softmax(cos / T)[label], written out."""
    logits = [c / temperature for c in cosines]
    return math.log(sum(math.exp(z) for z in logits)) - logits[label]


def test_grid_keypoints_scale_clip_round():
    kps = [[100, 50], [0, 0], [199.9, 99.9], [-3, 5], [50, 25.2], [150, 75]]
    got = grid_keypoints(kps, image_size=(200, 100), grid=64)
    # x * 64/200, y * 64/100, clipped to [0, 63], rounded; the last one tells 64/W from 63/W
    # (150 * 63/200 = 47.25), which the others cannot (dev/method_mutations.py: kps.scale)
    assert got.dtype == torch.long
    assert got.tolist() == [[32, 32], [0, 0], [63, 63], [0, 3], [16, 16], [48, 48]]


def test_grid_keypoints_round_half_to_even_as_numpy():
    # W = H = 128 -> factor 0.5: x = 5 -> 2.5 -> 2, 7 -> 3.5 -> 4, 9 -> 4.5 -> 4, 11 -> 5.5 -> 6
    got = grid_keypoints([[5, 7], [9, 11]], image_size=(128, 128), grid=64)
    assert got.tolist() == [[2, 4], [4, 6]]


def test_grid_keypoints_non_square_grid_and_bad_input():
    assert grid_keypoints([[10, 10]], image_size=(20, 40), grid=(8, 16)).tolist() == [[4, 4]]
    with pytest.raises(UsageError, match="\\(K, 2\\)"):
        grid_keypoints([1, 2, 3], image_size=(10, 10))


def test_loss_hand_case_symmetric():
    # src pixels at 0, 90, 180, 270 degrees; target the same; one keypoint: src idx 0 <-> trg idx 1
    src = desc_from_polar([0, 90, 180, 270], [1, 1, 1, 1])
    trg = desc_from_polar([0, 90, 180, 270], [2, 3, 0.5, 1])  # norms must not matter
    src_kp = torch.tensor([[0, 0]])  # [x, y] -> flat 0
    trg_kp = torch.tensor([[1, 0]])  # flat 1
    # src->trg logits: cos(0 - [0, 90, 180, 270]) / T = [s, 0, -s, 0], label 1 -> log(e^s + 2 + e^-s)
    # trg->src logits: cos(90 - [...]) / T = [0, s, 0, -s], label 0 -> the same; mean of both:
    s = 1 / 0.07
    expected = 2 * math.log(2 * math.cosh(s / 2))
    loss = symmetric_ce_loss(src, trg, src_kp, trg_kp)
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    assert expected == pytest.approx(14.2857155, abs=1e-6)


def test_loss_hand_case_asymmetric_two_keypoints():
    a_src, a_trg = [0, 90, 180, 45], [30, 90, 200, 300]
    src = desc_from_polar(a_src, [1, 2, 0.5, 3])
    trg = desc_from_polar(a_trg, [2, 1, 1, 4])
    # keypoint 0: src (x1, y0) = flat 1 <-> trg (x0, y1) = flat 2
    # keypoint 1: src (x1, y1) = flat 3 <-> trg (x1, y0) = flat 1
    src_kp = torch.tensor([[1, 0], [1, 1]])
    trg_kp = torch.tensor([[0, 1], [1, 0]])
    cos = lambda a, b: math.cos(math.radians(a - b))  # noqa: E731 - cosine of unit 2-d vectors
    src_to_trg = (ce([cos(90, b) for b in a_trg], 2) + ce([cos(45, b) for b in a_trg], 1)) / 2
    trg_to_src = (ce([cos(200, b) for b in a_src], 1) + ce([cos(90, b) for b in a_src], 3)) / 2
    expected = (src_to_trg + trg_to_src) / 2
    assert src_to_trg != pytest.approx(trg_to_src)  # both directions really differ here
    loss = symmetric_ce_loss(src, trg, src_kp, trg_kp)
    assert loss.item() == pytest.approx(expected, rel=1e-10)


def test_temperature_is_fixed_at_0_07():
    assert inspect.signature(symmetric_ce_loss).parameters["temperature"].default == 0.07
    gen = torch.Generator().manual_seed(0)
    src, trg = torch.randn(8, 4, 4, generator=gen), torch.randn(8, 4, 4, generator=gen)
    kp_s, kp_t = torch.tensor([[0, 1], [3, 2]]), torch.tensor([[2, 2], [1, 0]])
    default = symmetric_ce_loss(src, trg, kp_s, kp_t)
    assert default.item() == pytest.approx(symmetric_ce_loss(src, trg, kp_s, kp_t, temperature=0.07).item())
    assert default.item() != pytest.approx(symmetric_ce_loss(src, trg, kp_s, kp_t, temperature=0.1).item())


def test_gradient_reaches_both_descriptor_maps():
    gen = torch.Generator().manual_seed(1)
    src = torch.randn(16, 8, 8, generator=gen, requires_grad=True)
    trg = torch.randn(16, 8, 8, generator=gen, requires_grad=True)
    loss = symmetric_ce_loss(src, trg, torch.tensor([[1, 2], [7, 7], [0, 5]]), torch.tensor([[3, 3], [6, 0], [2, 4]]))
    loss.backward()
    for g in (src.grad, trg.grad):
        assert torch.isfinite(g).all() and g.abs().sum() > 0


def test_loss_rejects_keypoints_off_the_grid():
    src = trg = torch.randn(4, 2, 2)
    with pytest.raises(UsageError, match="outside the 2x2"):
        symmetric_ce_loss(src, trg, torch.tensor([[2, 0]]), torch.tensor([[0, 0]]))
    with pytest.raises(UsageError, match="temperature"):
        symmetric_ce_loss(src, trg, torch.tensor([[0, 0]]), torch.tensor([[0, 0]]), temperature=0)
