"""RePaint's resampling against the per-step blend, on the embedded `shapes` model.

Every scene is a real `shapes` scene with two objects (two_objects and position captions); the
mask is the box of its first object, grown by ``--margin`` pixels, and the prompt is the scene's
own canonical caption. Each method repaints the same scenes with the same seeds at strength 1
(the masked area starts from noise), with the model's recommended guidance. Printed per method:

- ``NFE``: model calls per image (a CFG pair counts once), and the wall time per image;
- ``adherence``: the analyzer's verdict on the whole caption (both objects, their colours and
  shapes, and for position scenes the relation): the repainted object must be what the caption
  says, where it says, and the kept one must survive;
- ``band``: the mean absolute pixel error (0-255) in the ``--band``-pixel ring just outside the
  mask, against the original: how well the painted area blends into what was kept (the latent
  blend keeps the latents there, but the decoder sees the painted ones beside them);
- ``far``: the same error further out (VAE round-trip error alone), the floor under ``band``.

Methods: the blend (``InpaintDenoiser``) with DDPM at S steps, RePaint with DDPM at S steps and
(j, r) jumps, and the blend at as many steps as RePaint's model calls (equal NFE; the times
printed show how close that is to equal time).

    python benchmarks/repaint.py                    # 100 scenes, S = 25, (j, r) = (5, 5)
    python benchmarks/repaint.py --scenes 200 --steps 25 --jumps 5x5 10x3
    python benchmarks/repaint.py --examples docs/images/repaint_examples.png   # only the picture:
        # per scene (rows): the scene, the masked area greyed, each method's result (columns)
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

import unfog
from unfog.datasets.shapes import diameter, make_item, render, to_tensor
from unfog.datasets.shapes_text import spec_for
from unfog.diffusion.repaint import repaint_calls
from unfog.metrics.shapes_analyzer import score
from unfog.pipelines.latent_model import recommended_settings
from unfog.embedded import DEFAULT_TEXT_MODEL, default_model_path
from machine import cpu_flags


def scenes(n: int, size: int, margin: int, seed: int = 7):
    """(image (3, H, W) in [-1, 1], mask (1, H, W), spec) of the first n two-object scenes."""
    out, index = [], 0
    while len(out) < n:
        scene, _ = make_item(index, canvas=size, seed=seed)
        index += 1
        if len(scene.objects) != 2:
            continue
        first = scene.objects[0]
        r = diameter(first.size, size) / 2 + margin
        ys, xs = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
        mask = ((xs - first.x).abs() <= r) & ((ys - first.y).abs() <= r)
        out.append((to_tensor(render(scene, size)), mask[None].float(), spec_for(scene)))
    return out


def ring(mask: torch.Tensor, inner: int, outer: int) -> torch.Tensor:
    """The pixels between ``inner`` and ``outer`` (Chebyshev distance) outside a (1, H, W) mask."""
    grow = lambda m, k: torch.nn.functional.max_pool2d(m[None], 2 * k + 1, 1, k)[0] if k else m  # noqa: E731
    return (grow(mask, outer) > 0) & ~(grow(mask, inner) > 0)


def run(pipe, items, settings: dict, method: dict, batch: int) -> dict[str, float]:
    hits, band, far, seconds = [], [], [], 0.0
    for start in range(0, len(items), batch):
        chunk = items[start:start + batch]
        images = torch.stack([c[0] for c in chunk])
        masks = torch.stack([c[1] for c in chunk])
        t0 = time.perf_counter()
        out = pipe([c[2].text for c in chunk], init_image=images, mask=masks, strength=1.0, seed=start,
                   cfg_scale=settings["cfg_scale"], output="tensor", **method)
        seconds += time.perf_counter() - t0
        for o, (image, mask, spec) in zip(out, chunk):
            hits.append(bool(score(o, spec)))
            err = (o - image).abs().mean(0) * 127.5  # (H, W), 0-255
            band.append(float(err[ring(mask, 0, args.band)[0]].mean()))
            far.append(float(err[ring(mask, 2 * args.band, 4 * args.band)[0]].mean()))
    n = len(items)
    return {"adherence": 100 * float(np.mean(hits)), "band": float(np.mean(band)), "far": float(np.mean(far)),
            "seconds": seconds / n, "se": 100 * float(np.std(hits) / np.sqrt(n))}


def examples(pipe, items, settings: dict, methods: list, path: str) -> None:
    """One row per scene: the original, the original with the mask greyed, then each method."""
    from unfog.pipelines.images import make_grid, save_png

    images = torch.stack([c[0] for c in items])
    masks = torch.stack([c[1] for c in items])
    columns = [images, images * (1 - masks) + 0.0 * masks]
    for _, method in methods:
        columns.append(pipe([c[2].text for c in items], init_image=images, mask=masks, strength=1.0, seed=0,
                            cfg_scale=settings["cfg_scale"], output="tensor", **method))
    tiles = torch.stack(columns, dim=1).flatten(0, 1)  # row-major: scene by scene
    names = " | ".join(["scene", "mask"] + [name for name, _ in methods])
    save_png(make_grid(tiles, nrow=len(columns), scale=2), path,
             f"columns: {names}; prompts: {'; '.join(c[2].text for c in items)}", overwrite=True)
    print(f"wrote {path}")


def main() -> None:
    global args
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scenes", type=int, default=100)
    p.add_argument("--steps", type=int, default=25, help="S: the DDPM grid of the blend and of RePaint")
    p.add_argument("--jumps", nargs="+", default=["5x5"], help="RePaint's jump length x jump count, e.g. 5x5 10x3")
    p.add_argument("--margin", type=int, default=3, help="pixels the mask extends beyond the object's box")
    p.add_argument("--band", type=int, default=3, help="width of the ring just outside the mask")
    p.add_argument("--batch", type=int, default=25)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--examples", default=None, metavar="PNG", help="write a picture of 6 scenes instead of the table")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    path = default_model_path(DEFAULT_TEXT_MODEL)
    pipe, settings = unfog.load(path, dtype="fp32"), recommended_settings(path)
    items = scenes(args.scenes, pipe.default_size, args.margin)
    methods = [(f"blend, {args.steps} steps", {"sampler": "ddpm", "steps": args.steps})]
    for jumps in args.jumps:
        j, r = (int(v) for v in jumps.split("x"))
        calls = repaint_calls(args.steps, j, r)
        methods += [(f"RePaint {j}x{r}, {args.steps} steps", {"sampler": "ddpm", "steps": args.steps, "repaint": (j, r)}),
                    (f"blend, {calls} steps (equal NFE)", {"sampler": "ddpm", "steps": calls})]
    if args.examples:
        return examples(pipe, items[:6], settings, methods, args.examples)
    print(f"CPU: {cpu_flags()}; torch threads {torch.get_num_threads()}; {args.scenes} scenes, "
          f"{pipe.default_size} px, mask = first object's box + {args.margin} px, cfg {settings['cfg_scale']}")
    print("| method | NFE | s / image | adherence % (SE) | band error | far error |")
    print("|---|---|---|---|---|---|")
    for name, method in methods:
        nfe = repaint_calls(method["steps"], *method["repaint"]) if "repaint" in method else method["steps"]
        r = run(pipe, items, settings, method, args.batch)
        print(f"| {name} | {nfe} | {r['seconds']:.3f} | {r['adherence']:.1f} ({r['se']:.1f}) | "
              f"{r['band']:.2f} | {r['far']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
