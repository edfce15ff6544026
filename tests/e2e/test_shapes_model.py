"""The embedded text-to-image model (`unfog generate` with no --model), scored by the
deterministic `shapes` analyzer at its recommended settings.

On 100 prompts per category the shipped model (13,000 steps, guidance 2) scores single object
100%, colours 99%, colour attribution 94%, two objects 86%, counting 66%, position 16%
(docs/benchmarks.md): the issue's bars for single object (90%), two objects (60%) and colour
attribution (50%) are met and position (50%) is far from it. Those three are held to the
issue's bars; colours, counting and the overall score to regression floors about three standard
errors below the measured values at this sample size, so a change that breaks the model or its
loading shows."""

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
# measured on 100 prompts each: 1.00, 0.99, 0.94, 0.86, 0.66
BARS = {"single_object": 0.90, "colors": 0.85, "color_attr": 0.50, "two_objects": 0.60, "counting": 0.40}
MIN_OVERALL = 0.65  # measured 0.77


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
