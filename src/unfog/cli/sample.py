"""`unfog sample`: class grids from a pixel-space model or a class-conditional DiT."""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

from ..embedded import default_model_path
from .options import ModelDefault, finite_float


def _parse_classes(text: str) -> list[int]:
    """"0-9", "3", "1,4,7" -> class ids."""
    out: list[int] = []
    try:
        for part in text.split(","):
            lo, sep, hi = part.partition("-")
            if sep and int(hi) < int(lo):
                raise argparse.ArgumentTypeError(f"classes {part!r} is a reversed range; write {hi}-{lo}")
            out.extend(range(int(lo), int(hi) + 1) if sep else [int(lo)])
    except ValueError:
        raise argparse.ArgumentTypeError(f"classes must look like 0-9 or 1,4,7; got {text!r}") from None
    return out


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    """The options of `unfog sample`; sampler, steps and guidance default to the model's own."""
    p.add_argument("--sampler", default=None, help="sampler name, ours or A1111's ('DPM++ 2M Karras') (default: "
                   "%(model_default)s); see `unfog samplers`").model_default = ModelDefault("sampler", pixel=True)
    p.add_argument("--steps", type=int, default=None, help="number of sampling steps (default: %(model_default)s)"
                   ).model_default = ModelDefault("steps", pixel=True)
    p.add_argument("--spacing", default=None, help="sigma spacing: leading, linspace, trailing, karras, "
                   "exponential, sgm_uniform (default: the sampler name's, else leading)")
    p.add_argument("--cfg-scale", type=finite_float, default=None, help="classifier-free guidance scale (default: "
                   "%(model_default)s)").model_default = ModelDefault("cfg_scale", pixel=True)
    p.add_argument("--eta", type=finite_float, default=None, help="noise scale of ancestral / SDE samplers")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0; -1: a random one, recorded)")


def cmd_sample(args: argparse.Namespace) -> None:
    from ..pipelines.images import make_grid, save_png
    from ..pipelines.outputs import StepProgress, check_seed, draw_seed

    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise FileExistsError(f"{out} already exists; pass --overwrite to replace it")
    check_seed(args.seed)
    args.seed = draw_seed(args.seed)
    model_path = Path(args.model) if args.model else default_model_path()
    draw, defaults, num_classes = _class_sampler(model_path, args.vae)
    typed = {k: getattr(args, k) for k in defaults if getattr(args, k) is not None}
    chosen = {**defaults, **typed}  # the options typed win over the model's recommended settings
    args.sampler, args.steps, args.cfg_scale = chosen["sampler"], chosen["steps"], chosen["cfg_scale"]
    options = {"sampler": args.sampler, "steps": args.steps, "spacing": args.spacing, "seed": args.seed,
               **({} if args.eta is None else {"eta": args.eta})}
    if num_classes:
        classes = args.classes if args.classes is not None else list(range(min(num_classes, 10)))
        labels = [c for c in classes for _ in range(args.per_class)]
        with StepProgress(args.steps, f"{len(labels)} images") as bar:
            images = draw(labels, cfg_scale=args.cfg_scale, callback=bar.callback, **options)
        # one column per class, one row per draw
        images = images.view(len(classes), args.per_class, *images.shape[1:]).transpose(0, 1).flatten(0, 1)
        grid = make_grid(images, nrow=len(classes), scale=args.scale)
        what = f"classes {','.join(map(str, classes))} x {args.per_class}"
    else:
        with StepProgress(args.steps, f"{args.per_class} images") as bar:
            images = draw(None, num_images=args.per_class, callback=bar.callback, **options)
        grid = make_grid(images, nrow=min(8, args.per_class), scale=args.scale)
        what = f"{args.per_class} images"
    digest = hashlib.sha256(model_path.read_bytes()).hexdigest()[:10] if model_path.is_file() else "folder"
    params = (f"{what}\nSteps: {args.steps}, Sampler: {args.sampler}, Spacing: {args.spacing or 'default'}, "
              f"CFG scale: {args.cfg_scale}, Seed: {args.seed}, Model: {model_path.name}, Model hash: {digest}"
              + (f", VAE: {Path(args.vae).name}" if args.vae else ""))
    save_png(grid, out, params, overwrite=args.overwrite)
    print(f"wrote {out} ({what}, {args.sampler}, {args.steps} steps, seed {args.seed})")


def _class_sampler(model_path: Path, vae: str | None):
    """(draw(labels, **settings) -> images (B, C, H, W) in [-1, 1], the model's default settings,
    its number of classes) for an unfog pixel model, or a DiT file with the VAE it decodes with."""
    from ..pipelines.pixel import PixelDiffusion, is_pixel_model

    if not model_path.exists():
        raise FileNotFoundError(f"model file not found: {model_path}")
    if model_path.is_file() and is_pixel_model(model_path):
        if vae is not None:
            raise ValueError(f"{model_path} is a pixel-space model: it takes no --vae")
        pipe = PixelDiffusion.load(model_path)
        return (lambda labels, **kw: pipe.generate(labels, **kw)), pipe.defaults, pipe.info.num_classes
    from ..pipelines.dit import SAMPLING_DEFAULTS, ClassConditionalDiT

    if vae is None:
        raise ValueError(f"{model_path} is not an unfog pixel model; `unfog sample` reads it as a class-conditional "
                         "DiT (facebookresearch/DiT or diffusers), which draws latents: give --vae, the VAE it was "
                         "trained with (sd-vae-ft-ema or sd-vae-ft-mse for the official DiT models)")
    pipe = ClassConditionalDiT.load(model_path, vae=vae)
    return ((lambda labels, **kw: pipe(labels, output="tensor", **kw)), dict(SAMPLING_DEFAULTS),
            pipe.dit.config.num_classes)


def add_parsers(sub) -> None:
    """Adds `unfog sample` to the subcommands."""
    p = sub.add_parser("sample", help="draw class grids from a pixel-space model (default: the built-in digits "
                       "model) or a class-conditional DiT (with --vae)")
    p.add_argument("--model", default=None, help="model file: an unfog pixel model (.safetensors), or a DiT "
                   "(facebookresearch/DiT .pt, a diffusers DiT transformer folder or file); default: the built-in "
                   "digits model")
    p.add_argument("--vae", default=None, help="a DiT's VAE (e.g. sd-vae-ft-ema: a VAE file, a diffusers "
                   "AutoencoderKL folder or a checkpoint holding one)")
    p.add_argument("--classes", type=_parse_classes, default=None, help="class ids, e.g. 0-9 or 3,5 (default: the "
                   "first 10)")
    p.add_argument("--per-class", type=int, default=8, help="images per class (default 8)")
    p.add_argument("--scale", type=int, default=4, help="upscale factor of the PNG grid, >= 1 (default 4)")
    p.add_argument("--out", default="samples.png", help="output PNG (default samples.png)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    _add_sampling_args(p)
    p.set_defaults(func=cmd_sample)
