"""Samplers as pure functions over a denoiser D(x, sigma) ~ E[x_0 | x].

Every sampler has the signature

    sample_xxx(denoiser, x, sigmas, *, extra_args=None, callback=None, generator=None,
               noise_sampler=None, **options) -> Tensor

and works on the variance-exploding variable x = x_0 + sigma * eps (see ``schedules``):
``x`` is the starting sample at ``sigmas[0]``, ``sigmas`` is decreasing and ends in 0, and the
return value is the sample at sigma = 0. The probability-flow ODE (Karras et al. 2022, eq. 4) is

    dx/dsigma = (x - D(x, sigma)) / sigma.

Randomness is explicit: ancestral samplers draw standard normals from ``noise_sampler(sigma,
sigma_next)`` when given, else from ``generator`` on the CPU (so a seed means the same image on
every device). The caller's tensors are never changed in place.

This module holds the first-generation samplers; the DPM-Solver family and UniPC are in
``dpm_solvers``; the registry by name is in ``registry``.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor

from .denoiser import DenoiserFn

NoiseSampler = Callable[[float, float], Tensor]
Callback = Callable[[dict[str, Any]], None]


def default_noise_sampler(x: Tensor, generator: torch.Generator | None) -> NoiseSampler:
    """Independent N(0, I) draws shaped like x, made on the CPU and moved to x's device."""

    def sample(sigma: float, sigma_next: float) -> Tensor:
        noise = torch.randn(x.shape, generator=generator, dtype=torch.float32, device="cpu")
        return noise.to(x.device, x.dtype)

    return sample


class Stepper:
    """The bookkeeping every sampler shares: sigmas as floats, the denoiser call with the
    batch of sigmas and extra arguments, the per-step callback, and the noise source."""

    def __init__(self, denoiser, x, sigmas, extra_args, callback, generator, noise_sampler):
        self.denoiser = denoiser
        self.sigmas = [float(s) for s in sigmas]
        if len(self.sigmas) < 2:
            raise ValueError("sigmas needs at least two entries (a start and an end)")
        if any(a <= b for a, b in zip(self.sigmas, self.sigmas[1:])):
            raise ValueError("sigmas must be strictly decreasing")
        self.extra_args = extra_args or {}
        self.callback = callback
        self.noise = noise_sampler or default_noise_sampler(x, generator)
        self.batch = x.shape[0]

    @property
    def steps(self) -> range:
        return range(len(self.sigmas) - 1)

    def denoise(self, x: Tensor, sigma: float) -> Tensor:
        s = torch.full((self.batch,), sigma, dtype=torch.float32, device=x.device)
        return self.denoiser(x, s, **self.extra_args)

    def report(self, i: int, x: Tensor, denoised: Tensor) -> None:
        if self.callback is not None:
            self.callback({"i": i, "x": x, "sigma": self.sigmas[i], "sigma_next": self.sigmas[i + 1], "denoised": denoised})


def ancestral_step(sigma: float, sigma_next: float, eta: float = 1.0) -> tuple[float, float]:
    """Split a step sigma -> sigma_next into a deterministic part down to sigma_down and fresh
    noise of size sigma_up, with sigma_down^2 + sigma_up^2 = sigma_next^2.

    With eta = 1, sigma_up^2 = sigma_next^2 (sigma^2 - sigma_next^2) / sigma^2 is the variance of
    the DDPM posterior q(x_{t-1} | x_t, x_0) (Ho et al. 2020, eq. 7) in VE form, and eta scales its
    standard deviation as in DDIM (Song et al. 2021, eq. 16)."""
    if sigma_next == 0 or eta == 0:
        return sigma_next, 0.0
    up = min(sigma_next, eta * math.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2))
    return math.sqrt(sigma_next**2 - up**2), up


def _ancestral(denoiser, x, sigmas, eta, s_noise, extra_args, callback, generator, noise_sampler) -> Tensor:
    run = Stepper(denoiser, x, sigmas, extra_args, callback, generator, noise_sampler)
    for i in run.steps:
        sigma, sigma_next = run.sigmas[i], run.sigmas[i + 1]
        denoised = run.denoise(x, sigma)
        run.report(i, x, denoised)
        down, up = ancestral_step(sigma, sigma_next, eta)
        x = denoised + (down / sigma) * (x - denoised)  # Euler step of the ODE to sigma_down
        if up > 0:
            x = x + run.noise(sigma, sigma_next) * (s_noise * up)
    return x


def sample_euler(denoiser: DenoiserFn, x: Tensor, sigmas: Tensor, *, extra_args=None, callback=None,
                 generator=None, noise_sampler=None) -> Tensor:
    """Euler's method on the probability-flow ODE (Karras et al. 2022, Algorithm 1 without the
    second-order correction): x <- x + (sigma_next - sigma) (x - D) / sigma. Equal to DDIM with
    eta = 0 (Song et al. 2021, eq. 13) written in the VE variable."""
    return _ancestral(denoiser, x, sigmas, 0.0, 1.0, extra_args, callback, generator, noise_sampler)


def sample_euler_ancestral(denoiser: DenoiserFn, x: Tensor, sigmas: Tensor, *, extra_args=None, callback=None,
                           generator=None, noise_sampler=None, eta: float = 1.0, s_noise: float = 1.0) -> Tensor:
    """Euler step down to sigma_down, then fresh noise of size sigma_up (k-diffusion's
    "Euler a"); with eta = 1 this is exactly the DDPM ancestral step."""
    return _ancestral(denoiser, x, sigmas, eta, s_noise, extra_args, callback, generator, noise_sampler)


def sample_ddpm(denoiser: DenoiserFn, x: Tensor, sigmas: Tensor, *, extra_args=None, callback=None,
                generator=None, noise_sampler=None) -> Tensor:
    """The ancestral reverse process of DDPM (Ho et al. 2020, Algorithm 2) with the posterior
    variance beta_tilde ("fixed_small"): x_{t-1} ~ q(x_{t-1} | x_t, x_0 = D(x_t)). In the VE
    variable the posterior mean is x_0 + (sigma_next / sigma)^2 (x - x_0), which is the Euler
    step to sigma_down = sigma_next^2 / sigma; so this shares its step with Euler ancestral."""
    return _ancestral(denoiser, x, sigmas, 1.0, 1.0, extra_args, callback, generator, noise_sampler)


def sample_ddim(denoiser: DenoiserFn, x: Tensor, sigmas: Tensor, *, extra_args=None, callback=None,
                generator=None, noise_sampler=None, eta: float = 0.0) -> Tensor:
    """DDIM (Song et al. 2021, eq. 12): x_prev = x_0 + sqrt(sigma_next^2 - s^2) eps_hat + s z,
    with s = eta * (DDPM posterior std) and eps_hat = (x - x_0) / sigma. eta = 0 is deterministic
    (the Euler step); eta = 1 is DDPM."""
    return _ancestral(denoiser, x, sigmas, eta, 1.0, extra_args, callback, generator, noise_sampler)


def sample_lcm(denoiser: DenoiserFn, x: Tensor, sigmas: Tensor, *, extra_args=None, callback=None,
               generator=None, noise_sampler=None) -> Tensor:
    """Multistep consistency sampling (Song et al. 2023, Algorithm 1; LCM, Luo et al. 2023):
    jump to the clean estimate, then re-noise it to the next level: x <- D(x) + sigma_next z.
    Use with a consistency-distilled denoiser (see ``denoiser.ConsistencyBoundary``)."""
    run = Stepper(denoiser, x, sigmas, extra_args, callback, generator, noise_sampler)
    for i in run.steps:
        sigma, sigma_next = run.sigmas[i], run.sigmas[i + 1]
        denoised = run.denoise(x, sigma)
        run.report(i, x, denoised)
        x = denoised if sigma_next == 0 else denoised + run.noise(sigma, sigma_next) * sigma_next
    return x


def sample_heun(denoiser: DenoiserFn, x: Tensor, sigmas: Tensor, *, extra_args=None, callback=None,
                generator=None, noise_sampler=None) -> Tensor:
    """Heun's second-order method (Karras et al. 2022, Algorithm 1, deterministic). The last
    step, to sigma = 0, is an Euler step."""
    run = Stepper(denoiser, x, sigmas, extra_args, callback, generator, noise_sampler)
    for i in run.steps:
        sigma, sigma_next = run.sigmas[i], run.sigmas[i + 1]
        denoised = run.denoise(x, sigma)
        run.report(i, x, denoised)
        d = (x - denoised) / sigma
        x_euler = x + d * (sigma_next - sigma)
        if sigma_next == 0:
            x = x_euler
            continue
        d_next = (x_euler - run.denoise(x_euler, sigma_next)) / sigma_next
        x = x + (d + d_next) / 2 * (sigma_next - sigma)
    return x


def _dpm2_step(run: Stepper, x: Tensor, denoised: Tensor, sigma: float, sigma_to: float) -> Tensor:
    """DPM-Solver-2 in the sigma variable (Lu et al. 2022, Algorithm 1 with r = 1/2, as Karras et
    al. 2022 use it): the derivative at the geometric midpoint of sigma and sigma_to."""
    d = (x - denoised) / sigma
    if sigma_to == 0:
        return x + d * (sigma_to - sigma)
    sigma_mid = math.exp((math.log(sigma) + math.log(sigma_to)) / 2)
    x_mid = x + d * (sigma_mid - sigma)
    d_mid = (x_mid - run.denoise(x_mid, sigma_mid)) / sigma_mid
    return x + d_mid * (sigma_to - sigma)


def sample_dpm_2(denoiser: DenoiserFn, x: Tensor, sigmas: Tensor, *, extra_args=None, callback=None,
                 generator=None, noise_sampler=None) -> Tensor:
    """DPM-Solver-2 ("DPM2"); the last step to sigma = 0 is an Euler step."""
    run = Stepper(denoiser, x, sigmas, extra_args, callback, generator, noise_sampler)
    for i in run.steps:
        denoised = run.denoise(x, run.sigmas[i])
        run.report(i, x, denoised)
        x = _dpm2_step(run, x, denoised, run.sigmas[i], run.sigmas[i + 1])
    return x


def sample_dpm_2_ancestral(denoiser: DenoiserFn, x: Tensor, sigmas: Tensor, *, extra_args=None, callback=None,
                           generator=None, noise_sampler=None, eta: float = 1.0, s_noise: float = 1.0) -> Tensor:
    """DPM-Solver-2 down to sigma_down, then fresh noise of size sigma_up ("DPM2 a")."""
    run = Stepper(denoiser, x, sigmas, extra_args, callback, generator, noise_sampler)
    for i in run.steps:
        sigma, sigma_next = run.sigmas[i], run.sigmas[i + 1]
        denoised = run.denoise(x, sigma)
        run.report(i, x, denoised)
        down, up = ancestral_step(sigma, sigma_next, eta)
        x = _dpm2_step(run, x, denoised, sigma, down)
        if up > 0:
            x = x + run.noise(sigma, sigma_next) * (s_noise * up)
    return x


def lms_coefficient(sigmas: list[float], i: int, order: int, j: int) -> float:
    """Integral over [sigma_i, sigma_{i+1}] of the Lagrange basis polynomial that is 1 at
    sigma_{i-j} and 0 at the other points sigma_i, ..., sigma_{i-order+1} (exact, in float64)."""
    nodes = [sigmas[i - k] for k in range(order)]
    others = [s for k, s in enumerate(nodes) if k != j]
    poly = np.polynomial.polynomial.polyfromroots(others) if others else np.array([1.0])
    poly = poly / np.prod([nodes[j] - s for s in others])
    integral = np.polynomial.polynomial.polyint(poly)
    value = np.polynomial.polynomial.polyval
    return float(value(sigmas[i + 1], integral) - value(sigmas[i], integral))


def sample_lms(denoiser: DenoiserFn, x: Tensor, sigmas: Tensor, *, extra_args=None, callback=None,
               generator=None, noise_sampler=None, order: int = 4) -> Tensor:
    """Linear multistep (Adams-Bashforth on the sigma grid, as Karras et al. 2022 and k-diffusion
    use it): integrate the Lagrange polynomial through the last ``order`` ODE derivatives."""
    if order < 1:
        raise ValueError(f"LMS order must be >= 1, got {order}")
    run = Stepper(denoiser, x, sigmas, extra_args, callback, generator, noise_sampler)
    derivatives: list[Tensor] = []
    for i in run.steps:
        denoised = run.denoise(x, run.sigmas[i])
        run.report(i, x, denoised)
        derivatives = [(x - denoised) / run.sigmas[i]] + derivatives[: order - 1]  # newest first
        cur = min(i + 1, order)
        for j, d in enumerate(derivatives[:cur]):
            x = x + lms_coefficient(run.sigmas, i, cur, j) * d
    return x
