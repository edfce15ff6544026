"""Class-conditional latent sampling with a DiT (what diffusers' ``DiTPipeline`` does).

The official DiT models (facebookresearch/DiT, ImageNet 256 and 512) were trained on the latents
of Stable Diffusion's VAE (``sd-vae-ft-ema`` / ``-mse``, scaling 0.18215) with ADM's linear
schedule (betas 1e-4 .. 0.02 over 1000 steps) and a learned variance. Sampling here uses the
network's eps only (the first C of its 2C channels), as diffusers' pipeline does, through the
same denoiser and samplers as every other model; the learned variance is not used (the official
``sample.py`` uses it in its 250-step DDPM; diffusers' pipeline does not).

Classifier-free guidance is against the null class ``num_classes`` (row 1000 of the official
embedding table) and, as in diffusers' pipeline and the official code since 2023, acts on all C
eps channels.

    pipe = ClassConditionalDiT.load("DiT-XL-2-256x256.pt", vae="sd-vae-ft-ema.safetensors")
    images = pipe([207, 360], steps=50, cfg_scale=4.0, seed=0)   # PIL images
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

from ..checkpoint.dit import load_dit
from ..choices import check_choice
from ..diffusion import Denoiser, DiscreteSchedule, get_sigmas, resolve_sampler
from ..diffusion.guidance import class_guidance
from ..models.dit import DiT
from ..models.vae import AutoencoderKL
from . import inputs
from .vae_file import read_vae

Output = Literal["pil", "tensor", "latent"]
# DDIM at 50 steps with guidance 4 (the DiT paper's scale for its samples; 1.5 for its FID figures).
SAMPLING_DEFAULTS = {"sampler": "ddim", "steps": 50, "cfg_scale": 4.0}


def dit_schedule() -> DiscreteSchedule:
    """ADM's linear schedule, which the official DiT models were trained with."""
    return DiscreteSchedule.make("linear", 1000, 0.0001, 0.02)


class ClassConditionalDiT:
    """A class-conditional DiT, the VAE its latents decode with, and its schedule.

    ``steps_offset`` 0 and "leading" spacing are diffusers' scheduler defaults, with which its
    ``DiTPipeline`` runs."""

    def __init__(self, dit: DiT, vae: AutoencoderKL, schedule: DiscreteSchedule | None = None, *,
                 spacing: str = "leading", steps_offset: int = 0):
        if not dit.config.num_classes:
            raise ValueError("this DiT has no class labels; ClassConditionalDiT draws class-conditional models")
        if vae.config.latent_channels != dit.config.in_channels:
            raise ValueError(f"the VAE has {vae.config.latent_channels} latent channels but the DiT takes "
                             f"{dit.config.in_channels}")
        self.dit, self.vae = dit.eval(), vae.eval()
        self.schedule = schedule or dit_schedule()
        self.spacing, self.steps_offset = spacing, steps_offset

    @classmethod
    def load(cls, path: str | Path, *, vae: str | Path, num_heads: int | None = None,
             dtype: torch.dtype = torch.float32) -> "ClassConditionalDiT":
        """A DiT file (``checkpoint.dit.load_dit``) and a VAE file (any ``--vae`` unfog reads)."""
        return cls(load_dit(path, num_heads=num_heads, dtype=dtype), read_vae(vae, dtype))

    def eps(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        """The network's eps: the first C channels (a learned-sigma model adds C more)."""
        return self.dit(x, t, y=y)[:, : self.dit.config.in_channels].float()

    @torch.no_grad()
    def __call__(self, class_labels, *, steps: int = 50, sampler: str = "ddim", spacing: str | None = None,
                 cfg_scale: float = 4.0, seed: int = 0, latents: Tensor | None = None, output: Output = "pil",
                 callback=None, **sampler_options):
        """Images of ``class_labels`` (an int or a list): PIL images, a tensor (B, 3, H, W) in [-1, 1]
        (``output="tensor"``) or the final latents (``"latent"``). ``latents``: the start noise,
        (B, C, h, w) at unit variance, instead of drawing it from ``seed`` on the CPU. ``spacing``:
        of the sigmas (default: the sampler name's, else "leading")."""
        check_choice("output", output, ("pil", "tensor", "latent"))
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        cfg = self.dit.config
        labels = inputs.class_labels(class_labels, cfg.num_classes)
        if cfg_scale != 1 and not cfg.null_class:
            raise ValueError("this DiT has no null class (it was trained without label dropout): use cfg_scale 1")
        choice = resolve_sampler(sampler)
        sigmas = get_sigmas(self.schedule, steps, spacing or choice.spacing or self.spacing, steps_offset=self.steps_offset)
        device = next(self.dit.parameters()).device
        g = torch.Generator().manual_seed(seed)
        shape = (labels.numel(), cfg.in_channels, cfg.input_size, cfg.input_size)
        if latents is None:
            latents = torch.randn(shape, generator=g)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents must be {shape} for {labels.numel()} labels, got {tuple(latents.shape)}")
        x = latents.float().to(device) * (1 + float(sigmas[0]) ** 2) ** 0.5  # the VP prior, on the sigma scale
        den = class_guidance(Denoiser(self.eps, self.schedule, "eps"), labels.to(device), cfg.num_classes, cfg_scale)
        x = choice.fn(den, x, sigmas, generator=g, callback=callback, **{**choice.options, **sampler_options})
        if output == "latent":
            return x
        images = self.vae.decode(x / self.vae.config.scaling_factor).clamp(-1, 1).float().cpu()  # in the VAE's dtype
        return images if output == "tensor" else inputs.to_pil(images)
