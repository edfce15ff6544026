"""ControlNet (Zhang, Rao & Agrawala 2023, "Adding Conditional Control to Text-to-Image Diffusion
Models"): a trainable copy of a U-Net's encoder, fed a hint image, whose zero-initialised 1x1
convolutions give one residual per skip connection and one for the middle block.

The encoder is ``UNetEncoder``, built by the U-Net's own builders from the controlled U-Net's
config, so the attribute names are the official ``cldm.ControlNet`` keys (``control_model.`` in a
file) and a ControlNet trained from a U-Net starts with that U-Net's weights, name for name:

- ``time_embed``, ``label_emb`` (SDXL), ``input_blocks``, ``middle_block``: as in the U-Net;
- ``input_hint_block``: the hint encoder, 8 3x3 convs with SiLU between, three of stride 2, from
  the hint image (``hint_channels``, at 8x the latent size) to ``model_channels`` at the latent
  size; its last conv starts at zero. Its output is added to that of ``input_blocks.0``.
- ``zero_convs``: one 1x1 conv per input block, ``middle_block_out``: one for the middle block.

``forward(x, timesteps, context, hint, y=None)`` returns the residuals in that order (13 for SD
1.x / 2.x, 10 for SDXL): ``UNet.forward(..., control=residuals)`` adds them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from unfog.models.unet import UNetConfig, UNetEncoder
from unfog.nn.blocks import zero_

# The hint encoder's convolutions: (output channels, stride); the last maps to model_channels.
HINT_CONVS = ((16, 1), (16, 1), (32, 2), (32, 1), (96, 2), (96, 1), (256, 2))
HINT_DOWNSCALE = 8  # 2 ** (number of stride-2 convs): the hint is 8x the latent size


@dataclass(frozen=True)
class ControlNetConfig:
    """unet: the config of the U-Net the ControlNet controls (its encoder is copied; the decoder
    settings, ``out_channels``, are unused). hint_channels: channels of the hint image (3, RGB).
    global_pool: each residual averaged over its height and width, (B, C, 1, 1), which the U-Net
    adds everywhere (the v1.1 shuffle model: the official yaml's ``global_average_pooling``,
    diffusers' ``global_pool_conditions``); pipelines give such a ControlNet the conditional half
    of classifier-free guidance alone, as sd-webui-controlnet and diffusers do."""

    unet: UNetConfig
    hint_channels: int = 3
    global_pool: bool = False

    def __post_init__(self) -> None:
        if self.hint_channels < 1:
            raise ValueError(f"hint_channels must be >= 1, got {self.hint_channels}")


def hint_encoder(hint_channels: int, model_channels: int) -> nn.Sequential:
    """The official ``input_hint_block``: convs at indices 0, 2, ..., 14, SiLU between them."""
    layers: list[nn.Module] = []
    ch = hint_channels
    for out_ch, stride in HINT_CONVS:
        layers += [nn.Conv2d(ch, out_ch, 3, padding=1, stride=stride), nn.SiLU()]
        ch = out_ch
    layers.append(zero_(nn.Conv2d(ch, model_channels, 3, padding=1)))
    return nn.Sequential(*layers)


def _zero_conv(channels: int) -> nn.Sequential:
    return nn.Sequential(zero_(nn.Conv2d(channels, channels, 1)))  # key: <name>.0.weight


class ControlNet(UNetEncoder):
    """A U-Net encoder copy with a hint encoder and zero convolutions (see the module docstring)."""

    def __init__(self, config: ControlNetConfig):
        super().__init__(config.unet)
        self.control_config = config
        self.input_hint_block = hint_encoder(config.hint_channels, config.unet.model_channels)
        self.zero_convs = nn.ModuleList(_zero_conv(ch) for ch in self.skip_channels)
        self.middle_block_out = _zero_conv(config.unet.level_channels[-1])

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor | float,
        context: torch.Tensor | None,
        hint: torch.Tensor,
        y: torch.Tensor | None = None,
    ) -> list[torch.Tensor]:
        """x: (B, in_channels, H, W) latents; hint: (B, hint_channels, 8H, 8W) image in [0, 1];
        timesteps, context, y: as for ``UNet``. Returns one residual per input block, shaped as
        its output, then the middle block's: ``UNet.forward``'s ``control``."""
        self.check_inputs(x, context, y)
        b, _, height, width = x.shape
        expected = (b, self.control_config.hint_channels, HINT_DOWNSCALE * height, HINT_DOWNSCALE * width)
        if tuple(hint.shape) != expected:
            raise ValueError(
                f"hint must be (B, {expected[1]}, {HINT_DOWNSCALE}H, {HINT_DOWNSCALE}W) = {expected} for latents "
                f"of shape {tuple(x.shape)}, got {tuple(hint.shape)}"
            )
        dtype = self.time_embed[0].weight.dtype
        emb = self.embed(timesteps, x, y, dtype)  # (B, 4 * model_channels)
        context = None if context is None else context.to(dtype)
        guide = self.input_hint_block(hint.to(dtype))  # (B, model_channels, H, W)
        h = self.run_block(self.input_blocks[0], x.to(dtype), emb, context) + guide
        residuals = [self.zero_convs[0](h)]
        for block, zero_conv in zip(self.input_blocks[1:], self.zero_convs[1:]):
            h = self.run_block(block, h, emb, context)
            residuals.append(zero_conv(h))
        h = self.run_block(self.middle_block, h, emb, context)
        residuals.append(self.middle_block_out(h))
        if self.control_config.global_pool:
            residuals = [r.mean(dim=(2, 3), keepdim=True) for r in residuals]  # (B, C, 1, 1)
        return residuals
