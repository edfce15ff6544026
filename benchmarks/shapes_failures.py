"""Why the embedded `shapes` model fails: the analyzer's reason for every failed image, grouped.

    python benchmarks/shapes_failures.py                                   # two_objects and position, 100 each
    python benchmarks/shapes_failures.py --categories counting --per-category 50
    python benchmarks/shapes_failures.py --lora runs/lora_prior5/star_teal.safetensors --categories two_objects

Images are drawn as ``metrics.shapes_eval.evaluate`` draws them for one category (canonical
prompts, seed 0, batches of 64, the model's recommended settings); each failure's reason from
``metrics.shapes_analyzer.score`` falls in one group: more objects than asked, fewer, an asked
shape missing (the count is right but a shape is drawn as another or cannot be named), an asked
colour missing, or the right objects in the wrong relation.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter
from importlib import resources
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import unfog  # noqa: E402
from unfog.datasets.shapes_text import CATEGORIES  # noqa: E402
from unfog.metrics.shapes_analyzer import score  # noqa: E402
from unfog.metrics.shapes_eval import generate, prompt_set  # noqa: E402
from unfog.pipelines.latent_model import recommended_settings  # noqa: E402

GROUPS = ("right", "more objects", "fewer objects", "shape or colour missing", "wrong relation")


def group(reason: str, ok: bool) -> str:
    if ok:
        return "right"
    count = re.match(r"expected (\d+) object\(s\), found (\d+)", reason)
    if count:
        return "more objects" if int(count[2]) > int(count[1]) else "fewer objects"
    return "wrong relation" if " is not " in reason else "shape or colour missing"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(resources.files("unfog") / "weights" / "shapes.safetensors"))
    p.add_argument("--categories", nargs="+", default=["two_objects", "position"], choices=CATEGORIES)
    p.add_argument("--per-category", type=int, default=100)
    p.add_argument("--lora", default=None, help="draw with this LoRA loaded")
    p.add_argument("--lora-weight", type=float, default=1.0)
    p.add_argument("--vae", default=None, help="decode with this VAE instead of the model's")
    args = p.parse_args()
    pipe, settings = unfog.load(args.model, vae=args.vae), recommended_settings(args.model)
    if args.lora:
        pipe.load_lora(args.lora, weight=args.lora_weight)
    lora = f"LoRA {args.lora} x{args.lora_weight:g}" if args.lora else "no LoRA"
    print(f"model {args.model}; {lora}; VAE {args.vae or 'its own'}; {settings}; "
          f"{args.per_category} prompts per category\n")
    print("| category | " + " | ".join(GROUPS) + " |\n|" + "---|" * (len(GROUPS) + 1))
    for category in args.categories:
        specs = prompt_set(args.per_category, categories=(category,))
        images = generate(pipe, specs, **settings, progress=False)
        counts = Counter()
        for image, spec in zip(images, specs):
            result = score(image, spec)
            counts[group(result.reason, bool(result))] += 1
        print(f"| {category} | " + " | ".join(str(counts[g]) for g in GROUPS) + " |", flush=True)


if __name__ == "__main__":
    main()
