"""Inpainting's image-space steps around the drawing, as A1111 takes them: blurring the mask,
"only masked" (draw the masked area's surroundings at full resolution, then paste it back) and
laying the init image back over what was not to be repainted. PIL images in and out; masks are
greyscale, white = repaint."""

from __future__ import annotations

import numpy as np
from PIL import Image

Box = tuple[int, int, int, int]  # left, top, right, bottom (right and bottom excluded)


def blur_mask(mask: Image.Image, sigma_x: float, sigma_y: float | None = None) -> Image.Image:
    """Gaussian blur with sigma ``sigma_x`` across and ``sigma_y`` down (default the same), each
    axis on its own; the kernel reaches 2.5 sigma each side, the edges repeat (A1111's mask blur)."""
    sigma_y = sigma_x if sigma_y is None else sigma_y
    a = np.asarray(mask.convert("L"), dtype=np.float64)
    for axis, sigma in ((1, sigma_x), (0, sigma_y)):
        if sigma <= 0:
            continue
        r = int(np.ceil(2.5 * sigma))
        k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
        k /= k.sum()
        pad = [(0, 0), (0, 0)]
        pad[axis] = (r, r)
        padded = np.pad(a, pad, mode="edge")
        a = np.apply_along_axis(lambda line: np.convolve(line, k, mode="valid"), axis, padded)
    return Image.fromarray(a.round().clip(0, 255).astype(np.uint8))


def crop_region(mask: Image.Image, padding: int, width: int, height: int) -> Box | None:
    """The region "only masked" draws: the masked pixels' bounding box grown by ``padding`` on
    each side, then widened or heightened around its centre to the drawing's aspect ratio
    ``width / height``, kept inside the image (shifted, or clipped when the image is too small).
    None for an empty mask."""
    a = np.asarray(mask.convert("L")) > 0
    if not a.any():
        return None
    rows, cols = np.nonzero(a.any(1))[0], np.nonzero(a.any(0))[0]
    W, H = mask.size
    x0, x1 = max(cols[0] - padding, 0), min(cols[-1] + 1 + padding, W)
    y0, y1 = max(rows[0] - padding, 0), min(rows[-1] + 1 + padding, H)
    ratio = width / height
    w, h = x1 - x0, y1 - y0
    if w / h < ratio:  # too narrow: widen
        x0, x1 = _grow(x0, x1, round(h * ratio), W)
    else:  # too flat: heighten
        y0, y1 = _grow(y0, y1, round(w / ratio), H)
    return int(x0), int(y0), int(x1), int(y1)


def _grow(lo: int, hi: int, size: int, limit: int) -> tuple[int, int]:
    """[lo, hi) grown to ``size`` around its centre, shifted to stay in [0, limit), clipped there."""
    size = min(size, limit)
    lo = lo - (size - (hi - lo)) // 2
    lo = min(max(lo, 0), limit - size)
    return lo, lo + size


def paste_back(drawn: Image.Image, init: Image.Image, box: Box) -> Image.Image:
    """The drawing of the region ``box`` (at any size) resized to it and pasted into ``init``."""
    out = init.copy()
    out.paste(drawn.resize((box[2] - box[0], box[3] - box[1]), Image.LANCZOS), box[:2])
    return out


def overlay(drawn: Image.Image, init: Image.Image, mask: Image.Image) -> Image.Image:
    """The init image laid back over the drawing where the mask keeps it: drawn x mask +
    init x (1 - mask), so what was not to be repainted is the init image exactly."""
    return Image.composite(drawn.convert("RGB"), init.convert("RGB"), mask.convert("L"))
