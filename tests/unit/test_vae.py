"""Contracts of the KL autoencoder: the official checkpoint layout, presets, shapes, the latent
distribution (clamping, seeded sampling), input validation and reduced precision."""

from __future__ import annotations

import sys
import types
from dataclasses import replace
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, home of model_checks
from model_checks import layout_mismatch, randomize_, read_layout, rel_err  # noqa: E402

from unfog.models.vae import (  # noqa: E402
    SD_VAE,
    SDXL_VAE,
    TINY_VAE,
    VAE_PRESETS,
    AutoencoderKL,
    DiagonalGaussian,
    VAEConfig,
)


pytestmark = pytest.mark.usefixtures("single_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def tiny() -> AutoencoderKL:
    return randomize_(AutoencoderKL(TINY_VAE)).eval()


# ---------------------------------------------------------------- layout and presets


@pytest.mark.parametrize("preset", ["SD_VAE", "SDXL_VAE"])
def test_state_dict_matches_official_layout(preset):
    with torch.device("meta"):
        model = AutoencoderKL(VAE_PRESETS[preset])
    mismatch = layout_mismatch(model, "VAE-v1-SD")
    assert not mismatch, mismatch


def test_every_norm_is_ldm_groupnorm():
    """GroupNorm(32, eps=1e-6) everywhere (LDM ``Normalize``); parity is blind to eps at 1e-4."""
    with torch.device("meta"):
        model = AutoencoderKL(SD_VAE)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.GroupNorm)]
    official = [k for k in read_layout("VAE-v1-SD") if k.split(".")[-2].startswith("norm")]
    assert len(norms) == len(official) / 2  # one weight and one bias each
    assert all(n.num_groups == 32 and n.eps == 1e-6 for n in norms)


def test_preset_scaling_factors_and_geometry():
    assert SD_VAE.scaling_factor == 0.18215
    assert SDXL_VAE.scaling_factor == 0.13025
    assert replace(SDXL_VAE, scaling_factor=SD_VAE.scaling_factor) == SD_VAE  # same network
    assert SD_VAE.downsample_factor == 8 and SD_VAE.latent_channels == 4
    assert TINY_VAE.downsample_factor == 2


def test_config_validation():
    assert VAEConfig(channel_mult=[1, 2]).channel_mult == (1, 2)  # lists (JSON) become tuples
    with pytest.raises(ValueError, match="not divisible by the 32 GroupNorm groups"):
        VAEConfig(base_channels=48)
    with pytest.raises(ValueError, match="scaling_factor must be > 0"):
        VAEConfig(scaling_factor=0.0)
    with pytest.raises(ValueError, match="channel_mult must be a non-empty"):
        VAEConfig(channel_mult=())
    with pytest.raises(ValueError, match="latent_channels must be >= 1"):
        VAEConfig(latent_channels=0)
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\)"):
        VAEConfig(dropout=1.0)


# ---------------------------------------------------------------- encode / decode


@torch.no_grad()
def test_shapes_and_round_trip(tiny):
    x = torch.rand(2, 3, 16, 12) * 2 - 1
    posterior = tiny.encode(x)
    assert posterior.mean.shape == posterior.std.shape == (2, 4, 8, 6)
    assert torch.equal(posterior.mode(), posterior.mean)
    assert tiny.decode(posterior.mode()).shape == x.shape
    assert tiny(x, torch.Generator().manual_seed(0)).shape == x.shape


def test_gradients_reach_every_parameter(tiny):
    model = AutoencoderKL(TINY_VAE).train()
    model.load_state_dict(tiny.state_dict())
    model(torch.randn(1, 3, 8, 8), torch.Generator().manual_seed(0)).square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


@torch.no_grad()
def test_sample_is_seeded_and_drawn_on_cpu(tiny):
    posterior = tiny.encode(torch.randn(2, 3, 8, 8))
    a = posterior.sample(torch.Generator().manual_seed(7))
    b = posterior.sample(torch.Generator().manual_seed(7))
    c = posterior.sample(torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    eps = torch.randn(posterior.mean.shape, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(a, posterior.mean + posterior.std * eps, rtol=0, atol=0)
    not_cpu = types.SimpleNamespace(device=torch.device("cuda"))
    with pytest.raises(ValueError, match="CPU generator"):
        posterior.sample(not_cpu)


def test_logvar_is_clamped_like_ldm():
    mean = torch.zeros(1, 2, 1, 1)
    logvar = torch.tensor([100.0, -100.0]).reshape(1, 2, 1, 1)
    posterior = DiagonalGaussian(torch.cat([mean, logvar], dim=1))
    assert posterior.logvar.flatten().tolist() == [20.0, -30.0]
    torch.testing.assert_close(posterior.std.flatten(), torch.tensor([20.0, -30.0]).mul(0.5).exp())
    torch.testing.assert_close(posterior.var, posterior.std.square())


@pytest.mark.parametrize(
    "shape, match",
    [
        ((1, 4, 8, 8), r"images must be \(B, 3, H, W\), got \(1, 4, 8, 8\)"),
        ((3, 8, 8), r"images must be \(B, 3, H, W\)"),
        ((1, 3, 9, 8), r"H and W must be divisible by 2 \(2\*\*\(levels-1\)\), got \(9, 8\)"),
        ((1, 3, 8, 7), r"divisible by 2"),
    ],
)
def test_encode_rejects_bad_images(tiny, shape, match):
    with pytest.raises(ValueError, match=match):
        tiny.encode(torch.zeros(shape))


def test_bad_sizes_use_the_full_downsample_factor():
    with torch.device("meta"):
        model = AutoencoderKL(SD_VAE)
    with pytest.raises(ValueError, match=r"divisible by 8 .*got \(60, 64\)"):
        model.encode(torch.zeros(1, 3, 60, 64, device="meta"))


@pytest.mark.parametrize("shape", [(1, 3, 4, 4), (4, 4, 4)])
def test_decode_rejects_bad_latents(tiny, shape):
    with pytest.raises(ValueError, match=r"latents must be \(B, 4, h, w\)"):
        tiny.decode(torch.zeros(shape))


# ---------------------------------------------------------------- precision


@torch.no_grad()
def test_bf16_weights_and_autocast(tiny):
    x, z = torch.rand(2, 3, 8, 8) * 2 - 1, torch.randn(2, 4, 4, 4)
    ref_mean, ref_img = tiny.encode(x).mean, tiny.decode(z)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mean, img = tiny.encode(x).mean, tiny.decode(z)
    assert mean.dtype == img.dtype == torch.float32  # results come back in the input's dtype
    assert rel_err(mean, ref_mean) < 5e-2 and rel_err(img, ref_img) < 5e-2
    model = AutoencoderKL(TINY_VAE).to(torch.bfloat16).eval()
    model.load_state_dict(tiny.state_dict())
    mean, img = model.encode(x).mean, model.decode(z)  # float32 in: computed in bf16
    assert mean.dtype == img.dtype == torch.float32
    assert rel_err(mean, ref_mean) < 5e-2 and rel_err(img, ref_img) < 5e-2
    assert model.decode(z.bfloat16()).dtype == torch.bfloat16
