"""Whether a layout ControlNet puts the embedded `shapes` model's objects where the hint says,
measured with the deterministic analyzer.

The ControlNet of ``configs/controlnet_shapes_layout.json`` reads a scene's layout map (each
object's filled silhouette, white on black: ``datasets.shapes.layout_hint``). This script takes
``--scenes`` held-out scenes (seed ``HELD_OUT_SEED``, every category, never trained on), and draws
each scene's canonical prompt with the model's recommended settings, on the same seed, without
the ControlNet and with it (the scene's hint, at each ``--weights``). Per image:

- per object of the scene, the IoU of its hinted region (its silhouette, coverage >= 1/2) with
  the generated object's mask (the analyzer's ``detect``; objects paired greedily by IoU, an
  unpaired one scores 0); mean IoU and "placed" (IoU >= 0.5) over the objects;
- layout: every object of the scene placed;
- position adherence: the analyzer's verdict on the position prompts (relation and shapes);
- colour / shape adherence: the analyzer's verdict on every prompt (GenEval's, per category).

Rows: all held-out scenes, and the scenes whose layout the base model gets wrong (some object not
placed without the ControlNet). The real renders' IoU (the analyzer's ceiling on a perfect image)
is printed too. Targets (the ControlNet issue): mean IoU >= 0.7 and position adherence >= 90 %.

    python benchmarks/controlnet_layout.py --controlnet runs/controlnet_layout/layout.safetensors
    python benchmarks/controlnet_layout.py --controlnet FILE --scenes 300 --weights 0.5 1 --grid grid.png
    python benchmarks/controlnet_layout.py --controlnet FILE --categories position --scenes 100
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import unfog
from unfog.datasets.shapes import layout_hint, make_item, render, spec_for, to_tensor
from unfog.datasets.shapes_text import CATEGORIES, ShapesConfig
from unfog.embedded import DEFAULT_TEXT_MODEL, default_model_path
from unfog.metrics.shapes_analyzer import detect, match
from unfog.metrics.shapes_eval import HELD_OUT_SEED
from unfog.pipelines.controlnet import Control
from unfog.pipelines.images import make_grid, save_png
from unfog.pipelines.latent_model import recommended_settings
from machine import cpu_flags



def object_ious(scene, image) -> tuple[list[float], bool]:
    """The IoU of each scene object's hinted region with the generated object paired to it, and
    the analyzer's verdict on the scene's canonical prompt."""
    found = detect(image)
    regions = [layout_hint(scene, size=image.shape[0], only=k)[..., 0] >= 128 for k in range(len(scene.objects))]
    pairs = sorted(((float((r & m).sum() / (r | m).sum()), k, j) for k, r in enumerate(regions)
                    for j, (_, m) in enumerate(found)), reverse=True)
    ious, used = [0.0] * len(regions), set()
    for iou, k, j in pairs:  # greedy: the best overlap first, each object and region once
        if iou > 0 and ious[k] == 0 and j not in used:
            ious[k] = iou
            used.add(j)
    return ious, bool(match([obj for obj, _ in found], spec_for(scene)))


def measure(images: list[np.ndarray], scenes: list) -> list[dict]:
    rows = []
    for image, scene in zip(images, scenes):
        ious, correct = object_ious(scene, image)
        rows.append({"ious": ious, "layout": all(i >= 0.5 for i in ious), "correct": correct,
                     "category": scene.category})
    return rows


def summary(rows: list[dict], idx: list[int]) -> dict[str, float]:
    ious = [i for k in idx for i in rows[k]["ious"]]
    position = [rows[k]["correct"] for k in idx if rows[k]["category"] == "position"]
    out = {"mean IoU": np.mean(ious), "objects placed (IoU >= 0.5) %": 100 * np.mean([i >= 0.5 for i in ious]),
           "layout right %": 100 * np.mean([rows[k]["layout"] for k in idx]),
           "position adherence %": 100 * np.mean(position) if position else float("nan"),
           "colour / shape adherence (all prompts) %": 100 * np.mean([rows[k]["correct"] for k in idx])}
    for c in CATEGORIES:
        verdicts = [rows[k]["correct"] for k in idx if rows[k]["category"] == c]
        if verdicts:  # categories not drawn get no row
            out[f"  {c} %"] = 100 * np.mean(verdicts)
    return out


def draw(pipe, scenes: list, settings: dict, controlnet=None, weight: float = 1.0, end: float = 1.0
         ) -> list[np.ndarray]:
    """One image per scene, its canonical prompt, seed = its index; with the scene's hint if given,
    from the first step to the fraction ``end`` of the steps."""
    out = []
    for i, scene in enumerate(scenes):
        controls = [] if controlnet is None else [Control(controlnet, Image.fromarray(layout_hint(scene)), weight,
                                                          end=end)]
        image = pipe(spec_for(scene).text, **settings, seed=i, output="tensor", controls=controls)[0]
        out.append(((image.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy())
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--controlnet", required=True, help="the ControlNet file to measure")
    p.add_argument("--model", default=str(default_model_path(DEFAULT_TEXT_MODEL)))
    p.add_argument("--scenes", type=int, default=120, help="held-out scenes (default 120, about 20 per category)")
    p.add_argument("--categories", nargs="+", default=list(CATEGORIES), choices=CATEGORIES,
                   help="draw the scenes from these categories only (e.g. position: a larger sample of it)")
    p.add_argument("--weights", type=float, nargs="+", default=[1.0])
    p.add_argument("--ends", type=float, nargs="+", default=[1.0],
                   help="guidance ends to try with each weight (fractions of the steps; default 1: every step)")
    p.add_argument("--size", type=int, default=64, help="image side (default 64, the embedded model's)")
    p.add_argument("--grid", help="write a grid of the first 8 scenes: hint | without | with (first weight)")
    args = p.parse_args()
    t0 = time.perf_counter()
    pipe = unfog.load(args.model)
    controlnet = unfog.load_controlnet(args.controlnet)
    rec = recommended_settings(args.model)
    settings = {k: rec[k] for k in ("sampler", "steps", "cfg_scale") if k in rec}
    config = ShapesConfig(categories=tuple(args.categories))
    scenes = [make_item(i, args.size, HELD_OUT_SEED, config)[0] for i in range(args.scenes)]
    settings |= {"width": args.size, "height": args.size}
    real = measure([render(s) for s in scenes], scenes)
    images = {"without": draw(pipe, scenes, settings)}
    for w in args.weights:
        for end in args.ends:
            name = f"ControlNet x{w:g}" + ("" if end == 1 else f", to {end:g}")
            images[name] = draw(pipe, scenes, settings, controlnet, w, end)
    rows = {name: measure(imgs, scenes) for name, imgs in images.items()}
    groups = {"all held-out scenes": list(range(len(scenes))),
              "layouts the base model gets wrong": [k for k, r in enumerate(rows["without"]) if not r["layout"]]}
    print(f"{args.controlnet} on {Path(args.model).name}; settings {settings}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; CPU flags: {cpu_flags()}")
    print(f"real renders (the analyzer's ceiling): mean IoU {np.mean([i for r in real for i in r['ious']]):.3f}\n")
    for group, idx in groups.items():
        print(f"### {group} (n = {len(idx)})\n")
        table = {name: summary(r, idx) for name, r in rows.items()} if idx else {}
        print("| measure | " + " | ".join(rows) + " |")
        print("|---|" + "---|" * len(rows))
        for measure_name in next(iter(table.values()), {}):
            print(f"| {measure_name} | " + " | ".join(f"{table[n][measure_name]:.3g}" for n in rows) + " |")
        print()
    if args.grid:
        first = min(8, len(scenes))
        tiles = [to_tensor(layout_hint(s)) for s in scenes[:first]]
        tiles += [to_tensor(images[name][k]) for name in list(images)[:2] for k in range(first)]
        save_png(make_grid(torch.stack(tiles), nrow=first, scale=2), args.grid,
                 f"rows: hint, without, {list(images)[1]}; {args.controlnet}", overwrite=True)
    print(f"{time.perf_counter() - t0:.0f} s in all")


if __name__ == "__main__":
    main()
