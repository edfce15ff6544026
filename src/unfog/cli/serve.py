"""`unfog serve`: the HTTP server (server/)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..embedded import DEFAULT_TEXT_MODEL, default_model_path
from .options import DTYPE_CHOICES, add_compile_arg, device_name


def cmd_serve(args: argparse.Namespace) -> None:
    from ..server import parse_auth, serve
    from ..server.app import Limits, ServerConfig
    from ..server.library import Library

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


def add_parsers(sub) -> None:
    """Adds `unfog serve`: the HTTP server (server/)."""
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
    add_compile_arg(p)
    p.add_argument("--device", type=device_name, default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--max-size", type=int, default=2048, help="largest width or height a request may ask (2048)")
    p.add_argument("--max-steps", type=int, default=150, help="most steps a request may ask (150)")
    p.add_argument("--max-batch", type=int, default=16, help="most images per request, batch_size x n_iter (16)")
    p.add_argument("--outdir", default="outputs", help="where save_images writes (default outputs/)")
    p.set_defaults(func=cmd_serve)
