"""`unfog generate | img2img | inpaint`, and the commands around them: info, samplers, preprocess."""

from __future__ import annotations

import argparse
import re
import textwrap
from pathlib import Path

from ..embedded import DEFAULT_TEXT_MODEL, default_model_path
from .options import (DTYPE_CHOICES, ModelDefault, add_compile_arg, device_name, finite_float, optional_path,
                      repaint_pair, warn)


# Options of the image commands that are generation settings (``pipelines.outputs.Settings``).
SETTINGS_OPTIONS = {"prompt": "prompt", "negative": "negative_prompt", "steps": "steps", "sampler": "sampler",
                    "spacing": "spacing", "cfg_scale": "cfg_scale", "seed": "seed", "width": "width",
                    "height": "height", "clip_skip": "clip_skip", "strength": "strength",
                    "refiner_start": "refiner_start", "masked_content": "masked_content", "mask_blur": "mask_blur",
                    "only_masked": "only_masked", "mask_padding": "mask_padding", "hires": "hires",
                    "hires_scale": "hr_scale", "hires_upscaler": "hr_upscaler", "hires_steps": "hr_steps",
                    "hires_sampler": "hr_sampler", "hires_prompt": "hr_prompt", "hires_negative": "hr_negative_prompt",
                    "cfg_truncation": "cfg_truncation", "deep_cache": "deep_cache",
                    "deep_cache_branch": "deep_cache_branch", "deep_cache_start": "deep_cache_start",
                    "token_merging": "token_merging", "repaint": "repaint"}


def cmd_generate(args: argparse.Namespace) -> None:
    """generate, img2img and inpaint: the options typed override those of --from IMAGE.png."""
    from ..pipelines.control_units import parse_control
    from ..jobs import Job, resolve_settings, run

    given = {field: getattr(args, option) for option, field in SETTINGS_OPTIONS.items() if hasattr(args, option)}
    if getattr(args, "hires_resize", None) is not None:
        given["hr_resize_x"], given["hr_resize_y"] = args.hires_resize
    model = Path(args.model) if args.model else default_model_path(DEFAULT_TEXT_MODEL)
    settings, source = resolve_settings(args.mode, given, args.from_png, warn, model=model)
    job = Job(args.mode, settings, model, init=optional_path(args, "init"), mask=optional_path(args, "mask"),
              refiner=optional_path(args, "refiner"), family=args.family, prediction=args.prediction, dtype=args.dtype,
              compile=args.compile, device=args.device, batch_size=args.batch_size, output=args.output, overwrite=args.overwrite,
              source=source, lora_dirs=tuple(Path(d) for d in args.lora_dir),
              embedding_dirs=tuple(Path(d) for d in args.embeddings_dir),
              hypernetwork_dirs=tuple(Path(d) for d in args.hypernetwork_dir),
              controls=tuple(parse_control(c) for c in args.control), control_mode=args.control_mode,
              control_resize=args.control_resize, controlnet_dirs=tuple(Path(d) for d in args.controlnet_dir),
              hints=tuple(Path(h) for h in args.hint), preprocess=tuple(args.preprocess), vae=optional_path(args, "vae"))
    for path in run(job, warn=warn):
        print(f"wrote {path}")


def _parse_size(text: str) -> tuple[int, int]:
    """'1024x768' -> (1024, 768); a side may be 0."""
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise argparse.ArgumentTypeError(f"{text!r} is not WIDTHxHEIGHT (e.g. 1024x768, or 1024x0)")
    return int(parts[0]), int(parts[1])


def _add_savings_args(p: argparse.ArgumentParser) -> None:
    """The opt-in savings of U-Net work (docs/generate.md; their cost: docs/benchmarks.md)."""
    p.add_argument("--cfg-truncation", type=finite_float, default=None, metavar="F", help="guide only the first "
                   "fraction F of the steps; the rest run the conditional pass alone, 2x cheaper (default 1: all)")
    p.add_argument("--deep-cache", type=int, default=None, metavar="N", help="DeepCache: the whole U-Net every N-th "
                   "step, its outer blocks alone in between (default 1: always the whole)")
    p.add_argument("--deep-cache-branch", type=int, default=None, metavar="B", help="DeepCache's skip level: the "
                   "steps in between run the U-Net's first B+1 input blocks and last B+1 output blocks (default 0)")
    p.add_argument("--deep-cache-start", type=finite_float, default=None, metavar="F", help="DeepCache: run the "
                   "first fraction F of the steps in full, where the layout is decided (default 0)")
    p.add_argument("--token-merging", type=finite_float, default=None, metavar="R", help="ToMe: merge a fraction R "
                   "of the tokens before the top level's self-attention (A1111's token merging ratio; default 0: off)")


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
                   ).model_default = ModelDefault("steps")
    p.add_argument("--sampler", default=None, help="sampler, ours or A1111's (default: %(model_default)s); see "
                   "`unfog samplers`").model_default = ModelDefault("sampler")
    p.add_argument("--spacing", default=None, help="sigma spacing: leading, linspace, trailing, karras, exponential, "
                   "sgm_uniform (default: the sampler name's, else the model's: leading for the built-in model)")
    p.add_argument("--cfg-scale", type=finite_float, default=None, help="classifier-free guidance scale (default: "
                   "%(model_default)s)").model_default = ModelDefault("cfg_scale")
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
    add_compile_arg(p)
    p.add_argument("--device", type=device_name, default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--family", default=None, help="checkpoint family (SD15, SD2, SDXL_BASE, ...), only where the "
                   "weights cannot tell")
    p.add_argument("--prediction", default=None, choices=("eps", "v", "x0"), help="what the U-Net predicts, "
                   "overriding the family's (SD 2.x 512-base files: eps)")
    p.add_argument("--output", default=None, help="a .png file, or a folder for numbered files (default ./outputs/)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output file")
    p.add_argument("--from", dest="from_png", default=None, metavar="IMAGE.png",
                   help="take the prompt and settings from a PNG's parameters (the model still comes from --model)")
    _add_network_args(p)
    _add_mode_args(p, mode)


def _add_network_args(p: argparse.ArgumentParser) -> None:
    """What the model is combined with: another VAE, LoRAs, embeddings, hypernetworks, ControlNets."""
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


def _add_mode_args(p: argparse.ArgumentParser, mode: str) -> None:
    """The options of one mode: hires fix (txt2img), the init image (img2img, inpaint), the mask
    (inpaint), the refiner (txt2img, img2img)."""
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


def cmd_info(args: argparse.Namespace) -> None:
    from ..pipelines.images import read_parameters

    text = read_parameters(args.image)
    if text is None:
        raise ValueError(f"{args.image} carries no generation parameters (no 'parameters' text chunk)")
    print(text)


def cmd_samplers(args: argparse.Namespace) -> None:
    from ..diffusion.registry import SAMPLERS, valid_names

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


# `unfog preprocess` options -> the preprocessors' keyword arguments (each passed only when typed).
PREPROCESS_OPTIONS = ("low", "high", "sigma", "l2_gradient", "threshold", "seed", "cell", "rate")


def cmd_preprocess(args: argparse.Namespace) -> None:
    from ..pipelines.images import open_image, save_png
    from ..pipelines.preprocess import preprocess

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


def add_parsers(sub) -> None:
    """Adds `unfog generate`, `img2img`, `inpaint`, `info`, `samplers` and `preprocess`."""
    p = sub.add_parser("generate", help="draw images from a prompt with a Stable Diffusion checkpoint (SD 1.x, "
                       "2.x, SDXL)")
    _add_image_args(p, "txt2img")
    p = sub.add_parser("img2img", help="redraw an image from a prompt")
    _add_image_args(p, "img2img")
    p = sub.add_parser("inpaint", help="repaint the masked part of an image")
    _add_image_args(p, "inpaint")

    p = sub.add_parser("info", help="print the generation parameters stored in a PNG")
    p.add_argument("image", help="a PNG written by unfog or AUTOMATIC1111")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("samplers", help="list the samplers and the names they are known by")
    p.set_defaults(func=cmd_samplers)

    _add_preprocess_parser(sub)
