"""Tiled VAE encode and decode (``unfog.models.vae_tiling``): the tile grid and blend weights,
exactness where tiling cannot change anything, and, on a tiny random VAE, a bounded difference
from the whole-image computation with no seams at the tile borders."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from unfog.models.vae import TINY_VAE, AutoencoderKL
from unfog.models.vae_tiling import Tiling, edge_ramp, tile_starts, tiled_map

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: model_checks
from model_checks import randomize_  # noqa: E402

WHOLE = Tiling("never")
TILES = Tiling("always", tile=32, overlap=8)  # on TINY_VAE (f = 2): 64 px tiles, 16 px blended
F_TINY = TINY_VAE.downsample_factor


pytestmark = pytest.mark.usefixtures("single_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def vae() -> AutoencoderKL:
    return randomize_(AutoencoderKL(TINY_VAE)).eval()


# ---------------------------------------------------------------- grid and weights


@pytest.mark.parametrize("length, tile, overlap", [(48, 32, 8), (100, 16, 4), (17, 16, 0), (64, 64, 8), (5, 8, 2)])
def test_tile_starts_cover_with_whole_tiles(length, tile, overlap):
    starts = tile_starts(length, tile, overlap)
    size = min(tile, length)
    assert starts[0] == 0 and starts[-1] + size == length
    for a, b in zip(starts, starts[1:]):
        assert 0 < b - a <= tile - overlap  # neighbours share at least `overlap`


def test_edge_ramps_are_complementary_and_flat_at_the_borders():
    left, right = edge_ramp(16, 4, rise=False, fall=True), edge_ramp(16, 4, rise=True, fall=False)
    torch.testing.assert_close(left[-4:] + right[:4], torch.ones(4))
    assert torch.equal(left[:12], torch.ones(12)) and torch.equal(right[4:], torch.ones(12))
    assert (edge_ramp(6, 4, True, True) > 0).all()  # rises and falls overlapping: still positive
    assert torch.equal(edge_ramp(8, 0, True, True), torch.ones(8))


@pytest.mark.parametrize("scale_in, scale_out", [(1, 4), (4, 1)])
def test_tiled_map_is_exact_for_a_pointwise_map(scale_in, scale_out):
    """A map whose output pixel depends only on its own input unit is unchanged by tiling: the
    blend is a convex combination of identical values (up to float rounding)."""
    def fn(x):
        x = F.avg_pool2d(x, scale_in) if scale_in > 1 else x
        return torch.tanh(F.interpolate(x, scale_factor=scale_out) * 2 + 1) if scale_out > 1 else torch.tanh(x)

    x = torch.randn(2, 3, 37 * scale_in, 50 * scale_in, generator=torch.Generator().manual_seed(0))
    tiled = tiled_map(fn, x, tile=16, overlap=5, scale_in=scale_in, scale_out=scale_out)
    torch.testing.assert_close(tiled, fn(x), rtol=0, atol=1e-6)


# ---------------------------------------------------------------- policy


def test_when_auto_tiles():
    auto = Tiling()  # 64-latent tiles, above 1024 px
    assert not auto.applies((128, 128), 8) and auto.applies((129, 64), 8)
    assert not Tiling("always").applies((64, 64), 8) and Tiling("always").applies((65, 8), 8)
    assert not Tiling("never").applies((512, 512), 8)


@pytest.mark.parametrize(
    "kwargs, match",
    [(dict(mode="sometimes"), "unknown tiling mode 'sometimes'; valid choices: auto, always, never"),
     (dict(tile=0), "tile must be"),
     (dict(overlap=64), r"overlap must be in \[0, tile=64\)"), (dict(overlap=-1), "overlap"), (dict(above=0), "above")],
)
def test_bad_tiling_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Tiling(**kwargs)


def test_auto_tiling_of_large_images(vae, monkeypatch):
    calls = []
    decode = vae._decode
    monkeypatch.setattr(vae, "_decode", lambda z: calls.append(tuple(z.shape[2:])) or decode(z))
    monkeypatch.setattr(vae, "tiling", Tiling("auto", tile=16, overlap=4, above=40))
    vae.decode(torch.randn(1, 4, 20, 20))  # 40 px: whole
    assert calls == [(20, 20)]
    calls.clear()
    vae.decode(torch.randn(1, 4, 24, 20))  # 48 px: tiled
    assert len(calls) == 4 and set(calls) == {(16, 16)}


# ---------------------------------------------------------------- on a tiny VAE


def test_one_tile_is_exactly_the_whole_computation(vae):
    g = torch.Generator().manual_seed(1)
    z, images = torch.randn(2, 4, 32, 32, generator=g), torch.rand(2, 3, 64, 64, generator=g) * 2 - 1
    with torch.no_grad():
        assert torch.equal(vae.decode(z, tiling=TILES), vae.decode(z, tiling=WHOLE))
        assert torch.equal(vae.encode(images, tiling=TILES).mean, vae.encode(images, tiling=WHOLE).mean)


def seam_ratio(error: torch.Tensor, edges: list[int]) -> float:
    """The largest mean jump of ``error`` between neighbouring rows or columns at a tile edge,
    over the median jump anywhere: about 1 when the error is smooth, large at a seam."""
    cols = (error[..., :, 1:] - error[..., :, :-1]).abs().mean(dim=(0, 1, 2))  # (W - 1,)
    rows = (error[..., 1:, :] - error[..., :-1, :]).abs().mean(dim=(0, 1, 3))  # (H - 1,)
    at_edges = torch.stack([cols[e - 1] for e in edges] + [rows[e - 1] for e in edges])
    return (at_edges.max() / torch.cat([cols, rows]).median()).item()


def test_tiled_decode_is_close_and_seamless(vae):
    """48 x 48 latents in 32-latent tiles (starts 0 and 16): the result differs from the whole
    decode only because each tile's GroupNorm statistics and attention see the tile (seen on this
    random VAE: max 8-11%, mean 6-7% of the output's range), and the error is as smooth across
    the tile edges as elsewhere, while pasting the same tiles without blending leaves seams."""
    n, tile = 48, TILES.tile
    z = torch.randn(2, 4, n, n, generator=torch.Generator().manual_seed(0))
    starts = tile_starts(n, tile, TILES.overlap)
    with torch.no_grad():
        whole = vae.decode(z, tiling=WHOLE)
        tiled = vae.decode(z, tiling=TILES)
        pasted = torch.zeros_like(whole)
        for r in starts:
            for c in starts:
                rows, cols = slice(r * F_TINY, (r + tile) * F_TINY), slice(c * F_TINY, (c + tile) * F_TINY)
                pasted[..., rows, cols] = vae.decode(z[..., r : r + tile, c : c + tile], tiling=WHOLE)
    error, scale = tiled - whole, whole.abs().max()
    assert error.abs().max() < 0.2 * scale and error.abs().mean() < 0.1 * whole.abs().mean()
    edges = sorted({s * F_TINY for s in starts[1:]} | {(s + tile) * F_TINY for s in starts[:-1]})
    assert seam_ratio(error, edges) < 2.0  # seen: 1.1-1.3
    assert seam_ratio(pasted - whole, edges) > 4.0  # the measure does see seams (seen: 8-9)


def test_tiled_encode_is_close(vae):
    images = torch.rand(2, 3, 96, 96, generator=torch.Generator().manual_seed(3)) * 2 - 1
    with torch.no_grad():
        whole, tiled = vae.encode(images, tiling=WHOLE), vae.encode(images, tiling=TILES)
    error = tiled.mean - whole.mean
    assert error.abs().max() < 0.2 * whole.mean.abs().max()  # seen: about 0.1
    assert error.abs().mean() < 0.1 * whole.mean.abs().mean()  # seen: about 0.06
    assert tiled.mean.shape == whole.mean.shape == (2, 4, 48, 48)
