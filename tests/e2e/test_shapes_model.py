"""The embedded text-to-image model (`unfog generate` with no --model), scored by the
deterministic `shapes` analyzer at its recommended settings.

On 100 prompts per category the shipped model (the curriculum's round 3; Euler ancestral, 20
steps, guidance 2) scores single object 99%, colours 99%, colour attribution 92%, position 76%,
counting 61%, two objects 60% (67% on a second sample of 100; docs/benchmarks.md): all four of
the issue's targets are met. Here, with 40 prompts per category (seed 11; a standard error of
5-8 points), it scores 100 / 97.5 / 97.5 / 77.5 / 60 / 65%. Single object, colour attribution
and position are held to the issue's bars (90%, 50%, 50%). Two objects is at its bar on 100
prompts, so it is held to a regression floor of 50%, not to the issue's 60%: a sample of 40
could fall under 60% by chance on another machine's arithmetic. Colours, counting and the
overall score have regression floors too, so that a change that breaks the model or its
loading shows. The 100-prompt figures against the issue's bars are in docs/benchmarks.md, from
`python benchmarks/shapes_eval.py`."""

import subprocess
import sys

import pytest

import unfog
from unfog.cli import DEFAULT_TEXT_MODEL, default_model_path
from unfog.metrics.shapes_eval import evaluate
from unfog.pipelines.images import read_parameters
from unfog.pipelines.latent_model import recommended_settings

PATH = default_model_path(DEFAULT_TEXT_MODEL)
PER_CATEGORY = 40  # a standard error of about 5-8 points per category
# measured here (40 each, seed 11): 1.0, 0.975, 0.975, 0.775, 0.60, 0.65; overall 0.83
BARS = {"single_object": 0.90, "color_attr": 0.50, "position": 0.50,  # the bars
        "colors": 0.85, "counting": 0.40, "two_objects": 0.50}  # regression floors
MIN_OVERALL = 0.70


@pytest.fixture(scope="module")
def scores():
    pipe = unfog.load(PATH)
    return evaluate(pipe, PER_CATEGORY, seed=11, progress=False, **recommended_settings(PATH))


def test_shipped_model_is_small_and_described():
    assert PATH.stat().st_size <= 30_000_000
    pipe = unfog.load(PATH)
    assert pipe.default_size == 64 and recommended_settings(PATH)["steps"] >= 1


@pytest.mark.parametrize("category", sorted(BARS))
def test_adherence_per_category(scores, category):
    assert scores.adherence[category] >= BARS[category], scores.adherence


def test_adherence_overall(scores):
    assert scores.adherence["overall"] >= MIN_OVERALL, scores.adherence


def test_make_demo_command(tmp_path):
    """What `make demo` runs: generate with the default model, a PNG with its parameters."""
    out = tmp_path / "demo.png"
    done = subprocess.run([sys.executable, "-m", "unfog.cli", "generate", "a red circle to the left of a blue square",
                           "--seed", "0", "--output", str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    params = read_parameters(out)
    assert params.startswith("a red circle to the left of a blue square") and "Size: 64x64" in params
