"""LoRA files on a pipeline (``pipe.load_lora``, ``LoraStack``), prompt tags, LoRA folders and
``unfog lora info``, on the embedded shapes model with LoRA files written here.

The oracle for merged weights is the closed form W0 + sum_i m_i (alpha_i / r_i) up_i @ down_i,
computed in the test from the file's tensors; the parity against diffusers' loaders is in
tests/parity/test_lora_diffusers.py.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

import unfog
from unfog.cli import DEFAULT_TEXT_MODEL, default_model_path, main
from unfog.pipelines.lora import LoraStack, describe_lora, extract_lora_tags, find_lora, short_hash

RANK = 2


@pytest.fixture(scope="module")
def pipe():
    return unfog.load(default_model_path(DEFAULT_TEXT_MODEL))


def targets(pipe, suffixes=("attn2.to_k", "attn2.to_v", "proj_in")) -> dict[str, torch.nn.Module]:
    """kohya keys (LDM names) of some U-Net modules and two text-encoder projections -> module."""
    out = {"lora_unet_" + n.replace(".", "_"): m for n, m in pipe.unet.named_modules() if n.endswith(suffixes)}
    for n, m in pipe.text_encoder.named_modules():
        if n.endswith(("self_attn.q_proj", "mlp.fc2")):
            out["lora_te_text_model_" + n.replace(".", "_")] = m
    return out


def write_lora(path, modules: dict[str, torch.nn.Module], seed: int, alpha: float | None = 1.0, rank: int = RANK):
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for key, module in modules.items():
        w = module.weight
        tail = tuple(w.shape[2:])
        tensors[f"{key}.lora_down.weight"] = torch.randn(rank, w.shape[1], *tail, generator=g)
        tensors[f"{key}.lora_up.weight"] = torch.randn(w.shape[0], rank, *((1, 1) if tail else ()), generator=g)
        if alpha is not None:
            tensors[f"{key}.alpha"] = torch.tensor(alpha)
    save_file(tensors, str(path))
    return tensors


def closed_form(tensors: dict, key: str, shape, alpha: float, rank: int) -> torch.Tensor:
    down, up = tensors[f"{key}.lora_down.weight"], tensors[f"{key}.lora_up.weight"]
    return (alpha / rank) * (up.flatten(1) @ down.flatten(1)).reshape(shape)


def snapshot(pipe) -> dict[str, torch.Tensor]:
    return {f"{name}.{k}": v.clone() for name in ("unet", "text_encoder")
            for k, v in getattr(pipe, name).state_dict().items()}


def assert_unchanged(pipe, before):
    after = snapshot(pipe)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_two_loras_merge_to_the_closed_form_and_unload_exactly(pipe, tmp_path):
    modules = targets(pipe)
    before = snapshot(pipe)
    t1 = write_lora(tmp_path / "one.safetensors", modules, seed=0, alpha=1.0)
    t2 = write_lora(tmp_path / "two.safetensors", dict(list(modules.items())[:3]), seed=1, alpha=None)
    originals = {k: m.weight.detach().clone() for k, m in modules.items()}
    pipe.load_lora(tmp_path / "one.safetensors", weight=0.5, text_encoder_weight=2.0)
    pipe.load_lora(tmp_path / "two.safetensors", weight=-1.5)
    assert [a.name for a in pipe.loras] == ["one", "two"]
    for key, module in modules.items():
        m1 = 2.0 if key.startswith("lora_te") else 0.5
        expected = originals[key] + m1 * closed_form(t1, key, module.weight.shape, 1.0, RANK)
        if f"{key}.lora_down.weight" in t2:
            expected = expected - 1.5 * closed_form(t2, key, module.weight.shape, RANK, RANK)  # no alpha: scale 1
        torch.testing.assert_close(module.weight.detach(), expected, rtol=1e-5, atol=1e-6)
    pipe.unload_loras()
    assert pipe.loras == []
    assert_unchanged(pipe, before)


def test_a_hundred_load_unload_cycles_leave_no_drift(pipe, tmp_path):
    write_lora(tmp_path / "x.safetensors", targets(pipe), seed=2)
    before = snapshot(pipe)
    for i in range(100):
        pipe.load_lora(tmp_path / "x.safetensors", weight=0.1 * (i % 7) + 0.3)
        pipe.unload_loras()
    assert_unchanged(pipe, before)


def test_bad_files_change_nothing_and_say_why(pipe, tmp_path):
    modules = targets(pipe)
    before = snapshot(pipe)
    good = write_lora(tmp_path / "good.safetensors", modules, seed=3)
    # ranks that disagree within a module
    bad = dict(good)
    key = next(iter(modules))
    bad[f"{key}.lora_up.weight"] = torch.randn(bad[f"{key}.lora_up.weight"].shape[0], RANK + 1)
    save_file(bad, str(tmp_path / "ranks.safetensors"))
    # a LoRA for a model with another cross-attention width (SDXL's)
    sdxl = {"lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_down.weight": torch.zeros(4, 2048),
            "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_up.weight": torch.zeros(640, 4)}
    save_file(sdxl, str(tmp_path / "sdxl.safetensors"))
    save_file({"model.diffusion_model.out.2.weight": torch.zeros(4)}, str(tmp_path / "model.safetensors"))
    raw = (tmp_path / "good.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(raw[: len(raw) // 2])
    cases = {"ranks.safetensors": "rank", "sdxl.safetensors": "SDXL (cross-attention width 2048)",
             "model.safetensors": "holds no LoRA", "cut.safetensors": "truncated or corrupt"}
    for name, words in cases.items():
        with pytest.raises(ValueError, match=r"(?s).*" + words.replace("(", r"\(").replace(")", r"\)")) as err:
            pipe.load_lora(tmp_path / name)
        assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="LoRA weight must be a number, got 'lots'"):
        pipe.load_lora(tmp_path / "good.safetensors", weight="lots")
    assert pipe.loras == []
    assert_unchanged(pipe, before)


def test_sdxl_lora_error_names_both_models(pipe, tmp_path):
    save_file({"lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_down.weight": torch.zeros(4, 2048),
               "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_up.weight": torch.zeros(640, 4)},
              str(tmp_path / "xl.safetensors"))
    with pytest.raises(ValueError, match=r"is a LoRA for SDXL \(cross-attention width 2048\); this sd1 model is a "
                                         r"model with cross-attention width 128"):
        pipe.load_lora(tmp_path / "xl.safetensors")


def test_keys_that_match_no_module_are_reported(pipe, tmp_path):
    modules = targets(pipe)
    tensors = write_lora(tmp_path / "a.safetensors", modules, seed=4)
    tensors["lora_unet_no_such_block_attn1_to_q.lora_down.weight"] = torch.zeros(RANK, 8)
    tensors["lora_unet_no_such_block_attn1_to_q.lora_up.weight"] = torch.zeros(8, RANK)
    save_file(tensors, str(tmp_path / "a.safetensors"))
    messages = []
    stack = LoraStack({"unet": pipe.unet, "text_encoder": pipe.text_encoder})
    applied = stack.add(tmp_path / "a.safetensors", warn=messages.append)
    stack.clear()
    assert applied.unmatched == ("lora_unet_no_such_block_attn1_to_q",)
    assert len(messages) == 1 and "1 of its keys match no module" in messages[0]
    assert "lora_unet_no_such_block_attn1_to_q" in messages[0]


def test_prompt_tags():
    text, tags = extract_lora_tags("a red circle <lora:style:0.8>, <lora:b> <lyco:c:0.5:1.25>")
    assert text == "a red circle ,  "  # the tags go, the text around them stays
    assert [(t.name, t.weight, t.text_encoder_weight) for t in tags] == [
        ("style", 0.8, 0.8), ("b", 1.0, 1.0), ("c", 1.25, 0.5)]
    with pytest.raises(ValueError, match=r"the weight in <lora:x:abc> must be a number"):
        extract_lora_tags("<lora:x:abc>")
    with pytest.raises(ValueError, match="must be a finite number"):
        extract_lora_tags("<lora:x:nan>")
    with pytest.raises(ValueError, match=r"the weight in <lyco:x: 2e> must be a number"):  # the tag as written
        extract_lora_tags("a <lyco:x: 2e>")


def test_find_lora_names_the_closest(tmp_path):
    (tmp_path / "sub").mkdir()
    for name in ("pastel_style.safetensors", "sub/pixel_art.pt", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    assert find_lora("pixel_art", [tmp_path]) == tmp_path / "sub" / "pixel_art.pt"
    with pytest.raises(ValueError, match=r"LoRA 'pastel-style' not found in .*; closest: pastel_style"):
        find_lora("pastel-style", [tmp_path])
    with pytest.raises(ValueError, match="give the folder that holds it with --lora-dir"):
        find_lora("x", [])


def test_generate_with_a_lora_tag_records_and_checks_its_hash(pipe, tmp_path, capsys):
    (tmp_path / "loras").mkdir()
    write_lora(tmp_path / "loras" / "blob.safetensors", targets(pipe), seed=5)
    out = tmp_path / "a.png"
    args = ["generate", "a red circle <lora:blob:0.7>", "--steps", "2", "--seed", "1", "--lora-dir",
            str(tmp_path / "loras"), "--output", str(out)]
    assert main(args) == 0
    capsys.readouterr()
    assert main(["info", str(out)]) == 0
    info = capsys.readouterr().out
    assert f'Lora hashes: "blob: {short_hash(tmp_path / "loras" / "blob.safetensors")}"' in info
    assert info.startswith("a red circle <lora:blob:0.7>")
    # --from finds the same file again; a different file under that name is refused
    assert main(["generate", "--from", str(out), "--lora-dir", str(tmp_path / "loras"), "--output",
                 str(tmp_path / "b.png")]) == 0
    write_lora(tmp_path / "loras" / "blob.safetensors", targets(pipe), seed=6)
    assert main(["generate", "--from", str(out), "--lora-dir", str(tmp_path / "loras"), "--output",
                 str(tmp_path / "c.png")]) == 2
    assert "the image was made with LoRA blob [" in capsys.readouterr().err


def test_lora_info(pipe, tmp_path, capsys):
    tensors = write_lora(tmp_path / "x.safetensors", targets(pipe), seed=7, alpha=1.0)
    meta = {"ss_network_dim": "2", "ss_output_name": "x", "modelspec.architecture": "stable-diffusion-v1/lora",
            "ss_tag_frequency": '{"5_shapes": {"red circle": 7, "blue square": 9}}'}
    save_file(tensors, str(tmp_path / "x.safetensors"), metadata=meta)
    text = describe_lora(tmp_path / "x.safetensors")
    assert "for: a model with cross-attention width 128" in text
    assert "kinds: lora" in text and "ranks: 2" in text and "alphas: 1" in text
    assert "most frequent tags: blue square (9), red circle (7)" in text
    assert "modelspec.architecture: stable-diffusion-v1/lora" in text
    assert main(["lora", "info", str(tmp_path / "x.safetensors")]) == 0
    assert "output name: x" in capsys.readouterr().out


def test_a_pt_lora_is_read_without_running_pickle_code_and_merges_as_its_safetensors_twin(pipe, tmp_path):
    tensors = write_lora(tmp_path / "a.safetensors", targets(pipe), seed=8)
    torch.save(tensors, tmp_path / "a.pt")  # what older trainers wrote
    pipe.load_lora(tmp_path / "a.safetensors")
    merged = snapshot(pipe)
    pipe.unload_loras()
    applied = pipe.load_lora(tmp_path / "a.pt", name="a")
    assert applied.hash == short_hash(tmp_path / "a.pt") and len(applied.hash) == 12
    assert_unchanged(pipe, merged)
    pipe.unload_loras()
