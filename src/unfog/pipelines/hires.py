"""Hires fix, A1111's two-pass txt2img: draw at the model's size, upscale (the latents, or the
decoded image), then redraw at the larger size as img2img with a denoising strength, so a model
trained at 512 px makes a coherent 1024 px image. Upscaler names are A1111's."""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from ..diffusion.schedules import check_choice

# A1111's latent upscale modes: (torch interpolation mode, antialias)
LATENT_UPSCALERS: dict[str, tuple[str, bool]] = {
    "Latent": ("bilinear", False), "Latent (antialiased)": ("bilinear", True),
    "Latent (bicubic)": ("bicubic", False), "Latent (bicubic antialiased)": ("bicubic", True),
    "Latent (nearest)": ("nearest", False), "Latent (nearest-exact)": ("nearest-exact", False),
}
# Image upscalers: decode, resize the image, encode again ("None" resizes with Lanczos, as A1111).
IMAGE_UPSCALERS: dict[str, Image.Resampling] = {"None": Image.LANCZOS, "Lanczos": Image.LANCZOS,
                                                 "Nearest": Image.NEAREST}
UPSCALERS: tuple[str, ...] = (*LATENT_UPSCALERS, *IMAGE_UPSCALERS)


@dataclass(frozen=True)
class Hires:
    """The second pass: ``scale`` times the first pass's size, or ``resize`` (width, height;
    either may be 0: kept to the first pass's aspect); ``steps`` (0: the first pass's), its own
    ``sampler`` / prompts (None: the first pass's); ``strength`` is A1111's denoising strength."""

    upscaler: str = "Latent"
    scale: float = 2.0
    resize: tuple[int, int] = (0, 0)
    steps: int = 0
    strength: float = 0.7
    sampler: str | None = None
    prompt: str | None = None
    negative_prompt: str | None = None

    def __post_init__(self):
        check_choice("hires upscaler", self.upscaler, UPSCALERS)
        if not self.scale > 0 or self.steps < 0 or min(self.resize) < 0:
            raise ValueError(f"hires scale must be > 0, steps and resize >= 0; got {self.scale}, {self.steps}, "
                             f"{self.resize}")
        if not 0 < self.strength <= 1:
            raise ValueError(f"hires denoising strength must be in (0, 1], got {self.strength}")


def target_size(width: int, height: int, hires: Hires, multiple: int) -> tuple[int, int]:
    """The second pass's (width, height), as A1111 sizes it: ``scale`` times the first pass, or
    ``resize`` with a 0 side following the aspect ratio; both sides rounded down to ``multiple``."""
    rx, ry = hires.resize
    if rx == 0 and ry == 0:
        w, h = int(width * hires.scale), int(height * hires.scale)
    elif ry == 0:
        w, h = rx, rx * height // width
    elif rx == 0:
        w, h = ry * width // height, ry
    else:
        w, h = rx, ry
    w, h = w // multiple * multiple, h // multiple * multiple
    if w < multiple or h < multiple:
        raise ValueError(f"the hires size {w}x{h} is too small; it must be at least {multiple} on each side")
    return w, h


def upscale_latents(latents: Tensor, size: tuple[int, int], upscaler: str) -> Tensor:
    """(B, C, h, w) -> (B, C, H, W) latents by ``upscaler``'s interpolation; with both sides given
    at another aspect ratio, scaled to cover and cropped at the centre (A1111's resize-and-crop)."""
    mode, antialias = LATENT_UPSCALERS[upscaler]
    H, W = size
    h, w = latents.shape[-2:]
    s = max(H / h, W / w)
    ch, cw = max(H, round(h * s)), max(W, round(w * s))
    extra = {} if mode.startswith("nearest") else {"align_corners": False, "antialias": antialias}
    up = F.interpolate(latents.float(), size=(ch, cw), mode=mode, **extra)
    top, left = (ch - H) // 2, (cw - W) // 2
    return up[..., top:top + H, left:left + W]


def upscale_image(image: Image.Image, size: tuple[int, int], upscaler: str) -> Image.Image:
    """The image resized by ``upscaler`` to (width, height), covering it and cropped at the centre."""
    from PIL import ImageOps

    return ImageOps.fit(image, size, IMAGE_UPSCALERS[upscaler])
