"""What a textual-inversion embedding taught the embedded `shapes` model, measured with the analyzer.

``configs/ti_shapes.json`` learns the word ``<sks>`` from 20 images of a green triangle. This
script draws the same prompts three ways, on the same seeds, with the model's recommended
settings, and prints the analyzer's accuracy for "one green triangle" in each:

- written out in words ("a picture of a green triangle"): what the model does with the words;
- with the name and the embedding loaded ("a picture of <sks>");
- with the name but without the embedding (the name is then an unknown word): the floor.

The issue's target: the name's accuracy >= 80% of the written-out prompts'.

    python benchmarks/ti_concept.py --embedding "runs/ti_shapes/<sks>.safetensors"
    python benchmarks/ti_concept.py --embedding FILE --words "a green triangle" --shape triangle --color green --n 200
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import unfog
from unfog.checkpoint.embeddings import read_embedding
from unfog.datasets.shapes_text import ObjectSpec, PromptSpec
from unfog.embedded import DEFAULT_TEXT_MODEL, default_model_path
from unfog.metrics.shapes_analyzer import score
from unfog.metrics.shapes_eval import generate
from unfog.pipelines.latent_model import recommended_settings
from machine import cpu_flags

# Caption forms of the shapes grammar that hold a single object; "{}" is the object.
TEMPLATES = ("{}", "a picture of {}", "an image of {}", "a drawing of {}")



def accuracy(pipe, texts: list[str], target: ObjectSpec, settings: dict) -> float:
    specs = [PromptSpec(text, "single_object", (target,)) for text in texts]
    images = generate(pipe, specs, **settings, seed=0, progress=True)
    return sum(bool(score(image, spec)) for image, spec in zip(images, specs)) / len(specs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--embedding", required=True, help="the embedding file to measure")
    p.add_argument("--model", default=str(default_model_path(DEFAULT_TEXT_MODEL)))
    p.add_argument("--words", default="a green triangle", help="the concept written out")
    p.add_argument("--shape", default="triangle")
    p.add_argument("--color", default="green")
    p.add_argument("--n", type=int, default=100, help="prompts per column (the templates in turn)")
    args = p.parse_args()
    t0 = time.perf_counter()
    pipe = unfog.load(args.model)
    rec = recommended_settings(args.model)
    settings = {k: rec[k] for k in ("sampler", "steps", "cfg_scale") if k in rec}
    name = read_embedding(args.embedding).name
    target = ObjectSpec(args.shape, args.color)
    forms = [TEMPLATES[i % len(TEMPLATES)] for i in range(args.n)]
    rows = {f"written out ({args.words!r})": accuracy(pipe, [f.format(args.words) for f in forms], target, settings),
            f"{name}, no embedding": accuracy(pipe, [f.format(name) for f in forms], target, settings)}
    pipe.load_embedding(args.embedding)
    rows[f"{name}, embedding loaded"] = accuracy(pipe, [f.format(name) for f in forms], target, settings)
    print(f"{args.embedding} on {Path(args.model).name}; settings {settings}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; CPU flags: {cpu_flags()}\n")
    print(f"| prompts (n = {args.n} each, target: one {args.color} {args.shape}) | analyzer accuracy % |")
    print("|---|---|")
    for row, acc in rows.items():
        print(f"| {row} | {100 * acc:.1f} |")
    words, learnt = list(rows.values())[0], list(rows.values())[2]
    print(f"\nembedding / written out: {learnt / words if words else float('nan'):.2f} (target >= 0.8)")
    print(f"{time.perf_counter() - t0:.0f} s in all")


if __name__ == "__main__":
    main()
