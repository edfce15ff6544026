"""Tensors <-> PNG files, image grids, and generation parameters stored in the PNG.

The parameters go in a tEXt chunk named "parameters", where A1111 keeps them, so other tools can
read them back.
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image, PngImagePlugin
from torch import Tensor


def to_uint8(images: Tensor) -> Tensor:
    """(B, C, H, W) in [-1, 1] -> (B, H, W, C) uint8."""
    x = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu()


def make_grid(images: Tensor, nrow: int, padding: int = 1, scale: int = 1) -> Image.Image:
    """Tile (B, C, H, W) images in [-1, 1] into rows of ``nrow``; upscale by ``scale`` (nearest)."""
    b, c, h, w = images.shape
    ncol = (b + nrow - 1) // nrow
    pixels = to_uint8(images)
    grid = torch.full((ncol * (h + padding) + padding, nrow * (w + padding) + padding, c), 255, dtype=torch.uint8)
    for k in range(b):
        r, q = divmod(k, nrow)
        y, x = padding + r * (h + padding), padding + q * (w + padding)
        grid[y : y + h, x : x + w] = pixels[k]
    arr = grid.numpy()
    img = Image.fromarray(arr[..., 0] if c == 1 else arr, mode="L" if c == 1 else "RGB")
    return img.resize((img.width * scale, img.height * scale), Image.NEAREST) if scale > 1 else img


def save_png(image: Image.Image, path: str | Path, parameters: str | None = None, *, overwrite: bool = False) -> Path:
    """Write a PNG carrying its generation parameters, atomically (``checkpoint.io.atomic_write``:
    a process stopped mid-write leaves the old file or none, never half of one); refuse to
    replace a file unless asked (one that appears meanwhile is not replaced either)."""
    from ..checkpoint.io import atomic_write

    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; pass --overwrite to replace it")
    if path.suffix.lower() != ".png":
        raise ValueError(f"output must be a .png file, got {path.name!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    info = PngImagePlugin.PngInfo()
    if parameters:
        info.add_text("parameters", parameters)
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG", pnginfo=info), replace=overwrite)
    return path


def read_parameters(path: str | Path) -> str | None:
    """The "parameters" text of a PNG, or None when it has none."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a folder; give a PNG file")
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    try:
        with Image.open(path) as img:
            return getattr(img, "text", {}).get("parameters")
    except (OSError, SyntaxError) as err:  # PIL.UnidentifiedImageError is an OSError
        raise ValueError(f"{path} is not an image that can be read: {err}") from None


def open_image(path: str | Path, what: str = "image") -> Image.Image:
    """A fully decoded image file, or a ValueError that names the file and what it was for."""
    try:
        with Image.open(path) as img:
            img.load()
            return img
    except (OSError, SyntaxError) as err:
        raise ValueError(f"the {what} {path} is not an image that can be read: {err}") from None
