"""AutoencoderKL against diffusers' AutoencoderKL on the same weights.

Our state_dict is in the official LDM names. We prefix it with ``first_stage_model.`` (as in a
single-file SD checkpoint), convert it with diffusers' own single-file converter, load it with
``strict=True`` into diffusers' model of the matching config, and compare the posterior's mean
and std, a seeded sample, and the decoded images: relative error <= 1e-4 in float32 (we measure
about 2e-6). Configs: the tiny test preset, three levels, two levels at the real 128/256 width,
and (slow) the full SD VAE.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, home of model_checks
sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/parity: oracles
from model_checks import randomize_, rel_err  # noqa: E402
from oracles import vae_to_diffusers  # noqa: E402

from unfog.models.vae import SD_VAE, TINY_VAE, AutoencoderKL, VAEConfig  # noqa: E402

RTOL = 1e-4
# Two levels at the real SD width (128, 256 channels; 2 ResnetBlocks per level as in KL-f8).
WIDE_VAE = VAEConfig(base_channels=128, channel_mult=(1, 2), num_res_blocks=2)
# Three levels: two upsampling decoder levels, run deepest first.
DEEP_VAE = VAEConfig(base_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1)
CASES = [  # config, image size
    pytest.param(TINY_VAE, 16, id="tiny"),
    pytest.param(DEEP_VAE, 16, id="deep"),
    pytest.param(WIDE_VAE, 32, id="wide"),
    pytest.param(SD_VAE, 32, id="sd", marks=pytest.mark.slow),  # 84M parameters, about 1 GB
]


pytestmark = pytest.mark.usefixtures("single_thread")  # tests/conftest.py


@pytest.mark.parametrize("cfg, size", CASES)
@torch.no_grad()
def test_encode_decode_match_diffusers(cfg, size):
    ours = randomize_(AutoencoderKL(cfg), seed=1).eval()
    theirs = vae_to_diffusers(ours)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, size, size, generator=g) * 2 - 1  # (B, 3, H, W) in [-1, 1]

    posterior, reference = ours.encode(x), theirs.encode(x).latent_dist
    assert rel_err(posterior.mean, reference.mean) < RTOL
    assert rel_err(posterior.std, reference.std) < RTOL
    sample = posterior.sample(torch.Generator().manual_seed(3))
    assert rel_err(sample, reference.sample(torch.Generator().manual_seed(3))) < RTOL

    z = torch.randn(posterior.mean.shape, generator=g)  # (B, 4, h, w), unscaled
    assert rel_err(ours.decode(z), theirs.decode(z).sample) < RTOL
    assert theirs.config.scaling_factor == cfg.scaling_factor
