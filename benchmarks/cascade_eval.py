"""A pixel-space cascade against the shipped latent model, and its upsampler alone.

Two parts, each printed as a markdown table:

- ``upsampler``: ``--fid-images`` held-out 64 px `shapes` images are brought down to the
  cascade's base size (area averaging) and back up, by bicubic interpolation and by the cascade's
  super-resolution stage (with each scene's caption, at the file's second-stage settings or at
  those ``--sr-settings`` name); FID of each against other held-out 64 px images, and what each
  kept of the true images (``fidelity``: PSNR, sharpness against the truth's, colour error of the
  low frequencies). The images are the same for all, so the differences are the upsamplers'.
- ``whole``: ``--per-category`` prompts of each analyzer category drawn by the cascade, by its
  base alone with bicubic upsampling, and by the latent models (``--latent``, default the embedded
  one) at their recommended settings, the same seeds: adherence per category and FID.

Every FID is in one feature space: the pooled posterior means of the shipped model's autoencoder
(``metrics.shapes_eval.vae_features``), whatever model drew the images, so the two models'
figures compare (the pixel models' own "autoencoder" is the identity and would give another).

    python benchmarks/cascade_eval.py --cascade cascade.safetensors
    python benchmarks/cascade_eval.py --cascade cascade.safetensors --parts upsampler --fid-images 1000
    python benchmarks/cascade_eval.py --cascade cascade.safetensors --parts upsampler --sr-settings "" cfg=1 aug=0
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import asdict

import torch
import torch.nn.functional as F

import unfog
from unfog.checkpoint.io import read_metadata
from unfog.datasets.shapes import ShapesDataset
from unfog.datasets.shapes_text import CATEGORIES
from unfog.embedded import DEFAULT_TEXT_MODEL, default_model_path
from unfog.metrics.fid import fid_from_features
from unfog.metrics.shapes_analyzer import score_batch
from unfog.metrics.shapes_eval import HELD_OUT_SEED, generate, prompt_set, vae_features
from unfog.pipelines.latent_model import load_autoencoder, recommended_settings
from unfog.pipelines.super_resolution import degrade
from machine import cpu_flags


def held_out(n: int, size: int, seed: int) -> tuple[torch.Tensor, list[str]]:
    data = ShapesDataset(n, size=size, seed=seed)
    items = [data[i] for i in range(n)]
    return torch.stack([it["image"] for it in items]), [it["caption"] for it in items]


def fidelity(images: torch.Tensor, truth: torch.Tensor) -> dict[str, float]:
    """What an upsampler kept of the true 64 px images, from the pixels alone: PSNR (dB, images in
    [-1, 1]); sharpness, the mean gradient magnitude (finite differences) against the truth's (1:
    as sharp; below, blurred; above, noise or ringing); and the colour error of the low
    frequencies, the mean absolute difference of 8 x 8-pixel area means, in 0-255 levels."""
    mse = (images - truth).square().mean().item()
    def gradient(x: torch.Tensor) -> float:
        return ((x[..., 1:, :] - x[..., :-1, :]).abs().mean() + (x[..., :, 1:] - x[..., :, :-1]).abs().mean()).item()
    colour = (F.avg_pool2d(images, 8) - F.avg_pool2d(truth, 8)).abs().mean().item() * 127.5
    return {"psnr": 10 * math.log10(4 / mse), "sharpness": gradient(images) / gradient(truth), "colour": colour}


def sr_options(text: str) -> dict:
    """ "cfg=2,aug=0.1" -> {"cfg_scale": 2.0, "noise_augmentation": 0.1}."""
    names = {"cfg": "cfg_scale", "aug": "noise_augmentation", "steps": "steps"}
    out = {}
    for part in filter(None, text.split(",")):
        key, _, value = part.partition("=")
        if key not in names:
            raise argparse.ArgumentTypeError(f"unknown setting {key!r} in {text!r}; valid: {', '.join(names)}")
        out[names[key]] = int(value) if key == "steps" else float(value)
    return out


@torch.no_grad()
def upsampler(cascade, features, reference: torch.Tensor, n: int, batch: int, variants: list[str]):
    """(method, FID, fidelity, seconds) for bicubic and the super-resolution stage (at the file's
    settings changed by each of ``variants``) on the same low-resolution images."""
    images, captions = held_out(n, cascade.super_resolution.default_size, HELD_OUT_SEED + 2)
    low = F.interpolate(images, size=(cascade.default_size,) * 2, mode="area")
    size = tuple(images.shape[-2:])
    rows = []
    start = time.perf_counter()
    bicubic = degrade(low, cascade.default_size, size)
    rows.append(("bicubic", fid_from_features(features(bicubic), reference), fidelity(bicubic, images),
                 time.perf_counter() - start))
    base = asdict(cascade.super_resolution_settings)
    for variant in variants:
        s = {**base, **sr_options(variant)}
        start = time.perf_counter()
        drawn = torch.cat([cascade.super_resolution(captions[i:i + batch], low_res_image=low[i:i + batch],
                                                    steps=s["steps"], sampler=s["sampler"], cfg_scale=s["cfg_scale"],
                                                    noise_augmentation=s["noise_augmentation"], seed=i,
                                                    output="tensor")
                           for i in range(0, n, batch)])
        name = f"diffusion, {s['steps']} steps, CFG {s['cfg_scale']:g}, noise augmentation {s['noise_augmentation']:g}"
        rows.append((name, fid_from_features(features(drawn), reference), fidelity(drawn, images),
                     time.perf_counter() - start))
    return rows


class BaseThenBicubic:
    """The cascade's first stage alone, brought to the second stage's size by bicubic interpolation:
    the same seeds give the same 32 px images the cascade upsamples, so beside the cascade's row it
    shows what the diffusion upsampler changes in adherence and FID."""

    def __init__(self, cascade):
        self.cascade = cascade

    def __call__(self, prompts, **options) -> torch.Tensor:
        stage, settings = self.cascade.super_resolution, self.cascade.super_resolution_settings
        self.cascade.attach_super_resolution(None)
        try:
            low = self.cascade(prompts, **options)
        finally:
            self.cascade.attach_super_resolution(stage, settings)
        size = (stage.default_size,) * 2
        return F.interpolate(low, size=size, mode="bicubic", align_corners=False).clamp(-1, 1)


@torch.no_grad()
def whole(pipes: dict, features, reference: torch.Tensor, per_category: int) -> list[tuple[str, dict, float, float]]:
    specs = prompt_set(per_category)
    rows = []
    for name, (pipe, settings) in pipes.items():
        start = time.perf_counter()
        images = generate(pipe, specs, **settings, progress=False)
        rows.append((name, score_batch(images, specs), fid_from_features(features(images), reference),
                     time.perf_counter() - start))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cascade", required=True, help="a cascade file (`unfog cascade`)")
    p.add_argument("--latent", nargs="+", default=None,
                   help="the latent models to compare with (default: the embedded one)")
    p.add_argument("--parts", nargs="+", default=["upsampler", "whole"], choices=["upsampler", "whole"])
    p.add_argument("--fid-images", type=int, default=500)
    p.add_argument("--sr-settings", nargs="+", default=[""], metavar="cfg=C,aug=A,steps=S",
                   help="upsampler part: the second stage's settings to run, each the file's own with these changed "
                   "(default: the file's alone)")
    p.add_argument("--per-category", type=int, default=50)
    p.add_argument("--batch", type=int, default=50)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    latent_paths = args.latent or [default_model_path(DEFAULT_TEXT_MODEL)]
    vae = load_autoencoder(default_model_path(DEFAULT_TEXT_MODEL))  # the one feature space of every FID
    def features(images: torch.Tensor) -> torch.Tensor:  # at 64 px, the latent model's size
        if images.shape[-1] != 64:
            images = F.interpolate(images, size=(64, 64), mode="bicubic", align_corners=False).clamp(-1, 1)
        return vae_features(vae, images)

    reference = features(held_out(args.fid_images, 64, HELD_OUT_SEED)[0])
    floor = fid_from_features(features(held_out(args.fid_images, 64, HELD_OUT_SEED + 1)[0]), reference)
    cascade = unfog.load(args.cascade, dtype="fp32")
    if cascade.super_resolution is None:
        raise SystemExit(f"{args.cascade} is not a cascade file (write one with `unfog cascade BASE SR -o FILE`)")
    print(f"CPU: {cpu_flags()}; torch threads {torch.get_num_threads()}; FID over {args.fid_images} images, "
          f"real-vs-real floor {floor:.2f}")
    if "upsampler" in args.parts:
        print(f"\n| {cascade.default_size} -> {cascade.super_resolution.default_size} px | FID | PSNR dB | sharpness "
              "| colour error | seconds |")
        print("|---|---|---|---|---|---|")
        for name, fid, f, seconds in upsampler(cascade, features, reference, args.fid_images, args.batch,
                                               args.sr_settings):
            print(f"| {name} | {fid:.2f} | {f['psnr']:.2f} | {f['sharpness']:.3f} | {f['colour']:.2f} | "
                  f"{seconds:.1f} |", flush=True)
    if "whole" in args.parts:
        base_defaults = (read_metadata(args.cascade) or {})["base"].get("defaults")  # the first stage's own
        base_settings = base_defaults or {"sampler": "dpmpp_2m", "steps": 20, "cfg_scale": 2.0}
        pipes = {"cascade": (cascade, base_settings),
                 "cascade's base, bicubic up": (BaseThenBicubic(cascade), base_settings)}
        for path in latent_paths:
            pipes[f"latent model {path}"] = (unfog.load(path, dtype="fp32"), recommended_settings(path))
        print("\n| model | " + " | ".join(CATEGORIES) + " | overall | FID | seconds |")
        print("|---" * (len(CATEGORIES) + 4) + "|")
        for name, adherence, fid, seconds in whole(pipes, features, reference, args.per_category):
            cells = " | ".join(f"{100 * adherence.get(c, float('nan')):.1f}" for c in (*CATEGORIES, "overall"))
            print(f"| {name} | {cells} | {fid:.2f} | {seconds:.0f} |", flush=True)


if __name__ == "__main__":
    main()
