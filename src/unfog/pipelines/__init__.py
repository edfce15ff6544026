"""Thin compositions of models and the diffusion core that turn settings into images."""

from .pixel import PixelDiffusion, PixelModelInfo
from .stable_diffusion import StableDiffusion

__all__ = ["PixelDiffusion", "PixelModelInfo", "StableDiffusion"]
