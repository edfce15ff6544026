"""What several commands share: argparse value types, option groups, warnings."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from ..embedded import DEFAULT_MODEL, DEFAULT_TEXT_MODEL, default_model_path


DTYPE_CHOICES = ("auto", "fp32", "bf16", "fp16")  # pipelines.precision.DTYPE_NAMES, without importing torch here


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
    from ..pipelines.precision import resolve_device

    try:
        return resolve_device(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def repaint_pair(text: str) -> tuple[int, int]:
    """ "10x10" -> (10, 10) for --repaint."""
    from ..pipelines.outputs import parse_repaint

    try:
        return parse_repaint(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def optional_path(args: argparse.Namespace, name: str) -> Path | None:
    value = getattr(args, name, None)
    return None if value is None else Path(value)


def warn(message: str) -> None:
    print(f"unfog: warning: {message}", file=sys.stderr)


def add_compile_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--compile", nargs="?", const="auto", default="off", choices=("off", "auto", "strict"),
                   help="torch.compile the U-Net and VAE decoder (CUDA graphs on CUDA); --compile falls back to "
                   "eager with a warning where it cannot compile, --compile strict stops instead (default off)")


class ModelDefault:
    """A setting's default in ``generate --help`` (``pixel``: ``sample --help``): the built-in model's
    recommended value, and the one of model files that recommend none; read from the model file
    only when the help is shown."""

    def __init__(self, field: str, pixel: bool = False):
        self.field, self.pixel = field, pixel

    def __str__(self) -> str:
        from ..pipelines import latent_model, pixel
        from ..pipelines.outputs import Settings, sampler_name

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
