"""ControlNet preprocessors (``unfog.pipelines.preprocess``) against OpenCV running A1111's recipes.

The oracle of each is the A1111 extension's formula written again here with OpenCV (``cv2``, a
test dependency; unfog's code uses numpy only), on "natural-ish" test images: smooth colour
fields, filled shapes and lines, a slight blur and Gaussian noise, at even and odd sizes.
"""

from __future__ import annotations

import cv2  # the oracle, a dev dependency (never skipped: DESIGN.md)
import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

from unfog.cli import main
from unfog.pipelines import preprocess as P


def scene(seed: int, size: tuple[int, int] = (160, 128)) -> Image.Image:
    """Smooth colour gradients, random ellipses / boxes / lines, blur 0.7 px, noise sd 6."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([128 + 60 * np.sin(xx / 17 + c) * np.cos(yy / 23 - c) for c in range(3)], -1)
    img = Image.fromarray(base.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(8):
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        box = [x0, y0, x0 + int(rng.integers(10, 60)), y0 + int(rng.integers(10, 60))]
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse, draw.rectangle, draw.line)[int(rng.integers(0, 3))](box, fill=colour)
    noisy = np.asarray(img.filter(ImageFilter.GaussianBlur(0.7))).astype(np.float32) + rng.normal(0, 6, (h, w, 3))
    return Image.fromarray(noisy.clip(0, 255).astype(np.uint8))


def line_art(seed: int, size: tuple[int, int] = (128, 96)) -> Image.Image:
    """Black strokes of several widths on white: what lineart_standard, scribble and invert are for."""
    rng = np.random.default_rng(seed)
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    for _ in range(10):
        pts = [tuple(int(v) for v in rng.integers(0, size)) for _ in range(2)]
        draw.line(pts, fill=tuple(int(c) for c in rng.integers(0, 90, 3)), width=int(rng.integers(1, 4)))
    return img


IMAGES = [scene(0), scene(1, (97, 61)), scene(2, (200, 150)), line_art(3)]
rgb = P.to_rgb_array


def equal_fraction(a: Image.Image | np.ndarray, b: np.ndarray) -> float:
    return float((np.asarray(a) == b).mean())


@pytest.mark.parametrize("options", [{}, {"low": 50, "high": 120}, {"l2_gradient": True}, {"low": 0, "high": 30}])
@pytest.mark.parametrize("k", range(len(IMAGES)))
def test_canny_equals_opencv(k, options):
    """A1111 runs ``cv2.Canny(img, low, high)`` on the RGB image, no blur first. Both are integer
    algorithms (Sobel, L1 or L2 magnitude, fixed-point direction bins, strict thresholds), so the
    edge maps are compared pixel by pixel: every pixel equal (measured: all, on every image)."""
    image = IMAGES[k]
    ref = cv2.Canny(rgb(image), options.get("low", 100), options.get("high", 200),
                    L2gradient=options.get("l2_gradient", False))
    ours = np.asarray(P.canny(image, **options))
    assert ours.shape == ref.shape + (3,) and (ours[..., 0] == ours[..., 2]).all()
    assert (ref > 0).sum() > 100  # the images have edges to find
    assert equal_fraction(ours[..., 0], ref) == 1.0


def test_canny_with_blur_nearly_equals_opencv():
    """With ``sigma`` the image is blurred first (8-bit, rounded); OpenCV's fixed-point 8-bit blur
    differs from ours by one level on a few % of pixels, which moves a few edge pixels: >= 99.5% of
    pixels equal (measured 99.6-99.9%)."""
    for image in IMAGES[:3]:
        ref = cv2.Canny(cv2.GaussianBlur(rgb(image), (0, 0), 1.4), 100, 200)
        assert equal_fraction(np.asarray(P.canny(image, sigma=1.4))[..., 0], ref) >= 0.995


def test_canny_can_fail():
    """The comparison sees a low threshold 5% off (10 pixels change), and the channel rule."""
    image = IMAGES[0]
    ref = cv2.Canny(rgb(image), 100, 200)
    assert equal_fraction(np.asarray(P.canny(image, low=95))[..., 0], ref) < 1.0
    gray_ref = cv2.Canny(cv2.cvtColor(rgb(image), cv2.COLOR_RGB2GRAY), 100, 200)
    assert equal_fraction(np.asarray(P.canny(image))[..., 0], gray_ref) < 0.99


def test_gaussian_blur_equals_opencv():
    """Float blur (the kernel size rule, reflect-101 border) equals cv2.GaussianBlur to 2e-4 of 255;
    the 8-bit blur (``blur``) is within one level everywhere, equal on >= 95% of pixels (measured
    95.8-97.9%: OpenCV's 8-bit blur is fixed point)."""
    for image in IMAGES[:3]:
        x = rgb(image).astype(np.float32)
        for sigma in (0.5, 5.0, 6.0):
            assert np.abs(P.gaussian_blur(x, sigma, extent=4) - cv2.GaussianBlur(x, (0, 0), sigma)).max() < 2e-4
        for sigma in (1.4, 9.0):
            ours = np.asarray(P.blur(image, sigma=sigma)).astype(int)
            ref = cv2.GaussianBlur(rgb(image), (0, 0), sigma).astype(int)
            assert np.abs(ours - ref).max() <= 1 and (ours == ref).mean() >= 0.95


def xdog_reference(x: np.ndarray, threshold: float) -> np.ndarray:
    """A1111's scribble_xdog, in its own steps, with 2 (255 - dog) in int arithmetic (no uint8 wrap)."""
    g1 = cv2.GaussianBlur(x.astype(np.float32), (0, 0), 0.5)
    g2 = cv2.GaussianBlur(x.astype(np.float32), (0, 0), 5.0)
    dog = (255 - np.min(g2 - g1, axis=2)).clip(0, 255).astype(np.uint8)
    return np.where(2 * (255 - dog.astype(np.int32)) > threshold, 255, 0)


@pytest.mark.parametrize("threshold", [32, 8])
def test_scribble_equals_xdog_formula(threshold):
    """>= 99.9% of pixels equal (measured 100%; only a float rounding of the blurs at the threshold
    could differ)."""
    for image in IMAGES:
        ours = np.asarray(P.scribble(image, threshold=threshold))[..., 0]
        ref = xdog_reference(rgb(image), threshold)
        assert ref.any() and equal_fraction(ours, ref) >= 0.999


def lineart_reference(x: np.ndarray) -> np.ndarray:
    """A1111's lineart_standard formula, with cv2's blur."""
    x = x.astype(np.float32)
    g = cv2.GaussianBlur(x, (0, 0), 6.0)
    intensity = np.min(g - x, axis=2).clip(0, 255)
    intensity /= max(16, np.median(intensity[intensity > 8]))
    return (intensity * 127).clip(0, 255).astype(np.uint8)


def test_lineart_standard_equals_formula():
    """Within one level everywhere (truncation after blurs that differ by ~1e-4), equal on >= 99.5%."""
    for image in IMAGES:
        ours = np.asarray(P.lineart_standard(image))[..., 0].astype(int)
        ref = lineart_reference(rgb(image)).astype(int)
        assert ref.max() > 100
        assert np.abs(ours - ref).max() <= 1 and (ours == ref).mean() >= 0.995


def test_lineart_standard_on_a_blank_image():
    """No pixel darker than its surroundings: a black hint, not a division by an empty median."""
    assert np.asarray(P.lineart_standard(Image.new("RGB", (32, 32), "white"))).max() == 0


def test_binary_otsu_equals_opencv():
    """Otsu's threshold on OpenCV's own grey image equals cv2's exactly; the whole preprocessor
    (our BT.601 grey, then Otsu, then the inverted threshold) agrees with A1111's ``binary`` on >= 99.5%
    of pixels (OpenCV 5's RGB2GRAY rounds differently on ~0.1% of pixels)."""
    for image in IMAGES:
        gray = cv2.cvtColor(rgb(image), cv2.COLOR_RGB2GRAY)
        t, ref = cv2.threshold(gray, 0, 255, cv2.THRESH_BINARY_INV + cv2.THRESH_OTSU)
        assert P.otsu_threshold(gray) == int(t)
        assert equal_fraction(np.asarray(P.binary(image))[..., 0], ref) >= 0.995
        assert np.abs(P.rgb_to_gray(rgb(image)).astype(int) - gray).max() <= 1
        _, fixed = cv2.threshold(gray, 90, 255, cv2.THRESH_BINARY_INV)
        assert equal_fraction(np.asarray(P.binary(image, threshold=90))[..., 0], fixed) >= 0.995
    assert P.otsu_threshold(np.full((4, 4), 7, np.uint8)) == 0  # one grey level: as cv2


@pytest.mark.parametrize("rate", [2.0, 3.7, 1.5])
def test_tile_equals_opencv_area_resize(rate):
    """A1111: ``cv2.resize(img, (int(W / rate), int(H / rate)), INTER_AREA)``: same size, within one
    level, >= 99.5% equal (measured 99.9-100%)."""
    for image in IMAGES:
        x = rgb(image)
        h, w = x.shape[:2]
        ref = cv2.resize(x, (int(w / rate), int(h / rate)), interpolation=cv2.INTER_AREA).astype(int)
        ours = np.asarray(P.tile(image, rate=rate)).astype(int)
        assert ours.shape == ref.shape and np.abs(ours - ref).max() <= 1 and (ours == ref).mean() >= 0.995
    assert P.tile(IMAGES[0], rate=1.05).size == IMAGES[0].size  # below 1.1: unchanged, as A1111


def test_invert_and_transparency():
    x = rgb(IMAGES[1])
    assert (np.asarray(P.invert(IMAGES[1])) == 255 - x).all()
    rgba = Image.new("RGBA", (8, 8), (0, 0, 0, 0))  # transparent: laid on white, as A1111's HWC3
    assert (np.asarray(P.invert(rgba)) == 0).all()
    assert (np.asarray(P.invert(Image.new("L", (8, 8), 200))) == 55).all()


def test_remap_equals_opencv():
    """The warp of ``shuffle`` against cv2.remap(INTER_LINEAR): within one level (OpenCV rounds the
    coordinates to 1/32 pixel), >= 99% equal."""
    rng = np.random.default_rng(0)
    x = rgb(IMAGES[2])
    u = rng.uniform(0, x.shape[1] - 1, (40, 30)).astype(np.float32)
    v = rng.uniform(0, x.shape[0] - 1, (40, 30)).astype(np.float32)
    ours, ref = P.remap_bilinear(x, u, v).astype(int), cv2.remap(x, u, v, cv2.INTER_LINEAR).astype(int)
    assert np.abs(ours - ref).max() <= 1 and (ours == ref).mean() >= 0.99


def test_shuffle_is_seeded_and_keeps_the_colours():
    """Same seed, same hint; another seed, another. A warp moves pixels without making colours: on
    four flat quadrants >= 95% of output pixels are exactly one of the four colours (the others mix
    two across a border), and over 8 seeds each colour's share is within 0.05 of its 1/4 (one
    draw's shares vary, 0.14-0.35 measured: the field is smooth, so a warp keeps whole regions;
    the 8-seed means are 0.22-0.29)."""
    q = np.zeros((128, 128, 3), np.uint8)
    palette = np.array([(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)], np.uint8)
    q[:64, :64], q[:64, 64:], q[64:, :64], q[64:, 64:] = palette
    image = Image.fromarray(q)
    a, b = P.shuffle(image, seed=3, cell=16), P.shuffle(image, seed=3, cell=16)
    assert (np.asarray(a) == np.asarray(b)).all()
    assert (np.asarray(a) != np.asarray(P.shuffle(image, seed=4, cell=16))).any()
    shares = []
    for seed in range(8):
        out = np.asarray(P.shuffle(image, seed=seed, cell=16))
        hit = (out[:, :, None, :] == palette).all(-1)  # (H, W, 4)
        assert hit.any(-1).mean() >= 0.95
        shares.append(hit.mean((0, 1)))
    assert np.abs(np.mean(shares, 0) - 0.25).max() <= 0.05
    assert P.shuffle(IMAGES[1]).size == IMAGES[1].size  # the default cell (256) on a small image


def test_registry_and_errors():
    assert sorted(P.PREPROCESSORS) == sorted(P.OPTIONS)
    import inspect  # the table of options must match the signatures

    for name, fn in P.PREPROCESSORS.items():
        params = inspect.signature(fn).parameters
        assert tuple(k for k, p in params.items() if p.kind is p.KEYWORD_ONLY) == P.OPTIONS[name]
        assert isinstance(P.preprocess(name, IMAGES[1]), Image.Image)
    assert set(P.A1111_NAMES.values()) <= set(P.PREPROCESSORS)
    assert P.preprocess("scribble_xdog", IMAGES[1]) is not None  # A1111's module name
    with pytest.raises(ValueError, match="unknown preprocessor 'depth'; valid choices: canny, scribble"):
        P.preprocess("depth", IMAGES[1])
    with pytest.raises(ValueError, match="preprocessor canny has no option threshold; its options: low, high"):
        P.preprocess("canny", IMAGES[1], threshold=3)
    with pytest.raises(ValueError, match="low <= high"):
        P.canny(IMAGES[1], low=200, high=100)
    for bad in (lambda: P.binary(IMAGES[1], threshold=300), lambda: P.blur(IMAGES[1], sigma=0),
                lambda: P.tile(IMAGES[1], rate=0.5), lambda: P.shuffle(IMAGES[1], cell=0),
                lambda: P.scribble(IMAGES[1], threshold=-1), lambda: P.canny(IMAGES[1], sigma=-1)):
        with pytest.raises(ValueError):
            bad()


def test_cli_preprocess(tmp_path, capsys):
    src = tmp_path / "in.png"
    IMAGES[0].save(src)
    out = tmp_path / "hint.png"
    assert main(["preprocess", "canny", str(src), "-o", str(out), "--low", "50", "--high", "120"]) == 0
    assert (np.asarray(Image.open(out))[..., 0] == cv2.Canny(rgb(IMAGES[0]), 50, 120)).all()
    assert main(["preprocess", "canny", str(src), "-o", str(out)]) == 2  # exists: refused
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert main(["preprocess", "binary", str(src), "-o", str(out), "--overwrite"]) == 0
    assert main(["preprocess", "depth", str(src), "-o", str(tmp_path / "d.png")]) == 2
    assert "unknown preprocessor 'depth'; valid choices: canny, scribble" in capsys.readouterr().err
    assert main(["preprocess", "invert", str(src), "-o", str(tmp_path / "i.png"), "--low", "3"]) == 2
    assert "preprocessor invert has no option low" in capsys.readouterr().err
    assert main(["preprocess", "invert", str(tmp_path / "missing.png"), "-o", str(tmp_path / "i.png")]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["preprocess", "invert", str(tmp_path), "-o", str(tmp_path / "i.png")]) == 2
    assert "is a folder; give an image file" in capsys.readouterr().err
    assert not (tmp_path / "i.png").exists()
    assert main(["preprocess", "shuffle", str(src), "-o", str(tmp_path / "s.png"), "--seed", "5"]) == 0
    assert (np.asarray(Image.open(tmp_path / "s.png")) == np.asarray(P.shuffle(IMAGES[0], seed=5))).all()
