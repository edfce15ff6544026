"""What a hypernetwork taught the embedded `shapes` model: a drawing style, measured by a feature.

The hypernetwork of ``configs/hypernetwork_shapes_outline.json`` is trained on the shapes set
drawn "outlined" (an outline 3 px wide with the background inside), a style the embedded model
never drew, with the set's own captions: it learns a style, not a word. This script draws
``--prompts`` single-object prompts (``shapes_eval.prompt_set``) with the model's recommended
settings, without the hypernetwork and with it at each ``--weights``, on the same seeds, and
prints per column:

- the style: the mean hollow fraction of the objects found (``metrics/shapes_style.py``; 0 for
  filled shapes, 0.09 to 0.53 for the drawn outlines) and the share of objects that are outlined
  (hollow fraction >= 0.15);
- single-object adherence: the analyzer's accuracy with ``fill_holes`` (an outlined circle reads
  as a circle; without it a ring is no shape), the same analyzer for every column.

Targets (issue 17): the style from about 0 to clearly present, adherence within 5 points.

    python benchmarks/hypernetwork_style.py --hypernetwork runs/hypernetwork_outline/outline.safetensors
    python benchmarks/hypernetwork_style.py --hypernetwork FILE --prompts 200 --weights 0.5 1
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
from unfog.metrics.shapes_style import outline_summary
from unfog.pipelines.latent_model import recommended_settings
from machine import cpu_flags

ANALYZER = AnalyzerConfig(fill_holes=True)



def measure(pipe, specs: list, settings: dict) -> dict[str, float]:
    """Style and adherence over one image per prompt spec, drawn with the same seeds every call."""
    images = generate(pipe, specs, **settings, seed=0, progress=True)
    style = outline_summary(images, ANALYZER)
    adherence = sum(bool(score(image, spec, ANALYZER)) for image, spec in zip(images, specs)) / len(specs)
    return {"hollow fraction (mean)": style["hollow"], "outlined objects %": 100 * style["outlined"],
            "single-object adherence %": 100 * adherence, "objects found": style["objects"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hypernetwork", required=True, help="the hypernetwork file to measure (.safetensors or .pt)")
    p.add_argument("--model", default=str(default_model_path(DEFAULT_TEXT_MODEL)))
    p.add_argument("--prompts", type=int, default=200, help="single-object prompts (default 200)")
    p.add_argument("--weights", type=float, nargs="+", default=[1.0])
    args = p.parse_args()
    t0 = time.perf_counter()
    pipe = unfog.load(args.model)
    rec = recommended_settings(args.model)
    settings = {k: rec[k] for k in ("sampler", "steps", "cfg_scale") if k in rec}
    specs = prompt_set(args.prompts, categories=("single_object",))
    columns = {"without": measure(pipe, specs, settings)}
    for w in args.weights:
        pipe.load_hypernetwork(args.hypernetwork, weight=w)
        columns[f"hypernetwork x{w:g}"] = measure(pipe, specs, settings)
        pipe.unload_hypernetworks()
    print(f"{args.hypernetwork} on {Path(args.model).name}; {len(specs)} single-object prompts; settings {settings}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads; CPU flags: {cpu_flags()}\n")
    print("| measure | " + " | ".join(columns) + " |")
    print("|---|" + "---|" * len(columns))
    for row in columns["without"]:
        cells = " | ".join(f"{col[row]:.3f}" if row.startswith("hollow") else f"{col[row]:.1f}"
                           for col in columns.values())
        print(f"| {row} | {cells} |")
    print(f"\n{time.perf_counter() - t0:.0f} s in all")


if __name__ == "__main__":
    main()
