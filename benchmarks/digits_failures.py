"""Digits model: how many samples fail outright (a blank or a noise cell), at `unfog sample`'s defaults
(the model's recommended settings) or the sampler, steps, spacing and guidance given.

Draws ``grids`` grids the way ``unfog sample --per-class P --seed S`` does (every digit, P draws of
each, one batch, seed S = 0, 1, ...) and counts, with the repo's own digit classifier and the rule
of ``unfog.metrics.digits_eval.count_failures``:

- blank: less than ``--ink`` of the pixels are brighter than mid-grey (real digits: 20-40%);
- noise (a speckled cell): not blank, and rougher than every real training digit: a relative
  high-frequency energy (mean |x - its 3x3 box blur| / mean x, x in [0, 1]) above ``--hf`` (real
  digits: at most 0.205) or a total variation (mean |difference| of neighbouring pixels) above
  ``--tv`` (real digits: at most 0.118). The classifier cannot tell these: it names a digit in
  most speckled cells with high confidence;
- wrong: neither, but classified as another digit than the one asked for;
- classified as asked: every cell the classifier reads as the digit asked for (the accuracy of
  benchmarks/digits_samplers.py), failures included.

The thresholds were set just above the real training digits' maxima; the held-out digits (never
used to set them) give the rule's false-alarm rate, printed first with the training digits'.

    python benchmarks/digits_failures.py                  # 10 grids of 100: the figure in docs/benchmarks.md
    python benchmarks/digits_failures.py --grids 2 --sampler dpmpp_2m --steps 50 --spacing karras --cfg-scale 1.5
"""

from __future__ import annotations

import argparse
import time

import torch

from unfog.cli import default_model_path
from unfog.datasets.digits import digits_tensors
from unfog.metrics.digits_eval import BLANK_INK, NOISE_HF, NOISE_TV, count_failures
from unfog.pipelines import PixelDiffusion


def report(name: str, c: dict[str, int]) -> str:
    fail = c["blank"] + c["noise"]
    return (f"{name}: {c['n']} images, blank {c['blank']}, noise {c['noise']} -> blank or noise "
            f"{fail} = {fail / c['n']:.2%}; wrong digit {c['wrong']} ({c['wrong'] / c['n']:.2%}); "
            f"classified as asked (every cell) {c['right'] / c['n']:.2%}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--grids", type=int, default=10)
    parser.add_argument("--per-class", type=int, default=10)
    parser.add_argument("--sampler", default=None, help="default: the model's (as `unfog sample`)")
    parser.add_argument("--steps", type=int, default=None, help="default: the model's")
    parser.add_argument("--spacing", default=None, help="default: the sampler name's, else leading")
    parser.add_argument("--cfg-scale", type=float, default=None, help="default: the model's")
    parser.add_argument("--ink", type=float, default=BLANK_INK)
    parser.add_argument("--hf", type=float, default=NOISE_HF)
    parser.add_argument("--tv", type=float, default=NOISE_TV)
    args = parser.parse_args()
    rule = (args.ink, args.hf, args.tv)
    for split in ("train", "test"):
        real, real_labels = digits_tensors(split)
        print(report(f"real {split} digits", count_failures(real, real_labels, *rule)), flush=True)
    pipe = PixelDiffusion.load(args.model or default_model_path())
    typed = {"sampler": args.sampler, "steps": args.steps, "cfg_scale": args.cfg_scale}
    print("settings:", {**pipe.defaults, **{k: v for k, v in typed.items() if v is not None},
                        "spacing": args.spacing or "the sampler's, else leading"}, flush=True)
    labels = torch.arange(10).repeat_interleave(args.per_class)
    total = dict.fromkeys(("n", "blank", "noise", "wrong", "right"), 0)
    t0 = time.perf_counter()
    for seed in range(args.grids):
        images = pipe.generate(labels, sampler=args.sampler, steps=args.steps, spacing=args.spacing,
                               cfg_scale=args.cfg_scale, seed=seed)
        counts = count_failures(images, labels, *rule)
        print(report(f"seed {seed}", counts), flush=True)
        total = {k: total[k] + counts[k] for k in total}
    print(report(f"all ({time.perf_counter() - t0:.0f} s, {torch.get_num_threads()} threads)", total))


if __name__ == "__main__":
    main()
