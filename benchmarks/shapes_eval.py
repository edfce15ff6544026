"""The embedded `shapes` text-to-image model measured with the deterministic analyzer and our FID.

    python benchmarks/shapes_eval.py                          # defaults: 100 prompts per category
    python benchmarks/shapes_eval.py --per-category 200 --sweep-per-category 30
    python benchmarks/shapes_eval.py --model runs/shapes/model.safetensors --no-sweep
    python benchmarks/shapes_eval.py --samplers euler_ancestral dpmpp_2m --no-sweep   # one row per sampler

Prints Markdown tables (adherence per GenEval-style category and FID at the model's recommended
settings; then the same against guidance scale and against steps) and writes a JSON report and
two plots (``--plots``, default docs/images/): adherence and FID against guidance, against steps.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from importlib import resources
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import unfog  # noqa: E402
from unfog.datasets.shapes_text import CATEGORIES  # noqa: E402
from unfog.metrics.shapes_eval import ShapesScores, evaluate, reference_features  # noqa: E402
from unfog.diffusion.registry import resolve_sampler  # noqa: E402
from unfog.pipelines.latent_model import recommended_settings  # noqa: E402

COLUMNS = (*CATEGORIES, "overall")


def row(label: str, s) -> str:
    cells = [f"{100 * s.adherence.get(c, float('nan')):.1f}" for c in COLUMNS]
    fid = "" if s.fid is None else f"{s.fid:.2f}"
    return f"| {label} | " + " | ".join(cells) + f" | {fid} |"


def header(first: str) -> str:
    return (f"| {first} | " + " | ".join(COLUMNS) + " | FID |\n|" + "---|" * (len(COLUMNS) + 2))


def plot(results: list[ShapesScores], key: str, path: Path, xlabel: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [r.settings[key] for r in results]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    for c in COLUMNS:
        a.plot(xs, [100 * r.adherence[c] for r in results], marker="o", lw=2.5 if c == "overall" else 1.2, label=c)
    a.set_xlabel(xlabel)
    a.set_ylabel("analyzer accuracy (%)")
    a.set_ylim(0, 100)
    a.legend(fontsize=7)
    b.plot(xs, [r.fid for r in results], marker="o", color="k")
    b.set_xlabel(xlabel)
    b.set_ylabel("FID (our VAE features)")
    for ax in (a, b):
        ax.grid(alpha=0.3)
    fig.suptitle(f"shapes model: adherence and FID against {xlabel}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=str(resources.files("unfog") / "weights" / "shapes.safetensors"))
    p.add_argument("--per-category", type=int, default=100)
    p.add_argument("--sweep-per-category", type=int, default=30)
    p.add_argument("--cfg-scales", type=float, nargs="+", default=[1.0, 2.0, 3.0, 4.0, 6.0, 8.0])
    p.add_argument("--steps", type=int, nargs="+", default=[5, 10, 20, 40])
    p.add_argument("--samplers", nargs="+", default=None,
                   help="score the main run with each of these samplers (default: the model's recommended one); "
                        "the sweeps use the first")
    p.add_argument("--no-sweep", action="store_true")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--report", default=None, help="JSON report path (default: none)")
    p.add_argument("--plots", default=str(ROOT / "docs" / "images"))
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    pipe = unfog.load(args.model)
    rec = {"sampler": "dpmpp_2m", "steps": 20, "cfg_scale": 4.0, **recommended_settings(args.model)}
    samplers = args.samplers or [rec["sampler"]]
    for name in samplers:
        resolve_sampler(name)  # an unknown name stops here, with the valid ones, before any image is drawn
    size = pipe.default_size
    n_ref = 6 * args.per_category
    ref, floor = reference_features(pipe.vae, n_ref, size)
    print(f"model {args.model}; recommended {rec}; FID reference: {n_ref} held-out images, "
          f"real-vs-real floor {floor:.2f}\n")
    print(header("settings"))
    main_runs = []
    for name in samplers:
        main_runs.append(evaluate(pipe, args.per_category, fid_reference=ref, real_floor=floor,
                                  **{**rec, "sampler": name}))
        print(row(f"{name}, {rec['steps']} steps, cfg {rec['cfg_scale']}", main_runs[-1]), flush=True)
    cfg_runs, steps_runs = [], []
    sweep = {**rec, "sampler": samplers[0]}  # the sweeps' settings: the first sampler asked for
    if not args.no_sweep:
        n = args.sweep_per_category
        ref_s, floor_s = reference_features(pipe.vae, 6 * n, size)
        print(f"\nguidance sweep ({n} prompts per category; real-vs-real floor {floor_s:.2f} at this size)\n")
        print(header("cfg scale"))
        for cfg in args.cfg_scales:
            cfg_runs.append(evaluate(pipe, n, fid_reference=ref_s, real_floor=floor_s, **{**sweep, "cfg_scale": cfg},
                                     progress=False))
            print(row(f"{cfg:g}", cfg_runs[-1]), flush=True)
        print(f"\nsteps sweep ({n} prompts per category)\n")
        print(header("steps"))
        for steps in args.steps:
            steps_runs.append(evaluate(pipe, n, fid_reference=ref_s, real_floor=floor_s, **{**sweep, "steps": steps},
                                       progress=False))
            print(row(str(steps), steps_runs[-1]), flush=True)
        plot(cfg_runs, "cfg_scale", Path(args.plots) / "shapes_guidance.png", "guidance scale")
        plot(steps_runs, "steps", Path(args.plots) / "shapes_steps.png", "steps")
    print(f"\n{time.perf_counter() - t0:.0f} s in all; torch {torch.__version__}, {torch.get_num_threads()} threads")
    if args.report:
        report = {"model": args.model, "main": asdict(main_runs[0]),
                  "samplers": [asdict(r) for r in main_runs], "cfg_sweep": [asdict(r) for r in cfg_runs],
                  "steps_sweep": [asdict(r) for r in steps_runs]}
        Path(args.report).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
