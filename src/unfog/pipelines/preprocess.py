"""ControlNet preprocessors that need no network: image in, hint image out.

Each is a pure function ``fn(image, **options) -> PIL.Image`` (RGB), written from the formulas of
the A1111 ControlNet extension (sd-webui-controlnet, ``scripts/processor.py`` and ``annotator/``)
in numpy, so unfog needs no OpenCV at run time; the tests check each against OpenCV running
A1111's own recipe (tests/unit/test_preprocess.py, docs/controlnet.md "Preprocessors").

| name | A1111 module | what it makes |
|---|---|---|
| canny | canny | Canny edges of the RGB image, as ``cv2.Canny(img, low, high)`` (no blur first) |
| scribble | scribble_xdog | white strokes where an XDoG (difference of Gaussians) finds dark lines |
| lineart_standard | lineart_standard (from white bg & black line) | how much darker each pixel is than its blurred surroundings, normalised |
| shuffle | shuffle | the image warped by a smooth random flow field (content shuffle) |
| tile | tile_resample | the image downsampled by area averaging (the pipeline scales it back) |
| blur | blur_gaussian | a Gaussian blur |
| invert | invert (from white bg & black line) | 255 - x: black lines on white become white on black |
| binary | binary | white where the grey image is dark (Otsu's threshold when 0) |

A1111 first scales the image so its short side is the "preprocessor resolution" (512); these work
at the size given, so scale the image first for the same hint.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from PIL import Image

from ..choices import check_choice


def to_rgb_array(image: Image.Image) -> np.ndarray:
    """(H, W, 3) uint8; transparency is laid on white, as A1111's ``HWC3`` does."""
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = np.asarray(image.convert("RGBA"), dtype=np.float32)
        alpha = rgba[..., 3:] / 255.0
        return (rgba[..., :3] * alpha + 255.0 * (1.0 - alpha)).clip(0, 255).astype(np.uint8)
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def _image(x: np.ndarray) -> Image.Image:
    """(H, W) or (H, W, 3) uint8 -> an RGB image (a one-channel map is repeated in R, G and B)."""
    if x.ndim == 2:
        x = np.repeat(x[..., None], 3, axis=2)
    return Image.fromarray(np.ascontiguousarray(x), mode="RGB")


def gaussian_blur(x: np.ndarray, sigma: float, *, extent: float) -> np.ndarray:
    """Separable Gaussian blur of (H, W, C) float32, with OpenCV's kernel and border.

    OpenCV (``GaussianBlur(img, (0, 0), sigma)``, which A1111 calls) sizes the kernel as
    ``round(2 * extent * sigma + 1) | 1`` taps, ``extent`` = 3 standard deviations for 8-bit images
    and 4 for float ones, and reflects at the border without repeating the edge pixel (reflect-101).
    """
    size = int(np.rint(2 * extent * sigma + 1)) | 1
    r = size // 2
    t = np.arange(size, dtype=np.float64) - r
    k = np.exp(-(t**2) / (2 * sigma**2))
    k = (k / k.sum()).astype(np.float32)
    h, w = x.shape[:2]
    p = np.pad(x, ((r, r), (0, 0), (0, 0)), mode="reflect")
    x = sum(k[i] * p[i : i + h] for i in range(size))  # vertical pass
    p = np.pad(x, ((0, 0), (r, r), (0, 0)), mode="reflect")
    return sum(k[i] * p[:, i : i + w] for i in range(size))  # horizontal pass


def _blur_uint8(x: np.ndarray, sigma: float) -> np.ndarray:
    return np.floor(gaussian_blur(x.astype(np.float32), sigma, extent=3) + 0.5).clip(0, 255).astype(np.uint8)


def rgb_to_gray(x: np.ndarray) -> np.ndarray:
    """ITU-R BT.601 luma 0.299 R + 0.587 G + 0.114 B, (H, W, 3) -> (H, W) uint8, rounded in 16-bit
    fixed point as OpenCV's ``COLOR_RGB2GRAY`` (which A1111's ``binary`` calls)."""
    r, g, b = (x[..., c].astype(np.int64) for c in range(3))
    return ((r * 19595 + g * 38470 + b * 7471 + (1 << 15)) >> 16).astype(np.uint8)


# --- canny -------------------------------------------------------------------------------------

_TG22 = int(0.4142135623730950488 * (1 << 15) + 0.5)  # tan(22.5 deg) in 15-bit fixed point


def _sobel(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """3x3 Sobel derivatives of (H, W, C) int, the border pixel repeated (as ``cv2.Canny``)."""
    p = np.pad(x.astype(np.int32), ((1, 1), (1, 1), (0, 0)), mode="edge")
    dx = (p[:-2, 2:] + 2 * p[1:-1, 2:] + p[2:, 2:]) - (p[:-2, :-2] + 2 * p[1:-1, :-2] + p[2:, :-2])
    dy = (p[2:, :-2] + 2 * p[2:, 1:-1] + p[2:, 2:]) - (p[:-2, :-2] + 2 * p[:-2, 1:-1] + p[:-2, 2:])
    return dx, dy


def _non_maximum(mag: np.ndarray, dx: np.ndarray, dy: np.ndarray, low: int) -> np.ndarray:
    """Pixels above ``low`` whose magnitude is a maximum across the edge (Canny 1986, step 2).

    The gradient direction is put in one of four bins with integer tests (|dy| against
    tan(22.5 deg) |dx| and tan(67.5 deg) |dx|); ties go to the later neighbour, as in OpenCV, so a
    two-pixel-wide plateau keeps one pixel.
    """
    m = np.pad(mag, 1)  # zero outside the image
    c = m[1:-1, 1:-1]
    up, down, left, right = m[:-2, 1:-1], m[2:, 1:-1], m[1:-1, :-2], m[1:-1, 2:]
    ax, ay = np.abs(dx).astype(np.int64), np.abs(dy).astype(np.int64) << 15
    tg22x = ax * _TG22
    tg67x = tg22x + (ax << 16)
    horizontal = ay < tg22x
    vertical = ~horizontal & (ay > tg67x)
    diagonal = ~horizontal & ~vertical
    same_sign = (dx ^ dy) >= 0  # gradient along the main diagonal (down-right / up-left)
    diag_max = np.where(same_sign, (c > m[:-2, :-2]) & (c > m[2:, 2:]), (c > m[:-2, 2:]) & (c > m[2:, :-2]))
    return (c > low) & ((horizontal & (c > left) & (c >= right)) | (vertical & (c > up) & (c >= down))
                        | (diagonal & diag_max))


def _hysteresis(candidates: np.ndarray, strong: np.ndarray) -> np.ndarray:
    """The candidates 8-connected to a strong pixel (grown a ring at a time from the strong ones)."""
    edges = strong.copy()
    frontier = strong
    while frontier.any():
        f = np.pad(frontier, 1)
        grown = np.zeros_like(frontier)
        for dy in (0, 1, 2):
            for dx in (0, 1, 2):
                grown |= f[dy : dy + frontier.shape[0], dx : dx + frontier.shape[1]]
        frontier = grown & candidates & ~edges
        edges |= frontier
    return edges


def canny(image: Image.Image, *, low: float = 100, high: float = 200, sigma: float = 0.0,
          l2_gradient: bool = False) -> Image.Image:
    """Canny edges (Canny 1986): Sobel gradients, non-maximum suppression, hysteresis between
    ``low`` and ``high`` (A1111's defaults 100 / 200).

    As A1111's preprocessor (``cv2.Canny(img, low, high)`` on the RGB image), nothing is blurred
    first unless ``sigma`` > 0 is given, and each pixel takes the gradient of the channel where it is
    largest. The magnitude is |dx| + |dy| (OpenCV's default), or the Euclidean norm with
    ``l2_gradient``. A pixel is an edge when its magnitude exceeds ``high``, or exceeds ``low`` and
    it touches an edge pixel.
    """
    if not 0 <= low <= high:
        raise ValueError(f"canny thresholds must satisfy 0 <= low <= high, got low {low} and high {high}")
    if sigma < 0:
        raise ValueError(f"canny sigma must be >= 0 (0: no blur), got {sigma}")
    x = to_rgb_array(image)
    if sigma > 0:
        x = _blur_uint8(x, sigma)
    dx, dy = _sobel(x)  # (H, W, 3) each
    if l2_gradient:
        mags = dx.astype(np.int64) ** 2 + dy.astype(np.int64) ** 2
        low, high = min(low, 32767.0) ** 2, min(high, 32767.0) ** 2
    else:
        mags = np.abs(dx) + np.abs(dy)
    pick = np.argmax(mags, axis=2)[..., None]  # the strongest channel; the first of equals
    mag, dx, dy = (np.take_along_axis(a, pick, axis=2)[..., 0] for a in (mags, dx, dy))
    low, high = int(np.floor(low)), int(np.floor(high))
    candidates = _non_maximum(mag, dx, dy, low)
    edges = _hysteresis(candidates, candidates & (mag > high))
    return _image(edges.astype(np.uint8) * 255)


# --- line maps ----------------------------------------------------------------------------------


def scribble(image: Image.Image, *, threshold: float = 32) -> Image.Image:
    """A1111's ``scribble_xdog``: white where a pixel is darker than its surroundings in every channel.

    Difference of Gaussians (sigma 0.5 and 5.0, the XDoG of Winnemoeller et al. 2012 without its
    soft ramp): d = min over channels of (wide blur - narrow blur), clipped to [0, 255]; a stroke
    where 2 d > ``threshold`` (1..64 in A1111, default 32). A1111 computes 2 d in 8-bit arithmetic,
    which wraps for d >= 128 and drops those (the darkest) lines; unfog does not wrap.
    """
    if threshold < 0:
        raise ValueError(f"scribble threshold must be >= 0, got {threshold}")
    x = to_rgb_array(image).astype(np.float32)
    dog = np.min(gaussian_blur(x, 5.0, extent=4) - gaussian_blur(x, 0.5, extent=4), axis=2)
    d = 255 - np.floor((255 - dog).clip(0, 255))  # A1111 keeps 255 - d as uint8 (truncated)
    return _image(np.where(2 * d > threshold, 255, 0).astype(np.uint8))


def lineart_standard(image: Image.Image) -> Image.Image:
    """A1111's ``lineart_standard``: how much darker each pixel is than a Gaussian blur (sigma 6)
    of the image, for black lines on a light background.

    i = min over channels of (blur - x), clipped at 0, divided by the median of the values above 8
    (at least 16) and scaled so that median maps to 127; clipped to 255.
    """
    x = to_rgb_array(image).astype(np.float32)
    intensity = np.min(gaussian_blur(x, 6.0, extent=4) - x, axis=2).clip(0, 255)
    visible = intensity[intensity > 8]
    scale = max(16.0, float(np.median(visible))) if visible.size else 16.0
    return _image((intensity / scale * 127).clip(0, 255).astype(np.uint8))


def invert(image: Image.Image) -> Image.Image:
    """255 - x: turns black-on-white line art into the white-on-black hints ControlNets read."""
    return _image(255 - to_rgb_array(image))


def otsu_threshold(gray: np.ndarray) -> int:
    """Otsu (1979): the level t maximising the between-class variance of {<= t} and {> t}."""
    p = np.bincount(gray.ravel(), minlength=256).astype(np.float64) / gray.size
    omega = np.cumsum(p)  # weight of the class <= t
    mu = np.cumsum(p * np.arange(256))  # its first moment
    valid = (omega > 1e-7) & (omega < 1 - 1e-7)
    if not valid.any():  # one grey level only
        return 0
    between = np.where(valid, (mu[-1] * omega - mu) ** 2 / np.where(valid, omega * (1 - omega), 1), -1.0)
    return int(np.argmax(between))


def binary(image: Image.Image, *, threshold: int = 0) -> Image.Image:
    """A1111's ``binary``: white where the grey image is at most ``threshold``, black elsewhere.

    ``threshold`` 0 (the default) or 255 picks the level by Otsu's method, as A1111 does.
    """
    if not 0 <= threshold <= 255:
        raise ValueError(f"binary threshold must be in [0, 255] (0: Otsu's), got {threshold}")
    gray = rgb_to_gray(to_rgb_array(image))
    t = otsu_threshold(gray) if threshold in (0, 255) else threshold
    return _image(np.where(gray > t, 0, 255).astype(np.uint8))


# --- tile, blur, shuffle ------------------------------------------------------------------------


def _area_weights(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in): how much of each input pixel falls in each output pixel, rows summing to 1."""
    edges = np.arange(n_out + 1) * (n_in / n_out)
    lo, hi = edges[:-1, None], edges[1:, None]
    j = np.arange(n_in)[None, :]
    return (np.clip(np.minimum(hi, j + 1) - np.maximum(lo, j), 0, None) / (n_in / n_out)).astype(np.float64)


def tile(image: Image.Image, *, rate: float = 1.0) -> Image.Image:
    """A1111's ``tile_resample``: the image shrunk ``rate`` times by area averaging (rates below 1.1
    leave it as it is); the pipeline scales the hint back to the image size, so detail is lost."""
    if not 1.0 <= rate <= 64.0:
        raise ValueError(f"tile rate must be in [1, 64], got {rate}")
    x = to_rgb_array(image)
    if rate < 1.1:
        return _image(x)
    h, w = x.shape[:2]
    ho, wo = max(1, int(h / rate)), max(1, int(w / rate))
    y = np.tensordot(_area_weights(h, ho), x.astype(np.float64), axes=(1, 0))  # (Ho, W, 3)
    y = np.tensordot(y, _area_weights(w, wo), axes=(1, 1)).transpose(0, 2, 1)  # (Ho, Wo, 3)
    return _image(np.floor(y + 0.5).clip(0, 255).astype(np.uint8))


def blur(image: Image.Image, *, sigma: float = 9.0) -> Image.Image:
    """A1111's ``blur_gaussian``: a Gaussian blur of standard deviation ``sigma`` pixels (default 9)."""
    if not sigma > 0:
        raise ValueError(f"blur sigma must be > 0, got {sigma}")
    return _image(_blur_uint8(to_rgb_array(image), sigma))


def _noise_field(h: int, w: int, cell: int, rng: np.random.Generator) -> np.ndarray:
    """Smooth noise in [0, 1]: uniform values on a grid ``cell`` pixels apart, bicubic in between."""
    import torch
    import torch.nn.functional as F

    coarse = torch.from_numpy(rng.uniform(0, 1, size=(1, 1, h // cell + 2, w // cell + 2)))
    fine = F.interpolate(coarse, size=(h + 2 * cell, w + 2 * cell), mode="bicubic", align_corners=False)
    n = fine[0, 0, cell : cell + h, cell : cell + w].numpy()
    n = n - n.min()
    return n / max(n.max(), 1e-12)


def shuffle(image: Image.Image, *, seed: int = 0, cell: int = 256) -> Image.Image:
    """A1111's content ``shuffle``: each output pixel is read from the image at a place given by two
    smooth random fields (x in [0, W-1], y in [0, H-1]; control points ``cell`` pixels apart),
    bilinearly. The same ``seed`` gives the same hint; A1111 draws a new one every time."""
    if cell < 1:
        raise ValueError(f"shuffle cell must be >= 1 pixel, got {cell}")
    x = to_rgb_array(image)
    h, w = x.shape[:2]
    rng = np.random.default_rng(seed)
    u = _noise_field(h, w, cell, rng) * (w - 1)  # (H, W) source column
    v = _noise_field(h, w, cell, rng) * (h - 1)  # (H, W) source row
    return _image(remap_bilinear(x, u, v))


def remap_bilinear(x: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """out[i, j] = x at (row v[i, j], column u[i, j]), bilinear; (H, W, C) uint8, u and v inside the image."""
    h, w = x.shape[:2]
    x = x.astype(np.float32)
    u0, v0 = np.floor(u).astype(np.int64), np.floor(v).astype(np.int64)
    fu, fv = (u - u0)[..., None], (v - v0)[..., None]
    u1, v1 = np.minimum(u0 + 1, w - 1), np.minimum(v0 + 1, h - 1)
    out = (1 - fv) * ((1 - fu) * x[v0, u0] + fu * x[v0, u1]) + fv * ((1 - fu) * x[v1, u0] + fu * x[v1, u1])
    return np.floor(out + 0.5).clip(0, 255).astype(np.uint8)


# --- the registry -------------------------------------------------------------------------------

PREPROCESSORS: dict[str, Callable[..., Image.Image]] = {
    "canny": canny, "scribble": scribble, "lineart_standard": lineart_standard, "shuffle": shuffle,
    "tile": tile, "blur": blur, "invert": invert, "binary": binary,
}

# The options each takes (keyword-only, with the defaults in its signature).
OPTIONS: dict[str, tuple[str, ...]] = {
    "canny": ("low", "high", "sigma", "l2_gradient"), "scribble": ("threshold",), "lineart_standard": (),
    "shuffle": ("seed", "cell"), "tile": ("rate",), "blur": ("sigma",), "invert": (), "binary": ("threshold",),
}

# A1111's ControlNet module names (as in its PNG parameters, "Module: …") -> ours.
A1111_NAMES: dict[str, str] = {
    "canny": "canny", "scribble_xdog": "scribble", "lineart_standard (from white bg & black line)":
    "lineart_standard", "lineart_standard": "lineart_standard", "shuffle": "shuffle", "tile_resample": "tile",
    "blur_gaussian": "blur", "invert (from white bg & black line)": "invert", "invert": "invert", "binary": "binary",
}


def preprocess(name: str, image: Image.Image, **options) -> Image.Image:
    """The hint image of preprocessor ``name``; unknown names and options are one-line errors that
    list the valid ones."""
    name = A1111_NAMES.get(name, name) if name not in PREPROCESSORS else name
    check_choice("preprocessor", name, PREPROCESSORS)
    unknown = sorted(set(options) - set(OPTIONS[name]))
    if unknown:
        valid = ", ".join(OPTIONS[name]) or "none"
        raise ValueError(f"preprocessor {name} has no option {', '.join(unknown)}; its options: {valid}")
    return PREPROCESSORS[name](image, **options)
