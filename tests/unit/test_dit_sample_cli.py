"""`unfog sample` on a class-conditional DiT file with its VAE: the class grid is the pipeline's
own images, the PNG names the settings, and the missing or misplaced --vae is a one-line error."""

from __future__ import annotations

import re

import numpy as np
import torch
from PIL import Image

from unfog.checkpoint.dit import save_dit
from unfog.cli import main
from unfog.models.dit import DiT, DiTConfig
from unfog.models.vae import TINY_VAE, AutoencoderKL
from unfog.pipelines.dit import ClassConditionalDiT
from unfog.pipelines.images import make_grid, read_parameters
from unfog.pipelines.latent_model import save_autoencoder


def cli(*args) -> int:
    try:
        return main([str(a) for a in args])
    except SystemExit as exit:
        return exit.code


def test_sample_draws_the_pipelines_images(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    dit = DiT(DiTConfig(input_size=8, hidden_size=16, depth=1, num_heads=2, num_classes=5))
    for p in dit.parameters():
        torch.nn.init.normal_(p, std=0.1)  # the zero-initialised layers too: a model that draws something
    vae = AutoencoderKL(TINY_VAE).eval()
    save_dit(dit, tmp_path / "dit.safetensors")
    save_autoencoder(tmp_path / "vae.safetensors", vae)
    assert cli("sample", "--model", "dit.safetensors", "--vae", "vae.safetensors", "--classes", "1,3",
               "--per-class", 1, "--steps", 3, "--scale", 1, "--out", "grid.png") == 0
    expected = ClassConditionalDiT(dit, vae)([1, 3], steps=3, seed=0, output="tensor")  # (2, 3, 16, 16)
    grid = np.asarray(Image.open(tmp_path / "grid.png").convert("RGB")).astype(int)
    assert np.abs(grid - np.asarray(make_grid(expected, nrow=2, scale=1).convert("RGB")).astype(int)).max() <= 1
    params = read_parameters(tmp_path / "grid.png")
    assert "classes 1,3 x 1" in params and "Sampler: ddim" in params and "CFG scale: 4.0" in params
    assert "VAE: vae.safetensors" in params and re.search(r"Steps: 3\b", params)


def test_a_dit_needs_its_vae(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    save_dit(DiT(DiTConfig(input_size=8, hidden_size=16, depth=1, num_heads=2, num_classes=5)), tmp_path / "d.safetensors")
    capsys.readouterr()
    assert cli("sample", "--model", "d.safetensors", "--steps", 1) == 2
    err = capsys.readouterr().err
    assert "draws latents: give --vae" in err and err.count("\n") == 1
