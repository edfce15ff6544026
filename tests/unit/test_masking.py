"""Inpainting's image-space steps (``pipelines.masking``, ``inputs.fill_masked``) and the
pipeline's masked content, against closed forms and scipy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.ndimage import gaussian_filter1d

import unfog
from unfog.cli import DEFAULT_TEXT_MODEL, default_model_path
from unfog.pipelines import inputs
from unfog.pipelines.inputs import fill_masked
from unfog.pipelines.masking import blur_mask, crop_region, overlay, paste_back
from unfog.pipelines.start import start_latents


def _hole(h=16, w=16, box=(4, 3, 11, 9)) -> torch.Tensor:
    m = torch.zeros(1, 1, h, w)
    x0, y0, x1, y1 = box
    m[..., y0:y1, x0:x1] = 1
    return m


def test_fill_keeps_what_is_kept_and_fills_smoothly():
    m = _hole()
    constant = torch.full((1, 3, 16, 16), 0.3)
    constant[..., 5, 6] = -1  # inside the hole: must not leak into the fill
    out = fill_masked(constant, m)
    assert torch.allclose(out, torch.full_like(out, 0.3), atol=1e-6)  # a constant surrounding fills constant
    g = torch.Generator().manual_seed(0)
    image = torch.rand(2, 3, 16, 16, generator=g) * 2 - 1
    out = fill_masked(image, m.expand(2, 1, 16, 16))
    keep = (m == 0).expand_as(image)
    assert torch.equal(out[keep], image[keep])  # kept pixels bit for bit
    kept = image.masked_fill(~keep, float("nan"))
    lo, hi = kept.flatten(2).nan_to_num(9).amin(2), kept.flatten(2).nan_to_num(-9).amax(2)
    filled = out.masked_fill(keep, float("nan")).flatten(2)
    assert (filled.nan_to_num(0) >= lo[..., None] - 1e-6).all() and (filled.nan_to_num(0) <= hi[..., None] + 1e-6).all()
    ramp = torch.linspace(-1, 1, 16).expand(1, 3, 16, 16).clone()  # a horizontal ramp: the fill follows it
    out = fill_masked(ramp, m)
    assert (out - ramp).abs().max() < 0.06


@pytest.mark.parametrize("sx, sy", [(3, 3), (2, 5), (0, 4)])
def test_mask_blur_matches_scipy(sx, sy):
    rng = np.random.default_rng(0)
    mask = (rng.random((40, 50)) > 0.7).astype(np.uint8) * 255
    ours = np.asarray(blur_mask(Image.fromarray(mask), sx, sy), dtype=np.float64)
    ref = mask.astype(np.float64)
    for axis, sigma in ((1, sx), (0, sy)):
        if sigma:
            ref = gaussian_filter1d(ref, sigma, axis=axis, mode="nearest", truncate=2.5)
    assert np.abs(ours - ref).max() <= 1.0  # rounding to grey levels


def test_crop_region_pads_matches_the_aspect_and_stays_inside():
    mask = Image.new("L", (100, 80), 0)
    mask.paste(255, (40, 30, 50, 40))  # 10 x 10 at (40, 30)
    assert crop_region(mask, 5, 64, 64) == (35, 25, 55, 45)  # 20 x 20: padded, square already
    assert crop_region(mask, 5, 128, 64) == (25, 25, 65, 45)  # widened around the centre to 2:1
    # padding past every edge: clipped to the image, which cannot be made square: all of it
    assert crop_region(mask, 60, 64, 64) == (0, 0, 100, 80)
    corner = Image.new("L", (100, 80), 0)
    corner.paste(255, (0, 0, 4, 4))
    assert crop_region(corner, 0, 64, 32) == (0, 0, 8, 4)  # shifted to stay inside
    assert crop_region(Image.new("L", (10, 10), 0), 4, 8, 8) is None


def test_overlay_and_paste_back():
    init = Image.fromarray(np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    drawn = Image.new("RGB", (32, 32), (255, 0, 0))
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (8, 8, 16, 16))
    out = np.asarray(overlay(drawn, init, mask))
    keep = np.asarray(mask) == 0
    assert np.array_equal(out[keep], np.asarray(init)[keep]) and (out[~keep] == (255, 0, 0)).all()
    pasted = np.asarray(paste_back(Image.new("RGB", (64, 64), (0, 255, 0)), init, (8, 8, 16, 16)))
    assert (pasted[8:16, 8:16] == (0, 255, 0)).all() and np.array_equal(pasted[:8], np.asarray(init)[:8])


@pytest.fixture(scope="module")
def pipe():
    return unfog.load(default_model_path(DEFAULT_TEXT_MODEL))


def test_masked_content_start_latents(pipe):
    """x = x0 + sigma n (original); latent nothing zeroes x0 under the mask; latent noise puts the
    run's own noise n there. So x_orig - x_nothing = x0 m and x_noise - x_nothing = n m =
    x_nothing m / sigma, with all three equal outside the mask."""
    image = inputs.image_tensor(Image.fromarray(np.random.default_rng(2).integers(0, 256, (64, 64, 3), dtype=np.uint8)))
    mask = _hole(64, 64, (16, 16, 48, 40))
    shape, sigma = (1, 4, 16, 16), 3.0
    starts = {}
    for content in ("original", "latent nothing", "latent noise"):
        g = torch.Generator().manual_seed(5)
        starts[content] = start_latents(pipe, g, shape, sigma, image, mask, None, 0.6, "sample", content)[0]
    small = inputs.latent_mask(mask, (16, 16))
    orig, nothing, noise = starts["original"], starts["latent nothing"], starts["latent noise"]
    outside = small.expand_as(orig) == 0
    assert torch.equal(orig[outside], nothing[outside]) and torch.equal(orig[outside], noise[outside])
    assert torch.allclose((noise - nothing) * small, nothing * small / sigma, atol=1e-5)
    assert not torch.allclose(orig * small, nothing * small)


def test_fill_is_the_only_difference_of_masked_content_fill(pipe):
    image = Image.fromarray(np.random.default_rng(3).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 40, 48))
    common = dict(steps=2, seed=1, strength=0.7, output="tensor")
    filled = pipe("a red circle", init_image=image, mask=mask, masked_content="fill", **common)
    pre = fill_masked(inputs.image_tensor(image), inputs.mask_tensor(mask))
    assert torch.equal(filled, pipe("a red circle", init_image=pre, mask=mask, **common))
    with pytest.raises(ValueError, match="masked content 'blur'.*valid"):
        pipe("a red circle", init_image=image, mask=mask, masked_content="blur", **common)
    with pytest.raises(ValueError, match="needs a mask"):
        pipe("a red circle", init_image=image, masked_content="fill", **common)


def test_cli_inpaint_options_are_recorded_and_restored(tmp_path):
    from unfog.cli import main
    from unfog.pipelines.images import read_parameters

    init = Image.fromarray(np.random.default_rng(4).integers(0, 256, (80, 96, 3), dtype=np.uint8))
    init.save(tmp_path / "init.png")
    mask = Image.new("L", (96, 80), 0)
    mask.paste(255, (40, 30, 60, 50))
    mask.save(tmp_path / "mask.png")
    common = ["--init", str(tmp_path / "init.png"), "--mask", str(tmp_path / "mask.png"), "--steps", "2"]
    assert main(["inpaint", "a red circle", *common, "--seed", "3", "--masked-content", "fill", "--mask-blur", "2",
                 "--only-masked", "--mask-padding", "4", "--width", "64", "--height", "64",
                 "--output", str(tmp_path / "a.png")]) == 0
    out = Image.open(tmp_path / "a.png")
    assert out.size == (96, 80)  # only masked: the whole image comes back, the region drawn at 64 x 64
    text = read_parameters(tmp_path / "a.png")
    assert "Size: 64x64" in text
    assert "Mask blur: 2, Masked content: fill, Inpaint area: Only masked, Masked area padding: 4" in text
    keep = np.ones((80, 96), bool)
    keep[25:55, 35:65] = False  # the mask, its blur's reach (5 px)
    assert np.array_equal(np.asarray(out.convert("RGB"))[keep], np.asarray(init)[keep])
    assert main(["inpaint", *common, "--from", str(tmp_path / "a.png"), "--output", str(tmp_path / "b.png")]) == 0
    assert np.array_equal(np.asarray(Image.open(tmp_path / "b.png")), np.asarray(out))
    assert main(["generate", "--from", str(tmp_path / "a.png"), "--output", str(tmp_path / "c.png")]) == 0
    assert "Masked content" not in read_parameters(tmp_path / "c.png")  # generate drops the mask settings
