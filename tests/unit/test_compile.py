"""``pipe.compile`` / ``--compile`` (pipelines.compiled): the compiled U-Net and VAE decoder give
eager's images (inductor on the CPU, a tiny model), and where compiling is not possible "auto"
runs eagerly after one warning that says why while "strict" stops with the reason."""

from __future__ import annotations

import pytest
import torch

from unfog.models.clip_text import TINY_CLIP, CLIPTextEncoder
from unfog.models.tokenizer import CLIPTokenizer
from unfog.models.unet import UNet
from unfog.models.vae import TINY_VAE, AutoencoderKL
from unfog.pipelines import StableDiffusion, compiled

from model_checks import randomize_, rel_err
from test_sd_pipeline import UNET

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture
def pipe() -> StableDiffusion:
    unet = randomize_(UNet(UNET), seed=1)
    vae = randomize_(AutoencoderKL(TINY_VAE), seed=2)
    text = randomize_(CLIPTextEncoder(TINY_CLIP), seed=3)
    return StableDiffusion(unet, vae, CLIPTokenizer.from_bpe_file(), "sd1", text_encoder=text)


def draw(pipe):
    return pipe("a red bicycle", steps=3, width=16, height=16, seed=2, output="tensor")


@pytest.mark.slow  # inductor compiles the U-Net and the decoder: about a minute on the 2-core CPU
def test_compiled_pipeline_draws_the_eager_image(pipe):
    eager = draw(pipe)
    warnings = []
    pipe.compile("strict", warnings.append)
    assert pipe.compile_mode == "strict" and warnings == []
    out = draw(pipe)
    assert rel_err(out, eager) < 1e-4
    assert isinstance(pipe._unet_call.compiled, torch._dynamo.eval_frame.OptimizedModule)  # noqa: SLF001
    pipe.compile("off")
    assert torch.equal(draw(pipe), eager)


def test_without_a_compiler_auto_runs_eagerly_and_strict_stops(pipe, monkeypatch):
    monkeypatch.setattr(compiled.shutil, "which", lambda name: None)
    monkeypatch.delenv("CXX", raising=False)
    eager = draw(pipe)
    warnings = []
    pipe.compile("auto", warnings.append)
    assert warnings == [
        "cannot compile the U-Net (inductor needs a C++ compiler on the CPU, and none of g++, c++, clang++ is on the "
        "PATH); running it eagerly",
        "cannot compile the VAE decoder (inductor needs a C++ compiler on the CPU, and none of g++, c++, clang++ is "
        "on the PATH); running it eagerly"]
    assert torch.equal(draw(pipe), eager)
    with pytest.raises(RuntimeError, match="cannot compile the U-Net: inductor needs a C\\+\\+ compiler"):
        pipe.compile("strict")


def test_a_compilation_that_fails_falls_back_once_or_stops(pipe, monkeypatch):
    def broken(fn, **options):
        def call(*args, **kwargs):
            raise RuntimeError("backend exploded\nmore detail")
        return call

    monkeypatch.setattr(compiled.torch, "compile", broken)
    eager = draw(pipe)
    warnings = []
    pipe.compile("auto", warnings.append)
    assert torch.equal(draw(pipe), eager) and torch.equal(draw(pipe), eager)
    assert warnings == ["cannot compile the U-Net (RuntimeError: backend exploded); running it eagerly",
                        "cannot compile the VAE decoder (RuntimeError: backend exploded); running it eagerly"]
    pipe.compile("strict")
    with pytest.raises(RuntimeError, match=r"cannot compile the U-Net: RuntimeError: backend exploded"):
        draw(pipe)
    with pytest.raises(ValueError, match="unknown compile mode 'fast'; valid choices: off, auto, strict"):
        pipe.compile("fast")
