"""The DDIM inversion of METHOD.md: timesteps, step indices, and the update where it is exact."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from dhf_cache.config import SD15_SAVE_STEPS, FeatureSpace, Preprocessing, SchedulerSpec, default_save_steps
from dhf_cache.sources.sd.extract import FeatureExtractor
from dhf_cache.sources.sd.inversion import ddim_inversion_step, make_schedule


def test_fifty_step_schedule_calls_unet_at_minus_one_then_every_twenty():
    s = make_schedule(SchedulerSpec(), 50)
    assert s.call_timesteps == (-1, *range(0, 961, 20))
    assert s.next_timesteps == tuple(range(0, 981, 20))
    assert s.steps == 50


def test_saved_indices_are_the_papers_timesteps_clean_first():
    s = make_schedule(SchedulerSpec(), 50)
    assert SD15_SAVE_STEPS == (49, 45, 40, 35, 30, 25, 20, 15, 10, 5, 0)
    assert [s.timestep_of_step(i) for i in SD15_SAVE_STEPS] == [-1, 60, 160, 260, 360, 460, 560, 660, 760, 860, 960]
    assert default_save_steps(50) == SD15_SAVE_STEPS


def test_scheduler_is_scaled_linear_with_the_reference_betas():
    s = make_schedule(SchedulerSpec(), 50)
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    alphas = torch.cumprod(1 - betas, 0)
    assert s.alpha(-1) == 1.0
    for t in (0, 20, 500, 980, 999):
        assert s.alpha(t) == pytest.approx(float(alphas[t]), rel=1e-6)


def test_one_step_variant_is_a_single_call_at_minus_one():
    s = make_schedule(SchedulerSpec(), 1)
    assert s.call_timesteps == (-1,)
    assert s.timestep_of_step(0) == -1
    assert default_save_steps(1) == (0,)


def test_default_save_steps_for_other_step_counts_are_clean_first_and_in_range():
    steps = default_save_steps(20)
    assert steps[0] == 19 and steps[-1] == 0 and list(steps) == sorted(steps, reverse=True)
    assert len(steps) == 11


def test_ddim_step_formula():
    x, eps = torch.tensor([0.3, -1.2]), torch.tensor([0.5, 0.25])
    a_t, a_next = 0.9, 0.6
    x0 = (x - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
    expected = math.sqrt(a_next) * x0 + math.sqrt(1 - a_next) * eps
    assert torch.allclose(ddim_inversion_step(x, eps, a_t, a_next), expected)
    # at t = -1 (a = 1) the clean latent is x0 itself
    assert torch.allclose(ddim_inversion_step(x, eps, 1.0, a_next), math.sqrt(a_next) * x + math.sqrt(1 - a_next) * eps)


def _recording_extractor(backbone, steps, save_steps, zero_eps=False):
    backbone = copy.deepcopy(backbone)
    if zero_eps:  # a real UNet whose noise prediction is exactly zero
        torch.nn.init.zeros_(backbone.unet.conv_out.weight)
        torch.nn.init.zeros_(backbone.unet.conv_out.bias)
    space = FeatureSpace(model=backbone.identity, steps=steps, save_steps=save_steps,
                         layers=("up_blocks.3.resnets.2",))
    ex = FeatureExtractor(backbone, space, Preprocessing(load_size=64, image_size=64), "cpu", torch.float32)
    calls = []

    def pre_hook(_module, args, kwargs):
        sample = args[0] if args else kwargs["sample"]
        t = args[1] if len(args) > 1 else kwargs["timestep"]
        calls.append((int(torch.as_tensor(t).reshape(-1)[0]), sample.detach().clone()))

    backbone.unet.register_forward_pre_hook(pre_hook, with_kwargs=True)
    return ex, calls


def test_unet_is_called_at_the_inversion_timesteps_in_order(tiny_backbone):
    ex, calls = _recording_extractor(tiny_backbone, 50, SD15_SAVE_STEPS)
    ex.invert(torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)))
    assert [t for t, _ in calls] == [-1, *range(0, 961, 20)]


def test_inversion_stops_after_the_last_saved_call(tiny_backbone):
    ex, calls = _recording_extractor(tiny_backbone, 50, (49, 45))
    ex.invert(torch.randn(1, 4, 8, 8))
    assert [t for t, _ in calls] == [-1, 0, 20, 40, 60]


def test_inversion_with_zero_noise_prediction_scales_the_latent_exactly(tiny_backbone):
    """eps = 0 makes each step x_next = sqrt(a_next / a_t) x, so the call at t sees sqrt(a_t) x0."""
    ex, calls = _recording_extractor(tiny_backbone, 50, SD15_SAVE_STEPS, zero_eps=True)
    x0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    ex.invert(x0)
    schedule = ex.schedule
    assert len(calls) == 50
    assert torch.equal(calls[0][1], x0)  # the first call sees the clean latent at t = -1
    for t, sample in calls[1:]:
        expected = math.sqrt(schedule.alpha(t)) * x0
        assert torch.allclose(sample, expected, rtol=1e-5, atol=1e-6), t
