"""Contracts of the Stable Diffusion pipeline on tiny random models: argument checks with useful
errors, reproducible seeds, batches, callbacks, untouched inputs, output types; the sigma window
of img2img and the SDXL hand-off; the 4-channel inpainting blend. Numerical parity with
diffusers is in tests/parity/test_pipelines_diffusers.py."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from unfog.diffusion import Denoiser, InpaintDenoiser, get_sigmas, sample
from unfog.models.clip_text import TINY_CLIP, CLIPTextEncoder
from unfog.nn.attention import CrossAttention
from unfog.models.presets import TINY
from unfog.models.tokenizer import CLIPTokenizer
from unfog.models.unet import UNet
from unfog.models.vae import TINY_VAE, AutoencoderKL
from unfog.pipelines import StableDiffusion
from unfog.pipelines.stable_diffusion import sd_schedule
from unfog.pipelines.windows import sigma_window

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: model_checks
from model_checks import randomize_  # noqa: E402

SIZE = 16  # pixels; 8 x 8 latents
UNET = replace(TINY, context_dim=TINY_CLIP.width)


pytestmark = pytest.mark.usefixtures("single_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def tokenizer() -> CLIPTokenizer:
    return CLIPTokenizer.from_bpe_file()


def make_pipe(tokenizer, in_channels: int = 4) -> StableDiffusion:
    unet = randomize_(UNet(replace(UNET, in_channels=in_channels)), seed=1)
    vae = randomize_(AutoencoderKL(TINY_VAE), seed=2)
    text = randomize_(CLIPTextEncoder(TINY_CLIP), seed=3)
    return StableDiffusion(unet, vae, tokenizer, "sd1", text_encoder=text)


@pytest.fixture(scope="module")
def pipe(tokenizer) -> StableDiffusion:
    return make_pipe(tokenizer)


@pytest.fixture(scope="module")
def inpaint_pipe(tokenizer) -> StableDiffusion:
    return make_pipe(tokenizer, in_channels=9)


def image(seed: int = 0) -> torch.Tensor:
    return torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def mask(height: int = SIZE, width: int = SIZE) -> torch.Tensor:
    m = torch.zeros(1, 1, height, width)
    m[..., 4:12, 2:10] = 1
    return m


def run(pipe, **kwargs):
    args = dict(steps=3, width=SIZE, height=SIZE, output="latent")
    return pipe("a red bicycle", "blurry", **{**args, **kwargs})


# --- argument checks ----------------------------------------------------------------------------


@pytest.mark.parametrize("width, height, message", [
    (17, 16, "width 17 is not a multiple of 2; nearest valid values: 16 or 18"),
    (16, 1, "height 1 is not a multiple of 2; nearest valid values: 2"),
])
def test_bad_size_names_nearest_valid_values(pipe, width, height, message):
    assert pipe.size_multiple == 2  # the tiny VAE's factor; the U-Net takes latents of any size
    with pytest.raises(ValueError, match=message):
        run(pipe, width=width, height=height)


def test_latents_of_odd_size(pipe, inpaint_pipe):
    """18 x 22 pixels: 9 x 11 latents, not divisible by the tiny U-Net's factor 2."""
    assert run(pipe, width=22, height=18).shape == (1, 4, 9, 11)
    m = torch.zeros(1, 1, 18, 22)
    m[..., 3:9, 4:15] = 1
    out = run(inpaint_pipe, init_image=torch.rand(1, 3, 18, 22) * 2 - 1, mask=m, width=22, height=18)
    assert out.shape == (1, 4, 9, 11)


def test_mask_of_another_size_is_an_error(pipe):
    with pytest.raises(ValueError, match="the mask is 12x16 .* but the image is 16x16"):
        run(pipe, init_image=image(), mask=mask(width=12))


def test_size_must_agree_with_init_image(pipe):
    with pytest.raises(ValueError, match="differs from the 16x16"):
        run(pipe, init_image=image(), width=32)


@pytest.mark.parametrize("strength", [0.0, -0.2, 1.5])
def test_strength_outside_0_1(pipe, strength):
    with pytest.raises(ValueError, match=r"strength must be in \(0, 1\]"):
        run(pipe, init_image=image(), strength=strength)


def test_strength_that_leaves_no_step(pipe):
    with pytest.raises(ValueError, match="no steps left"):
        run(pipe, init_image=image(), strength=0.2)  # int(3 * 0.2) = 0 steps


def test_unknown_sampler_lists_valid_ones(pipe):
    with pytest.raises(ValueError, match="unknown sampler 'eulr'; valid choices: .*euler_ancestral"):
        run(pipe, sampler="eulr")


@pytest.mark.parametrize("kwargs, message", [
    (dict(output="png"), "unknown output 'png'"),
    (dict(encode="median"), "unknown encode mode"),
    (dict(mask=mask()), "a mask needs the init_image"),
    (dict(denoising_start=0.5), "pass them as latents="),
    (dict(denoising_end=1.0), r"denoising_end must be in \(0, 1\)"),
    (dict(latents=torch.zeros(1, 4, 4, 4)), r"differs from the 8x8"),
    (dict(latents=torch.zeros(2, 4, 8, 8)), r"latents must have shape \(1, 4, 8, 8\)"),
    (dict(batch_size=0), "batch_size must be >= 1"),
])
def test_bad_arguments(pipe, kwargs, message):
    with pytest.raises(ValueError, match=message):
        run(pipe, **kwargs)


def test_inpainting_unet_needs_a_mask(inpaint_pipe):
    with pytest.raises(ValueError, match="inpainting U-Net"):
        run(inpaint_pipe)


def test_family_needs_its_encoders(tokenizer, pipe):
    with pytest.raises(ValueError, match="family 'sdxl' needs text_encoder_2"):
        StableDiffusion(pipe.unet, pipe.vae, tokenizer, "sdxl", text_encoder=pipe.text_encoder)
    with pytest.raises(ValueError, match="unknown family 'sd3'"):
        StableDiffusion(pipe.unet, pipe.vae, tokenizer, "sd3", text_encoder=pipe.text_encoder)


# --- behaviour ----------------------------------------------------------------------------------


def test_seeds_are_reproducible(pipe):
    a, b, c = run(pipe, seed=5), run(pipe, seed=5), run(pipe, seed=6)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    i2i = [run(pipe, init_image=image(), strength=0.7, seed=s) for s in (5, 5, 6)]
    assert torch.equal(i2i[0], i2i[1]) and not torch.allclose(i2i[0], i2i[2])


def test_batch_size_and_prompts(pipe):
    out = pipe(["a cat", "a dog"], steps=2, width=SIZE, height=SIZE, batch_size=3, output="tensor")
    assert out.shape == (6, 3, SIZE, SIZE)
    assert out.min() >= -1 and out.max() <= 1
    assert not torch.allclose(out[0], out[1])  # each image its own noise
    # the same noise gives the same image whatever else is in the batch
    noise = torch.randn(6, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    full = pipe(["a cat", "a dog"], steps=2, width=SIZE, height=SIZE, batch_size=3, latents=noise, output="latent")
    first = pipe("a cat", steps=2, width=SIZE, height=SIZE, latents=noise[:1], output="latent")
    assert torch.allclose(full[0], first[0], rtol=1e-4, atol=1e-4)


def test_callback_gets_every_step(pipe):
    seen = []
    run(pipe, steps=5, callback=lambda info: seen.append((info["i"], info["sigma"])))
    assert [i for i, _ in seen] == [0, 1, 2, 3, 4]
    seen.clear()
    run(pipe, steps=10, init_image=image(), strength=0.45, callback=lambda info: seen.append(info["i"]))
    assert seen == [0, 1, 2, 3]  # int(10 * 0.45) = 4 steps


def test_inputs_are_not_changed(pipe, inpaint_pipe):
    init, m, noise = image(), mask() * 0.8, torch.randn(1, 4, 8, 8)
    copies = [t.clone() for t in (init, m, noise)]
    run(pipe, init_image=init, mask=m, latents=noise, strength=0.7)
    run(inpaint_pipe, init_image=init, mask=m, latents=noise, strength=1.0)
    run(pipe, init_image=init, latents=noise)
    for before, after in zip(copies, (init, m, noise)):
        assert torch.equal(before, after)


def test_outputs(pipe):
    pil = run(pipe, output="pil", batch_size=2)
    assert len(pil) == 2 and all(isinstance(p, Image.Image) and p.size == (SIZE, SIZE) for p in pil)
    assert run(pipe, output="latent").shape == (1, 4, 8, 8)
    # PIL images in, as init image and mask (white = paint)
    rgb = Image.new("RGB", (SIZE, SIZE), (200, 30, 90))
    grey = Image.new("L", (SIZE, SIZE), 0)
    grey.paste(255, (2, 4, 10, 12))
    out = run(pipe, init_image=rgb, mask=grey, strength=0.8, output="tensor")
    assert out.shape == (1, 3, SIZE, SIZE)


def test_encode_mean_spends_no_randomness_on_the_vae(pipe):
    """With encode="mean" the start is mean + sigma * noise with the noise as the seed's first draw."""
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    a = run(pipe, init_image=image(), encode="mean", seed=4, steps=4, strength=0.5)
    b = run(pipe, init_image=image(), encode="mean", latents=noise, steps=4, strength=0.5)
    assert torch.equal(a, b)


def test_default_sizes_by_family(pipe, tokenizer):
    assert pipe.default_size == 512
    sd2v = StableDiffusion(pipe.unet, pipe.vae, tokenizer, "sd2", text_encoder=pipe.text_encoder, prediction="v")
    assert sd2v.default_size == 768


# What unfog.checkpoint's Components.family.scheduler holds for every official SD model.
SD_SCHEDULER = SimpleNamespace(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_timesteps=1000,
                               spacing="leading", steps_offset=1, zero_terminal_snr=False)


def test_from_components(pipe):
    components = SimpleNamespace(unet=pipe.unet, vae=pipe.vae, text_encoder=pipe.text_encoder, text_encoder_2=None,
                                 tokenizer=pipe.tokenizer, prediction="eps",
                                 family=SimpleNamespace(scheduler=SD_SCHEDULER))
    built = StableDiffusion.from_components(components)
    assert built.family == "sd1" and built.spacing == "leading" and built.steps_offset == 1
    assert torch.equal(built.schedule.alphas_cumprod, sd_schedule().alphas_cumprod)


def test_fused_qkv_is_off_by_default_and_draws_the_same_image(tokenizer):
    pipe = make_pipe(tokenizer)
    layers = [m for m in pipe.unet.modules() if isinstance(m, CrossAttention)]
    assert layers and pipe.fused_qkv is False and not any(m.fuse_projections for m in layers)
    separate = run(pipe, seed=4)
    # the same sums; bit-equal on the AVX-512 CPU, but a GEMM's blocking may depend on its width
    torch.testing.assert_close(run(pipe.fuse_qkv(), seed=4), separate, rtol=1e-5, atol=1e-5)
    assert pipe.fused_qkv is True and all(m.fuse_projections and m._fused is not None for m in layers)
    pipe.to("cpu")
    assert all(m.fuse_projections for m in layers)
    pipe.fuse_qkv(False)
    assert not any(m.fuse_projections or m._fused is not None for m in layers)


# --- pieces -------------------------------------------------------------------------------------


def test_sigma_window_strength_and_hand_off():
    schedule = sd_schedule()
    sigmas = get_sigmas(schedule, 10, "leading")  # timesteps 901, 801, ..., 1
    assert torch.equal(sigma_window(schedule, sigmas, strength=0.6), sigmas[4:])  # the last int(6.0) steps
    assert torch.equal(sigma_window(schedule, sigmas, strength=1.0), sigmas)
    base = sigma_window(schedule, sigmas, denoising_end=0.8)  # t >= 200: 901 .. 201
    refiner = sigma_window(schedule, sigmas, denoising_start=0.8)  # t < 200: 101, 1
    assert len(base) == 9 and len(refiner) == 3
    assert base[-1] == refiner[0]  # one sigma where the base stops and the refiner starts
    assert torch.equal(torch.cat([base, refiner[1:]]), sigmas)
    # a cut exactly on a timestep: 0.7 -> cutoff 300, which t = 301 is above
    assert len(sigma_window(schedule, sigmas, denoising_end=0.7)) == 8


def test_inpaint_denoiser_keeps_the_known_region_along_euler():
    """On Euler steps the kept region is x0 + sigma * n at every sigma and x0 at the end."""
    schedule = sd_schedule()
    sigmas = get_sigmas(schedule, 8, "leading")
    g = torch.Generator().manual_seed(0)
    known, noise = torch.randn(2, 4, 6, 6, generator=g), torch.randn(2, 4, 6, 6, generator=g)
    m = (torch.rand(2, 1, 6, 6, generator=g) > 0.5).float()
    den = Denoiser(lambda x, t: torch.tanh(x) * (1 + t[:, None, None, None] / 1000), schedule, "eps")
    states = []
    x = known + sigmas[0].float() * noise
    out = sample(InpaintDenoiser(den, m, known, noise), x, sigmas, "euler",
                 callback=lambda info: states.append((info["x"], info["sigma"])))
    keep = m.expand_as(x) == 0
    for state, sigma in states:
        assert torch.allclose(state[keep], (known + sigma * noise)[keep], atol=1e-5)
    assert torch.allclose(out[keep], known[keep], atol=1e-6)
    assert not torch.allclose(out[~keep], known[~keep], atol=1e-2)


# --- RePaint (repaint=(jump_length, jump_n_sample)) -------------------------------------------------------


def test_repaint_keeps_the_known_latents_and_its_jumps_change_the_rest(pipe):
    """Outside the mask the final latents are the image's own (RePaint's last blend is at
    alpha_bar = 1); inside, the jumps resample: a run without them differs."""
    m = mask()
    common = dict(init_image=image(), mask=m, strength=1.0, sampler="DDIM", encode="mean", steps=6)
    out = run(pipe, **common, repaint=(2, 3))
    known = pipe.vae.encode(image()).mode() * pipe.vae.config.scaling_factor
    keep = 1 - torch.nn.functional.interpolate(m, size=out.shape[-2:], mode="nearest")
    keep = (keep > 0.5).float()
    assert torch.allclose(out * keep, known * keep, atol=1e-5)
    plain = run(pipe, **common, repaint=(2, 1))
    inside = 1 - keep
    assert not torch.allclose(out * inside, plain * inside, atol=1e-3)
    assert torch.equal(run(pipe, **common, repaint=(2, 3)), out)  # seeded: the same run twice


@pytest.mark.parametrize("kwargs, message", [
    (dict(sampler="Euler"), "not sampler 'euler': pass sampler='DDPM' or 'DDIM'"),
    (dict(strength=0.5), "RePaint starts from noise: strength must be 1, got 0.5"),
    (dict(mask=None), "RePaint inpaints with an ordinary 4-channel U-Net: give init_image and mask"),
    (dict(repaint=(6, 2)), "jump length 6 must be below the 6 steps"),
    (dict(repaint=(2,)), r"repaint must be \(jump_length, jump_n_sample\), two integers"),
])
def test_repaint_refuses_what_it_cannot_serve(pipe, kwargs, message):
    args = dict(init_image=image(), mask=mask(), strength=1.0, sampler="DDPM", steps=6, repaint=(2, 2))
    with pytest.raises(ValueError, match=message):
        run(pipe, **{**args, **kwargs})


def test_repaint_refuses_an_inpainting_unet(inpaint_pipe):
    with pytest.raises(ValueError, match="this is a 9-channel inpainting U-Net"):
        run(inpaint_pipe, init_image=image(), mask=mask(), strength=1.0, sampler="DDPM", steps=6, repaint=(2, 2))
