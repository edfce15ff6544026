"""The `unfog` command: argument parsing only; the work is done by pipelines and training."""

from __future__ import annotations

import argparse
import hashlib
import math
import re
import sys
import textwrap
from pathlib import Path

from .embedded import DEFAULT_MODEL, DEFAULT_TEXT_MODEL, default_model_path  # noqa: F401 (re-exported)

DTYPE_CHOICES = ("auto", "fp32", "bf16", "fp16")  # pipelines.precision.DTYPE_NAMES, without importing torch here


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


def repaint_pair(text: str) -> tuple[int, int]:
    """ "10x10" -> (10, 10) for --repaint."""
    from .pipelines.outputs import parse_repaint

    try:
        return parse_repaint(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def finite_float(text: str) -> float:
    """The argparse type of every float option: a finite number (nan and inf are refused)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def device_name(text: str) -> str:
    """The argparse type of every --device option: a device this torch can run on."""
    from .pipelines.precision import resolve_device

    try:
        return resolve_device(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    """The options of `unfog sample`; sampler, steps and guidance default to the model's own."""
    p.add_argument("--sampler", default=None, help="sampler name, ours or A1111's ('DPM++ 2M Karras') (default: "
                   "%(model_default)s); see `unfog samplers`").model_default = _ModelDefault("sampler", pixel=True)
    p.add_argument("--steps", type=int, default=None, help="number of sampling steps (default: %(model_default)s)"
                   ).model_default = _ModelDefault("steps", pixel=True)
    p.add_argument("--spacing", default=None, help="sigma spacing: leading, linspace, trailing, karras, "
                   "exponential, sgm_uniform (default: the sampler name's, else leading)")
    p.add_argument("--cfg-scale", type=finite_float, default=None, help="classifier-free guidance scale (default: "
                   "%(model_default)s)").model_default = _ModelDefault("cfg_scale", pixel=True)
    p.add_argument("--eta", type=finite_float, default=None, help="noise scale of ancestral / SDE samplers")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0; -1: a random one, recorded)")


def cmd_sample(args: argparse.Namespace) -> None:
    from .pipelines.images import make_grid, save_png
    from .pipelines.outputs import StepProgress, check_seed, draw_seed

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
    from .pipelines.pixel import PixelDiffusion, is_pixel_model

    if not model_path.exists():
        raise FileNotFoundError(f"model file not found: {model_path}")
    if model_path.is_file() and is_pixel_model(model_path):
        if vae is not None:
            raise ValueError(f"{model_path} is a pixel-space model: it takes no --vae")
        pipe = PixelDiffusion.load(model_path)
        return (lambda labels, **kw: pipe.generate(labels, **kw)), pipe.defaults, pipe.info.num_classes
    from .pipelines.dit import SAMPLING_DEFAULTS, ClassConditionalDiT

    if vae is None:
        raise ValueError(f"{model_path} is not an unfog pixel model; `unfog sample` reads it as a class-conditional "
                         "DiT (facebookresearch/DiT or diffusers), which draws latents: give --vae, the VAE it was "
                         "trained with (sd-vae-ft-ema or sd-vae-ft-mse for the official DiT models)")
    pipe = ClassConditionalDiT.load(model_path, vae=vae)
    return ((lambda labels, **kw: pipe(labels, output="tensor", **kw)), dict(SAMPLING_DEFAULTS),
            pipe.dit.config.num_classes)


# Options of the image commands that are generation settings (``pipelines.outputs.Settings``).
SETTINGS_OPTIONS = {"prompt": "prompt", "negative": "negative_prompt", "steps": "steps", "sampler": "sampler",
                    "spacing": "spacing", "cfg_scale": "cfg_scale", "seed": "seed", "width": "width",
                    "height": "height", "clip_skip": "clip_skip", "strength": "strength",
                    "refiner_start": "refiner_start", "masked_content": "masked_content", "mask_blur": "mask_blur",
                    "only_masked": "only_masked", "mask_padding": "mask_padding", "hires": "hires",
                    "hires_scale": "hr_scale", "hires_upscaler": "hr_upscaler", "hires_steps": "hr_steps",
                    "hires_sampler": "hr_sampler", "hires_prompt": "hr_prompt", "hires_negative": "hr_negative_prompt",
                    "cfg_truncation": "cfg_truncation", "deep_cache": "deep_cache",
                    "deep_cache_branch": "deep_cache_branch", "token_merging": "token_merging", "repaint": "repaint"}


def _add_savings_args(p: argparse.ArgumentParser) -> None:
    """The opt-in savings of U-Net work (docs/generate.md; their cost: docs/benchmarks.md)."""
    p.add_argument("--cfg-truncation", type=finite_float, default=None, metavar="F", help="guide only the first "
                   "fraction F of the steps; the rest run the conditional pass alone, 2x cheaper (default 1: all)")
    p.add_argument("--deep-cache", type=int, default=None, metavar="N", help="DeepCache: the whole U-Net every N-th "
                   "step, its outer blocks alone in between (default 1: always the whole)")
    p.add_argument("--deep-cache-branch", type=int, default=None, metavar="B", help="DeepCache's skip level: the "
                   "steps in between run the U-Net's first B+1 input blocks and last B+1 output blocks (default 0)")
    p.add_argument("--token-merging", type=finite_float, default=None, metavar="R", help="ToMe: merge a fraction R "
                   "of the tokens before the top level's self-attention (A1111's token merging ratio; default 0: off)")


def _add_compile_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--compile", nargs="?", const="auto", default="off", choices=("off", "auto", "strict"),
                   help="torch.compile the U-Net and VAE decoder (CUDA graphs on CUDA); --compile falls back to "
                   "eager with a warning where it cannot compile, --compile strict stops instead (default off)")


def _warn(message: str) -> None:
    print(f"unfog: warning: {message}", file=sys.stderr)


def cmd_generate(args: argparse.Namespace) -> None:
    """generate, img2img and inpaint: the options typed override those of --from IMAGE.png."""
    from .pipelines.control_units import parse_control
    from .jobs import Job, resolve_settings, run

    given = {field: getattr(args, option) for option, field in SETTINGS_OPTIONS.items() if hasattr(args, option)}
    if getattr(args, "hires_resize", None) is not None:
        given["hr_resize_x"], given["hr_resize_y"] = args.hires_resize
    model = Path(args.model) if args.model else default_model_path(DEFAULT_TEXT_MODEL)
    settings, source = resolve_settings(args.mode, given, args.from_png, _warn, model=model)
    job = Job(args.mode, settings, model, init=_path(args, "init"), mask=_path(args, "mask"),
              refiner=_path(args, "refiner"), family=args.family, prediction=args.prediction, dtype=args.dtype,
              compile=args.compile, device=args.device, batch_size=args.batch_size, output=args.output, overwrite=args.overwrite,
              source=source, lora_dirs=tuple(Path(d) for d in args.lora_dir),
              embedding_dirs=tuple(Path(d) for d in args.embeddings_dir),
              hypernetwork_dirs=tuple(Path(d) for d in args.hypernetwork_dir),
              controls=tuple(parse_control(c) for c in args.control), control_mode=args.control_mode,
              control_resize=args.control_resize, controlnet_dirs=tuple(Path(d) for d in args.controlnet_dir),
              hints=tuple(Path(h) for h in args.hint), preprocess=tuple(args.preprocess), vae=_path(args, "vae"))
    for path in run(job, warn=_warn):
        print(f"wrote {path}")


def _parse_size(text: str) -> tuple[int, int]:
    """'1024x768' -> (1024, 768); a side may be 0."""
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise argparse.ArgumentTypeError(f"{text!r} is not WIDTHxHEIGHT (e.g. 1024x768, or 1024x0)")
    return int(parts[0]), int(parts[1])


def _path(args: argparse.Namespace, name: str) -> Path | None:
    value = getattr(args, name, None)
    return None if value is None else Path(value)


def cmd_serve(args: argparse.Namespace) -> None:
    from .server import parse_auth, serve
    from .server.app import Limits, ServerConfig
    from .server.library import Library

    model = Path(args.model) if args.model else default_model_path(DEFAULT_TEXT_MODEL)
    if not model.exists():
        raise FileNotFoundError(f"model not found: {model}")
    library = Library(model, args.models_dir, args.lora_dir, args.embeddings_dir, args.hypernetwork_dir,
                      args.vae_dir, args.controlnet_dir)
    origins = tuple(o.strip() for o in (args.cors_allow_origins or "").split(",") if o.strip())
    flags = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
             if k not in ("func", "api_auth", "command")}
    config = ServerConfig(library, dtype=args.dtype, device=args.device, compile=args.compile,
                          limits=Limits(args.max_size, args.max_steps, args.max_batch), auth=parse_auth(args.api_auth),
                          cors_origins=origins, cors_origin_regex=args.cors_allow_origins_regex,
                          outdir=Path(args.outdir), flags=flags)
    serve(config, "0.0.0.0" if args.listen else args.host, args.port)


def cmd_info(args: argparse.Namespace) -> None:
    from .pipelines.images import read_parameters

    text = read_parameters(args.image)
    if text is None:
        raise ValueError(f"{args.image} carries no generation parameters (no 'parameters' text chunk)")
    print(text)


# `unfog preprocess` options -> the preprocessors' keyword arguments (each passed only when typed).
PREPROCESS_OPTIONS = ("low", "high", "sigma", "l2_gradient", "threshold", "seed", "cell", "rate")


def cmd_preprocess(args: argparse.Namespace) -> None:
    from .pipelines.images import open_image, save_png
    from .pipelines.preprocess import preprocess

    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise FileExistsError(f"{out} already exists; pass --overwrite to replace it")
    if Path(args.image).is_dir():
        raise ValueError(f"{args.image} is a folder; give an image file")
    if not Path(args.image).is_file():
        raise FileNotFoundError(f"image not found: {args.image}")
    options = {k: getattr(args, k) for k in PREPROCESS_OPTIONS if getattr(args, k) is not None}
    hint = preprocess(args.name, open_image(args.image), **options)
    save_png(hint, out, overwrite=args.overwrite)
    print(f"wrote {out} ({args.name}, {hint.width} x {hint.height})")


def cmd_lora_info(args: argparse.Namespace) -> None:
    from .pipelines.lora import describe_lora

    print(describe_lora(args.file))


def cmd_lora_extract(args: argparse.Namespace) -> None:
    from .pipelines.lora_extract import extract_lora_file

    result = extract_lora_file(args.base, args.tuned, args.out, rank=args.rank, conv_rank=args.conv_rank,
                               text_encoder=args.text_encoder, overwrite=args.overwrite, device=args.device)
    for m in result.modules:
        print(f"{m.key}  rank {m.rank}  relative error {m.relative_error:.3g}")
    errors = [m.relative_error for m in result.modules]
    print(f"{len(result.modules)} modules extracted (relative error mean {sum(errors) / len(errors):.3g}, max "
          f"{max(errors):.3g}), {result.unchanged} unchanged")
    if result.left_out:
        _warn(f"{len(result.left_out)} changed tensors a LoRA cannot hold are left out, e.g. "
              f"{', '.join(result.left_out[:3])}" + ("" if args.conv_rank else " (--conv-rank adds the convs)"))
    print(f"wrote {args.out}")


def cmd_train(args: argparse.Namespace) -> None:
    from .training import load_config, train

    config = load_config(args.config, args.overrides)
    path = train(config, resume=args.resume, overwrite=args.overwrite, force=args.force, init_from=args.init_from,
                 device=args.device)
    print(f"model written to {path}")


def cmd_samplers(args: argparse.Namespace) -> None:
    from .diffusion.registry import SAMPLERS, valid_names

    for name, fn in SAMPLERS.items():
        print(textwrap.fill(sampler_summary(fn), width=100, initial_indent=f"{name:20s} ", subsequent_indent=" " * 21))
    print("\nalso accepted: " + ", ".join(n for n in valid_names() if n not in SAMPLERS) + " (add ' Karras', ' Exponential' or ' SGM Uniform')")


# A sentence ends at ".", "!" or "?" before a capital letter, or at the end of the paragraph; not
# after an abbreviation ("et al. 2022", "e.g. Karras").
_SENTENCE_END = re.compile(r"(?<!\bal)(?<!\bapp)(?<!\be\.g)(?<!\bi\.e)[.!?](?=\s+[A-Z(]|$)")


def sampler_summary(fn) -> str:
    """The first sentence of a sampler's docstring, on one line (its first line alone can stop mid-sentence)."""
    paragraph = " ".join((fn.__doc__ or "").strip().split("\n\n")[0].split())
    end = _SENTENCE_END.search(paragraph)
    return paragraph if end is None else paragraph[: end.end()]


def cmd_eval(args: argparse.Namespace) -> None:
    from .evaluation import EvalSettings, read_prompts, run_evaluation
    from .evaluation.report import COLUMNS, value

    given = {"model": args.model, "prompts": read_prompts(args.prompts) if args.prompts else None,
             "prompts_source": args.prompts, "samplers": args.samplers, "steps": args.step_counts,
             "cfg_scales": args.cfg_scales, "metrics": args.metrics, "reference": args.reference,
             "features": args.features, "inception_weights": args.inception_weights, "clip_model": args.clip_model,
             "images": args.images, "domain": args.domain}
    settings = EvalSettings(out=Path(args.out), images_per_prompt=args.n, seed=args.seed, resize=args.resize,
                            device=args.device or _default_device(),
                            **{k: v for k, v in given.items() if v is not None})
    report = run_evaluation(settings, warn=_warn)
    keys = [(k, title) for k, title, _ in COLUMNS if k in report["settings"]["metrics"]]
    print("cell".ljust(28) + "images".rjust(8) + "".join(title.rjust(14) for _, title in keys))
    for row in report["cells"]:
        figures = "".join(("" if (v := value(row, k)) is None else f"{v:.4g}").rjust(14) for k, _ in keys)
        print(row["cell"].ljust(28) + str(row["images"]).rjust(8) + figures)
    print(f"wrote {settings.out / 'report.md'} and {settings.out / 'report.json'}")


def cmd_eval_stats(args: argparse.Namespace) -> None:
    from .evaluation import make_extractor, save_reference_statistics
    from .evaluation.generation import load_model

    device = args.device or _default_device()
    model = load_model(Path(args.model), device) if args.features == "shapes-vae" and args.model else None
    extractor = make_extractor(args.features, args.resize, inception_weights=_path(args, "inception_weights"),
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


class _ModelDefault:
    """A setting's default in ``generate --help`` (``pixel``: ``sample --help``): the built-in model's
    recommended value, and the one of model files that recommend none; read from the model file
    only when the help is shown."""

    def __init__(self, field: str, pixel: bool = False):
        self.field, self.pixel = field, pixel

    def __str__(self) -> str:
        from .pipelines import latent_model, pixel
        from .pipelines.outputs import Settings, sampler_name

        if self.pixel:
            own = pixel.recommended_settings(default_model_path(DEFAULT_MODEL)).get(self.field)
            other = pixel.SAMPLING_DEFAULTS[self.field]
        else:
            own = latent_model.recommended_settings(default_model_path(DEFAULT_TEXT_MODEL)).get(self.field)
            other = getattr(Settings(), self.field)
        if self.field == "sampler":
            own, other = own and f"{sampler_name(own)!r}", f"{sampler_name(other) if self.pixel else other!r}"
        else:
            own, other = own and f"{own:g}", f"{other:g}"
        return other if own is None else f"{own} for the built-in model, else the model file's or {other}"


def _add_image_args(p: argparse.ArgumentParser, mode: str) -> None:
    """The options of generate / img2img / inpaint. Settings default to None: the value of --from
    IMAGE.png, else the default of ``pipelines.outputs.Settings`` / the model."""
    p.set_defaults(func=cmd_generate, mode=mode)
    p.add_argument("prompt", nargs="?", default=None, help="the prompt (A1111 syntax: (word:1.2), BREAK); "
                   "optional with --from")
    p.add_argument("--model", default=None, help="checkpoint: a .safetensors / .ckpt file or a diffusers folder "
                   "(default: the built-in shapes model, 64 x 64, trained by unfog on the `shapes` data set)")
    p.add_argument("--negative", default=None, help="negative prompt")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: %(model_default)s)"
                   ).model_default = _ModelDefault("steps")
    p.add_argument("--sampler", default=None, help="sampler, ours or A1111's (default: %(model_default)s); see "
                   "`unfog samplers`").model_default = _ModelDefault("sampler")
    p.add_argument("--spacing", default=None, help="sigma spacing: leading, linspace, trailing, karras, exponential, "
                   "sgm_uniform (default: the sampler name's, else the model's: leading for the built-in model)")
    p.add_argument("--cfg-scale", type=finite_float, default=None, help="classifier-free guidance scale (default: "
                   "%(model_default)s)").model_default = _ModelDefault("cfg_scale")
    _add_savings_args(p)
    p.add_argument("--seed", type=int, default=None, help="random seed (default -1: a random one, recorded)")
    p.add_argument("--width", type=int, default=None, help="image width, a multiple of 8 (default: the model's "
                   "size, or the init image's)")
    p.add_argument("--height", type=int, default=None, help="image height, a multiple of 8")
    p.add_argument("--batch-size", type=int, default=1, help="images to draw, with seeds seed, seed+1, ... (default 1)")
    p.add_argument("--clip-skip", type=int, default=None, help="read the text encoder's N-th layer from the end "
                   "(A1111's CLIP skip; default: the model family's, 1 for SD 1.x, 2 for SD 2.x / SDXL)")
    p.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES, help="model precision (default auto: bf16 on a "
                   "CPU where it is faster than fp32, fp16 on CUDA, else fp32)")
    _add_compile_arg(p)
    p.add_argument("--device", type=device_name, default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--family", default=None, help="checkpoint family (SD15, SD2, SDXL_BASE, ...), only where the "
                   "weights cannot tell")
    p.add_argument("--prediction", default=None, choices=("eps", "v", "x0"), help="what the U-Net predicts, "
                   "overriding the family's (SD 2.x 512-base files: eps)")
    p.add_argument("--output", default=None, help="a .png file, or a folder for numbered files (default ./outputs/)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output file")
    p.add_argument("--from", dest="from_png", default=None, metavar="IMAGE.png",
                   help="take the prompt and settings from a PNG's parameters (the model still comes from --model)")
    p.add_argument("--vae", default=None, metavar="FILE", help="encode and decode with this VAE instead of the "
                   "model's own (A1111's SD VAE): a VAE file, a checkpoint, a diffusers AutoencoderKL folder or an "
                   "unfog autoencoder; recorded as 'VAE' and 'VAE hash'")
    p.add_argument("--lora-dir", action="append", default=[], metavar="DIR",
                   help="a folder of LoRA files for the prompt's <lora:NAME:WEIGHT> tags (repeat for several)")
    p.add_argument("--embeddings-dir", action="append", default=[], metavar="DIR",
                   help="a folder of textual-inversion embeddings: those whose file names the prompt uses as "
                   "words are loaded (repeat for several)")
    p.add_argument("--hypernetwork-dir", action="append", default=[], metavar="DIR",
                   help="a folder of hypernetwork files (.pt, .safetensors) for the prompt's <hypernet:NAME:WEIGHT> "
                        "tags (repeat for several)")
    p.add_argument("--control", action="append", default=[], metavar="MODEL:IMAGE[:WEIGHT[:START:END]]",
                   help="a ControlNet unit (repeat for several, their residuals summed): MODEL a file, diffusers "
                   "folder or a name in --controlnet-dir, IMAGE the hint, WEIGHT (default 1), START / END the "
                   "fractions of the steps it acts on (default 0 and 1); see docs/controlnet.md for ':' in paths")
    p.add_argument("--control-mode", default="balanced", choices=("balanced", "prompt", "controlnet"),
                   help="balanced, prompt (A1111's 'My prompt is more important') or controlnet ('ControlNet is "
                   "more important', guess mode) (default balanced)")
    p.add_argument("--control-resize", default="just_resize", choices=("just_resize", "crop_and_resize",
                   "resize_and_fill"), help="how a hint of another size is fitted (default just_resize)")
    p.add_argument("--controlnet-dir", action="append", default=[], metavar="DIR",
                   help="a folder of ControlNet files, to name them in --control and for --from (repeat for several)")
    p.add_argument("--preprocess", action="append", default=[], metavar="NAME",
                   help="turn the --control image into a hint first (e.g. canny): once for every unit, or once "
                   "per --control in order")
    p.add_argument("--hint", action="append", default=[], metavar="IMAGE",
                   help="with --from: the hint image of each of the PNG's ControlNet units, in order")
    if mode == "txt2img":
        p.add_argument("--hires", action="store_const", const=True, default=None,
                       help="hires fix: draw, upscale, then redraw at the larger size (A1111's; docs/generate.md)")
        p.add_argument("--hires-scale", type=finite_float, default=None, help="hires size / first size (default 2)")
        p.add_argument("--hires-resize", type=_parse_size, default=None, metavar="WxH",
                       help="hires size instead of --hires-scale (a 0 side keeps the aspect ratio)")
        p.add_argument("--hires-upscaler", default=None, help="Latent (default), Latent (antialiased), Latent "
                       "(bicubic), Latent (bicubic antialiased), Latent (nearest), Latent (nearest-exact), Lanczos, "
                       "Nearest")
        p.add_argument("--hires-steps", type=int, default=None, help="second-pass steps (default 0: as --steps)")
        p.add_argument("--hires-sampler", default=None, help="second-pass sampler (default: as --sampler)")
        p.add_argument("--hires-prompt", default=None, help="second-pass prompt (default: the prompt)")
        p.add_argument("--hires-negative", default=None, help="second-pass negative prompt (default: --negative)")
        p.add_argument("--strength", type=finite_float, default=None,
                       help="with --hires: the second pass's denoising strength, in (0, 1] (default 0.7)")
    if mode != "txt2img":
        p.add_argument("--init", required=True, help="the image to start from")
        p.add_argument("--strength", type=finite_float, default=None,
                       help="how much to change it, in (0, 1] (default 0.75)")
    if mode == "inpaint":
        p.add_argument("--mask", required=True, help="mask of the init image's size: white = repaint, black = keep")
        p.add_argument("--masked-content", default=None, choices=("original", "fill", "latent noise", "latent nothing"),
                       help="what the masked area starts from (A1111's Masked content; default original)")
        p.add_argument("--mask-blur", type=int, default=None, help="Gaussian blur of the mask, in pixels (default 0)")
        p.add_argument("--only-masked", action="store_const", const=True, default=None,
                       help="draw only the masked area and its surroundings, at --width x --height, then paste it "
                       "back (A1111's Inpaint area: Only masked)")
        p.add_argument("--mask-padding", type=int, default=None,
                       help="pixels around the masked area that --only-masked draws too (default 32)")
        p.add_argument("--repaint", type=repaint_pair, default=None, metavar="JxR", help="RePaint's resampling: jump J steps back, R "
                       "times, e.g. 10x10 (with --sampler DDPM or DDIM and --strength 1; default: the per-step blend)")
    if mode != "inpaint":
        p.add_argument("--refiner", default=None, help="SDXL refiner checkpoint to finish the base's images")
        p.add_argument("--refiner-start", type=finite_float, default=None,
                       help="fraction of the steps the base runs before the refiner (default 0.8)")


def _add_serve_parser(sub) -> None:
    """`unfog serve`: the HTTP server (server/)."""
    p = sub.add_parser("serve", help="an HTTP server speaking AUTOMATIC1111's API (/sdapi/v1), for its clients")
    p.add_argument("--model", default=None, help="the model loaded at start (default: the embedded shapes model)")
    for flag, what in (("--models-dir", "model files and diffusers folders"), ("--lora-dir", "LoRA files"),
                       ("--embeddings-dir", "textual-inversion embeddings"), ("--hypernetwork-dir", "hypernetworks"),
                       ("--vae-dir", "VAE files"), ("--controlnet-dir", "ControlNet files")):
        p.add_argument(flag, action="append", default=[], metavar="DIR", help=f"a folder of {what} (repeatable)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860, as A1111)")
    p.add_argument("--listen", action="store_true", help="listen on every address (0.0.0.0), for other machines")
    p.add_argument("--api-auth", default=None, metavar="USER:PASS[,USER2:PASS2]",
                   help="HTTP Basic credentials every route asks for")
    p.add_argument("--cors-allow-origins", default=None, metavar="A,B", help="origins browsers may call from")
    p.add_argument("--cors-allow-origins-regex", default=None, metavar="REGEX")
    p.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES, help="the models' dtype (default auto: bf16 on a "
                   "CPU where it is faster than fp32, fp16 on CUDA, else fp32)")
    _add_compile_arg(p)
    p.add_argument("--device", type=device_name, default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--max-size", type=int, default=2048, help="largest width or height a request may ask (2048)")
    p.add_argument("--max-steps", type=int, default=150, help="most steps a request may ask (150)")
    p.add_argument("--max-batch", type=int, default=16, help="most images per request, batch_size x n_iter (16)")
    p.add_argument("--outdir", default="outputs", help="where save_images writes (default outputs/)")
    p.set_defaults(func=cmd_serve)


def cmd_cascade(args: argparse.Namespace) -> None:
    from .pipelines.cascade import StageSettings, save_cascade

    settings = StageSettings(**{k: getattr(args, k) for k in ("sampler", "steps", "cfg_scale", "noise_augmentation")
                                if getattr(args, k) is not None})
    save_cascade(args.out, args.base, args.sr, settings, overwrite=args.overwrite)
    print(f"wrote {args.out} (base {args.base}, then {args.sr}: {settings.sampler}, {settings.steps} steps, "
          f"cfg {settings.cfg_scale}, noise augmentation {settings.noise_augmentation})")


def _add_cascade_parser(sub) -> None:
    """`unfog cascade BASE SR -o FILE`: one model file that draws through both stages."""
    p = sub.add_parser("cascade", help="join a pixel-space base model and a super-resolution model into one cascade "
                       "file (`unfog generate --model FILE` draws through both)")
    p.add_argument("base", help="the base text-to-image model (task text2image, vae_model pixel)")
    p.add_argument("sr", help="the super-resolution model (task text2image with low_res = the base's size)")
    p.add_argument("-o", "--out", required=True, help="the cascade file to write (.safetensors)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.add_argument("--sampler", default=None, help="the second stage's sampler (default dpmpp_2m)")
    p.add_argument("--steps", type=int, default=None, help="the second stage's steps (default 20)")
    p.add_argument("--cfg-scale", type=finite_float, default=None, help="the second stage's guidance (default 2)")
    p.add_argument("--noise-augmentation", type=finite_float, default=None, metavar="A",
                   help="noise the first stage's image to this fraction of the schedule, in [0, 1) (default 0.1)")
    p.set_defaults(func=cmd_cascade)


def _add_preprocess_parser(sub) -> None:
    """`unfog preprocess NAME IMAGE -o HINT`: a ControlNet hint image."""
    p = sub.add_parser("preprocess", help="make a ControlNet hint image: canny, scribble, lineart_standard, shuffle, "
                       "tile, blur, invert, binary")
    p.add_argument("name", help="the preprocessor: canny, scribble, lineart_standard, shuffle, tile, blur, invert, "
                   "binary (or A1111's module name, e.g. scribble_xdog)")
    p.add_argument("image", help="the image to make the hint from")
    p.add_argument("-o", "--out", required=True, help="the hint PNG to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.add_argument("--low", type=finite_float, default=None, help="canny: low threshold (default 100)")
    p.add_argument("--high", type=finite_float, default=None, help="canny: high threshold (default 200)")
    p.add_argument("--l2-gradient", action="store_true", default=None, help="canny: Euclidean gradient magnitude "
                   "(default |dx| + |dy|, as A1111)")
    p.add_argument("--sigma", type=finite_float, default=None, help="blur: Gaussian sigma in pixels (default 9); "
                   "canny: blur before the gradients (default 0: none, as A1111)")
    p.add_argument("--threshold", type=finite_float, default=None, help="scribble: XDoG threshold (default 32); "
                   "binary: grey level, 0 for Otsu's (default 0)")
    p.add_argument("--seed", type=int, default=None, help="shuffle: random seed (default 0)")
    p.add_argument("--cell", type=int, default=None, help="shuffle: pixels between the flow field's random "
                   "values (default 256)")
    p.add_argument("--rate", type=finite_float, default=None, help="tile: downsampling rate (default 1: none)")
    p.set_defaults(func=cmd_preprocess)


def _add_lora_parser(sub) -> None:
    """`unfog lora info | extract`."""
    p = sub.add_parser("lora", help="LoRA / LyCORIS files: lora info FILE, lora extract BASE TUNED")
    lora = p.add_subparsers(dest="lora_command", required=True, metavar="LORA_COMMAND")
    p = lora.add_parser("info", help="what a LoRA file is for, its kinds, ranks, targets and training metadata")
    p.add_argument("file", help="a LoRA / LyCORIS file (.safetensors, .pt, .ckpt)")
    p.set_defaults(func=cmd_lora_info)
    p = lora.add_parser("extract", help="a LoRA from the difference of two checkpoints by truncated SVD (as kohya's "
                        "extractor): BASE + the LoRA ~ TUNED")
    p.add_argument("base", help="the original model (single file, diffusers folder or unfog model file)")
    p.add_argument("tuned", help="the fine-tuned model, of the same architecture")
    p.add_argument("--rank", type=int, required=True, help="the LoRA rank of the Linear / 1x1-conv modules")
    p.add_argument("--conv-rank", type=int, default=None, help="also extract the ResBlock and up/down-sampling 3x3 "
                   "convs, at this rank (default: leave them out)")
    p.add_argument("--text-encoder", action=argparse.BooleanOptionalAction, default=True,
                   help="extract the text encoders' changes too (default: yes)")
    p.add_argument("--out", required=True, help="the LoRA file to write (.safetensors, kohya format)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.add_argument("--device", default="cpu", help="where to compute the SVDs: cpu or cuda (default cpu)")
    p.set_defaults(func=cmd_lora_extract)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        """One line, as every other error of the command (argparse would add the usage)."""
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = _Parser(prog="unfog", description="A readable, verified diffusion stack.")
    parser.add_argument("--version", action="version", version=f"unfog {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

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

    p = sub.add_parser("train", help="train a model from a JSON config, e.g. configs/digits.json")
    p.add_argument("config", help="JSON config file")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. steps=2000 lr=1e-4; a key of the "
                   "task's section is dotted: text2image.vae_model=runs/vae/model.safetensors")
    p.add_argument("--resume", action="store_true", help="continue the run in the config's out_dir")
    p.add_argument("--overwrite", action="store_true", help="start again, deleting the run's old states")
    p.add_argument("--force", action="store_true", help="resume even if the config changed")
    p.add_argument("--init-from", metavar="STATE", default=None,
                   help="start a new run from another run's training state (a state_*.pt file or a run folder): "
                        "the next stage of a curriculum; or from the weights alone of a text-to-image model file "
                        "(.safetensors) or, for task lora, of a LoRA file (textual_inversion: an embedding .safetensors; "
                        "hypernetwork: a hypernetwork .safetensors or A1111 .pt), at step "
                        "0; the config changes are "
                        "recorded in resumes.jsonl")
    p.add_argument("--device", type=device_name, default=None, help="cpu or cuda (default: cuda when available)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("samplers", help="list the samplers and the names they are known by")
    p.set_defaults(func=cmd_samplers)

    p = sub.add_parser("generate", help="draw images from a prompt with a Stable Diffusion checkpoint (SD 1.x, "
                       "2.x, SDXL)")
    _add_image_args(p, "txt2img")
    p = sub.add_parser("img2img", help="redraw an image from a prompt")
    _add_image_args(p, "img2img")
    p = sub.add_parser("inpaint", help="repaint the masked part of an image")
    _add_image_args(p, "inpaint")
    _add_serve_parser(sub)

    p = sub.add_parser("info", help="print the generation parameters stored in a PNG")
    p.add_argument("image", help="a PNG written by unfog or AUTOMATIC1111")
    p.set_defaults(func=cmd_info)

    _add_preprocess_parser(sub)
    _add_cascade_parser(sub)
    _add_lora_parser(sub)

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
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    for option in ("steps", "per_class", "batch_size", "n", "scale", "rank", "conv_rank"):
        value = getattr(args, option, None)
        if value is not None and value < 1:
            parser.error(f"--{option.replace('_', '-')} must be >= 1, got {value}")
    try:
        args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, ImportError) as err:
        message = " ".join(line.strip() for line in str(err).splitlines() if line.strip())  # one line
        print(f"unfog: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
