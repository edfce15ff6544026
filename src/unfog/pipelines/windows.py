"""Which part of a sampling schedule a run covers: img2img's strength and the SDXL base-to-refiner
hand-off (``denoising_end`` on the base, ``denoising_start`` on the refiner).

With n steps (n + 1 sigmas, the last 0) and t_i the timestep of sigma_i:

    strength s          the last int(n * s) steps (diffusers' rule; s = 1 runs them all)
    denoising_end f     the steps with t_i >= round(T (1 - f)): the first ~f of the timesteps
    denoising_start f   the steps with t_i <  round(T (1 - f)): the rest

so a base run with ``denoising_end=f`` and a refiner run with ``denoising_start=f`` on the same
steps and spacing split the schedule at one sigma, which the first ends on and the second starts
from, as diffusers' SDXL pipelines do.
"""

from __future__ import annotations

from torch import Tensor

from ..diffusion import DiscreteSchedule

# Timesteps of the uniform spacings are integers; sigma -> t gives them back to ~1e-9.
T_TOLERANCE = 1e-6


def timestep_cutoff(schedule: DiscreteSchedule, fraction: float, what: str) -> float:
    if not 0 < fraction < 1:
        raise ValueError(f"{what} must be in (0, 1), got {fraction}")
    t = schedule.num_timesteps
    return int(round(t - fraction * t)) - T_TOLERANCE


def sigma_window(
    schedule: DiscreteSchedule,
    sigmas: Tensor,
    *,
    strength: float | None = None,
    denoising_start: float | None = None,
    denoising_end: float | None = None,
) -> Tensor:
    """The sigmas of the steps a run takes (see the module docstring); ``denoising_start``
    overrides ``strength``. Raises ValueError when no step is left."""
    n = len(sigmas) - 1
    t = schedule.sigma_to_t(sigmas[:-1].double())  # (n,)
    start, end = 0, n
    if denoising_start is not None:
        start = n - int((t < timestep_cutoff(schedule, denoising_start, "denoising_start")).sum())
    elif strength is not None:
        if not 0 < strength <= 1:
            raise ValueError(f"strength must be in (0, 1], got {strength}")
        start = n - min(int(n * strength), n)
    if denoising_end is not None:
        end = int((t >= timestep_cutoff(schedule, denoising_end, "denoising_end")).sum())
    if start >= end:
        raise ValueError(
            f"no steps left to run: {n} steps with strength={strength}, denoising_start={denoising_start}, "
            f"denoising_end={denoising_end} select steps {start}..{end}; raise steps or strength"
        )
    return sigmas[start : end + 1]
