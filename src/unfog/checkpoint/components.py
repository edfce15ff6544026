"""What the loaders return, and how a module is built from a state dict: on the meta device, checked
tensor by tensor (missing, unexpected, wrong shape: one error naming a few of each), then filled
with ``load_state_dict(strict=True, assign=True)``."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from unfog.diffusion.denoiser import Prediction
from unfog.models.clip_text import CLIPTextEncoder
from unfog.models.tokenizer import CLIPTokenizer
from unfog.models.unet import UNet
from unfog.models.vae import AutoencoderKL

from .detect import Component, Family

MODULES = {"unet": UNet, "vae": AutoencoderKL, "text_encoder": CLIPTextEncoder, "text_encoder_2": CLIPTextEncoder}
SHOWN = 5  # how many names an error lists


@dataclass
class Components:
    """The loaded models of a checkpoint. ``family`` holds their configs, the prediction type
    and the noise schedule; a component the checkpoint lacks is None."""

    family: Family
    unet: UNet | None = None
    vae: AutoencoderKL | None = None
    text_encoder: CLIPTextEncoder | None = None
    text_encoder_2: CLIPTextEncoder | None = None
    tokenizer: CLIPTokenizer | None = None
    tokenizer_2: CLIPTokenizer | None = None

    @property
    def prediction(self) -> Prediction | None:
        return self.family.prediction


def few(names: Iterable[str]) -> str:
    names = sorted(names)
    return ", ".join(names[:SHOWN]) + (f" (and {len(names) - SHOWN} more)" if len(names) > SHOWN else "")


def check_state_dict(module: nn.Module, state_dict: Mapping[str, torch.Tensor], what: str) -> None:
    """Raise one ValueError naming the missing, unexpected and wrongly shaped tensors, if any."""
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    wrong = [
        f"{k}: expected {expected[k]}, found {tuple(v.shape)}"
        for k, v in state_dict.items()
        if k in expected and tuple(v.shape) != expected[k]
    ]
    if not (missing or unexpected or wrong):
        return
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing: {few(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected: {few(unexpected)}")
    if wrong:
        problems.append(f"{len(wrong)} with the wrong shape: " + "; ".join(sorted(wrong)[:SHOWN]))
    raise ValueError(f"{what} do not fit the model: " + "; ".join(problems))


def build_module(component: Component, config, state_dict: dict[str, torch.Tensor], dtype: torch.dtype, what: str):
    """The module of ``component`` with ``config``, holding the tensors of ``state_dict`` cast to
    ``dtype`` (see ``fill_module``)."""
    with torch.device("meta"):
        module = MODULES[component](config)
    return fill_module(module, state_dict, dtype, what)


def fill_module(module: nn.Module, state_dict: dict[str, torch.Tensor], dtype: torch.dtype, what: str):
    """``module``, built on the meta device, holding the tensors of ``state_dict`` cast to ``dtype``
    (taken out of the dict one at a time, so two full copies never coexist); checked first."""
    check_state_dict(module, state_dict, what)
    weights = {}
    for name in list(state_dict):
        value = state_dict.pop(name)
        weights[name] = value.to(dtype) if value.is_floating_point() else value
    module.load_state_dict(weights, strict=True, assign=True)
    return module.eval()
