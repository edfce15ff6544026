"""Inpainting with an ordinary (4-channel) model, as a denoiser combinator.

The region to keep is known at every noise level: at sigma it is ``x0 + sigma * n`` for the
known latents x0 and the noise n the run started with. Replacing the sampler's state there after
every step (RePaint, Lugmayr et al. 2022; diffusers' 4-channel inpainting) needs a hook inside
each sampler. Replacing it on the way into and out of the denoiser needs none, and works for
every sampler (ComfyUI's ``KSamplerX0Inpaint`` does the same):

    D_m(x, sigma) = m * D(m * x + (1 - m) * (x0 + sigma * n), sigma) + (1 - m) * x0

with m = 1 where the model generates and 0 where the image is kept. The network always sees the
known region correctly noised, and the known region of D_m is x0 itself, so on an Euler (or DDIM,
eta = 0) step  x' = x + (sigma' - sigma) (x - D_m) / sigma  the known region goes from
x0 + sigma * n to x0 + sigma' * n: exactly the state diffusers blends in after each step, and x0
at sigma = 0.
"""

from __future__ import annotations

from torch import Tensor

from .denoiser import DenoiserFn, append_dims


class InpaintDenoiser:
    """D_m(x, sigma) of the module docstring.

    Args:
        denoiser: D(x, sigma, **extra_args), e.g. a ``CFGDenoiser``.
        mask: (B or 1, 1, h, w), 1 = generate, 0 = keep (a soft mask blends linearly).
        known: x0, (B or 1, C, h, w), the latents of the image to keep.
        noise: n, (B, C, h, w), the unit noise the run started from.
    """

    def __init__(self, denoiser: DenoiserFn, mask: Tensor, known: Tensor, noise: Tensor):
        if mask.ndim != 4 or mask.shape[1] != 1:
            raise ValueError(f"mask must be (B, 1, h, w), got {tuple(mask.shape)}")
        if known.shape[-2:] != mask.shape[-2:] or noise.shape[-2:] != mask.shape[-2:]:
            raise ValueError(
                f"mask {tuple(mask.shape)}, known latents {tuple(known.shape)} and noise "
                f"{tuple(noise.shape)} must have the same height and width"
            )
        self.denoiser = denoiser
        self.mask, self.known, self.noise = mask, known, noise

    def __call__(self, x: Tensor, sigma: Tensor, **extra_args) -> Tensor:
        m, keep = self.mask.to(x), 1 - self.mask.to(x)
        s = append_dims(sigma.to(x).expand(x.shape[0]), x.ndim)  # (B, 1, 1, 1)
        noised_known = self.known.to(x) + s * self.noise.to(x)  # x0 + sigma * n
        denoised = self.denoiser(m * x + keep * noised_known, sigma, **extra_args)
        return m * denoised + keep * self.known.to(x)
