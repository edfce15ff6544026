"""``controls=`` of the Stable Diffusion pipeline on tiny random models: the options' checks, the
hint's three resize geometries, the steps a unit acts on for every sampler, inpainting (both
U-Nets), weight 0. Exact values against diffusers are in tests/parity/test_controlnet_pipeline_diffusers.py."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from PIL import Image

from unfog.diffusion.registry import valid_names
from unfog.models.controlnet import ControlNet, ControlNetConfig
from unfog.pipelines.controlnet import Control, active_steps, prepare_hint, residual_scales

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: model_checks
sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/unit: test_sd_pipeline's tiny pipeline
from model_checks import randomize_  # noqa: E402
from test_sd_pipeline import UNET, make_pipe, pipe, tokenizer  # noqa: E402, F401  (fixtures)

SIZE = 16  # pixels; TINY_VAE halves it: 8 x 8 latents, so the hint is 8 x 8 x 8 = 64 pixels a side
HINT = 64
pytestmark = pytest.mark.usefixtures("single_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def controlnet() -> ControlNet:
    return randomize_(ControlNet(ControlNetConfig(UNET)), seed=4).eval()


def hint(seed: int = 5, size: int = HINT) -> torch.Tensor:
    return torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(seed))


class CallLog:
    """Records the input of every ControlNet call (a forward hook: test instrumentation only)."""

    def __init__(self, module: torch.nn.Module):
        self.calls: list[tuple[int, int, float]] = []  # (batch, channels, timestep)
        self.handle = module.register_forward_hook(self._hook)

    def _hook(self, module, args, output):
        x, t = args[0], args[1]
        self.calls.append((x.shape[0], x.shape[1], float(t.reshape(-1)[0])))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


# --- the options ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, message", [
    (dict(start=0.6, end=0.4), "0 <= start <= end <= 1"),
    (dict(start=-0.1), "0 <= start <= end <= 1"),
    (dict(end=1.5), "0 <= start <= end <= 1"),
    (dict(weight=-0.5), "weight must be a finite number >= 0"),
    (dict(weight=float("nan")), "weight must be a finite number >= 0"),
    (dict(resize_mode="stretch"), "just_resize, crop_and_resize, resize_and_fill"),
    (dict(control_mode="guess"), "balanced, prompt, controlnet"),
])
def test_bad_options_are_one_line_errors(controlnet, kwargs, message):
    with pytest.raises(ValueError, match=message) as err:
        Control(controlnet, hint(), **kwargs)
    assert "\n" not in str(err.value)


def test_a_controlnet_of_another_family_is_refused(pipe):
    other = ControlNet(ControlNetConfig(replace(UNET, model_channels=64)))
    with pytest.raises(ValueError, match="this ControlNet is for .* but the model is"):
        pipe("a cat", steps=2, width=SIZE, height=SIZE, output="latent", controls=[Control(other, hint())])


def test_active_steps_are_whole_steps_inside_the_window():
    assert active_steps(0.0, 1.0, 4) == [True] * 4
    assert active_steps(0.25, 0.75, 4) == [False, True, True, False]
    assert active_steps(0.2, 0.7, 6) == [False, False, True, True, False, False]
    assert active_steps(0.5, 0.5, 4) == [False] * 4


def test_soft_scales_are_sd_webui_controlnets():
    soft = residual_scales(2.0, "prompt", 13)
    assert soft[-1] == 2.0 and soft[0] == pytest.approx(2.0 * 0.825**12)
    assert residual_scales(2.0, "controlnet", 10) == soft[:10]  # SDXL: the first 10, as sd-webui-controlnet
    assert residual_scales(0.5, "balanced", 13) == [0.5] * 13


# --- the hint ------------------------------------------------------------------------------------


def test_hint_of_the_right_size_is_unchanged_and_nothing_is_said():
    said = []
    x = hint()
    assert torch.equal(prepare_hint(x, HINT, HINT, "crop_and_resize", said.append), x)
    assert said == []


def test_just_resize_stretches_and_says_so():
    said = []
    out = prepare_hint(Image.new("RGB", (40, 20), (255, 0, 0)), 64, 32, "just_resize", said.append)
    assert out.shape == (1, 3, 32, 64) and torch.allclose(out[0, :, 5, 5], torch.tensor([1.0, 0, 0]))
    assert said == ["the ControlNet hint is 40x20, the run needs 64x32: resized by Just Resize"]


def test_crop_and_resize_covers_and_keeps_the_centre():
    """A 40x20 image with a white centre column band, to 32x32: scaled by 32/20 to 64x32, the centre
    32 columns kept."""
    img = torch.zeros(1, 3, 20, 40)
    img[..., 10:30] = 1  # columns 10..29 white: after x1.6, columns 16..47; the crop keeps 16..47
    out = prepare_hint(img, 32, 32, "crop_and_resize")
    assert out.shape == (1, 3, 32, 32)
    assert out[..., 2:-2].min() > 0.99  # all white but the resampled edges


def test_resize_and_fill_fits_inside_and_fills_with_the_border_median():
    img = Image.new("RGB", (40, 20), (0, 0, 255))
    img.paste((0, 255, 0), (10, 5, 30, 15))  # a green centre; the border stays blue
    out = prepare_hint(img, 32, 32, "resize_and_fill")  # scaled by 32/40 to 32x16, 8 rows above and below
    assert out.shape == (1, 3, 32, 32)
    assert torch.equal(out[0, :, :8], torch.tensor([0.0, 0, 1]).reshape(3, 1, 1).expand(3, 8, 32))
    assert torch.equal(out[0, :, 24:], torch.tensor([0.0, 0, 1]).reshape(3, 1, 1).expand(3, 8, 32))
    assert torch.allclose(out[0, :, 16, 16], torch.tensor([0.0, 1, 0]), atol=1e-3)


def test_a_resized_hint_is_said_once_per_run(pipe, controlnet):
    said = []
    pipe("a cat", steps=3, width=SIZE, height=SIZE, output="latent", warn=said.append,
         controls=[Control(controlnet, hint(size=32), resize_mode="crop_and_resize")])
    assert len(said) == 1 and "resized by Crop and Resize" in said[0]


# --- the run -------------------------------------------------------------------------------------


def run(pipe, controls, **kwargs):
    args = dict(steps=6, width=SIZE, height=SIZE, cfg_scale=5.0, seed=3, output="latent")
    return pipe("a red bicycle", "blurry", controls=controls, **{**args, **kwargs})


def test_weight_zero_is_the_run_without_control(pipe, controlnet):
    assert torch.equal(run(pipe, [Control(controlnet, hint(), weight=0.0)]), run(pipe, []))
    assert not torch.equal(run(pipe, [Control(controlnet, hint())]), run(pipe, []))


@pytest.mark.parametrize("sampler", [n for n in valid_names() if " " not in n and not n.startswith("k_")])
def test_every_sampler_calls_the_controlnet_on_the_window_only(pipe, controlnet, sampler):
    """start 1/3, end 2/3 of 6 steps: the ControlNet is called from within steps 2 and 3, each call
    on the CFG batch (2 rows), and the output differs from the uncontrolled run."""
    control = Control(controlnet, hint(), start=1 / 3, end=2 / 3)
    sigmas = pipe.sigmas(6, sampler)
    t = pipe.schedule.sigma_to_t(sigmas.double()).float()
    with CallLog(controlnet) as log:
        out = run(pipe, [control], sampler=sampler)
    assert log.calls, f"{sampler}: the ControlNet was never called"
    for batch, channels, ts in log.calls:
        assert (batch, channels) == (2, 4)
        assert float(t[4]) < ts <= float(t[2]) + 1e-4, f"{sampler}: a call at t={ts} outside steps 2-3"
    assert not torch.equal(out, run(pipe, [], sampler=sampler))


def test_controlnet_mode_runs_on_the_conditional_half_only(pipe, controlnet):
    with CallLog(controlnet) as log:
        run(pipe, [Control(controlnet, hint(), control_mode="controlnet")])
    assert {b for b, _, _ in log.calls} == {1}
    with CallLog(controlnet) as log:
        run(pipe, [Control(controlnet, hint(), control_mode="controlnet")], cfg_scale=1.0)
    assert {b for b, _, _ in log.calls} == {1}  # no CFG: the one conditional row


@pytest.mark.parametrize("in_channels", [9, 4])
def test_inpainting_controlnet_sees_the_4_latent_channels(tokenizer, controlnet, in_channels):
    pipe = make_pipe(tokenizer, in_channels)
    init = torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0)) * 2 - 1
    mask = torch.zeros(1, 1, SIZE, SIZE)
    mask[..., 4:12, 2:10] = 1
    with CallLog(controlnet) as log:
        out = run(pipe, [Control(controlnet, hint())], init_image=init, mask=mask, strength=0.8)
    assert log.calls and {c for _, c, _ in log.calls} == {4}
    assert not torch.equal(out, run(pipe, [], init_image=init, mask=mask, strength=0.8))
