"""Sinusoidal embeddings of scalar conditions (diffusion timesteps, SDXL size/crop values)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, as LDM's ``timestep_embedding``.

    With ``half = dim // 2`` and frequencies ``f_i = exp(-ln(max_period) * i / half)``
    for ``i = 0 .. half-1``, returns ``cat[cos(t * f), sin(t * f)]`` (cos first), plus one zero
    column when ``dim`` is odd. Computed in float32 whatever the input dtype.

    timesteps: (B,) -> (B, dim) float32
    """
    half = dim // 2
    i = torch.arange(half, dtype=torch.float32, device=timesteps.device)
    freqs = torch.exp(-math.log(max_period) * i / half)  # (half,)
    args = timesteps.float()[:, None] * freqs[None, :]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, 2 * half)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb
