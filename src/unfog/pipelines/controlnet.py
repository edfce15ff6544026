"""ControlNet units in a Stable Diffusion run: ``Control`` (one model, its hint and its A1111
settings), the hint's resizing to the output size, and ``ControlRun``, which the U-Net call of
``StableDiffusion._network`` asks for the summed residuals of one model evaluation.

Definitions (docs/controlnet.md says why each is the one chosen):

- weight: every residual of the unit is multiplied by it (diffusers' ``controlnet_conditioning_scale``).
- start / end: fractions of the run's steps N (after img2img's strength: the steps run). Step i
  is controlled when its whole span [i / N, (i + 1) / N] lies in [start, end], diffusers'
  ``controlnet_keep``. A model evaluation at timestep t belongs to step i when
  t_i >= t > t_{i+1} (t_i: the timestep of ``sigmas[i]``), so every sampler, first-order or
  not, is controlled by the same rule without a hook in it.
- control_mode, as sd-webui-controlnet defines its three modes:
  "balanced": the residuals join both halves of classifier-free guidance;
  "prompt" ("My prompt is more important"): residual k of n scaled by 0.825^(12 - k) (k = 0..12;
      SDXL's 10 take the first 10 of those 13), both halves;
  "controlnet" ("ControlNet is more important", guess mode): the same scales, and the
      ControlNet runs on the conditional half only: the unconditional half gets no residuals.
- A globally pooled ControlNet (the v1.1 shuffle model, ``ControlNetConfig.global_pool``) runs
  on the conditional half only in every mode, as sd-webui-controlnet and diffusers run it.
- Several units: their residuals are summed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, get_args

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from ..choices import check_choice
from ..models.controlnet import ControlNet

ResizeMode = Literal["just_resize", "crop_and_resize", "resize_and_fill"]
ControlMode = Literal["balanced", "prompt", "controlnet"]
RESIZE_MODES: tuple[str, ...] = get_args(ResizeMode)
CONTROL_MODES: tuple[str, ...] = get_args(ControlMode)
# How sd-webui-controlnet names them in its UI and in the PNG parameters.
A1111_RESIZE = {"just_resize": "Just Resize", "crop_and_resize": "Crop and Resize",
                "resize_and_fill": "Resize and Fill"}
A1111_CONTROL = {"balanced": "Balanced", "prompt": "My prompt is more important",
                 "controlnet": "ControlNet is more important"}
SOFT_BASE = 0.825  # sd-webui-controlnet's soft injection: residual k of 13 scaled by 0.825 ** (12 - k)
FEW_COLOURS = 200  # hints with 3..199 colours (segmentation maps) are resized nearest-neighbour, as A1111


@dataclass(frozen=True)
class Control:
    """One ControlNet unit of a run.

    model: a ``ControlNet`` (``unfog.load_controlnet``) of the pipeline's family.
    image: the hint, a PIL image (read as RGB) or a tensor (3, H, W) / (1, 3, H, W) in [0, 1];
        one of another size than the output is resized by ``resize_mode``.
    weight: the residuals' multiplier, >= 0. start, end: the fractions of the steps it acts on.
    resize_mode: "just_resize" (stretch), "crop_and_resize" (cover, crop the centre),
        "resize_and_fill" (fit inside, fill the rest with the border's median colour).
    control_mode: "balanced", "prompt" or "controlnet" (module docstring).
    """

    model: ControlNet
    image: Image.Image | Tensor
    weight: float = 1.0
    start: float = 0.0
    end: float = 1.0
    resize_mode: ResizeMode = "just_resize"
    control_mode: ControlMode = "balanced"

    def __post_init__(self) -> None:
        check_unit(self.weight, self.start, self.end, self.resize_mode, self.control_mode)
        if not isinstance(self.model, ControlNet):
            raise TypeError(f"Control.model must be a ControlNet (unfog.load_controlnet), got {type(self.model).__name__}")
        if not isinstance(self.image, (Image.Image, Tensor)):
            raise TypeError(f"Control.image must be a PIL image or a tensor, got {type(self.image).__name__}")


def check_unit(weight: float, start: float, end: float, resize_mode: str, control_mode: str) -> None:
    """A unit's settings, each wrong one a one-line ValueError naming the valid values."""
    check_choice("resize mode", resize_mode, RESIZE_MODES)
    check_choice("control mode", control_mode, CONTROL_MODES)
    if not (np.isfinite(weight) and weight >= 0):
        raise ValueError(f"ControlNet weight must be a finite number >= 0, got {weight}")
    if not (0 <= start <= end <= 1):
        raise ValueError(f"ControlNet guidance start and end must satisfy 0 <= start <= end <= 1, got start {start}, "
                         f"end {end}")


def hint_tensor(image: Image.Image | Tensor) -> Tensor:
    """A PIL image (as RGB) or a tensor (3, H, W) / (1, 3, H, W) in [0, 1] -> (1, 3, H, W) float32."""
    if isinstance(image, Image.Image):
        pixels = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255)  # (H, W, 3)
        return pixels.permute(2, 0, 1)[None]
    x = image[None] if image.ndim == 3 else image
    if x.ndim != 4 or x.shape[:2] != (1, 3):
        raise ValueError(f"a hint tensor must be (3, H, W) or (1, 3, H, W) in [0, 1], got {tuple(image.shape)}")
    return x.detach().to("cpu", torch.float32)


def _resize(x: Tensor, size: tuple[int, int]) -> Tensor:
    """(1, 3, h, w) -> (1, 3, *size): nearest for few-colour hints, else antialiased bicubic."""
    if tuple(x.shape[-2:]) == size:
        return x
    colours = torch.unique(x.flatten(2)[0].T, dim=0).shape[0]
    if 2 < colours < FEW_COLOURS:
        return F.interpolate(x, size=size, mode="nearest-exact")
    return F.interpolate(x, size=size, mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)


def prepare_hint(image: Image.Image | Tensor, width: int, height: int, resize_mode: str,
                 warn: Callable[[str], None] | None = None) -> Tensor:
    """The hint at the output size, (1, 3, height, width) in [0, 1], by sd-webui-controlnet's
    geometry for ``resize_mode``; a resize is said through ``warn``."""
    check_choice("resize mode", resize_mode, RESIZE_MODES)
    x = hint_tensor(image)
    h, w = x.shape[-2:]
    if (h, w) == (height, width):
        return x
    if warn is not None:
        warn(f"the ControlNet hint is {w}x{h}, the run needs {width}x{height}: resized by {A1111_RESIZE[resize_mode]}")
    if resize_mode == "just_resize":
        return _resize(x, (height, width))
    fit = min if resize_mode == "resize_and_fill" else max
    k = fit(height / h, width / w)
    nh, nw = max(1, round(h * k)), max(1, round(w * k))
    y = _resize(x, (nh, nw))
    if resize_mode == "crop_and_resize":
        top, left = (nh - height) // 2, (nw - width) // 2
        return y[..., top : top + height, left : left + width].contiguous()
    border = torch.cat([x[0, :, 0], x[0, :, -1], x[0, :, :, 0], x[0, :, :, -1]], dim=1)  # (3, 2w + 2h)
    out = border.median(dim=1).values.reshape(1, 3, 1, 1).expand(1, 3, height, width).clone()
    top, left = (height - nh) // 2, (width - nw) // 2
    out[..., top : top + nh, left : left + nw] = y
    return out


def active_steps(start: float, end: float, steps: int) -> list[bool]:
    """Whether each of ``steps`` steps is controlled: its span [i/N, (i+1)/N] lies in [start, end]."""
    return [not (i / steps < start or (i + 1) / steps > end) for i in range(steps)]


def residual_scales(weight: float, mode: str, count: int) -> list[float]:
    """The multiplier of each of ``count`` residuals (13 for SD 1.x / 2.x, 10 for SDXL)."""
    if mode == "balanced":
        return [weight] * count
    return [weight * SOFT_BASE ** float(12 - k) for k in range(13)][:count]


class ControlRun:
    """The units of one run, their hints at the output size on the U-Net's device, and the
    timesteps of the run's steps, t_0 > t_1 > ... (to tell which step a model call is in)."""

    def __init__(self, controls: list[Control], hints: list[Tensor], timesteps: Tensor):
        self.controls, self.hints = controls, hints
        self.timesteps = timesteps.detach().cpu().float()  # (N,)
        n = len(timesteps)
        self.active = [active_steps(c.start, c.end, n) for c in controls]

    def step_of(self, t: Tensor) -> int:
        """The step a model call at timestep t belongs to: the last i with t_i >= t."""
        return max(int((self.timesteps >= float(t.reshape(-1)[0])).sum()) - 1, 0)

    def residuals(self, x: Tensor, t: Tensor, context: Tensor, y: Tensor | None,
                  cond_mark: Tensor | None) -> list[Tensor] | None:
        """The summed residuals for U-Net input x (B, 4, h, w) (the latents alone, without an
        inpainting U-Net's extra channels); ``cond_mark`` (B,): 1 for the conditional rows of a
        CFG batch, 0 for the unconditional ones. None when no unit acts at this step."""
        step = self.step_of(t)
        total: list[Tensor] | None = None
        for control, hint, active in zip(self.controls, self.hints, self.active):
            if not active[step]:
                continue
            rows = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
            cond_only = control.control_mode == "controlnet" or control.model.control_config.global_pool
            if cond_only and cond_mark is not None:
                rows = cond_mark.to(x.device) > 0.5
            if not rows.any():
                continue
            t_rows = t.expand(x.shape[0])[rows]
            out = control.model(x[rows], t_rows, context[rows], hint.expand(int(rows.sum()), -1, -1, -1),
                                None if y is None else y[rows])
            scales = residual_scales(control.weight, control.control_mode, len(out))
            out = [r * s for r, s in zip(out, scales)]
            if not rows.all():
                out = [r.new_zeros((x.shape[0], *r.shape[1:])).index_put((rows,), r) for r in out]
            total = out if total is None else [a + b for a, b in zip(total, out)]
        return total
