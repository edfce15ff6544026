"""The embedded digits model, scored by our own digit classifier (trained separately, 98.6% on
held-out real digits). These are the issue's acceptance figures, measured at the defaults."""

import subprocess
import sys

import pytest
import torch

from unfog.cli import default_model_path
from unfog.metrics import draw_per_class, real_digits_floor, score_digits
from unfog.metrics.digits_eval import count_failures
from unfog.pipelines import PixelDiffusion
from unfog.pipelines.images import read_parameters

PER_CLASS = 50  # 500 samples: per-class accuracy has a standard error of about 4% at 90%
MIN_CLASS_ACCURACY = 0.90  # the bar: >= 90% of the samples drawn for class k are classified as k
# FID in the classifier's 128-d feature space against the 359 held-out digits. Real training digits
# score about 6.3 (the floor at this sample size); a model whose samples ignored the class or were
# blurry scores in the hundreds. 500 samples are noisier than 1,000, hence the margin.
MAX_FID = 30.0  # observed 23.6 at the defaults (cfg 2); cfg 1 gives 11.8
# Blank or speckled cells (``count_failures``' rule) at the old defaults, DPM++ 2M: 23 of 1,000 drawn
# by benchmarks/digits_failures.py, and 10 of the 300 of seeds 0-2 drawn here (issue 22).
OLD_FAILURE_RATE = 0.023


@pytest.fixture(scope="module")
def pipe():
    return PixelDiffusion.load(default_model_path())


def test_shipped_model_is_small_and_described(pipe):
    assert default_model_path().stat().st_size < 10_000_000
    assert pipe.info.num_classes == 10 and pipe.info.image_size == 16


def test_samples_have_the_right_class_and_look_like_digits(pipe):
    images, labels = draw_per_class(lambda y: pipe.generate(y, seed=int(y[0]) + 1), PER_CLASS)
    scores = score_digits(images, labels)
    worst, acc = scores.worst_class
    assert acc >= MIN_CLASS_ACCURACY, f"class {worst}: only {acc:.0%} classified correctly ({scores.per_class})"
    assert scores.fid <= MAX_FID, f"FID {scores.fid:.1f} (real digits: {real_digits_floor().fid:.1f})"


def test_unguided_and_guided_differ_and_guidance_helps(pipe):
    labels = torch.arange(10).repeat_interleave(10)
    weak = score_digits(pipe.generate(labels, cfg_scale=0.0, seed=3), labels)  # unconditional
    strong = score_digits(pipe.generate(labels, cfg_scale=2.0, seed=3), labels)
    assert weak.accuracy < 0.5 < strong.accuracy  # with the null class the label is ignored


@pytest.mark.slow
def test_few_samples_fail_outright_at_the_defaults(pipe):
    """Grids as `unfog sample --per-class 10 --seed S` draws them (S = 0, 1, 2): at the model's
    recommended settings fewer cells are blank or speckled than the old defaults' 2.3%."""
    labels = torch.arange(10).repeat_interleave(10)
    counts = [count_failures(pipe.generate(labels, seed=seed), labels) for seed in range(3)]
    failed = sum(c["blank"] + c["noise"] for c in counts)
    assert failed / 300 < OLD_FAILURE_RATE, f"{failed} of 300 blank or speckled: {counts}"


def test_sample_command(tmp_path):
    """`unfog sample`: the default pixel model, a grid of all ten digits, a PNG with parameters."""
    out = tmp_path / "demo.png"
    subprocess.run([sys.executable, "-m", "unfog.cli", "sample", "--per-class", "4", "--out", str(out)], check=True,
                   capture_output=True)
    params = read_parameters(out)
    assert "classes 0,1,2,3,4,5,6,7,8,9" in params and "Steps: 20, Sampler: euler_ancestral," in params
