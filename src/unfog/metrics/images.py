"""Images for the metric networks: PIL images or tensors -> float tensors in [0, 1] of one size.

Feature networks want one input size: the digit classifier 16 x 16, a shapes autoencoder its
training size, Inception 299 x 299. Images of another size are resized by one of the two stated
conventions of ``inception.resize_for_inception`` (see docs/metrics.md):

- ``"legacy"``: bilinear, no antialiasing (``F.interpolate``; pytorch-fid's);
- ``"clean"``: PIL's antialiased bicubic on float channels (clean-fid's).

Tensors follow unfog's pipelines: (C, H, W) or (B, C, H, W) in [-1, 1]. PIL images are read as 8-bit
RGB (or greyscale for ``channels=1``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from .inception import Resize, resize_for_inception

RESIZE_NOTES = {
    "legacy": "bilinear interpolation without antialiasing (torch F.interpolate, as pytorch-fid)",
    "clean": "PIL bicubic with antialiasing on float channels (as clean-fid)",
}


def to_unit_tensor(image: Image.Image | Tensor, channels: int = 3) -> Tensor:
    """One image -> (channels, H, W) float32 in [0, 1]. A tensor is (C, H, W) in [-1, 1]; a
    greyscale image given for 3 channels is repeated, an RGB one given for 1 is averaged."""
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    if isinstance(image, Image.Image):
        pixels = np.asarray(image.convert("L" if channels == 1 else "RGB"), dtype=np.float32) / 255.0
        x = torch.from_numpy(pixels.reshape(*pixels.shape[:2], -1)).permute(2, 0, 1)  # (C, H, W)
        return x.contiguous()
    if not isinstance(image, Tensor) or image.ndim != 3 or image.shape[0] not in (1, 3):
        raise ValueError(f"an image must be a PIL image or a (1 | 3, H, W) tensor in [-1, 1], got "
                         f"{type(image).__name__} {tuple(getattr(image, 'shape', ()))}")
    x = (image.detach().float().cpu().clamp(-1, 1) + 1) / 2
    if x.shape[0] == channels:
        return x
    return x.expand(3, -1, -1).clone() if channels == 3 else x.mean(0, keepdim=True)


def resize_square(images: Tensor, size: int, mode: Resize) -> Tensor:
    """(B, C, H, W) in [0, 1], C = 1 or 3 -> (B, C, size, size) by the ``mode`` convention."""
    if images.shape[1] == 3:
        return resize_for_inception(images, mode, size)
    return resize_for_inception(images.expand(-1, 3, -1, -1), mode, size)[:, :1]  # channels stay equal


def size_text(h: int, w: int) -> str:
    return f"{w}x{h}"


def stack_at_size(images: Sequence[Image.Image | Tensor] | Tensor, size: int, mode: Resize,
                  channels: int = 3) -> tuple[Tensor, dict[str, int]]:
    """Images -> (N, channels, size, size) in [0, 1], and how many of each other size ("WxH")
    were resized to size x size."""
    resized: dict[str, int] = {}
    out = []
    for image in images:
        x = to_unit_tensor(image, channels)  # (C, H, W)
        if tuple(x.shape[1:]) != (size, size):
            key = size_text(*x.shape[1:])
            resized[key] = resized.get(key, 0) + 1
            x = resize_square(x[None], size, mode)[0].clamp(0, 1)
        out.append(x)
    if not out:
        return torch.empty(0, channels, size, size), resized
    return torch.stack(out), resized
