"""`unfog generate --control MODEL:IMAGE[:WEIGHT[:START:END]]` end to end on the tiny checkpoints of
test_cli_generate.py and a tiny ControlNet file in the official layout: the PNG's ControlNet
units in sd-webui-controlnet's text, ``--from`` with ``--hint`` re-drawing the same bytes, the
parsing of ':' in paths, and the bad inputs as one-line errors."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from safetensors.torch import save_file
import unfog.checkpoint.controlnet as controlnet_files
from unfog.models.controlnet import ControlNet, ControlNetConfig
from unfog.models.presets import TINY
from unfog.pipelines.control_units import legacy_hash, parse_control, recorded_units, spec_from_unit, unit_text

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/unit: test_cli_generate's fixtures
from test_cli_generate import (FAST, cli, models, params_of, pixels, random_png,  # noqa: E402, F401
                               tiny_families_and_one_thread, workdir)
from model_checks import randomize_  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def tiny_controlnet_family():
    """ControlNet single files are recognised by their family's shapes: let the tiny SD 1.x family be one."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(controlnet_files, "CONTROLLED", (*controlnet_files.CONTROLLED, "TINY_SD1"))
        yield


@pytest.fixture(scope="module")
def controlnet_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("controlnets")
    state = randomize_(ControlNet(ControlNetConfig(TINY)), seed=30).state_dict()
    save_file({f"control_model.{k}": v.contiguous() for k, v in state.items()}, d / "tiny-control.safetensors")
    return d


def test_control_unit_recorded_as_sd_webui_controlnet_writes_it(models, workdir, controlnet_dir, capsys):
    model = controlnet_dir / "tiny-control.safetensors"
    hint = random_png(workdir / "hint.png", seed=4)
    out = workdir / "cn.png"
    assert cli("generate", "a cat", "--model", models["sd1"], "--seed", 2, *FAST, "--control",
               f"{model}:{hint}:0.8:0:0.5", "--control-mode", "prompt", "--output", out) == 0
    unit = params_of(out)["ControlNet 0"]
    assert unit == (f"Module: none, Model: tiny-control [{legacy_hash(model)}], Weight: 0.8, Resize Mode: Just Resize, "
                    "Low Vram: False, Guidance Start: 0, Guidance End: 0.5, Pixel Perfect: False, "
                    "Control Mode: My prompt is more important")
    plain = workdir / "plain.png"
    assert cli("generate", "a cat", "--model", models["sd1"], "--seed", 2, *FAST, "--output", plain) == 0
    assert not np.array_equal(pixels(out), pixels(plain))

    # --from re-applies the unit given its hint and the models' folder: the same bytes
    again = workdir / "again.png"
    assert cli("generate", "--from", out, "--model", models["sd1"], "--hint", hint, "--controlnet-dir",
               controlnet_dir, "--output", again) == 0
    assert again.read_bytes() == out.read_bytes()
    # without --hint it says so and draws without the unit
    capsys.readouterr()
    bare = workdir / "bare.png"
    assert cli("generate", "--from", out, "--model", models["sd1"], "--output", bare) == 0
    assert "made with 1 ControlNet unit(s); give their hint images with --hint" in capsys.readouterr().err
    assert bare.read_bytes() == plain.read_bytes()


def test_a_resized_hint_is_said_once(models, workdir, controlnet_dir, capsys):
    model = controlnet_dir / "tiny-control.safetensors"
    hint = random_png(workdir / "wide.png", size=(96, 48), seed=4)
    assert cli("generate", "a cat", "--model", models["sd1"], "--seed", 2, *FAST, "--batch-size", 2,
               "--control", f"{model}:{hint}", "--control-resize", "crop_and_resize") == 0
    err = capsys.readouterr().err
    assert err.count("the ControlNet hint is 96x48, the run needs 64x64: resized by Crop and Resize") == 1


def test_preprocess_canny_equals_a_hint_made_first(models, workdir, controlnet_dir):
    """--preprocess canny runs the preprocessor on the given image and records it as the unit's
    Module; the image equals the one drawn from the hint `unfog preprocess canny` writes."""
    model = controlnet_dir / "tiny-control.safetensors"
    photo = random_png(workdir / "photo.png", seed=8)
    hint = workdir / "canny.png"
    assert cli("preprocess", "canny", photo, "-o", hint) == 0
    a, b = workdir / "pre_a.png", workdir / "pre_b.png"
    assert cli("generate", "a cat", "--model", models["sd1"], "--seed", 2, *FAST, "--control", f"{model}:{photo}",
               "--preprocess", "canny", "--output", a) == 0
    assert cli("generate", "a cat", "--model", models["sd1"], "--seed", 2, *FAST, "--control", f"{model}:{hint}",
               "--output", b) == 0
    assert params_of(a)["ControlNet 0"].startswith("Module: canny, ")
    assert np.array_equal(pixels(a), pixels(b))
    assert cli("generate", "a cat", "--model", models["sd1"], *FAST, "--control", f"{model}:{photo}",
               "--preprocess", "depth") == 2


def test_paths_with_colons(workdir):
    (workdir / "a:b").mkdir()
    model, hint = workdir / "a:b" / "cn:1.safetensors", workdir / "a:b" / "hint:2.png"
    model.write_bytes(b"")
    random_png(hint)
    assert parse_control(f"{model}:{hint}") == parse_control(f"{model}:{hint}:1:0:1")
    spec = parse_control(f"{model}:{hint}:0.5")
    assert (spec.model, spec.image, spec.weight, spec.start, spec.end) == (str(model), hint, 0.5, 0.0, 1.0)
    spec = parse_control(f"canny:{hint}:1.5:0.25:0.75")
    assert (spec.model, spec.image, spec.weight, spec.start, spec.end) == ("canny", hint, 1.5, 0.25, 0.75)


def test_recorded_units_read_back():
    text = ("Module: none, Model: control_v11p_sd15_canny [d14c016b], Weight: 1.15, Resize Mode: Resize and Fill, "
            "Low Vram: False, Guidance Start: 0.1, Guidance End: 0.9, Pixel Perfect: False, "
            "Control Mode: ControlNet is more important")
    units = recorded_units({"ControlNet 1": text, "ControlNet 0": text.replace("1.15", "1"), "Steps": "20"})
    assert [u["Weight"] for u in units] == ["1", "1.15"]
    spec = spec_from_unit(units[1], Path("h.png"), "ControlNet 1")
    assert (spec.model, spec.weight, spec.start, spec.end, spec.resize_mode, spec.control_mode) == (
        "control_v11p_sd15_canny", 1.15, 0.1, 0.9, "resize_and_fill", "controlnet")
    assert unit_text(spec, "control_v11p_sd15_canny [d14c016b]", "resize_and_fill", "controlnet") == text


def test_bad_controls_are_one_line_errors(models, workdir, controlnet_dir, capsys):
    model = controlnet_dir / "tiny-control.safetensors"
    hint = random_png(workdir / "hint.png")
    gen = ("generate", "a cat", "--model", models["sd1"], *FAST)
    cases = [
        ((*gen, "--control", f"{model}:{hint}:1:0.8:0.2"), "0 <= start <= end <= 1, got start 0.8, end 0.2"),
        ((*gen, "--control", f"{model}:{hint}:-0.5"), "ControlNet weight must be a finite number >= 0, got -0.5"),
        ((*gen, "--control", f"{model}:{workdir / 'nope.png'}"), "ControlNet hint image not found: "),
        ((*gen, "--control", f"{model}:{hint}:1:0.5"), "give WEIGHT or WEIGHT:START:END"),
        ((*gen, "--control", f"{model}"), "--control takes MODEL:IMAGE[:WEIGHT[:START:END]]"),
        ((*gen, "--control", f"canny:{hint}"), "ControlNet model not found: canny (give a file"),
        ((*gen, "--control", f"cany:{hint}", "--controlnet-dir", controlnet_dir), "ControlNet 'cany' not found in"),
        ((*gen, "--control", f"{model}:{hint}", "--control-mode", "guess"), "invalid choice: 'guess'"),
        (("generate", "a cat", "--model", models["xl"], *FAST, "--control", f"{model}:{hint}"),
         "this ControlNet is for"),
        ((*gen, "--hint", hint), "--hint needs --from IMAGE.png made with ControlNet units"),
    ]
    for args, message in cases:
        capsys.readouterr()
        assert cli(*args) == 2, args
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1 and "Traceback" not in err, (args, err)
    assert not (workdir / "outputs").exists()
