"""``--vae`` on the command line, with the embedded shapes model.

The oracle is the model's own VAE: written out as an unfog autoencoder file and swapped in, it
must draw the very image the model draws without ``--vae`` (same weights, same latents), while a
VAE with perturbed decoder weights must not. The PNG records A1111's ``VAE hash`` (the file's
sha256, first 10 digits) and ``VAE`` (its file name); ``--from`` warns when the VAE differs.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from PIL import Image

from unfog.cli import DEFAULT_TEXT_MODEL, default_model_path, main
from unfog.pipelines.latent_model import load_autoencoder, save_autoencoder

pytestmark = pytest.mark.usefixtures("single_thread")  # tests/conftest.py


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def test_vae_option_swaps_the_decoder_and_is_recorded(tmp_path, capsys):
    vae = load_autoencoder(default_model_path(DEFAULT_TEXT_MODEL))
    save_autoencoder(tmp_path / "same.safetensors", vae)
    with torch.no_grad():
        vae.decoder.conv_out.bias.add_(0.5)  # every pixel brighter by a quarter of the range
    save_autoencoder(tmp_path / "bright.safetensors", vae)
    common = ["generate", "a red circle", "--steps", "2", "--seed", "3"]
    assert main([*common, "--output", str(tmp_path / "own.png")]) == 0
    assert main([*common, "--vae", str(tmp_path / "same.safetensors"), "--output", str(tmp_path / "same.png")]) == 0
    assert main([*common, "--vae", str(tmp_path / "bright.safetensors"), "--output", str(tmp_path / "b.png")]) == 0
    assert np.array_equal(pixels(tmp_path / "own.png"), pixels(tmp_path / "same.png"))
    assert (pixels(tmp_path / "b.png") - pixels(tmp_path / "own.png")).mean() > 20

    capsys.readouterr()
    assert main(["info", str(tmp_path / "b.png")]) == 0
    info = capsys.readouterr().out
    digest = hashlib.sha256((tmp_path / "bright.safetensors").read_bytes()).hexdigest()[:10]
    assert f"VAE hash: {digest}, VAE: bright.safetensors" in info
    assert main(["info", str(tmp_path / "own.png")]) == 0
    assert "VAE" not in capsys.readouterr().out

    assert main(["generate", "--from", str(tmp_path / "b.png"), "--output", str(tmp_path / "c.png")]) == 0
    assert f"the image was made with the VAE bright.safetensors [{digest}]; --vae is not given" in capsys.readouterr().err
    assert main(["generate", "--from", str(tmp_path / "b.png"), "--vae", str(tmp_path / "bright.safetensors"),
                 "--output", str(tmp_path / "d.png")]) == 0
    assert "VAE" not in capsys.readouterr().err
    assert np.array_equal(pixels(tmp_path / "b.png"), pixels(tmp_path / "d.png"))


def test_vae_option_errors(tmp_path, capsys):
    assert main(["generate", "a red circle", "--vae", str(tmp_path / "none.safetensors")]) == 2
    assert "VAE not found" in capsys.readouterr().err
