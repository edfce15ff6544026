"""Normalisation layers that stay numerically safe under reduced precision."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class GroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` computed in float32 and cast back to the input dtype.

    Group statistics over large feature maps lose precision in bf16/fp16, so (like LDM's
    ``GroupNorm32``) we always normalise in float32. Parameter names are ``weight``/``bias``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        y = F.group_norm(x.float(), self.num_groups, weight, bias, self.eps)
        return y.to(x.dtype)


def normalization(channels: int, eps: float = 1e-5, groups: int = 32) -> GroupNorm:
    """The U-Net's GroupNorm: 32 groups, affine; LDM ``normalization(channels)``."""
    return GroupNorm(groups, channels, eps=eps)
