"""U-Net building blocks: the timestep-conditioned residual block, resampling layers, and the
spatial transformer that injects cross-attention context.

Parameter names and layer indices follow LDM's ``openaimodel.py`` / ``attention.py`` so that
official checkpoints load with ``strict=True``:

- ``ResBlock``: ``in_layers`` [GroupNorm, SiLU, Conv3x3], ``emb_layers`` [SiLU, Linear],
  ``out_layers`` [GroupNorm, SiLU, Dropout, Conv3x3], ``skip_connection`` (1x1 conv or identity).
- ``Downsample.op`` (stride-2 conv), ``Upsample.conv`` (after nearest x2).
- ``SpatialTransformer``: ``norm``, ``proj_in``, ``transformer_blocks.N``, ``proj_out``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from unfog.nn.attention import CrossAttention, FeedForward
from unfog.nn.norm import normalization
from unfog.nn.token_merging import Merge, MergingRun


def zero_(module: nn.Module) -> nn.Module:
    """Zero a module's parameters in place (so a residual branch starts as the identity)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    """Residual block conditioned on an embedding (Ho et al. 2020; LDM ``ResBlock``).

    ``h = in_layers(x)``; the projected embedding is either added to ``h`` or, with
    ``use_scale_shift_norm`` (Nichol & Dhariwal 2021, ADM), applied as FiLM after the second
    norm: ``norm(h) * (1 + scale) + shift``. Output is ``skip_connection(x) + out_layers(h)``.
    """

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        out_channels: int | None = None,
        dropout: float = 0.0,
        use_scale_shift_norm: bool = False,
    ):
        super().__init__()
        out_channels = channels if out_channels is None else out_channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_layers = nn.Sequential(
            normalization(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1)
        )
        emb_out = 2 * out_channels if use_scale_shift_norm else out_channels
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, emb_out))
        self.out_layers = nn.Sequential(
            normalization(out_channels),
            nn.SiLU(),
            nn.Dropout(dropout),
            zero_(nn.Conv2d(out_channels, out_channels, 3, padding=1)),
        )
        if out_channels == channels:
            self.skip_connection: nn.Module = nn.Identity()
        else:
            self.skip_connection = nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        # x: (B, C_in, H, W); emb: (B, E)
        h = self.in_layers(x)  # (B, C_out, H, W)
        e = self.emb_layers(emb).to(h.dtype)[:, :, None, None]  # (B, C_out or 2*C_out, 1, 1)
        if self.use_scale_shift_norm:
            scale, shift = e.chunk(2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            h = self.out_layers[1:](h)
        else:
            h = self.out_layers(h + e)
        return self.skip_connection(x) + h  # (B, C_out, H, W)


class Downsample(nn.Module):
    """Halve the spatial size with a stride-2 3x3 conv (``op``)."""

    def __init__(self, channels: int, out_channels: int | None = None):
        super().__init__()
        out_channels = channels if out_channels is None else out_channels
        self.op = nn.Conv2d(channels, out_channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)  # (B, C, H, W) -> (B, C', ceil(H/2), ceil(W/2))


class Upsample(nn.Module):
    """Double the spatial size: nearest-neighbour x2, then a 3x3 conv (``conv``).

    ``size`` forces the output size instead (diffusers' ``Upsample2D(output_size=...)``): a U-Net
    passes the size of the skip connection it is about to join, so an odd size that ``Downsample``
    rounded up (ceil(H/2)) comes back as H, not H + 1. For size = (2H, 2W) the result is the
    same as doubling."""

    def __init__(self, channels: int, out_channels: int | None = None):
        super().__init__()
        out_channels = channels if out_channels is None else out_channels
        self.conv = nn.Conv2d(channels, out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        if size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")  # (B, C, 2H, 2W)
        else:
            x = F.interpolate(x, size=tuple(size), mode="nearest")  # (B, C, *size)
        return self.conv(x)


class BasicTransformerBlock(nn.Module):
    """Pre-norm transformer layer: self-attention, cross-attention, GEGLU MLP, each residual.

    ``x = x + attn1(norm1(x))``; ``x = x + attn2(norm2(x), context)``; ``x = x + ff(norm3(x))``.
    """

    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: int, dropout: float = 0.0):
        super().__init__()
        self.attn1 = CrossAttention(dim, None, heads, head_dim, dropout)
        self.attn2 = CrossAttention(dim, context_dim, heads, head_dim, dropout)
        self.ff = FeedForward(dim, dropout=dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor, merge: Merge | None = None) -> torch.Tensor:
        """x: (B, N, dim); context: (B, M, context_dim); ``merge``: the self-attention runs on the
        merged tokens (ToMe, ``nn.token_merging``)."""
        if merge is None:
            x = x + self.attn1(self.norm1(x))
        else:
            x = x + merge.unmerge(self.attn1(merge.merge(self.norm1(x))))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Transformer over the pixels of a feature map, attending to a context sequence (LDM).

    ``norm`` (GroupNorm, eps 1e-6) -> ``proj_in`` -> ``depth`` x BasicTransformerBlock ->
    ``proj_out`` (zero-initialised) -> residual. The projections are 1x1 convs (SD1) or, with
    ``use_linear``, Linear layers applied after flattening the pixels (SD2, SDXL).
    """

    def __init__(
        self,
        channels: int,
        heads: int,
        head_dim: int,
        context_dim: int,
        depth: int = 1,
        dropout: float = 0.0,
        use_linear: bool = False,
    ):
        super().__init__()
        inner = heads * head_dim
        self.use_linear = use_linear
        self.norm = normalization(channels, eps=1e-6)
        if use_linear:
            self.proj_in: nn.Module = nn.Linear(channels, inner)
            self.proj_out: nn.Module = zero_(nn.Linear(inner, channels))
        else:
            self.proj_in = nn.Conv2d(channels, inner, 1)
            self.proj_out = zero_(nn.Conv2d(inner, channels, 1))
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, heads, head_dim, context_dim, dropout) for _ in range(depth)
        )

    def forward(self, x: torch.Tensor, context: torch.Tensor, checkpointing: bool = False,
                merging: MergingRun | None = None) -> torch.Tensor:
        """x: (B, C, H, W); context: (B, M, context_dim). ``checkpointing``: each transformer block
        is recomputed in the backward pass instead of keeping its activations. ``merging``: token
        merging (ToMe) plans each block's merge from its input."""
        b, c, height, width = x.shape
        h = self.norm(x)
        if not self.use_linear:
            h = self.proj_in(h)  # (B, inner, H, W)
        # The tokens as one contiguous (B, H*W, C) tensor: free for a channels-last map, one copy of
        # a contiguous one. Left a transposed view, they would be copied by every block's three
        # LayerNorms, and the residual adds (which keep their first operand's layout) would run
        # strided: 2 more copies and 3 slower adds per block.
        h = h.permute(0, 2, 3, 1).reshape(b, height * width, -1).contiguous()  # (B, H*W, C or inner)
        if self.use_linear:
            h = self.proj_in(h)  # (B, H*W, inner)
        for block in self.transformer_blocks:
            merge = None if merging is None else merging.plan(h, height, width)
            if checkpointing:
                h = checkpoint(block, h, context, merge, use_reentrant=False)  # (B, H*W, inner)
            else:
                h = block(h, context, merge)
        if self.use_linear:
            h = self.proj_out(h)  # (B, H*W, C)
        h = h.reshape(b, height, width, -1).permute(0, 3, 1, 2)  # (B, C or inner, H, W), channels-last
        if not x.is_contiguous(memory_format=torch.channels_last):
            h = h.contiguous()  # back to the input's layout, so that the residual add is not strided
        if not self.use_linear:
            h = self.proj_out(h)  # (B, C, H, W)
        return x + h
