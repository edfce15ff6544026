"""`unfog generate | img2img | inpaint | info` and `unfog.load`, end to end on tiny random models
saved as single-file checkpoints in the official layouts (prefixes, OpenCLIP naming for bigG).

The official families are detected by exact full-size shapes, so these tests register tiny
families of the same layouts (``TINY_SD1``, ``TINY_XL``, ``TINY_XL_REFINER``) in
``checkpoint.FAMILIES``, where detection finds them as it finds SD15 or SDXL_BASE. The VAE has
four levels, so images are multiples of 8 pixels as with the real models.
"""

from __future__ import annotations

import hashlib
import io
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import unfog
from unfog.checkpoint.components import MODULES
from unfog.checkpoint.convert import convert_to_openclip_text
from unfog.checkpoint.detect import FAMILIES
from unfog.checkpoint.io import save_safetensors
from unfog.cli import main
from unfog.models.clip_text import TINY_CLIP
from unfog.models.presets import DIGITS, TINY
from unfog.models.unet import UNet
from unfog.models.vae import VAEConfig
from unfog.pipelines.images import read_parameters
from unfog.pipelines.outputs import (StepProgress, format_parameters, parse_parameters, sampler_name,
                                     settings_from_parameters)
from unfog.pipelines.pixel import PixelDiffusion, PixelModelInfo

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: model_checks
from model_checks import randomize_  # noqa: E402

VAE8 = VAEConfig(base_channels=32, channel_mult=(1, 1, 1, 1), num_res_blocks=1)  # f = 8, like SD's
BIG_G = replace(TINY_CLIP, activation="gelu", projection_dim=32)
XL_UNET = replace(TINY, num_heads=None, num_head_channels=16, use_linear_projection=True, context_dim=64,
                  num_classes="sequential", adm_in_channels=32 + 6 * 256)
TINY_FAMILIES = {
    "TINY_SD1": replace(FAMILIES["SD15"], name="TINY_SD1", unet=TINY, vae=VAE8, text_encoder=TINY_CLIP),
    "TINY_SD1_INPAINT": replace(FAMILIES["SD15_INPAINT"], name="TINY_SD1_INPAINT", unet=replace(TINY, in_channels=9),
                                vae=VAE8, text_encoder=TINY_CLIP),
    "TINY_XL": replace(FAMILIES["SDXL_BASE"], name="TINY_XL", unet=XL_UNET, vae=replace(VAE8, scaling_factor=0.13025),
                       text_encoder=TINY_CLIP, text_encoder_2=BIG_G),
    "TINY_XL_REFINER": replace(FAMILIES["SDXL_REFINER"], name="TINY_XL_REFINER",
                               unet=replace(XL_UNET, context_dim=32, adm_in_channels=32 + 5 * 256),
                               vae=replace(VAE8, scaling_factor=0.13025), text_encoder_2=BIG_G),
}
FAST = ["--steps", "2", "--width", "64", "--height", "64"]


@pytest.fixture(autouse=True, scope="module")
def tiny_families_and_one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        for name, family in TINY_FAMILIES.items():
            mp.setitem(FAMILIES, name, family)
        yield
    torch.set_num_threads(previous)


def write_checkpoint(path: Path, family_name: str, seed: int, dtype=torch.float32) -> Path:
    """A single file in the official layout of the family: each component under its prefix,
    CLIP-L in transformers naming, OpenCLIP towers in OpenCLIP naming."""
    family = TINY_FAMILIES[family_name]
    tensors = {}
    for i, component in enumerate(family.components):
        state = randomize_(MODULES[component](getattr(family, component)), seed=seed + i).state_dict()
        prefix = family.prefix(component)
        if prefix.endswith(".model."):
            state = convert_to_openclip_text(state)
        elif component.startswith("text_encoder"):
            state = {"text_model." + k: v for k, v in state.items()}
        tensors |= {prefix + k: v.to(dtype) for k, v in state.items()}
    save_safetensors(path, tensors, {})
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("models")
    return {
        "sd1": write_checkpoint(d / "tiny-sd1.safetensors", "TINY_SD1", seed=1),
        "sd1_fp16": write_checkpoint(d / "tiny-sd1-fp16.safetensors", "TINY_SD1", seed=1, dtype=torch.float16),
        "sd1_other": write_checkpoint(d / "tiny-sd1-other.safetensors", "TINY_SD1", seed=7),
        "inpainting": write_checkpoint(d / "tiny-inpainting.safetensors", "TINY_SD1_INPAINT", seed=3),
        "xl": write_checkpoint(d / "tiny-xl.safetensors", "TINY_XL", seed=11),
        "refiner": write_checkpoint(d / "tiny-refiner.safetensors", "TINY_XL_REFINER", seed=21),
    }


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


def cli(*args) -> int:
    try:
        return main([str(a) for a in args])
    except SystemExit as exit:  # argparse's own errors
        return exit.code


def sha10(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:10]


def params_of(path: Path) -> dict[str, str]:
    return parse_parameters(read_parameters(path))


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def random_png(path: Path, size=(64, 64), seed=0, mode="RGB") -> Path:
    rng = np.random.default_rng(seed)
    channels = 3 if mode == "RGB" else 1
    pixels = rng.integers(0, 256, size=(size[1], size[0], channels), dtype=np.uint8)
    Image.fromarray(pixels if channels == 3 else pixels[..., 0], mode).save(path)
    return path


# ---------------------------------------------------------------- generate, --from, outputs


def test_generate_writes_a_png_with_a1111_parameters(models, workdir, capsys):
    assert cli("generate", "a red bicycle", "--model", models["sd1"], "--negative", "blurry, lowres",
               "--seed", 5, *FAST) == 0
    out = workdir / "outputs" / "00001-5.png"
    assert capsys.readouterr().out == f"wrote {Path('outputs') / '00001-5.png'}\n"
    assert Image.open(out).size == (64, 64)
    text = read_parameters(out)
    assert text.splitlines()[:2] == ["a red bicycle", "Negative prompt: blurry, lowres"]
    assert text.splitlines()[2] == (
        f"Steps: 2, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 5, Size: 64x64, "
        f"Model hash: {sha10(models['sd1'])}, Model: tiny-sd1, Clip skip: 1, Version: unfog {unfog.__version__}")


def test_output_names_never_overwrite(models, workdir, capsys):
    args = ("generate", "a cat", "--model", models["sd1"], "--seed", 3, *FAST)
    assert cli(*args) == 0 and cli(*args) == 0
    outputs = workdir / "outputs"
    first = (outputs / "00001-3.png").read_bytes()
    assert (outputs / "00002-3.png").read_bytes() == first  # same settings, a new file
    (outputs / "00009-mine.png").write_bytes(b"not ours")
    assert cli(*args, "--seed", 7, "--batch-size", 2) == 0  # seeds 7 and 8, numbers after 9
    assert sorted(p.name for p in outputs.iterdir()) == [
        "00001-3.png", "00002-3.png", "00009-mine.png", "00010-7.png", "00011-8.png"]
    assert (outputs / "00009-mine.png").read_bytes() == b"not ours"
    assert params_of(outputs / "00011-8.png")["Seed"] == "8"
    # a named file: refused when it exists, replaced only with --overwrite
    named = workdir / "named.png"
    named.write_bytes(b"keep me")
    capsys.readouterr()
    assert cli(*args, "--output", named) == 2
    assert "--overwrite" in capsys.readouterr().err and named.read_bytes() == b"keep me"
    assert cli(*args, "--output", named, "--overwrite") == 0 and named.read_bytes() == first
    # a folder named by --output is created
    assert cli(*args, "--output", workdir / "elsewhere") == 0
    assert (workdir / "elsewhere" / "00001-3.png").read_bytes() == first


def test_from_reproduces_the_same_bytes(models, workdir, capsys):
    """Settings away from every default, a 72 x 56 image (9 x 7 latents: odd sizes through the
    U-Net), a prompt and negative prompt that need quoting."""
    first = workdir / "first.png"
    assert cli("generate", 'a "red" bicycle, (morning:1.2)', "--negative", "blurry, bad: hands", "--model",
               models["sd1"], "--steps", 3, "--sampler", "Euler a", "--spacing", "karras", "--cfg-scale", 5.5,
               "--seed", 123, "--width", 72, "--height", 56, "--clip-skip", 2, "--output", first) == 0
    p = params_of(first)
    assert (p["Prompt"], p["Negative prompt"], p["Sampler"], p["Schedule type"], p["Size"], p["Clip skip"]) == (
        'a "red" bicycle, (morning:1.2)', "blurry, bad: hands", "Euler a", "Karras", "72x56", "2")
    again = workdir / "again.png"
    assert cli("generate", "--from", first, "--model", models["sd1"], "--output", again) == 0
    assert again.read_bytes() == first.read_bytes()
    # options typed win over the image's; another model is reported
    capsys.readouterr()
    other = workdir / "other.png"
    assert cli("generate", "--from", first, "--model", models["sd1_other"], "--seed", 124, "--output", other) == 0
    assert "made with model tiny-sd1 [" in capsys.readouterr().err
    assert params_of(other)["Seed"] == "124" and params_of(other)["Prompt"] == p["Prompt"]
    assert not np.array_equal(pixels(other), pixels(first))
    # an empty prompt is a prompt
    assert cli("generate", "", "--model", models["sd1"], "--seed", 1, "--output", workdir / "empty.png", *FAST) == 0
    assert params_of(workdir / "empty.png")["Prompt"] == ""


def test_cfg_truncation_is_the_guided_run_handed_to_an_unguided_one(models, workdir):
    """--cfg-truncation 0.5 over 4 Euler steps: CFG for steps 0-1, the conditional pass alone for
    2-3. The oracle is the pipeline's hand-off: the guided run stopped half way
    (denoising_end=0.5), continued at CFG scale 1 (denoising_start=0.5)."""
    out = workdir / "truncated.png"
    assert cli("generate", "a red bicycle", "--model", models["sd1"], "--steps", 4, "--sampler", "Euler",
               "--width", 64, "--height", 64, "--seed", 4, "--cfg-truncation", 0.5, "--output", out) == 0
    assert params_of(out)["CFG truncation"] == "0.5"
    pipe = unfog.load(models["sd1"])
    common = dict(steps=4, sampler="Euler", width=64, height=64, seed=4)
    half = pipe("a red bicycle", **common, cfg_scale=7, denoising_end=0.5, output="latent")
    oracle = pipe("a red bicycle", **common, cfg_scale=1, denoising_start=0.5, latents=half)[0]
    assert len(pipe.sigmas(4, "Euler", denoising_end=0.5)) == 3  # the hand-off after step 2 of 4
    assert np.array_equal(pixels(out), np.asarray(oracle))
    assert not np.array_equal(pixels(out), np.asarray(pipe("a red bicycle", **common, cfg_scale=7)[0]))
    again = workdir / "again.png"
    assert cli("generate", "--from", out, "--model", models["sd1"], "--output", again) == 0
    assert again.read_bytes() == out.read_bytes()
    plain = workdir / "plain.png"
    assert cli("generate", "a red bicycle", "--model", models["sd1"], "--seed", 4, "--output", plain, *FAST) == 0
    assert "CFG truncation" not in params_of(plain)


def test_deep_cache_runs_the_whole_unet_every_nth_step_and_is_recorded(models, workdir):
    pipe = unfog.load(models["sd1"])
    full = []
    pipe.unet.middle_block.register_forward_pre_hook(lambda module, args: full.append(args[0].shape[0]))
    common = dict(steps=7, sampler="Euler", width=64, height=64, seed=4, output="latent")
    plain = pipe("a red bicycle", **common)
    assert torch.equal(pipe("a red bicycle", **common, deep_cache=1), plain) and len(full) == 14
    full.clear()
    cached = pipe("a red bicycle", **common, deep_cache=3)
    assert full == [2, 2, 2]  # steps 0, 3, 6 in full (CFG: a batch of 2)
    assert not torch.equal(cached, plain)
    full.clear()
    pipe("a red bicycle", **common, deep_cache=3, cfg_truncation=0.5)  # steps 0-3 guided, 4-6 not: batch 1
    assert full == [2, 2, 1, 1]  # steps 0 and 3 by the interval, 4 for its new batch size, 6 by the interval
    full.clear()
    started = pipe("a red bicycle", **common, deep_cache=3, deep_cache_start=0.3)
    assert full == [2, 2, 2, 2]  # steps 0-2 (ceil(0.3 * 7) = 3) in full, the interval from step 2: 5
    assert not torch.equal(started, cached) and not torch.equal(started, plain)
    full.clear()
    assert torch.equal(pipe("a red bicycle", **common, deep_cache=3, deep_cache_start=0.99), plain)  # all 7 in full
    assert len(full) == 7
    with pytest.raises(ValueError, match=r"DeepCache start must be in \[0, 1\) \(the fraction of the steps run in "
                       r"full first\), got 1"):
        pipe("a red bicycle", **common, deep_cache=3, deep_cache_start=1)
    out = workdir / "cached.png"
    assert cli("generate", "a red bicycle", "--model", models["sd1"], "--seed", 4, "--deep-cache", 3,
               "--deep-cache-branch", 1, "--deep-cache-start", 0.25, "--output", out, *FAST) == 0
    assert (params_of(out)["DeepCache"], params_of(out)["DeepCache branch"], params_of(out)["DeepCache start"]) == \
        ("3", "1", "0.25")
    again = workdir / "again.png"
    assert cli("generate", "--from", out, "--model", models["sd1"], "--output", again) == 0
    assert again.read_bytes() == out.read_bytes()


def test_token_merging_is_recorded_as_a1111_writes_it_and_changes_the_image(models, workdir):
    out, plain = workdir / "merged.png", workdir / "plain.png"
    assert cli("generate", "a red bicycle", "--model", models["sd1"], "--seed", 4, "--token-merging", 0.5,
               "--output", out, *FAST) == 0
    assert cli("generate", "a red bicycle", "--model", models["sd1"], "--seed", 4, "--output", plain, *FAST) == 0
    assert params_of(out)["Token merging ratio"] == "0.5" and "Token merging ratio" not in params_of(plain)
    assert not np.array_equal(pixels(out), pixels(plain))
    again = workdir / "again.png"
    assert cli("generate", "--from", out, "--model", models["sd1"], "--output", again) == 0
    assert again.read_bytes() == out.read_bytes()


def init_and_mask(workdir: Path) -> Path:
    """A random 64 x 64 init image, and mask.png beside it (a white rectangle to repaint)."""
    mask = Image.new("L", (64, 64))
    mask.paste(255, (16, 8, 48, 40))
    mask.save(workdir / "mask.png")
    return random_png(workdir / "init.png", seed=1)


def test_img2img_and_inpaint(models, workdir, capsys):
    init = init_and_mask(workdir)
    first = workdir / "i2i.png"
    assert cli("img2img", "a watercolour", "--model", models["sd1"], "--init", init, "--steps", 4, "--seed", 9,
               "--output", first) == 0
    p = params_of(first)
    assert (p["Denoising strength"], p["Size"], p["Steps"]) == ("0.75", "64x64", "4")
    again = workdir / "i2i-again.png"
    assert cli("img2img", "--from", first, "--model", models["sd1"], "--init", init, "--output", again) == 0
    assert again.read_bytes() == first.read_bytes()
    # --width / --height resize the init image
    assert cli("img2img", "a watercolour", "--model", models["sd1"], "--init", init, "--steps", 2, "--seed", 9,
               "--strength", 0.5, "--width", 48, "--height", 32, "--output", workdir / "small.png") == 0
    assert Image.open(workdir / "small.png").size == (48, 32)
    painted = workdir / "inpaint.png"
    assert cli("inpaint", "a door", "--model", models["sd1"], "--init", init, "--mask", workdir / "mask.png",
               "--steps", 4, "--strength", 1, "--seed", 2, "--output", painted) == 0
    assert params_of(painted)["Denoising strength"] == "1"
    assert cli("inpaint", "a door", "--model", models["inpainting"], "--init", init, "--mask", workdir / "mask.png",
               "--steps", 2, "--seed", 2, "--output", workdir / "inpaint9.png") == 0  # a 9-channel U-Net
    capsys.readouterr()
    # generate --from an img2img image: the strength does not apply
    assert cli("generate", "--from", first, "--model", models["sd1"], "--output", workdir / "t2i.png") == 0
    assert "generate ignores it" in capsys.readouterr().err
    assert "Denoising strength" not in params_of(workdir / "t2i.png")


def test_inpaint_with_repaint_is_recorded_and_redrawn(models, workdir, capsys):
    init = init_and_mask(workdir)
    out = workdir / "repaint.png"
    args = ("--model", models["sd1"], "--init", init, "--mask", workdir / "mask.png")
    assert cli("inpaint", "a door", *args, "--steps", 6, "--strength", 1, "--sampler", "DDIM", "--seed", 2,
               "--repaint", "2x3", "--output", out) == 0
    assert params_of(out)["RePaint"] == "2x3"
    again = workdir / "again.png"
    assert cli("inpaint", "--from", out, *args, "--output", again) == 0
    assert again.read_bytes() == out.read_bytes()
    capsys.readouterr()
    assert cli("generate", "--from", out, "--model", models["sd1"], "--output", workdir / "t2i.png") == 0
    assert "RePaint" not in params_of(workdir / "t2i.png")  # a txt2img redraw has no mask to repaint
    capsys.readouterr()
    assert cli("inpaint", "a door", *args, "--strength", 1, "--sampler", "Euler", "--repaint", "2x3") == 2
    assert "pass sampler='DDPM' or 'DDIM'" in capsys.readouterr().err
    assert cli("inpaint", "a door", *args, "--repaint", "3") == 2  # argparse's error
    assert "--repaint must be JUMP_LENGTHxJUMPS, e.g. 10x10, got '3'" in capsys.readouterr().err


def test_info(models, workdir, capsys):
    out = workdir / "x.png"
    assert cli("generate", "a boat", "--model", models["sd1"], "--seed", 1, "--output", out, *FAST) == 0
    capsys.readouterr()
    assert cli("info", out) == 0
    assert capsys.readouterr().out == read_parameters(out) + "\n"
    plain = random_png(workdir / "plain.png")
    assert cli("info", plain) == 2
    assert capsys.readouterr().err == f"unfog: error: {plain} carries no generation parameters (no 'parameters' " \
                                      "text chunk)\n"


def test_sdxl_refiner_hand_off(models, workdir, capsys):
    base = ("generate", "a castle", "--model", models["xl"], "--steps", 4, "--seed", 4, "--width", 64,
            "--height", 64)
    first = workdir / "refined.png"
    assert cli(*base, "--refiner", models["refiner"], "--refiner-start", 0.5, "--output", first) == 0
    p = params_of(first)
    assert p["Refiner"] == f"tiny-refiner [{sha10(models['refiner'])}]" and p["Refiner switch at"] == "0.5"
    assert p["Clip skip"] == "2" and p["Schedule type"] == "Karras"
    assert cli(*base, "--output", workdir / "base.png") == 0  # the base alone differs
    assert not np.array_equal(pixels(workdir / "base.png"), pixels(first))
    again = workdir / "again.png"
    assert cli("generate", "--from", first, "--model", models["xl"], "--refiner", models["refiner"],
               "--output", again) == 0
    assert again.read_bytes() == first.read_bytes()
    capsys.readouterr()
    assert cli("generate", "--from", first, "--model", models["xl"], "--output", workdir / "b2.png") == 0
    assert "pass --refiner" in capsys.readouterr().err


# ---------------------------------------------------------------- errors


def error_cases(models, workdir):
    init = random_png(workdir / "init.png")
    narrow = random_png(workdir / "narrow.png", size=(32, 64), mode="L")
    pixel = workdir / "digits.safetensors"
    PixelDiffusion(UNet(replace(DIGITS, num_classes=11)), PixelModelInfo(16, 1, num_classes=10)).save(pixel)
    (workdir / "taken.png").write_bytes(b"")
    sd1, xl = models["sd1"], models["xl"]
    gen = ("generate", "a cat", "--model", sd1)
    return [
        ((*gen, "--width", 65, "--height", 64), "width 65 is not a multiple of 8; nearest valid values: 64 or 72"),
        ((*gen, "--height", 4), "height 4 is not a multiple of 8; nearest valid values: 8"),
        ((*gen, "--width", 0), "width must be >= 1, got 0"),
        ((*gen, "--sampler", "eulr"), "unknown sampler 'eulr'; valid choices: ddim, ddpm, dpm_2"),
        ((*gen, "--spacing", "cosine"), "unknown sigma spacing 'cosine'"),
        (("generate", "a cat", "--model", workdir / "nope.safetensors"), "model not found: "),
        (("img2img", "a cat", "--model", sd1, "--init", workdir / "nope.png"), "init image not found: "),
        (("inpaint", "a cat", "--model", sd1, "--init", init, "--mask", narrow),
         "is 32x64 but the init image"),
        (("img2img", "a cat", "--model", sd1, "--init", init, "--strength", 1.5), "strength must be in (0, 1]"),
        ((*gen, "--refiner", models["refiner"]), "--refiner needs an SDXL base model, but --model is sd1"),
        (("generate", "a cat", "--model", xl, "--refiner", xl), "is sdxl, not an SDXL refiner"),
        ((*gen, "--family", "sd3"), "unknown model family 'sd3'; valid names: SD15, SD15_INPAINT"),
        ((*gen, "--family", "sd2"), "belong to no component of SD2"),
        ((*gen, "--dtype", "fp64"), "argument --dtype: invalid choice: 'fp64'"),
        ((*gen, "--cfg-truncation", 1.5), "--cfg-truncation must be in [0, 1] (the fraction of the steps guided), "
         "got 1.5"),
        ((*gen, "--token-merging", 1), "--token-merging must be in [0, 1) (the fraction of tokens merged), got 1.0"),
        ((*gen, "--deep-cache", 0), "--deep-cache must be >= 1 (1: off) and --deep-cache-branch >= 0, got 0 and 0"),
        ((*gen, "--deep-cache", 2, "--deep-cache-start", 1), "--deep-cache-start must be in [0, 1) (the fraction of "
         "the steps run in full first), got 1.0"),
        ((*gen, "--steps", 0), "--steps must be >= 1, got 0"),
        ((*gen, "--seed", -2), "seed -2 is out of range; valid: -1 (a random one) or 0.."),
        (("generate", "a cat", "--model", pixel), "is an unfog pixel model"),
        (("generate", "a cat", "--model", models["inpainting"]), "is an inpainting model (9 input channels): use "
         "unfog inpaint"),
        ((*gen, "--output", workdir / "x.jpg"), "--output must be a .png file or a folder"),
        ((*gen, "--output", workdir / "one.png", "--batch-size", 2), "give a folder"),
        ((*gen, "--output", workdir / "taken.png"), "already exists; pass --overwrite"),
        (("generate", "--model", sd1), "give a PROMPT, or --from IMAGE.png"),
        (("generate", "--model", sd1, "--from", init), "carries no generation parameters"),
        (("info", workdir / "nope.png"), "image not found: "),
        (("info", pixel), "is not an image that can be read"),
    ]


def test_errors_are_one_line(models, workdir, capsys):
    for args, message in error_cases(models, workdir):
        capsys.readouterr()
        assert cli(*args) == 2, args
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1 and "Traceback" not in err, (args, err)
    assert not (workdir / "outputs").exists()  # nothing was written by a failed command


def test_family_option(models, workdir):
    assert cli("generate", "a cat", "--model", models["sd1"], "--family", "tiny_sd1", "--seed", 1,
               "--output", workdir / "f.png", *FAST) == 0


# ---------------------------------------------------------------- the parameters text

A1111_TEXT = """masterpiece, best quality, 1girl, (smile:1.1),
standing in a field
Negative prompt: lowres, bad anatomy, (worst quality:1.4)
Steps: 28, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7.5, Seed: 1234567890, Size: 512x768, \
Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Denoising strength: 0.55, Clip skip: 2, Hires upscale: 2, \
Hires upscaler: Latent, Lora hashes: "add_detail: 7c6bad76eb54, more_art: 1b2d3c4e5f6a", \
TI hashes: "easynegative: c74b4e810b03", Version: v1.10.1"""


def test_parse_an_a1111_parameters_text():
    p = parse_parameters(A1111_TEXT)
    assert p["Prompt"] == "masterpiece, best quality, 1girl, (smile:1.1),\nstanding in a field"
    assert p["Negative prompt"] == "lowres, bad anatomy, (worst quality:1.4)"
    assert p["Lora hashes"] == "add_detail: 7c6bad76eb54, more_art: 1b2d3c4e5f6a"
    assert p["TI hashes"] == "easynegative: c74b4e810b03"
    assert (p["Steps"], p["Size"], p["Version"], p["Hires upscaler"]) == ("28", "512x768", "v1.10.1", "Latent")
    s = settings_from_parameters(p)
    assert s == dict(prompt=p["Prompt"], negative_prompt=p["Negative prompt"], steps=28, cfg_scale=7.5,
                     seed=1234567890, clip_skip=2, strength=0.55, sampler="DPM++ 2M", spacing="karras",
                     width=512, height=768, hires=True, hr_scale=2.0, hr_upscaler="Latent")  # A1111's hires fix
    # older A1111: the schedule in the sampler name, no Schedule type; no negative prompt
    old = parse_parameters("a cat\nSteps: 20, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 1, Size: 512x512")
    assert (old["Prompt"], old["Negative prompt"], old["Sampler"]) == ("a cat", "", "DPM++ 2M Karras")
    # a text without a parameters line is all prompt
    assert parse_parameters("just a prompt, really") == {"Prompt": "just a prompt, really", "Negative prompt": ""}


def test_parameters_round_trip():
    prompt = 'a "quoted" word, a colon: here\nand a second line'
    negative = "bad, worse\nNegative-looking: line"
    values = {"Steps": 30, "Sampler": "Euler a", "CFG scale": 6.25, "Seed": 42, "Size": "64x48",
              "Model": "my, model: v2", "Clip skip": 2, "Denoising strength": 0.3, "Empty": None}
    text = format_parameters(prompt, negative, values)
    assert 'Model: "my, model: v2"' in text and "Empty" not in text
    p = parse_parameters(text)
    assert (p["Prompt"], p["Negative prompt"]) == (prompt, negative)
    assert {k: p[k] for k in values if k != "Empty"} == {k: str(v) for k, v in values.items() if k != "Empty"}
    with pytest.raises(ValueError, match="'Steps: many' is not a number"):
        settings_from_parameters({"Steps": "many"})
    with pytest.raises(ValueError, match="Schedule type 'Align Your Steps' is not one unfog has; valid: Automatic"):
        settings_from_parameters({"Schedule type": "Align Your Steps"})


@pytest.mark.parametrize("given, recorded", [
    ("DPM++ 2M Karras", "DPM++ 2M"), ("euler_ancestral", "Euler a"), ("dpm++ 2m sde heun karras", "DPM++ 2M SDE Heun"),
    ("uni_pc_bh2", "uni_pc_bh2"), ("unipc", "UniPC"), ("DPM++ 2S", "dpmpp_2s"),  # A1111 has no DPM++ 2S
])
def test_sampler_names_recorded(given, recorded):
    assert sampler_name(given) == recorded


def test_progress_bar_counts_steps_and_opens_late():
    stream = io.StringIO()
    with StepProgress(3, "image 1/1", file=stream, disable=False) as bar:
        assert stream.getvalue() == ""  # nothing before the first step
        for i in range(3):
            bar.callback({"i": i})
    assert "image 1/1" in stream.getvalue() and "3/3" in stream.getvalue()


# ---------------------------------------------------------------- unfog.load


def test_unfog_load_gives_plain_fp32_modules(models):
    pipe = unfog.load(models["sd1_fp16"])
    assert pipe.family == "sd1" and pipe.tokenizer is not None and pipe.text_encoder_2 is None
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        assert isinstance(module, torch.nn.Module)
        assert {p.dtype for p in module.parameters()} == {torch.float32}
        assert {p.device.type for p in module.parameters()} == {"cpu"}
    x, ctx = torch.randn(1, 4, 8, 8), torch.randn(1, 77, 32)
    assert pipe.unet(x, torch.tensor([500]), ctx).shape == x.shape
    assert {p.dtype for p in unfog.load(models["sd1"], dtype=torch.bfloat16).unet.parameters()} == {torch.bfloat16}


def test_unfog_load_refuses_a_pixel_model(workdir):
    pixel = workdir / "digits.safetensors"
    PixelDiffusion(UNet(replace(DIGITS, num_classes=11)), PixelModelInfo(16, 1, num_classes=10)).save(pixel)
    with pytest.raises(ValueError, match="is an unfog pixel model, not a Stable Diffusion checkpoint; load it "
                                         "with PixelDiffusion.load"):
        unfog.load(pixel)


def test_import_unfog_stays_light():
    code = "import sys, unfog; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"


# ---------------------------------------------------------------- textual inversion


def test_embeddings_dir_loads_the_named_embeddings_and_records_ti_hashes(models, workdir, capsys):
    folder = workdir / "embeddings"
    (folder / "sub").mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    torch.save({"string_to_param": {"*": torch.randn(2, TINY_CLIP.width, generator=g) * 5}}, folder / "mystyle.pt")
    torch.save({"string_to_param": {"*": torch.randn(1, 768, generator=g)}}, folder / "sub" / "wide.pt")
    (folder / "unused.pt").write_bytes(b"not read: its name is not in the prompt")
    args = ("generate", "a (mystyle:1.2) cat, wide", "--model", models["sd1"], "--seed", 3, *FAST)
    assert cli(*args, "--embeddings-dir", folder, "--output", "with.png") == 0
    err = capsys.readouterr().err
    assert "skipped embedding wide" in err and "it is for SD 1.x (768)" in err and "unused" not in err
    sha12 = hashlib.sha256((folder / "mystyle.pt").read_bytes()).hexdigest()[:12]
    assert params_of(workdir / "with.png")["TI hashes"] == f"mystyle: {sha12}"
    assert cli(*args, "--output", "without.png") == 0
    assert "TI hashes" not in params_of(workdir / "without.png")
    assert not np.array_equal(pixels(workdir / "with.png"), pixels(workdir / "without.png"))
    # a name written as embeddings usually are, with no file of that name: said once, kept as text
    assert cli("generate", "a <sks> cat", "--model", models["sd1"], *FAST, "--embeddings-dir", folder) == 0
    err = capsys.readouterr().err
    assert err.count("<sks>: no embedding of that name in ") == 1 and "keeps it as plain text" in err
