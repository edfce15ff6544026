"""The pixel pipeline's model file and the `unfog` command line."""

import subprocess
import sys

import pytest
import torch

from unfog.checkpoint.io import load_safetensors, save_safetensors
from unfog.cli import build_parser, default_model_path, main
from unfog.models.presets import DIGITS
from unfog.models.unet import UNet
from unfog.pipelines.images import read_parameters
from unfog.pipelines.pixel import PixelDiffusion, PixelModelInfo, recommended_settings
from dataclasses import replace


def tiny_pipe(defaults=None) -> PixelDiffusion:
    torch.manual_seed(0)
    cfg = replace(DIGITS, model_channels=32, channel_mult=(1, 2), transformer_depth=(0, 1), num_res_blocks=1,
                  num_classes=11)
    return PixelDiffusion(UNet(cfg), PixelModelInfo(8, 1, num_classes=10, class_names=tuple("0123456789")), defaults)


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("m") / "m.safetensors"
    tiny_pipe().save(path)
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


def test_model_file_recommends_its_sampling_settings(tmp_path, capsys):
    """A pixel model file's "defaults" metadata fills the settings not given, in ``generate`` and
    `unfog sample`; the options typed win."""
    own = {"sampler": "euler", "steps": 3, "cfg_scale": 1.5}
    path = tmp_path / "own.safetensors"
    tiny_pipe(own).save(path)
    assert recommended_settings(path) == own
    pipe = PixelDiffusion.load(path)
    assert torch.equal(pipe.generate([1, 2], seed=4), pipe.generate([1, 2], sampler="euler", steps=3, cfg_scale=1.5,
                                                                    seed=4))
    out = tmp_path / "g.png"
    assert main(["sample", "--model", str(path), "--out", str(out), "--classes", "3", "--per-class", "1"]) == 0
    params = read_parameters(out)
    assert "Steps: 3, Sampler: euler," in params and "CFG scale: 1.5," in params
    assert main(["sample", "--model", str(path), "--out", str(out), "--classes", "3", "--per-class", "1", "--overwrite",
                 "--steps", "2", "--sampler", "ddim", "--cfg-scale", "3"]) == 0
    params = read_parameters(out)
    assert "Steps: 2, Sampler: ddim," in params and "CFG scale: 3.0," in params


def test_model_file_without_recommended_settings(model_file, tmp_path):
    """Files written before models recommended settings: the old defaults, DPM++ 2M, 20 steps, guidance 2."""
    tensors, meta = load_safetensors(model_file)
    del meta["defaults"]
    old = tmp_path / "old.safetensors"
    save_safetensors(old, tensors, meta)
    assert recommended_settings(old) == {}
    assert PixelDiffusion.load(old).defaults == {"sampler": "dpmpp_2m", "steps": 20, "cfg_scale": 2.0}
    with pytest.raises(ValueError, match="unknown sampling default 'eta'; valid: sampler, steps, cfg_scale"):
        tiny_pipe({"eta": 1.0})


def test_builtin_digits_model_recommends_euler_a(capsys):
    """`unfog sample`'s defaults for the built-in model: Euler a, 20 steps, guidance 2 (issue 22: DPM++ 2M
    left 2.3% of the cells blank or speckled, Euler a none of 1,000; docs/benchmarks.md)."""
    assert recommended_settings(default_model_path()) == {"sampler": "euler_ancestral", "steps": 20, "cfg_scale": 2.0}
    with pytest.raises(SystemExit):
        build_parser().parse_args(["sample", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 'Euler a' for the built-in model, else the model file's or 'DPM++ 2M')" in text
    assert "(default: 20 for the built-in model, else the model file's or 20)" in text
    assert "(default: 2 for the built-in model, else the model file's or 2)" in text


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
