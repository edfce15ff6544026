"""A pixel-space diffusion model: the U-Net, its noise schedule, and how to draw images from it.

The model file is one safetensors file: the (EMA) U-Net weights under their canonical names and,
in the metadata, the U-Net config, the schedule, the prediction type and the class layout, and
optionally the sampling settings the model recommends ("defaults": sampler, steps, cfg_scale).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..checkpoint import io
from ..checkpoint.io import load_safetensors, read_metadata, save_safetensors
from ..diffusion import Denoiser, DiscreteSchedule, get_sigmas, resolve_sampler
from ..diffusion.guidance import class_guidance
from ..models.unet import UNet, UNetConfig
from .inputs import class_labels

FORMAT = "unfog.pixel.v1"
# The sampling settings of a model file that recommends none (its "defaults" metadata overrides them).
SAMPLING_DEFAULTS = {"sampler": "dpmpp_2m", "steps": 20, "cfg_scale": 2.0}


@dataclass(frozen=True)
class PixelModelInfo:
    image_size: int
    channels: int
    schedule: str = "linear"
    num_timesteps: int = 1000
    zero_terminal_snr: bool = False
    prediction: str = "eps"
    num_classes: int | None = None  # real classes; the U-Net has one more, the null class for CFG
    class_names: tuple[str, ...] | None = None

    @property
    def null_class(self) -> int | None:
        return self.num_classes


def is_pixel_model(path: str | Path) -> bool:
    """Whether ``path`` is an unfog pixel model file (read from the safetensors header only)."""
    return (read_metadata(path) or {}).get("format") == FORMAT


def recommended_settings(path: str | Path) -> dict[str, Any]:
    """The sampling settings a pixel model file recommends (its ``defaults`` metadata: sampler,
    steps, cfg_scale), read from the header only; {} for a file that recommends none or is no pixel model."""
    return io.recommended_settings(path, FORMAT)


class PixelDiffusion:
    def __init__(self, unet: UNet, info: PixelModelInfo, defaults: dict[str, Any] | None = None):
        """``defaults``: the model's recommended sampling settings, used by ``generate`` for the
        ones it is not given (the rest: ``SAMPLING_DEFAULTS``)."""
        unknown = sorted(set(defaults or {}) - set(SAMPLING_DEFAULTS))
        if unknown:
            raise ValueError(f"unknown sampling default {unknown[0]!r}; valid: {', '.join(SAMPLING_DEFAULTS)}")
        self.unet, self.info = unet.eval(), info
        self.defaults = {**SAMPLING_DEFAULTS, **(defaults or {})}
        self.schedule = DiscreteSchedule.make(info.schedule, info.num_timesteps, zero_terminal_snr=info.zero_terminal_snr)

    # ---- files --------------------------------------------------------------------------------
    def save(self, path: str | Path, extra: dict[str, Any] | None = None) -> None:
        meta = {"format": FORMAT, "unet": asdict(self.unet.config), "info": asdict(self.info),
                "defaults": self.defaults, **(extra or {})}
        save_safetensors(path, self.unet.state_dict(), meta)

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> "PixelDiffusion":
        tensors, meta = load_safetensors(path)
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path} is not an unfog pixel model (metadata format {meta.get('format')!r}, "
                             f"expected {FORMAT!r})")
        info = meta["info"]
        info["class_names"] = tuple(info["class_names"]) if info.get("class_names") else None
        unet = UNet(UNetConfig(**meta["unet"]))
        unet.load_state_dict(tensors, strict=True)
        return cls(unet.to(device), PixelModelInfo(**info), meta.get("defaults"))

    # ---- sampling -----------------------------------------------------------------------------
    def denoiser(self) -> Denoiser:
        return Denoiser(self.unet, self.schedule, self.info.prediction)

    @torch.no_grad()
    def generate(
        self,
        labels: list[int] | Tensor | None = None,
        *,
        num_images: int | None = None,
        sampler: str | None = None,
        steps: int | None = None,
        spacing: str | None = None,
        cfg_scale: float | None = None,
        seed: int = 0,
        callback=None,
        **sampler_options,
    ) -> Tensor:
        """Images (B, C, H, W) in [-1, 1]. ``labels`` picks classes for a class-conditional model
        (None = unconditional draws of ``num_images``). ``spacing`` defaults to the sampler
        name's own (e.g. "karras" in "DPM++ 2M Karras"), else "leading"; DDPM with 1000 steps
        and spacing "trailing" is the paper's full chain over every training timestep. ``sampler``,
        ``steps`` and ``cfg_scale`` default to the model's recommended settings (``self.defaults``)."""
        sampler = self.defaults["sampler"] if sampler is None else sampler
        steps = self.defaults["steps"] if steps is None else steps
        cfg_scale = self.defaults["cfg_scale"] if cfg_scale is None else cfg_scale
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        choice = resolve_sampler(sampler)
        labels, batch = self._labels(labels, num_images)
        sigmas = get_sigmas(self.schedule, steps, spacing or choice.spacing or "leading")
        device = next(self.unet.parameters()).device
        g = torch.Generator().manual_seed(seed)
        shape = (batch, self.info.channels, self.info.image_size, self.info.image_size)
        x = (torch.randn(shape, generator=g) * math.sqrt(1 + float(sigmas[0]) ** 2)).to(device)  # VP prior
        den = self._guided(labels, cfg_scale, device)
        out = choice.fn(den, x, sigmas, generator=g, callback=callback, **{**choice.options, **sampler_options})
        return out.clamp(-1, 1).cpu()

    def _labels(self, labels, num_images) -> tuple[Tensor | None, int]:
        if self.info.num_classes is None:
            if labels is not None:
                raise ValueError("this model is unconditional; it takes no class labels")
            if not num_images or num_images < 1:
                raise ValueError("give num_images >= 1 for an unconditional model")
            return None, num_images
        if labels is None:
            raise ValueError(f"this model is class-conditional: give labels in 0..{self.info.num_classes - 1}")
        labels = class_labels(labels, self.info.num_classes)
        return labels, labels.numel()

    def _guided(self, labels: Tensor | None, cfg_scale: float, device):
        den = self.denoiser()
        if labels is None:
            return den
        return class_guidance(den, labels.to(device), self.info.null_class, cfg_scale)
