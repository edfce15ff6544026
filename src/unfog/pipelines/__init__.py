"""Thin compositions of models and the diffusion core that turn settings into images.

Each pipeline is imported on first use (PEP 562), so the pixel models do not load the Stable
Diffusion stack (CLIP, tokenizer, VAE) and vice versa.
"""

from importlib import import_module

_LAZY = {"PixelDiffusion": "pixel", "PixelModelInfo": "pixel", "StableDiffusion": "stable_diffusion"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_LAZY)
