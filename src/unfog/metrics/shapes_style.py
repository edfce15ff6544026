"""How "outlined" and how "pastel" the objects of a ``shapes`` image are: deterministic measures
of the styles ``ShapesConfig.style`` = "outlined" / "pastel" draws, which the embedded model never saw.

Outlined: the hollow fraction.

For each object the analyzer finds (an 8-connected component of one palette colour, at least
``min_area``; ``shapes_analyzer.analyze``'s steps 1 to 4), its silhouette is the component with
the holes it encloses filled, and its hollow fraction is the share of the silhouette whose pixels
read as background (colour index -1 of ``colour_map``). A filled shape has no holes: 0. An
outlined one drawn ``OUTLINE_WIDTH`` = 3 px wide at 64 x 64 has an interior of k^2 of its
silhouette, k = 1 - 3 / rho with rho the distance from its centre to its edges (d / 2 for circles
and squares, d / (1 + sqrt 5) for the upright triangle, d = 14 or 22 px): 0.33 / 0.53 for small /
large circles and squares, 0.09 / 0.31 for triangles.

Pastel: an object's opacity is the median, over its pixels, of the analyzer's blend weight
(``colour_map``'s alpha: the pixel as background + alpha (colour - background)). A filled object
is drawn at 1, a pastel one at ``PASTEL_OPACITY`` = 0.65; the median ignores the antialiased
edge. An object counts as pastel below ``PASTEL`` = 0.82, halfway.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from .shapes_analyzer import PALETTE_NAMES, AnalyzerConfig, as_uint8_image, colour_map, components, holes_filled

OUTLINED = 0.15  # an object whose hollow fraction is at least this counts as outlined
PASTEL = 0.82  # an object whose opacity is below this counts as pastel


def _objects(image, config: AnalyzerConfig):
    """The analyzer's colour map of ``image`` and each object found: (labels, component index c,
    its stats), in the analyzer's colour order (``shapes_analyzer.analyze``'s steps 1 to 4)."""
    img = as_uint8_image(image)
    h, w, _ = img.shape
    cmap = colour_map(img, config)
    found = []
    for k in range(len(PALETTE_NAMES)):
        labels, stats = components(cmap.index == k)
        found += [(labels, c, st) for c, st in enumerate(stats) if st["area"] >= config.min_area * h * w]
    return cmap, found


def hollow_fractions(image: Image.Image | np.ndarray | torch.Tensor,
                     config: AnalyzerConfig = AnalyzerConfig()) -> list[float]:
    """Each object's hollow fraction (module docstring), objects in the analyzer's colour order."""
    cmap, found = _objects(image, config)
    out = []
    for labels, c, st in found:
        x0, y0, x1, y1 = st["bbox"]
        own = labels[y0:y1, x0:x1] == c + 1
        silhouette = holes_filled(own)
        hollow = silhouette & ~own & (cmap.index[y0:y1, x0:x1] == -1)
        out.append(float(hollow.sum() / silhouette.sum()))
    return out


def opacities(image: Image.Image | np.ndarray | torch.Tensor, config: AnalyzerConfig = AnalyzerConfig()) -> list[float]:
    """Each object's opacity (module docstring), objects in the analyzer's colour order."""
    cmap, found = _objects(image, config)
    return [float(np.median(cmap.alpha[labels == c + 1])) for labels, c, _ in found]


def _summary(values: list[float], mean: str, share: str, counts) -> dict[str, float]:
    if not values:
        return {mean: float("nan"), share: float("nan"), "objects": 0}
    return {mean: float(np.mean(values)), share: float(np.mean([counts(v) for v in values])), "objects": len(values)}


def outline_summary(images, config: AnalyzerConfig = AnalyzerConfig()) -> dict[str, float]:
    """Over images: the mean hollow fraction of their objects, and the share of objects that
    are outlined (hollow fraction >= ``OUTLINED``); NaN when no object was found."""
    return _summary([f for image in images for f in hollow_fractions(image, config)], "hollow", "outlined",
                    lambda f: f >= OUTLINED)


def pastel_summary(images, config: AnalyzerConfig = AnalyzerConfig()) -> dict[str, float]:
    """Over images: the mean opacity of their objects, and the share of objects that are pastel
    (opacity < ``PASTEL``); NaN when no object was found."""
    return _summary([v for image in images for v in opacities(image, config)], "opacity", "pastel",
                    lambda v: v < PASTEL)
