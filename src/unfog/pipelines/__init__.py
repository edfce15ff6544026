"""Thin compositions of models and the diffusion core that turn settings into images."""

from .pixel import PixelDiffusion, PixelModelInfo

__all__ = ["PixelDiffusion", "PixelModelInfo"]
