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

import diffusers
import pytest
import torch
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, home of model_checks
from model_checks import randomize_, rel_err  # noqa: E402

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


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def diffusers_config(cfg: VAEConfig) -> dict:
    levels = len(cfg.channel_mult)
    return dict(
        in_channels=cfg.in_channels,
        out_channels=cfg.out_channels,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=cfg.level_channels,
        layers_per_block=cfg.num_res_blocks,
        latent_channels=cfg.latent_channels,
        norm_num_groups=32,
        scaling_factor=cfg.scaling_factor,
    )


def to_diffusers(ours: AutoencoderKL) -> diffusers.AutoencoderKL:
    config = diffusers_config(ours.config)
    checkpoint = {f"first_stage_model.{k}": v for k, v in ours.state_dict().items()}
    theirs = diffusers.AutoencoderKL(**config).eval()
    theirs.load_state_dict(convert_ldm_vae_checkpoint(checkpoint, config), strict=True)
    return theirs


@pytest.mark.parametrize("cfg, size", CASES)
@torch.no_grad()
def test_encode_decode_match_diffusers(cfg, size):
    ours = randomize_(AutoencoderKL(cfg), seed=1).eval()
    theirs = to_diffusers(ours)
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
