"""Hypernetwork files, options and defaults, bad inputs, the U-Net hook, prompt tags and the
image command, on tiny U-Nets and the embedded shapes model (context width 128). The maths
against diffusers is in tests/parity/test_hypernetwork_diffusers.py."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import pytest
import torch

import unfog
from unfog.checkpoint.hypernetwork import (a1111_dropout_structure, read_hypernetwork, save_hypernetwork,
                                           to_a1111_dict)
from unfog.cli import DEFAULT_TEXT_MODEL, default_model_path, main
from unfog.models.presets import TINY
from unfog.models.unet import UNet
from unfog.nn.hypernetwork import Hypernetwork, HypernetworkOptions, HypernetworkTransform
from unfog.pipelines.hypernetwork import HypernetworkStack, extract_hypernet_tags, find_hypernetwork
from unfog.pipelines.lora import extract_lora_tags

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: model_checks
from model_checks import randomize_  # noqa: E402


def random_hypernetwork(widths, seed=0, **options) -> Hypernetwork:
    hn = Hypernetwork(widths, HypernetworkOptions(**options), name="hn")
    g = torch.Generator().manual_seed(seed)
    for p in hn.parameters():
        p.data = torch.randn(p.shape, generator=g) * 0.2
    return hn


def write_a1111(path: Path, raw: dict) -> Path:
    torch.save(raw, path)
    return path


def test_pt_and_safetensors_hold_the_same_hypernetwork(tmp_path):
    hn = random_hypernetwork([32, 64], activation="prelu", layer_norm=True, activate_output=True,
                             layer_structure=(1, 1.5, 1), dropout_structure=(0, 0.3, 0))
    save_hypernetwork(hn, tmp_path / "a.pt")
    save_hypernetwork(hn, tmp_path / "a.safetensors")
    for suffix in (".pt", ".safetensors"):  # a user's file is never replaced unasked
        before = (tmp_path / f"a{suffix}").read_bytes()
        with pytest.raises(FileExistsError, match=f"a{suffix} exists; pass overwrite=True"):
            save_hypernetwork(random_hypernetwork([32]), tmp_path / f"a{suffix}")
        assert (tmp_path / f"a{suffix}").read_bytes() == before
        save_hypernetwork(hn, tmp_path / f"a{suffix}", overwrite=True)
    theirs = torch.load(tmp_path / "a.pt", weights_only=True)  # what A1111's torch.load sees
    assert sorted(k for k in theirs if isinstance(k, int)) == [32, 64]
    assert set(theirs[32][0]) == {f"linear.{i}.{p}" for i, p in [(0, "weight"), (0, "bias"), (1, "weight"),
                                                                   (2, "weight"), (2, "bias"), (4, "weight"),
                                                                   (4, "bias"), (5, "weight"), (6, "weight"),
                                                                   (6, "bias")]}
    assert theirs["activation_func"] == "prelu" and theirs["dropout_structure"] == [0, 0.3, 0]
    x = torch.randn(2, 3, 64)
    for path in (tmp_path / "a.pt", tmp_path / "a.safetensors"):
        back = read_hypernetwork(path)
        assert back.options == hn.options and back.name == "hn"
        for a, b in zip(back.transform(x, x), hn.transform(x, x)):
            assert torch.equal(a, b)


def test_a1111_load_defaults_for_missing_keys(tmp_path):
    """A1111's Hypernetwork.load: activate_output True, no activation, [1, 2, 1], dropout derived."""
    hn = random_hypernetwork([16], activation="relu", activate_output=True)
    raw = {16: to_a1111_dict(hn)[16], "activation_func": "relu"}
    back = read_hypernetwork(write_a1111(tmp_path / "old.pt", raw))
    assert back.options == HypernetworkOptions(activation="relu", activate_output=True)
    assert back.name == "old" and back.step == 0
    plain = read_hypernetwork(write_a1111(tmp_path / "bare.pt", {16: to_a1111_dict(Hypernetwork([16],
                                                                                   HypernetworkOptions()))[16]}))
    assert plain.options.activation == "linear" and plain.options.layer_structure == (1, 2, 1)


@pytest.mark.parametrize("ls, use, last, want", [
    ([1, 2, 1], False, False, [0, 0, 0]),
    ([1, 2, 1], True, False, [0, 0, 0]),
    ([1, 2, 1], True, True, [0, 0.3, 0]),
    ([1, 2, 2, 1], True, False, [0, 0.3, 0, 0]),
    ([1, 2, 2, 1], True, True, [0, 0.3, 0.3, 0]),
])
def test_dropout_structure_of_old_files(ls, use, last, want):
    """A1111's own comment: [1, 2, 2, 1] -> [0, 0.3, 0, 0], with last_layer_dropout [0, 0.3, 0.3, 0]."""
    assert a1111_dropout_structure(ls, use, last) == want


def test_unknown_activation_lists_the_valid_ones(tmp_path):
    raw = to_a1111_dict(random_hypernetwork([16])) | {"activation_func": "softmax"}
    with pytest.raises(ValueError, match=r"unknown hypernetwork activation 'softmax'; valid: linear, relu, .*swish"):
        read_hypernetwork(write_a1111(tmp_path / "x.pt", raw))


@pytest.mark.parametrize("change, message", [
    ({"is_layer_norm": True}, "does not fit its options"),
    ({"layer_structure": [1, 3, 1]}, r"has shape \(32, 16\), its options .* make it \(48, 16\)"),
    ({"layer_structure": [2, 1]}, "layer_structure must start and end with 1"),
    ({"dropout_structure": [0, 1.5, 0]}, r"dropout_structure needs 3 probabilities in \[0, 1\)"),
])
def test_keys_or_options_that_do_not_fit(tmp_path, change, message):
    raw = to_a1111_dict(random_hypernetwork([16])) | change
    with pytest.raises(ValueError, match=message):
        read_hypernetwork(write_a1111(tmp_path / "x.pt", raw))


def test_not_a_hypernetwork(tmp_path):
    torch.save({"state_dict": {"w": torch.ones(2)}}, tmp_path / "model.pt")
    with pytest.raises(ValueError, match="holds no hypernetwork modules"):
        read_hypernetwork(tmp_path / "model.pt")


@pytest.fixture
def unet():
    return randomize_(UNet(TINY), seed=0).eval()  # context 32; attention widths 32 and 64


def forward(unet):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        return unet(torch.randn(1, 4, 8, 8, generator=g), 5.0, torch.randn(1, 3, 32, generator=g))


def test_hook_stays_out_of_the_state_dict_and_unloads_exactly(unet, tmp_path):
    keys, plain = list(unet.state_dict()), forward(unet)
    stack = HypernetworkStack(unet)
    save_hypernetwork(random_hypernetwork([32, 64], activation="tanh"), tmp_path / "hn.safetensors")
    applied = stack.add(tmp_path / "hn.safetensors", weight=0.8)
    assert applied.hash == hashlib.sha256((tmp_path / "hn.safetensors").read_bytes()).hexdigest()[:10]
    assert list(unet.state_dict()) == keys
    assert not torch.equal(forward(unet), plain)
    stack.clear()
    assert torch.equal(forward(unet), plain)


def test_weight_zero_is_the_plain_model(unet):
    plain = forward(unet)
    unet.set_context_transform(HypernetworkTransform([]))
    assert torch.equal(forward(unet), plain)
    hn = random_hypernetwork([32, 64], activation="relu")
    hn.multiplier = 0.0
    unet.set_context_transform(HypernetworkTransform([hn]))
    torch.testing.assert_close(forward(unet), plain, rtol=0, atol=0)


@pytest.mark.parametrize("bad", ["wrong-width", "truncated"])
def test_a_bad_file_applies_nothing(unet, tmp_path, bad):
    plain = forward(unet)
    stack = HypernetworkStack(unet)
    stack.add(_saved(random_hypernetwork([32, 64], seed=1), tmp_path / "good.pt"))
    with_good = forward(unet)
    if bad == "wrong-width":
        path, message = _saved(random_hypernetwork([320, 640, 768, 1280]), tmp_path / "sd1.pt"), \
            r"context widths 320, 640, 768, 1280 \(SD 1.x\); this model's text context is 32 wide"
    else:
        data = _saved(random_hypernetwork([32, 64], seed=2), tmp_path / "full.pt").read_bytes()
        path, message = tmp_path / "cut.pt", "truncated or corrupt"
        path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=message):
        stack.add(path)
    assert [a.name for a in stack.applied] == ["good"]
    assert torch.equal(forward(unet), with_good) and not torch.equal(with_good, plain)


def _saved(hn: Hypernetwork, path: Path) -> Path:
    save_hypernetwork(hn, path)
    return path


def test_prompt_tags_share_the_lora_parser():
    text, tags = extract_hypernet_tags("a cat <hypernet:ink:0.5>, <lora:x:1> <hypernet:plain>")
    assert text == "a cat , <lora:x:1> " and [(t.name, t.weight) for t in tags] == [("ink", 0.5), ("plain", 1.0)]
    assert extract_lora_tags("a <hypernet:ink:0.5>")[0] == "a <hypernet:ink:0.5>"
    with pytest.raises(ValueError, match=r"<hypernet:ink:1:2>: a hypernetwork tag is <hypernet:NAME>"):
        extract_hypernet_tags("<hypernet:ink:1:2>")
    with pytest.raises(ValueError, match="must be a number"):
        extract_hypernet_tags("<hypernet:ink:lots>")


def test_find_hypernetwork(tmp_path):
    (tmp_path / "sub").mkdir()
    for name in ("ink_style.pt", "sub/pastel.safetensors", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    assert find_hypernetwork("pastel", [tmp_path]) == tmp_path / "sub" / "pastel.safetensors"
    with pytest.raises(ValueError, match=r"hypernetwork 'ink-style' not found in .*; closest: ink_style"):
        find_hypernetwork("ink-style", [tmp_path])
    with pytest.raises(ValueError, match="with --hypernetwork-dir"):
        find_hypernetwork("x", [])


def test_generate_with_a_hypernet_tag_records_and_checks_its_hash(tmp_path, capsys):
    """The embedded shapes model (context 128; attention 64 and 128 wide): the PNG keeps the tag in
    its prompt (as A1111 does) and records ``Hypernet hashes``; --from finds the file again and
    refuses another file under that name."""
    folder = tmp_path / "hn"
    folder.mkdir()
    pipe = unfog.load(default_model_path(DEFAULT_TEXT_MODEL))
    widths = sorted({m.to_k.in_features for m in pipe.unet.modules() if hasattr(m, "context_transform")})
    save_hypernetwork(random_hypernetwork(widths, activation="relu"), folder / "ink.pt")
    common = ["--steps", "2", "--seed", "1", "--hypernetwork-dir", str(folder)]
    assert main(["generate", "a red circle", *common[:4], "--output", str(tmp_path / "plain.png")]) == 0
    assert main(["generate", "a red circle <hypernet:ink:0.7>", *common, "--output", str(tmp_path / "a.png")]) == 0
    capsys.readouterr()
    assert main(["info", str(tmp_path / "a.png")]) == 0
    info = capsys.readouterr().out
    assert info.startswith("a red circle <hypernet:ink:0.7>")
    assert f'Hypernet hashes: "ink:{hashlib.sha256((folder / "ink.pt").read_bytes()).hexdigest()[:10]}"' in info
    assert (tmp_path / "a.png").read_bytes() != (tmp_path / "plain.png").read_bytes()
    assert main(["generate", "--from", str(tmp_path / "a.png"), "--hypernetwork-dir", str(folder), "--output",
                 str(tmp_path / "b.png")]) == 0
    save_hypernetwork(random_hypernetwork(widths, seed=9), folder / "ink.pt", overwrite=True)
    assert main(["generate", "--from", str(tmp_path / "a.png"), "--hypernetwork-dir", str(folder), "--output",
                 str(tmp_path / "c.png")]) == 2
    assert "the image was made with hypernetwork ink [" in capsys.readouterr().err


def test_runs_in_float32_under_a_bfloat16_unet(unet):
    """As A1111 (``cond_cast_float``): the modules stay float32, the context is cast in and out."""
    hn = random_hypernetwork([32, 64], activation="gelu", layer_norm=True)
    unet.set_context_transform(HypernetworkTransform([hn]))
    want = forward(unet)
    got = forward(unet.to(torch.bfloat16))
    assert got.dtype == torch.float32 and hn.pairs["32"][0].linear[0].weight.dtype == torch.float32
    assert (got - want).abs().max() / want.abs().max() < 0.05
