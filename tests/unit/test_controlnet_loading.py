"""ControlNet files: every layout ``load_controlnet`` reads gives back the tensors written, and every
bad input is one clear error. (Numerical parity with diffusers: tests/parity/test_controlnet_diffusers.py.)

Single files are recognised by their family's shapes, so they are full-size SD 1.5 ControlNets
(random, stored in float16 to halve the writing); diffusers folders carry their config, so they
are narrow."""

from __future__ import annotations

import json
import math
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: model_checks
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "parity"))  # tests/parity: oracles
from model_checks import randomize_  # noqa: E402
from oracles import diffusers_unet_kwargs  # noqa: E402

from unfog import load_controlnet  # noqa: E402
from unfog.checkpoint.controlnet import check_controlnet_family, save_controlnet  # noqa: E402
from unfog.models.controlnet import ControlNet, ControlNetConfig  # noqa: E402
from unfog.models.presets import SD2, SD15, SD15_INPAINT, SDXL_BASE, TINY  # noqa: E402
from unfog.models.unet import UNet  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")  # tests/conftest.py


def _random(model: torch.nn.Module, seed: int, dtype=torch.float16, only=None) -> dict[str, torch.Tensor]:
    """``model`` (on the meta device) given storage and noise; ``only``: the names worth filling."""
    model.to_empty(device="cpu")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if only is not None and name not in only:
                continue
            p.normal_(0.0, 1.0 / math.sqrt(p[0].numel()) if p.ndim > 1 else 0.1, generator=g)
    return {k: v.to(dtype) for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def sd15() -> dict[str, torch.Tensor]:
    """A random SD 1.5 ControlNet's state dict (official names, no prefix), float16."""
    with torch.device("meta"):
        model = ControlNet(ControlNetConfig(SD15))
    return _random(model, seed=0)


def _same(loaded: torch.nn.Module, expected: dict[str, torch.Tensor], dtype=torch.float32, atol=0.0) -> None:
    got = loaded.state_dict()
    assert got.keys() == expected.keys()
    for k, v in expected.items():
        assert got[k].dtype == dtype
        torch.testing.assert_close(got[k], v.to(dtype), rtol=0, atol=atol, msg=k)


@pytest.mark.parametrize("prefix", ["control_model.", ""], ids=["prefix", "no-prefix"])
def test_official_file_fp16_loads_exactly(sd15, tmp_path, prefix):
    path = tmp_path / "control.safetensors"
    save_file({prefix + k: v for k, v in sd15.items()}, path)
    _same(load_controlnet(path), sd15)  # fp16 file -> float32 module, values exact
    _same(load_controlnet(path, dtype=torch.float16), sd15, torch.float16)


def test_v10_full_file_takes_the_control_model_only(sd15, tmp_path):
    """lllyasviel's v1.0 .pth files hold the whole SD model beside control_model.*; only the
    ControlNet is read. A tensor of neither is refused by name."""
    path = tmp_path / "control_sd15_full.safetensors"
    extra = {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(320, 4, 3, 3),
             "first_stage_model.encoder.conv_in.weight": torch.zeros(128, 3, 3, 3), "betas": torch.zeros(1000)}
    save_file({**{"control_model." + k: v for k, v in sd15.items()}, **extra}, path)
    _same(load_controlnet(path), sd15)
    save_file({**{"control_model." + k: v for k, v in sd15.items()}, "lora_unet_x.alpha": torch.zeros(())}, path)
    with pytest.raises(ValueError, match=r"1 tensors are neither under 'control_model.' nor part of an SD model: "
                                         r"lora_unet_x.alpha"):
        load_controlnet(path)


def test_difference_file_needs_and_adds_the_base_unet(sd15, tmp_path):
    with torch.device("meta"):
        base = UNet(SD15)
    base_sd = _random(base, seed=1, dtype=torch.float32, only=sd15)  # the decoder is never read
    shared = [k for k in sd15 if k in base_sd]
    assert len(shared) > 200 and "input_hint_block.0.weight" not in shared
    diff = {k: (v.float() - base_sd[k] if k in base_sd else v.float()) for k, v in sd15.items()}
    path = tmp_path / "diff_control_sd15.safetensors"
    save_file({**{"control_model." + k: v for k, v in diff.items()}, "difference": torch.tensor([])}, path)
    _same(load_controlnet(path, base=base), sd15, atol=1e-6)

    with pytest.raises(ValueError, match=r"is a 'difference' ControlNet .* pass base= the U-Net to add it to"):
        load_controlnet(path)
    with torch.device("meta"):
        sdxl = UNet(SDXL_BASE)
    with pytest.raises(ValueError, match=r"'difference' ControlNet for SD15, but base= is SDXL_BASE"):
        load_controlnet(path, base=sdxl)
    plain = tmp_path / "plain.safetensors"
    save_file(sd15, plain)
    with pytest.raises(ValueError, match=r"is a complete ControlNet, not a 'difference' one: leave base= out"):
        load_controlnet(plain, base=base)


NARROW = replace(TINY, channel_mult=(1, 2, 2), transformer_depth=(1, 1, 0))


def _diffusers_folder(folder: Path, variant: str | None = None) -> dict[str, torch.Tensor]:
    import diffusers

    twin = randomize_(diffusers.ControlNetModel(**diffusers_unet_kwargs(NARROW)), seed=2)
    twin.save_pretrained(folder, variant=variant)
    return twin.state_dict()


def test_diffusers_folder_fp16_variant_and_a_lone_weights_file(tmp_path):
    _diffusers_folder(tmp_path / "cn", variant="fp16")
    assert (tmp_path / "cn/diffusion_pytorch_model.fp16.safetensors").is_file()
    loaded = load_controlnet(tmp_path / "cn")
    assert loaded.config == NARROW and len(loaded.zero_convs) == 6
    # The weights file itself, next to its config.json, reads the same.
    again = load_controlnet(tmp_path / "cn/diffusion_pytorch_model.fp16.safetensors")
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), again.state_dict().values()))
    (tmp_path / "lone").mkdir()
    (tmp_path / "cn/diffusion_pytorch_model.fp16.safetensors").rename(tmp_path / "lone/canny.safetensors")
    with pytest.raises(ValueError, match=r"canny.safetensors holds a ControlNet in diffusers naming without its "
                                         r"config.json"):
        load_controlnet(tmp_path / "lone/canny.safetensors")


def test_diffusers_folder_settings_unfog_lacks_are_refused(tmp_path):
    _diffusers_folder(tmp_path / "cn")
    config = json.loads((tmp_path / "cn/config.json").read_text())
    (tmp_path / "cn/config.json").write_text(json.dumps({**config, "controlnet_conditioning_channel_order": "bgr"}))
    with pytest.raises(ValueError, match=r"controlnet_conditioning_channel_order='bgr' is not supported"):
        load_controlnet(tmp_path / "cn")
    (tmp_path / "cn/config.json").write_text(json.dumps({**config, "_class_name": "ControlNetXSAdapter"}))
    with pytest.raises(ValueError, match=r"_class_name='ControlNetXSAdapter'; unfog reads ControlNetModel folders"):
        load_controlnet(tmp_path / "cn")


def test_global_pooling_from_the_file_name_the_diffusers_config_or_the_caller(sd15, tmp_path):
    """As sd-webui-controlnet decides for official SD 1.x files (their yaml is not read): "shuffle"
    in the name; a diffusers folder says it in its config; unfog's own files in their metadata."""
    shuffle, canny = tmp_path / "control_v11e_sd15_shuffle.safetensors", tmp_path / "control_v11p_sd15_canny.safetensors"
    save_file(sd15, shuffle)
    canny.symlink_to(shuffle)
    assert load_controlnet(shuffle).control_config.global_pool
    assert not load_controlnet(canny).control_config.global_pool
    assert not load_controlnet(shuffle, global_pool=False).control_config.global_pool
    assert load_controlnet(canny, global_pool=True).control_config.global_pool
    _diffusers_folder(tmp_path / "shuffle_cn")  # a diffusers folder: its config decides, not its name
    assert not load_controlnet(tmp_path / "shuffle_cn").control_config.global_pool
    config = json.loads((tmp_path / "shuffle_cn/config.json").read_text())
    (tmp_path / "shuffle_cn/config.json").write_text(json.dumps({**config, "global_pool_conditions": True}))
    pooled = load_controlnet(tmp_path / "shuffle_cn")
    assert pooled.control_config.global_pool
    save_controlnet(pooled, tmp_path / "mine.safetensors")  # unfog's file records it
    assert load_controlnet(tmp_path / "mine.safetensors").control_config.global_pool
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(2, 4, 4, 4, generator=g), torch.randn(2, 3, NARROW.context_dim, generator=g)
    with torch.no_grad():
        out = pooled(x, torch.tensor([10.0, 600.0]), ctx, torch.rand(2, 3, 32, 32, generator=g))
    assert all(r.shape[2:] == (1, 1) for r in out)


def test_not_a_controlnet_truncated_and_wrong_shapes(sd15, tmp_path):
    unet = tmp_path / "unet.safetensors"
    save_file({k: v.contiguous() for k, v in randomize_(UNet(TINY)).state_dict().items()}, unet)
    with pytest.raises(ValueError, match=r"unet.safetensors is not a ControlNet: it has no input_hint_block.0.weight"):
        load_controlnet(unet)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(unet.read_bytes()[:5])
    with pytest.raises(ValueError, match=r"cut.safetensors is not a safetensors file"):
        load_controlnet(cut)
    wrong = tmp_path / "wrong.safetensors"
    save_file({**sd15, "zero_convs.3.0.weight": torch.zeros(320, 320, 3, 3, dtype=torch.float16)}, wrong)
    with pytest.raises(ValueError, match=r"wrong.safetensors: the ControlNet weights \(SD15\) do not fit the model: "
                                         r"1 with the wrong shape: zero_convs.3.0.weight"):
        load_controlnet(wrong)


def test_another_family_is_refused_naming_both():
    with torch.device("meta"):
        sd15, sd2, sdxl = (ControlNet(ControlNetConfig(c)) for c in (SD15, SD2, SDXL_BASE))
        unets = {name: UNet(c) for name, c in (("SD15", SD15), ("SD15_INPAINT", SD15_INPAINT), ("SDXL", SDXL_BASE))}
    check_controlnet_family(sd15, unets["SD15"])
    check_controlnet_family(sd15, unets["SD15_INPAINT"])  # inpainting U-Nets take their family's ControlNets
    check_controlnet_family(sdxl, unets["SDXL"])
    with pytest.raises(ValueError, match=r"this ControlNet is for SD15 but the model is SDXL_BASE"):
        check_controlnet_family(sd15, unets["SDXL"])
    with pytest.raises(ValueError, match=r"this ControlNet is for SD2 but the model is SD15_INPAINT"):
        check_controlnet_family(sd2, unets["SD15_INPAINT"])


def test_hint_of_the_wrong_size_is_refused():
    model = ControlNet(ControlNetConfig(TINY)).eval()
    with pytest.raises(ValueError, match=r"hint must be \(B, 3, 8H, 8W\) = \(1, 3, 64, 64\) for latents of shape "
                                         r"\(1, 4, 8, 8\), got \(1, 3, 32, 32\)"):
        model(torch.randn(1, 4, 8, 8), 1, torch.randn(1, 2, 32), torch.rand(1, 3, 32, 32))
