"""Digits model: sample quality against steps for several samplers, scored by our classifier.

For each sampler and step count, draws ``per_class`` images of every digit with the embedded
model (or --model) and reports the classifier-feature FID against the held-out digits, the class
accuracy, the worst class and the wall time. The papers' claims are the anchor: DDIM at 50 steps
comes close to DDPM at 1000, and DPM-Solver++ / UniPC reach good samples in 10 to 20 steps.

    python benchmarks/digits_samplers.py                      # the table in docs/benchmarks.md
    python benchmarks/digits_samplers.py --samplers euler --steps 5 10 --per-class 20
"""

from __future__ import annotations

import argparse
import time

import torch

from unfog.cli import default_model_path
from unfog.datasets.digits import digits_tensors
from unfog.metrics import DigitScores, draw_per_class, score_digits
from unfog.pipelines import PixelDiffusion

DEFAULT_SAMPLERS = ("ddpm", "ddim", "euler", "dpmpp_2m", "unipc")
DEFAULT_STEPS = (5, 10, 20, 50)
# The papers' anchors: DDIM and DDPM at 100 steps, and DDPM's full 1000-step chain.
EXTRA = (("ddim", 100), ("ddpm", 100), ("ddpm", 1000))


def digits_rows(pipe: PixelDiffusion, samplers, steps, per_class: int, cfg_scale: float, seed: int,
                extra: tuple[tuple[str, int], ...] = ()):
    """Yield one result dict per (sampler, steps) pair, plus the ``extra`` pairs. Leading spacing,
    except where the steps visit every training timestep (DDPM's full chain): trailing."""
    pairs = [(s, n) for s in samplers for n in steps] + list(extra)
    for sampler, n in pairs:
        spacing = "trailing" if n == pipe.schedule.num_timesteps else "leading"
        t0 = time.perf_counter()
        images, labels = draw_per_class(
            lambda y: pipe.generate(y, sampler=sampler, steps=n, spacing=spacing, cfg_scale=cfg_scale,
                                    seed=seed + int(y[0])), per_class)
        seconds = time.perf_counter() - t0
        scores = score_digits(images, labels)
        k, worst = scores.worst_class
        yield {"sampler": sampler, "steps": n, "fid": scores.fid, "accuracy": scores.accuracy,
               "worst": f"{k}: {worst:.0%}", "seconds": seconds}


def real_subset_scores(per_class: int) -> DigitScores:
    """Scores of ``per_class`` real training digits of each class: the floor at the same sample size
    (FID is biased upwards at small sizes, so generated sets are compared with a real set as large)."""
    images, labels = digits_tensors("train")
    keep = torch.cat([(labels == k).nonzero()[:per_class, 0] for k in range(10)])
    return score_digits(images[keep], labels[keep])


def digits_table(samplers=DEFAULT_SAMPLERS, steps=DEFAULT_STEPS, per_class: int = 20, cfg_scale: float = 2.0,
                 seed: int = 0, model: str | None = None, extra_rows: bool = True) -> str:
    pipe = PixelDiffusion.load(model or default_model_path())
    floor = real_subset_scores(per_class)
    lines = [f"Digits model `{model or 'built-in'}`, {per_class} images per class ({10 * per_class} in all), "
             f"CFG {cfg_scale}, leading spacing (trailing for 1000 steps), seed {seed}, "
             f"{torch.get_num_threads()} threads.", "",
             "| sampler | steps | FID (classifier features) | class accuracy | worst class | seconds |",
             "|---|---:|---:|---:|---:|---:|",
             f"| real training digits (same count) | - | {floor.fid:.2f} | {floor.accuracy:.1%} | "
             f"{floor.worst_class[0]}: {floor.worst_class[1]:.0%} | - |"]
    print(lines[-1], flush=True)
    extra = tuple(e for e in EXTRA if e[0] in samplers) if extra_rows else ()
    for r in digits_rows(pipe, samplers, steps, per_class, cfg_scale, seed, extra):
        lines.append(f"| {r['sampler']} | {r['steps']} | {r['fid']:.2f} | {r['accuracy']:.1%} | {r['worst']} | "
                     f"{r['seconds']:.0f} |")
        print(lines[-1], flush=True)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--samplers", nargs="+", default=list(DEFAULT_SAMPLERS))
    parser.add_argument("--steps", nargs="+", type=int, default=list(DEFAULT_STEPS))
    parser.add_argument("--per-class", type=int, default=20)
    parser.add_argument("--cfg-scale", type=float, default=2.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-extra", action="store_true", help="skip the DDIM/DDPM 100 and DDPM 1000 rows")
    args = parser.parse_args()
    print(digits_table(args.samplers, args.steps, args.per_class, args.cfg_scale, args.seed, args.model,
                       not args.no_extra))


if __name__ == "__main__":
    main()
