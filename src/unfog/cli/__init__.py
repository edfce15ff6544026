"""The `unfog` command: argument parsing only; the work is done by pipelines and training.

One module per group of commands; each adds its parsers to the subcommands (``add_parsers``)."""

from __future__ import annotations

import argparse
import sys

from ..embedded import DEFAULT_MODEL, DEFAULT_TEXT_MODEL, default_model_path  # noqa: F401 (re-exported)
from . import evaluate, generate, models, sample, serve
from .generate import sampler_summary  # noqa: F401 (re-exported)
from .options import DTYPE_CHOICES, finite_float  # noqa: F401 (re-exported)

__all__ = ["build_parser", "main", "DEFAULT_MODEL", "DEFAULT_TEXT_MODEL", "DTYPE_CHOICES", "default_model_path",
           "finite_float", "sampler_summary"]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        """One line, as every other error of the command (argparse would add the usage)."""
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = _Parser(prog="unfog", description="A readable, verified diffusion stack.")
    parser.add_argument("--version", action="version", version=f"unfog {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    for commands in (generate, sample, models, evaluate, serve):
        commands.add_parsers(sub)
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
