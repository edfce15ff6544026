"""The edge of the image pipelines: PIL images and tensors in, checked tensors out, and back.

Conventions: images are (B, 3, H, W) float in [-1, 1]; masks are (B, 1, H, W) in [0, 1] with
1 (white) where the model paints and 0 (black) where the image is kept, as in A1111 and
diffusers. Masks are binarised at 0.5, as diffusers' mask processor does.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from .images import to_uint8

ImageInput = Image.Image | Tensor


def image_tensor(image: ImageInput) -> Tensor:
    """A PIL image (any mode, read as RGB) or a tensor (3, H, W) / (B, 3, H, W) in [-1, 1]
    -> a new float32 tensor (B, 3, H, W) on the CPU."""
    if isinstance(image, Image.Image):
        pixels = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32))  # (H, W, 3)
        return (pixels / 127.5 - 1).permute(2, 0, 1)[None]
    if not isinstance(image, Tensor):
        raise TypeError(f"init_image must be a PIL image or a tensor, got {type(image).__name__}")
    x = image[None] if image.ndim == 3 else image
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"init_image must be (3, H, W) or (B, 3, H, W) in [-1, 1], got {tuple(image.shape)}")
    return x.detach().to("cpu", torch.float32, copy=True)


def mask_tensor(mask: ImageInput) -> Tensor:
    """A PIL image (read as greyscale) or a tensor (H, W) / (1, H, W) / (B, 1, H, W) in [0, 1]
    -> a new binary float32 tensor (B, 1, H, W) on the CPU: 1 = paint, 0 = keep."""
    if isinstance(mask, Image.Image):
        m = torch.from_numpy(np.asarray(mask.convert("L"), dtype=np.float32) / 255)[None, None]
    elif isinstance(mask, Tensor):
        m = mask.detach().to("cpu", torch.float32)
        m = m.reshape(1, 1, *m.shape) if m.ndim == 2 else m[None] if m.ndim == 3 else m
        if m.ndim != 4 or m.shape[1] != 1:
            raise ValueError(f"mask must be (H, W), (1, H, W) or (B, 1, H, W), got {tuple(mask.shape)}")
    else:
        raise TypeError(f"mask must be a PIL image or a tensor, got {type(mask).__name__}")
    return (m >= 0.5).float()


def check_mask_fits(mask: Tensor, image: Tensor) -> None:
    """The mask must cover the image pixel for pixel."""
    if mask.shape[-2:] != image.shape[-2:]:
        (mh, mw), (ih, iw) = mask.shape[-2:], image.shape[-2:]
        raise ValueError(
            f"the mask is {mw}x{mh} (width x height) but the image is {iw}x{ih}; give a mask of the "
            "image's size"
        )


def latent_mask(mask: Tensor, size: tuple[int, int]) -> Tensor:
    """(B, 1, H, W) -> (B, 1, h, w) by nearest-neighbour sampling, as diffusers' inpainting."""
    return F.interpolate(mask, size=size, mode="nearest")


def check_image_size(width: int, height: int, multiple: int) -> None:
    """Both sides must be positive multiples of ``multiple``; the error names the nearest valid
    values."""
    for name, value in (("width", width), ("height", height)):
        if value < multiple or value % multiple:
            low = max(value // multiple * multiple, multiple)
            high = low + multiple if low < value else low
            nearest = f"{low}" if low == high else f"{low} or {high}"
            raise ValueError(f"{name} {value} is not a multiple of {multiple}; nearest valid values: {nearest}")


def class_labels(labels, num_classes: int) -> Tensor:
    """Class labels (an int, a list or a tensor) -> (B,) int64, each checked to be in 0..num_classes - 1."""
    labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
    if not labels.numel():
        raise ValueError(f"give at least one class label in 0..{num_classes - 1}")
    bad = labels[(labels < 0) | (labels >= num_classes)]
    if bad.numel():
        raise ValueError(f"class label {int(bad[0])} out of range; valid labels: 0..{num_classes - 1}")
    return labels


def batch_of(x: Tensor, n: int, what: str) -> Tensor:
    """x (1 or n, ...) -> (n, ...)."""
    if x.shape[0] == n:
        return x
    if x.shape[0] == 1:
        return x.expand(n, *x.shape[1:])
    raise ValueError(f"{what} has a batch of {x.shape[0]}; give 1 or {n} (prompts x batch_size)")


def to_pil(images: Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] -> B RGB images."""
    return [Image.fromarray(a.numpy()) for a in to_uint8(images)]


MASKED_CONTENT: tuple[str, ...] = ("original", "fill", "latent noise", "latent nothing")  # A1111's inpainting_fill 1, 0, 2, 3


def fill_masked(image: Tensor, mask: Tensor) -> Tensor:
    """A1111's "fill" masked content: the masked pixels (mask 1) replaced by a smooth extension of
    the kept ones, the kept pixels unchanged. Push-pull interpolation (Gortler et al. 1996, "The
    Lumigraph"): average the kept pixels down a pyramid of 2x2 cells, each cell weighted by how
    much of it is kept, then fill each level's gaps from the level below on the way back up.
    image (B, 3, H, W), mask (B, 1, H, W) binary -> (B, 3, H, W)."""
    keep = 1 - mask
    levels = [(image * keep, keep)]  # premultiplied colour and weight, finest first
    while min(levels[-1][1].shape[-2:]) > 1:
        colour, weight = levels[-1]
        colour = F.avg_pool2d(colour, 2, ceil_mode=True)
        weight = F.avg_pool2d(weight, 2, ceil_mode=True)
        levels.append((colour, weight))
    colour, weight = levels[-1]
    estimate = colour / weight.clamp_min(1e-8)  # the coarsest level: the mean kept colour (or 0 if none kept)
    for colour, weight in reversed(levels[:-1]):
        up = F.interpolate(estimate, size=colour.shape[-2:], mode="bilinear", align_corners=False)
        w = weight.clamp(0, 1)  # premultiplied: a cell w kept holds w x its kept colour; the rest comes from below
        estimate = colour / weight.clamp_min(1e-8) * (weight >= 1) + (colour + (1 - w) * up) * (weight < 1)
    return image * keep + estimate * mask
