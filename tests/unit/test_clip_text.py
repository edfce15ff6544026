"""Contracts of the CLIP text encoder and its converters: the official checkpoint layouts load
tensor for tensor, the naming converters round-trip and refuse unknown names, and the forward
pass is causal, pools the end-of-text token and honours every config option."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from unfog.checkpoint.convert import (
    CLIP_TEXT_IGNORED,
    canonical_clip_text,
    convert_openclip_text,
    convert_to_openclip_text,
    convert_transformers_clip_text,
)
from unfog.models.clip_text import (
    CLIP_L,
    OPENCLIP_BIGG,
    OPENCLIP_H,
    PRESETS,
    TINY_CLIP,
    CLIPTextConfig,
    CLIPTextEncoder,
    quick_gelu,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, home of model_checks
from model_checks import randomize_, read_layout  # noqa: E402

# fixture file -> (our config, whether the file is in OpenCLIP naming, the tensors it carries
# that are not weights of the encoder)
OFFICIAL_LAYOUTS = {
    "CLIP-v1-SD": (CLIP_L, False, {"embeddings.position_ids"}),  # SD 1.x, SDXL encoder 1
    "CLIP-v2-SD": (OPENCLIP_H, True, {"logit_scale"}),  # SD 2.x
    "CLIP-XL-SD": (OPENCLIP_BIGG, True, {"logit_scale"}),  # SDXL encoder 2, refiner
    # Waifu Diffusion's SD 2 file: the last layer and the projection removed.
    "CLIP-v2-WD": (replace(OPENCLIP_H, layers=23, projection_dim=None), True, set()),
}


pytestmark = pytest.mark.usefixtures("single_thread")  # tests/conftest.py


def random_ids(batch: int, n: int, cfg: CLIPTextConfig, seed: int = 0) -> torch.Tensor:
    """(B, N) ids shaped like tokenizer output: BOS, words, EOS at varying places, EOS padding."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.eos_token_id - 1, (batch, n), generator=g)
    ids[:, 0] = cfg.eos_token_id - 1
    for row in range(batch):
        ids[row, 2 + (5 * row) % (n - 2) :] = cfg.eos_token_id
    return ids


# ---------------------------------------------------------------- official layouts


@pytest.mark.parametrize("name", sorted(OFFICIAL_LAYOUTS))
def test_official_layout_is_consumed_exactly(name):
    """Every tensor of the official file lands on one of ours and every one of ours is filled."""
    cfg, openclip, not_weights = OFFICIAL_LAYOUTS[name]
    layout = read_layout(name)
    fixture = {k: torch.empty(shape, device="meta") for k, shape in layout.items()}
    converted = convert_openclip_text(fixture) if openclip else canonical_clip_text(fixture)
    with torch.device("meta"):
        model = CLIPTextEncoder(cfg)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in converted.items()} == ours
    model.load_state_dict(converted, strict=True, assign=True)
    assert set(layout) & CLIP_TEXT_IGNORED == not_weights
    # Nothing else was dropped: the tensor count, each fused in_proj split in three, adds up.
    fused = sum(1 for k in layout if ".in_proj_" in k)
    assert len(ours) == len(layout) - len(not_weights) + 2 * fused


def test_presets_are_valid_and_named():
    assert set(PRESETS) == {"CLIP_L", "OPENCLIP_H", "OPENCLIP_BIGG", "TINY_CLIP"}
    assert (CLIP_L.width, CLIP_L.layers, CLIP_L.activation) == (768, 12, "quick_gelu")
    assert (OPENCLIP_H.width, OPENCLIP_H.layers, OPENCLIP_H.activation) == (1024, 24, "gelu")
    assert (OPENCLIP_BIGG.width, OPENCLIP_BIGG.layers, OPENCLIP_BIGG.projection_dim) == (1280, 32, 1280)


# ---------------------------------------------------------------- converters


def test_openclip_round_trip_and_values():
    torch.manual_seed(0)
    model = randomize_(CLIPTextEncoder(replace(TINY_CLIP, projection_dim=24)))
    canonical = model.state_dict()
    openclip = convert_to_openclip_text(canonical)
    layer = "encoder.layers.1.self_attn"
    fused = openclip["transformer.resblocks.1.attn.in_proj_weight"]
    assert torch.equal(fused, torch.cat([canonical[f"{layer}.{p}_proj.weight"] for p in "qkv"]))
    assert torch.equal(openclip["text_projection"], canonical["text_projection.weight"].T)
    back = convert_openclip_text({**openclip, "logit_scale": torch.tensor(4.6)})
    assert back.keys() == canonical.keys()
    assert all(torch.equal(back[k], canonical[k]) for k in canonical)


def test_converters_refuse_unknown_names():
    with pytest.raises(ValueError, match="not in the OpenCLIP text naming: transformer.resblocks.0.attn.qkv"):
        convert_openclip_text({"transformer.resblocks.0.attn.qkv": torch.zeros(3)})
    with pytest.raises(ValueError, match="q, k and v are all needed"):
        convert_to_openclip_text({"encoder.layers.0.self_attn.q_proj.weight": torch.zeros(2, 2)})
    with pytest.raises(ValueError, match="was the prefix stripped"):
        canonical_clip_text({"cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": 0})


def test_canonical_clip_text_recognises_each_naming():
    model = CLIPTextEncoder(replace(TINY_CLIP, projection_dim=8))
    canonical = model.state_dict()
    hf = {"text_model." + k: v for k, v in canonical.items() if k != "text_projection.weight"}
    hf["text_projection.weight"] = canonical["text_projection.weight"]
    hf["text_model.embeddings.position_ids"] = torch.arange(77)[None]
    sd1 = {**canonical, "embeddings.position_ids": torch.arange(77)[None]}
    for source in (hf, sd1, convert_to_openclip_text(canonical)):
        assert canonical_clip_text(source).keys() == canonical.keys()
    assert convert_transformers_clip_text(hf).keys() == canonical.keys()


# ---------------------------------------------------------------- forward


def test_outputs_shapes_and_hidden_states():
    cfg = replace(TINY_CLIP, projection_dim=12)
    model = randomize_(CLIPTextEncoder(cfg)).eval()
    ids = random_ids(3, 77, cfg)
    with torch.no_grad():
        out = model(ids)
    assert out.last_hidden_state.shape == (3, 77, cfg.width)
    assert len(out.hidden_states) == cfg.layers + 1
    assert all(h.shape == (3, 77, cfg.width) for h in out.hidden_states)
    assert torch.allclose(out.last_hidden_state, model.final_layer_norm(out.hidden_states[-1]))
    assert out.pooled.shape == (3, cfg.width) and out.text_embeds.shape == (3, 12)
    assert torch.allclose(out.text_embeds, out.pooled @ model.text_projection.weight.T)
    assert CLIPTextEncoder(TINY_CLIP)(ids).text_embeds is None


def test_attention_is_causal():
    model = randomize_(CLIPTextEncoder(TINY_CLIP)).eval()
    ids = random_ids(2, 20, TINY_CLIP)
    changed = ids.clone()
    changed[:, 10:] = 7
    with torch.no_grad():
        a, b = model(ids).last_hidden_state, model(changed).last_hidden_state
    assert torch.equal(a[:, :10], b[:, :10])
    assert not torch.allclose(a[:, 10:], b[:, 10:])


@pytest.mark.parametrize("pooling", ["argmax", "eos_token"])
def test_pooling_takes_the_first_end_of_text_token(pooling):
    cfg = replace(TINY_CLIP, pooling=pooling)
    model = randomize_(CLIPTextEncoder(cfg)).eval()
    ids = torch.tensor([[49406, 320, 2368, 49407, 49407, 49407], [49406, 320, 49407, 0, 0, 0]])
    assert model.eos_positions(ids).tolist() == [3, 2]
    with torch.no_grad():
        out = model(ids)
    assert torch.equal(out.pooled, out.last_hidden_state[[0, 1], [3, 2]])


def test_pooling_rules_differ_only_without_end_of_text():
    argmax = CLIPTextEncoder(replace(TINY_CLIP, pooling="argmax"))
    first_eos = CLIPTextEncoder(replace(TINY_CLIP, pooling="eos_token"))
    ids = torch.tensor([[100, 500, 49000, 2]])  # truncated without an end-of-text token
    assert argmax.eos_positions(ids).item() == 2 and first_eos.eos_positions(ids).item() == 0


def test_padding_mask_changes_only_padded_positions():
    model = randomize_(CLIPTextEncoder(TINY_CLIP)).eval()
    ids = random_ids(2, 16, TINY_CLIP)
    mask = torch.ones_like(ids)
    mask[0, 9:] = 0
    with torch.no_grad():
        plain, masked = model(ids).last_hidden_state, model(ids, mask).last_hidden_state
    assert torch.allclose(plain[0, :9], masked[0, :9], atol=1e-6)
    assert torch.allclose(plain[1], masked[1], atol=1e-6)
    assert not torch.allclose(plain[0, 9:], masked[0, 9:])


@pytest.mark.parametrize("activation", ["quick_gelu", "gelu"])
def test_activation_option(activation):
    model = CLIPTextEncoder(replace(TINY_CLIP, activation=activation))
    x = torch.linspace(-3, 3, 7)
    expected = quick_gelu(x) if activation == "quick_gelu" else torch.nn.functional.gelu(x)
    assert torch.equal(model.encoder.layers[0].mlp.act(x), expected)
    assert torch.allclose(quick_gelu(x), x * torch.sigmoid(1.702 * x))


def test_bf16_forward_runs():
    model = randomize_(CLIPTextEncoder(replace(TINY_CLIP, projection_dim=8))).eval()
    ids = random_ids(2, 77, TINY_CLIP)
    with torch.no_grad():
        ref = model(ids)
        low = model.to(torch.bfloat16)(ids)
    assert low.last_hidden_state.dtype == torch.bfloat16
    assert (low.pooled.float() - ref.pooled).abs().max() < 0.1 * ref.pooled.abs().max()


def test_too_many_tokens_and_bad_shapes_raise():
    model = CLIPTextEncoder(TINY_CLIP)
    with pytest.raises(ValueError, match="78 tokens exceed the 77 positions"):
        model(torch.zeros(1, 78, dtype=torch.long))
    with pytest.raises(ValueError, match=r"must be \(batch, tokens\)"):
        model(torch.zeros(77, dtype=torch.long))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"activation": "relu"}, "unknown activation 'relu'; valid choices: quick_gelu, gelu"),
        ({"pooling": "mean"}, "unknown pooling 'mean'; valid choices: argmax, eos_token"),
        ({"width": 30, "heads": 4}, "width 30 is not divisible by heads=4"),
        ({"layers": 0}, "layers must be >= 1"),
        ({"projection_dim": 0}, "projection_dim must be >= 1 or None"),
        ({"vocab_size": 1000}, "eos_token_id 49407 is outside the vocabulary"),
    ],
)
def test_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        replace(TINY_CLIP, **kwargs)
