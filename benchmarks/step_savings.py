"""What the opt-in savings of U-Net work cost in quality, on the embedded `shapes` model.

Each setting (``--settings``: "off", or pipeline options such as ``cfg_truncation=0.5``, several
joined by ","; ``deep_cache=3``) draws the same prompts with the same seeds at the model's
recommended sampler, steps and guidance: ``--per-category`` prompts of each of the six analyzer
categories. Printed per setting: the analyzer's accuracy per category and overall, its change
against "off", FID against held-out images (our VAE features), the U-Net's work (sample rows it
evaluated, counted by a forward hook: independent of the machine), the wall time of the drawing
(decoding included) and the speed-up against "off".

    python benchmarks/step_savings.py
    python benchmarks/step_savings.py --per-category 100 --settings off cfg_truncation=0.5 deep_cache=3
"""

from __future__ import annotations

import argparse
import ast
import time

import torch

import unfog
from unfog.datasets.shapes_text import CATEGORIES
from unfog.embedded import DEFAULT_TEXT_MODEL, default_model_path
from unfog.metrics.shapes_analyzer import score_batch
from unfog.metrics.fid import fid_from_features
from unfog.metrics.shapes_eval import generate, prompt_set, reference_features, vae_features
from unfog.pipelines.latent_model import recommended_settings
from machine import cpu_flags

DEFAULT_SETTINGS = ["off", "cfg_truncation=0.8", "cfg_truncation=0.5", "cfg_truncation=0.3"]


def parse_setting(text: str) -> dict[str, object]:
    """ "off" -> {}; "cfg_truncation=0.5,deep_cache=3" -> {"cfg_truncation": 0.5, "deep_cache": 3}."""
    if text == "off":
        return {}
    options = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        if not sep:
            raise SystemExit(f"setting {text!r}: write key=value pairs joined by ',' (or 'off')")
        try:
            options[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            options[key.strip()] = value.strip()
    return options


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=str(default_model_path(DEFAULT_TEXT_MODEL)))
    p.add_argument("--per-category", type=int, default=50)
    p.add_argument("--settings", nargs="+", default=DEFAULT_SETTINGS)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    settings = {text: parse_setting(text) for text in args.settings}
    pipe = unfog.load(args.model)
    rec = recommended_settings(args.model)
    specs = prompt_set(args.per_category)
    ref, floor = reference_features(pipe.vae, len(specs), pipe.default_size)
    rows = [0]
    pipe.unet.register_forward_pre_hook(lambda module, inputs: rows.__setitem__(0, rows[0] + inputs[0].shape[0]))
    print(f"shapes model {args.model}; {rec}; {len(specs)} prompts ({args.per_category} per category); FID "
          f"real-vs-real floor {floor:.2f}; torch {torch.__version__}, {args.threads} threads; CPU: {cpu_flags()}\n")
    columns = (*CATEGORIES, "overall")
    print("| setting | " + " | ".join(columns) + " | change | FID | U-Net rows | time s | speed-up |")
    print("|---" * (len(columns) + 6) + "|")
    base = None
    for text, options in settings.items():
        generate(pipe, specs[:2], **rec, progress=False, **options)  # warm-up (and checks the options)
        rows[0] = 0
        start = time.perf_counter()
        images = generate(pipe, specs, **rec, seed=0, progress=False, **options)
        seconds = time.perf_counter() - start
        adherence = score_batch(images, specs)
        fid = fid_from_features(vae_features(pipe.vae, images), ref)
        if base is None:
            base = (adherence["overall"], rows[0], seconds)
        cells = " | ".join(f"{100 * adherence[c]:.1f}" for c in columns)
        print(f"| {text} | {cells} | {100 * (adherence['overall'] - base[0]):+.1f} | {fid:.2f} | "
              f"{rows[0] / base[1]:.2f} | {seconds:.1f} | {base[2] / seconds:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
