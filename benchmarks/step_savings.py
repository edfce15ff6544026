"""What the opt-in savings of U-Net work cost in quality, on the embedded `shapes` model.

Each setting (``--settings``: "off", or pipeline options such as ``cfg_truncation=0.5``, several
joined by ","; ``deep_cache=3``) draws the same prompts with the same seeds at the model's
recommended sampler, steps and guidance: ``--per-category`` prompts of each of the six analyzer
categories. Printed per setting: the analyzer's accuracy per category and overall, its change
against "off" with the standard error of that paired difference (same prompts, same seeds), FID
against held-out images (our VAE features), the U-Net's work (sample rows it evaluated, counted by
a forward hook: independent of the machine), the wall time of the drawing (decoding included)
and the speed-up against "off".

``--sd15``: instead, SD 1.5's U-Net, VAE and text encoder with random weights in the official layout
(``benchmarks/txt2img.py``'s, at the dtype ``--dtype auto`` picks here), one 512 x 512 image of 20
DPM++ 2M Karras steps at CFG 7.5 per setting from the same latents: the time of each against "off"
and the pixel deviation from off's image (mean and largest absolute difference in 8-bit levels,
PSNR). Random weights draw no picture, so the deviation is the measure there, not adherence.

    python benchmarks/step_savings.py
    python benchmarks/step_savings.py --per-category 100 --settings off cfg_truncation=0.5 deep_cache=3
    python benchmarks/step_savings.py --sd15 --settings off deep_cache=3 token_merging=0.5
    python benchmarks/step_savings.py --sd15 --quick     # tiny models at 64 px: checks the script
"""

from __future__ import annotations

import argparse
import ast
import time

import numpy as np
import torch

import unfog
from unfog.datasets.shapes_text import CATEGORIES
from unfog.embedded import DEFAULT_TEXT_MODEL, default_model_path
from unfog.metrics.shapes_analyzer import score
from unfog.metrics.fid import fid_from_features
from unfog.metrics.shapes_eval import generate, prompt_set, reference_features, vae_features
from unfog.pipelines.latent_model import recommended_settings
from unfog.pipelines.precision import auto_dtype
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


def sd15_deviation(settings: dict[str, dict], quick: bool, threads: int) -> None:
    """Time and pixel deviation from "off" of each setting on random SD 1.5 weights."""
    import txt2img

    setup = txt2img.QUICK if quick else txt2img.FULL
    dtype = auto_dtype("cpu")
    pipe, states = txt2img.build_unfog(setup, dtype)
    del states
    latents = torch.randn(1, 4, setup.latent_side, setup.latent_side, generator=torch.Generator().manual_seed(0))
    common = dict(steps=setup.steps, sampler="dpmpp_2m", spacing="karras", cfg_scale=7.5, latents=latents.to(dtype),
                  output="tensor")
    print(f"{'tiny models, 64 px' if quick else 'SD 1.5, random weights, 512 px'}, {setup.steps} steps of DPM++ 2M "
          f"Karras, CFG 7.5; {dtype}; torch {torch.__version__}, {threads} threads; CPU: {cpu_flags()}\n")
    print("| setting | time s | speed-up | mean abs. deviation (8-bit levels) | largest | PSNR dB |")
    print("|---|---|---|---|---|---|")
    base = None
    with torch.inference_mode():
        pipe(txt2img.PROMPT, txt2img.NEGATIVE, **{**common, "steps": 2})  # warm-up: first-call allocations
        for text, options in settings.items():
            start = time.perf_counter()
            image = pipe(txt2img.PROMPT, txt2img.NEGATIVE, **common, **options).float()
            seconds = time.perf_counter() - start
            levels = (image.clamp(-1, 1) + 1) * 127.5
            if base is None:
                base = (levels, seconds)
            diff = (levels - base[0]).abs()
            mse = float((diff**2).mean())
            psnr = "inf" if mse == 0 else f"{10 * np.log10(255**2 / mse):.1f}"
            print(f"| {text} | {seconds:.1f} | {base[1] / seconds:.2f}x | {float(diff.mean()):.2f} | "
                  f"{float(diff.max()):.0f} | {psnr} |", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=str(default_model_path(DEFAULT_TEXT_MODEL)))
    p.add_argument("--per-category", type=int, default=50)
    p.add_argument("--settings", nargs="+", default=DEFAULT_SETTINGS)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--sd15", action="store_true", help="time and pixel deviation on random SD 1.5 weights instead")
    p.add_argument("--quick", action="store_true", help="with --sd15: tiny models at 64 px, checks the script")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    settings = {text: parse_setting(text) for text in args.settings}
    if "off" not in args.settings[:1]:
        raise SystemExit("the first setting must be 'off': the others are measured against it")
    if args.sd15:
        return sd15_deviation(settings, args.quick, args.threads)
    pipe = unfog.load(args.model)
    rec = recommended_settings(args.model)
    specs = prompt_set(args.per_category)
    ref, floor = reference_features(pipe.vae, len(specs), pipe.default_size)
    rows = [0]
    pipe.unet.register_forward_pre_hook(lambda module, inputs: rows.__setitem__(0, rows[0] + inputs[0].shape[0]))
    print(f"shapes model {args.model}; {rec}; {len(specs)} prompts ({args.per_category} per category); FID "
          f"real-vs-real floor {floor:.2f}; torch {torch.__version__}, {args.threads} threads; CPU: {cpu_flags()}\n")
    columns = (*CATEGORIES, "overall")
    print("| setting | " + " | ".join(columns) + " | change ± SE | FID | U-Net rows | time s | speed-up |")
    print("|---" * (len(columns) + 6) + "|")
    base = None
    for text, options in settings.items():
        generate(pipe, specs[:2], **rec, progress=False, **options)  # warm-up (and checks the options)
        rows[0] = 0
        start = time.perf_counter()
        images = generate(pipe, specs, **rec, seed=0, progress=False, **options)
        seconds = time.perf_counter() - start
        hits = np.array([bool(score(image, spec)) for image, spec in zip(images, specs)], dtype=float)
        adherence = {c: float(np.mean([h for h, spec in zip(hits, specs) if spec.category == c])) for c in CATEGORIES}
        adherence["overall"] = float(np.mean([adherence[c] for c in CATEGORIES]))
        fid = fid_from_features(vae_features(pipe.vae, images), ref)
        if base is None:
            base = (adherence["overall"], rows[0], seconds, hits)
        # Equal prompts per category, so "overall" is the mean over prompts: its change against "off"
        # is the mean of the paired per-prompt differences, whose standard error is printed beside it.
        se = np.std(hits - base[3], ddof=1) / np.sqrt(len(hits)) if len(hits) > 1 else 0.0
        cells = " | ".join(f"{100 * adherence[c]:.1f}" for c in columns)
        print(f"| {text} | {cells} | {100 * (adherence['overall'] - base[0]):+.1f} ± {100 * se:.1f} | {fid:.2f} | "
              f"{rows[0] / base[1]:.2f} | {seconds:.1f} | {base[2] / seconds:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
