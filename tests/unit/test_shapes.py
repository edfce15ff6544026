"""The ``shapes`` procedural data set and its deterministic analyzer.

The analyzer is only worth its numbers if it is right on the data set's own images, near chance
on images that do not match their prompt, and not fooled by noise; the tests below measure all
three (the figures are in docs/shapes.md).
"""

import itertools
import math
import re

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFilter

from unfog.datasets import ImageFolderDataset
from unfog.datasets.shapes import (
    ALL_COLORS,
    ALL_SHAPES,
    BACKGROUNDS,
    CATEGORIES,
    COLORS,
    EXTRA_COLORS,
    EXTRA_SHAPES,
    RELATIONS,
    SHAPES,
    Background,
    ObjectSpec,
    PromptSpec,
    Scene,
    ShapeObject,
    ShapesConfig,
    ShapesDataset,
    collate_shapes,
    concept_prompts,
    diameter,
    evaluation_prompts,
    make_item,
    margin,
    parse_prompt,
    prompt_for,
    read_scenes,
    render,
    sample_scene,
    spec_for,
    write_shapes,
)
from unfog.metrics.shapes_analyzer import (
    DetectedObject,
    analyze,
    classify_shape,
    colour_map,
    components,
    match,
    score,
    score_batch,
    shape_features,
    solidity,
)

N_PER_CATEGORY = 300


def scene_rng(seed: int, category: str, i: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64([seed, CATEGORIES.index(category), i]))


def truth(scene: Scene) -> list[DetectedObject]:
    """The scene's objects as the analyzer would report them if it were perfect."""
    return [DetectedObject(o.shape, o.color, 1, o.x, o.y, (0, 0, 1, 1)) for o in scene.objects]


@pytest.fixture(scope="module")
def corpus():
    """N_PER_CATEGORY scenes per category: (scenes, images, objects found in each image)."""
    out = {}
    for cat in CATEGORIES:
        scenes = [sample_scene(scene_rng(2024, cat, i), 64, category=cat) for i in range(N_PER_CATEGORY)]
        images = [render(s) for s in scenes]
        out[cat] = (scenes, images, [analyze(im) for im in images])
    return out


# --------------------------------------------------------------------------------- data set


def test_items_are_deterministic_and_seeded():
    scene, text = make_item(5, 64, seed=3)
    again, text_again = make_item(5, 64, seed=3)
    assert scene == again and text == text_again
    assert render(scene).tobytes() == render(again).tobytes()
    a, b = ShapesDataset(10, seed=3)[5], ShapesDataset(10, seed=3)[5]
    assert torch.equal(a["image"], b["image"]) and a["caption"] == b["caption"] == text
    others = [make_item(5, 64, seed=4), make_item(6, 64, seed=3)]
    for other, other_text in others:
        assert render(other).tobytes() != render(scene).tobytes()
    # a different seed changes the whole set, not just one item
    texts = [make_item(i, 64, 0)[1] for i in range(50)]
    assert texts != [make_item(i, 64, 1)[1] for i in range(50)]


def test_dataset_items_and_batches():
    ds = ShapesDataset(8, size=32, seed=0)
    item = ds[0]
    assert item["image"].shape == (3, 32, 32) and item["image"].dtype == torch.float32
    assert -1.0 <= item["image"].min() and item["image"].max() <= 1.0
    assert isinstance(item["caption"], str) and isinstance(item["scene"], Scene)
    assert torch.equal(ds[-1]["image"], ds[7]["image"])
    with pytest.raises(IndexError):
        ds[8]
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=4, collate_fn=collate_shapes)))
    assert batch["image"].shape == (4, 3, 32, 32) and len(batch["caption"]) == len(batch["scene"]) == 4
    assert bool(score(item["image"], spec_for(item["scene"])))  # the tensor form is analyzable


def test_scenes_keep_objects_apart_and_inside():
    for cat, i in itertools.product(CATEGORIES, range(100)):
        canvas = (64, 48, 128)[i % 3]
        scene = sample_scene(scene_rng(7, cat, i), canvas, category=cat)
        m = margin(canvas)
        boxes = [(o.x, o.y, diameter(o.size, canvas)) for o in scene.objects]
        for x, y, d in boxes:
            assert m <= x - d / 2 and x + d / 2 <= canvas - m and m <= y - d / 2 and y + d / 2 <= canvas - m
        for (xa, ya, da), (xb, yb, db) in itertools.combinations(boxes, 2):
            gap = max(abs(xa - xb), abs(ya - yb)) - (da + db) / 2  # the wider of the two axis gaps
            assert gap >= m - 1e-9, (cat, i)
        shapes, colors = [o.shape for o in scene.objects], [o.color for o in scene.objects]
        n = len(scene.objects)
        if cat in ("single_object", "colors"):
            assert n == 1
        elif cat == "counting":
            assert n in (2, 3) and len(set(shapes)) == 1
        else:
            assert n == 2 and len(set(shapes)) == 2
            if cat == "color_attr":
                assert len(set(colors)) == 2


def test_rendered_objects_do_not_overlap():
    scene = sample_scene(scene_rng(1, "counting", 0), 64, category="counting")
    alone = [render(Scene("counting", (o,), scene.background, 64)) for o in scene.objects]
    empty = render(Scene("single_object", (), scene.background, 64)).astype(int)
    changed = [np.abs(a.astype(int) - empty).sum(-1) > 0 for a in alone]  # (H, W) per object
    for a, b in itertools.combinations(changed, 2):
        assert not (a & b).any()


def test_position_relations_are_unambiguous():
    seen = set()
    for i in range(N_PER_CATEGORY):
        scene = sample_scene(scene_rng(9, "position", i), 64, category="position")
        a, b = scene.objects
        da, db = diameter(a.size, 64), diameter(b.size, 64)
        dx, dy = a.x - b.x, a.y - b.y
        gap_x, gap_y = abs(dx) - (da + db) / 2, abs(dy) - (da + db) / 2
        horizontal = scene.relation in ("left of", "right of")
        main, other, gap = (dx, dy, gap_x) if horizontal else (dy, dx, gap_y)
        assert (main < 0) == (scene.relation in ("left of", "above"))
        assert abs(main) >= 1.5 * abs(other) and gap >= margin(64)
        seen.add(scene.relation)
    assert seen == set(RELATIONS)


def test_write_shapes_round_trip_and_refuses_to_overwrite(tmp_path):
    folder = write_shapes(tmp_path / "set", 12, size=32, seed=5)
    rows = read_scenes(folder)
    assert len(rows) == 12
    for i, (name, text, scene) in enumerate(rows):
        want_scene, want_text = make_item(i, 32, 5)
        assert scene == want_scene and text == want_text
        assert (folder / name).with_suffix(".txt").read_text().strip() == text
        np.testing.assert_array_equal(np.asarray(Image.open(folder / name)), render(want_scene))
    ds = ImageFolderDataset(folder, 32)  # the kohya captions are picked up
    assert list(ds.captions) == [t for _, t, _ in rows]

    with pytest.raises(FileExistsError, match="overwrite=True"):
        write_shapes(folder, 3)
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        write_shapes(user, 3)
    write_shapes(user, 3, overwrite=True)
    assert (user / "notes.txt").read_text() == "keep me" and len(read_scenes(user)) == 3


# ----------------------------------------------------------------------------------- prompts

TEMPLATES = [  # text -> (category, objects, relation)
    ("a red circle", ("single_object", (("circle", "red", 1),), None)),
    ("an orange square", ("single_object", (("square", "orange", 1),), None)),
    ("a circle", ("single_object", (("circle", None, 1),), None)),
    ("one large red circle", ("single_object", (("circle", "red", 1),), None)),
    ("A picture of a small triangle.", ("single_object", (("triangle", None, 1),), None)),
    ("an image of a purple square", ("single_object", (("square", "purple", 1),), None)),
    ("a drawing of a yellow circle", ("single_object", (("circle", "yellow", 1),), None)),
    ("a photo of a blue triangle", ("single_object", (("triangle", "blue", 1),), None)),
    ("a red circle on a white background", ("single_object", (("circle", "red", 1),), None)),
    ("a picture of a circle on a light grey background", ("single_object", (("circle", None, 1),), None)),
    ("a large square that is green", ("single_object", (("square", "green", 1),), None)),
    ("two blue triangles", ("counting", (("triangle", "blue", 2),), None)),
    ("three squares", ("counting", (("square", None, 3),), None)),
    ("an image of three small circles on a beige background", ("counting", (("circle", None, 3),), None)),
    ("a circle and a square", ("two_objects", (("circle", None, 1), ("square", None, 1)), None)),
    ("a red circle and a red square", ("two_objects", (("circle", "red", 1), ("square", "red", 1)), None)),
    ("a red circle and a blue square", ("color_attr", (("circle", "red", 1), ("square", "blue", 1)), None)),
    ("a large green triangle and a small orange circle",
     ("color_attr", (("triangle", "green", 1), ("circle", "orange", 1)), None)),
]
for _rel, _phrases in {"left of": ("to the left of", "left of", "on the left of"),
                       "right of": ("to the right of", "right of", "on the right of"),
                       "above": ("above",), "below": ("below", "under", "beneath")}.items():
    for _p in _phrases:
        TEMPLATES.append((f"a red circle {_p} a square",
                          ("position", (("circle", "red", 1), ("square", None, 1)), _rel)))

OUTSIDE = ["a photo of a cat", "", "a red circle and", "two circle", "a circles", "four squares",
           "a red circle on a black background", "a pink circle", "a circle and a square and a triangle",
           "a circle left of two squares", "a red circle to the left of", "two circles and a square",
           "a circle that is big", "the red circle"]


@pytest.mark.parametrize("text,expected", TEMPLATES)
def test_parse_prompt_templates(text, expected):
    category, objects, relation = expected
    spec = parse_prompt(text)
    assert spec == PromptSpec(text.strip(), category, tuple(ObjectSpec(*o) for o in objects), relation)


@pytest.mark.parametrize("text", OUTSIDE)
def test_parse_prompt_outside_the_domain(text):
    assert parse_prompt(text) is None


def test_parse_prompt_category_hint():
    assert parse_prompt("a red circle", "colors").category == "colors"
    assert parse_prompt("a square that is green", "colors").category == "colors"
    assert parse_prompt("a circle", "colors") is None  # colors prompts name the colour
    assert parse_prompt("two squares", "single_object") is None
    assert parse_prompt("a red circle and a red square", "color_attr") is None  # one colour
    assert parse_prompt("a red circle and a blue square", "two_objects").category == "two_objects"
    with pytest.raises(ValueError, match="single_object, two_objects, counting, colors"):
        parse_prompt("a red circle", "colour")


def test_every_training_caption_parses_and_is_true_of_its_scene():
    """2,400 captions from every category: each parses, and the scene satisfies what it says.
    Every frame and relation phrase turns up, so all templates are exercised."""
    used = set()
    for i in range(2400):
        scene, text = make_item(i, 64, seed=11)
        spec = parse_prompt(text)
        assert spec is not None, text
        assert bool(match(truth(scene), spec)), (text, scene)
        used |= {w for w in ("a picture of", "an image of", "a drawing of", "background", "that is",
                             "to the left of", "on the right of", "above", "beneath", "under",
                             "one ", "two ", "three ", "small", "large") if w in text}
    assert len(used) == 15


def test_caption_vocabulary_holds_every_caption_token():
    """The vocabulary a text-to-image model is given for "shapes" comes from the grammar, not from
    the scenes a run draws: every token of 3,000 captions of any category mix is in it, and each of
    its phrases turns up in those captions (it holds nothing the captions never say)."""
    from unfog.datasets.shapes_text import caption_vocabulary
    from unfog.models.tokenizer import CLIPTokenizer, SubVocabTokenizer

    vocabulary = caption_vocabulary()
    tok = SubVocabTokenizer.from_texts(CLIPTokenizer.from_bpe_file(), vocabulary)
    texts = [make_item(i, 64, seed=5)[1] for i in range(3000)]
    texts += [make_item(i, 64, seed=6, config=ShapesConfig(categories=("position",)))[1] for i in range(300)]
    assert all(tok.unknown_words(text) == [] for text in texts)
    seen = " | ".join(texts)
    assert [p for p in vocabulary if not re.search(rf"\b{p}\b", seen)] == []
    narrow = SubVocabTokenizer.from_texts(tok.base, texts[3000:])  # position scenes alone say fewer words
    assert narrow.vocab_size < tok.vocab_size


def test_canonical_prompts_and_evaluation_sets():
    for cat in CATEGORIES:
        scene = sample_scene(scene_rng(3, cat, 0), 64, category=cat)
        assert parse_prompt(prompt_for(scene), cat) == spec_for(scene)
        assert bool(match(truth(scene), spec_for(scene)))
        n_all = {"single_object": 18, "colors": 18, "two_objects": 6, "counting": 6, "position": 24,
                 "color_attr": 180}[cat]
        specs = evaluation_prompts(cat, 2 * n_all + 1, seed=0)
        assert len({s.text for s in specs}) == n_all  # every prompt, each twice (one thrice)
        assert all(parse_prompt(s.text, cat) == s for s in specs)
        assert specs == evaluation_prompts(cat, 2 * n_all + 1, seed=0)
        assert specs != evaluation_prompts(cat, 2 * n_all + 1, seed=1)


def test_bad_arguments_name_the_valid_choices():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="single_object, two_objects, counting, colors, position, color_attr"):
        sample_scene(rng, 64, category="triangles")
    with pytest.raises(ValueError, match="circle, square, triangle"):
        ShapeObject("hexagon", "red", "small", 10, 10)
    with pytest.raises(ValueError, match="red, orange, yellow, green, blue, purple"):
        ShapeObject("circle", "pink", "small", 10, 10)
    with pytest.raises(ValueError, match="small, large"):
        ShapeObject("circle", "red", "huge", 10, 10)
    with pytest.raises(ValueError, match="plain, noise, gradient"):
        Background("white", "stripes", 0)
    with pytest.raises(ValueError, match="white, light grey, beige"):
        Background("black", "plain", 0)
    with pytest.raises(ValueError, match="left of, right of, above, below"):
        Scene("position", (), Background("white", "plain", 0), 64, "behind")
    with pytest.raises(ValueError, match="exactly when"):
        Scene("two_objects", (), Background("white", "plain", 0), 64, "above")
    with pytest.raises(ValueError, match="single_object"):
        ShapesConfig(categories=("numbers",))
    with pytest.raises(ValueError, match="probability"):
        ShapesConfig(textured_fraction=1.5)
    with pytest.raises(ValueError, match="weights"):
        ShapesConfig(weights=(1.0,))
    with pytest.raises(ValueError, match="counting"):
        evaluation_prompts("count", 3)
    with pytest.raises(ValueError, match="unknown count 4; valid choices: 1, 2, 3"):
        ObjectSpec("circle", None, 4)
    for bad in (0, -1, 2.5):
        with pytest.raises(ValueError):
            ShapesDataset(bad)
    with pytest.raises(ValueError, match="size"):
        ShapesDataset(4, size=8)


def test_config_mix_and_caption_probabilities():
    only = ShapesConfig(categories=("counting", "position"), weights=(0.0, 1.0), textured_fraction=0.0,
                        color_word=0.0, size_word=0.0, relation_word=1.0, frame=0.0)
    for i in range(40):
        scene, text = make_item(i, 64, 0, only)
        assert scene.category == "position" and scene.background.texture == "plain"
        assert not any(c in text for c in COLORS) and "small" not in text and "large" not in text
        assert parse_prompt(text).relation is not None


# ---------------------------------------------------------------------------------- analyzer


def test_components_match_scipy():
    from scipy import ndimage  # a test dependency only: the analyzer labels components itself

    rng = np.random.default_rng(0)
    for density in (0.1, 0.4, 0.6):
        mask = rng.random((37, 53)) < density
        labels, stats = components(mask)
        ref, n = ndimage.label(mask, structure=np.ones((3, 3)))
        assert len(stats) == n
        pairs = set(zip(labels[mask].tolist(), ref[mask].tolist()))
        assert len(pairs) == n  # the same partition, up to the numbering
        for c, st in enumerate(stats):
            ys, xs = np.nonzero(labels == c + 1)
            assert st["area"] == len(ys) and st["bbox"] == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
            assert math.isclose(st["cx"], xs.mean()) and math.isclose(st["cy"], ys.mean())


def test_no_palette_colour_is_mistaken_for_another_at_any_blend():
    """Every antialiased edge pixel is a blend of an object colour and a (textured) background:
    at no blend weight does it read as a different palette colour; from 60 % on it reads as its
    own (below half it is an edge: background, or a pale tint that erosion strips)."""
    for bg, color in itertools.product([(250, 250, 248), (222, 222, 222), (240, 230, 205)], COLORS):
        for texture, alpha in itertools.product((-10, 0, 10), np.linspace(0, 1, 51)):
            image = np.tile(np.asarray(bg, dtype=np.uint8), (8, 8, 1))
            pixel = alpha * np.asarray(COLORS[color]) + (1 - alpha) * (np.asarray(bg) + texture)
            image[4, 4] = np.clip(np.rint(pixel), 0, 255)
            index = colour_map(image).index[4, 4]
            own = list(COLORS).index(color)
            assert index == own if alpha >= 0.6 else index in (-2, -1, own), (bg, color, alpha, index)


def test_analyzer_is_right_on_shapes_images(corpus):
    """Measured (seed 2024, 300 scenes per category, 64 x 64): 300 / 300 = 100.0 % in every
    category: single_object, two_objects, counting, colors, position, color_attr."""
    for cat, (scenes, _, found) in corpus.items():
        results = [match(f, spec_for(s)) for s, f in zip(scenes, found)]
        accuracy = np.mean([bool(r) for r in results])
        assert accuracy >= 0.99, (cat, accuracy, [r.reason for r in results if not r][:5])


# Chance of an image matching the canonical prompt of another random scene of its category:
# single_object, colors: 1/18 (3 shapes x 6 colours); two_objects: 1/3 (the same two of three
# shapes); counting: 1/6 (shape, and 2 or 3); position: 1/12 (same shapes 1/3, then the one of
# 4 relations that holds); color_attr: 1/90 (same shapes 1/3, then both colours: 1/6 x 1/5).
CHANCE = {"single_object": 1 / 18, "colors": 1 / 18, "two_objects": 1 / 3, "counting": 1 / 6,
          "position": 1 / 12, "color_attr": 1 / 90}


def test_analyzer_is_at_chance_on_images_of_other_prompts(corpus):
    """Image i against the prompt of scene i + 1 of the same category. Measured (seed 2024,
    300 per category): single_object 4.3 %, two_objects 30.7 %, counting 14.3 %, colors 7.0 %,
    position 5.7 %, color_attr 0.3 %; all within sampling noise of CHANCE, against 100 % on the
    matching prompts. two_objects cannot go lower: its prompts name two of only three shapes."""
    for cat, (scenes, _, found) in corpus.items():
        n = len(scenes)
        other = np.mean([bool(match(found[i], spec_for(scenes[(i + 1) % n]))) for i in range(n)])
        sigma = math.sqrt(CHANCE[cat] * (1 - CHANCE[cat]) / n)
        assert other <= CHANCE[cat] + max(4 * sigma, 0.02) and other <= 0.40, (cat, other)


def test_analyzer_rejects_noise(corpus):
    """Uniform random pixels against 50 canonical prompts per category: measured 0 / 300."""
    rng = np.random.default_rng(0)
    specs = [spec_for(s) for scenes, _, _ in corpus.values() for s in scenes[:50]]
    noise = [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in specs]
    hits = [bool(score(im, spec)) for im, spec in zip(noise, specs)]
    assert np.mean(hits) <= 0.01


DEGRADATIONS = {
    "blur": lambda im, rng: np.asarray(Image.fromarray(im).filter(ImageFilter.GaussianBlur(1.0))),
    "noise": lambda im, rng: np.clip(im + rng.normal(0, 8, im.shape), 0, 255).astype(np.uint8),
    "colour shift": lambda im, rng: np.clip(im.astype(int) + rng.integers(-20, 21, 3), 0, 255).astype(np.uint8),
    "half resolution": lambda im, rng: np.asarray(
        Image.fromarray(im).resize((32, 32), Image.Resampling.BICUBIC).resize((64, 64), Image.Resampling.BICUBIC)),
}


@pytest.mark.parametrize("name", DEGRADATIONS)
def test_analyzer_tolerates_generator_like_imperfections(corpus, name):
    """Blur (Gaussian, sigma 1 px), pixel noise (sigma 8 levels), a global colour cast (+-20
    per channel), a 2x down-and-up resample: measured 40 / 40 in every category, each."""
    rng = np.random.default_rng(1)
    for cat, (scenes, images, _) in corpus.items():
        ok = [bool(score(DEGRADATIONS[name](im, rng), spec_for(s))) for s, im in zip(scenes[:40], images[:40])]
        assert np.mean(ok) >= 0.95, (name, cat, np.mean(ok))


def _draw(kind: str, color=(215, 30, 35)) -> np.ndarray:
    img = Image.new("RGB", (256, 256), (250, 250, 248))
    draw = ImageDraw.Draw(img)
    if kind == "diamond":
        draw.polygon([(128, 40), (216, 128), (128, 216), (40, 128)], fill=color)
    elif kind == "ellipse":
        draw.ellipse((40, 80, 216, 176), fill=color)
    elif kind == "ring":
        draw.ellipse((40, 40, 216, 216), fill=color)
        draw.ellipse((90, 90, 166, 166), fill=(250, 250, 248))
    elif kind == "inverted triangle":
        draw.polygon([(40, 60), (216, 60), (128, 200)], fill=color)
    else:  # a plain square in the given colour
        draw.rectangle((60, 60, 196, 196), fill=color)
    return np.asarray(img.resize((64, 64), Image.Resampling.BOX))


@pytest.mark.parametrize("kind", ["diamond", "ellipse", "ring", "inverted triangle"])
def test_analyzer_finds_no_shape_in_other_figures(kind):
    (obj,) = analyze(_draw(kind))
    assert obj.color == "red" and obj.shape is None
    for shape in SHAPES:
        assert not score(_draw(kind), PromptSpec(f"a red {shape}", "single_object", (ObjectSpec(shape, "red"),)))


@pytest.mark.parametrize("color", [(255, 150, 200), (20, 20, 20), (120, 120, 120)])
def test_analyzer_reports_off_palette_objects(color):
    (obj,) = analyze(_draw("square", color))
    assert obj.color is None and obj.shape == "square"
    assert bool(score(_draw("square", color), parse_prompt("a square")))  # a square of no named colour
    assert not any(score(_draw("square", color), parse_prompt(f"a {c} square")) for c in COLORS)
    assert bool(score(_draw("square"), parse_prompt("a red square")))


def test_classify_shape_on_exact_coverage():
    yy, xx = np.mgrid[0:400, 0:400] / 400.0  # a 400 x 400 grid over the unit square
    disk = ((xx - 0.5) ** 2 + (yy - 0.5) ** 2 <= 0.25).astype(float)
    triangle = (np.abs(xx - 0.5) <= yy / 2).astype(float)
    assert classify_shape(disk) == "circle" and classify_shape(np.ones((50, 50))) == "square"
    assert classify_shape(triangle) == "triangle" and classify_shape(triangle[::-1]) is None


def test_score_inputs_batches_and_reasons(corpus):
    scenes, images, _ = corpus["position"]
    spec = spec_for(scenes[0])
    tensor = torch.from_numpy(images[0]).permute(2, 0, 1).float() / 127.5 - 1
    for form in (images[0], Image.fromarray(images[0]), tensor):
        assert bool(score(form, spec))
    flipped = PromptSpec(spec.text, "position", spec.objects, {"left of": "right of", "right of": "left of",
                                                               "above": "below", "below": "above"}[spec.relation])
    result = score(images[0], flipped)
    assert not result and f"is not {flipped.relation}" in result.reason
    assert "expected 3 object(s), found 2" in score(images[0], parse_prompt("three circles")).reason

    batch = [images[0], images[1], images[0]]
    specs = [spec_for(scenes[0]), spec_for(scenes[1]), flipped]
    assert score_batch(batch, specs) == {"position": pytest.approx(2 / 3), "overall": pytest.approx(2 / 3)}
    with pytest.raises(ValueError, match="2 images but 3"):
        score_batch(batch[:2], specs)
    for bad in (np.zeros((64, 64), np.uint8), torch.zeros(1, 3, 8, 8), [[0]]):
        with pytest.raises(ValueError):
            analyze(bad)


# ------------------------------------------------------------------ extra concepts: star, teal
#
# Concepts the embedded model has never seen (it was trained on the default set), for teaching it
# new ones: opt-in in the data set, always known to the grammar and the analyzer.

EXTRAS = ShapesConfig(extra_shapes=EXTRA_SHAPES, extra_colors=tuple(EXTRA_COLORS))
NEW_ONLY = ShapesConfig(extra_shapes=EXTRA_SHAPES, extra_colors=tuple(EXTRA_COLORS), extra_fraction=1.0)


def test_default_set_is_unchanged_by_the_extra_concepts():
    """The default set, on which the embedded model was trained, is byte-identical to the set
    before the extra concepts existed: the digest of items 0-59 (seed 0, 64 x 64; captions and
    pixels) was recorded with commit 305c79a, which had no extra concepts. The default set never
    draws them, and its vocabulary (caption_vocabulary) does not name them."""
    import hashlib

    digest = hashlib.sha256()
    for i in range(60):
        scene, text = make_item(i, 64, seed=0)
        digest.update(text.encode())
        digest.update(render(scene).tobytes())
    assert digest.hexdigest() == "4f4711ca1ab9086b70cc7c3d01f02d315a4b0e3fdf09707410745d42705a64e9"
    from unfog.datasets.shapes_text import caption_vocabulary

    extra_words = {*EXTRA_SHAPES, *(s + "s" for s in EXTRA_SHAPES), *EXTRA_COLORS}
    assert not extra_words & set(caption_vocabulary())
    assert extra_words <= set(caption_vocabulary(EXTRAS))
    for i in range(300):
        scene, text = make_item(i, 64, seed=1)
        assert not {o.shape for o in scene.objects} & set(EXTRA_SHAPES)
        assert not {o.color for o in scene.objects} & set(EXTRA_COLORS)


def test_the_embedded_model_has_never_seen_the_extra_words():
    """The shipped model's tokenizer keeps only the CLIP tokens of its training captions: each
    extra word is a single CLIP token that it maps to the unknown id 0, and every word of the
    default grammar to a known id. (So a fine-tune cannot tell two new words apart by their ids:
    one new shape and one new colour, in their places in the grammar, is what it can learn.)"""
    from unfog.checkpoint.io import load_safetensors
    from unfog.datasets.shapes_text import caption_vocabulary
    from unfog.models.tokenizer import CLIPTokenizer, SubVocabTokenizer
    from unfog.cli import DEFAULT_TEXT_MODEL, default_model_path

    tensors, _ = load_safetensors(default_model_path(DEFAULT_TEXT_MODEL))
    base = CLIPTokenizer.from_bpe_file()
    tokenizer = SubVocabTokenizer(base, tensors["tokenizer.kept_ids"].tolist())
    for word in caption_vocabulary():
        assert SubVocabTokenizer.UNKNOWN_ID not in tokenizer.encode(word), word
    for word in [*EXTRA_SHAPES, *(s + "s" for s in EXTRA_SHAPES), *EXTRA_COLORS]:
        assert len(base.encode(word)) == 1 and tokenizer.encode(word) == [SubVocabTokenizer.UNKNOWN_ID], word


def test_extra_concepts_are_drawn_when_asked():
    """extra_shapes / extra_colors join what scenes are drawn from (as JSON shapes_options, too);
    extra_fraction = 1 puts an extra concept in every scene; captions stay true of their scenes."""
    from unfog.training.config import load_config

    options = 'shapes_options={"extra_shapes": ["star"], "extra_colors": ["teal"], "extra_fraction": 1.0}'
    config = load_config(None, ["task=text2image", "data=shapes", "vae_model=v.safetensors", options])
    assert config.shapes_config() == NEW_ONLY
    for cfg, least in ((EXTRAS, 0.0), (NEW_ONLY, 1.0)):
        shown = []
        for i in range(300):
            scene, text = make_item(i, 64, seed=3, config=cfg)
            spec = parse_prompt(text)
            assert spec is not None and bool(match(truth(scene), spec)), (text, scene)
            shown.append(any(o.shape in EXTRA_SHAPES or o.color in EXTRA_COLORS for o in scene.objects))
        assert least <= np.mean(shown) < 1.0 or least == np.mean(shown) == 1.0
        assert 0.2 < np.mean(shown)  # with 4 shapes and 7 colours, 36 % of single objects alone
    a, b = make_item(7, 64, 0, NEW_ONLY), make_item(7, 64, 0, NEW_ONLY)
    assert a == b and render(a[0]).tobytes() == render(b[0]).tobytes()


def test_extra_concepts_in_the_grammar():
    assert parse_prompt("a teal star") == PromptSpec("a teal star", "single_object", (ObjectSpec("star", "teal"),))
    assert parse_prompt("two stars").objects == (ObjectSpec("star", None, 2),)
    assert parse_prompt("a star that is teal").objects == (ObjectSpec("star", "teal"),)
    spec = parse_prompt("a red star to the left of a teal circle")
    assert spec.category == "position" and spec.objects == (ObjectSpec("star", "red"), ObjectSpec("circle", "teal"))
    assert parse_prompt("a teal star and a red square").category == "color_attr"
    assert parse_prompt("a star", "counting") is None and parse_prompt("a hexagon") is None
    scene = Scene("single_object", (ShapeObject("star", "teal", "small", 20, 20),), Background("white", "plain", 0), 64)
    assert prompt_for(scene) == "a teal star"
    # the six categories' evaluation prompts never name them
    assert not any(w in s.text for c in CATEGORIES for s in evaluation_prompts(c, 200)
                   for w in (*EXTRA_SHAPES, *EXTRA_COLORS))


def test_concept_prompts():
    """Single-object prompts of every shape and colour pair with a new concept: for star and
    teal, the star in all 7 colours and the 3 old shapes in teal; single_object as parse_prompt
    infers it, so `unfog eval --prompts` and measure_adherence score them per prompt."""
    from unfog.metrics.adherence import make_scorer, summarize

    specs = concept_prompts(21, seed=0)
    texts = {s.text for s in specs}
    stars = {("an " if c[0] in "aeiou" else "a ") + f"{c} star" for c in ALL_COLORS}
    assert texts == stars | {f"a teal {s}" for s in SHAPES}
    assert all(parse_prompt(s.text) == s for s in specs) and specs == concept_prompts(21, seed=0)
    assert specs != concept_prompts(21, seed=1)
    assert {s.text for s in concept_prompts(7, shapes=("star",), colors=())} == stars
    scorer = make_scorer("shapes")
    result = summarize(scorer, [s.text for s in specs], [True] * len(specs))
    assert result.per_category == {"single_object": 1.0} and len(result.per_prompt) == 10
    with pytest.raises(ValueError, match="circle, square, triangle, star"):
        concept_prompts(3, shapes=("hexagon",))
    with pytest.raises(ValueError, match="at least one"):
        concept_prompts(3, shapes=(), colors=())


def test_extra_concept_options_are_checked():
    with pytest.raises(ValueError, match="unknown extra shape 'hexagon'; valid choices: star"):
        ShapesConfig(extra_shapes=("hexagon",))
    with pytest.raises(ValueError, match="unknown extra color 'red'; valid choices: teal"):
        ShapesConfig(extra_colors=("red",))
    with pytest.raises(ValueError, match="twice"):
        ShapesConfig(extra_shapes=("star", "star"))
    with pytest.raises(ValueError, match="extra_fraction > 0 needs"):
        ShapesConfig(extra_fraction=0.5)
    with pytest.raises(ValueError, match="probability"):
        ShapesConfig(extra_shapes=("star",), extra_fraction=2.0)


def test_new_colour_is_far_from_the_palette_and_backgrounds():
    for name, rgb in EXTRA_COLORS.items():
        assert min(np.linalg.norm(np.subtract(rgb, c)) for c in COLORS.values()) >= 87, name
        assert min(np.linalg.norm(np.subtract(rgb, b)) for b in BACKGROUNDS.values()) >= 170, name


def test_new_colour_blends_read_as_nothing_else():
    """As test_no_palette_colour_is_mistaken_for_another_at_any_blend, for the extra colours (the
    old colours' blends are checked there against the whole palette, extra colours included)."""
    for bg, color in itertools.product(BACKGROUNDS.values(), EXTRA_COLORS):
        for texture, alpha in itertools.product((-10, 0, 10), np.linspace(0, 1, 51)):
            image = np.tile(np.asarray(bg, dtype=np.uint8), (8, 8, 1))
            pixel = alpha * np.asarray(ALL_COLORS[color]) + (1 - alpha) * (np.asarray(bg) + texture)
            image[4, 4] = np.clip(np.rint(pixel), 0, 255)
            index = colour_map(image).index[4, 4]
            own = list(ALL_COLORS).index(color)
            assert index == own if alpha >= 0.6 else index in (-2, -1, own), (bg, color, alpha, index)


def _pentagram_coverage(n: int = 600) -> np.ndarray:
    """Exact-ish coverage of the drawn star, by point-in-polygon on an n x n grid of its box."""
    from matplotlib.path import Path as PolygonPath

    from unfog.datasets.shapes import _star_points

    points = _star_points(0.5, 0.5, 1.0)
    yy, xx = (np.mgrid[0:n, 0:n] + 0.5) / n
    inside = PolygonPath(points).contains_points(np.stack([xx.ravel(), yy.ravel()], 1)).reshape(n, n)
    return inside.astype(float)


def test_star_geometry_and_features_against_the_closed_form():
    """The star spans its box's width d and 0.951 d of its height; its area is the pentagram's,
    5 R r sin 36 with R = d / (2 sin 72), r = 0.382 R; its fill (area over its extents) is 0.326,
    its skew about 0 and its solidity (area over the hull, a regular pentagon of area
    5/2 R^2 sin 72) 0.472. A disk and a square are convex (solidity about 1)."""
    cover = _pentagram_coverage()
    rows, cols = np.nonzero(cover.any(1))[0], np.nonzero(cover.any(0))[0]
    outer = 1 / (2 * math.sin(math.radians(72)))
    inner = outer * (3 - math.sqrt(5)) / 2
    area = 5 * outer * inner * math.sin(math.radians(36))
    height = outer * (1 + math.cos(math.radians(36)))
    assert (cols[-1] - cols[0] + 1) / 600 == pytest.approx(1.0, abs=3 / 600)
    assert (rows[-1] - rows[0] + 1) / 600 == pytest.approx(height, abs=3 / 600)
    assert cover.mean() == pytest.approx(area, rel=0.01)
    star = cover[rows[0]:rows[-1] + 1]
    fill, skew, _ = shape_features(star)
    assert fill == pytest.approx(area / height, rel=0.01) and abs(skew) < 0.05
    pentagon = 2.5 * outer**2 * math.sin(math.radians(72))
    assert solidity(star) == pytest.approx(area / pentagon, rel=0.02)
    assert classify_shape(star) == "star"
    yy, xx = np.mgrid[0:400, 0:400] / 400.0
    assert solidity(((xx - 0.5) ** 2 + (yy - 0.5) ** 2 <= 0.25).astype(float)) > 0.99
    assert solidity(np.ones((30, 30))) == 1.0


@pytest.mark.parametrize("canvas,n", [(64, 50), (32, 20), (48, 20), (128, 12)])
def test_analyzer_is_right_on_extra_concepts(canvas, n):
    """Scenes that each show a star or teal (extra_fraction 1), n per category at each canvas the
    set is drawn at. Measured (seed 2025; 100 per category, 600 scenes per canvas, about 430
    with a star and 260 with teal): 100.0 % at 32, 48, 64 and 128 px for star, teal and every
    category. Here at least 99 % per concept and per category."""
    hits: dict[str, list[bool]] = {}
    fails = []
    for cat in CATEGORIES:
        for i in range(n):
            scene = sample_scene(scene_rng(2025, cat, i), canvas, NEW_ONLY, category=cat)
            result = match(analyze(render(scene)), spec_for(scene))
            concepts = {o.shape for o in scene.objects} | {o.color for o in scene.objects}
            for key in {cat} | (concepts & {*EXTRA_SHAPES, *EXTRA_COLORS}):
                hits.setdefault(key, []).append(bool(result))
            if not result:
                fails.append((cat, i, result.reason))
    assert set(hits) == {*CATEGORIES, *EXTRA_SHAPES, *EXTRA_COLORS}
    for key, ok in hits.items():
        assert np.mean(ok) >= 0.99, (key, np.mean(ok), fails[:5])


@pytest.mark.parametrize("name", DEGRADATIONS)
def test_analyzer_reads_extra_concepts_through_imperfections(name):
    """The degradations of test_analyzer_tolerates_generator_like_imperfections on scenes that
    each show a star or teal, 20 per category: measured 120 / 120 for each. (A stronger blur,
    sigma 1.5 px, turns a 14 px star into a blob the analyzer calls a circle: 43 % of stars.)"""
    rng = np.random.default_rng(1)
    ok = []
    for cat in CATEGORIES:
        for i in range(20):
            scene = sample_scene(scene_rng(2026, cat, i), 64, NEW_ONLY, category=cat)
            ok.append(bool(score(DEGRADATIONS[name](render(scene), rng), spec_for(scene))))
    assert np.mean(ok) >= 0.95, (name, np.mean(ok))


def test_extra_concepts_are_not_confused_with_old_ones(corpus):
    """No object of the default set's images reads as a star or as teal (so every old category
    scores as before), and a star or a teal object never satisfies a prompt for another shape or
    colour: each of 60 single stars and 60 single teal objects against all its wrong prompts."""
    for _, _, found in corpus.values():
        for objects in found:
            assert not any(o.shape in EXTRA_SHAPES or o.color in EXTRA_COLORS for o in objects)
    for i in range(120):
        scene = sample_scene(scene_rng(2027, "single_object", i), 64, NEW_ONLY, category="single_object")
        (obj,), image = scene.objects, render(scene)
        found = analyze(image)
        wrong = [ObjectSpec(s, c) for s in ALL_SHAPES for c in ALL_COLORS if (s, c) != (obj.shape, obj.color)]
        assert bool(match(found, spec_for(scene)))
        assert not any(match(found, PromptSpec("", "single_object", (w,))) for w in wrong), scene
