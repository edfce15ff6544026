"""The pixel pipeline's model file and the `unfog` command line."""

import subprocess
import sys

import pytest
import torch

from unfog.cli import main
from unfog.models.presets import DIGITS
from unfog.models.unet import UNet
from unfog.pipelines.images import read_parameters
from unfog.pipelines.pixel import PixelDiffusion, PixelModelInfo
from dataclasses import replace


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    torch.manual_seed(0)
    cfg = replace(DIGITS, model_channels=32, channel_mult=(1, 2), transformer_depth=(0, 1), num_res_blocks=1,
                  num_classes=11)
    pipe = PixelDiffusion(UNet(cfg), PixelModelInfo(8, 1, num_classes=10, class_names=tuple("0123456789")))
    path = tmp_path_factory.mktemp("m") / "m.safetensors"
    pipe.save(path)
    return path


def test_model_file_round_trip(model_file):
    a = PixelDiffusion.load(model_file)
    b = PixelDiffusion.load(model_file)
    x1 = a.generate([1, 2], steps=3, seed=4)
    assert x1.shape == (2, 1, 8, 8) and torch.equal(x1, b.generate([1, 2], steps=3, seed=4))
    assert a.info.class_names == tuple("0123456789")


def test_generate_bad_input(model_file):
    pipe = PixelDiffusion.load(model_file)
    with pytest.raises(ValueError, match="valid labels: 0..9"):
        pipe.generate([10])
    with pytest.raises(ValueError, match="steps must be >= 1"):
        pipe.generate([1], steps=0)
    with pytest.raises(ValueError, match="guidance scale must be >= 0"):
        pipe.generate([1], cfg_scale=-1)
    with pytest.raises(ValueError, match="unknown sampler"):
        pipe.generate([1], sampler="nope")


def test_not_a_model(tmp_path):
    bad = tmp_path / "x.safetensors"
    bad.write_bytes(b"\x00" * 20)
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        PixelDiffusion.load(bad)


def test_cli_sample_writes_png_with_parameters(model_file, tmp_path, capsys):
    out = tmp_path / "g.png"
    args = ["sample", "--model", str(model_file), "--out", str(out), "--steps", "2", "--classes", "3,5",
            "--per-class", "2", "--sampler", "DPM++ 2M Karras", "--seed", "7"]
    assert main(args) == 0
    params = read_parameters(out)
    assert "Sampler: DPM++ 2M Karras" in params and "Seed: 7" in params and "Steps: 2" in params
    assert main(args) == 2  # exists: refuses without --overwrite
    assert "--overwrite" in capsys.readouterr().err
    assert main(args + ["--overwrite"]) == 0


@pytest.mark.parametrize("args,message", [
    (["sample", "--sampler", "fast"], "unknown sampler 'fast'; valid choices"),
    (["sample", "--spacing", "cosine"], "valid choices: leading, linspace"),
    (["sample", "--model", "missing.safetensors"], "model file not found"),
    (["train", "configs/digits.json", "nope=1"], "unknown config key(s) nope"),
    (["train", "missing.json"], "config file not found"),
])
def test_cli_errors_are_one_line(args, message, model_file, tmp_path, capsys):
    if args[0] == "sample" and "--model" not in args:
        args = args + ["--model", str(model_file)]
    assert main(args + (["--out", str(tmp_path / "o.png")] if args[0] == "sample" else [])) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_console_script_help():
    out = subprocess.run([sys.executable, "-m", "unfog.cli", "--help"], capture_output=True, text=True, check=True)
    for command in ("sample", "train", "samplers"):
        assert command in out.stdout
