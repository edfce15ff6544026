"""The identity first stage (``PIXEL_SPACE``, LDM's f = 1): latents are the images exactly, in
every dtype, nothing of it trains, and task text2image with ``vae_model=pixel`` gives a pixel-space
text-to-image model that the latent pipeline draws from (GLIDE's base model, in unfog's pieces)."""

import pytest
import torch

import unfog
from unfog.models.vae import PIXEL_SPACE, AutoencoderKL, VAEConfig
from unfog.training import load_config, train

T2I = ["task=text2image", "data=shapes", "image_size=16", "data_size=64", "batch_size=4", "precision=fp32",
       "model=TINY", 'text_encoder={"width": 32, "layers": 2, "heads": 2}', "prediction=v",
       "schedule=scaled_linear", "warmup_steps=1", "log_every=1", "sample_steps=2", "sample_every=1000",
       "lr=0.001", "vae_model=pixel"]


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


def test_a_pixel_space_text2image_model(tmp_path):
    path = train(load_config(None, T2I + ["steps=2", f"out_dir={tmp_path}"]), progress=False)
    pipe = unfog.load(path)
    assert pipe.vae.config.identity and pipe.unet.config.in_channels == 3 and pipe.default_size == 16
    latents = pipe("a red circle", steps=2, seed=3, output="latent")
    images = pipe("a red circle", steps=2, seed=3, output="tensor")
    assert latents.shape == images.shape == (1, 3, 16, 16)
    assert torch.equal(images, latents.clamp(-1, 1))  # decoding is the identity
