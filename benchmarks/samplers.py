"""Sampler accuracy against step count.

Closed-form part: every registered sampler is driven by the exact denoiser E[x_0 | x] of a 64-D
Gaussian mixture (tests/closed_form/gmm.py), presented to unfog's `Denoiser` as an eps-prediction
network on the scaled_linear schedule, with Karras sigmas (rho = 7) over the schedule's full range.
Each cell is the energy distance between the sampler's output and an exact sample set of the same
size: the unbiased U-statistic, 0 in expectation for identical distributions (so it can come out
slightly negative). The "exact" row is the noise floor: the same distance for independent exact
sets, one per column. Starting points are exact draws of p_sigma at sigma_max.

LCM is driven by the posterior mean like the others, which it is not built for: its error does
not vanish with more steps (see tests/parity/test_closed_form.py, test_lcm_*).

Digits part (``--part digits``): the embedded digits model scored by our digit classifier
(class accuracy, classifier-feature FID against held-out digits) against steps for ddpm, ddim,
euler, dpmpp_2m and unipc; see benchmarks/digits_samplers.py.

    python benchmarks/samplers.py                 # both tables (closed form: ~5 min; digits: longer)
    python benchmarks/samplers.py --part closed-form --steps 5 10 --samplers euler heun
    python benchmarks/samplers.py --part digits --per-class 20
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the closed_form oracle
from closed_form.gmm import EnergyDistanceTo, GaussianMixture, as_network, random_mixture  # noqa: E402

from unfog.diffusion import SAMPLERS, Denoiser, DiscreteSchedule, get_sigmas, sample  # noqa: E402

STEPS = (5, 10, 20, 50, 100, 1000)


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def sampler_distances(gmm: GaussianMixture, names: list[str], steps: tuple[int, ...], n: int, *,
                      schedule_kind: str = "scaled_linear", prediction: str = "eps", spacing: str = "karras",
                      seed: int = 0) -> dict[str, list[float]]:
    """Energy distance to an exact sample set, per sampler and step count; "exact" is the floor."""
    schedule = DiscreteSchedule.make(schedule_kind)
    denoiser = Denoiser(as_network(gmm.denoise64, schedule, prediction), schedule, prediction)
    reference, _ = gmm.sample(n, torch.Generator().manual_seed(seed + 1))
    distance = EnergyDistanceTo(reference)
    # the floor: a fresh exact set per column, so the row shows the scatter too
    table = {"exact": [distance(gmm.sample(n, torch.Generator().manual_seed(seed + 2 + j))[0])
                       for j in range(len(steps))]}
    for name in names:
        table[name] = []
        for count in steps:
            sigmas = get_sigmas(schedule, count, spacing)
            g = torch.Generator().manual_seed(seed)
            x = gmm.sample_noised(n, float(sigmas[0]), g)
            table[name].append(distance(sample(denoiser, x, sigmas, name, generator=g)))
    return table


def closed_form_table(steps: tuple[int, ...] = STEPS, n: int = 2000, dim: int = 64, components: int = 3,
                      samplers: list[str] | None = None, seed: int = 0, **options) -> str:
    """The Markdown table of :func:`sampler_distances` for a random `dim`-D mixture."""
    gmm = random_mixture(dim, components, seed=seed)
    names = samplers or sorted(SAMPLERS)
    table = sampler_distances(gmm, names, steps, n, seed=seed, **options)
    header = ["sampler"] + [f"{s} steps" for s in steps]
    rows = [[name] + [f"{v:.4f}" for v in values] for name, values in table.items()]
    return markdown_table(header, rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, nargs="+", default=list(STEPS))
    parser.add_argument("--samplers", nargs="+", default=None, choices=sorted(SAMPLERS))
    parser.add_argument("--n", type=int, default=2000, help="samples per set")
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--components", type=int, default=3)
    parser.add_argument("--schedule", default="scaled_linear", choices=["linear", "scaled_linear", "cosine"])
    parser.add_argument("--prediction", default="eps", choices=["eps", "v", "x0"])
    parser.add_argument("--spacing", default="karras")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (small tensors: 1 is fastest)")
    parser.add_argument("--part", choices=["all", "closed-form", "digits"], default="all")
    parser.add_argument("--per-class", type=int, default=20, help="digits part: images per class")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.part in ("all", "digits"):
        from digits_samplers import digits_table

        print(digits_table(per_class=args.per_class), "\n")
    if args.part == "digits":
        return
    start = time.perf_counter()
    print(closed_form_table(tuple(args.steps), args.n, args.dim, args.components, args.samplers, args.seed,
                            schedule_kind=args.schedule, prediction=args.prediction, spacing=args.spacing))
    print(f"\nEnergy distance to an exact set of {args.n} samples; {args.dim}-D mixture of {args.components}, "
          f"{args.prediction} prediction, {args.schedule} schedule, {args.spacing} spacing, seed {args.seed}; "
          f"{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
