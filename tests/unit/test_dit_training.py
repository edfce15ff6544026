"""A text-conditional DiT as the backbone of a latent text-to-image model: trained by the same
task as the U-Net (``model=DIT_TINY``), saved under ``dit.``, loaded as the same pipeline, and
refused, with one-line errors, where a feature needs a U-Net."""

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import unfog
from unfog.checkpoint.io import read_metadata
from unfog.models.backbone import build, for_latents, kind_of
from unfog.models.dit import DIT_TINY, DiT
from unfog.models.presets import SHAPES, get_preset
from unfog.training import load_config, train

VAE = ["task=autoencoder", "data=shapes", "image_size=32", "data_size=64", "batch_size=4", "precision=fp32",
       'vae_overrides={"base_channels": 32, "channel_mult": [1, 2], "num_res_blocks": 1}', "warmup_steps=1",
       "log_every=1", "lr=0.001"]
T2I = ["task=text2image", "data=shapes", "image_size=32", "data_size=64", "batch_size=4", "precision=fp32",
       "model=DIT_TINY", 'text_encoder={"width": 32, "layers": 2, "heads": 2}', "prediction=v",
       "schedule=scaled_linear", "warmup_steps=1", "log_every=1", "sample_steps=2", "sample_every=1000", "lr=0.001"]


@pytest.fixture(scope="module")
def vae_file(tmp_path_factory):
    out = tmp_path_factory.mktemp("vae")
    return train(load_config(None, VAE + ["steps=2", f"out_dir={out}"]), progress=False)


@pytest.fixture(scope="module")
def dit_model(vae_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("dit")
    return train(load_config(None, T2I + [f"vae_model={vae_file}", f"out_dir={out}", "steps=3", "save_every=3"]),
                 progress=False)


def test_the_model_file_names_its_backbone(dit_model):
    meta = read_metadata(dit_model)
    tensors = load_file(str(dit_model))
    assert "dit" in meta and "unet" not in meta
    assert meta["dit"]["input_size"] == 16 and meta["dit"]["context_dim"] == 32  # 32 px / 2; the encoder's width
    assert any(k.startswith("dit.blocks.0.cross_attn.") for k in tensors)
    assert not any(k.startswith("unet.") for k in tensors)


@torch.no_grad()
def test_it_loads_and_draws_as_the_unet_models_do(dit_model):
    pipe = unfog.load(dit_model)
    assert isinstance(pipe.unet, DiT) and pipe.default_size == 32
    images = pipe(["a red circle", ""], steps=2, cfg_scale=3, seed=1, output="tensor")
    assert images.shape == (2, 3, 32, 32) and torch.isfinite(images).all()
    again = pipe(["a red circle", ""], steps=2, cfg_scale=3, seed=1, output="tensor")
    assert torch.equal(images, again)


def test_training_moved_the_weights_and_resume_is_bit_identical(vae_file, dit_model, tmp_path):
    a = load_file(str(dit_model))
    fresh = build(for_latents(DIT_TINY, 4, 32, 16))
    gates = [k for k in a if k.endswith("adaLN_modulation.1.weight")]
    assert gates and all(a[k].abs().max() > 0 for k in gates)  # zero at the start: the gradients reached them
    assert fresh.state_dict()["blocks.0.adaLN_modulation.1.weight"].abs().max() == 0
    config = T2I + [f"vae_model={vae_file}", "save_every=2"]
    train(load_config(None, config + ["steps=2", f"out_dir={tmp_path / 'b'}"]), progress=False)
    resumed = train(load_config(None, config + ["steps=4", f"out_dir={tmp_path / 'b'}"]), resume=True, progress=False)
    straight = train(load_config(None, config + ["steps=4", f"out_dir={tmp_path / 'a'}"]), progress=False)
    x, y = load_file(str(straight)), load_file(str(resumed))
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_gradient_checkpointing_gives_the_same_gradients():
    cfg = for_latents(DIT_TINY, 4, 32, 8)
    torch.manual_seed(0)
    plain = build(cfg)
    ckpt = build(replace(cfg, gradient_checkpointing=True))
    ckpt.load_state_dict(plain.state_dict())
    for p in plain.parameters():  # move the zero-initialised layers so every gradient is non-trivial
        torch.nn.init.normal_(p, std=0.05)
    ckpt.load_state_dict(plain.state_dict())
    g = torch.Generator().manual_seed(1)
    x, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 5, 32, generator=g)
    for model in (plain, ckpt):
        model(x, torch.tensor([3.0, 700.0]), ctx).square().mean().backward()
    for (name, a), b in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_u_net_features_are_refused_on_a_dit(dit_model, tmp_path):
    pipe = unfog.load(dit_model)
    for option, message in (({"deep_cache": 2}, "DeepCache works on U-Net models"),
                            ({"token_merging": 0.5}, "Token merging works on U-Net models")):
        with pytest.raises(ValueError, match=f"{message}; this model's denoising network is a DiT"):
            pipe("a red circle", steps=1, **option)
    with pytest.raises(ValueError, match="LoRA works on U-Net models"):
        pipe.load_lora(tmp_path / "any.safetensors")
    with pytest.raises(ValueError, match="A hypernetwork works on U-Net models"):
        pipe.load_hypernetwork(tmp_path / "any.pt")
    with pytest.raises(ValueError, match=r"takes \(4, 16, 16\) latents"):
        pipe("a red circle", steps=1, width=64, height=64)


def test_config_errors(vae_file, tmp_path, dit_model):
    base = T2I + [f"vae_model={vae_file}", f"out_dir={tmp_path / 'x'}", "steps=1"]
    with pytest.raises(ValueError, match="size_conditioning works on U-Net models"):
        train(load_config(None, base + ["size_conditioning=true"]), progress=False)
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(4):
        Image.new("RGB", (32 + 8 * i, 32), (60 * i, 0, 0)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text("a red circle")
    with pytest.raises(ValueError, match="aspect buckets need a U-Net"):
        train(load_config(None, [a.replace("data=shapes", f"data={folder}") for a in base] + ["buckets=true", "bucket_step=8"]),
              progress=False)
    with pytest.raises(ValueError, match="Task 'pixel' works on U-Net models"):
        train(load_config(None, ["task=pixel", "data=digits", "model=DIT_TINY", f"out_dir={tmp_path / 'p'}",
                                 "steps=1"]), progress=False)
    unet_run = [a.replace("model=DIT_TINY", "model=TINY") for a in base]
    with pytest.raises(ValueError, match="its denoising network is a DiT, this config's a U-Net"):
        train(load_config(None, unet_run), init_from=Path(dit_model), progress=False)
    with pytest.raises(ValueError, match="unknown model preset 'dit_huge'; valid names: SD15"):
        get_preset("dit_huge")


def test_kinds():
    assert kind_of(SHAPES) == "unet" and kind_of(DIT_TINY) == "dit"
    with pytest.raises(TypeError, match="not a backbone"):
        kind_of(torch.nn.Linear(1, 1))


def test_unfog_generate_draws_a_dit_model_and_refuses_other_sizes(dit_model, tmp_path, monkeypatch, capsys):
    from unfog.cli import main
    from unfog.pipelines.images import read_parameters

    monkeypatch.chdir(tmp_path)
    assert main(["generate", "a red circle", "--model", str(dit_model), "--steps", "2", "--output", "a.png"]) == 0
    assert "Steps: 2" in read_parameters("a.png")
    capsys.readouterr()
    assert main(["generate", "a red circle", "--model", str(dit_model), "--steps", "2", "--width", "64",
                 "--output", "b.png"]) == 2
    err = capsys.readouterr().err
    assert "this model's DiT draws 32x32 only" in err and err.count("\n") == 1
