"""A pixel-space cascade: a 16 px base model and a 16 -> 32 px super-resolution model joined into
one file (``unfog cascade``) that ``unfog.load`` and ``unfog generate`` draw through, stage by
stage, as the two models drawn by hand do."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

import unfog
from unfog.checkpoint.io import read_metadata
from unfog.cli import main
from unfog.pipelines.cascade import StageSettings, save_cascade
from unfog.pipelines.images import read_parameters
from unfog.pipelines.latent_model import recommended_settings


def cli(*args) -> int:
    try:
        return main([str(a) for a in args])
    except SystemExit as exit:
        return exit.code


@pytest.fixture(scope="module")
def stages(pixel_base, pixel_sr, tmp_path_factory):
    return tmp_path_factory.mktemp("cascade"), pixel_base, pixel_sr


@torch.no_grad()
def test_the_cascade_draws_as_its_stages_do(stages):
    d, base, sr = stages
    settings = StageSettings(sampler="euler", steps=3, cfg_scale=1.5, noise_augmentation=0.2)
    save_cascade(d / "cascade.safetensors", base, sr, settings)
    pipe = unfog.load(d / "cascade.safetensors")
    assert pipe.default_size == 16 and pipe.super_resolution.default_size == 32
    images = pipe(["a red circle", "a blue square"], steps=2, seed=5, batch_size=2, output="tensor")
    first, second = unfog.load(base), unfog.load(sr)
    low = first(["a red circle", "a blue square"], steps=2, seed=5, batch_size=2, output="tensor")
    prompts = ["a red circle"] * 2 + ["a blue square"] * 2
    expected = second(prompts, low_res_image=low, steps=3, sampler="euler", cfg_scale=1.5, noise_augmentation=0.2,
                      seed=5, output="tensor")
    assert images.shape == (4, 3, 32, 32) and torch.equal(images, expected)


def test_unfog_cascade_and_generate(stages, tmp_path, monkeypatch, capsys):
    d, base, sr = stages
    monkeypatch.chdir(tmp_path)
    assert cli("cascade", base, sr, "-o", "c.safetensors", "--steps", 2, "--noise-augmentation", 0.15) == 0
    assert read_metadata("c.safetensors")["sr_settings"]["noise_augmentation"] == 0.15
    assert cli("generate", "a red circle", "--model", "c.safetensors", "--steps", 2, "--output", "out.png") == 0
    from PIL import Image

    assert Image.open("out.png").size == (32, 32)
    parameters = read_parameters("out.png")
    assert "Cascade: 32x32 DPM++ 2M 2 steps CFG 2.0 noise augmentation 0.15" in parameters
    # the first stage draws at the settings its model file recommends, as a single model file would
    recommended = read_metadata(base)["defaults"]
    assert recommended_settings("c.safetensors") == recommended
    assert f"CFG scale: {recommended['cfg_scale']:g}," in parameters and "CFG scale: 7," not in parameters
    capsys.readouterr()
    assert cli("cascade", base, sr, "-o", "c.safetensors") == 2  # exists: nothing is overwritten
    assert "exists" in capsys.readouterr().err


def test_bad_cascades_are_named(stages, tmp_path):
    d, base, sr = stages
    with pytest.raises(ValueError, match="is a super-resolution model; the base stage draws from noise"):
        save_cascade(tmp_path / "x.safetensors", sr, sr)
    with pytest.raises(ValueError, match="draws from noise; the second stage must be a super-resolution model"):
        save_cascade(tmp_path / "x.safetensors", base, base)
    with pytest.raises(ValueError, match="unknown sampler"):
        StageSettings(sampler="fast")
    save_cascade(tmp_path / "c.safetensors", base, sr)
    tensors = {k: v for k, v in load_file(str(tmp_path / "c.safetensors")).items() if not k.startswith("sr.")}
    meta = {k: v for k, v in (read_metadata(tmp_path / "c.safetensors") or {}).items()}
    import json

    save_file(tensors, str(tmp_path / "half.safetensors"), metadata={k: json.dumps(v) for k, v in meta.items()})
    with pytest.raises(ValueError, match="a cascade file without its sr stage"):
        unfog.load(tmp_path / "half.safetensors")
