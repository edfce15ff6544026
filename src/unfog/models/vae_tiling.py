"""Tiled VAE encode and decode: a large image in overlapping tiles, blended linearly.

The VAE's cost in memory grows with the image: at 2048 x 2048 px one 128-channel feature map of
the decoder's last level is 2 GiB in float32, and its mid-block attention runs over all
(2048 / 8)^2 latent pixels. Tiling bounds both by the tile size. Tiles are laid out on the latent
grid (``tile`` latent pixels a side, neighbours sharing ``overlap``), so a decode tile is
``tile`` latents in and ``tile * f`` pixels out, and an encode tile ``tile * f`` pixels in and
``tile`` latents out. Each output tile is weighted by a ramp that rises linearly across the
shared bands (and is flat at the image's own borders), and the weighted tiles are summed and
divided by the summed weights, so every output pixel is a convex blend and there is no seam.

This is an approximation: a tile's GroupNorm statistics and mid-block attention see only the
tile, not the whole image (diffusers' ``enable_tiling`` has the same limits). An image that fits
in one tile is computed whole, exactly as without tiling.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, get_args

import torch

from ..choices import check_choice

TilingMode = Literal["auto", "always", "never"]


@dataclass(frozen=True)
class Tiling:
    """When and how ``AutoencoderKL`` splits its work into tiles.

    mode: "auto" tiles images whose longer side exceeds ``above`` pixels; "always" tiles any
        image larger than one tile; "never" computes every image whole.
    tile: tile side in latent pixels (64: 512 image pixels for the f = 8 Stable Diffusion VAE).
    overlap: latent pixels shared by neighbouring tiles, blended linearly (8: 64 image pixels).
    above: the image side, in pixels, beyond which "auto" tiles.
    """

    mode: TilingMode = "auto"
    tile: int = 64
    overlap: int = 8
    above: int = 1024

    def __post_init__(self) -> None:
        if self.mode not in get_args(TilingMode):
            check_choice("tiling mode", self.mode, get_args(TilingMode))
        if self.tile < 1:
            raise ValueError(f"tile must be >= 1 latent pixel, got {self.tile}")
        if not 0 <= self.overlap < self.tile:
            raise ValueError(f"overlap must be in [0, tile={self.tile}), got {self.overlap}")
        if self.above < 1:
            raise ValueError(f"above must be >= 1 pixel, got {self.above}")

    def applies(self, latent_size: tuple[int, int], factor: int) -> bool:
        """Whether an image of ``latent_size`` latent pixels (``factor`` image pixels each) is tiled."""
        if self.mode == "never" or max(latent_size) <= self.tile:
            return False
        return self.mode == "always" or max(latent_size) * factor > self.above


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Where tiles of ``tile`` units start to cover ``[0, length)``: every ``tile - overlap`` units,
    the last one moved back to end at ``length`` so that every tile is whole (it then shares more
    than ``overlap`` with its neighbour). One tile, ``[0]``, when ``length <= tile``."""
    if length <= tile:
        return [0]
    return [*range(0, length - tile, tile - overlap), length - tile]


def edge_ramp(size: int, ramp: int, rise: bool, fall: bool) -> torch.Tensor:
    """(size,) float32 blend weights of one tile along one axis: 1, except a linear rise over the
    first ``ramp`` elements (``rise``: a neighbour before) and a fall over the last ``ramp``
    (``fall``: a neighbour after). Values ``(i + 0.5) / ramp``, so two complementary ramps sum to 1
    and no weight is 0."""
    w = torch.ones(size)
    ramp = min(ramp, size)
    if ramp == 0:
        return w
    up = (torch.arange(ramp, dtype=torch.float32) + 0.5) / ramp  # (ramp,)
    if rise:
        w[:ramp] = up
    if fall:
        w[size - ramp :] = torch.minimum(w[size - ramp :], up.flip(0))
    return w


def tiled_map(
    fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    *,
    tile: int,
    overlap: int,
    scale_in: int,
    scale_out: int,
) -> torch.Tensor:
    """``fn`` (a map that scales the spatial size by ``scale_out / scale_in``) applied to
    overlapping tiles of ``x`` (B, C, H, W), blended into one output (B, C', H', W').

    The tiles lie on a grid of units of ``scale_in`` input and ``scale_out`` output elements (the
    latent pixels): ``tile`` units a side, neighbours sharing ``overlap``, and the output is blended
    over ``overlap * scale_out`` elements. With one tile, ``fn(x)`` is returned as it is.
    """
    units_h, units_w = x.shape[-2] // scale_in, x.shape[-1] // scale_in
    rows, cols = tile_starts(units_h, tile, overlap), tile_starts(units_w, tile, overlap)
    if len(rows) == len(cols) == 1:
        return fn(x)
    th, tw, ramp = min(tile, units_h), min(tile, units_w), overlap * scale_out
    out = weight = None
    for r in rows:
        wy = edge_ramp(th * scale_out, ramp, r > 0, r + th < units_h)  # (th * scale_out,)
        for c in cols:
            piece = fn(x[..., r * scale_in : (r + th) * scale_in, c * scale_in : (c + tw) * scale_in])
            if out is None:
                out = piece.new_zeros((*piece.shape[:2], units_h * scale_out, units_w * scale_out), dtype=torch.float32)
                weight = torch.zeros(out.shape[-2:], device=out.device)  # (H', W')
            w = (wy[:, None] * edge_ramp(tw * scale_out, ramp, c > 0, c + tw < units_w)[None, :]).to(out.device)
            rows_out = slice(r * scale_out, (r + th) * scale_out)
            cols_out = slice(c * scale_out, (c + tw) * scale_out)
            out[..., rows_out, cols_out] += piece.float() * w  # (B, C', th', tw')
            weight[rows_out, cols_out] += w
    return (out / weight).to(piece.dtype)  # (B, C', H', W')
