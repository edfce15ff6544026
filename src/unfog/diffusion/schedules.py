"""Noise schedules and sampling discretisations.

Notation (DDPM paper, Ho et al. 2020, and Karras et al. 2022, "EDM"):

    beta_t              per-step noise variance of the forward chain, t = 0 .. T-1
    alpha_bar_t         prod_{s<=t} (1 - beta_s)                    ("alphas_cumprod")
    x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps          (variance-preserving, VP)
    sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t)                 (EDM / k-diffusion noise level)
    x_t / sqrt(alpha_bar_t) = x_0 + sigma_t eps                     (variance-exploding, VE)

Every sampler in unfog works on the VE variable ``x = x_0 + sigma * eps`` and a decreasing list of
sigmas that ends in 0. A discrete-time model trained on timesteps is reached through
:meth:`DiscreteSchedule.sigma_to_t`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, get_args

import torch
from torch import Tensor

from ..choices import check_choice  # noqa: F401  (also imported from here by older callers)

BetaSchedule = Literal["linear", "scaled_linear", "cosine"]
Spacing = Literal["leading", "linspace", "trailing", "karras", "exponential", "sgm_uniform"]

BETA_SCHEDULES: tuple[str, ...] = get_args(BetaSchedule)
SPACINGS: tuple[str, ...] = get_args(Spacing)

# Default beta ranges: DDPM (Ho et al. 2020, sec. 4) and Stable Diffusion (LDM configs).
_DEFAULT_RANGE = {"linear": (1e-4, 0.02), "scaled_linear": (0.00085, 0.012)}

# alpha_bar is clamped to this when the zero-terminal-SNR rescale makes it exactly 0, so that the
# VE sigma stays finite (sigma = 4096); diffusers' Euler-family schedulers use the same value.
ZERO_SNR_ALPHA_BAR = 2.0**-24


def make_betas(
    kind: BetaSchedule = "scaled_linear",
    num_timesteps: int = 1000,
    beta_start: float | None = None,
    beta_end: float | None = None,
    *,
    cosine_s: float = 0.008,
    max_beta: float = 0.999,
) -> Tensor:
    """Betas of a discrete forward process, float64, shape (num_timesteps,).

    linear:        beta_t evenly spaced from beta_start to beta_end (DDPM: 1e-4 .. 0.02).
    scaled_linear: sqrt(beta_t) evenly spaced (Stable Diffusion: 0.00085 .. 0.012).
    cosine:        alpha_bar(t) = cos^2(((t/T + s) / (1 + s)) pi/2), beta_t = 1 - alpha_bar(t+1)/alpha_bar(t),
                   clipped at max_beta (Nichol & Dhariwal 2021, eq. 17).
    """
    check_choice("beta schedule", kind, BETA_SCHEDULES)
    if num_timesteps < 2:
        raise ValueError(f"num_timesteps must be at least 2, got {num_timesteps}")
    if kind == "cosine":
        def alpha_bar(t: Tensor) -> Tensor:
            return torch.cos((t / num_timesteps + cosine_s) / (1 + cosine_s) * math.pi / 2) ** 2

        t = torch.arange(num_timesteps, dtype=torch.float64)
        betas = 1 - alpha_bar(t + 1) / alpha_bar(t)
        return betas.clamp(max=max_beta)
    lo, hi = _DEFAULT_RANGE[kind]
    lo = lo if beta_start is None else beta_start
    hi = hi if beta_end is None else beta_end
    if kind == "linear":
        return torch.linspace(lo, hi, num_timesteps, dtype=torch.float64)
    return torch.linspace(lo**0.5, hi**0.5, num_timesteps, dtype=torch.float64) ** 2


def rescale_zero_terminal_snr(betas: Tensor) -> Tensor:
    """Rescale betas so the last timestep has zero SNR (Lin et al. 2023, "Common Diffusion Noise
    Schedules and Sample Steps are Flawed", Algorithm 1): shift and scale sqrt(alpha_bar) so that
    it ends at exactly 0 while keeping its first value."""
    sqrt_ab = torch.cumprod(1 - betas.double(), 0).sqrt()
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    sqrt_ab = (sqrt_ab - last) * first / (first - last)
    alpha_bar = sqrt_ab**2
    alphas = torch.cat([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])
    return 1 - alphas


def sigmas_from_alphas_cumprod(alphas_cumprod: Tensor) -> Tensor:
    """sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t)."""
    return ((1 - alphas_cumprod) / alphas_cumprod).sqrt()


def alphas_cumprod_from_sigmas(sigmas: Tensor) -> Tensor:
    """alpha_bar = 1 / (1 + sigma^2), the inverse of :func:`sigmas_from_alphas_cumprod`."""
    return 1 / (1 + sigmas**2)


@dataclass(frozen=True)
class DiscreteSchedule:
    """The noise levels of a model trained on T discrete timesteps.

    ``alphas_cumprod`` is float64 of shape (T,). Build one with :meth:`from_betas` or :meth:`make`.
    """

    alphas_cumprod: Tensor

    @classmethod
    def from_betas(cls, betas: Tensor) -> "DiscreteSchedule":
        alphas_cumprod = torch.cumprod(1 - betas.double(), 0)
        return cls(alphas_cumprod.clamp(min=ZERO_SNR_ALPHA_BAR))

    @classmethod
    def make(
        cls,
        kind: BetaSchedule = "scaled_linear",
        num_timesteps: int = 1000,
        beta_start: float | None = None,
        beta_end: float | None = None,
        *,
        zero_terminal_snr: bool = False,
    ) -> "DiscreteSchedule":
        betas = make_betas(kind, num_timesteps, beta_start, beta_end)
        if zero_terminal_snr:
            betas = rescale_zero_terminal_snr(betas)
        return cls.from_betas(betas)

    @property
    def num_timesteps(self) -> int:
        return self.alphas_cumprod.shape[0]

    @property
    def sigmas(self) -> Tensor:
        """sigma_t for t = 0 .. T-1, increasing, float64."""
        return sigmas_from_alphas_cumprod(self.alphas_cumprod)

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def sigma_to_t(self, sigma: Tensor) -> Tensor:
        """Continuous timestep of a noise level: linear interpolation in log(sigma) between the two
        neighbouring discrete timesteps (as k-diffusion and diffusers do), clamped to [0, T-1].
        Computed in float64 on the CPU, where the schedule lives (not every device has float64);
        the result is on ``sigma``'s device."""
        log_sigmas = self.sigmas.log()  # (T,)
        log_sigma = sigma.detach().cpu().double().clamp(min=1e-10).log()
        low = torch.searchsorted(log_sigmas, log_sigma.reshape(-1), right=True) - 1
        low = low.clamp(0, self.num_timesteps - 2)
        lo, hi = log_sigmas[low], log_sigmas[low + 1]
        w = ((log_sigma.reshape(-1) - lo) / (hi - lo)).clamp(0, 1)
        t = (low + w).reshape(sigma.shape).to(sigma.dtype if sigma.is_floating_point() else torch.float32)
        return t.to(sigma.device)

    def t_to_sigma(self, t: Tensor) -> Tensor:
        """Noise level of a (possibly fractional) timestep: linear interpolation of log(sigma) in t,
        the exact inverse of :meth:`sigma_to_t` (k-diffusion's convention; diffusers interpolates
        sigma itself for its `linspace` spacing, which differs by < 0.3% between integers).
        Float64, on ``t``'s device."""
        device = t.device
        t = t.detach().cpu().double().clamp(0, self.num_timesteps - 1)
        low = t.floor().long().clamp(max=self.num_timesteps - 2)
        w = t - low
        log_sigmas = self.sigmas.log()
        return ((1 - w) * log_sigmas[low] + w * log_sigmas[low + 1]).exp().to(device)


def timesteps_for(spacing: Spacing, steps: int, num_timesteps: int = 1000, steps_offset: int = 1) -> Tensor:
    """Decreasing timesteps of the uniform spacings (Lin et al. 2023, Table 2), float64, shape (steps,).

    leading:  t_i = i * (T // n) + steps_offset        (DDIM / Stable Diffusion 1.x default)
    linspace: n points evenly spaced over [0, T-1]     (may be fractional)
    trailing: round(T - i * T / n) - 1                 (always starts at the last timestep)
    """
    check_choice("timestep spacing", spacing, ("leading", "linspace", "trailing"))
    if steps > num_timesteps:
        raise ValueError(f"{steps} steps is more than the model's {num_timesteps} training timesteps")
    if spacing == "leading":
        ratio = num_timesteps // steps
        if (steps - 1) * ratio + steps_offset > num_timesteps - 1:
            raise ValueError(f"leading spacing with {steps} steps and steps_offset {steps_offset} would pass the "
                             f"last timestep {num_timesteps - 1}; use spacing 'trailing' or 'linspace' "
                             f"(e.g. for DDPM's full {num_timesteps}-step chain)")
        t = torch.arange(steps, dtype=torch.float64) * ratio + steps_offset
        return t.flip(0)
    if spacing == "linspace":
        return torch.linspace(0, num_timesteps - 1, steps, dtype=torch.float64).flip(0)
    ratio = num_timesteps / steps
    t = torch.round(num_timesteps - torch.arange(steps, dtype=torch.float64) * ratio) - 1
    return t


def karras_sigmas(steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> Tensor:
    """Karras et al. 2022, eq. 5: sigma_i = (s_max^(1/rho) + i/(n-1) (s_min^(1/rho) - s_max^(1/rho)))^rho."""
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def exponential_sigmas(steps: int, sigma_min: float, sigma_max: float) -> Tensor:
    """Evenly spaced in log(sigma) from sigma_max to sigma_min."""
    return torch.linspace(math.log(sigma_max), math.log(sigma_min), steps, dtype=torch.float64).exp()


def get_sigmas(
    schedule: DiscreteSchedule,
    steps: int,
    spacing: Spacing = "leading",
    *,
    steps_offset: int = 1,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
    rho: float = 7.0,
) -> Tensor:
    """The decreasing noise levels a sampler visits, float64, shape (steps + 1,), ending in 0.

    Uniform spacings (`leading`, `linspace`, `trailing`) pick timesteps and read their sigmas;
    `karras` and `exponential` space sigma itself between sigma_min and sigma_max (by default the
    model's own range, as k-diffusion and A1111 do); `sgm_uniform` spaces timesteps evenly from the
    timestep of sigma_max to that of sigma_min and drops the last one (as ComfyUI does for SDXL).
    """
    check_choice("sigma spacing", spacing, SPACINGS)
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    lo = schedule.sigma_min if sigma_min is None else sigma_min
    hi = schedule.sigma_max if sigma_max is None else sigma_max
    if spacing in ("leading", "linspace", "trailing"):
        t = timesteps_for(spacing, steps, schedule.num_timesteps, steps_offset)
        sigmas = schedule.t_to_sigma(t)
    elif spacing == "karras":
        sigmas = karras_sigmas(steps, lo, hi, rho)
    elif spacing == "exponential":
        sigmas = exponential_sigmas(steps, lo, hi)
    else:  # sgm_uniform
        t_hi, t_lo = schedule.sigma_to_t(torch.tensor(hi)), schedule.sigma_to_t(torch.tensor(lo))
        t = torch.linspace(float(t_hi), float(t_lo), steps + 1, dtype=torch.float64)[:-1]
        sigmas = schedule.t_to_sigma(t)
    return torch.cat([sigmas, sigmas.new_zeros(1)])
