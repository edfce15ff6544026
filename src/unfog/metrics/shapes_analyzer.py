"""A deterministic judge of images of the ``shapes`` data set: finds the objects, scores prompts.

No neural network: the data set's geometry and palette are known, so the objects can be read off
the pixels. For an image and a ``PromptSpec`` it answers GenEval's question, "does the image show
what the prompt asks?", per category (single_object, two_objects, counting, colors, position,
color_attr). The steps of ``analyze``:

1. Background: the per-channel median of the two-pixel frame of the image (objects keep clear of
   the edge, so the frame is background even when the background is textured).
2. Colour of each pixel, as a matting problem. A pixel p of an object's antialiased or blurred
   edge is a blend of the background b and the object's colour c: p = b + alpha (c - b). For each
   palette colour c_k, alpha_k is the least-squares blend weight (clipped to [0, max_alpha]) and
   r_k = |p - b - alpha_k (c_k - b)| the residual. The pixel takes the colour of least residual
   if that residual is at most ``max_residual`` and its alpha at least ``min_alpha`` (the object
   covers most of the pixel). Unlike nearest-colour rules, a blend of orange with white is not
   mistaken for yellow, and a darker or paler shade of a colour still counts as that colour.
3. Pixels far from the background (``foreground``) that no palette colour covers by at least
   ``min_alpha`` are "unknown": a colour off the palette, or a pale tint (a 30 % blend of red
   with white is pink). After an erosion that strips the thin rings blurred edges leave, what
   remains of them can be an object of no palette colour (color None), which a prompt's colour
   never matches.
4. Objects are the 8-connected components per colour (labelled here on row runs with a
   union-find) of at least ``min_area`` (a fraction of the image; smaller ones are specks).
5. Shape, from the object's soft coverage: its pixels' blend weights over the component and its
   blurred edge (``edge_width``; a pixel between two objects goes to the nearer), divided by the
   object's median weight. Two features that neither scale, blur nor a paler shade move much:
   fill = coverage / (width x height) of its soft extents (circle pi/4, square 1, triangle 1/2)
   and the skew of its rows (0 for circle and square; -0.57 for an upright triangle, whose mass
   sits low). Each shape owns a band of (fill, skew) (``SHAPE_BANDS``); an object in none of the
   bands, or much wider than tall (``max_aspect``), has shape None, which matches no prompt.
   The extra shape, the star, is tried after those bands: a fill and skew band of its own and a
   third feature, solidity (area over convex hull: 0.47 for a pentagram, about 1 for a diamond
   of the same fill).

The palette and the shapes include the extra concepts (teal, star; ``shapes_text.EXTRA_*``)
that the default data set never draws: on its images nothing reads as either, so every score
of the six categories is what it was before they existed.

``match`` then requires exactly the objects the prompt asks for and no others (all categories):
every named shape with its count, colour where named, and for position prompts the relation
between the two centroids, within 45 degrees of the stated direction.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from ..datasets.shapes_text import ALL_COLORS, CATEGORIES, PromptSpec

PALETTE_NAMES: tuple[str, ...] = tuple(ALL_COLORS)  # the extra colours (teal) too
PALETTE = np.asarray([ALL_COLORS[c] for c in PALETTE_NAMES], dtype=np.float32)  # (K, 3)
# Bands of (fill, skew) of each shape, see ``classify_shape``
SHAPE_BANDS: dict[str, tuple[tuple[float, float], tuple[float, float]]] = {
    "circle": ((0.70, 0.89), (-0.14, 0.14)),
    "square": ((0.89, 1.02), (-0.14, 0.14)),
    "triangle": ((0.42, 0.80), (-0.85, -0.28)),
}
# The star (an extra shape): a band of (fill, skew) as above, and a solidity below STAR_SOLIDITY
STAR_BAND: tuple[tuple[float, float], tuple[float, float]] = ((0.30, 0.72), (-0.20, 0.20))
STAR_SOLIDITY = 0.84
EDGE_FLOOR = 0.1  # blend weights below this around an object are background texture, not edge
NOISE_FLOOR = 2.5  # ... and so are those below 2.5 x the background's median deviation
FRAME = 2  # pixels of the image border taken as background


@dataclass(frozen=True)
class AnalyzerConfig:
    foreground: float = 40.0  # RGB distance from the background above which a pixel is drawn on
    max_residual: float = 60.0  # farthest a pixel may lie from a background-to-colour blend
    min_alpha: float = 0.5  # least share of the colour in a pixel counted as that object's
    max_alpha: float = 1.6  # darker than the colour (alpha > 1) is allowed up to this
    min_area: float = 0.006  # objects cover at least this fraction of the image (~25 px at 64)
    edge_width: float = 2 / 64  # blurred edges, as a fraction of the side (2 px at 64)
    max_aspect: float = 1.35  # widest / tallest extent of anything counted as a shape
    # an object's shape read from its silhouette with the holes it encloses filled, so that an
    # outlined shape (``ShapesConfig.style = "outlined"``) reads as its shape; off by default, so
    # every score of the default set is what it always was
    fill_holes: bool = False


@dataclass(frozen=True)
class DetectedObject:
    shape: str | None  # None: not a circle, square, triangle or star
    color: str | None  # None: no palette colour
    area: int  # pixels
    cx: float  # centroid, pixels from the left
    cy: float  # centroid, pixels from the top
    bbox: tuple[int, int, int, int]  # x0, y0, x1, y1 (x1, y1 exclusive)


@dataclass(frozen=True)
class Score:
    correct: bool
    reason: str  # "ok" or what was wrong

    def __bool__(self) -> bool:
        return self.correct


# ------------------------------------------------------------------------------------ input


def as_uint8_image(image: Image.Image | np.ndarray | torch.Tensor) -> np.ndarray:
    """PIL image, (H, W, 3) uint8 array or (3, H, W) tensor in [-1, 1] -> (H, W, 3) uint8."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.uint8)
    if isinstance(image, torch.Tensor):
        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"a tensor image must be (3, H, W) in [-1, 1], got shape {tuple(image.shape)}")
        x = ((image.detach().float().cpu() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
        return x.permute(1, 2, 0).numpy()
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"an array image must be (H, W, 3) uint8, got {image.shape} {image.dtype}")
        return image
    raise ValueError(f"image must be a PIL image, numpy array or torch tensor, got {type(image).__name__}")


# ------------------------------------------------------------------------------- components


def _runs(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Horizontal runs of True: (row, start, end) arrays, end exclusive, in row-major order."""
    h, w = mask.shape
    padded = np.zeros((h, w + 2), dtype=np.int8)
    padded[:, 1:-1] = mask
    d = np.diff(padded, axis=1)  # (H, W + 1): +1 where a run starts, -1 one past where it ends
    rows, starts = np.nonzero(d == 1)
    _, ends = np.nonzero(d == -1)
    return rows, starts, ends


def components(mask: np.ndarray) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """8-connected components of a boolean (H, W) mask: a label image (0 = outside, c + 1 =
    component c) and the area, bbox and centroid of each component."""
    labels = np.zeros(mask.shape, dtype=np.int32)
    rows, starts, ends = _runs(mask)
    n = len(rows)
    if n == 0:
        return labels, []
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first = np.searchsorted(rows, np.arange(mask.shape[0] + 1))  # runs of row r: first[r]:first[r+1]
    for r in range(1, mask.shape[0]):
        i, i_end, j, j_end = first[r - 1], first[r], first[r], first[r + 1]
        while i < i_end and j < j_end:
            if starts[i] <= ends[j] and starts[j] <= ends[i]:  # overlap, or touching diagonally
                a, b = find(i), find(j)
                if a != b:
                    parent[max(a, b)] = min(a, b)
            if ends[i] < ends[j]:
                i += 1
            else:
                j += 1
    roots = np.asarray([find(i) for i in range(n)])
    _, label = np.unique(roots, return_inverse=True)  # (n,) component of each run
    length = ends - starts
    offsets = np.cumsum(length) - length
    cols = np.arange(length.sum()) - np.repeat(offsets - starts, length)
    labels[np.repeat(rows, length), cols] = np.repeat(label + 1, length)
    k, weight = int(label.max()) + 1, length.astype(np.float64)
    area = np.bincount(label, weight, k)
    sum_x = np.bincount(label, weight * (starts + ends - 1) / 2, k)
    sum_y = np.bincount(label, weight * rows, k)
    x0, y0 = np.full(k, mask.shape[1]), np.full(k, mask.shape[0])
    x1, y1 = np.zeros(k, dtype=np.int64), np.zeros(k, dtype=np.int64)
    np.minimum.at(x0, label, starts)
    np.minimum.at(y0, label, rows)
    np.maximum.at(x1, label, ends)
    np.maximum.at(y1, label, rows + 1)
    stats = [{"area": int(area[c]), "cx": sum_x[c] / area[c], "cy": sum_y[c] / area[c],
              "bbox": (int(x0[c]), int(y0[c]), int(x1[c]), int(y1[c]))} for c in range(k)]
    return labels, stats


def _morph(mask: np.ndarray, radius: int, erode: bool) -> np.ndarray:
    """Binary erosion (or dilation) by a (2 radius + 1)^2 square; outside the image is False."""
    for _ in range(radius):
        p = np.pad(mask, 1)
        out = p[1:-1, 1:-1].copy()
        for dy in (0, 1, 2):
            for dx in (0, 1, 2):
                shifted = p[dy:dy + mask.shape[0], dx:dx + mask.shape[1]]
                out = out & shifted if erode else out | shifted
        mask = out
    return mask


# ----------------------------------------------------------------------------------- analysis


def shape_features(weights: np.ndarray) -> tuple[float, float, float]:
    """(fill, skew, aspect) of an object given as per-pixel coverage weights (h, w) in [0, 1].

    Extents are soft, the sum over columns (rows) of the largest coverage in each, so a partly
    covered edge column counts in part; fill = total coverage / (width x height); skew is the
    third standardised moment of the rows (negative: mass low, as in an upright triangle);
    aspect = width / height.
    """
    area = weights.sum()
    width, height = weights.max(0).sum(), weights.max(1).sum()
    ys = np.arange(weights.shape[0], dtype=np.float64)[:, None]  # (h, 1)
    cy = (weights * ys).sum() / area
    var = (weights * (ys - cy) ** 2).sum() / area
    skew = (weights * (ys - cy) ** 3).sum() / area / max(var, 1e-12) ** 1.5
    return float(area / (width * height)), float(skew), float(width / height)


def _hull_area(points: list[tuple[int, int]]) -> float:
    """Area of the convex hull of integer points (Andrew's monotone chain, then the shoelace)."""
    pts = sorted(set(points))

    def half(chain_points: list[tuple[int, int]]) -> list[tuple[int, int]]:
        chain: list[tuple[int, int]] = []
        for p in chain_points:
            while len(chain) >= 2 and ((chain[-1][0] - chain[-2][0]) * (p[1] - chain[-2][1])
                                       - (chain[-1][1] - chain[-2][1]) * (p[0] - chain[-2][0])) <= 0:
                chain.pop()
            chain.append(p)
        return chain[:-1]

    hull = half(pts) + half(pts[::-1])
    return 0.5 * abs(sum(hull[i - 1][0] * hull[i][1] - hull[i][0] * hull[i - 1][1] for i in range(len(hull))))


def holes_filled(mask: np.ndarray) -> np.ndarray:
    """A boolean (h, w) mask with the holes it encloses filled: everything the outside (the
    8-connected background reaching the border) does not reach."""
    labels, _ = components(np.pad(~mask, 1, constant_values=True))  # the background, around and inside
    return (labels != labels[0, 0])[1:-1, 1:-1]


def solidity(weights: np.ndarray) -> float:
    """Area of an object's silhouette over that of its convex hull: 1 for a convex figure (about
    0.86 and up once a small one is pixelated), 0.47 for the drawn star (a pentagram's area over
    its pentagon's). The silhouette is the pixels covered at least half, with the holes they
    enclose filled, so a ring (convex outline, hollow inside) counts as convex; the hull is that
    of those pixels as unit squares."""
    mask = weights >= 0.5  # (h, w)
    if not mask.any():
        return 0.0
    filled = holes_filled(mask)
    points = []
    for r in np.nonzero(filled.any(1))[0]:
        cols = np.nonzero(filled[r])[0]
        points += [(cols[0], r), (cols[0], r + 1), (cols[-1] + 1, r), (cols[-1] + 1, r + 1)]
    return float(filled.sum() / _hull_area(points))


def classify_shape(weights: np.ndarray, config: AnalyzerConfig = AnalyzerConfig()) -> str | None:
    """The shape whose band in ``SHAPE_BANDS`` holds the object's (fill, skew), or None.

    Drawn shapes have fill pi/4 (circle), 1 (square), 1/2 (triangle) and skew 0, 0 and
    -2 sqrt(2) / 5 = -0.57 (an upright triangle's rows follow a triangular distribution with its
    mode at the bottom). The bands split halfway: fill 0.89 between circle and square, skew
    -0.28 between the symmetric shapes and the triangle, and reach about 0.09 of fill beyond the
    drawn values on the far side. The triangle's band reaches fill 0.80 because blur eats its
    thin apex first (Gaussian blur sigma 1.5 px at 64 x 64: fill up to 0.75, skew -0.33).
    Anything outside every band (a diamond, a ring, an irregular blob), or whose extents differ
    by more than ``max_aspect`` (an ellipse, a bar), is no shape.

    The star, an extra shape, is tried only after those bands (so they decide every other shape
    exactly as before): its drawn fill is 0.33 (a pentagram in its box), 0.36 to 0.59 once
    rendered at 128 down to 32 px, and 0.65 blurred (sigma 1 px at 64); its skew is about 0; and
    unlike every convex figure of such a fill (a diamond: 1/2), its ``solidity`` is low: 0.47
    drawn, 0.49 to 0.75 rendered (128 down to 32 px), up to 0.80 blurred at 64 px and 0.82 at
    32, against 0.84 and up for the convex shapes at 64 px and 0.87 and up for diamonds of 10 px
    or more. ``STAR_BAND`` and ``STAR_SOLIDITY`` hold those limits. A star upside down is a star.
    """
    fill, skew, aspect = shape_features(weights)
    if max(aspect, 1 / aspect) > config.max_aspect:
        return None
    for shape, ((f0, f1), (k0, k1)) in SHAPE_BANDS.items():
        if f0 <= fill < f1 and k0 <= skew <= k1:
            return shape
    (f0, f1), (k0, k1) = STAR_BAND
    if f0 <= fill < f1 and k0 <= skew <= k1 and solidity(weights) < STAR_SOLIDITY:
        return "star"
    return None


@dataclass(frozen=True)
class ColourMap:
    """Per-pixel reading of an image (each (H, W)): ``index`` into PALETTE_NAMES of the colour
    that covers the pixel (-1: background; -2: drawn on, but by no palette colour covering at
    least ``min_alpha`` of it), ``best`` the best-explaining colour wherever the pixel is, and
    ``alpha`` its blend weight (0 where no blend explains the pixel); the background (3,) and
    ``noise``, the median distance of the frame's pixels from it (texture or pixel noise)."""

    index: np.ndarray
    best: np.ndarray
    alpha: np.ndarray
    background: np.ndarray
    noise: float


def colour_map(image: np.ndarray, config: AnalyzerConfig = AnalyzerConfig()) -> ColourMap:
    """Steps 1 to 3 of ``analyze`` on an (H, W, 3) uint8 image."""
    img = image.astype(np.float32)  # (H, W, 3)
    frame = np.concatenate([img[:FRAME].reshape(-1, 3), img[-FRAME:].reshape(-1, 3),
                            img[:, :FRAME].reshape(-1, 3), img[:, -FRAME:].reshape(-1, 3)])
    bg = np.median(frame, axis=0)  # (3,)
    p = img - bg  # (H, W, 3)
    v = PALETTE - bg  # (K, 3): from the background to each colour
    alpha = np.clip(p @ v.T / (v * v).sum(1), 0.0, config.max_alpha)  # (H, W, K)
    residual = np.linalg.norm(p[:, :, None, :] - alpha[..., None] * v, axis=-1)  # (H, W, K)
    best = residual.argmin(-1)  # (H, W)
    r = np.take_along_axis(residual, best[..., None], -1)[..., 0]  # (H, W)
    a = np.take_along_axis(alpha, best[..., None], -1)[..., 0]  # (H, W)
    drawn = np.linalg.norm(p, axis=-1) > config.foreground
    index = np.full(best.shape, -1, dtype=np.int64)
    coloured = drawn & (r <= config.max_residual) & (a >= config.min_alpha)
    index[coloured] = best[coloured]
    index[drawn & ~coloured] = -2
    noise = float(np.median(np.linalg.norm(frame - bg, axis=-1)))  # the background's own spread
    return ColourMap(index, best, np.where(r <= config.max_residual, a, 0.0), bg, noise)


def _territories(labels: np.ndarray, radius: int) -> np.ndarray:
    """Grow a label image by ``radius`` pixels (8-neighbourhood), each free pixel joining the
    component that reaches it first, so close objects do not share their blurred edges."""
    for _ in range(radius):
        p = np.pad(labels, 1)
        reach = np.zeros_like(labels)
        for dy in (0, 1, 2):
            for dx in (0, 1, 2):
                reach = np.maximum(reach, p[dy:dy + labels.shape[0], dx:dx + labels.shape[1]])
        labels = np.where(labels == 0, reach, labels)
    return labels


def _soft_weights(cmap: ColourMap, labels: np.ndarray, territory: np.ndarray, c: int, k: int,
                  bbox: tuple[int, int, int, int], radius: int, fill_holes: bool = False) -> np.ndarray:
    """(h, w) coverage of component c (colour k) in [0, 1], over its pixels and blurred edge
    (with ``fill_holes``, the holes it encloses covered fully).

    The blend weights are divided by the component's median weight, so a uniformly paler or
    darker object (alpha 0.9 or 1.2 throughout) still covers its interior fully. Weights that
    the background's own texture or noise could give (``EDGE_FLOOR``, ``NOISE_FLOOR``) are 0."""
    x0, y0, x1, y1 = bbox
    x0, y0 = max(0, x0 - radius), max(0, y0 - radius)
    x1, y1 = min(labels.shape[1], x1 + radius), min(labels.shape[0], y1 + radius)
    alpha = cmap.alpha[y0:y1, x0:x1]
    own = labels[y0:y1, x0:x1] == c + 1
    mine = (territory[y0:y1, x0:x1] == c + 1) & (cmap.best[y0:y1, x0:x1] == k)
    level = np.median(alpha[own])
    floor = max(EDGE_FLOOR, NOISE_FLOOR * cmap.noise / float(np.linalg.norm(PALETTE[k] - cmap.background)))
    w = np.minimum(np.where(mine & (alpha >= floor * level), alpha / level, 0.0), 1.0)
    if fill_holes:
        w = np.where(holes_filled(own) & ~own, 1.0, w)
    return w  # (h, w)


def analyze(image: Image.Image | np.ndarray | torch.Tensor, config: AnalyzerConfig = AnalyzerConfig()
            ) -> list[DetectedObject]:
    """The objects in an image, sorted left to right (then top to bottom)."""
    return [obj for obj, _ in detect(image, config)]


def detect(image: Image.Image | np.ndarray | torch.Tensor, config: AnalyzerConfig = AnalyzerConfig()
           ) -> list[tuple[DetectedObject, np.ndarray]]:
    """``analyze``'s objects, each with its pixel mask (H, W) bool: the connected component it was
    found as (the pixels its colour covers by at least ``min_alpha``; for an object of no palette
    colour, its eroded component)."""
    img = as_uint8_image(image)
    h, w, _ = img.shape
    cmap = colour_map(img, config)
    min_area = config.min_area * h * w
    radius = max(1, round(config.edge_width * min(h, w)))
    found = []
    for k, name in enumerate(PALETTE_NAMES):
        labels, stats = components(cmap.index == k)
        small = [c + 1 for c, st in enumerate(stats) if st["area"] < min_area]
        labels = np.where(np.isin(labels, small), 0, labels)  # specks are no object's edge
        territory = _territories(labels, radius)
        for c, st in enumerate(stats):
            if st["area"] >= min_area:
                weights = _soft_weights(cmap, labels, territory, c, k, st["bbox"], radius, config.fill_holes)
                shape = classify_shape(weights, config)
                obj = DetectedObject(shape, name, st["area"], st["cx"], st["cy"], st["bbox"])
                found.append((obj, labels == c + 1))
    labels, stats = components(_morph(cmap.index == -2, radius, erode=True))
    for c, st in enumerate(stats):
        if st["area"] >= min_area:
            x0, y0, x1, y1 = st["bbox"]
            shape = classify_shape((labels[y0:y1, x0:x1] == c + 1).astype(np.float64), config)
            found.append((DetectedObject(shape, None, st["area"], st["cx"], st["cy"], st["bbox"]), labels == c + 1))
    return sorted(found, key=lambda pair: (pair[0].cx, pair[0].cy))


# ------------------------------------------------------------------------------------ scoring


def relation_holds(a: DetectedObject, b: DetectedObject, relation: str) -> bool:
    """a <relation> b between centroids, within 45 degrees of the direction (y grows downwards)."""
    dx, dy = a.cx - b.cx, a.cy - b.cy
    if relation == "left of":
        return dx < 0 and abs(dx) >= abs(dy)
    if relation == "right of":
        return dx > 0 and abs(dx) >= abs(dy)
    if relation == "above":
        return dy < 0 and abs(dy) >= abs(dx)
    return dy > 0 and abs(dy) >= abs(dx)  # below


def _describe(o: DetectedObject) -> str:
    return f"{o.color or 'unknown-colour'} {o.shape or 'unknown-shape'} at ({o.cx:.0f}, {o.cy:.0f})"


def match(found: Sequence[DetectedObject], spec: PromptSpec) -> Score:
    """Whether detected objects are exactly what ``spec`` asks for (module docstring)."""
    expected = sum(o.count for o in spec.objects)
    if len(found) != expected:
        return Score(False, f"expected {expected} object(s), found {len(found)}: "
                            + ", ".join(map(_describe, found)))
    left = list(found)
    chosen: list[list[DetectedObject]] = [[] for _ in spec.objects]
    # Specs naming a colour first: a colour-free spec of the same shape takes what is left over.
    for i in sorted(range(len(spec.objects)), key=lambda i: spec.objects[i].color is None):
        want = spec.objects[i]
        hits = [o for o in left if o.shape == want.shape and (want.color is None or o.color == want.color)]
        if len(hits) < want.count:
            what = f"{want.color + ' ' if want.color else ''}{want.shape}"
            return Score(False, f"expected {want.count} {what}(s), found {len(hits)} among: "
                                + ", ".join(map(_describe, found)))
        chosen[i] = hits[: want.count]
        left = [o for o in left if all(o is not h for h in chosen[i])]
    if spec.relation is not None:
        a, b = chosen[0][0], chosen[1][0]
        if not relation_holds(a, b, spec.relation):
            return Score(False, f"{_describe(a)} is not {spec.relation} {_describe(b)}")
    return Score(True, "ok")


def score(image: Image.Image | np.ndarray | torch.Tensor, spec: PromptSpec,
          config: AnalyzerConfig = AnalyzerConfig()) -> Score:
    """Whether the image shows what the prompt asks (truthy), and why not if it does not."""
    return match(analyze(image, config), spec)


def score_batch(images: Sequence[Image.Image | np.ndarray | torch.Tensor] | torch.Tensor,
                specs: Sequence[PromptSpec], config: AnalyzerConfig = AnalyzerConfig()) -> dict[str, float]:
    """Accuracy per category present, and "overall": the mean over those categories (GenEval's)."""
    if len(images) != len(specs):
        raise ValueError(f"{len(images)} images but {len(specs)} prompt specs")
    hits: dict[str, list[bool]] = {}
    for image, spec in zip(images, specs):
        hits.setdefault(spec.category, []).append(bool(score(image, spec, config)))
    out = {c: float(np.mean(hits[c])) for c in CATEGORIES if c in hits}
    if out:
        out["overall"] = float(np.mean(list(out.values())))
    return out
