"""The page of ``unfog serve`` in a real browser: Debian's Chromium driven by Playwright, against
a server on an ephemeral port with the embedded shapes model (64 px). Every control is found by
its visible label, as a person finds it. ``make test`` installs Chromium; without it these tests
fail with a message saying so (they are not skipped).

UNFOG_SCREENSHOTS=docs/images python -m pytest tests/server/test_browser.py  saves the views that
docs/server.md shows.
"""

from __future__ import annotations

import base64
import io
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import playwright.sync_api as playwright

from test_a1111_api import Running  # noqa: E402

from unfog.cli import DEFAULT_TEXT_MODEL, default_model_path  # noqa: E402
from unfog.server.app import Limits, ServerConfig  # noqa: E402
from unfog.server.library import Library  # noqa: E402

SHOTS = os.environ.get("UNFOG_SCREENSHOTS")


def chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        if shutil.which(name):
            return shutil.which(name)
    pytest.fail("Chromium is not installed: run `make test` (it installs Debian's chromium package) or "
                "apt-get install chromium")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    import sys

    import unfog
    from unfog.checkpoint.controlnet import save_controlnet
    from unfog.training.controlnet import controlnet_from_unet

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: model_checks
    from model_checks import randomize_

    loras = tmp_path_factory.mktemp("loras")
    (loras / "pastel.safetensors").write_bytes(b"")  # listed by name; never loaded here
    controlnets = tmp_path_factory.mktemp("controlnets")
    pipe = unfog.load(default_model_path(DEFAULT_TEXT_MODEL))
    save_controlnet(randomize_(controlnet_from_unet(pipe), seed=3), controlnets / "layout_test.safetensors")
    running = Running(ServerConfig(Library(default_model_path(DEFAULT_TEXT_MODEL), lora_dirs=[loras],
                                           controlnet_dirs=[controlnets]),
                                   limits=Limits(max_size=512, max_steps=150, max_batch=8), preview_every=2))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def browser():
    with playwright.sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium(), args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture
def page(browser, server):
    context = browser.new_context(viewport={"width": 1200, "height": 900})
    page = context.new_page()
    page.goto(server.url + "/")
    page.get_by_label("Sampler", exact=True).locator("option").first.wait_for(state="attached")
    yield page
    context.close()


def fill(page, **values):
    for label, value in values.items():
        page.get_by_label(label, exact=True).fill(str(value))


def image_of(page, index: int = 0) -> Image.Image:
    src = page.get_by_role("listitem").nth(index).get_attribute("src")
    return Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))


def shot(page, name: str) -> None:
    if SHOTS:
        Path(SHOTS).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(SHOTS) / name), full_page=True)


def test_every_control_has_a_label(page):
    unnamed = page.evaluate("""() => [...document.querySelectorAll('input, select, textarea, button, canvas')]
        .filter(el => !(el.labels && el.labels.length) && !el.getAttribute('aria-label') && !el.textContent.trim())
        .map(el => el.id || el.outerHTML)""")
    assert unnamed == []


def test_generate_progress_reuse_seed_and_settings_survive_a_reload(page, server):
    fill(page, Prompt="a red circle to the left of a blue square", Width=64, Height=64, Steps=40, Seed=-1)
    page.get_by_label("CFG scale", exact=True).fill("2")
    page.get_by_label("Prompt", exact=True).press("Control+Enter")  # Ctrl+Enter generates
    page.wait_for_function("document.getElementById('progress').value > 0 && "
                           "document.getElementById('progress').value < 1", timeout=60_000)
    assert page.get_by_label("Time left").text_content().endswith("s left")
    page.get_by_role("listitem").first.wait_for(timeout=120_000)
    info = page.get_by_label("Image parameters").text_content()
    assert info.startswith("a red circle to the left of a blue square\nSteps: 40, Sampler: Euler a,")
    seed = int(info.split("Seed: ")[1].split(",")[0])
    image = image_of(page)
    assert image.size == (64, 64) and image.info["parameters"] == info
    shot(page, "server_txt2img.png")
    page.get_by_role("button", name="Reuse last seed").click()
    assert page.get_by_label("Seed", exact=True).input_value() == str(seed)
    # the same settings through the API: the same pixels
    import webuiapi

    api = webuiapi.WebUIApi(host="127.0.0.1", port=server.port)
    same = api.txt2img(prompt="a red circle to the left of a blue square", seed=seed, steps=40, width=64, height=64,
                       cfg_scale=2, sampler_name="Euler a", scheduler="Automatic")
    assert np.array_equal(np.asarray(same.images[0].convert("RGB")), np.asarray(image.convert("RGB")))
    page.get_by_role("button", name="Swap width and height").click()
    fill(page, Steps=7)
    page.reload()
    page.get_by_label("Sampler", exact=True).locator("option").first.wait_for(state="attached")
    assert page.get_by_label("Steps", exact=True).input_value() == "7"
    assert page.get_by_label("Seed", exact=True).input_value() == str(seed)


def test_lora_picker_inserts_a_tag(page):
    fill(page, Prompt="a red circle")
    page.get_by_label("LoRA", exact=True).select_option("pastel")
    page.get_by_role("button", name="Insert LoRA").click()
    assert page.get_by_label("Prompt", exact=True).input_value() == "a red circle <lora:pastel:1>"


def test_interrupt_returns_the_image_so_far(page):
    fill(page, Prompt="a green triangle", Width=64, Height=64, Steps=150, Seed=3)
    fill(page, **{"Batch size": 3})
    page.get_by_role("button", name="Generate").click()
    page.wait_for_function("document.getElementById('progress').value > 0", timeout=60_000)
    page.get_by_role("button", name="Interrupt").click()
    page.get_by_role("listitem").first.wait_for(timeout=120_000)
    assert page.get_by_role("listitem").count() == 1
    fill(page, **{"Batch size": 1})


def test_drop_a_png_on_png_info_and_send_it_to_txt2img(page, server):
    import webuiapi

    api = webuiapi.WebUIApi(host="127.0.0.1", port=server.port)
    made = api.txt2img(prompt="a yellow square above a purple circle", negative_prompt="blurry", seed=77, steps=9,
                       width=64, height=64, cfg_scale=3, sampler_name="DPM++ 2M", scheduler="Karras")
    buf = io.BytesIO()
    made.images[0].save(buf, format="PNG", pnginfo=_pnginfo(made.images[0].info["parameters"]))
    page.get_by_role("tab", name="PNG info").click()
    page.evaluate("""(b64) => {
        const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
        const data = new DataTransfer();
        data.items.add(new File([bytes], 'made.png', {type: 'image/png'}));
        document.getElementById('drop-zone').dispatchEvent(new DragEvent('drop', {dataTransfer: data, bubbles: true}));
    }""", base64.b64encode(buf.getvalue()).decode())
    page.wait_for_function("document.getElementById('pnginfo-text').textContent.includes('Seed: 77')")
    shot(page, "server_pnginfo.png")
    page.get_by_role("button", name="Send to txt2img").click()
    assert page.get_by_label("Prompt", exact=True).input_value() == "a yellow square above a purple circle"
    assert page.get_by_label("Negative prompt").input_value() == "blurry"
    assert page.get_by_label("Seed", exact=True).input_value() == "77"
    assert page.get_by_label("Steps", exact=True).input_value() == "9"
    assert page.get_by_label("Sampler", exact=True).input_value() == "DPM++ 2M"
    assert page.get_by_label("Schedule type").input_value() == "Karras"


def _pnginfo(text: str):
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", text)
    return info


def test_paint_a_mask_and_inpaint(page, tmp_path):
    init = Image.new("RGB", (64, 64), (250, 250, 248))
    init.paste((40, 75, 225), (36, 36, 60, 60))
    init.save(tmp_path / "init.png")
    page.get_by_role("tab", name="img2img").click()
    page.get_by_label("Init image", exact=True).set_input_files(str(tmp_path / "init.png"))
    page.wait_for_function("document.getElementById('init-canvas').width === 64")
    fill(page, Prompt="a red circle", Steps=10, Seed=4, **{"Denoising strength": 1, "Mask blur": 0})
    page.get_by_label("Masked content").select_option("original")
    page.get_by_label("Inpaint area").select_option("Whole picture")
    canvas = page.get_by_label("Mask canvas: paint the area to repaint").bounding_box()
    page.get_by_label("Brush size").fill("40")
    page.mouse.move(canvas["x"] + canvas["width"] * 0.25, canvas["y"] + canvas["height"] * 0.25)
    page.mouse.down()
    page.mouse.move(canvas["x"] + canvas["width"] * 0.35, canvas["y"] + canvas["height"] * 0.3, steps=5)
    page.mouse.up()
    assert page.evaluate("maskPainted"), "the brush painted nothing"
    page.get_by_role("button", name="Generate").click()
    page.wait_for_function("document.querySelector('#gallery img') || document.getElementById('error').textContent",
                           timeout=120_000)
    assert page.get_by_role("alert").text_content() == ""
    shot(page, "server_inpaint.png")
    out = np.asarray(image_of(page).convert("RGB"))
    assert "Denoising strength: 1" in page.get_by_label("Image parameters").text_content()
    far = np.zeros((64, 64), bool)
    far[34:, :] = True  # the strokes stay in the top half: the bottom is the init image, exactly
    assert np.array_equal(out[far], np.asarray(init)[far])
    assert not np.array_equal(out[:20, :30], np.asarray(init)[:20, :30])  # the painted area was redrawn
    page.get_by_role("button", name="Send to inpaint").click()
    page.wait_for_function("document.getElementById('init-canvas').width === 64")
    assert page.get_by_role("tab", name="img2img").get_attribute("aria-selected") == "true"


def test_a_controlnet_unit_from_the_form(page, server, tmp_path):
    hint = Image.new("RGB", (64, 64), (0, 0, 0))
    hint.paste((255, 255, 255), (8, 20, 30, 44))
    hint.save(tmp_path / "hint.png")
    fill(page, Prompt="a red circle", Width=64, Height=64, Steps=4, Seed=8)
    page.get_by_label("CFG scale", exact=True).fill("2")
    page.get_by_label("ControlNet", exact=True).check()
    assert page.get_by_label("ControlNet model").input_value().startswith("layout_test [")
    page.get_by_label("Preprocessor").select_option("none")
    fill(page, **{"Control weight": 0.7, "Ending control step": 0.8})
    page.get_by_label("Control image").set_input_files(str(tmp_path / "hint.png"))
    page.wait_for_function("controlData !== null")
    page.get_by_role("button", name="Generate").click()
    page.wait_for_function("document.querySelector('#gallery img') || document.getElementById('error').textContent",
                           timeout=120_000)
    assert page.get_by_role("alert").text_content() == ""
    info = page.get_by_label("Image parameters").text_content()
    assert "Module: none, Model: layout_test [" in info and "Weight: 0.7" in info and "Guidance End: 0.8" in info
    import webuiapi

    api = webuiapi.WebUIApi(host="127.0.0.1", port=server.port)
    unit = webuiapi.ControlNetUnit(image=hint, module="none", model="layout_test", weight=0.7, guidance_end=0.8,
                                   resize_mode="Crop and Resize")
    same = api.txt2img(prompt="a red circle", seed=8, steps=4, width=64, height=64, cfg_scale=2,
                       sampler_name="Euler a", scheduler="Automatic", controlnet_units=[unit])
    assert np.array_equal(np.asarray(same.images[0].convert("RGB")), np.asarray(image_of(page).convert("RGB")))
    page.get_by_label("ControlNet", exact=True).uncheck()
