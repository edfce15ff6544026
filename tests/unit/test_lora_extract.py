"""``unfog lora extract`` and the kohya writer, on the embedded shapes model and a copy of it whose
weights differ from it by known exact rank-3 changes on some modules.

Oracles: the known differences themselves (rank 3 reproduces them), the Eckart-Young closed form
for lower ranks (the error of the best rank-k approximation is sqrt(sum of the dropped squared
singular values), from ``torch.linalg.svdvals`` here), and the tuned model's own outputs (the base
plus the extracted LoRA must give them). The parity of written files with diffusers' loaders is
in tests/parity/test_lora_diffusers.py.
"""

from __future__ import annotations

import hashlib
from dataclasses import replace

import pytest
import torch
from safetensors import safe_open

import unfog
from unfog.checkpoint.lora import ModuleIndex, Target, kohya_key, kohya_metadata, read_lora, save_lora
from unfog.cli import DEFAULT_TEXT_MODEL, default_model_path, main
from unfog.models.presets import SD15, SDXL_BASE
from unfog.models.unet import UNet
from unfog.nn.lora import AdapterWeights, low_rank_factors
from unfog.pipelines.latent_model import load_parts, save_text2image
from unfog.pipelines.lora import LoraStack
from unfog.pipelines.lora_extract import extract_lora, extraction_targets

R = 3  # the rank of every planted difference
CHANGED = {  # (component, module path): a Linear, a 1x1 conv... and a 3x3 conv (only with a conv rank)
    ("unet", "input_blocks.3.1.transformer_blocks.0.attn2.to_k"),
    ("unet", "middle_block.1.transformer_blocks.0.ff.net.2"),
    ("unet", "output_blocks.2.1.proj_out"),
    ("text_encoder", "encoder.layers.1.self_attn.q_proj"),
    ("text_encoder", "encoder.layers.2.mlp.fc1"),
}
CONV = ("unet", "input_blocks.1.0.in_layers.2")
BASE = default_model_path(DEFAULT_TEXT_MODEL)


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """(path of the tuned model file, {(component, path): the planted dW}); dW = 0.3 ||W|| / ||A B|| A B
    with A (out, 3), B (3, in*kh*kw) random, so dW has rank 3 exactly and a size like W's. A bias
    changes too (no LoRA holds it)."""
    unet, vae, te, tokenizer, info, _ = load_parts(BASE)
    models = {"unet": unet, "text_encoder": te}
    g = torch.Generator().manual_seed(0)
    deltas = {}
    with torch.no_grad():
        for component, path in sorted(CHANGED | {CONV}):
            w = models[component].get_submodule(path).weight
            d = (torch.randn(w.shape[0], R, generator=g) @ torch.randn(R, w[0].numel(), generator=g)).reshape(w.shape)
            d = d * (0.3 * w.norm() / d.norm())
            w += d
            deltas[(component, path)] = d
        unet.get_submodule("out.2").bias += 0.01
    path = tmp_path_factory.mktemp("models") / "tuned.safetensors"
    save_text2image(path, unet, vae, te, tokenizer, info)
    return path, deltas


@pytest.fixture(scope="module")
def pipes(tuned):
    return unfog.load(BASE), unfog.load(tuned[0])


def models(pipe):
    return {"unet": pipe.unet, "text_encoder": pipe.text_encoder}


def rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


def written_deltas(path, pipe) -> dict[tuple[str, str], torch.Tensor]:
    """The Delta W of every adapter of a written file, read back through the loader's index."""
    adapters, unmatched = ModuleIndex(models(pipe)).resolve(read_lora(path))
    assert unmatched == []
    return {(t.component, t.path): a.delta(t.module.weight.shape) for t, a in adapters.items()}


def test_rank_r_reproduces_every_difference_and_skips_the_rest(pipes, tuned, tmp_path):
    base, tuned_pipe = pipes
    result = extract_lora(models(base), models(tuned_pipe), "sd1", rank=R, conv_rank=R)
    assert {(t.component, t.path) for t in result.adapters} == CHANGED | {CONV}
    assert result.left_out == ["unet.out.2.bias"]
    assert result.unchanged == len(extraction_targets(models(base), R, R)) - len(CHANGED) - 1
    assert all(m.relative_error < 1e-4 and m.rank == R for m in result.modules)
    out = tmp_path / "rank3.safetensors"
    save_lora(out, result.adapters, "sd1", {"ss_network_dim": str(R)}, unet_config=base.unet.config)
    for key, delta in written_deltas(out, base).items():
        assert rel(delta, tuned[1][key]) < 1e-4, key
    without_conv = extract_lora(models(base), models(tuned_pipe), "sd1", rank=R)
    assert {(t.component, t.path) for t in without_conv.adapters} == CHANGED
    assert "unet.input_blocks.1.0.in_layers.2.weight" in without_conv.left_out


@pytest.mark.parametrize("k", [1, 2])
def test_lower_rank_error_is_the_eckart_young_bound(pipes, tuned, tmp_path, k):
    base, tuned_pipe = pipes
    result = extract_lora(models(base), models(tuned_pipe), "sd1", rank=k, conv_rank=k)
    out = tmp_path / f"rank{k}.safetensors"
    save_lora(out, result.adapters, "sd1", {}, unet_config=base.unet.config)
    reported = {m.key: m.relative_error for m in result.modules}
    for (component, path), delta in written_deltas(out, base).items():
        planted = tuned[1][(component, path)]
        s = torch.linalg.svdvals(planted.double().flatten(1))
        bound = float(s[k:].square().sum().sqrt() / s.square().sum().sqrt())
        assert abs(rel(delta, planted) - bound) < 1e-4 * bound, (path, rel(delta, planted), bound)
        key = kohya_key(Target(component, path, None), "sd1", base.unet.config)
        assert abs(reported[key] - bound) < 1e-4 * bound


def test_the_base_with_the_extracted_lora_gives_the_tuned_outputs(pipes, tmp_path):
    base, tuned_pipe = pipes
    result = extract_lora(models(base), models(tuned_pipe), "sd1", rank=R, conv_rank=R)
    out = tmp_path / "lora.safetensors"
    save_lora(out, result.adapters, "sd1", {}, unet_config=base.unet.config)
    g = torch.Generator().manual_seed(1)
    cfg = base.unet.config
    x, t = torch.randn(2, cfg.in_channels, 8, 8, generator=g), torch.tensor([10.0, 700.0])
    ids = torch.randint(0, base.text_encoder.config.vocab_size, (2, 77), generator=g)
    with torch.no_grad():
        context = tuned_pipe.text_encoder(ids).last_hidden_state
        expected = tuned_pipe.unet(x, t, context), context
        stack = LoraStack(models(base))
        stack.add(out)
        got_context = base.text_encoder(ids).last_hidden_state
        got = base.unet(x, t, got_context), got_context
        stack.clear()
        before = base.unet(x, t, base.text_encoder(ids).last_hidden_state)
    # the bias of out.2 is not in the LoRA: compare without it
    bias_change = (tuned_pipe.unet.get_submodule("out.2").bias - base.unet.get_submodule("out.2").bias).detach()
    assert rel(got[1], expected[1]) < 1e-4
    assert rel(got[0] + bias_change.reshape(1, -1, 1, 1), expected[0]) < 1e-4
    assert rel(before, expected[0]) > 1e-2  # the differences do change the output


def test_low_rank_factors_split_evenly_and_cap_the_rank():
    g = torch.Generator().manual_seed(2)
    delta = torch.randn(6, 4, 3, 3, generator=g)
    up, down = low_rank_factors(delta, 100)  # capped at min(6, 36) = 6: exact
    assert up.shape == (6, 6, 1, 1) and down.shape == (6, 4, 3, 3)
    torch.testing.assert_close((up.flatten(1) @ down.flatten(1)).reshape(delta.shape), delta, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(up.flatten(1).norm(dim=0), down.flatten(1).norm(dim=1), rtol=1e-5, atol=0)
    with pytest.raises(ValueError, match="positive integer"):
        low_rank_factors(delta, 0)


# ---------------------------------------------------------------- the command


@pytest.mark.slow  # four model loads and two extractions: about 10 s on 2 cores
def test_cli_extract_writes_a_kohya_file_that_lora_info_reads(tuned, tmp_path, capsys):
    out = tmp_path / "extracted.safetensors"
    assert main(["lora", "extract", str(BASE), str(tuned[0]), "--rank", str(R), "--conv-rank", "2",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert out.is_file() and f"{len(CHANGED) + 1} modules extracted" in printed
    assert "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k  rank 3" in printed
    assert "lora_unet_down_blocks_0_resnets_0_conv1  rank 2" in printed
    with safe_open(str(out), framework="pt") as f:
        meta = f.metadata()
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_network_dim"] == str(R)
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert main(["lora", "info", str(out)]) == 0
    info = capsys.readouterr().out
    assert "ranks: 2, 3" in info and f"dim: {R}" in info
    assert main(["lora", "extract", str(BASE), str(tuned[0]), "--rank", "1", "--no-text-encoder",
                 "--out", str(out), "--overwrite"]) == 0
    assert {a.rank for a in read_lora(out).adapters.values()} == {1}
    assert not any(k.startswith("lora_te") for k in read_lora(out).adapters)


def test_cli_refuses_bad_inputs_in_one_line(tuned, tmp_path, capsys):
    unet, vae, te, tokenizer, info, _ = load_parts(BASE)
    other = tmp_path / "other.safetensors"
    save_text2image(other, UNet(replace(unet.config, model_channels=32)), vae, te, tokenizer, info)
    out = tmp_path / "x.safetensors"
    assert main(["lora", "extract", str(BASE), str(other), "--rank", "2", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(BASE) in err and str(other) in err
    assert "different architectures" in err and "unet.model_channels: 64 -> 32" in err and not out.exists()

    out.write_bytes(b"keep me")
    assert main(["lora", "extract", str(BASE), str(tuned[0]), "--rank", "2", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(out) in err and "--overwrite" in err
    assert out.read_bytes() == b"keep me"

    for args, problem in ((["--out", str(tmp_path / "x.pt")], "is .safetensors"),
                          (["--out", str(tmp_path / "y.safetensors"), "--device", "gpu"], "unknown device 'gpu'")):
        assert main(["lora", "extract", str(BASE), str(tuned[0]), "--rank", "2", *args]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and problem in err

    for option in ("--rank", "--conv-rank"):
        args = ["lora", "extract", str(BASE), str(tuned[0]), "--rank", "2", option, "0", "--out", str(out)]
        with pytest.raises(SystemExit) as exit_info:
            main(args)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f"{option} must be >= 1, got 0" in err


# ---------------------------------------------------------------- the writer


def test_kohya_keys_follow_the_trainers_naming():
    sd1 = SD15
    attn = "input_blocks.1.1.transformer_blocks.0.attn1.to_q"
    assert kohya_key(Target("unet", attn, None), "sd1", sd1) == \
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    assert kohya_key(Target("unet", "output_blocks.2.1.conv", None), "sd2", sd1) == \
        "lora_unet_up_blocks_0_upsamplers_0_conv"
    assert kohya_key(Target("unet", "input_blocks.4.1.proj_in", None), "sdxl") == "lora_unet_input_blocks_4_1_proj_in"
    q = "encoder.layers.11.self_attn.q_proj"
    assert kohya_key(Target("text_encoder", q, None), "sd1") == "lora_te_text_model_encoder_layers_11_self_attn_q_proj"
    assert kohya_key(Target("text_encoder", q, None), "sdxl").startswith("lora_te1_text_model_encoder_layers_11")
    assert kohya_key(Target("text_encoder_2", q, None), "sdxl_refiner").startswith("lora_te2_text_model_encoder")
    with pytest.raises(ValueError, match="needs the U-Net's config"):
        kohya_key(Target("unet", attn, None), "sd1")
    with pytest.raises(ValueError, match="valid: sd1, sd2, sdxl, sdxl_refiner"):
        kohya_key(Target("unet", attn, None), "sd15")
    with pytest.raises(ValueError, match="sd1 model has no text_encoder_2"):
        kohya_key(Target("text_encoder_2", q, None), "sd1")
    assert SDXL_BASE.context_dim == 2048  # the SDXL naming needs no config


def test_save_lora_writes_loha_and_lokr_names_plain_metadata_and_refuses_to_overwrite(tmp_path):
    te = torch.nn.Module()
    te.q = torch.nn.Linear(8, 6)
    te.fc = torch.nn.Linear(4, 6)
    g = torch.Generator().manual_seed(3)
    loha = AdapterWeights("loha", {k: torch.randn(s, generator=g) for k, s in
                                   (("hada_w1_a", (6, 2)), ("hada_w1_b", (2, 8)), ("hada_w2_a", (6, 2)),
                                    ("hada_w2_b", (2, 8)))}, alpha=1.0)
    lokr = AdapterWeights("lokr", {"lokr_w1": torch.randn(2, 2, generator=g),
                                   "lokr_w2": torch.randn(3, 2, generator=g)})
    adapters = {Target("text_encoder", "encoder.layers.0.self_attn.q_proj", te.q): loha,
                Target("text_encoder", "encoder.layers.0.mlp.fc1", te.fc): lokr}
    meta = kohya_metadata("sd1", rank=2, alpha=1, output_name="x", started_at=1.7e9, extra={"ss_seed": "4"})
    path = tmp_path / "lyco.safetensors"
    written = save_lora(path, adapters, "sd1", meta)
    with safe_open(str(path), framework="pt") as f:
        keys, raw = set(f.keys()), f.metadata()
    prefix = "lora_te_text_model_encoder_layers_0_"
    assert f"{prefix}self_attn_q_proj.hada_w1_a" in keys and f"{prefix}mlp_fc1.lokr_w2" in keys
    assert f"{prefix}mlp_fc1.alpha" in keys
    assert raw == written and raw["ss_seed"] == "4" and raw["ss_network_alpha"] == "1.0"
    assert raw["modelspec.date"] == "2023-11-14T22:13:20+00:00"
    data = path.read_bytes()
    header = int.from_bytes(data[:8], "little")
    assert raw["sshs_model_hash"] == hashlib.sha256(data[8 + header:]).hexdigest()
    back = read_lora(path).adapters
    for target, adapter in adapters.items():
        got = back[kohya_key(target, "sd1")]
        torch.testing.assert_close(got.delta(target.module.weight.shape), adapter.delta(target.module.weight.shape))

    with pytest.raises(FileExistsError, match=str(path)):
        save_lora(path, adapters, "sd1", meta)
    with pytest.raises(ValueError, match="must be strings.*ss_network_dim"):
        save_lora(path, adapters, "sd1", {**meta, "ss_network_dim": 2}, overwrite=True)
    assert path.read_bytes() == data  # the failed calls left the file as it was
    save_lora(path, adapters, "sd1", {}, overwrite=True)
    with safe_open(str(path), framework="pt") as f:
        assert set(f.metadata()) == {"sshs_model_hash", "sshs_legacy_hash"}
