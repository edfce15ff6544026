"""ControlNet units through A1111's API as sd-webui-controlnet takes them (``alwayson_scripts``),
sent by webuiapi's ``ControlNetUnit``: the image equals the CLI's ``--control`` for the same unit
(and ``--preprocess canny`` for a canny module), the PNG records the unit, and bad units are
422s. A ControlNet with random weights for the embedded shapes model's U-Net, in the official
layout."""

from __future__ import annotations

import base64
import io
import sys
from pathlib import Path

import numpy as np
import pytest
import requests
import webuiapi
from PIL import Image

from test_a1111_api import FAST, Running

import unfog
from unfog.checkpoint.controlnet import save_controlnet
from unfog.cli import DEFAULT_TEXT_MODEL, default_model_path, main
from unfog.server.app import ServerConfig
from unfog.server.library import Library
from unfog.training.controlnet import controlnet_from_unet

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: model_checks
from model_checks import randomize_  # noqa: E402


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cn")
    (root / "cn").mkdir()
    pipe = unfog.load(default_model_path(DEFAULT_TEXT_MODEL))
    save_controlnet(randomize_(controlnet_from_unet(pipe), seed=3), root / "cn" / "layout_test.safetensors")
    hint = Image.new("RGB", (64, 64), (0, 0, 0))
    hint.paste((255, 255, 255), (8, 20, 30, 44))
    hint.save(root / "hint.png")
    running = Running(ServerConfig(Library(default_model_path(DEFAULT_TEXT_MODEL), controlnet_dirs=[root / "cn"])))
    yield running, root, hint
    running.stop()


def test_a_unit_draws_what_the_cli_draws_and_is_recorded(setup):
    running, root, hint = setup
    api = webuiapi.WebUIApi(host="127.0.0.1", port=running.port)
    assert api.controlnet_model_list()[0].startswith("layout_test [")
    assert "canny" in api.controlnet_module_list()
    for module, extra in (("none", []), ("canny", ["--preprocess", "canny"])):
        unit = webuiapi.ControlNetUnit(image=hint, module=module, model="layout_test", weight=0.7,
                                       resize_mode="Just Resize", guidance_end=0.8, threshold_a=100, threshold_b=200)
        r = api.txt2img(prompt="a red circle", seed=8, cfg_scale=2.0, controlnet_units=[unit], **FAST)
        out = root / f"cli-{module}.png"
        assert main(["generate", "a red circle", "--seed", "8", "--steps", "2", "--sampler", "Euler a", "--cfg-scale",
                     "2", "--control", f"layout_test:{root / 'hint.png'}:0.7:0:0.8", "--controlnet-dir",
                     str(root / "cn"), "--control-resize", "just_resize", *extra, "--output", str(out)]) == 0
        assert np.array_equal(np.asarray(r.images[0].convert("RGB")), np.asarray(Image.open(out).convert("RGB")))
        text = r.images[0].info["parameters"]
        assert f"Module: {module}, Model: layout_test [" in text and "Guidance End: 0.8" in text
    # webuiapi puts the units into its mutable default alwayson_scripts={}: pass a fresh one
    plain = api.txt2img(prompt="a red circle", seed=8, cfg_scale=2.0, alwayson_scripts={}, **FAST)
    assert not np.array_equal(np.asarray(plain.images[0]), np.asarray(r.images[0]))


@pytest.mark.parametrize("unit, words", [
    ({"model": "nope", "image": "x"}, "ControlNet unit 0 image: not valid base64"),
    ({"model": "layout_test"}, "give its hint as image"),
    ({"model": "layout_test", "image": "", "input_image": ""}, "give its hint as image"),
    ({"model": "layout_test", "image": "iVBORw0KGgo=", "resize_mode": "Stretch"}, "resize_mode must be"),
    ({"model": "layout_test", "image": "iVBORw0KGgo="}, "not an image that can be read"),
    ({"model": "layout_test", "image": "PNG", "weight": "heavy"}, "could not convert"),
])
def test_bad_units_are_422s(setup, unit, words):
    running, _, _ = setup
    if unit.get("image") == "PNG":  # a real image, so that the other field is what is wrong
        buf = io.BytesIO()
        Image.new("RGB", (8, 8)).save(buf, format="PNG")
        unit = {**unit, "image": base64.b64encode(buf.getvalue()).decode()}
    r = requests.post(running.url + "/sdapi/v1/txt2img",
                      json={"prompt": "x", **FAST, "alwayson_scripts": {"ControlNet": {"args": [unit]}}})
    assert r.status_code == 422 and words in r.json()["errors"], r.text


def test_an_unknown_model_names_the_closest(setup):
    running, _, hint = setup
    api = webuiapi.WebUIApi(host="127.0.0.1", port=running.port)
    unit = webuiapi.ControlNetUnit(image=hint, model="layout_tset [12345678]")
    with pytest.raises(RuntimeError, match="closest: layout_test"):
        api.txt2img(prompt="x", controlnet_units=[unit], **FAST)
