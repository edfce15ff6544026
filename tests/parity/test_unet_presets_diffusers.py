"""Every official U-Net preset, at full size, against diffusers' UNet2DConditionModel on the same
weights: SD 1.5, SD 2.x, their inpainting variants, SDXL base and refiner.

Our U-Net is built from the preset and given random weights (every parameter, including those
initialised to zero, so that no branch is silent); diffusers' twin is built on the meta device and
loaded with ``assign=True`` from diffusers' own single-file converter, so the two models share
every weight tensor and SDXL (10.3 GB in float32) needs the memory of one copy, not two. Inputs
are small: batch 1, 8 x 8 latents, 77 context tokens of the preset's width and, for SDXL, a
vector y of the preset's ADM width. Relative error <= 1e-4 in float32 (we measure 0: on the
CPU the two forwards are bit-identical; a 1e-3 relative change to a single weight tensor of the
twin moves the SD 1.5 output by 5e-6 to 5e-4, and a misplaced tensor by far more).

The small-config parity tests (several configs, batch 2, odd sizes) are in tests/unit/test_unet.py.
"""

from __future__ import annotations

import gc
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, home of model_checks
sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/parity: oracles
from model_checks import randomize_meta_, rel_err  # noqa: E402
from oracles import shared_twin  # noqa: E402

from unfog.models.presets import PRESETS  # noqa: E402
from unfog.models.unet import UNet  # noqa: E402
from unfog.nn.embeddings import timestep_embedding  # noqa: E402

RTOL = 1e-4
LATENT, TOKENS = 8, 77
POOLED, SIZE_EMB = 1280, 256  # SDXL y: pooled bigG text embedding + 256-wide sinusoid per id
# SDXL time ids: original size, crop top-left, target size (base); the refiner replaces the
# target size with an aesthetic score.
TIME_IDS = {"SDXL_BASE": [1024.0, 1024, 0, 0, 1024, 1024], "SDXL_REFINER": [1024.0, 1024, 0, 0, 6.0]}

# Measured on the idle 2-core CPU, each case alone in a pytest process: its duration (about half
# of it filling the weights) and the process's peak RSS. The models are freed after each case, so
# the whole module peaks at the SDXL base figure.
CASES = [
    pytest.param("SD15", id="sd15"),  # 0.86B parameters: 8 s, 3.7 GiB
    pytest.param("SD15_INPAINT", id="sd15-inpaint"),  # 8 s, 3.7 GiB
    pytest.param("SD2", id="sd2"),  # 9 s, 3.7 GiB
    pytest.param("SD2_INPAINT", id="sd2-inpaint"),  # 8 s, 3.7 GiB
    pytest.param("SDXL_BASE", id="sdxl-base", marks=pytest.mark.slow),  # 2.57B: 48 s, 10.1 GiB
    pytest.param("SDXL_REFINER", id="sdxl-refiner", marks=pytest.mark.slow),  # 2.26B: 35 s, 9.0 GiB
]


def random_unet(preset: str, seed: int = 0) -> UNet:
    """Our U-Net for ``preset``, allocated without running its initialisers and filled with
    well-scaled noise (``model_checks.randomize_meta_``)."""
    with torch.device("meta"):
        model = UNet(PRESETS[preset])
    return randomize_meta_(model, seed)


def inputs(preset: str) -> tuple[dict, dict]:
    """Keyword arguments for our forward and for diffusers' (the same x, t and context)."""
    cfg = PRESETS[preset]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, cfg.in_channels, LATENT, LATENT, generator=g)
    context = torch.randn(1, TOKENS, cfg.context_dim, generator=g)
    t = torch.tensor([417.0])
    ours = dict(x=x, timesteps=t, context=context)
    theirs = dict(sample=x, timestep=t, encoder_hidden_states=context)
    if cfg.num_classes == "sequential":
        pooled = torch.randn(1, POOLED, generator=g)
        time_ids = torch.tensor([TIME_IDS[preset]])
        # y = pooled text embedding, then a 256-wide sinusoidal embedding of each time id.
        y = torch.cat([pooled, timestep_embedding(time_ids.flatten(), SIZE_EMB).reshape(1, -1)], dim=1)
        assert y.shape == (1, cfg.adm_in_channels)
        ours["y"] = y
        theirs["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": time_ids}
    return ours, theirs


def twin_extras(preset: str) -> dict:
    cfg = PRESETS[preset]
    if cfg.num_classes != "sequential":
        return {}
    return dict(
        addition_embed_type="text_time",
        addition_time_embed_dim=SIZE_EMB,
        projection_class_embeddings_input_dim=cfg.adm_in_channels,
    )


def unshared_bytes(ours: torch.nn.Module, twin: torch.nn.Module) -> tuple[int, int]:
    """(bytes of twin's parameters whose storage is not one of ours, bytes of all of them)."""
    our_storages = {p.untyped_storage().data_ptr() for p in ours.parameters()}
    own = total = 0
    for p in twin.parameters():
        nbytes = p.numel() * p.element_size()
        total += nbytes
        own += 0 if p.untyped_storage().data_ptr() in our_storages else nbytes
    return own, total


@pytest.mark.parametrize("preset", CASES)
@torch.no_grad()
def test_preset_matches_diffusers(preset):
    models = {}  # cleared in `finally`, so a failure's traceback does not keep gigabytes alive
    try:
        models["ours"] = ours = random_unet(preset)
        models["twin"] = twin = shared_twin(ours, **twin_extras(preset))
        own, total = unshared_bytes(ours, twin)
        our_args, their_args = inputs(preset)
        mine = ours(**our_args)
        expected = twin(**their_args).sample
    finally:
        models.clear()
        ours = twin = None
        gc.collect()
    # diffusers' converter only renames, so the twin holds no weights of its own (we measure 0).
    assert own <= 0.01 * total, f"the twin holds {own / 2**20:.0f} MiB of its own weights"
    assert mine.shape == expected.shape == (1, 4, LATENT, LATENT)
    assert torch.isfinite(expected).all() and expected.abs().max() > 0
    err = rel_err(mine, expected)
    print(f"{preset}: relative error {err:.2e}")  # shown with pytest -rP
    assert err <= RTOL, f"{preset}: relative error {err:.2e}"
