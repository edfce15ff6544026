"""Turn a network into a denoiser D(x, sigma) ~ E[x_0 | x] -- the one place that knows about
prediction types.

A network trained on the variance-preserving variable x_vp = x / sqrt(1 + sigma^2) at discrete
timestep t predicts one of (DDPM, Ho et al. 2020; v: Salimans & Ho 2022, eq. 6 and app. D):

    eps:  the noise                      x_0 = x - sigma * eps
    v:    alpha eps - sigma_vp x_0        x_0 = x / (1 + sigma^2) - sigma / sqrt(1 + sigma^2) * v
    x0:   the clean sample itself         x_0 = F

Written as the EDM preconditioning (Karras et al. 2022, Table 1)

    D(x, sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x, t(sigma))

with c_in = 1 / sqrt(1 + sigma^2) for all three and

    prediction   c_skip               c_out
    eps          1                    -sigma
    v            1 / (1 + sigma^2)    -sigma / sqrt(1 + sigma^2)
    x0           0                    1

Samplers only ever see D; none of them branches on the prediction type.
"""

from __future__ import annotations

from typing import Callable, Literal, get_args

import torch
from torch import Tensor

from ..choices import check_choice
from .schedules import DiscreteSchedule

Prediction = Literal["eps", "v", "x0"]
PREDICTIONS: tuple[str, ...] = get_args(Prediction)

# A denoiser maps (x, sigma, **extra_args) -> predicted x_0; sigma has shape (B,).
DenoiserFn = Callable[..., Tensor]


def scalings(sigma: Tensor, prediction: Prediction) -> tuple[Tensor, Tensor, Tensor]:
    """(c_skip, c_out, c_in) of the table in the module docstring, each shaped like sigma."""
    check_choice("prediction type", prediction, PREDICTIONS)
    c_in = 1 / (sigma**2 + 1).sqrt()
    if prediction == "eps":
        return torch.ones_like(sigma), -sigma, c_in
    if prediction == "v":
        return 1 / (sigma**2 + 1), -sigma * c_in, c_in
    return torch.zeros_like(sigma), torch.ones_like(sigma), c_in


def append_dims(v: Tensor, ndim: int) -> Tensor:
    """(B,) -> (B, 1, ..., 1) with ``ndim`` dimensions in all."""
    return v.reshape(v.shape + (1,) * (ndim - v.ndim))


class Denoiser:
    """D(x, sigma) for a discrete-time network ``model(x_vp, t, **extra_args)``.

    Args:
        model: the network; receives the VP-scaled input and the continuous timestep t(sigma).
        schedule: the schedule the network was trained with.
        prediction: what the network predicts: "eps", "v" or "x0".
        round_timesteps: pass t rounded to the nearest integer, as diffusers' multistep solvers
            do when Karras sigmas fall between training timesteps (off by default: k-diffusion
            and A1111 pass the fractional t).
    """

    def __init__(
        self,
        model: Callable[..., Tensor],
        schedule: DiscreteSchedule,
        prediction: Prediction = "eps",
        *,
        round_timesteps: bool = False,
    ):
        self.model = model
        self.schedule = schedule
        self.prediction = check_choice("prediction type", prediction, PREDICTIONS)
        self.round_timesteps = round_timesteps

    def timestep(self, sigma: Tensor) -> Tensor:
        t = self.schedule.sigma_to_t(sigma.double())
        return (t.round() if self.round_timesteps else t).float()

    def __call__(self, x: Tensor, sigma: Tensor, **extra_args) -> Tensor:
        sigma = sigma.to(x.device, torch.float32).expand(x.shape[0])  # (B,)
        c_skip, c_out, c_in = (append_dims(c, x.ndim) for c in scalings(sigma, self.prediction))
        out = self.model(x * c_in, self.timestep(sigma).to(x.device), **extra_args)
        return (c_skip * x + c_out * out.to(x.dtype)).to(x.dtype)


class ConsistencyBoundary:
    """The boundary-condition parameterisation of consistency models, as LCM uses it
    (Song et al. 2023, eq. 7; Luo et al. 2023):

        f(x, t) = c_skip(t) x_vp + c_out(t) D(x, sigma),
        c_skip = sigma_d^2 / ((s t)^2 + sigma_d^2),   c_out = s t / sqrt((s t)^2 + sigma_d^2)

    with timestep scaling s = 10 and sigma_d = 0.5. At the large t used in practice c_skip is tiny
    (~7e-6 at t = 19), so it matters only for exact parity with LCM's reference scheduler.
    """

    def __init__(self, denoiser: Denoiser, timestep_scaling: float = 10.0, sigma_data: float = 0.5):
        self.denoiser = denoiser
        self.timestep_scaling = timestep_scaling
        self.sigma_data = sigma_data

    def __call__(self, x: Tensor, sigma: Tensor, **extra_args) -> Tensor:
        sigma = sigma.to(x.device, torch.float32).expand(x.shape[0])
        st = self.denoiser.timestep(sigma).to(x.device) * self.timestep_scaling
        c_skip = self.sigma_data**2 / (st**2 + self.sigma_data**2)
        c_out = st / (st**2 + self.sigma_data**2).sqrt()
        x_vp = x / append_dims((sigma**2 + 1).sqrt(), x.ndim)
        x0 = self.denoiser(x, sigma, **extra_args)
        return append_dims(c_out, x.ndim) * x0 + append_dims(c_skip, x.ndim) * x_vp


def network_target(x0: Tensor, noise: Tensor, sigma: Tensor, prediction: Prediction) -> Tensor:
    """What a network of the given prediction type should output for x = x0 + sigma * noise.

    The inverse of the scalings: F = (x0 - c_skip x) / c_out (for x0 prediction, F = x0)."""
    check_choice("prediction type", prediction, PREDICTIONS)
    if prediction == "eps":
        return noise
    if prediction == "x0":
        return x0
    s = append_dims(sigma, x0.ndim)
    # v = alpha eps - sigma_vp x0, with alpha = 1/sqrt(1+s^2), sigma_vp = s/sqrt(1+s^2)
    return (noise - s * x0) / (s**2 + 1).sqrt()
