"""`unfog eval` and `unfog eval-stats`: FID, KID, CLIP score and prompt adherence."""

from __future__ import annotations

import argparse
from pathlib import Path

from .options import device_name, finite_float, optional_path, warn


def cmd_eval(args: argparse.Namespace) -> None:
    from ..evaluation import EvalSettings, read_prompts, run_evaluation
    from ..evaluation.report import COLUMNS, value

    given = {"model": args.model, "prompts": read_prompts(args.prompts) if args.prompts else None,
             "prompts_source": args.prompts, "samplers": args.samplers, "steps": args.step_counts,
             "cfg_scales": args.cfg_scales, "metrics": args.metrics, "reference": args.reference,
             "features": args.features, "inception_weights": args.inception_weights, "clip_model": args.clip_model,
             "images": args.images, "domain": args.domain}
    settings = EvalSettings(out=Path(args.out), images_per_prompt=args.n, seed=args.seed, resize=args.resize,
                            device=args.device or _default_device(),
                            **{k: v for k, v in given.items() if v is not None})
    report = run_evaluation(settings, warn=warn)
    keys = [(k, title) for k, title, _ in COLUMNS if k in report["settings"]["metrics"]]
    print("cell".ljust(28) + "images".rjust(8) + "".join(title.rjust(14) for _, title in keys))
    for row in report["cells"]:
        figures = "".join(("" if (v := value(row, k)) is None else f"{v:.4g}").rjust(14) for k, _ in keys)
        print(row["cell"].ljust(28) + str(row["images"]).rjust(8) + figures)
    print(f"wrote {settings.out / 'report.md'} and {settings.out / 'report.json'}")


def cmd_eval_stats(args: argparse.Namespace) -> None:
    from ..evaluation import make_extractor, save_reference_statistics
    from ..evaluation.generation import load_model

    device = args.device or _default_device()
    model = load_model(Path(args.model), device) if args.features == "shapes-vae" and args.model else None
    extractor = make_extractor(args.features, args.resize, inception_weights=optional_path(args, "inception_weights"),
                               model=model, device=device)
    ref = save_reference_statistics(Path(args.images), Path(args.out), extractor, overwrite=args.overwrite)
    print(f"wrote {args.out}: {extractor.name} statistics ({extractor.dim}-d) of {ref.count} images of {args.images}")


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _add_eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="the model to evaluate: an unfog pixel or text-to-image model, or a "
                   "Stable Diffusion checkpoint (default: the built-in digits model)")
    p.add_argument("--prompts", default=None, metavar="FILE", help="prompts, one per line, # comments (default: the "
                   "model's classes 0-9 for the digits model, 24 canonical prompts for an unfog shapes model)")
    p.add_argument("--out", required=True, metavar="DIR", help="where images/, report.json, report.md and the plots "
                   "go; a run there resumes, drawing only missing images")
    p.add_argument("--n", type=int, default=10, help="images per prompt and cell (default 10)")
    p.add_argument("--samplers", nargs="+", default=None, help="sampler names (default: the model's; see "
                   "`unfog samplers`)")
    p.add_argument("--steps", dest="step_counts", nargs="+", type=int, default=None, help="step counts (default: "
                   "the model's, 20 for the digits model)")
    p.add_argument("--cfg-scales", nargs="+", type=finite_float, default=None, help="guidance scales (default: the "
                   "model's, 2 for the digits model)")
    p.add_argument("--metrics", nargs="+", default=None, help="any of fid kid clip adherence (default: fid kid "
                   "adherence)")
    p.add_argument("--reference", default=None, metavar="DIR|STATS.npz", help="real images for FID / KID: a folder, "
                   "or statistics from `unfog eval-stats` (FID only); default for the digits / shapes-vae features: "
                   "a built-in held-out set")
    p.add_argument("--domain", default=None, help="adherence domain: shapes or digits (default: the model's)")
    p.add_argument("--clip-model", default=None, metavar="PATH", help="a transformers CLIP model folder, for clip "
                   "(e.g. openai/clip-vit-large-patch14)")
    p.add_argument("--images", default=None, metavar="DIR", help="evaluate the images of this folder (or of each "
                   "subfolder) instead of generating; prompts from NAME.txt captions or the PNG parameters")
    p.add_argument("--seed", type=int, default=0, help="seed of image 0 of each cell; image k gets seed + k "
                   "(default 0)")


def _add_feature_args(p: argparse.ArgumentParser, default: str | None, default_text: str) -> None:
    p.add_argument("--features", default=default, help="FID / KID features: inception (needs --inception-weights), "
                   f"shapes-vae (an unfog text-to-image model's autoencoder), digits (default: {default_text})")
    p.add_argument("--inception-weights", default=None, metavar="FILE", help="pt_inception-2015-12-05-6726825d.pth, "
                   "for --features inception")
    p.add_argument("--resize", default="legacy", help="how images of another size than the feature network's are "
                   "resized: legacy (bilinear, pytorch-fid) or clean (antialiased bicubic, clean-fid); default legacy")
    p.add_argument("--device", type=device_name, default=None, help="cpu or cuda (default: cuda when available)")


def add_parsers(sub) -> None:
    """Adds `unfog eval` and `eval-stats`."""
    p = sub.add_parser("eval", help="evaluate a model over samplers, steps and guidance scales: FID, KID, CLIP "
                       "score, prompt adherence; writes report.json, report.md and plots")
    _add_eval_args(p)
    _add_feature_args(p, None, "the one that fits the model: digits, shapes-vae, or inception for checkpoints")
    p.set_defaults(func=cmd_eval)
    p = sub.add_parser("eval-stats", help="save the FID reference statistics of a folder of images (.npz)")
    p.add_argument("--images", required=True, metavar="DIR", help="the real images (subfolders too)")
    p.add_argument("--out", required=True, metavar="STATS.npz", help="the statistics file to write")
    p.add_argument("--model", default=None, help="the unfog text-to-image model, for --features shapes-vae")
    p.add_argument("--overwrite", action="store_true", help="replace an existing statistics file")
    _add_feature_args(p, "inception", "inception")
    p.set_defaults(func=cmd_eval_stats)
