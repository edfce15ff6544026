"""ControlNet against diffusers, on the same random weights.

- SD 1.5 at full size (361M parameters; the official layout of ``ControlNet-v1-SD.txt``): a file
  in the official layout (``control_model.`` prefix) is read by ``load_controlnet`` and by
  diffusers' own single-file converter (``convert_controlnet_checkpoint``, local config, offline)
  into ``ControlNetModel``; their 13 residuals agree within 1e-4 relative in float32. The SD 1.5
  U-Net fed those residuals (``control=``) agrees with diffusers' ``UNet2DConditionModel`` fed
  them as ``down_block_additional_residuals`` / ``mid_block_additional_residual``.
- SDXL, on a narrow SDXL-like config (3 levels, linear projections, head width, the text_time
  label embedding): diffusers' ``ControlNetModel`` saved as a diffusers folder (the format of most
  SDXL ControlNets) and read by ``load_controlnet``; 10 residuals, then the controlled U-Net.

Every parameter is random, the zero-initialised ones included, so no branch is silent. A 1e-3
relative change to one zero conv of the twin moves its residual by 1e-3, ten times the tolerance
(checked below), so the comparison can fail.
"""

from __future__ import annotations

import gc
import sys
from dataclasses import replace
from pathlib import Path

import diffusers
import pytest
import torch
from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: model_checks
sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/parity: oracles
from model_checks import layout_mismatch, randomize_, randomize_meta_, rel_err  # noqa: E402
from oracles import diffusers_twin, diffusers_unet_kwargs, load_into_diffusers, shared_twin  # noqa: E402

from unfog import load_controlnet  # noqa: E402
from unfog.models.controlnet import ControlNet, ControlNetConfig  # noqa: E402
from unfog.models.presets import SD15, TINY  # noqa: E402
from unfog.models.unet import UNet  # noqa: E402
from unfog.nn.embeddings import timestep_embedding  # noqa: E402

RTOL = 1e-4
pytestmark = pytest.mark.usefixtures("single_thread")  # tests/conftest.py


def controlnet_twin(cfg, hint_channels: int = 3, **extra) -> diffusers.ControlNetModel:
    return diffusers.ControlNetModel(conditioning_channels=hint_channels, **diffusers_unet_kwargs(cfg), **extra).eval()


def check_residuals(mine: list[torch.Tensor], theirs: list[torch.Tensor], count: int) -> None:
    assert len(mine) == len(theirs) == count
    errors = []
    for i, (a, b) in enumerate(zip(mine, theirs)):
        assert a.shape == b.shape, f"residual {i}: {tuple(a.shape)} vs {tuple(b.shape)}"
        assert torch.isfinite(b).all() and b.abs().max() > 0
        errors.append(rel_err(a, b))
        assert errors[-1] <= RTOL, f"residual {i}: relative error {errors[-1]:.2e}"
    print(f"{count} residuals: largest relative error {max(errors):.2e}")  # shown with pytest -rP


# ---------------------------------------------------------------- SD 1.5, full size, official file


@torch.no_grad()
def test_sd15_controlnet_file_and_controlled_unet_match_diffusers(tmp_path):
    models = {}
    try:
        with torch.device("meta"):
            ours = ControlNet(ControlNetConfig(SD15))
        assert layout_mismatch(ours, "ControlNet-v1-SD") == ""
        ours = randomize_meta_(ours, seed=0)
        checkpoint = {f"control_model.{k}": v for k, v in ours.state_dict().items()}
        save_file(checkpoint, tmp_path / "control_sd15_random.safetensors")
        models["loaded"] = loaded = load_controlnet(tmp_path / "control_sd15_random.safetensors")
        del ours

        twin = controlnet_twin(SD15)  # diffusers' converter from the official layout, local config
        twin.load_state_dict(convert_controlnet_checkpoint(checkpoint, dict(twin.config)), strict=True)
        models["twin"] = twin
        del checkpoint

        g = torch.Generator().manual_seed(1)
        x, ctx = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, 768, generator=g)
        hint, t = torch.rand(1, 3, 64, 64, generator=g), torch.tensor([417.0])
        mine = loaded(x, t, ctx, hint)
        down, mid = twin(x, t, ctx, controlnet_cond=hint, return_dict=False)
        check_residuals(mine, [*down, mid], 13)

        # The tolerance can fail: a 1e-3 relative change to one zero conv moves its residual more.
        twin.controlnet_down_blocks[5].weight.mul_(1.001)
        moved = twin(x, t, ctx, controlnet_cond=hint, return_dict=False)[0][5]
        assert rel_err(mine[5], moved) > 5 * RTOL
        del models["twin"], twin

        with torch.device("meta"):
            unet = UNet(SD15)
        models["unet"] = unet = randomize_meta_(unet, seed=2)
        models["unet_twin"] = unet_twin = shared_twin(unet)
        out = unet(x, t, ctx, control=mine)
        expected = unet_twin(x, t, encoder_hidden_states=ctx, down_block_additional_residuals=tuple(mine[:-1]),
                             mid_block_additional_residual=mine[-1]).sample
        plain = unet(x, t, ctx)
    finally:
        models.clear()
        gc.collect()
    err = rel_err(out, expected)
    print(f"controlled SD 1.5 U-Net: relative error {err:.2e}")
    assert err <= RTOL, f"controlled U-Net: relative error {err:.2e}"
    assert rel_err(out, plain) > 1e-2  # the residuals change the output


# ---------------------------------------------------------------- SDXL-like, diffusers folder

SDXL_LIKE = replace(  # y = pooled text (16) + 6 size/crop values x 8-wide sinusoids
    TINY,
    channel_mult=(1, 2, 2),
    num_res_blocks=2,
    transformer_depth=(0, 1, 2),
    transformer_depth_middle=2,
    num_heads=None,
    num_head_channels=16,
    use_linear_projection=True,
    num_classes="sequential",
    adm_in_channels=16 + 6 * 8,
)
SDXL_EXTRA = dict(addition_embed_type="text_time", addition_time_embed_dim=8,
                  projection_class_embeddings_input_dim=SDXL_LIKE.adm_in_channels)


def sdxl_inputs(batch: int = 2):
    g = torch.Generator().manual_seed(5)
    x, ctx = torch.randn(batch, 4, 6, 6, generator=g), torch.randn(batch, 7, SDXL_LIKE.context_dim, generator=g)
    hint, t = torch.rand(batch, 3, 48, 48, generator=g), torch.tensor([17.0, 803.0][:batch])
    pooled = torch.randn(batch, 16, generator=g)
    time_ids = torch.tensor([[64.0, 64, 0, 0, 64, 64]] * batch)
    y = torch.cat([pooled, timestep_embedding(time_ids.flatten(), 8).reshape(batch, -1)], dim=1)
    return x, t, ctx, hint, y, {"text_embeds": pooled, "time_ids": time_ids}


@torch.no_grad()
def test_sdxl_like_diffusers_folder_and_controlled_unet_match_diffusers(tmp_path):
    twin = randomize_(controlnet_twin(SDXL_LIKE, **SDXL_EXTRA), seed=3).eval()
    twin.save_pretrained(tmp_path / "controlnet")  # config.json + diffusion_pytorch_model.safetensors
    loaded = load_controlnet(tmp_path / "controlnet")
    # read back from config.json; with 64-channel attended levels, 4 heads of 16 is either reading
    assert loaded.config == replace(SDXL_LIKE, num_heads=4, num_head_channels=None)
    x, t, ctx, hint, y, added = sdxl_inputs()
    mine = loaded(x, t, ctx, hint, y=y)
    down, mid = twin(x, t, ctx, controlnet_cond=hint, added_cond_kwargs=added, return_dict=False)
    check_residuals(mine, [*down, mid], 10)  # input conv + 3 levels x 2 ResBlocks + 2 Downsamples, middle

    unet = randomize_(UNet(SDXL_LIKE), seed=4).eval()
    unet_twin = diffusers_twin(SDXL_LIKE, **SDXL_EXTRA)
    load_into_diffusers(unet, unet_twin)
    out = unet(x, t, ctx, y=y, control=mine)
    expected = unet_twin(x, t, encoder_hidden_states=ctx, added_cond_kwargs=added,
                         down_block_additional_residuals=tuple(mine[:-1]), mid_block_additional_residual=mine[-1]).sample
    err = rel_err(out, expected)
    print(f"controlled SDXL-like U-Net: relative error {err:.2e}")
    assert err <= RTOL
    assert rel_err(out, unet(x, t, ctx, y=y)) > 1e-2
