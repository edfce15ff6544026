"""The forward process q(x_t | x_0) and the training objectives.

Training draws a discrete timestep t, noise eps and forms the VP sample

    x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps          (DDPM, eq. 4)

and regresses the network output on its target: eps (Ho et al. 2020, eq. 14), v = sqrt(alpha_bar)
eps - sqrt(1 - alpha_bar) x_0 (Salimans & Ho 2022), or x_0 itself. Min-SNR-gamma (Hang et al.
2023) reweights the per-sample losses by min(SNR, gamma) / SNR for eps, min(SNR, gamma) / (SNR + 1)
for v and min(SNR, gamma) for x_0, so that every objective is the x_0-loss weighted by
min(SNR, gamma). Offset noise (Guttenberg 2023) adds a per-channel constant to eps so the model
can learn to change an image's mean brightness.

Timesteps are drawn uniformly unless a timestep bias is set: "later" draws the last ``portion`` of
the timesteps (the noisiest) ``multiplier`` times as often as the others, "earlier" the first
``portion`` (the least noisy); diffusers' SDXL training script offers the same strategies. The
noisiest steps are where a text-to-image model decides the layout of its image (where each object
goes), and both Min-SNR for v and plain eps leave them almost no weight.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from .denoiser import PREDICTIONS, Prediction, append_dims, network_target
from ..choices import check_choice
from .schedules import DiscreteSchedule


def q_sample(x0: Tensor, t: Tensor, noise: Tensor, schedule: DiscreteSchedule) -> Tensor:
    """x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) noise for integer timesteps t (B,)."""
    ab = schedule.alphas_cumprod.to(x0.device)[t].to(x0.dtype)
    return append_dims(ab.sqrt(), x0.ndim) * x0 + append_dims((1 - ab).sqrt(), x0.ndim) * noise


def snr(t: Tensor, schedule: DiscreteSchedule) -> Tensor:
    """Signal-to-noise ratio alpha_bar / (1 - alpha_bar) = 1 / sigma^2 at integer timesteps."""
    return 1 / schedule.sigmas.to(t.device)[t] ** 2


def min_snr_weight(t: Tensor, schedule: DiscreteSchedule, prediction: Prediction, gamma: float) -> Tensor:
    """Per-sample loss weight of Min-SNR-gamma for a network of the given prediction type."""
    check_choice("prediction type", prediction, PREDICTIONS)
    s = snr(t, schedule)
    clipped = s.clamp(max=gamma)
    if prediction == "eps":
        return clipped / s
    if prediction == "v":
        return clipped / (s + 1)
    return clipped


def offset_noise(shape: torch.Size, strength: float, generator: torch.Generator | None = None) -> Tensor:
    """N(0, I) noise plus strength * a per-(sample, channel) constant, drawn on the CPU in float32."""
    noise = torch.randn(shape, generator=generator)
    if strength == 0:
        return noise
    shift = torch.randn(shape[:2], generator=generator)
    return noise + strength * append_dims(shift, len(shape))


TIMESTEP_BIASES = ("none", "later", "earlier")


def timestep_probabilities(num_timesteps: int, bias: str = "none", multiplier: float = 1.0,
                           portion: float = 0.25) -> Tensor:
    """(T,) float64 probabilities of drawing each timestep: uniform, or the last ("later") or first
    ("earlier") ``round(portion * T)`` timesteps ``multiplier`` times as likely as the rest."""
    check_choice("timestep bias", bias, TIMESTEP_BIASES)
    p = torch.ones(num_timesteps, dtype=torch.float64)
    k = round(portion * num_timesteps)
    if bias == "later" and k > 0:
        p[num_timesteps - k :] = multiplier
    elif bias == "earlier" and k > 0:
        p[:k] = multiplier
    return p / p.sum()


def draw_timesteps(n: int, schedule: DiscreteSchedule, config: LossConfig,
                   generator: torch.Generator | None = None) -> Tensor:
    """(n,) int64 training timesteps: U{0..T-1}, or with the config's timestep bias."""
    if config.timestep_bias == "none":
        return torch.randint(0, schedule.num_timesteps, (n,), generator=generator)
    p = timestep_probabilities(schedule.num_timesteps, config.timestep_bias, config.timestep_bias_multiplier,
                               config.timestep_bias_portion)
    return torch.multinomial(p, n, replacement=True, generator=generator)


def draw_noise(shape: torch.Size, schedule: DiscreteSchedule, config: LossConfig,
               generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """The random draws of a training step, on the CPU: timesteps t (B,) (``draw_timesteps``),
    then the noise (B, ...) with the config's offset noise."""
    t = draw_timesteps(shape[0], schedule, config, generator)
    return t, offset_noise(shape, config.offset_noise, generator)


@dataclass(frozen=True)
class LossConfig:
    prediction: Prediction = "eps"
    min_snr_gamma: float | None = None  # e.g. 5.0; None = unweighted
    offset_noise: float = 0.0
    timestep_bias: str = "none"  # "later": the noisiest timesteps drawn more often; "earlier": the least
    timestep_bias_multiplier: float = 1.0
    timestep_bias_portion: float = 0.25

    def __post_init__(self):
        check_choice("prediction type", self.prediction, PREDICTIONS)
        check_choice("timestep bias", self.timestep_bias, TIMESTEP_BIASES)
        if self.min_snr_gamma is not None and self.min_snr_gamma <= 0:
            raise ValueError(f"min_snr_gamma must be > 0, got {self.min_snr_gamma}")
        if self.timestep_bias_multiplier <= 0:
            raise ValueError(f"timestep_bias_multiplier must be > 0, got {self.timestep_bias_multiplier}")
        if not 0 < self.timestep_bias_portion < 1:
            raise ValueError(f"timestep_bias_portion must be in (0, 1), got {self.timestep_bias_portion}")


def diffusion_loss(
    model: Callable[..., Tensor],
    x0: Tensor,
    schedule: DiscreteSchedule,
    config: LossConfig = LossConfig(),
    *,
    generator: torch.Generator | None = None,
    t: Tensor | None = None,
    noise: Tensor | None = None,
    teacher: Callable[..., Tensor] | None = None,
    **model_kwargs,
) -> Tensor:
    """Mean training loss over a batch: draw t ~ U{0..T-1} and the noise (or take ``t`` and
    ``noise`` from ``draw_noise``, as distributed training does for its slice of a global batch),
    noise x0, and compare ``model(x_t, t, **model_kwargs)`` with the target of ``config.prediction``.
    With ``teacher`` the target is instead ``teacher(x_t, t, **model_kwargs)`` (no gradient): the
    model is fitted to another model's prediction (self-distillation), whose expectation is the same
    target where the teacher is right, with none of the noise's variance."""
    if (t is None) != (noise is None):
        raise ValueError("give both t and noise, or neither")
    if t is None:
        t, noise = draw_noise(x0.shape, schedule, config, generator)
    t, noise = t.to(x0.device), noise.to(x0.device, x0.dtype)
    x_t = q_sample(x0, t, noise, schedule)
    sigma = schedule.sigmas.to(x0.device)[t].to(x0.dtype)
    if teacher is None:
        target = network_target(x0, noise, sigma, config.prediction)
    else:
        with torch.no_grad():
            target = teacher(x_t, t.to(x0.dtype), **model_kwargs)
    out = model(x_t, t.to(x0.dtype), **model_kwargs)
    per_sample = (out.float() - target.float()).pow(2).flatten(1).mean(1)  # (B,)
    if config.min_snr_gamma is not None:
        per_sample = per_sample * min_snr_weight(t, schedule, config.prediction, config.min_snr_gamma).float()
    return per_sample.mean()
