"""``pipe.load_vae`` / ``unfog.load(vae=)`` (A1111's "SD VAE") against diffusers' AutoencoderKL.

A diffusers SD 1.x-like pipeline folder is loaded; a second VAE of the same layout with other
random weights is written as a diffusers folder and as an unfog autoencoder (an official bare
single file goes through ``load_components``, whose VAE family is tested with the real layout in
tests/unit/test_checkpoint_loading.py; a tiny VAE in LDM names is refused there, as not the official shapes). With it swapped in, the pipeline's image must be diffusers' decode of the
pipeline's final latents (divided by the model's scaling factor) within 1e-4, and img2img must
encode with it (its latents equal the pipeline's own ``encode`` of diffusers' posterior mean).
Swapping back (``load_vae(None)``) gives the first image bit for bit.
"""

from __future__ import annotations

import sys
from pathlib import Path

import diffusers
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, home of model_checks
sys.path.insert(0, str(Path(__file__).resolve().parent))
from model_checks import randomize_, rel_err  # noqa: E402
from test_diffusers_folder import sd1_like_parts, tokenizer  # noqa: E402,F401  (a module fixture)

import unfog  # noqa: E402
from unfog.checkpoint.convert import convert_diffusers_vae  # noqa: E402
from unfog.checkpoint.diffusers_folder import vae_config_from_diffusers  # noqa: E402
from unfog.models.vae import AutoencoderKL  # noqa: E402
from unfog.pipelines.latent_model import save_autoencoder  # noqa: E402

RTOL = 1e-4
SIZE = 32
pytestmark = pytest.mark.usefixtures("single_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def files(tmp_path_factory, tokenizer):  # noqa: F811
    root = tmp_path_factory.mktemp("vae_swap")
    parts = sd1_like_parts(tokenizer)
    diffusers.StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None,
                                      requires_safety_checker=False).save_pretrained(root / "pipe")
    other = randomize_(diffusers.AutoencoderKL(**parts["vae"].config), seed=7).eval()
    other.register_to_config(scaling_factor=0.5)  # not the model's 0.18215: the model's must be used
    other.save_pretrained(root / "vae_folder")
    ldm = convert_diffusers_vae(other.state_dict(), vae_config_from_diffusers(dict(other.config)))
    ours = AutoencoderKL(vae_config_from_diffusers(dict(other.config)))
    ours.load_state_dict(ldm, strict=True)
    save_autoencoder(root / "autoencoder.safetensors", ours)
    return root, other


def draw(pipe, **kw):
    return pipe("a cat", steps=3, sampler="euler", width=SIZE, height=SIZE, seed=1, **kw)


@pytest.mark.parametrize("name", ["vae_folder", "autoencoder.safetensors"])
@torch.no_grad()
def test_swapped_vae_decodes_and_encodes_as_diffusers(files, name):
    root, other = files
    pipe = unfog.load(root / "pipe")
    own = draw(pipe, output="tensor")
    latents = draw(pipe, output="latent")  # the U-Net's latents do not depend on the VAE
    pipe.load_vae(root / name)
    assert pipe.vae_file == root / name and pipe.vae.config.scaling_factor == 0.18215
    swapped = draw(pipe, output="tensor")
    expected = other.decode(latents / 0.18215).sample.clamp(-1, 1)
    assert rel_err(swapped, expected) < RTOL
    assert rel_err(swapped, own) > 0.1  # another VAE really decodes

    image = torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert rel_err(pipe.encode(image), other.encode(image).latent_dist.mean * 0.18215) < RTOL

    pipe.load_vae(None)
    assert pipe.vae_file is None and torch.equal(draw(pipe, output="tensor"), own)


def test_unfog_load_takes_a_vae(files):
    root, _ = files
    pipe = unfog.load(root / "pipe", vae=root / "autoencoder.safetensors")
    assert pipe.vae_file == root / "autoencoder.safetensors"


def test_bad_vaes_are_refused_and_change_nothing(files, tmp_path):
    root, other = files
    pipe = unfog.load(root / "pipe")
    own = pipe.vae
    wide = diffusers.AutoencoderKL(**{**other.config, "latent_channels": 16})
    wide.save_pretrained(tmp_path / "wide")
    with pytest.raises(ValueError, match="16-channel latents .* 4-channel latents"):
        pipe.load_vae(tmp_path / "wide")
    with pytest.raises(FileNotFoundError, match="VAE not found"):
        pipe.load_vae(tmp_path / "missing.safetensors")
    diffusers.UNet2DConditionModel(**unfog_unet_config(root)).save_pretrained(tmp_path / "unet")
    with pytest.raises(ValueError, match="holds no VAE"):
        pipe.load_vae(tmp_path / "unet")
    assert pipe.vae is own and pipe.vae_file is None


def unfog_unet_config(root: Path) -> dict:
    import json

    return {k: v for k, v in json.loads((root / "pipe" / "unet" / "config.json").read_text()).items()
            if not k.startswith("_")}
