"""The denoising network of a latent model: a U-Net or a DiT, behind one small interface.

Both are built from a frozen config that has ``in_channels`` and ``context_dim``, and both are
called ``net(x, timesteps, context=None, y=None)`` -> the prediction for x. What only the U-Net
has (ControlNet residuals, DeepCache's feature cache, token merging, its LDM block names for
LoRA and ControlNet files) is asked of ``kind_of(net) == "unet"`` by the code that needs it.

A backbone's kind names its part of a model file (``unet.`` / ``dit.`` tensors, and its config
under the same key in the metadata) and of the trainer's network.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Union

from .dit import DiT, DiTConfig
from .unet import UNet, UNetConfig

Backbone = Union[UNet, DiT]
BackboneConfig = Union[UNetConfig, DiTConfig]
KINDS: dict[str, tuple[type, type]] = {"unet": (UNet, UNetConfig), "dit": (DiT, DiTConfig)}
NAMES = {"unet": "U-Net", "dit": "DiT"}


def kind_of(thing: Backbone | BackboneConfig) -> str:
    """"unet" or "dit" for a backbone or its config."""
    for kind, types in KINDS.items():
        if isinstance(thing, types):
            return kind
    raise TypeError(f"not a backbone or a backbone config: {type(thing).__name__} (valid: UNet, DiT)")


def build(config: BackboneConfig) -> Backbone:
    return KINDS[kind_of(config)][0](config)


def config_from_dict(kind: str, fields: dict[str, Any]) -> BackboneConfig:
    if kind not in KINDS:
        raise ValueError(f"unknown backbone {kind!r}; valid: {', '.join(KINDS)}")
    return KINDS[kind][1](**fields)


def for_latents(config: BackboneConfig, channels: int, context_dim: int, latent_size: int) -> BackboneConfig:
    """``config`` fitted to a latent text-to-image model: its latents' channels, its text
    encoder's width, and (a DiT's fixed position table) the latent side it trains at. A DiT
    predicts eps / v / x0 without a learned variance and takes no class labels here."""
    if kind_of(config) == "unet":
        return replace(config, in_channels=channels, out_channels=channels, context_dim=context_dim)
    return replace(config, in_channels=channels, context_dim=context_dim, input_size=latent_size,
                   num_classes=0, null_class=False, learn_sigma=False)


def requires_unet(net: Backbone | BackboneConfig, what: str) -> None:
    """A one-line error for a U-Net-only feature asked of another backbone (or its config)."""
    if kind_of(net) != "unet":
        raise ValueError(f"{what} works on U-Net models; this model's denoising network is a {NAMES[kind_of(net)]}")
