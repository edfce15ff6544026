"""The conditioning of a diffusion super-resolution model (SR3, Saharia et al. 2021; the cascade's
upsamplers in Ho et al. 2021, "Cascaded Diffusion Models", and Imagen, Saharia et al. 2022).

The model draws a ``size`` x ``size`` image given a ``low_res`` x ``low_res`` one, which it sees
upsampled (bicubic) to ``size`` and concatenated to its noisy input as extra channels, and given
the caption as the base model is. Noise-conditioning augmentation (CDM sec. 3; Imagen sec. 2.5):
the low-resolution image is itself noised by the forward process to a level s, and s is an input
of the model (its sinusoidal embedding, 256 wide, as the U-Net's vector ``y``). In training s is
drawn uniformly from the first ``augmentation_max`` of the timesteps, so the model learns to
correct a base model's artefacts instead of copying them; at sampling a fixed s is chosen.

    low = upsample(downsample(image))            the training pair: the image and its degraded self
    z_s = sqrt(abar_s) low + sqrt(1 - abar_s) n  noise augmentation
    net(cat[x_t, z_s], t, context, y=emb(s))     the model's call
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..diffusion.losses import q_sample
from ..diffusion.schedules import DiscreteSchedule
from ..nn.embeddings import timestep_embedding

AUGMENTATION_DIM = 256  # width of the augmentation level's embedding: the U-Net's adm_in_channels


def degrade(images: Tensor, low_res: int, size: tuple[int, int] | None = None) -> Tensor:
    """What an SR model sees of images (B, C, H, W) in [-1, 1]: brought to ``low_res`` on the
    shorter side (area averaging; an image of that size is kept), then up to ``size`` (default:
    their own) by ``upsample``. In training, the degraded image itself; at sampling, the base
    model's output."""
    h, w = images.shape[-2:]
    scale = low_res / min(h, w)
    small = images if scale == 1 else F.interpolate(images, size=(round(h * scale), round(w * scale)), mode="area")
    return upsample(small, size or (h, w))


def upsample(low: Tensor, size: tuple[int, int]) -> Tensor:
    """A low-resolution image (B, C, h, w) in [-1, 1] to ``size`` (bicubic, clamped): what the SR
    model sees, and the baseline it is measured against."""
    return F.interpolate(low.float(), size=size, mode="bicubic", align_corners=False).clamp(-1, 1)


def augmentation_level(level: float, schedule: DiscreteSchedule) -> int:
    """The timestep of augmentation level ``level`` in [0, 1) (a fraction of the T steps)."""
    if not 0 <= level < 1:
        raise ValueError(f"noise augmentation must be in [0, 1) (a fraction of the noise schedule), got {level}")
    return min(int(round(level * schedule.num_timesteps)), schedule.num_timesteps - 1)


def augment(low: Tensor, s: Tensor, noise: Tensor, schedule: DiscreteSchedule) -> tuple[Tensor, Tensor]:
    """(z_s, y): the low-resolution input noised to integer levels s (B,), and the embedding of s."""
    return q_sample(low, s, noise, schedule), timestep_embedding(s.float(), AUGMENTATION_DIM).to(low.dtype)


def condition(image: Tensor, low_res: int, size: tuple[int, int], s: int, schedule: DiscreteSchedule,
              generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """At sampling: (z_s, y) for images (B, C, h, w) to be upsampled to ``size`` at level s, the
    augmentation noise drawn on the CPU from ``generator``."""
    low = degrade(image, low_res, size)  # to the model's low_res side, then up to the output size
    n = low.shape[0]
    return augment(low, torch.full((n,), s), torch.randn(low.shape, generator=generator), schedule)


def check_super_resolution_unet(cfg, latent: int) -> None:
    """A super-resolution model's U-Net: 2C input channels (the image and the low-resolution one)
    and the noise level as its vector y."""
    if cfg.in_channels != 2 * latent or cfg.num_classes != "sequential" or cfg.adm_in_channels != AUGMENTATION_DIM:
        raise ValueError(f"a super-resolution model needs a U-Net of {2 * latent} input channels (the image and the "
                         f"low-resolution one) with y of {AUGMENTATION_DIM} (the noise level), got "
                         f"{cfg.in_channels} channels, num_classes={cfg.num_classes!r}, "
                         f"adm_in_channels={cfg.adm_in_channels}")
