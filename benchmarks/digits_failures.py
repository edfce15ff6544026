"""Digits model: how many samples fail outright (a blank or a noise cell), at `unfog sample`'s defaults.

Draws ``grids`` grids the way ``unfog sample --per-class P --seed S`` does (every digit, P draws of
each, one batch, seed S = 0, 1, ...) and counts, with the repo's own digit classifier:

- blank: less than ``--ink`` of the pixels are brighter than mid-grey (real digits: 20-40%);
- noise (a speckled cell): not blank, and rougher than every real training digit: a relative
  high-frequency energy (mean |x - its 3x3 box blur| / mean x, x in [0, 1]) above ``--hf`` (real
  digits: at most 0.205) or a total variation (mean |difference| of neighbouring pixels) above
  ``--tv`` (real digits: at most 0.118). The classifier cannot tell these: it names a digit in
  most speckled cells with high confidence;
- wrong: neither, but classified as another digit than the one asked for.

The thresholds were set just above the real training digits' maxima; the held-out digits (never
used to set them) give the rule's false-alarm rate, printed first with the training digits'.

    python benchmarks/digits_failures.py                  # 10 grids of 100: the figure in docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import time

import torch

from unfog.cli import default_model_path
from unfog.datasets.digits import digits_tensors
from unfog.metrics.digits_classifier import load_digit_classifier
from unfog.pipelines import PixelDiffusion


def roughness(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(relative high-frequency energy, total variation) of images (N, 1, S, S) in [-1, 1]."""
    x = (images.float() + 1) / 2
    blur = torch.nn.functional.avg_pool2d(x, 3, 1, 1, count_include_pad=False)
    hf = (x - blur).abs().mean((1, 2, 3)) / x.mean((1, 2, 3)).clamp_min(1e-3)
    tv = ((x[..., 1:, :] - x[..., :-1, :]).abs().mean((1, 2, 3)) + (x[..., 1:] - x[..., :-1]).abs().mean((1, 2, 3))) / 2
    return hf, tv


def classify_failures(images: torch.Tensor, labels: torch.Tensor, ink: float, hf_max: float,
                      tv_max: float) -> dict[str, int]:
    """Counts of blank / noise / wrong cells among images (N, 1, S, S) in [-1, 1] drawn for ``labels``."""
    classifier = load_digit_classifier()
    with torch.no_grad():
        predicted = classifier(images.float()).argmax(1)
    blank = (images > 0).float().mean((1, 2, 3)) < ink
    hf, tv = roughness(images)
    noise = ~blank & ((hf > hf_max) | (tv > tv_max))
    wrong = ~blank & ~noise & (predicted != labels)
    return {"n": len(labels), "blank": int(blank.sum()), "noise": int(noise.sum()), "wrong": int(wrong.sum())}


def report(name: str, c: dict[str, int]) -> str:
    fail = c["blank"] + c["noise"]
    return (f"{name}: {c['n']} images, blank {c['blank']}, noise {c['noise']} -> blank or noise "
            f"{fail} = {fail / c['n']:.2%}; wrong digit {c['wrong']} ({c['wrong'] / c['n']:.2%})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--grids", type=int, default=10)
    parser.add_argument("--per-class", type=int, default=10)
    parser.add_argument("--sampler", default="dpmpp_2m")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--cfg-scale", type=float, default=2.0)
    parser.add_argument("--ink", type=float, default=0.03)
    parser.add_argument("--hf", type=float, default=0.25)
    parser.add_argument("--tv", type=float, default=0.125)
    args = parser.parse_args()
    rule = (args.ink, args.hf, args.tv)
    for split in ("train", "test"):
        real, real_labels = digits_tensors(split)
        print(report(f"real {split} digits", classify_failures(real, real_labels, *rule)), flush=True)
    pipe = PixelDiffusion.load(args.model or default_model_path())
    labels = torch.arange(10).repeat_interleave(args.per_class)
    total = {"n": 0, "blank": 0, "noise": 0, "wrong": 0}
    t0 = time.perf_counter()
    for seed in range(args.grids):
        images = pipe.generate(labels, sampler=args.sampler, steps=args.steps, cfg_scale=args.cfg_scale, seed=seed)
        counts = classify_failures(images, labels, *rule)
        print(report(f"seed {seed}", counts), flush=True)
        total = {k: total[k] + counts[k] for k in total}
    print(report(f"all ({time.perf_counter() - t0:.0f} s, {torch.get_num_threads()} threads)", total))


if __name__ == "__main__":
    main()
