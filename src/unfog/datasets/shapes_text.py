"""The words of the ``shapes`` data set: its vocabulary, scenes, captions and prompt grammar.

Training captions are drawn from templates and paraphrases and sometimes leave attributes out
(colour, size, the relation), so that a model learns prompts that say less as well as more.
Evaluation prompts are canonical: one fixed wording per meaning, with every attribute the
category scores and nothing else (see ``prompt_for``). ``parse_prompt`` reads any text in the
grammar below back into a ``PromptSpec``, the structured form the analyzer scores, and returns
None for text outside it ("a photo of a cat").

Grammar (lower case; a trailing "." and commas are ignored)::

    prompt   := [frame] body [" on a " background " background"]
    frame    := "a picture of " | "an image of " | "a drawing of " | "a photo of "
    body     := np1 | npN | np1 " that is " colour-less form | np1 " and " np1 | np1 relation np1
    np1      := ("a" | "an" | "one") [size] [colour] shape           "a large red circle"
              | ("a" | "an" | "one") [size] shape " that is " colour  "a square that is green"
    npN      := ("two" | "three") [size] [colour] shape "s"           "two blue triangles"
    relation := " to the left of " | " left of " | " on the left of " | (same for right)
              | " above " | " below " | " under " | " beneath "

Shapes and colours are those of ALL_SHAPES and ALL_COLORS: the parser, ``ShapeObject`` and
``ObjectSpec`` know the extra concepts (``EXTRA_SHAPES``, ``EXTRA_COLORS``: "a teal star"), the
default data set never draws them, and the evaluation prompts of the six categories never name
them; ``concept_prompts`` makes prompts about them.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass

import numpy as np

from ..choices import check_choice

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")  # what the default set draws
# Saturated colours far from each other (>= 87 apart in RGB) and from every background (>= 170).
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 30, 35),
    "orange": (245, 125, 20),
    "yellow": (235, 210, 35),
    "green": (35, 165, 60),
    "blue": (40, 75, 225),
    "purple": (145, 50, 190),
}
# Concepts the default set never draws (the embedded model has never seen them), drawn only when a
# ShapesConfig asks (``extra_shapes``, ``extra_colors``): material to teach a model something new.
# Each word is one CLIP token. Teal is >= 109 from every colour above and >= 211 from every
# background, and no blend of it with a background reads as another colour; pink and brown were
# measured and rejected: the analyzer would read a pale pink (255, 150, 200) as pink and a mid
# grey (120, 120, 120) as brown, which must stay colours of no name (docs/shapes.md).
EXTRA_SHAPES: tuple[str, ...] = ("star",)  # upright five-pointed, see ``shapes._star_points``
EXTRA_COLORS: dict[str, tuple[int, int, int]] = {"teal": (0, 160, 170)}
ALL_SHAPES: tuple[str, ...] = SHAPES + EXTRA_SHAPES  # what prompts, scenes and the analyzer know
ALL_COLORS: dict[str, tuple[int, int, int]] = {**COLORS, **EXTRA_COLORS}
SIZES: tuple[str, ...] = ("small", "large")
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")  # object 0 <relation> object 1
CATEGORIES: tuple[str, ...] = ("single_object", "two_objects", "counting", "colors", "position", "color_attr")
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (250, 250, 248),
    "light grey": (222, 222, 222),
    "beige": (240, 230, 205),
}
TEXTURES: tuple[str, ...] = ("plain", "noise", "gradient")
# How objects are drawn: "filled" (the default set), "outlined", an outline of fixed width
# (``shapes.OUTLINE_WIDTH``) with the background inside, or "pastel", filled with a paler shade
# (``shapes.PASTEL_OPACITY``): styles the embedded model never drew
STYLES: tuple[str, ...] = ("filled", "outlined", "pastel")

INVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
RELATION_PHRASES: dict[str, tuple[str, ...]] = {  # the first is the canonical one
    "left of": ("to the left of", "left of", "on the left of"),
    "right of": ("to the right of", "right of", "on the right of"),
    "above": ("above",),
    "below": ("below", "under", "beneath"),
}
COUNT_WORDS = {1: "one", 2: "two", 3: "three"}
FRAMES: tuple[str, ...] = ("a picture of {}", "an image of {}", "a drawing of {}")
PREFIXES: tuple[str, ...] = ("a picture of ", "an image of ", "a drawing of ", "a photo of ")


# ------------------------------------------------------------------------------------- scenes


@dataclass(frozen=True)
class ShapeObject:
    shape: str  # one of ALL_SHAPES
    color: str  # a key of ALL_COLORS
    size: str  # one of SIZES
    x: float  # centre of its d x d box, pixels from the left of the scene's canvas
    y: float  # centre, pixels from the top

    def __post_init__(self):
        check_choice("shape", self.shape, ALL_SHAPES)
        check_choice("color", self.color, tuple(ALL_COLORS))
        check_choice("size", self.size, SIZES)


@dataclass(frozen=True)
class Background:
    name: str  # a key of BACKGROUNDS
    texture: str  # one of TEXTURES
    seed: int  # the texture's randomness, so a scene renders the same every time

    def __post_init__(self):
        check_choice("background", self.name, tuple(BACKGROUNDS))
        check_choice("texture", self.texture, TEXTURES)


@dataclass(frozen=True)
class Scene:
    category: str  # one of CATEGORIES
    objects: tuple[ShapeObject, ...]
    background: Background
    canvas: int  # the side, in pixels, that the objects' coordinates refer to
    relation: str | None = None  # position scenes: objects[0] <relation> objects[1]

    def __post_init__(self):
        check_choice("category", self.category, CATEGORIES)
        if (self.category == "position") != (self.relation is not None):
            raise ValueError("a relation is given exactly when the category is 'position'")
        if self.relation is not None:
            check_choice("relation", self.relation, RELATIONS)


@dataclass(frozen=True)
class ShapesConfig:
    """What the data set draws and how it captions it (the image size and seed are separate)."""

    categories: tuple[str, ...] = CATEGORIES
    weights: tuple[float, ...] | None = None  # per category; None = uniform
    textured_fraction: float = 0.5  # backgrounds with noise or a gradient; the rest are plain
    counting_same_color: float = 0.5  # counting scenes whose objects share one colour
    color_word: float = 0.75  # captions naming colours where the category does not need them
    size_word: float = 0.3  # captions naming sizes
    relation_word: float = 0.85  # position captions stating the relation
    frame: float = 0.5  # captions wrapped in "a picture of ..." or "... on a white background"
    extra_shapes: tuple[str, ...] = ()  # of EXTRA_SHAPES, drawn alongside SHAPES
    extra_colors: tuple[str, ...] = ()  # of EXTRA_COLORS, drawn alongside COLORS
    extra_fraction: float = 0.0  # scenes redrawn until they show an extra shape or colour
    # draw only these shapes / colours (of those above; () = all): e.g. 20 images of one concept
    # ({"categories": ["single_object"], "only_shapes": ["triangle"], "only_colors": ["green"]})
    only_shapes: tuple[str, ...] = ()
    only_colors: tuple[str, ...] = ()
    # one of STYLES, or several: item i is drawn in style[i % len(style)] (e.g. a decoder fine-tuned
    # on both); the scenes and captions do not depend on it
    style: str | tuple[str, ...] = "filled"

    def __post_init__(self):
        styles = (self.style,) if isinstance(self.style, str) else self.style
        if not styles:
            raise ValueError(f"style must name at least one of {', '.join(STYLES)}")
        for style in styles:
            check_choice("style", style, STYLES)
        if not self.categories:
            raise ValueError("categories must not be empty")
        for c in self.categories:
            check_choice("category", c, CATEGORIES)
        if self.weights is not None and (
            len(self.weights) != len(self.categories) or min(self.weights) < 0 or sum(self.weights) <= 0
        ):
            raise ValueError(f"weights must be {len(self.categories)} non-negative numbers, not all 0")
        for name in ("textured_fraction", "counting_same_color", "color_word", "size_word", "relation_word",
                     "frame"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} is a probability in [0, 1], got {getattr(self, name)!r}")
        for name, extra in (("extra_shapes", EXTRA_SHAPES), ("extra_colors", tuple(EXTRA_COLORS))):
            for value in getattr(self, name):
                check_choice(name[:-1].replace("_", " "), value, extra)
            if len(set(getattr(self, name))) != len(getattr(self, name)):
                raise ValueError(f"{name} lists a value twice: {getattr(self, name)!r}")
        if not 0.0 <= self.extra_fraction <= 1.0:
            raise ValueError(f"extra_fraction is a probability in [0, 1], got {self.extra_fraction!r}")
        if self.extra_fraction > 0 and not (self.extra_shapes or self.extra_colors):
            raise ValueError("extra_fraction > 0 needs extra_shapes or extra_colors to draw")
        for name, known in (("only_shapes", SHAPES + self.extra_shapes), ("only_colors", (*COLORS, *self.extra_colors))):
            for value in getattr(self, name):
                check_choice(name[5:-1], value, known)
        pairs = {"two_objects", "position", "color_attr"}.intersection(self.categories)
        if len(self.only_shapes) == 1 and pairs:
            raise ValueError(f"only_shapes holds one shape, but categories {', '.join(sorted(pairs))} draw two "
                             "different shapes; give two or more, or leave those categories out")
        if len(self.only_colors) == 1 and "color_attr" in self.categories:
            raise ValueError("only_colors holds one colour, but category color_attr draws two different colours")

    @property
    def shapes(self) -> tuple[str, ...]:
        """The shapes this config draws: SHAPES, then its extra ones (or ``only_shapes``)."""
        return self.only_shapes or SHAPES + self.extra_shapes

    @property
    def colors(self) -> tuple[str, ...]:
        """The colour names this config draws: those of COLORS, then its extra ones (or ``only_colors``)."""
        return self.only_colors or (*COLORS, *self.extra_colors)

    def style_of(self, index: int) -> str:
        """The style item ``index`` is drawn in."""
        return self.style if isinstance(self.style, str) else self.style[index % len(self.style)]


# ---------------------------------------------------------------------------------- prompts


@dataclass(frozen=True)
class ObjectSpec:
    shape: str
    color: str | None = None  # None: any colour
    count: int = 1

    def __post_init__(self):
        check_choice("shape", self.shape, ALL_SHAPES)
        if self.color is not None:
            check_choice("color", self.color, tuple(ALL_COLORS))
        if self.count not in COUNT_WORDS:
            check_choice("count", self.count, tuple(COUNT_WORDS))


@dataclass(frozen=True)
class PromptSpec:
    """A prompt and what it asks for: ``objects`` (shape, colour or None, count) and, for position
    prompts, ``relation``: objects[0] <relation> objects[1]."""

    text: str
    category: str
    objects: tuple[ObjectSpec, ...]
    relation: str | None = None

    def __post_init__(self):
        check_choice("category", self.category, CATEGORIES)
        if not self.objects:
            raise ValueError("a prompt asks for at least one object")
        if self.relation is not None:
            check_choice("relation", self.relation, RELATIONS)
            if len(self.objects) != 2 or any(o.count != 1 for o in self.objects):
                raise ValueError("a relation holds between exactly two single objects")


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def noun_phrase(shape: str, color: str | None = None, size: str | None = None, count: int = 1,
                one: bool = False) -> str:
    """ "a large red circle", "an orange square", "one circle", "three blue triangles"."""
    words = [w for w in (size, color) if w is not None] + [shape + ("s" if count > 1 else "")]
    det = COUNT_WORDS[count] if count > 1 or one else _article(words[0])
    return " ".join([det, *words])


def caption_vocabulary(config: ShapesConfig | None = None) -> list[str]:
    """Every word and phrase a training caption (``caption``) can contain, whatever the config's
    category weights: a text-to-image model's vocabulary comes from these, so that it does not
    depend on which scenes a run happens to draw. With no ``config``: the default set's words
    (the embedded model's vocabulary); with one: also the words of its extra shapes and colours."""
    shapes, colors = (SHAPES, tuple(COLORS)) if config is None else (config.shapes, config.colors)
    return [*shapes, *(s + "s" for s in shapes), *colors, *SIZES, *COUNT_WORDS.values(), "a", "an", "and",
            "that is", *itertools.chain.from_iterable(RELATION_PHRASES.values()),
            *(f.format("") for f in FRAMES), *(f"on a {b} background" for b in BACKGROUNDS)]


def _spec_text(objects: tuple[ObjectSpec, ...], relation: str | None) -> str:
    nps = [noun_phrase(o.shape, o.color, count=o.count) for o in objects]
    if relation is not None:
        return f"{nps[0]} {RELATION_PHRASES[relation][0]} {nps[1]}"
    return " and ".join(nps)


def spec_for(scene: Scene) -> PromptSpec:
    """The canonical evaluation prompt of a scene, with every attribute its category scores:
    colour and shape (single_object, colors, color_attr), shapes (two_objects, position), count
    and shape (counting), the relation (position). Sizes are never scored."""
    o = scene.objects
    if scene.category in ("single_object", "colors"):
        objects = (ObjectSpec(o[0].shape, o[0].color),)
    elif scene.category == "counting":
        objects = (ObjectSpec(o[0].shape, None, len(o)),)
    elif scene.category == "color_attr":
        objects = (ObjectSpec(o[0].shape, o[0].color), ObjectSpec(o[1].shape, o[1].color))
    else:  # two_objects, position
        objects = (ObjectSpec(o[0].shape), ObjectSpec(o[1].shape))
    return PromptSpec(_spec_text(objects, scene.relation), scene.category, objects, scene.relation)


def prompt_for(scene: Scene) -> str:
    """The canonical evaluation prompt text of a scene (see ``spec_for``)."""
    return spec_for(scene).text


def _all_specs(category: str) -> list[PromptSpec]:
    """Every canonical prompt of a category, in a fixed order."""
    pairs = list(itertools.permutations(SHAPES, 2))
    if category in ("single_object", "colors"):
        groups = [((ObjectSpec(s, c),), None) for s in SHAPES for c in COLORS]
    elif category == "counting":
        groups = [((ObjectSpec(s, None, n),), None) for s in SHAPES for n in (2, 3)]
    elif category == "two_objects":
        groups = [((ObjectSpec(a), ObjectSpec(b)), None) for a, b in pairs]
    elif category == "position":
        groups = [((ObjectSpec(a), ObjectSpec(b)), r) for a, b in pairs for r in RELATIONS]
    else:  # color_attr
        groups = [((ObjectSpec(a, ca), ObjectSpec(b, cb)), None)
                  for a, b in pairs for ca, cb in itertools.permutations(COLORS, 2)]
    return [PromptSpec(_spec_text(objs, rel), category, objs, rel) for objs, rel in groups]


def evaluation_prompts(category: str, n: int, seed: int = 0) -> list[PromptSpec]:
    """``n`` canonical prompts of a category, cycling through all of them (18 single_object or
    colors, 6 two_objects, 6 counting, 24 position, 180 color_attr) in seeded random orders, so
    every prompt appears equally often, give or take one."""
    check_choice("category", category, CATEGORIES)
    if not isinstance(n, int) or n <= 0:
        raise ValueError(f"n must be a positive int, got {n!r}")
    rng = np.random.Generator(np.random.PCG64([seed, CATEGORIES.index(category)]))
    return _cycle(_all_specs(category), n, rng)


def _cycle(specs: list[PromptSpec], n: int, rng: np.random.Generator) -> list[PromptSpec]:
    """``n`` of ``specs``: all of them in a random order, again and again, cut at ``n``."""
    out: list[PromptSpec] = []
    while len(out) < n:
        out.extend(specs[j] for j in rng.permutation(len(specs)))
    return out[:n]


def concept_prompts(n: int, seed: int = 0, shapes: tuple[str, ...] = EXTRA_SHAPES,
                    colors: tuple[str, ...] = tuple(EXTRA_COLORS)) -> list[PromptSpec]:
    """``n`` single-object prompts about the given concepts (by default the extra ones): every
    shape and colour pair of ALL_SHAPES x ALL_COLORS whose shape is one of ``shapes`` or whose
    colour is one of ``colors``, each equally often, in seeded random orders. For "star" and
    "teal": "a red star" ... "a teal star" and "a teal circle", "a teal square", "a teal
    triangle", 10 prompts. Their category is "single_object", the one ``parse_prompt`` infers,
    so ``unfog eval --prompts`` scores them as such (and per prompt); the six categories of
    ``evaluation_prompts`` are not changed by the extra concepts."""
    for shape in shapes:
        check_choice("shape", shape, ALL_SHAPES)
    for color in colors:
        check_choice("color", color, tuple(ALL_COLORS))
    if not isinstance(n, int) or n <= 0:
        raise ValueError(f"n must be a positive int, got {n!r}")
    pairs = [(s, c) for s in ALL_SHAPES for c in ALL_COLORS if s in shapes or c in colors]
    if not pairs:
        raise ValueError("concept_prompts needs at least one shape or colour")
    specs = [PromptSpec(noun_phrase(s, c), "single_object", (ObjectSpec(s, c),)) for s, c in pairs]
    rng = np.random.Generator(np.random.PCG64([seed, len(CATEGORIES)]))  # not a category's stream
    return _cycle(specs, n, rng)


# ---------------------------------------------------------------------------------- captions


def caption(scene: Scene, rng: np.random.Generator, config: ShapesConfig = ShapesConfig()) -> str:
    """A training caption of the scene: a template and paraphrase drawn from ``rng``; attributes
    the category does not need are sometimes left out (``config``'s probabilities)."""
    o, cat = scene.objects, scene.category
    with_size = rng.random() < config.size_word

    def size_of(ob: ShapeObject) -> str | None:
        return ob.size if with_size else None

    if cat in ("single_object", "colors"):
        ob = o[0]
        if cat == "colors" and rng.random() < 0.3:
            body = f"{noun_phrase(ob.shape, None, size_of(ob))} that is {ob.color}"
        else:
            named = cat == "colors" or rng.random() < config.color_word
            body = noun_phrase(ob.shape, ob.color if named else None, size_of(ob), one=rng.random() < 0.2)
    elif cat == "counting":
        same_color, same_size = len({ob.color for ob in o}) == 1, len({ob.size for ob in o}) == 1
        named = same_color and rng.random() < config.color_word
        body = noun_phrase(o[0].shape, o[0].color if named else None,
                           o[0].size if with_size and same_size else None, count=len(o))
    else:  # two objects: two_objects, position, color_attr
        named = cat == "color_attr" or rng.random() < config.color_word
        nps = [noun_phrase(ob.shape, ob.color if named else None, size_of(ob)) for ob in o]
        swap = rng.random() < 0.5
        if cat == "position" and rng.random() < config.relation_word:
            relation = INVERSE[scene.relation] if swap else scene.relation
            phrases = RELATION_PHRASES[relation]
            phrase = phrases[int(rng.integers(len(phrases)))]
            first, second = (nps[1], nps[0]) if swap else (nps[0], nps[1])
            body = f"{first} {phrase} {second}"
        else:
            body = " and ".join(nps[::-1] if swap else nps)

    if rng.random() < config.frame:
        k = int(rng.integers(len(FRAMES) + 2))
        on_background = f" on a {scene.background.name} background"
        if k < len(FRAMES):
            body = FRAMES[k].format(body)
        elif k == len(FRAMES):
            body = body + on_background
        else:
            body = FRAMES[0].format(body) + on_background
    return body


# -------------------------------------------------------------------------------- the parser

_COLOR = "|".join(ALL_COLORS)
_SHAPE = "|".join(ALL_SHAPES)
_SIZE = "|".join(SIZES)
_NP = re.compile(rf"^(a|an|one|two|three) (?:(?:{_SIZE}) )?(?:({_COLOR}) )?({_SHAPE})(s?)$")
_NP_THAT_IS = re.compile(rf"^(?:a|an|one) (?:(?:{_SIZE}) )?({_SHAPE}) that is ({_COLOR})$")
_BACKGROUND = re.compile(r" on an? ([a-z ]+?) background$")
_COUNT = {"a": 1, "an": 1, "one": 1, "two": 2, "three": 3}
# phrases longest first, so "to the left of" is tried before "left of"
_PHRASES = sorted(((p, r) for r, ps in RELATION_PHRASES.items() for p in ps), key=lambda pr: -len(pr[0]))


def _parse_np(text: str) -> ObjectSpec | None:
    m = _NP_THAT_IS.match(text)
    if m:
        return ObjectSpec(m.group(1), m.group(2))
    m = _NP.match(text)
    if not m:
        return None
    det, color, shape, plural = m.groups()
    count = _COUNT[det]
    if (count > 1) != (plural == "s"):
        return None  # "two circle", "a circles"
    return ObjectSpec(shape, color, count)


def _parse_body(body: str) -> tuple[tuple[ObjectSpec, ...], str | None] | None:
    for phrase, relation in _PHRASES:
        parts = body.split(f" {phrase} ")
        if len(parts) == 2:
            a, b = _parse_np(parts[0]), _parse_np(parts[1])
            if a is not None and b is not None and a.count == b.count == 1:
                return (a, b), relation
    parts = body.split(" and ")
    if len(parts) == 2:
        a, b = _parse_np(parts[0]), _parse_np(parts[1])
        if a is not None and b is not None and a.count == b.count == 1:
            return (a, b), None
        return None
    one = _parse_np(body)
    return None if one is None or len(parts) != 1 else ((one,), None)


def _fits(category: str, objects: tuple[ObjectSpec, ...], relation: str | None) -> bool:
    """Whether parsed objects have the structure a category scores."""
    single = len(objects) == 1 and objects[0].count == 1
    if category == "single_object":
        return single
    if category == "colors":
        return single and objects[0].color is not None
    if category == "counting":
        return len(objects) == 1 and objects[0].count > 1
    if category == "position":
        return relation is not None
    pair = len(objects) == 2 and relation is None
    if category == "two_objects":
        return pair
    colors = [o.color for o in objects]
    return pair and None not in colors and colors[0] != colors[1]  # color_attr


def _infer_category(objects: tuple[ObjectSpec, ...], relation: str | None) -> str:
    for category in ("position", "counting", "single_object", "color_attr", "two_objects"):
        if _fits(category, objects, relation):
            return category
    raise AssertionError("unreachable: every parse fits a category")


def parse_prompt(text: str, category: str | None = None) -> PromptSpec | None:
    """The ``PromptSpec`` of a prompt in the shapes grammar (module docstring), or None if the
    text is outside it. The category is inferred (one object -> single_object, several of one
    shape -> counting, two with two different named colours -> color_attr, two -> two_objects,
    a relation -> position) unless given, in which case a prompt that does not fit that category
    gives None. "colors" is only ever given: its prompts read like single_object ones."""
    if category is not None:
        check_choice("category", category, CATEGORIES)
    body = " ".join(text.lower().replace(",", " ").split()).rstrip(".").strip()
    for prefix in PREFIXES:
        if body.startswith(prefix):
            body = body[len(prefix):]
            break
    m = _BACKGROUND.search(body)
    if m:
        if m.group(1) not in BACKGROUNDS:
            return None
        body = body[: m.start()]
    parsed = _parse_body(body)
    if parsed is None:
        return None
    objects, relation = parsed
    if category is None:
        category = _infer_category(objects, relation)
    elif not _fits(category, objects, relation):
        return None
    return PromptSpec(text.strip(), category, objects, relation)
