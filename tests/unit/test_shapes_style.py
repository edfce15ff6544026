"""The "outlined" and "pastel" styles of the shapes set (opt-in; the default set is unchanged) and
the features that measure them: on styled images the hollow fraction matches the closed form of
the drawn geometry and the opacity the drawn blend, on filled images and on the embedded model's
own images they are 0 and 1; the analyzer's ``fill_holes`` reads outlined shapes as their shapes,
and it reads pastel shapes as their shapes and colours as it is."""

import math

import numpy as np
import pytest

from unfog.datasets.shapes import OUTLINE_WIDTH, PASTEL_OPACITY, ShapesDataset, diameter, make_item, render
from unfog.datasets.shapes_text import ShapesConfig, spec_for
from unfog.metrics.shapes_analyzer import AnalyzerConfig, score
from unfog.metrics.shapes_style import hollow_fractions, opacities, outline_summary, pastel_summary

OUTLINED = ShapesConfig(categories=("single_object",), style="outlined")


def interior_share(shape: str, d: float, width: float) -> float:
    """Closed form: the interior of an outline ``width`` wide is the shape scaled by
    k = 1 - width / rho about its incentre, rho = d / 2 (circle, square) or the upright
    triangle's inradius, area / semi-perimeter = (d^2 / 2) / (d (1 + sqrt 5) / 2)."""
    rho = d / 2 if shape in ("circle", "square") else d / (1 + math.sqrt(5))
    return (1 - width / rho) ** 2


def test_the_outlined_style_is_opt_in_and_leaves_scenes_and_captions_alone():
    assert ShapesConfig().style == "filled"
    for i in range(10):
        plain, styled = make_item(i, 64, 0), make_item(i, 64, 0, ShapesConfig(style="outlined"))
        assert plain == styled  # the same scene and caption
        assert render(plain[0]).tobytes() == render(plain[0], style="filled").tobytes()
        assert render(plain[0]).tobytes() != render(plain[0], style="outlined").tobytes()
    item = ShapesDataset(3, 64, config=ShapesConfig(style="outlined"))[1]["image"]
    scene, _ = make_item(1, 64, 0)
    assert np.array_equal(((item.permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8),
                          render(scene, style="outlined"))
    with pytest.raises(ValueError, match=r"unknown style 'striped'; valid choices: filled, outlined, pastel"):
        ShapesConfig(style="striped")


def test_hollow_fraction_measures_the_drawn_outline_and_is_zero_on_filled_shapes():
    """60 single objects at 64 x 64: each object's measured hollow fraction is within 0.1 of the
    closed form (pixels on the ring's antialiased inner edge count as the ring: the measure runs
    low by up to half a pixel of the inner perimeter), the mean error is below 0.06, and the
    filled rendering of the same scene measures exactly 0."""
    errors = []
    for i in range(60):
        scene, _ = make_item(i, 64, 0, OUTLINED)
        (obj,) = scene.objects
        truth = interior_share(obj.shape, diameter(obj.size, 64), OUTLINE_WIDTH)
        (measured,) = hollow_fractions(render(scene, style="outlined"))
        assert abs(measured - truth) < 0.1, (obj, measured, truth)
        errors.append(truth - measured)
        assert hollow_fractions(render(scene)) == [0.0]
    assert abs(np.mean(errors)) < 0.06
    summary = outline_summary([render(make_item(i, 64, 0, OUTLINED)[0], style="outlined") for i in range(20)])
    assert summary["objects"] == 20 and summary["outlined"] >= 0.5  # small triangles (0.09) are below 0.15


def test_opacity_measures_the_pastel_blend_and_the_analyzer_still_reads_pastel_objects():
    """60 single objects and 30 scenes of every category: a pastel object's opacity is
    PASTEL_OPACITY within 0.02 (the exact blend, rounded to 8 bits, over a noisy background), a
    filled one's 1 within 0.02; the analyzer scores every pastel scene as it scores the filled one."""
    for i in range(60):
        scene, _ = make_item(i, 64, 0, ShapesConfig(categories=("single_object",)))
        (pastel,), (filled,) = opacities(render(scene, style="pastel")), opacities(render(scene))
        assert abs(pastel - PASTEL_OPACITY) < 0.02 and abs(filled - 1) < 0.02, (scene.objects, pastel, filled)
    for i in range(30):
        scene, _ = make_item(i, 64, 1)
        assert bool(score(render(scene, style="pastel"), spec_for(scene))) == bool(score(render(scene), spec_for(scene)))
    summary = pastel_summary([render(make_item(i, 64, 0)[0], style="pastel") for i in range(20)])
    assert summary["pastel"] == 1.0 and summary["objects"] >= 20


def test_fill_holes_reads_outlined_shapes_and_changes_nothing_by_default():
    """Outlined shapes read as their shapes only with ``fill_holes`` (a ring's fill is no shape's);
    on the default set's images the analyzer answers the same with it as without."""
    styled = [make_item(i, 64, 0, OUTLINED)[0] for i in range(30)]
    assert all(score(render(s, style="outlined"), spec_for(s), AnalyzerConfig(fill_holes=True)) for s in styled)
    assert sum(bool(score(render(s, style="outlined"), spec_for(s))) for s in styled) < 15
    for i in range(30):
        scene, _ = make_item(i, 64, 0)
        image = render(scene)
        assert bool(score(image, spec_for(scene))) == bool(score(image, spec_for(scene), AnalyzerConfig(fill_holes=True)))


def test_the_embedded_model_draws_no_outlines_and_no_pastels():
    """The base model's images of 16 single-object prompts: hollow fraction 0 (measured: exactly
    0 for each object) and opacity about 1, so the styles are ones it never draws."""
    import unfog
    from unfog.embedded import DEFAULT_TEXT_MODEL, default_model_path
    from unfog.metrics.shapes_eval import generate, prompt_set

    pipe = unfog.load(default_model_path(DEFAULT_TEXT_MODEL))
    specs = prompt_set(16, categories=("single_object",))
    images = generate(pipe, specs, sampler="euler_ancestral", steps=20, cfg_scale=2.0, seed=0)
    summary = outline_summary(images)
    assert summary["objects"] >= 12 and summary["hollow"] < 0.02 and summary["outlined"] == 0
    pastel = pastel_summary(images)
    assert pastel["opacity"] > 0.95 and pastel["pastel"] == 0
