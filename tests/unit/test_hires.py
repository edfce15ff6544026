"""Hires fix (``pipelines.hires``, ``--hires``): the second pass's size as A1111 computes it, the
latent upscalers against torch's interpolation, img2img from latents against img2img from the
image they encode, and the whole two-pass image against its parts; PNG keys and ``--from``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import unfog
from unfog.cli import DEFAULT_TEXT_MODEL, default_model_path, main
from unfog.pipelines import inputs
from unfog.pipelines.hires import Hires, target_size, upscale_latents
from unfog.pipelines.images import read_parameters


@pytest.mark.parametrize("hires, size", [
    (Hires(scale=2), (1024, 1536)), (Hires(scale=1.5), (768, 1152)), (Hires(resize=(1000, 0)), (1000, 1496)),
    (Hires(resize=(0, 900)), (600, 896)), (Hires(resize=(640, 640)), (640, 640)),
])
def test_target_size(hires, size):
    assert target_size(512, 768, hires, 8) == size  # rounded down to multiples of 8 where needed


def test_upscale_latents():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 6, generator=g)
    assert torch.equal(upscale_latents(x, (16, 12), "Latent (nearest)"), x.repeat_interleave(2, 2).repeat_interleave(2, 3))
    ref = F.interpolate(x, size=(16, 12), mode="bicubic", align_corners=False, antialias=True)
    assert torch.equal(upscale_latents(x, (16, 12), "Latent (bicubic antialiased)"), ref)
    constant = torch.full((1, 4, 8, 8), 0.25)
    assert torch.allclose(upscale_latents(constant, (12, 20), "Latent"), torch.full((1, 4, 12, 20), 0.25))
    wide = upscale_latents(x, (16, 16), "Latent")  # 8 x 6 -> cover 16 x 16 at 8/3... then crop the centre
    full = F.interpolate(x, size=(21, 16), mode="bilinear", align_corners=False)
    assert torch.equal(wide, full[..., 2:18, :])
    with pytest.raises(ValueError, match="valid choices"):
        Hires(upscaler="ESRGAN")


@pytest.fixture(scope="module")
def pipe():
    return unfog.load(default_model_path(DEFAULT_TEXT_MODEL))


def test_img2img_from_latents_equals_img2img_from_the_image(pipe):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    latents = pipe.encode(inputs.image_tensor(image))
    common = dict(steps=4, seed=2, strength=0.6, output="tensor")
    a = pipe("a red circle", init_image=image, encode="mean", **common)
    b = pipe("a red circle", init_latents=latents, **common)
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="without init_image"):
        pipe("a red circle", init_image=image, init_latents=latents, **common)


def test_hires_is_first_pass_upscale_second_pass(pipe, tmp_path):
    args = ["generate", "a red circle", "--seed", "4", "--steps", "4", "--hires", "--hires-scale", "1.5",
            "--hires-upscaler", "Latent (antialiased)", "--hires-steps", "6", "--strength", "0.5"]
    assert main([*args, "--output", str(tmp_path / "a.png")]) == 0
    out = np.asarray(Image.open(tmp_path / "a.png").convert("RGB"))
    first = pipe("a red circle", steps=4, seed=4, sampler="Euler a", cfg_scale=2.0, output="latent")
    start = F.interpolate(first, size=(24, 24), mode="bilinear", align_corners=False, antialias=True)
    second = pipe("a red circle", steps=6, seed=4, sampler="Euler a", cfg_scale=2.0, init_latents=start, strength=0.5)
    assert out.shape == (96, 96, 3) and np.array_equal(out, np.asarray(second[0]))
    text = read_parameters(tmp_path / "a.png")
    assert "Size: 64x64" in text and "Denoising strength: 0.5" in text
    assert "Hires upscale: 1.5, Hires steps: 6, Hires upscaler: Latent (antialiased)" in text
    assert main(["generate", "--from", str(tmp_path / "a.png"), "--output", str(tmp_path / "b.png")]) == 0
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()


def test_hires_bad_input(tmp_path, capsys):
    cases = [(["generate", "x", "--strength", "0.5"], "hires fix's (--hires)"),
             (["generate", "x", "--hires", "--hires-upscaler", "ESRGAN"], "valid choices: Latent"),
             (["generate", "x", "--hires", "--strength", "1.5"], "in (0, 1]"),
             (["generate", "x", "--hires", "--hires-resize", "big"], "not WIDTHxHEIGHT")]
    for args, message in cases:
        try:
            code = main([*args, "--output", str(tmp_path / "x.png")])
        except SystemExit as exit:  # argparse's own errors
            code = exit.code
        assert code == 2
        assert message in capsys.readouterr().err
