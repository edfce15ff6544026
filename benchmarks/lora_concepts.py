"""What a LoRA taught the embedded `shapes` model, measured with the deterministic analyzer.

The LoRA of ``configs/lora_shapes_star_teal.json`` is trained on scenes with a shape (star) and a
colour (teal) the embedded model never saw. This script draws, with the model's recommended
settings:

- the single-object prompts of the new concepts (``concept_prompts``: "a red star" ... "a teal
  star", "a teal circle", ...), split into star prompts and teal prompts;
- ``--per-category`` prompts of each of the six old categories (``shapes_eval.prompt_set``);

without the LoRA and with it at each ``--weights``, on the same seeds, and prints the analyzer's
accuracy per row (target: new concepts from about 0 to >= 80%; no old category down by more than
5 points at weight 1), and for each LoRA column the change against "without" with the standard
error of that paired difference (same prompts, same seeds: sd(with - without) / sqrt(n)). At 50
prompts a category that change has an error of about 5-7 points, as large as the target itself;
``--per-category 200`` halves it.

    python benchmarks/lora_concepts.py --lora runs/lora_star_teal/star_teal.safetensors
    python benchmarks/lora_concepts.py --lora FILE --concepts 100 --per-category 50 --weights 0.5 1
    python benchmarks/lora_concepts.py --lora FILE --vae runs/shapes_vae_decoder_stage2/model.safetensors
    python benchmarks/lora_concepts.py --lora A B --seeds 0 1 --per-category 200

Several ``--lora`` files share one "without" column (each LoRA is loaded, measured and unloaded
in turn). ``--seeds 0 1`` pools prompt sets: seed ``s`` draws its own prompts of every category
and its images with generation seed ``1000 s`` (so seed 0 is the set of a plain run), and every
row counts the prompts of all the seeds; with two seeds the standard error falls by about 1/sqrt(2).

``--cache DIR`` keeps each column's per-prompt verdicts for one seed (keyed by the SHA-256 of the
model, VAE and LoRA files, the weight, the seed, the prompt counts and the sampler settings) and
reuses them: two processes can measure different seeds side by side, and a last run with every
seed prints the pooled table from the cache in seconds.

The column "drawn, through the VAE" is what a perfect LoRA would score: for each new-concept
prompt a scene of the data set with that one object (its shape and colour, a random size and
place, seed 999, which no run trained on), encoded and decoded by the VAE of the run and read by
the analyzer. A small star's points are finer than a latent pixel, so this ceiling is under 100%.

``--grid FILE``: a PNG of the prompts in ``GRID_PROMPTS`` (columns), drawn without the LoRA
(first row) and with it at the first weight (seeds 0, 1, 2: the next rows), through the same VAE.

``--vae``: decode with another VAE (e.g. the decoder of ``configs/shapes_vae_decoder*.json``,
fine-tuned on stars, teal and styles with the encoder, and so the latents, unchanged), in every
column.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from pathlib import Path

import torch

import unfog
from unfog.datasets.shapes import make_item, render, to_tensor
from unfog.datasets.shapes_text import CATEGORIES, EXTRA_COLORS, EXTRA_SHAPES, ShapesConfig, concept_prompts
from unfog.checkpoint.io import sha256_from
from unfog.embedded import DEFAULT_TEXT_MODEL, default_model_path
from unfog.metrics.shapes_analyzer import score
from unfog.metrics.shapes_eval import generate, prompt_set
from unfog.pipelines.images import make_grid, save_png
from unfog.pipelines.latent_model import recommended_settings
from machine import cpu_flags



GRID_PROMPTS = ("a red star", "a teal circle", "a teal star", "a small blue star", "a green star and a red circle",
                "a yellow star to the left of a teal square")


def grid(pipe, lora: str, weight: float, settings: dict, path: str) -> None:
    """``--grid``: without the LoRA (seed 0), then with it (seeds 0, 1, 2), a row each."""
    rows = [pipe(list(GRID_PROMPTS), **settings, seed=0, output="tensor")]
    pipe.load_lora(lora, weight=weight)
    rows += [pipe(list(GRID_PROMPTS), **settings, seed=s, output="tensor") for s in range(3)]
    pipe.unload_loras()
    save_png(make_grid(torch.cat(rows), nrow=len(GRID_PROMPTS), scale=3), path,
             f"rows: without {Path(lora).name}, then with it at {weight:g} (seeds 0-2); columns: "
             + " | ".join(GRID_PROMPTS), overwrite=True)


def verdicts(pipe, specs: list, settings: dict, seed: int = 0) -> list[bool]:
    """The analyzer's verdict on one image per prompt spec, drawn with the same seeds for every call."""
    images = generate(pipe, specs, **settings, seed=seed, progress=True)
    return [bool(score(image, spec)) for image, spec in zip(images, specs)]


@torch.no_grad()
def ceiling(pipe, specs: list) -> list[bool]:
    """The analyzer's verdict on a drawn scene of each single-object prompt, round-tripped
    through the pipeline's VAE (encoded to its posterior mean, decoded)."""
    drawn = []
    for i, spec in enumerate(specs):
        obj = spec.objects[0]
        config = ShapesConfig(categories=("single_object",), extra_shapes=EXTRA_SHAPES, extra_colors=tuple(EXTRA_COLORS),
                              only_shapes=(obj.shape,), only_colors=(obj.color,))
        drawn.append(to_tensor(render(make_item(i, 64, 999, config)[0])))
    images = pipe.decode(pipe.encode(torch.stack(drawn), mode="mean")).clamp(-1, 1)
    return [bool(score(image, spec)) for image, spec in zip(images, specs)]


def change(ours: list[bool], base: list[bool], idx: list[int]) -> tuple[float, float]:
    """Mean paired difference (points) over ``idx`` and its standard error."""
    d = [100.0 * (ours[i] - base[i]) for i in idx]
    mean = sum(d) / len(d)
    var = sum((x - mean) ** 2 for x in d) / max(len(d) - 1, 1)
    return mean, (var / len(d)) ** 0.5


def prompt_specs(concepts: int, per_category: int, seeds: list[int]) -> list[tuple[int, list]]:
    """(generation seed, new-concept prompts + old-category prompts) for each prompt-set seed."""
    return [(1000 * s, concept_prompts(concepts, seed=s) + prompt_set(per_category, seed=s)) for s in seeds]


def file_digest(path: str | None) -> str | None:
    if path is None:
        return None
    with open(path, "rb") as f:
        return sha256_from(f)


def cached_verdicts(pipe, specs: list, settings: dict, seed: int, cache: str | None, key: dict | None) -> list[bool]:
    """``verdicts``; with ``cache`` (a folder) read from there when ``key``, the seed and the
    number of prompts match, else drawn and written there (atomically)."""
    if cache is None:
        return verdicts(pipe, specs, settings, seed)
    full = dict(key, seed=seed, n=len(specs))
    path = Path(cache) / (hashlib.sha256(json.dumps(full, sort_keys=True).encode()).hexdigest()[:24] + ".json")
    if path.is_file():
        return json.loads(path.read_text())["verdicts"]
    found = verdicts(pipe, specs, settings, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps({"key": full, "verdicts": found}))
    tmp.replace(path)
    return found


def verdicts_over(pipe, sets: list[tuple[int, list]], settings: dict, cache: str | None, key: dict | None) -> list[bool]:
    """The verdicts of every set, concatenated in the order of ``sets``."""
    return [v for seed, specs in sets for v in cached_verdicts(pipe, specs, settings, seed, cache, key)]


def labels(paths: list[str]) -> list[str]:
    """Short column names: the file names, or their folders' names where the file names repeat."""
    stems = [Path(p).stem for p in paths]
    if len(set(stems)) == len(stems):
        return stems
    return [Path(p).parent.name or Path(p).stem for p in paths]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lora", required=True, nargs="+", help="the LoRA file(s) to measure")
    p.add_argument("--model", default=str(default_model_path(DEFAULT_TEXT_MODEL)))
    p.add_argument("--concepts", type=int, default=100, help="prompts about the new concepts (default 100)")
    p.add_argument("--per-category", type=int, default=50, help="prompts per old category (default 50)")
    p.add_argument("--weights", type=float, nargs="+", default=[1.0])
    p.add_argument("--grid", default=None, help="write a sample grid here (PNG): without, then with the LoRA")
    p.add_argument("--vae", default=None, help="decode with this VAE instead of the model's (every column)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="prompt-set seeds, pooled (default 0)")
    p.add_argument("--cache", default=None, help="a folder that keeps and reuses each column's verdicts per seed")
    args = p.parse_args()
    if len(set(args.seeds)) != len(args.seeds) or min(args.seeds) < 0:
        p.error(f"--seeds must be distinct non-negative integers, got {args.seeds}")
    for path in args.lora:
        if not Path(path).is_file():
            p.error(f"--lora {path}: no such file")
    t0 = time.perf_counter()
    pipe = unfog.load(args.model, vae=args.vae)
    rec = recommended_settings(args.model)
    settings = {k: rec[k] for k in ("sampler", "steps", "cfg_scale") if k in rec}
    if args.grid:
        grid(pipe, args.lora[0], args.weights[0], settings, args.grid)
    sets = prompt_specs(args.concepts, args.per_category, args.seeds)
    specs = [spec for _, s in sets for spec in s]
    size = args.concepts + len(CATEGORIES) * args.per_category
    new = [k * size + i for k in range(len(sets)) for i in range(args.concepts)]
    old = [i for i in range(len(specs)) if i % size >= args.concepts]
    groups = {"star prompts": [i for i in new if specs[i].objects[0].shape == "star"],
              "teal prompts": [i for i in new if specs[i].objects[0].color == "teal"],
              "new concepts (all)": new}
    groups |= {c: [i for i in old if specs[i].category == c] for c in CATEGORIES}
    key = None  # what the cache's verdicts depend on; the files are hashed only with --cache
    if args.cache:
        key = {"model": file_digest(args.model), "vae": file_digest(args.vae), "settings": settings,
               "concepts": args.concepts, "per_category": args.per_category, "lora": None, "weight": None}
    columns = {"without": verdicts_over(pipe, sets, settings, args.cache, key)}
    single = len(args.lora) == 1
    for path, label in zip(args.lora, labels(args.lora)):
        lora_key = key and dict(key, lora=file_digest(path))
        for w in args.weights:
            pipe.load_lora(path, weight=w)
            columns[f"{'LoRA' if single else label} x{w:g}"] = verdicts_over(
                pipe, sets, settings, args.cache, lora_key and dict(lora_key, weight=w))
            pipe.unload_loras()
    base = columns["without"]
    loras = [name for name in columns if name != "without"]
    print(f"{', '.join(args.lora)} on {Path(args.model).name}, VAE {args.vae or 'its own'}; prompt seeds {args.seeds}; "
          f"settings {settings}; torch {torch.__version__}, {torch.get_num_threads()} threads; CPU flags: {cpu_flags()}\n")
    drawn = dict(zip(new, ceiling(pipe, [specs[i] for i in new])))
    print("| prompts | n | " + " | ".join(columns) + " | " + " | ".join(f"{name}: change ± SE" for name in loras)
          + " | drawn, through the VAE |")
    print("|---|---|" + "---|" * (len(columns) + len(loras) + 1))
    for name, idx in groups.items():
        cells = " | ".join(f"{100 * sum(col[i] for i in idx) / len(idx):.1f}" for col in columns.values())
        changes = " | ".join("{:+.1f} ± {:.1f}".format(*change(columns[c], base, idx)) for c in loras)
        top = f"{100 * sum(drawn[i] for i in idx) / len(idx):.1f}" if idx[0] in drawn else "-"
        print(f"| {name} | {len(idx)} | {cells} | {changes} | {top} |")
    print(f"\n{time.perf_counter() - t0:.0f} s in all")


if __name__ == "__main__":
    main()
