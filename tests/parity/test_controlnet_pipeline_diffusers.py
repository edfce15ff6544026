"""``StableDiffusion(..., controls=[...])`` against diffusers' ControlNet pipelines on the same tiny
random models, fp32, as ``test_pipelines_diffusers.py`` does for the plain pipelines (same
scheduler settings, same start latents or seed; latents and images within 1e-4 relative).

The ControlNets are diffusers' ``ControlNetModel`` with random weights, saved as diffusers folders
and read by ``unfog.load_controlnet``. The VAE downsamples 8x, so the hint is the image's size, as
the ControlNet's hint encoder needs.

Control modes: diffusers' ``guess_mode`` gives the conditional half alone the residuals, scaled by
``logspace(-1, 0, n)``; unfog's "controlnet" mode follows sd-webui-controlnet, whose scales are
``0.825 ** (12 - k)`` (docs/controlnet.md). To compare the rest of the mode exactly, the oracle is
diffusers' ControlNetModel with its scales replaced by sd-webui-controlnet's (``SoftScaled``); the
same wrapper, outside guess mode, is the "prompt" mode (soft scales on both halves).
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import diffusers
import pytest
import torch
from diffusers import StableDiffusionControlNetImg2ImgPipeline, StableDiffusionControlNetPipeline

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: model_checks
sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/parity
from model_checks import randomize_, rel_err  # noqa: E402
from oracles import diffusers_unet_kwargs, vae_to_diffusers  # noqa: E402
from test_pipelines_diffusers import (  # noqa: E402, F401  (clip_l, tokenizers, big_g: fixtures)
    NEGATIVE, PROMPT, SD1_UNET, SDXL_UNET, big_g, clip_l, euler, sdxl_unet_pair, tokenizers, unet_pair)

from unfog import load_controlnet  # noqa: E402
from unfog.models.vae import TINY_VAE, AutoencoderKL  # noqa: E402
from unfog.pipelines import StableDiffusion  # noqa: E402
from unfog.pipelines.controlnet import Control  # noqa: E402

RTOL = 1e-4
SIZE = 64  # pixels; the VAE below downsamples 8x: 8 x 8 latents, and the hint is 64 x 64
STEPS = 6
VAE_8X = replace(TINY_VAE, channel_mult=(1, 1, 1, 1))
A1111_SOFT = torch.tensor([0.825 ** float(12 - k) for k in range(13)], dtype=torch.float64)  # sd-webui-controlnet

pytestmark = pytest.mark.usefixtures("single_thread")  # tests/conftest.py


class SoftScaled(diffusers.ControlNetModel):
    """diffusers' ControlNet with sd-webui-controlnet's soft scales: its residual k times
    0.825^(12 - k) (the first n of 13) in place of guess mode's logspace(-1, 0, n), or on top of
    the plain conditioning scale outside guess mode. ``soft=False``: diffusers' own."""

    soft = False

    def forward(self, *args, guess_mode: bool = False, **kwargs):
        down, mid = super().forward(*args, guess_mode=guess_mode, **{**kwargs, "return_dict": False})
        if not self.soft:
            return down, mid
        n = len(down) + 1
        factors = A1111_SOFT[:n] / (torch.logspace(-1, 0, n, dtype=torch.float64) if guess_mode else 1.0)
        return [d * float(f) for d, f in zip(down, factors)], mid * float(factors[-1])


def controlnet_pair(cfg, seed: int, tmp_path: Path, **extra):
    twin = randomize_(diffusers.ControlNetModel(conditioning_channels=3, **diffusers_unet_kwargs(cfg), **extra),
                      seed=seed).eval()
    folder = tmp_path / f"controlnet_{seed}"
    twin.save_pretrained(folder)
    theirs = SoftScaled.from_config(twin.config).eval()
    theirs.load_state_dict(twin.state_dict())
    return theirs, load_controlnet(folder)


def vae_pair(scaling_factor: float = 0.18215):
    ours = randomize_(AutoencoderKL(replace(VAE_8X, scaling_factor=scaling_factor)), seed=3).eval()
    return vae_to_diffusers(ours), ours


def sd1_controlnet(clip_l, tokenizers, controlnets, pipeline=StableDiffusionControlNetPipeline):
    unet, ours_unet = unet_pair(SD1_UNET, seed=2)
    vae, ours_vae = vae_pair()
    cn = controlnets[0] if len(controlnets) == 1 else list(controlnets)
    theirs = pipeline(vae=vae, text_encoder=clip_l[0], tokenizer=tokenizers[0], unet=unet, controlnet=cn,
                      scheduler=euler(), safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    ours = StableDiffusion(ours_unet, ours_vae, tokenizers[2], "sd1", text_encoder=clip_l[1])
    return theirs, ours


def noise(seed: int = 7) -> torch.Tensor:
    return torch.randn(1, 4, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(seed))


def hint(seed: int) -> torch.Tensor:
    """A hint image in [0, 1], (1, 3, SIZE, SIZE): the tensor convention of both pipelines."""
    return torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def assert_close(ours: torch.Tensor, theirs: torch.Tensor, what: str = "") -> float:
    assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
    err = rel_err(ours, theirs)
    print(f"{what}: relative error {err:.2e}")  # shown with pytest -rP
    assert err <= RTOL, f"{what}: relative error {err:.2e}"
    return err


CASES = {  # id: (weight, start, end, unfog control mode, diffusers guess_mode, soft scales)
    "balanced": (0.7, 0.0, 1.0, "balanced", False, False),
    "window": (1.3, 0.2, 0.7, "balanced", False, False),  # steps 2 and 3 of 6 only
    "prompt": (1.0, 0.0, 1.0, "prompt", False, True),
    "controlnet": (1.2, 0.0, 0.8, "controlnet", True, True),
}


@pytest.mark.parametrize("case", list(CASES))
@torch.no_grad()
def test_txt2img_one_controlnet(clip_l, tokenizers, tmp_path, case):
    weight, start, end, mode, guess, soft = CASES[case]
    theirs_cn, ours_cn = controlnet_pair(SD1_UNET, 20, tmp_path)
    theirs_cn.soft = soft
    pipe, ours = sd1_controlnet(clip_l, tokenizers, [theirs_cn])
    args = dict(negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=7.5, height=SIZE, width=SIZE,
                controlnet_conditioning_scale=weight, control_guidance_start=start, control_guidance_end=end,
                guess_mode=guess)
    theirs = pipe(PROMPT, image=hint(5), latents=noise(), output_type="pt", **args).images
    control = Control(ours_cn, hint(5), weight=weight, start=start, end=end, control_mode=mode)
    mine = ours(PROMPT, NEGATIVE, steps=STEPS, cfg_scale=7.5, latents=noise(), controls=[control], output="tensor")
    assert_close((mine + 1) / 2, theirs, f"txt2img, {case}")
    plain = ours(PROMPT, NEGATIVE, steps=STEPS, cfg_scale=7.5, latents=noise(), output="tensor")
    assert rel_err(mine, plain) > 10 * RTOL  # the ControlNet changed the image: the check can fail


@torch.no_grad()
def test_txt2img_two_controlnets_summed(clip_l, tokenizers, tmp_path):
    (a, ours_a), (b, ours_b) = controlnet_pair(SD1_UNET, 21, tmp_path), controlnet_pair(SD1_UNET, 22, tmp_path)
    pipe, ours = sd1_controlnet(clip_l, tokenizers, [a, b])
    theirs = pipe(PROMPT, image=[hint(5), hint(6)], negative_prompt=NEGATIVE, num_inference_steps=STEPS,
                  guidance_scale=6.0, height=SIZE, width=SIZE, latents=noise(), controlnet_conditioning_scale=[0.8, 0.5],
                  control_guidance_start=[0.0, 0.3], control_guidance_end=[0.6, 1.0], output_type="latent").images
    controls = [Control(ours_a, hint(5), weight=0.8, end=0.6), Control(ours_b, hint(6), weight=0.5, start=0.3)]
    mine = ours(PROMPT, NEGATIVE, steps=STEPS, cfg_scale=6.0, latents=noise(), controls=controls, output="latent")
    assert_close(mine, theirs, "two ControlNets")


@torch.no_grad()
def test_img2img_controlnet(clip_l, tokenizers, tmp_path):
    """img2img: start and end are fractions of the steps run (diffusers' truncated timesteps)."""
    theirs_cn, ours_cn = controlnet_pair(SD1_UNET, 23, tmp_path)
    pipe, ours = sd1_controlnet(clip_l, tokenizers, [theirs_cn], StableDiffusionControlNetImg2ImgPipeline)
    init = hint(9)
    theirs = pipe(PROMPT, image=init, control_image=hint(5), strength=0.7, negative_prompt=NEGATIVE,
                  num_inference_steps=10, guidance_scale=7.5, controlnet_conditioning_scale=0.9,
                  control_guidance_start=0.1, control_guidance_end=0.75, generator=torch.Generator().manual_seed(11),
                  output_type="pt").images
    control = Control(ours_cn, hint(5), weight=0.9, start=0.1, end=0.75)
    mine = ours(PROMPT, NEGATIVE, steps=10, cfg_scale=7.5, init_image=2 * init - 1, strength=0.7, seed=11,
                controls=[control], output="tensor")
    assert_close((mine + 1) / 2, theirs, "img2img")


# --- SDXL ----------------------------------------------------------------------------------------

SDXL_EXTRA = dict(addition_embed_type="text_time", addition_time_embed_dim=256,
                  projection_class_embeddings_input_dim=SDXL_UNET.adm_in_channels)


@pytest.mark.parametrize("case", ["window", "controlnet"])
@torch.no_grad()
def test_sdxl_txt2img_one_controlnet(clip_l, big_g, tokenizers, tmp_path, case):
    """SDXL: the ControlNet gets the vector conditioning y (pooled text, sizes, crop) too."""
    weight, start, end, mode, guess, soft = CASES[case]
    theirs_cn, ours_cn = controlnet_pair(SDXL_UNET, 24, tmp_path, **SDXL_EXTRA)
    theirs_cn.soft = soft
    unet, ours_unet = sdxl_unet_pair(SDXL_UNET, seed=4)
    vae, ours_vae = vae_pair(0.13025)
    pipe = diffusers.StableDiffusionXLControlNetPipeline(
        vae=vae, text_encoder=clip_l[0], text_encoder_2=big_g[0], tokenizer=tokenizers[0], tokenizer_2=tokenizers[1],
        unet=unet, controlnet=theirs_cn, scheduler=euler(), add_watermarker=False)
    ours = StableDiffusion(ours_unet, ours_vae, tokenizers[2], "sdxl", text_encoder=clip_l[1], text_encoder_2=big_g[1])
    sizes = dict(original_size=(96, 64), crops_coords_top_left=(8, 0), target_size=(SIZE, SIZE))
    theirs = pipe(PROMPT, image=hint(5), negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=6.0,
                  height=SIZE, width=SIZE, latents=noise(), controlnet_conditioning_scale=weight,
                  control_guidance_start=start, control_guidance_end=end, guess_mode=guess, output_type="pt",
                  **sizes).images
    control = Control(ours_cn, hint(5), weight=weight, start=start, end=end, control_mode=mode)
    mine = ours(PROMPT, NEGATIVE, steps=STEPS, cfg_scale=6.0, latents=noise(), controls=[control], output="tensor",
                **sizes)
    assert_close((mine + 1) / 2, theirs, f"SDXL txt2img, {case}")


@torch.no_grad()
def test_txt2img_globally_pooled_controlnet_as_diffusers_runs_it(clip_l, tokenizers, tmp_path):
    """The v1.1 shuffle model: diffusers' ``global_pool_conditions`` averages each residual over
    the image and its pipeline then runs the ControlNet in guess mode (the conditional half only,
    without guess mode's scales for a pooled model): unfog's balanced mode must give the same."""
    theirs_cn, ours_cn = controlnet_pair(SD1_UNET, 23, tmp_path, global_pool_conditions=True)
    assert ours_cn.control_config.global_pool
    pipe, ours = sd1_controlnet(clip_l, tokenizers, [theirs_cn])
    args = dict(negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=7.5, height=SIZE, width=SIZE,
                controlnet_conditioning_scale=0.9)
    theirs = pipe(PROMPT, image=hint(6), latents=noise(), output_type="pt", **args).images
    mine = ours(PROMPT, NEGATIVE, steps=STEPS, cfg_scale=7.5, latents=noise(), output="tensor",
                controls=[Control(ours_cn, hint(6), weight=0.9)])
    assert_close((mine + 1) / 2, theirs, "txt2img, global pooling")
    unpooled = load_controlnet(tmp_path / "controlnet_23", global_pool=False)
    plain = ours(PROMPT, NEGATIVE, steps=STEPS, cfg_scale=7.5, latents=noise(), output="tensor",
                 controls=[Control(unpooled, hint(6), weight=0.9)])
    assert rel_err(mine, plain) > 10 * RTOL  # pooling changes the image: the check can fail
