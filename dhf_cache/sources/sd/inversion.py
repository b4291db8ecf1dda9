"""Deterministic DDIM inversion, written out as in the reference (METHOD.md, Inversion).

The schedule comes from a real diffusers `DDIMScheduler` (its timesteps and cumulative alphas);
the step itself is the two-line formula, with a = 1 at t = -1 so that the first UNet call sees
the clean latent at t = -1. Call i of S has step index S - 1 - i (S - 1 = cleanest).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from dhf_cache.config import SchedulerSpec


@dataclass(frozen=True)
class InversionSchedule:
    call_timesteps: tuple[int, ...]  # t given to the UNet at call i: -1, 0, 20, ..., 960
    next_timesteps: tuple[int, ...]  # t the latent is stepped to after call i: 0, 20, ..., 980
    alphas_cumprod: tuple[float, ...]  # indexed by train timestep

    @property
    def steps(self) -> int:
        return len(self.call_timesteps)

    def alpha(self, t: int) -> float:
        """Cumulative alpha at t; exactly 1 at t = -1 (the clean image)."""
        return 1.0 if t < 0 else self.alphas_cumprod[t]

    def call_of_step(self, step_index: int) -> int:
        return self.steps - 1 - step_index

    def timestep_of_step(self, step_index: int) -> int:
        """The UNet t of the call with this step index (49 -> -1, 45 -> 60, 0 -> 960 for 50)."""
        return self.call_timesteps[self.call_of_step(step_index)]


def make_schedule(spec: SchedulerSpec, steps: int) -> InversionSchedule:
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(
        num_train_timesteps=spec.num_train_timesteps,
        beta_start=spec.beta_start,
        beta_end=spec.beta_end,
        beta_schedule=spec.beta_schedule,
        steps_offset=spec.steps_offset,
        timestep_spacing=spec.timestep_spacing,
        clip_sample=False,
        set_alpha_to_one=False,
    )
    scheduler.set_timesteps(steps)
    ascending = sorted(int(t) for t in scheduler.timesteps)
    calls = (-1, *ascending[:-1])
    return InversionSchedule(
        call_timesteps=calls,
        next_timesteps=tuple(ascending),
        alphas_cumprod=tuple(float(a) for a in scheduler.alphas_cumprod.double()),
    )


def ddim_inversion_step(x_t: torch.Tensor, eps: torch.Tensor, a_t: float, a_next: float) -> torch.Tensor:
    """x0 = (x_t - sqrt(1-a_t) eps) / sqrt(a_t); x_next = sqrt(a_next) x0 + sqrt(1-a_next) eps."""
    x0 = (x_t - math.sqrt(1.0 - a_t) * eps) / math.sqrt(a_t)
    return math.sqrt(a_next) * x0 + math.sqrt(1.0 - a_next) * eps


# What a UNet may predict (its scheduler config's `prediction_type`): the noise (SD 1.x, 2.x-base)
# or v (SD 2.x at 768 px). Anything else is refused when the model loads.
PREDICTION_TYPES = ("epsilon", "v_prediction")


def noise_estimate(output: torch.Tensor, x_t: torch.Tensor, a_t: float, prediction_type: str) -> torch.Tensor:
    """The noise estimate eps that the DDIM step needs, from a UNet output of `prediction_type`.

    epsilon: the output itself. v_prediction (v = sqrt(a) eps - sqrt(1-a) x0): eps = sqrt(a) v +
    sqrt(1-a) x_t, exactly (substitute x0 = (x_t - sqrt(1-a) eps) / sqrt(a)); at t = -1, where
    a = 1, eps = v. Guidance commutes with it (affine in the output for a fixed x_t)."""
    if prediction_type == "epsilon":
        return output
    if prediction_type == "v_prediction":
        return math.sqrt(a_t) * output + math.sqrt(1.0 - a_t) * x_t
    raise ValueError(f"prediction_type {prediction_type!r}: expected one of {', '.join(PREDICTION_TYPES)}")
