"""The commands that make model files: train, cascade, lora info / extract."""

from __future__ import annotations

import argparse

from .options import device_name, finite_float, warn


def cmd_train(args: argparse.Namespace) -> None:
    from ..training import load_config, train

    config = load_config(args.config, args.overrides)
    path = train(config, resume=args.resume, overwrite=args.overwrite, force=args.force, init_from=args.init_from,
                 device=args.device)
    print(f"model written to {path}")


def cmd_cascade(args: argparse.Namespace) -> None:
    from ..pipelines.cascade import StageSettings, save_cascade

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


def cmd_lora_info(args: argparse.Namespace) -> None:
    from ..pipelines.lora import describe_lora

    print(describe_lora(args.file))


def cmd_lora_extract(args: argparse.Namespace) -> None:
    from ..pipelines.lora_extract import extract_lora_file

    result = extract_lora_file(args.base, args.tuned, args.out, rank=args.rank, conv_rank=args.conv_rank,
                               text_encoder=args.text_encoder, overwrite=args.overwrite, device=args.device)
    for m in result.modules:
        print(f"{m.key}  rank {m.rank}  relative error {m.relative_error:.3g}")
    errors = [m.relative_error for m in result.modules]
    print(f"{len(result.modules)} modules extracted (relative error mean {sum(errors) / len(errors):.3g}, max "
          f"{max(errors):.3g}), {result.unchanged} unchanged")
    if result.left_out:
        warn(f"{len(result.left_out)} changed tensors a LoRA cannot hold are left out, e.g. "
              f"{', '.join(result.left_out[:3])}" + ("" if args.conv_rank else " (--conv-rank adds the convs)"))
    print(f"wrote {args.out}")


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


def add_parsers(sub) -> None:
    """Adds `unfog train`, `cascade` and `lora`."""
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

    _add_cascade_parser(sub)
    _add_lora_parser(sub)
