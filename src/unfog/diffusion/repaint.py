"""RePaint (Lugmayr et al. 2022, "RePaint: Inpainting using Denoising Diffusion Probabilistic
Models"), Algorithm 1 with its resampling schedule.

Inpainting with an unconditional (or any ordinary) model: after every reverse step the known
region is replaced by the original noised to the new level, ``x_{t-1} = m * known + (1 - m) *
unknown``. That alone (``InpaintDenoiser``) harmonises poorly, because the generated part is
never told what the known part became. RePaint therefore goes back in time: after some reverse
steps it re-noises the whole sample with the forward process, x_t ~ N(sqrt(1 - beta_t) x_{t-1},
beta_t I), and denoises again, so the generated region is resampled with the known one in view.

The schedule (paper sec. 4.2, Fig. 9-10): on a grid of ``steps`` timesteps t_k = k * (T // steps),
every ``jump_length`` steps below the start, the sampler jumps ``jump_length`` steps back up,
``jump_n_sample - 1`` times. (jump_length, jump_n_sample) = (10, 10) is the paper's; (1, 1) or
``jump_n_sample`` 1 is the plain blended DDPM / DDIM sampler.

One reverse step at t (prev = t - T // steps; alpha_bar_prev = 1 below 0), for the model's noise
estimate eps and x0_hat = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t) (the DDIM step with eta,
Song et al. eq. 12; eta 1 is DDPM's posterior variance):

    sigma_eta = eta * sqrt((1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev))
    unknown   = sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev - sigma_eta^2) eps + sigma_eta z
    known     = sqrt(abar_prev) x0 + sqrt(1 - abar_prev) z
    x_prev    = m * known + (1 - m) * unknown

with one draw z for both (as diffusers' ``RePaintScheduler``; the paper draws two), no noise at
t = 0 in the unknown part. A jump up by one grid step applies the forward transition
x <- sqrt(1 - beta_s) x + sqrt(beta_s) z_s for each of the T // steps train timesteps s from t
on, one draw each. The noise is drawn in that order from ``generator`` (on the CPU), so a
trajectory is reproducible and equals diffusers' for the same generator.

The state is the variance-preserving x_t (as in the paper); the model is unfog's denoiser
D(x, sigma) on the variance-exploding x = x_t / sqrt(abar_t) (``denoiser.py``), so eps = (x -
D(x, sigma_t)) / sigma_t. The result is x_0 (equal in both scalings).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .denoiser import DenoiserFn
from .schedules import DiscreteSchedule


def repaint_timesteps(steps: int, jump_length: int, jump_n_sample: int, num_timesteps: int = 1000) -> list[int]:
    """The train timesteps a RePaint run visits, in order: down the grid k * (T // steps) and, at
    every ``jump_length``-th grid point below the start, back up ``jump_length`` points,
    ``jump_n_sample - 1`` times (the paper's Fig. 9-10; diffusers' ``RePaintScheduler.set_timesteps``)."""
    check_repaint(steps, jump_length, jump_n_sample, num_timesteps)
    steps = min(steps, num_timesteps)
    jumps_left = {k: jump_n_sample - 1 for k in range(0, steps - jump_length, jump_length)}
    visited, k = [], steps
    while k >= 1:
        k -= 1
        visited.append(k)
        if jumps_left.get(k, 0) > 0:
            jumps_left[k] -= 1
            for _ in range(jump_length):
                k += 1
                visited.append(k)
    stride = num_timesteps // steps
    return [k * stride for k in visited]


def repaint_calls(steps: int, jump_length: int, jump_n_sample: int, num_timesteps: int = 1000) -> int:
    """How many model calls (reverse steps) a RePaint run makes: the progress bar's total."""
    visited = repaint_timesteps(steps, jump_length, jump_n_sample, num_timesteps)
    return sum(1 for last, t in zip([visited[0] + 1, *visited], visited) if t < last)


def check_repaint(steps: int, jump_length: int, jump_n_sample: int, num_timesteps: int = 1000) -> None:
    """One-line ValueErrors for settings that make no schedule."""
    if steps < 1:
        raise ValueError(f"RePaint needs steps >= 1, got {steps}")
    if jump_length < 1 or jump_n_sample < 1:
        raise ValueError(f"RePaint's jump length and jump count must be >= 1, got ({jump_length}, {jump_n_sample})")
    if jump_length >= min(steps, num_timesteps):
        raise ValueError(f"RePaint's jump length {jump_length} must be below the {steps} steps it jumps within")


@torch.no_grad()
def sample_repaint(denoiser: DenoiserFn, x: Tensor, schedule: DiscreteSchedule, known: Tensor, keep: Tensor, *,
                   steps: int, jump_length: int = 10, jump_n_sample: int = 10, eta: float = 1.0,
                   generator: torch.Generator | None = None, extra_args: dict | None = None,
                   callback: Callable[[dict], None] | None = None) -> Tensor:
    """RePaint (module docstring) from unit noise ``x`` (B, C, h, w), the variance-preserving x_T.

    known: x0 of the image (B or 1, C, h, w); keep: (B or 1, 1, h, w), 1 where the image is kept
    (diffusers' RePaint mask), 0 where it is painted. Returns x_0. ``callback`` gets i (the
    model call), t and the state after each reverse step."""
    extra_args = extra_args or {}
    abar = schedule.alphas_cumprod.to(x.device)  # float64
    betas = 1 - abar / torch.cat([abar.new_ones(1), abar[:-1]])
    sigmas = schedule.sigmas.to(x.device)
    stride = schedule.num_timesteps // min(steps, schedule.num_timesteps)
    keep, known = keep.to(x), known.to(x)
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32  # CPU draws: a seed means the same noise
    draw = lambda: torch.randn(x.shape, generator=generator, dtype=dtype).to(x)  # noqa: E731  on every device
    timesteps = repaint_timesteps(steps, jump_length, jump_n_sample, schedule.num_timesteps)
    last = timesteps[0] + 1
    calls = 0
    for t in timesteps:
        if t < last:  # a reverse step t -> t - stride
            a_t = float(abar[t])
            a_prev = float(abar[t - stride]) if t - stride >= 0 else 1.0
            sigma = sigmas[t].to(x.dtype).expand(x.shape[0])
            x_ve = x / a_t**0.5
            eps = (x_ve - denoiser(x_ve, sigma, **extra_args)) / sigma[:, None, None, None]
            x0_hat = (x - (1 - a_t) ** 0.5 * eps) / a_t**0.5
            z = draw()
            std = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)) ** 0.5
            unknown = a_prev**0.5 * x0_hat + (1 - a_prev - std**2) ** 0.5 * eps
            if t > 0 and eta > 0:
                unknown = unknown + std * z
            x = keep * (a_prev**0.5 * known + (1 - a_prev) ** 0.5 * z) + (1 - keep) * unknown
            if callback is not None:
                callback({"i": calls, "t": t, "x": x, "denoised": x0_hat})
            calls += 1
        else:  # a jump up: the forward process over the grid step above `last`
            for s in range(last, last + stride):
                beta = float(betas[s])
                x = (1 - beta) ** 0.5 * x + beta**0.5 * draw()
        last = t
    return x
