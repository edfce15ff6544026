"""Classifier-free guidance as a denoiser combinator (Ho & Salimans 2022).

    D_cfg(x, sigma) = D(x, sigma | uncond) + w (D(x, sigma | cond) - D(x, sigma | uncond))

Because D is affine in the network output, guiding D equals guiding eps or v with the same w.
The optional guidance rescale (Lin et al. 2023, sec. 3.4, eqs. 15-16) is not affine: it matches
the per-sample standard deviation of the guided prediction to that of the conditional one,

    F_rescaled = F_cfg * std(F_cond) / std(F_cfg),   F = phi F_rescaled + (1 - phi) F_cfg,

and so depends on which quantity F is rescaled. diffusers rescales the network's own output (eps
for eps models, v for v models); pass that as ``rescale_space`` to get the same numbers.

CFG truncation (diffusers' CFG cut-off callback; A1111's "negative guidance minimum sigma" is the
same idea on every other step): at the low noise levels the guided and the conditional
predictions differ little, so below ``cond_only_below`` the unconditional pass is skipped and
D_cfg = D(x, sigma | cond): one network call of batch B instead of 2B.
"""

from __future__ import annotations

import math
from typing import Mapping

import torch
from torch import Tensor

from .denoiser import PREDICTIONS, DenoiserFn, Prediction, append_dims, scalings
from ..choices import check_choice


class CFGDenoiser:
    """D_cfg(x, sigma): one batched call with the unconditional and conditional inputs stacked.

    Args:
        denoiser: D(x, sigma, **extra_args).
        cond / uncond: keyword arguments for the conditional and unconditional passes, e.g.
            ``{"y": labels}`` and ``{"y": null_labels}``; each tensor has the batch size of x.
        scale: guidance weight w >= 0 (1 = no guidance, 0 = unconditional).
        rescale: phi in [0, 1]; 0 turns the rescale off.
        rescale_space: the quantity the rescale acts on: "eps", "v" or "x0".
        cond_only_below: at sigma <= this the conditional denoiser alone (CFG truncation); the
            default, -1, never.
    """

    def __init__(
        self,
        denoiser: DenoiserFn,
        cond: Mapping[str, Tensor],
        uncond: Mapping[str, Tensor],
        scale: float,
        *,
        rescale: float = 0.0,
        rescale_space: Prediction = "eps",
        cond_only_below: float = -1.0,
    ):
        if scale < 0:
            raise ValueError(f"guidance scale must be >= 0, got {scale}")
        if not 0 <= rescale <= 1:
            raise ValueError(f"guidance rescale must be in [0, 1], got {rescale}")
        if set(cond) != set(uncond):
            raise ValueError(f"cond and uncond need the same keys, got {sorted(cond)} and {sorted(uncond)}")
        self.denoiser = denoiser
        self.cond, self.uncond = dict(cond), dict(uncond)
        self.scale = scale
        self.rescale = rescale
        self.rescale_space = check_choice("rescale space", rescale_space, PREDICTIONS)
        self.cond_only_below = cond_only_below

    def __call__(self, x: Tensor, sigma: Tensor) -> Tensor:
        sigma = sigma.expand(x.shape[0])
        if self.cond_only_below >= 0 and bool((sigma <= self.cond_only_below).all()):
            return self.denoiser(x, sigma, **self.cond)
        extra = {k: torch.cat([self.uncond[k], self.cond[k]]) for k in self.cond}
        d_uncond, d_cond = self.denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), **extra).chunk(2)
        d_cfg = d_uncond + self.scale * (d_cond - d_uncond)
        if self.rescale == 0:
            return d_cfg
        return self._rescaled(x, sigma, d_cond, d_cfg)

    def _rescaled(self, x: Tensor, sigma: Tensor, d_cond: Tensor, d_cfg: Tensor) -> Tensor:
        # Move to the rescale space F = (D - c_skip x) / c_out, rescale, and come back.
        c_skip, c_out, _ = (append_dims(c, x.ndim) for c in scalings(sigma.to(x.dtype), self.rescale_space))
        f_cond, f_cfg = (d_cond - c_skip * x) / c_out, (d_cfg - c_skip * x) / c_out
        dims = list(range(1, x.ndim))
        ratio = f_cond.std(dim=dims, keepdim=True) / f_cfg.std(dim=dims, keepdim=True)
        f = self.rescale * f_cfg * ratio + (1 - self.rescale) * f_cfg
        return c_skip * x + c_out * f


def class_guidance(denoiser: DenoiserFn, labels: Tensor, null_class: int, scale: float) -> DenoiserFn:
    """Classifier-free guidance of a class-conditional denoiser (keyword ``y``: labels (B,)) against
    the null class, the label trained as "no class"; scale 1 is the conditional denoiser alone."""
    if scale < 0:
        raise ValueError(f"guidance scale must be >= 0, got {scale}")
    cond = {"y": labels}
    if scale == 1:
        return lambda x, sigma: denoiser(x, sigma, **cond)
    return CFGDenoiser(denoiser, cond, {"y": torch.full_like(labels, null_class)}, scale)


def truncation_sigma(sigmas: Tensor, fraction: float) -> float:
    """CFG truncation at ``fraction`` of a run over ``sigmas`` (steps + 1 values, the last 0): the
    sigma from which the conditional pass runs alone, that of step ceil(fraction * steps); -1
    (never) when that is past the last step. E.g. 20 steps at 0.8: steps 16-19 unguided."""
    steps = len(sigmas) - 1
    first = math.ceil(fraction * steps - 1e-9)  # 0.8 * 20 = 16.000000000000004 is step 16
    return -1.0 if first >= steps else float(sigmas[first])
