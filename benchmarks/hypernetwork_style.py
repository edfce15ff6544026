"""What a hypernetwork taught the embedded `shapes` model: a drawing style, measured by a feature.

A hypernetwork of ``configs/hypernetwork_shapes_pastel.json`` (or ``..._outline.json``) is trained
on the shapes set drawn in a style the embedded model never drew, with the set's own captions: it
learns a style, not a word. This script draws ``--prompts`` single-object prompts
(``shapes_eval.prompt_set``) with the model's recommended settings, without the hypernetwork and
with it at each ``--weights``, on the same seeds, and prints per column:

- the style (``metrics/shapes_style.py``), ``--style pastel``: the mean opacity of the objects
  found (about 1 for filled shapes, 0.65 drawn) and the share of pastel objects (opacity < 0.82);
  ``--style outlined``: the mean hollow fraction (0 for filled shapes, 0.09 to 0.53 drawn) and the
  share of outlined objects (hollow fraction >= 0.15);
- single-object adherence: the analyzer's accuracy (with ``fill_holes`` for outlines: an outlined
  circle reads as a circle), the same analyzer for every column.

Targets (issue 17): the style from about 0 to clearly present, adherence within 5 points.
``--vae`` decodes every column with another VAE, e.g. the decoder of
``configs/shapes_vae_decoder*.json`` (fine-tuned on these styles on the model's frozen encoder).

    python benchmarks/hypernetwork_style.py --hypernetwork runs/hypernetwork_pastel/pastel.safetensors \\
        --vae runs/shapes_vae_decoder_stage2/model.safetensors
    python benchmarks/hypernetwork_style.py --style outlined --hypernetwork FILE --prompts 200 --weights 0.5 1
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import unfog
from unfog.embedded import DEFAULT_TEXT_MODEL, default_model_path
from unfog.metrics.shapes_analyzer import AnalyzerConfig, score
from unfog.metrics.shapes_eval import generate, prompt_set
from unfog.metrics.shapes_style import outline_summary, pastel_summary
from unfog.pipelines.latent_model import recommended_settings
from machine import cpu_flags

ANALYZERS = {"pastel": AnalyzerConfig(), "outlined": AnalyzerConfig(fill_holes=True)}


def measure(pipe, specs: list, settings: dict, style: str) -> dict[str, float]:
    """Style and adherence over one image per prompt spec, drawn with the same seeds every call."""
    images = generate(pipe, specs, **settings, seed=0, progress=True)
    analyzer = ANALYZERS[style]
    adherence = 100 * sum(bool(score(image, spec, analyzer)) for image, spec in zip(images, specs)) / len(specs)
    if style == "pastel":
        found = pastel_summary(images, analyzer)
        feature = {"opacity (mean)": found["opacity"], "pastel objects %": 100 * found["pastel"]}
    else:
        found = outline_summary(images, analyzer)
        feature = {"hollow fraction (mean)": found["hollow"], "outlined objects %": 100 * found["outlined"]}
    return {**feature, "single-object adherence %": adherence, "objects found": found["objects"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hypernetwork", required=True, help="the hypernetwork file to measure (.safetensors or .pt)")
    p.add_argument("--style", default="pastel", choices=tuple(ANALYZERS), help="the style it learnt (default pastel)")
    p.add_argument("--model", default=str(default_model_path(DEFAULT_TEXT_MODEL)))
    p.add_argument("--vae", default=None, help="decode with this VAE instead of the model's (every column)")
    p.add_argument("--prompts", type=int, default=200, help="single-object prompts (default 200)")
    p.add_argument("--weights", type=float, nargs="+", default=[1.0])
    args = p.parse_args()
    t0 = time.perf_counter()
    pipe = unfog.load(args.model, vae=args.vae)
    rec = recommended_settings(args.model)
    settings = {k: rec[k] for k in ("sampler", "steps", "cfg_scale") if k in rec}
    specs = prompt_set(args.prompts, categories=("single_object",))
    columns = {"without": measure(pipe, specs, settings, args.style)}
    for w in args.weights:
        pipe.load_hypernetwork(args.hypernetwork, weight=w)
        columns[f"hypernetwork x{w:g}"] = measure(pipe, specs, settings, args.style)
        pipe.unload_hypernetworks()
    print(f"{args.hypernetwork} ({args.style}) on {Path(args.model).name}, VAE {args.vae or 'its own'}; "
          f"{len(specs)} single-object prompts; settings {settings}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; CPU flags: {cpu_flags()}\n")
    print("| measure | " + " | ".join(columns) + " |")
    print("|---|" + "---|" * len(columns))
    for row in columns["without"]:
        precise = row.startswith(("hollow", "opacity"))
        cells = " | ".join(f"{col[row]:.3f}" if precise else f"{col[row]:.1f}" for col in columns.values())
        print(f"| {row} | {cells} |")
    print(f"\n{time.perf_counter() - t0:.0f} s in all")


if __name__ == "__main__":
    main()
