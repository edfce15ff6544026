"""The identity first stage (``PIXEL_SPACE``, LDM's f = 1): latents are the images exactly, in
every dtype, nothing of it trains, and task text2image with ``vae_model=pixel`` gives a pixel-space
text-to-image model that the latent pipeline draws from (GLIDE's base model, in unfog's pieces)."""

import pytest
import torch

import unfog
from unfog.models.vae import PIXEL_SPACE, AutoencoderKL, VAEConfig
from unfog.training import load_config, train

from pixel_models import SR

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_latents_are_the_images(dtype):
    vae = AutoencoderKL(PIXEL_SPACE).to(dtype)
    x = (torch.rand(2, 3, 16, 24) * 2 - 1).to(dtype)
    posterior = vae.encode(x)
    assert torch.equal(posterior.mean, x) and torch.equal(vae.decode(x), x)
    assert posterior.std.float().max() < 1e-6
    assert not any(p.requires_grad for p in vae.parameters())
    assert vae.config.downsample_factor == 1 and vae.config.scaling_factor == 1.0


def test_identity_needs_matching_channels():
    with pytest.raises(ValueError, match="identity first stage keeps the images"):
        VAEConfig(latent_channels=4, channel_mult=(1,), identity=True)


def test_a_pixel_space_text2image_model(pixel_base):
    pipe = unfog.load(pixel_base)
    assert pipe.vae.config.identity and pipe.unet.config.in_channels == 3 and pipe.default_size == 16
    latents = pipe("a red circle", steps=2, seed=3, output="latent")
    images = pipe("a red circle", steps=2, seed=3, output="tensor")
    assert latents.shape == images.shape == (1, 3, 16, 16)
    assert torch.equal(images, latents.clamp(-1, 1))  # decoding is the identity


# ---- super-resolution (the cascade's second stage) ----------------------------------------------------

def test_degrade_and_augment():
    from unfog.diffusion.schedules import DiscreteSchedule
    from unfog.pipelines.super_resolution import augment, augmentation_level, degrade

    g = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    flat = torch.full((1, 3, 32, 32), 0.25)
    assert torch.allclose(degrade(flat, 16), flat)  # a flat image survives the round trip
    small = torch.nn.functional.avg_pool2d(images, 2)  # area averaging is 2 x 2 means here
    assert torch.allclose(degrade(images, 16, (16, 16)), small.clamp(-1, 1), atol=1e-6)
    assert torch.equal(degrade(small, 16, (32, 32)), degrade(images, 16))
    schedule = DiscreteSchedule.make("scaled_linear", 1000)
    s = torch.tensor([0, 700])
    noise = torch.randn(2, 3, 32, 32, generator=g)
    z, y = augment(images, s, noise, schedule)
    abar = schedule.alphas_cumprod[s].float()[:, None, None, None]
    assert torch.allclose(z, abar.sqrt() * images + (1 - abar).sqrt() * noise, atol=1e-6)
    assert y.shape == (2, 256) and not torch.equal(y[0], y[1])
    assert augmentation_level(0.1, schedule) == 100
    with pytest.raises(ValueError, match=r"noise augmentation must be in \[0, 1\)"):
        augmentation_level(1.0, schedule)


def test_a_super_resolution_model_trains_draws_and_sees_its_input(pixel_sr):
    assert (pixel_sr.parent / "samples" / "step_00000002.png").is_file()  # rows: image, bicubic, the model's
    pipe = unfog.load(pixel_sr)
    assert pipe.low_res == 16 and pipe.unet.config.in_channels == 6 and pipe.default_size == 32
    low = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        a = pipe(["a red circle"] * 2, low_res_image=low, steps=2, seed=3, output="tensor")
        b = pipe(["a red circle"] * 2, low_res_image=low.flip(-1), steps=2, seed=3, output="tensor")
        c = pipe(["a red circle"] * 2, low_res_image=low, steps=2, seed=3, output="tensor", noise_augmentation=0.5)
    assert a.shape == (2, 3, 32, 32) and not torch.equal(a, b) and not torch.equal(a, c)
    with pytest.raises(ValueError, match="this is a super-resolution model: give low_res_image"):
        pipe("a red circle", steps=1)


def test_super_resolution_errors(tmp_path, pixel_base):
    with pytest.raises(ValueError, match="works in pixel space"):
        load_config(None, [a for a in SR if a != "vae_model=pixel"] + ["vae_model=x.safetensors"])
    with pytest.raises(ValueError, match="low_res and size_conditioning both use the U-Net's vector y"):
        load_config(None, SR + ["size_conditioning=true"])
    with pytest.raises(ValueError, match="low_res 32 must be below image_size 32"):
        train(load_config(None, SR + ["low_res=32", f"out_dir={tmp_path}", "steps=1"]), progress=False)
    with pytest.raises(ValueError, match="A super-resolution model .* works on U-Net models"):
        train(load_config(None, SR + ["model=DIT_TINY", f"out_dir={tmp_path}", "steps=1"]), progress=False)
    with pytest.raises(ValueError, match="low_res_image is for super-resolution models"):
        unfog.load(pixel_base)("a red circle", steps=1, low_res_image=torch.zeros(1, 3, 8, 8))
