"""How much of each kind of `shapes` image survives the autoencoder: the ceiling of anything a
model trained on its latents can draw (a LoRA's new star and teal, a hypernetwork's style).

For each set of ``--n`` single-object scenes (the default set; teal objects; stars; the
"outlined" and "pastel" styles), every image is encoded (posterior mean) and decoded by the
embedded model's own VAE and by each ``--vae``, and the analyzer reads the result: the share read
as exactly the drawn object (shape and colour; outlines with ``fill_holes``), and for the styles
their feature (``metrics/shapes_style.py``). The drawn images themselves are the first column.
The stars are also split by size (rows "star, small" and "star, large").

    python benchmarks/vae_roundtrip.py --vae runs/shapes_vae_decoder_stage2/model.safetensors
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from unfog.datasets.shapes import make_item, render, to_tensor
from unfog.datasets.shapes_text import ShapesConfig
from unfog.embedded import DEFAULT_TEXT_MODEL, default_model_path
from unfog.metrics.shapes_analyzer import AnalyzerConfig, analyze, as_uint8_image
from unfog.metrics.shapes_style import outline_summary, pastel_summary
from unfog.pipelines.vae_file import read_vae
from machine import cpu_flags

SINGLE = dict(categories=("single_object",))
SETS = {  # name: (ShapesConfig, style)
    "default": (ShapesConfig(**SINGLE), "filled"),
    "teal": (ShapesConfig(**SINGLE, extra_colors=("teal",), only_colors=("teal",)), "filled"),
    "star": (ShapesConfig(**SINGLE, extra_shapes=("star",), only_shapes=("star",)), "filled"),
    "outlined": (ShapesConfig(**SINGLE), "outlined"),
    "pastel": (ShapesConfig(**SINGLE), "pastel"),
}


def read_right(images, scenes, analyzer: AnalyzerConfig) -> float:
    """% of images the analyzer reads as exactly their one object, shape and colour."""
    def right(image, scene) -> bool:
        found = analyze(image, analyzer)
        obj = scene.objects[0]
        return len(found) == 1 and (found[0].shape, found[0].color) == (obj.shape, obj.color)
    return 100 * float(np.mean([right(i, s) for i, s in zip(images, scenes)]))


@torch.no_grad()
def round_trip(vae, images: list[np.ndarray]) -> list[np.ndarray]:
    x = torch.stack([to_tensor(i) for i in images])
    return [as_uint8_image(y) for y in vae.decode(vae.encode(x).mode()).clamp(-1, 1)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=str(default_model_path(DEFAULT_TEXT_MODEL)))
    p.add_argument("--vae", nargs="*", default=[], help="other VAEs to compare with the model's own")
    p.add_argument("--n", type=int, default=100, help="scenes per set (default 100)")
    args = p.parse_args()
    t0 = time.perf_counter()
    vaes = {"model's VAE": read_vae(args.model), **{Path(v).parent.name or v: read_vae(v) for v in args.vae}}
    rows = {}
    for name, (config, style) in SETS.items():
        scenes = [make_item(i, 64, 999, config)[0] for i in range(args.n)]  # seed 999: no training scene
        drawn = [render(s, style=style) for s in scenes]
        analyzer = AnalyzerConfig(fill_holes=style == "outlined")
        for column, images in {"drawn": drawn, **{k: round_trip(v, drawn) for k, v in vaes.items()}}.items():
            cell = f"{read_right(images, scenes, analyzer):.0f}%"
            if style == "outlined":
                cell += f", outlined {100 * outline_summary(images, analyzer)['outlined']:.0f}%"
            elif style == "pastel":
                cell += f", pastel {100 * pastel_summary(images, analyzer)['pastel']:.0f}%"
            rows.setdefault(name, {})[column] = cell
            if name == "star":  # the small ones are what a factor-4 latent loses first
                for size in ("small", "large"):
                    keep = [k for k, sc in enumerate(scenes) if sc.objects[0].size == size]
                    share = read_right([images[k] for k in keep], [scenes[k] for k in keep], analyzer)
                    rows.setdefault(f"star, {size} ({len(keep)})", {})[column] = f"{share:.0f}%"
    print(f"{args.n} single-object scenes per set; torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"CPU flags: {cpu_flags()}\n")
    columns = list(next(iter(rows.values())))
    print("| set: read right (, style share) | " + " | ".join(columns) + " |")
    print("|---|" + "---|" * len(columns))
    for name, cells in rows.items():
        print(f"| {name} | " + " | ".join(cells[c] for c in columns) + " |")
    print(f"\n{time.perf_counter() - t0:.0f} s in all")


if __name__ == "__main__":
    main()
