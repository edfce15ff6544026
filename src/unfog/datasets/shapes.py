"""``shapes``: a procedural captioned data set of coloured circles, squares and triangles.

Every item is an RGB image (64 x 64 by default) of one to three objects with known attributes
on a plain or lightly textured light background, and a caption drawn from templates and
paraphrases. The data set is ours, needs no download and is exactly reproducible: item ``i`` of
a set with seed ``s`` is drawn from ``numpy.random.Generator(PCG64([s, i]))``, so it is the same
image and caption on every machine, and any item can be made on its own, on the fly.

Scenes come in six categories that mirror GenEval (Ghosh et al., 2023), so that a model trained
here can be scored by the deterministic analyzer in ``unfog.metrics.shapes_analyzer``:

    single_object  one object                          "a red circle"
    two_objects    two objects of different shapes     "a circle and a square"
    counting       two or three objects of one shape   "three squares", "two blue triangles"
    colors         one object, its colour named        "a green square"
    position       two objects and a relation          "a circle to the left of a square"
    color_attr     two shapes with two colours         "a red circle and a blue square"

Geometry, chosen so that the analyzer can tell the shapes apart from their pixels alone: squares
are axis-aligned, triangles are upright isosceles with base = height, stars (an extra shape, drawn
only when a config asks) upright regular five-pointed stars, and every object has a
d x d bounding box (d = 14 or 22 px at 64 x 64, scaled with the canvas). Boxes keep a margin of
``margin(canvas)`` pixels from each other and from the image edge, so objects never touch, and a
``position`` relation is unambiguous: the objects are separated along the relation's axis (a gap
between their boxes) and that axis dominates, |d_axis| >= 1.5 |d_other|.

Extra concepts: ``ShapesConfig.extra_shapes`` / ``extra_colors`` add shapes and colours the
default set never draws (``EXTRA_SHAPES``, ``EXTRA_COLORS``) to what scenes are drawn from, and
``extra_fraction`` makes that share of scenes show at least one of them (a fine-tuning set for
new concepts). With none, every scene, caption and image is exactly the default set's.

Style: ``ShapesConfig.style = "outlined"`` draws every object as an outline ``OUTLINE_WIDTH`` px
wide (at 64 x 64, scaled with the canvas) with the background inside: the shape minus its copy
shrunk about its incentre so that every edge moves in by the width (circles and squares: the
box shrunk by the width on each side); ``"pastel"`` draws every object filled, its colour blended
``PASTEL_OPACITY`` = 0.65 over the background (a paler shade, which the analyzer still reads as
that colour). The scenes and captions are the default's; only the pixels change
(``render(scene, style=...)``). A tuple of styles draws item i in the (i mod n)-th.

Layout hints (ControlNet training): ``layout_hint(scene)`` is the scene's layout map, every
object's filled silhouette in white on black (whatever the style), from the same coverage that
``render`` composites, so a hint is aligned with the rendered objects to the pixel.

Objects are drawn at 4x resolution with PIL and box-filtered down (antialiased edges), then
composited over the background by their coverage. The caption and prompt grammar live in
``shapes_text``; this module re-exports it.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import Dataset

from ..choices import check_choice
from .shapes_text import (
    ALL_COLORS,
    ALL_SHAPES,
    BACKGROUNDS,
    CATEGORIES,
    COLORS,
    EXTRA_COLORS,
    EXTRA_SHAPES,
    RELATIONS,
    SHAPES,
    SIZES,
    STYLES,
    TEXTURES,
    Background,
    ObjectSpec,
    PromptSpec,
    Scene,
    ShapeObject,
    ShapesConfig,
    caption,
    concept_prompts,
    evaluation_prompts,
    parse_prompt,
    prompt_for,
    spec_for,
)

__all__ = [
    "ALL_COLORS", "ALL_SHAPES", "BACKGROUNDS", "CATEGORIES", "COLORS", "EXTRA_COLORS", "EXTRA_SHAPES", "RELATIONS",
    "SHAPES", "SIZES", "STYLES", "TEXTURES",
    "Background", "ObjectSpec", "PromptSpec", "Scene", "ShapeObject", "ShapesConfig", "ShapesDataset",
    "caption", "collate_shapes", "concept_prompts", "diameter", "evaluation_prompts", "layout_hint", "make_item",
    "margin",
    "parse_prompt", "prompt_for", "read_scenes", "render", "sample_scene", "scene_from_dict", "scene_to_dict",
    "spec_for", "to_tensor", "write_shapes",
]

REFERENCE_CANVAS = 64
DIAMETERS = {"small": 14, "large": 22}  # px of the d x d bounding box at 64 x 64
SUPERSAMPLE = 4  # objects are drawn at 4x and box-filtered down
TEXTURE_AMPLITUDE = 10.0  # +- this many 8-bit levels of noise or gradient on a textured background
MAX_PLACEMENT_TRIES = 400  # positions tried per draw of sizes; sizes are redrawn if none fits
DOMINANCE = 1.5  # position scenes: |d_axis| >= DOMINANCE * |d_other|
STAR_INNER = (3 - math.sqrt(5)) / 2  # a star's inner / outer radius, 0.382: the regular pentagram's
SCENES_FILE = "scenes.jsonl"
OUTLINE_WIDTH = 3.0  # px at 64 x 64: style "outlined"
PASTEL_OPACITY = 0.65  # style "pastel": each colour blended this much over the background


def diameter(size_name: str, canvas: int) -> float:
    """Side of an object's bounding box in pixels: 14 / 22 px at 64, in proportion elsewhere."""
    check_choice("size", size_name, SIZES)
    return DIAMETERS[size_name] * canvas / REFERENCE_CANVAS


def margin(canvas: int) -> float:
    """Minimum gap, in pixels, between two objects' boxes and between a box and the image edge."""
    return max(2.0, 2.0 * canvas / REFERENCE_CANVAS)


# ------------------------------------------------------------------------------------ sampling


def _quantise(v: float) -> float:
    """Positions are multiples of 1/SUPERSAMPLE px, so the 4x drawing grid holds them exactly."""
    return round(v * SUPERSAMPLE) / SUPERSAMPLE


def _gaps(a: tuple[float, float, float], b: tuple[float, float, float]) -> tuple[float, float]:
    """(horizontal, vertical) gap between the boxes of two (x, y, d) objects; negative = overlap."""
    half = (a[2] + b[2]) / 2
    return abs(a[0] - b[0]) - half, abs(a[1] - b[1]) - half


def _relation_holds(a: tuple[float, float, float], b: tuple[float, float, float], relation: str,
                    gap: float) -> bool:
    """True if object a is <relation> object b, clearly: separated along the axis, axis dominant."""
    dx, dy = a[0] - b[0], a[1] - b[1]  # image coordinates: y grows downwards
    gx, gy = _gaps(a, b)
    if relation in ("left of", "right of"):
        sign_ok = dx < 0 if relation == "left of" else dx > 0
        return sign_ok and gx >= gap and abs(dx) >= DOMINANCE * abs(dy)
    sign_ok = dy < 0 if relation == "above" else dy > 0
    return sign_ok and gy >= gap and abs(dy) >= DOMINANCE * abs(dx)


def _place(rng: np.random.Generator, diameters: list[float], canvas: int,
           relation: str | None) -> list[tuple[float, float]] | None:
    """Centres for boxes of the given sides, none overlapping (rejection sampling), or None."""
    m = margin(canvas)
    for _ in range(MAX_PLACEMENT_TRIES):
        placed: list[tuple[float, float, float]] = []
        for d in diameters:
            lo, hi = m + d / 2, canvas - m - d / 2
            x, y = _quantise(rng.uniform(lo, hi)), _quantise(rng.uniform(lo, hi))
            if all(max(_gaps((x, y, d), p)) >= m for p in placed):
                placed.append((x, y, d))
            else:
                break
        if len(placed) < len(diameters):
            continue
        if relation is not None and not _relation_holds(placed[0], placed[1], relation, m):
            continue
        return [(x, y) for x, y, _ in placed]
    return None


def _attributes(rng: np.random.Generator, category: str, config: ShapesConfig
                ) -> tuple[list[str], list[str], str | None]:
    """Shapes and colours of a scene's objects, and its relation, for one category; with
    probability ``config.extra_fraction`` redrawn until an extra shape or colour is among them.
    The default config draws exactly what it always drew (no extra draws from ``rng``)."""
    if config.extra_fraction > 0 and rng.random() < config.extra_fraction:
        extras = {*config.extra_shapes, *config.extra_colors}
        while True:
            shapes, colors, relation = _draw_attributes(rng, category, config)
            if extras.intersection(shapes + colors):
                return shapes, colors, relation
    return _draw_attributes(rng, category, config)


def _draw_attributes(rng: np.random.Generator, category: str, config: ShapesConfig
                     ) -> tuple[list[str], list[str], str | None]:
    def pick(options: tuple[str, ...], k: int = 1, distinct: bool = False) -> list[str]:
        return [options[j] for j in rng.choice(len(options), size=k, replace=not distinct)]

    shape_names, color_names = config.shapes, config.colors
    if category in ("single_object", "colors"):
        return pick(shape_names), pick(color_names), None
    if category == "counting":
        n = int(rng.integers(2, 4))
        shapes = pick(shape_names) * n
        same = rng.random() < config.counting_same_color
        return shapes, pick(color_names) * n if same else pick(color_names, n), None
    shapes = pick(shape_names, 2, distinct=True)
    colors = pick(color_names, 2, distinct=category == "color_attr")
    relation = pick(RELATIONS)[0] if category == "position" else None
    return shapes, colors, relation


def _sample_background(rng: np.random.Generator, config: ShapesConfig) -> Background:
    name = tuple(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))]
    texture = "plain"
    if rng.random() < config.textured_fraction:
        texture = TEXTURES[1 + int(rng.integers(len(TEXTURES) - 1))]
    return Background(name, texture, int(rng.integers(2**31)))


def sample_scene(rng: np.random.Generator, canvas: int = 64, config: ShapesConfig = ShapesConfig(),
                 category: str | None = None) -> Scene:
    """A random scene on a ``canvas`` x ``canvas`` image; ``category`` None draws one from ``config``."""
    if not isinstance(canvas, int) or canvas < 16:
        raise ValueError(f"canvas must be an int >= 16 pixels, got {canvas!r}")
    if category is None:
        p = np.asarray(config.weights if config.weights is not None else [1.0] * len(config.categories))
        category = config.categories[int(rng.choice(len(config.categories), p=p / p.sum()))]
    check_choice("category", category, CATEGORIES)
    shapes, colors, relation = _attributes(rng, category, config)
    while True:  # three large objects may not fit; then the sizes are drawn again
        sizes = [SIZES[int(rng.integers(len(SIZES)))] for _ in shapes]
        centres = _place(rng, [diameter(s, canvas) for s in sizes], canvas, relation)
        if centres is not None:
            break
    objects = tuple(ShapeObject(sh, c, sz, x, y) for sh, c, sz, (x, y) in zip(shapes, colors, sizes, centres))
    return Scene(category, objects, _sample_background(rng, config), canvas, relation)


def make_item(index: int, canvas: int = 64, seed: int = 0, config: ShapesConfig = ShapesConfig()
              ) -> tuple[Scene, str]:
    """Scene and caption of item ``index`` of the set (canvas, seed, config): always the same."""
    if not isinstance(index, (int, np.integer)) or index < 0:
        raise ValueError(f"index must be a non-negative int, got {index!r}")
    rng = np.random.Generator(np.random.PCG64([seed, int(index)]))
    scene = sample_scene(rng, canvas, config)
    return scene, caption(scene, rng, config)


# ----------------------------------------------------------------------------------- rendering


def _background(bg: Background, size: int) -> np.ndarray:
    """(size, size, 3) float64: the background colour plus its texture."""
    check_choice("texture", bg.texture, TEXTURES)
    base = np.broadcast_to(np.asarray(BACKGROUNDS[bg.name], dtype=np.float64), (size, size, 3))
    rng = np.random.Generator(np.random.PCG64(bg.seed))
    if bg.texture == "noise":  # grey (luminance) noise, independent per pixel
        return base + rng.uniform(-TEXTURE_AMPLITUDE, TEXTURE_AMPLITUDE, (size, size, 1))
    if bg.texture == "gradient":  # a linear ramp from -A to +A along a random direction
        theta = rng.uniform(0, 2 * math.pi)
        t = (np.arange(size) + 0.5) / size * 2 - 1  # (size,) in (-1, 1)
        ramp = (math.cos(theta) * t[None, :] + math.sin(theta) * t[:, None]) / math.sqrt(2)
        return base + TEXTURE_AMPLITUDE * ramp[..., None]
    return base.copy()


def _star_points(cx: float, cy: float, d: float) -> list[tuple[float, float]]:
    """The 10 corners of an upright five-pointed star whose bounding box, d wide and
    d (1 + cos 36) / (2 sin 72) = 0.951 d tall, is centred on (cx, cy): outer radius
    R = d / (2 sin 72) (the two side points span d), inner radius ``STAR_INNER`` R."""
    outer = d / (2 * math.sin(math.radians(72)))
    height = outer * (1 + math.cos(math.radians(36)))
    centre_y = cy - height / 2 + outer  # the apex touches the top of the star's box
    points = []
    for k in range(10):  # clockwise from the apex, in image coordinates (y down)
        r = outer if k % 2 == 0 else outer * STAR_INNER
        angle = math.radians(-90 + 36 * k)
        points.append((cx + r * math.cos(angle), centre_y + r * math.sin(angle)))
    return points


def _polygon(obj: ShapeObject, x0: float, y0: float, x1: float, y1: float
             ) -> tuple[list[tuple[float, float]], tuple[float, float]]:
    """A triangle's or star's corners in the box, and the point every edge line is equally far
    from (the triangle's incentre, the star's centre)."""
    if obj.shape == "triangle":  # upright isosceles: apex at the top centre, base at the bottom
        pts = [((x0 + x1) / 2, y0), (x1, y1), (x0, y1)]
        sides = [math.dist(pts[1], pts[2]), math.dist(pts[2], pts[0]), math.dist(pts[0], pts[1])]
        centre = tuple(sum(s * p[i] for s, p in zip(sides, pts)) / sum(sides) for i in (0, 1))
        return pts, centre
    pts = _star_points((x0 + x1) / 2, (y0 + y1) / 2, x1 - x0)
    outer = (x1 - x0) / (2 * math.sin(math.radians(72)))
    return pts, (pts[0][0], pts[0][1] + outer)  # the apex is ``outer`` above the centre


def _inset(points: list[tuple[float, float]], centre: tuple[float, float], width: float
           ) -> list[tuple[float, float]] | None:
    """The polygon shrunk about ``centre`` so that each edge line moves ``width`` inwards (exact
    when every edge line is equally far from the centre); None when nothing is left."""
    cx, cy = centre
    dists = []
    for (ax, ay), (bx, by) in zip(points, points[1:] + points[:1]):
        dists.append(abs((bx - ax) * (cy - ay) - (by - ay) * (cx - ax)) / math.hypot(bx - ax, by - ay))
    k = 1 - width / min(dists)
    return None if k <= 0 else [(cx + k * (x - cx), cy + k * (y - cy)) for x, y in points]


def _coverage(obj: ShapeObject, d: float, scale: float, size: int, outline: float = 0.0) -> np.ndarray:
    """(size, size) float64 in [0, 1]: the fraction of each pixel the object covers; with
    ``outline`` > 0 (scene pixels) only an outline that wide is drawn."""
    s = SUPERSAMPLE * scale  # scene pixels -> supersampled pixels
    x0, y0, x1, y1 = ((obj.x - d / 2) * s, (obj.y - d / 2) * s, (obj.x + d / 2) * s, (obj.y + d / 2) * s)
    hi = Image.new("L", (size * SUPERSAMPLE, size * SUPERSAMPLE), 0)
    draw = ImageDraw.Draw(hi)
    w = outline * s
    if obj.shape in ("circle", "square"):
        box = draw.ellipse if obj.shape == "circle" else draw.rectangle
        box((x0, y0, x1 - 1, y1 - 1), fill=255)  # PIL boxes include their last pixel
        if w > 0 and 2 * w < x1 - x0:
            box((x0 + w, y0 + w, x1 - 1 - w, y1 - 1 - w), fill=0)
    elif obj.shape in ("triangle", "star"):
        points, centre = _polygon(obj, x0, y0, x1, y1)
        draw.polygon(points, fill=255)
        inner = _inset(points, centre, w) if w > 0 else None
        if inner is not None:
            draw.polygon(inner, fill=0)
    else:
        check_choice("shape", obj.shape, ALL_SHAPES)
    low = hi.resize((size, size), resample=Image.Resampling.BOX)
    return np.asarray(low, dtype=np.float64) / 255.0


def render(scene: Scene, size: int | None = None, style: str = "filled") -> np.ndarray:
    """The scene as an (H, W, 3) uint8 RGB array, H = W = ``size`` (default: the scene's canvas),
    its objects drawn in ``style`` (one of STYLES).

    A pure function of the scene: the background texture's randomness is the scene's own seed.
    """
    size = scene.canvas if size is None else size
    if not isinstance(size, int) or size <= 0:
        raise ValueError(f"size must be a positive int, got {size!r}")
    check_choice("style", style, STYLES)
    scale = size / scene.canvas
    outline = OUTLINE_WIDTH * scene.canvas / REFERENCE_CANVAS if style == "outlined" else 0.0
    opacity = PASTEL_OPACITY if style == "pastel" else 1.0
    img = _background(scene.background, size)  # (H, W, 3)
    for obj in scene.objects:
        check_choice("color", obj.color, tuple(ALL_COLORS))
        alpha = opacity * _coverage(obj, diameter(obj.size, scene.canvas), scale, size, outline)[..., None]  # (H, W, 1)
        img = img * (1 - alpha) + np.asarray(ALL_COLORS[obj.color], dtype=np.float64) * alpha
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def layout_hint(scene: Scene, size: int | None = None, only: int | None = None) -> np.ndarray:
    """The scene's layout map as an (H, W, 3) uint8 RGB array: each object's filled silhouette in
    white on black, its antialiased edge grey (the coverage ``render`` composites the object by,
    times 255; overlapping objects never occur). ``only``: the silhouette of object ``only`` alone."""
    size = scene.canvas if size is None else size
    if not isinstance(size, int) or size <= 0:
        raise ValueError(f"size must be a positive int, got {size!r}")
    objects = scene.objects if only is None else (scene.objects[only],)
    cover = np.zeros((size, size))
    for obj in objects:
        cover = np.maximum(cover, _coverage(obj, diameter(obj.size, scene.canvas), size / scene.canvas, size))
    grey = np.clip(np.rint(cover * 255), 0, 255).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=2)


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, H, W) float32 in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float() / 127.5 - 1.0


# ------------------------------------------------------------------------------ torch Dataset


class ShapesDataset(Dataset):
    """``length`` procedural items: ``{"image": (3, size, size) float32 in [-1, 1], "caption": str,
    "scene": Scene}``, generated on the fly; item i is the same on every call and machine.

    Batch it with ``collate_fn=collate_shapes`` (torch's default collate cannot batch a Scene).
    """

    def __init__(self, length: int, size: int = 64, seed: int = 0, config: ShapesConfig = ShapesConfig()):
        if not isinstance(length, int) or length <= 0:
            raise ValueError(f"length must be a positive int, got {length!r}")
        if not isinstance(size, int) or size < 16:
            raise ValueError(f"size must be an int >= 16 pixels, got {size!r}")
        self.length, self.size, self.seed, self.config = length, size, seed, config

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict[str, Any]:
        if not -self.length <= i < self.length:
            raise IndexError(f"index {i} out of range for a data set of {self.length}")
        scene, text = make_item(i % self.length, self.size, self.seed, self.config)
        return {"image": to_tensor(render(scene, style=self.config.style_of(i % self.length))), "caption": text, "scene": scene}

    def __repr__(self) -> str:
        return f"ShapesDataset(length={self.length}, size={self.size}, seed={self.seed})"


def collate_shapes(items: list[dict[str, Any]]) -> dict[str, Any]:
    """A batch: images stacked (B, 3, H, W); captions and scenes as lists."""
    return {
        "image": torch.stack([it["image"] for it in items]),
        "caption": [it["caption"] for it in items],
        "scene": [it["scene"] for it in items],
    }


# ----------------------------------------------------------------------------------- on disk


def scene_to_dict(scene: Scene) -> dict[str, Any]:
    return asdict(scene)


def scene_from_dict(d: dict[str, Any]) -> Scene:
    return Scene(
        category=d["category"],
        objects=tuple(ShapeObject(**o) for o in d["objects"]),
        background=Background(**d["background"]),
        canvas=int(d["canvas"]),
        relation=d.get("relation"),
    )


def write_shapes(folder: str | Path, n: int, size: int = 64, seed: int = 0,
                 config: ShapesConfig = ShapesConfig(), *, overwrite: bool = False) -> Path:
    """Write items 0..n-1 as ``000000.png`` + ``000000.txt`` (kohya caption convention) and a
    ``scenes.jsonl`` with one ``{"file_name", "caption", "scene"}`` line per image.

    Refuses (FileExistsError) a folder that is not empty unless ``overwrite=True``; even then
    only files of these names are replaced, nothing else is deleted. Returns the folder.
    """
    if not isinstance(n, int) or n <= 0:
        raise ValueError(f"n must be a positive int, got {n!r}")
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"{folder} exists and is not a folder")
    if folder.exists() and any(folder.iterdir()) and not overwrite:
        raise FileExistsError(f"{folder} is not empty; pass overwrite=True to write into it anyway")
    folder.mkdir(parents=True, exist_ok=True)
    width = max(6, len(str(n - 1)))
    lines = []
    for i in range(n):
        scene, text = make_item(i, size, seed, config)
        stem = f"{i:0{width}d}"
        Image.fromarray(render(scene, style=config.style_of(i))).save(folder / f"{stem}.png")
        (folder / f"{stem}.txt").write_text(text + "\n", encoding="utf-8")
        lines.append(json.dumps({"file_name": f"{stem}.png", "caption": text, "scene": scene_to_dict(scene)}))
    (folder / SCENES_FILE).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def read_scenes(folder: str | Path) -> list[tuple[str, str, Scene]]:
    """(file name, caption, scene) for every line of a folder's ``scenes.jsonl``."""
    rows = []
    with (Path(folder) / SCENES_FILE).open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                rows.append((row["file_name"], row["caption"], scene_from_dict(row["scene"])))
    return rows
