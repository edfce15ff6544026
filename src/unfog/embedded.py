"""The models shipped inside the package (``unfog/weights/``): where they are, by file name."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

DEFAULT_MODEL = "digits.safetensors"  # `unfog sample`'s default: the class-conditional digits model
DEFAULT_TEXT_MODEL = "shapes.safetensors"  # `unfog generate`'s default: the text-to-image shapes model


def default_model_path(name: str = DEFAULT_MODEL) -> Path:
    """The path of the shipped model file ``name``."""
    return Path(str(resources.files("unfog") / "weights" / name))
