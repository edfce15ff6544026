"""The `unfog` command: argument parsing only; the work is done by pipelines and training."""

from __future__ import annotations

import argparse
import hashlib
import sys
from importlib import resources
from pathlib import Path

DEFAULT_MODEL = "digits.safetensors"  # shipped in unfog/weights/


def default_model_path() -> Path:
    return Path(str(resources.files("unfog") / "weights" / DEFAULT_MODEL))


def _parse_classes(text: str) -> list[int]:
    """"0-9", "3", "1,4,7" -> class ids."""
    out: list[int] = []
    try:
        for part in text.split(","):
            lo, sep, hi = part.partition("-")
            out.extend(range(int(lo), int(hi) + 1) if sep else [int(lo)])
    except ValueError:
        raise argparse.ArgumentTypeError(f"classes must look like 0-9 or 1,4,7; got {text!r}") from None
    return out


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sampler", default="dpmpp_2m", help="sampler name, ours or A1111's ('DPM++ 2M Karras'); "
                   "see `unfog samplers`")
    p.add_argument("--steps", type=int, default=20, help="number of sampling steps (default 20)")
    p.add_argument("--spacing", default=None, help="sigma spacing: leading, linspace, trailing, karras, "
                   "exponential, sgm_uniform (default: the sampler name's, else leading)")
    p.add_argument("--cfg-scale", type=float, default=2.0, help="classifier-free guidance scale (default 2)")
    p.add_argument("--eta", type=float, default=None, help="noise scale of ancestral / SDE samplers")
    p.add_argument("--seed", type=int, default=0)


def cmd_sample(args: argparse.Namespace) -> None:
    from .pipelines.images import make_grid, save_png
    from .pipelines.pixel import PixelDiffusion

    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise FileExistsError(f"{out} already exists; pass --overwrite to replace it")
    model_path = Path(args.model) if args.model else default_model_path()
    pipe = PixelDiffusion.load(model_path)
    options = {} if args.eta is None else {"eta": args.eta}
    if pipe.info.num_classes:
        classes = args.classes if args.classes is not None else list(range(pipe.info.num_classes))
        labels = [c for c in classes for _ in range(args.per_class)]
        images = pipe.generate(labels, sampler=args.sampler, steps=args.steps, spacing=args.spacing,
                               cfg_scale=args.cfg_scale, seed=args.seed, **options)
        # one column per class, one row per draw
        images = images.view(len(classes), args.per_class, *images.shape[1:]).transpose(0, 1).flatten(0, 1)
        grid = make_grid(images, nrow=len(classes), scale=args.scale)
        what = f"classes {','.join(map(str, classes))} x {args.per_class}"
    else:
        images = pipe.generate(num_images=args.per_class, sampler=args.sampler, steps=args.steps,
                               spacing=args.spacing, seed=args.seed, **options)
        grid = make_grid(images, nrow=min(8, args.per_class), scale=args.scale)
        what = f"{args.per_class} images"
    digest = hashlib.sha256(model_path.read_bytes()).hexdigest()[:10]
    params = (f"{what}\nSteps: {args.steps}, Sampler: {args.sampler}, Spacing: {args.spacing or 'default'}, "
              f"CFG scale: {args.cfg_scale}, Seed: {args.seed}, Model: {model_path.name}, Model hash: {digest}")
    save_png(grid, out, params, overwrite=args.overwrite)
    print(f"wrote {out} ({what}, {args.sampler}, {args.steps} steps, seed {args.seed})")


def cmd_train(args: argparse.Namespace) -> None:
    from .training import load_config, train

    config = load_config(args.config, args.overrides)
    path = train(config, resume=args.resume, overwrite=args.overwrite, force=args.force, device=args.device)
    print(f"model written to {path}")


def cmd_samplers(args: argparse.Namespace) -> None:
    from .diffusion.registry import SAMPLERS, _ALIASES

    for name, fn in SAMPLERS.items():
        doc = (fn.__doc__ or "").strip().split("\n")[0]
        print(f"{name:20s} {doc}")
    print("\nalso accepted: " + ", ".join(sorted(_ALIASES)) + " (add ' Karras', ' Exponential' or ' SGM Uniform')")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="unfog", description="A readable, verified diffusion stack.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("sample", help="draw images from a pixel-space model (default: the built-in digits model)")
    p.add_argument("--model", default=None, help="model file (.safetensors); default: the built-in digits model")
    p.add_argument("--classes", type=_parse_classes, default=None, help="class ids, e.g. 0-9 or 3,5 (default: all)")
    p.add_argument("--per-class", type=int, default=8, help="images per class (default 8)")
    p.add_argument("--scale", type=int, default=4, help="upscale factor of the PNG grid (default 4)")
    p.add_argument("--out", default="samples.png", help="output PNG (default samples.png)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    _add_sampling_args(p)
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("train", help="train a model from a JSON config, e.g. configs/digits.json")
    p.add_argument("config", help="JSON config file")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. steps=2000 lr=1e-4")
    p.add_argument("--resume", action="store_true", help="continue the run in the config's out_dir")
    p.add_argument("--overwrite", action="store_true", help="start again, deleting the run's old states")
    p.add_argument("--force", action="store_true", help="resume even if the config changed")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("samplers", help="list the samplers and the names they are known by")
    p.set_defaults(func=cmd_samplers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "steps", 1) < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    if getattr(args, "per_class", 1) < 1:
        parser.error(f"--per-class must be >= 1, got {args.per_class}")
    try:
        args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, ImportError) as err:
        print(f"unfog: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
