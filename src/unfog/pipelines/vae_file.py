"""Another VAE for a pipeline (A1111's "SD VAE" setting, diffusers' ``vae=``): read it from any
file a VAE comes in, and check that it speaks the pipeline's latent space.

A VAE file is one of: an official single file of a bare VAE (e.g. ``vae-ft-mse-840000-ema-pruned``,
``sdxl_vae.safetensors``) or a full checkpoint (its VAE is taken), a diffusers ``AutoencoderKL``
folder (``config.json`` + weights), an unfog autoencoder (task ``autoencoder``) or an unfog
text-to-image model (its VAE).

The latent space belongs to the U-Net: the swapped-in VAE must have the same latent channels and
downsampling factor, and it is used with the pipeline's scaling factor, not its own (a decoder
fine-tuned on a frozen encoder, as Stability's ``ft-MSE`` VAEs and unfog's
``autoencoder.train_encoder = false`` are, shares its model's latents and its factor).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from ..models.vae import AutoencoderKL
from ..checkpoint.io import read_metadata
from .latent_model import FORMAT, VAE_FORMAT, load_autoencoder


def read_vae(path: str | Path, dtype: torch.dtype = torch.float32) -> AutoencoderKL:
    """The VAE in ``path`` (module docstring), in ``dtype``, in eval mode."""
    from ..checkpoint import load_components

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"VAE not found: {path}")
    if path.is_file() and path.suffix == ".safetensors" and (read_metadata(path) or {}).get("format") in (
            FORMAT, VAE_FORMAT):
        return load_autoencoder(path).to(dtype).eval()
    parts = load_components(path, dtype=dtype)
    if parts.vae is None:
        held = ", ".join(n for n in ("unet", "text_encoder", "text_encoder_2") if getattr(parts, n) is not None)
        raise ValueError(f"{path} holds no VAE (it holds {held or 'nothing unfog reads'}); give a VAE file, a "
                         "checkpoint with a VAE or a diffusers AutoencoderKL folder")
    return parts.vae.eval()


def fit_vae(new: AutoencoderKL, old: AutoencoderKL, what: str) -> AutoencoderKL:
    """``new`` set up to replace ``old``: refused unless its latents have ``old``'s channels and
    downsampling; it takes ``old``'s scaling factor, dtype and device."""
    a, b = new.config, old.config
    if (a.latent_channels, a.downsample_factor) != (b.latent_channels, b.downsample_factor):
        raise ValueError(f"{what} makes {a.latent_channels}-channel latents at 1/{a.downsample_factor} of the image; "
                         f"this model's U-Net works on {b.latent_channels}-channel latents at 1/{b.downsample_factor} "
                         "(an SDXL VAE goes with SDXL, an SD VAE with SD 1.x / 2.x)")
    p = next(old.parameters())
    new.config = replace(a, scaling_factor=b.scaling_factor)
    return new.to(device=p.device, dtype=p.dtype).eval()

