"""Numerical parity of ``CLIPTextEncoder`` with transformers' ``CLIPTextModel`` and
``CLIPTextModelWithProjection`` on the same random weights (fp32, relative error <= 1e-4).

The OpenCLIP path is checked against a mapping that is not ours: random weights written in
OpenCLIP naming are converted by our ``convert_openclip_text`` for our model and by diffusers'
``convert_open_clip_checkpoint`` (from ``single_file_utils``) for transformers' model.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
import transformers
from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint

from unfog.checkpoint.convert import convert_openclip_text, convert_transformers_clip_text
from unfog.models.clip_text import CLIPTextConfig, CLIPTextEncoder

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, home of model_checks
from model_checks import randomize_, rel_err  # noqa: E402

VOCAB, WIDTH, LAYERS, HEADS, PROJ = 1000, 64, 3, 4, 48
BOS, EOS = VOCAB - 2, VOCAB - 1
TOL = 1e-4


pytestmark = pytest.mark.usefixtures("single_thread")  # tests/conftest.py


def hf_config(activation: str, eos_token_id: int, projection_dim: int = PROJ) -> transformers.CLIPTextConfig:
    return transformers.CLIPTextConfig(
        vocab_size=VOCAB,
        hidden_size=WIDTH,
        intermediate_size=4 * WIDTH,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        max_position_embeddings=77,
        hidden_act=activation,
        projection_dim=projection_dim,
        bos_token_id=BOS,
        eos_token_id=eos_token_id,
        attn_implementation="eager",
    )


def our_config(activation: str, pooling: str, projection_dim: int | None) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=VOCAB,
        width=WIDTH,
        layers=LAYERS,
        heads=HEADS,
        activation=activation,
        projection_dim=projection_dim,
        pooling=pooling,
        eos_token_id=EOS,
    )


def token_batch(pad: int, seed: int = 0) -> torch.Tensor:
    """(4, 77) ids as a tokenizer makes them: BOS, words, EOS at various places, then padding."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, BOS, (4, 77), generator=g)
    ids[:, 0] = BOS
    for row, eos_at in enumerate((5, 17, 40, 76)):
        ids[row, eos_at] = EOS
        ids[row, eos_at + 1 :] = pad
    return ids


def assert_parity(ours, theirs, projected: bool) -> None:
    assert rel_err(ours.last_hidden_state, theirs.last_hidden_state) <= TOL
    assert len(ours.hidden_states) == len(theirs.hidden_states) == LAYERS + 1
    for mine, ref in zip(ours.hidden_states, theirs.hidden_states):
        assert rel_err(mine, ref) <= TOL
    if projected:
        assert rel_err(ours.text_embeds, theirs.text_embeds) <= TOL
    else:
        assert rel_err(ours.pooled, theirs.pooler_output) <= TOL


# SD 1.x style: quick-GELU, no projection, EOS padding. eos_token_id=2 is the legacy (argmax)
# path of transformers' configs; a real EOS id takes the first-EOS path.
@pytest.mark.parametrize("eos_token_id, pooling", [(2, "argmax"), (EOS, "eos_token")])
def test_clip_text_model_quick_gelu(eos_token_id, pooling):
    ref = randomize_(transformers.CLIPTextModel(hf_config("quick_gelu", eos_token_id))).eval()
    ours = CLIPTextEncoder(our_config("quick_gelu", pooling, None)).eval()
    ours.load_state_dict(convert_transformers_clip_text(ref.state_dict()), strict=True)
    ids = token_batch(pad=EOS)
    with torch.no_grad():
        theirs = ref(ids, output_hidden_states=True)
        mine = ours(ids)
    assert_parity(mine, theirs, projected=False)
    assert rel_err(mine.hidden_states[-2], theirs.hidden_states[-2]) <= TOL  # penultimate


def test_bidirectional_option_matches_transformers_layers_without_the_causal_mask():
    """``causal=False`` (an option for encoders trained from scratch): transformers' own CLIP text
    layers run with no mask are the oracle, and early tokens now see later ones."""
    from dataclasses import replace

    ref = randomize_(transformers.CLIPTextModel(hf_config("quick_gelu", EOS))).eval()
    ours = CLIPTextEncoder(replace(our_config("quick_gelu", "eos_token", None), causal=False)).eval()
    ours.load_state_dict(convert_transformers_clip_text(ref.state_dict()), strict=True)
    ids = token_batch(pad=EOS)
    with torch.no_grad():
        text = getattr(ref, "text_model", ref)  # transformers 5 flattened CLIPTextModel
        states = text.encoder(inputs_embeds=text.embeddings(input_ids=ids), attention_mask=None).last_hidden_state
        expected = text.final_layer_norm(states)
        mine = ours(ids).last_hidden_state
        causal = ref(ids).last_hidden_state
    assert rel_err(mine, expected) <= TOL
    assert rel_err(mine[:, :5], causal[:, :5]) > 0.1  # the first tokens now depend on what follows


def test_clip_text_model_with_projection_gelu():
    ref = randomize_(transformers.CLIPTextModelWithProjection(hf_config("gelu", 2))).eval()
    ours = CLIPTextEncoder(our_config("gelu", "argmax", PROJ)).eval()
    ours.load_state_dict(convert_transformers_clip_text(ref.state_dict()), strict=True)
    ids = token_batch(pad=0)
    with torch.no_grad():
        theirs = ref(ids, output_hidden_states=True)
        mine = ours(ids)
    assert_parity(mine, theirs, projected=True)
    pooled_ref = ref.text_model(ids).pooler_output
    assert rel_err(mine.pooled, pooled_ref) <= TOL


def test_padding_attention_mask_matches_transformers():
    ref = randomize_(transformers.CLIPTextModel(hf_config("quick_gelu", 2))).eval()
    ours = CLIPTextEncoder(our_config("quick_gelu", "argmax", None)).eval()
    ours.load_state_dict(convert_transformers_clip_text(ref.state_dict()), strict=True)
    ids = token_batch(pad=EOS)
    mask = (torch.arange(77)[None] <= torch.tensor([5, 17, 40, 76])[:, None]).long()
    with torch.no_grad():
        theirs = ref(ids, attention_mask=mask, output_hidden_states=True)
        mine = ours(ids, mask)
    assert_parity(mine, theirs, projected=False)


def openclip_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights in OpenCLIP naming (fused in_proj, raw text_projection), written by hand."""
    g = torch.Generator().manual_seed(seed)

    def matrix(*shape):
        return torch.randn(shape, generator=g) / math.sqrt(shape[-1])

    def vector(n, centre=0.0):
        return centre + 0.1 * torch.randn(n, generator=g)

    sd = {
        "token_embedding.weight": torch.randn(VOCAB, WIDTH, generator=g),
        "positional_embedding": torch.randn(77, WIDTH, generator=g),
        "ln_final.weight": vector(WIDTH, 1.0),
        "ln_final.bias": vector(WIDTH),
        "text_projection": matrix(WIDTH, PROJ),  # used as pooled @ text_projection
        "logit_scale": torch.tensor(math.log(1 / 0.07)),
    }
    for i in range(LAYERS):
        block = f"transformer.resblocks.{i}."
        sd |= {
            block + "ln_1.weight": vector(WIDTH, 1.0),
            block + "ln_1.bias": vector(WIDTH),
            block + "attn.in_proj_weight": matrix(3 * WIDTH, WIDTH),
            block + "attn.in_proj_bias": vector(3 * WIDTH),
            block + "attn.out_proj.weight": matrix(WIDTH, WIDTH),
            block + "attn.out_proj.bias": vector(WIDTH),
            block + "ln_2.weight": vector(WIDTH, 1.0),
            block + "ln_2.bias": vector(WIDTH),
            block + "mlp.c_fc.weight": matrix(4 * WIDTH, WIDTH),
            block + "mlp.c_fc.bias": vector(4 * WIDTH),
            block + "mlp.c_proj.weight": matrix(WIDTH, 4 * WIDTH),
            block + "mlp.c_proj.bias": vector(WIDTH),
        }
    return sd


def test_openclip_weights_match_diffusers_conversion():
    """SDXL-encoder-2 style: OpenCLIP weights, GELU, projection, argmax pooling, zero padding."""
    openclip = openclip_state_dict()
    prefix = "conditioner.embedders.1.model."  # the SDXL prefix (diffusers drops layer 23 of SD2's)
    ref = transformers.CLIPTextModelWithProjection(hf_config("gelu", 2)).eval()
    converted = convert_open_clip_checkpoint(ref, {prefix + k: v for k, v in openclip.items()}, prefix=prefix)
    ref.load_state_dict(converted, strict=True)
    ours = CLIPTextEncoder(our_config("gelu", "argmax", PROJ)).eval()
    ours.load_state_dict(convert_openclip_text(openclip), strict=True)
    ids = token_batch(pad=0)
    with torch.no_grad():
        theirs = ref(ids, output_hidden_states=True)
        mine = ours(ids)
    assert_parity(mine, theirs, projected=True)
    # OpenCLIP's own definition of the projected pooled output: ln_final(x)[eos] @ text_projection.
    eos = ids.argmax(dim=-1)
    expected = mine.last_hidden_state[torch.arange(4), eos] @ openclip["text_projection"]
    assert rel_err(mine.text_embeds, expected) <= TOL
