"""Where a ``StableDiffusion`` run starts: the init image and mask checked against the other
ways to start, the size of the output, and x at the first sigma.

    txt2img     unit noise (or the caller's ``latents``) times sqrt(1 + sigma_0^2), the VP prior
    img2img     the VAE latents of the image (or ``init_latents``) + sigma_0 * noise
    inpainting  as img2img, or from noise at strength 1; a 9-channel U-Net also gets the mask
                and the masked image's latents, a 4-channel one the blend's reference

Random draws come from one CPU generator in diffusers' order (VAE sample of the image, the
noise, VAE sample of the masked image), so a seed gives diffusers' start exactly.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ..choices import check_choice
from . import inputs

if TYPE_CHECKING:
    from .stable_diffusion import StableDiffusion


def checked_images(pipe: StableDiffusion, init_image, mask, latents, init_latents, denoising_start,
                   masked_content: str) -> tuple[Tensor | None, Tensor | None]:
    """(image (B, 3, H, W) in [-1, 1] or None, mask (B, 1, H, W) or None), checked against the
    other starts; with masked content "fill" the masked area is filled from its surroundings."""
    check_choice("masked content", masked_content, inputs.MASKED_CONTENT)
    image = None if init_image is None else inputs.image_tensor(init_image)
    pixel_mask = None if mask is None else inputs.mask_tensor(mask)
    _check_mode(pipe, image, pixel_mask, latents, denoising_start)
    if init_latents is not None and (image is not None or latents is not None):
        raise ValueError("init_latents start img2img from latents: give them without init_image and latents")
    if masked_content != "original" and pixel_mask is None:
        raise ValueError(f"masked content {masked_content!r} needs a mask (inpainting)")
    if masked_content == "fill":
        inputs.check_mask_fits(pixel_mask, image)
        image = inputs.fill_masked(image, inputs.batch_of(pixel_mask, image.shape[0], "mask"))
    return image, pixel_mask


def _check_mode(pipe: StableDiffusion, image, mask, latents, denoising_start) -> None:
    if mask is not None and image is None:
        raise ValueError("a mask needs the init_image it applies to")
    if mask is not None:
        inputs.check_mask_fits(mask, image)
    if pipe.inpainting_unet and mask is None:
        raise ValueError("this is an inpainting U-Net (9 input channels): give init_image and mask")
    if denoising_start is not None and (latents is None or image is not None):
        raise ValueError("denoising_start goes on from the latents a run with denoising_end returned: "
                         "pass them as latents=, without init_image")


def output_size(pipe: StableDiffusion, height, width, image, latents) -> tuple[int, int]:
    """(height, width) of the images: from init_image or latents when given, else the arguments."""
    known = None
    if image is not None:
        known = tuple(image.shape[-2:])
    elif latents is not None:
        known = tuple(d * pipe.vae.config.downsample_factor for d in latents.shape[-2:])
    if known is not None:
        if (height or known[0], width or known[1]) != known:
            raise ValueError(f"width x height {width}x{height} differs from the {known[1]}x{known[0]} of the "
                             "init_image / latents; leave width and height out")
        height, width = known
    height, width = height or pipe.default_size, width or pipe.default_size
    inputs.check_image_size(width, height, pipe.size_multiple)
    return height, width


def checked_latents(latents: Tensor, shape, device: torch.device) -> Tensor:
    """The caller's latents, float32 on ``device``, if they have the run's ``shape``."""
    if tuple(latents.shape) != tuple(shape):
        raise ValueError(f"latents must have shape {tuple(shape)} (batch, channels, height / f, width / f), "
                         f"got {tuple(latents.shape)}")
    return latents.to(device, torch.float32)


def start_latents(pipe: StableDiffusion, g: torch.Generator, shape, sigma0: float, image, mask, latents,
                  strength: float, encode: str, masked_content: str = "original",
                  init_latents: Tensor | None = None):
    """x at sigma0, the inpainting U-Net's extra input, and the 4-channel blend (or None).
    "latent noise" / "latent nothing" change where the masked area starts from, not the blend's
    reference outside it (the same latents there)."""
    n, (h, w), device = shape[0], shape[2:], pipe.device
    if init_latents is not None:
        x0 = inputs.batch_of(checked_latents(init_latents, (init_latents.shape[0], *shape[1:]), device), n,
                             "init_latents")
        noise = torch.randn(shape, generator=g).to(device)
        return x0 + sigma0 * noise, {}, None
    from_noise = image is None or (mask is not None and strength == 1)  # txt2img, or inpainting at strength 1
    needs_x0 = image is not None and not (from_noise and pipe.inpainting_unet)
    x0 = inputs.batch_of(pipe.encode(image, g, encode), n, "init_image") if needs_x0 else None
    if latents is None:
        noise = torch.randn(shape, generator=g).to(device)  # (n, 4, h, w), drawn on the CPU
    else:
        noise = checked_latents(latents, shape, device)
    small = None if mask is None else inputs.batch_of(inputs.latent_mask(mask, (h, w)), n, "mask").to(device)
    start = x0
    if masked_content in ("latent noise", "latent nothing") and not from_noise:  # small: (n, 1, h, w)
        start = x0 * (1 - small) + (noise * small if masked_content == "latent noise" else 0)
    x = noise * math.sqrt(1 + sigma0**2) if from_noise else start + sigma0 * noise  # the VP prior, or x0 + sigma n
    if mask is None:
        return x, {}, None
    if mask.shape[0] != image.shape[0]:
        mask, image = inputs.batch_of(mask, n, "mask"), inputs.batch_of(image, n, "init_image")
    if not pipe.inpainting_unet:
        return x, {}, (small, x0, noise)
    masked = inputs.batch_of(pipe.encode(image * (mask < 0.5), g, encode), n, "init_image")  # draw 3
    return x, {"concat": torch.cat([small, masked], dim=1)}, None
