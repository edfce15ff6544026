"""Prompt parsing, chunking, emphasis and encoding (``unfog.prompt_parser``, ``unfog.conditioning``).

The parser is checked against the input/output pairs documented in AUTOMATIC1111's
``modules/prompt_parser.py`` (the ``parse_prompt_attention`` docstring); the other expectations
follow from its rules, worked out by hand.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from unfog.conditioning import (
    READOUTS,
    Readout,
    apply_emphasis,
    chunk_tensors,
    encode_chunked,
    encode_prompt,
    sdxl_refiner_vector_cond,
    sdxl_vector_cond,
)
from unfog.models.clip_text import TINY_CLIP, CLIPTextEncoder
from unfog.models.tokenizer import BOS_ID, EOS_ID, CLIPTokenizer
from unfog.nn.embeddings import timestep_embedding
from unfog.prompt_parser import BREAK, Chunk, Segment, chunk_tokens, parse_prompt_attention, tokenize_prompt

COMMA = 267  # ",</w>"
CAT = 2368  # "cat</w>"


@pytest.fixture(scope="module")
def tok() -> CLIPTokenizer:
    return CLIPTokenizer.from_bpe_file()


def parsed(prompt: str) -> list[tuple[str, float]]:
    return [tuple(s) for s in parse_prompt_attention(prompt)]


# --- parser --------------------------------------------------------------------------------------

# Documented in A1111's parse_prompt_attention docstring (lists there, tuples here).
A1111_DOCUMENTED = [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    (
        "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
        [
            ("a ", 1.0),
            ("house", 1.5730000000000004),
            (" ", 1.1),
            ("on", 1.0),
            (" a ", 1.1),
            ("hill", 0.55),
            (", sun, ", 1.1),
            ("sky", 1.4641000000000006),
            (".", 1.1),
        ],
    ),
]

# Worked out from the rules (see the module docstring of unfog.prompt_parser).
DERIVED = [
    ("a (very) [nice] image:", [("a ", 1.0), ("very", 1.1), (" ", 1.0), ("nice", 1 / 1.1), (" image:", 1.0)]),
    ("(a:1.5) (b:0.3)", [("a", 1.5), (" ", 1.0), ("b", 0.3)]),
    ("((word))", [("word", 1.1 * 1.1)]),
    ("[[word]]", [("word", 1 / 1.1 / 1.1)]),
    ("[unclosed square", [("unclosed square", 1 / 1.1)]),
    ("( spaced : 1.3 )", [(" spaced ", 1.3)]),
    ("(neg:-0.5)", [("neg", -0.5)]),
    ("((a:2) b)", [("a", 2.0 * 1.1), (" b", 1.1)]),
    ("stray) and ] closers", [("stray) and ] closers", 1.0)]),
    ("x:1.3) y", [("x:1.3) y", 1.0)]),  # a weight with no open bracket is text
    ("ratio 16:9", [("ratio 16:9", 1.0)]),
    ("\\\\ and \\[x\\)", [("\\ and [x)", 1.0)]),
    ("(\\(lit\\))", [("(lit)", 1.1)]),  # escapes inside brackets are weighted too
    ("a\\b", [("ab", 1.0)]),  # a lone backslash is dropped
    ("(a:1.2.3)", [("a:1.2.3", 1.1)]),  # not a number: text (A1111 raises ValueError here)
    ("", [("", 1.0)]),
    ("()", [("", 1.0)]),
]


@pytest.mark.parametrize("prompt, expected", A1111_DOCUMENTED + DERIVED)
def test_parse_prompt_attention(prompt, expected):
    got = parsed(prompt)
    assert [t for t, _ in got] == [t for t, _ in expected]
    if (prompt, expected) in A1111_DOCUMENTED:
        assert got == expected  # bit for bit: the same order of multiplications
    else:
        assert [w for _, w in got] == pytest.approx([w for _, w in expected], rel=1e-12)


@pytest.mark.parametrize(
    "prompt, expected",
    [
        ("a BREAK b", [("a", 1.0), BREAK, ("b", 1.0)]),
        ("a, BREAK, b", [("a,", 1.0), BREAK, (", b", 1.0)]),
        ("BREAK a", [("", 1.0), BREAK, ("a", 1.0)]),
        ("(a BREAK b)", [("a", 1.1), BREAK, ("b", 1.1)]),  # brackets do not touch the marker
        ("aBREAK break b", [("aBREAK break b", 1.0)]),  # a whole word, upper case
    ],
)
def test_parse_break(prompt, expected):
    assert parsed(prompt) == [tuple(e) for e in expected]


def test_segments_are_named_tuples():
    (seg,) = parse_prompt_attention("(x)")
    assert isinstance(seg, Segment) and (seg.text, seg.weight) == ("x", 1.1)


# --- chunking ------------------------------------------------------------------------------------


def cats(n: int) -> str:
    return " ".join(["cat"] * n)


@pytest.mark.parametrize(
    "n_tokens, sizes", [(0, [0]), (1, [1]), (75, [75]), (76, [75, 1]), (200, [75, 75, 50])]
)
def test_chunk_lengths(tok, n_tokens, sizes):
    chunks = tokenize_prompt(cats(n_tokens), tok)
    assert [len(c.ids) for c in chunks] == sizes
    assert all(c.ids == [CAT] * len(c.ids) and c.weights == [1.0] * len(c.ids) for c in chunks)


def test_comma_backtrack_moves_the_tail_to_the_next_chunk():
    ids = [CAT] * 60 + [COMMA] + [CAT] * 30  # the comma is token 60, within the last 20 of 75
    chunks = chunk_tokens([(ids, 1.0)], comma_id=COMMA)
    assert [len(c.ids) for c in chunks] == [61, 30]
    assert chunks[0].ids[-1] == COMMA
    assert [len(c.ids) for c in chunk_tokens([(ids, 1.0)], comma_id=COMMA, comma_backtrack=0)] == [75, 16]


def test_comma_too_far_back_is_ignored():
    ids = [CAT] * 50 + [COMMA] + [CAT] * 30  # 75 - 50 = 25 > 20
    assert [len(c.ids) for c in chunk_tokens([(ids, 1.0)], comma_id=COMMA)] == [75, 6]
    ids = [CAT] * 55 + [COMMA] + [CAT] * 30  # 75 - 55 = 20: just inside
    assert [len(c.ids) for c in chunk_tokens([(ids, 1.0)], comma_id=COMMA)] == [56, 30]


def test_comma_as_token_76_goes_to_the_next_chunk(tok):
    chunks = tokenize_prompt(cats(75) + ", " + cats(5), tok)
    assert [len(c.ids) for c in chunks] == [75, 6] and chunks[1].ids[0] == COMMA


def test_backtrack_keeps_weights_with_their_tokens():
    pieces = [([CAT] * 70, 1.0), ([COMMA], 1.0), ([CAT] * 10, 1.5)]
    first, second = chunk_tokens(pieces, comma_id=COMMA)
    assert (len(first.ids), len(second.ids)) == (71, 10)
    assert second.weights == [1.5] * 10 and first.weights == [1.0] * 71


def test_break_forces_a_new_chunk(tok):
    assert [len(c.ids) for c in tokenize_prompt("cat BREAK dog dog", tok)] == [1, 2]
    assert [len(c.ids) for c in tokenize_prompt("BREAK cat", tok)] == [0, 1]  # an empty first chunk
    assert [len(c.ids) for c in tokenize_prompt("cat BREAK", tok)] == [1]
    full_then_break = tokenize_prompt(cats(75) + " BREAK cat", tok)
    assert [len(c.ids) for c in full_then_break] == [75, 1]  # the full chunk closes; no empty one
    assert [c.ids for c in tokenize_prompt("(cat BREAK cat)", tok)] == [[CAT], [CAT]]


def test_weights_follow_tokens_and_segments_tokenize_apart(tok):
    (chunk,) = tokenize_prompt("(red)car [dog]", tok)
    assert chunk.ids == tok.encode("red") + tok.encode("car") + tok.encode("dog")
    assert chunk.ids != tok.encode("redcar dog")
    assert chunk.weights == pytest.approx([1.1, 1.0, 1 / 1.1])
    (plain,) = tokenize_prompt("(red)car", tok, parse_emphasis=False)
    assert plain.ids == tok.encode("(red)car") and plain.weights == [1.0] * len(plain.ids)


def test_chunk_tensors_layout(tok):
    chunks = [[Chunk([CAT, CAT], [1.1, 1.0])], [Chunk([CAT] * 75, [1.0] * 75), Chunk([], [])]]
    for pad, pad_id in (("eos", EOS_ID), ("zero", 0)):
        ids, weights = chunk_tensors(chunks, 2, tok, pad)
        assert ids.shape == weights.shape == (2, 2, 77)
        assert ids[0, 0, :4].tolist() == [BOS_ID, CAT, CAT, EOS_ID]
        assert (ids[0, 0, 4:] == pad_id).all()
        assert ids[0, 1, :2].tolist() == [BOS_ID, EOS_ID] and (ids[0, 1, 2:] == pad_id).all()  # empty
        assert torch.equal(ids[0, 1], ids[1, 1])
        assert ids[1, 0].tolist() == [BOS_ID] + [CAT] * 75 + [EOS_ID]
        assert weights[0, 0, :3].tolist() == pytest.approx([1.0, 1.1, 1.0]) and (weights[0, 0, 3:] == 1).all()
    with pytest.raises(ValueError, match="n_chunks"):
        chunk_tensors(chunks, 1, tok, "eos")
    with pytest.raises(ValueError, match="at most 75"):
        chunk_tensors([[Chunk([CAT] * 76, [1.0] * 76)]], 1, tok, "eos")


def test_empty_prompt_is_the_tokenizer_encoding_of_empty(tok):
    ids, _ = chunk_tensors([tokenize_prompt("", tok)], 1, tok, "zero")
    assert torch.equal(ids[0], tok([""], pad="zero").input_ids)
    prompt = "a photo of a cat, sitting on a mat"
    ids, _ = chunk_tensors([tokenize_prompt(prompt, tok)], 1, tok, "eos")
    assert torch.equal(ids[0], tok([prompt], pad="eos").input_ids)


# --- emphasis ------------------------------------------------------------------------------------


def test_original_emphasis_math():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(3, 77, 8, generator=g, dtype=torch.float64) + 0.3
    w = 1 + 0.5 * torch.rand(3, 77, generator=g, dtype=torch.float64)
    out = apply_emphasis(z, w, "original")
    for n in range(3):  # each chunk on its own, as A1111's formula
        zw = z[n] * w[n, :, None]
        assert torch.allclose(out[n], zw * (z[n].mean() / zw.mean()), rtol=1e-12)
        assert out[n].mean().item() == pytest.approx(z[n].mean().item(), rel=1e-10)
    assert torch.allclose(apply_emphasis(z, w, "no_norm"), z * w[..., None])
    assert apply_emphasis(z, w, "ignore") is z and apply_emphasis(z, w, "none") is z
    assert torch.equal(apply_emphasis(z, torch.ones(3, 77, dtype=torch.float64), "original"), z)
    with pytest.raises(ValueError, match="unknown emphasis .*; valid choices: "):
        apply_emphasis(z, w, "strong")


# --- encoding on tiny encoders -------------------------------------------------------------------


def tiny_encoder(seed: int, **overrides) -> CLIPTextEncoder:
    torch.manual_seed(seed)
    return CLIPTextEncoder(replace(TINY_CLIP, layers=3, **overrides)).eval()


@pytest.fixture(scope="module")
def clip_l() -> CLIPTextEncoder:
    return tiny_encoder(0)


@pytest.fixture(scope="module")
def big_g() -> CLIPTextEncoder:
    return tiny_encoder(1, width=48, activation="gelu", projection_dim=40)


def encode_ids(encoder, ids, layer, norm):
    with torch.no_grad():
        z = encoder(torch.tensor([ids])).hidden_states[-layer]
        return encoder.final_layer_norm(z)[0] if norm else z[0]


def padded(tok, ids, pad_id):
    row = [BOS_ID, *ids, EOS_ID]
    return row + [pad_id] * (77 - len(row))


def test_sd1_emphasis_on_an_encoder(tok, clip_l):
    prompt = "a (cat:1.5) on a [mat]"
    with torch.no_grad():
        cond = encode_prompt("sd1", [clip_l], tok, prompt, "blurry")
    (chunk,) = tokenize_prompt(prompt, tok)
    z = encode_ids(clip_l, padded(tok, chunk.ids, EOS_ID), 1, True)  # (77, W)
    w = torch.tensor([1.0, *chunk.weights, 1.0] + [1.0] * (75 - len(chunk.ids)))
    zw = z * w[:, None]
    expected = zw * (z.mean() / zw.mean())
    assert cond.context.shape == (1, 77, 32) and cond.pooled is None and cond.negative_pooled is None
    assert torch.allclose(cond.context[0], expected, atol=1e-6)
    neg = encode_ids(clip_l, padded(tok, tok.encode("blurry"), EOS_ID), 1, True)
    assert torch.allclose(cond.negative_context[0], neg, atol=1e-6)


def test_with_pooled_gives_sd1_the_first_chunks_pooled_output(tok, clip_l, big_g):
    prompt = cats(80)  # two chunks: the first is pooled
    with torch.no_grad():
        plain = encode_prompt("sd1", [clip_l], tok, prompt, "dog")
        cond = encode_prompt("sd1", [clip_l], tok, prompt, "dog", with_pooled=True)
        first = clip_l(torch.tensor([padded(tok, [CAT] * 75, EOS_ID), padded(tok, tok.encode("dog"), EOS_ID)]))
        projected = encode_prompt("sd2", [big_g], tok, prompt, with_pooled=True)
    assert plain.pooled is None and torch.equal(cond.context, plain.context)
    assert torch.allclose(cond.pooled, first.pooled[:1], atol=1e-6)  # no projection: the EOS state
    assert torch.allclose(cond.negative_pooled, first.pooled[1:], atol=1e-6)
    assert projected.pooled.shape == (1, 40)  # a projection: text_embeds


def test_long_prompt_chunks_and_negative_padding(tok, clip_l):
    prompt = cats(80) + " (dog:1.2)"  # chunks: 75 cats | 5 cats + dog
    with torch.no_grad():
        cond = encode_prompt("sd1", [clip_l], tok, [prompt, "cat"], ["", cats(160)], clip_skip=2)
    assert cond.context.shape == cond.negative_context.shape == (2, 3 * 77, 32)  # the negative: 3
    chunks = tokenize_prompt(prompt, tok)
    for k, chunk in enumerate(chunks + [Chunk([], [])]):
        z = encode_ids(clip_l, padded(tok, chunk.ids, EOS_ID), 2, True)
        w = torch.ones(77)
        w[1 : len(chunk.weights) + 1] = torch.tensor(chunk.weights)
        zw = z * w[:, None]
        assert torch.allclose(cond.context[0, 77 * k : 77 * (k + 1)], zw * (z.mean() / zw.mean()), atol=1e-6)
    empty = encode_ids(clip_l, padded(tok, [], EOS_ID), 2, True)
    empty_slots = [  # "" itself, and every chunk added for padding
        (cond.negative_context, 0, 0),
        (cond.negative_context, 0, 1),
        (cond.negative_context, 0, 2),
        (cond.context, 0, 2),
        (cond.context, 1, 1),
        (cond.context, 1, 2),
    ]
    for context, row, k in empty_slots:
        assert torch.allclose(context[row, 77 * k : 77 * (k + 1)], empty, atol=1e-6)


def test_sdxl_concatenates_encoders_and_pools_the_first_chunk(tok, clip_l, big_g):
    prompt = cats(100) + " (dog)"
    with torch.no_grad():
        cond = encode_prompt("sdxl", [clip_l, big_g], tok, prompt, "ugly")
        first = big_g(torch.tensor([padded(tok, [CAT] * 75, 0)]))
    assert cond.context.shape == (1, 2 * 77, 32 + 48) and cond.pooled.shape == (1, 40)
    assert torch.allclose(cond.pooled, first.text_embeds, atol=1e-6)
    z_l = encode_ids(clip_l, padded(tok, [CAT] * 75, EOS_ID), 2, False)  # weights 1: no change
    z_g = encode_ids(big_g, padded(tok, [CAT] * 75, 0), 2, False)
    assert torch.allclose(cond.context[0, :77], torch.cat([z_l, z_g], dim=-1), atol=1e-6)
    assert cond.negative_pooled.abs().sum() > 0
    with torch.no_grad():  # an empty negative prompt gives zeros (A1111, diffusers' SDXL base)
        zeroed = encode_prompt("sdxl", [clip_l, big_g], tok, prompt)
        encoded = encode_prompt("sdxl", [clip_l, big_g], tok, prompt, zero_empty_negative=False)
    assert (zeroed.negative_context == 0).all() and (zeroed.negative_pooled == 0).all()
    assert zeroed.negative_context.shape == cond.context.shape
    assert encoded.negative_pooled.abs().sum() > 0 and torch.equal(encoded.context, zeroed.context)


def test_emphasis_is_applied_per_encoder(tok, clip_l, big_g):
    with torch.no_grad():
        sdxl = encode_prompt("sdxl", [clip_l, big_g], tok, "a (cat:1.4)", "x").context
        l_only = encode_chunked("sd1", [clip_l], tok, [tokenize_prompt("a (cat:1.4)", tok)], clip_skip=2)
        g_only = encode_chunked("sdxl_refiner", [big_g], tok, [tokenize_prompt("a (cat:1.4)", tok)])
    # sd1 with skip 2 applies the final norm, SDXL does not: compare bigG's part, and the layout
    assert torch.allclose(sdxl[..., 32:], g_only.context, atol=1e-6)
    assert l_only.context.shape[-1] == 32 and g_only.pooled.shape == (1, 40)


def test_readouts_and_errors(tok, clip_l, big_g):
    assert READOUTS["sd2"] == (Readout(2, final_norm=True, pad="zero"),)
    with pytest.raises(ValueError, match="unknown family 'sd3'; valid choices: sd1, sd2, sdxl, sdxl_refiner"):
        encode_prompt("sd3", [clip_l], tok, "a")
    with pytest.raises(ValueError, match="takes 2 text encoder"):
        encode_prompt("sdxl", [big_g], tok, "a")
    with pytest.raises(ValueError, match="text projection"):
        encode_prompt("sdxl", [clip_l, clip_l], tok, "a")
    with pytest.raises(ValueError, match="clip_skip must be between 1"):
        encode_prompt("sd1", [clip_l], tok, "a", clip_skip=4)
    with pytest.raises(ValueError, match="at least one prompt"):
        encode_prompt("sd1", [clip_l], tok, [])
    with pytest.raises(ValueError, match="negative prompts"):
        encode_prompt("sd1", [clip_l], tok, ["a", "b"], ["c"])
    with pytest.raises(ValueError, match="unknown emphasis .*; valid choices: "):
        encode_prompt("sd1", [clip_l], tok, "a", emphasis="loud")


def test_emphasis_none_reads_brackets_as_text(tok, clip_l):
    with torch.no_grad():
        plain = encode_prompt("sd1", [clip_l], tok, "(cat) BREAK dog", emphasis="none").context
        ignored = encode_prompt("sd1", [clip_l], tok, "(cat) BREAK dog", emphasis="ignore").context
    assert plain.shape == (1, 77, 32) and ignored.shape == (1, 2 * 77, 32)
    ids = padded(tok, tok.encode("(cat) BREAK dog"), EOS_ID)
    assert torch.allclose(plain[0], encode_ids(clip_l, ids, 1, True), atol=1e-6)
    assert torch.allclose(ignored[0, :77], encode_ids(clip_l, padded(tok, [CAT], EOS_ID), 1, True), atol=1e-6)


# --- SDXL vector conditioning ---------------------------------------------------------------------


def test_sdxl_vector_cond_layout():
    pooled = torch.randn(2, 1280)
    y = sdxl_vector_cond(pooled, (1024, 768), (16, 0), (1024, 1024))
    assert y.shape == (2, 2816) and torch.equal(y[:, :1280], pooled)
    fourier = timestep_embedding(torch.tensor([1024.0, 768, 16, 0, 1024, 1024]), 256).reshape(-1)
    assert torch.equal(y[0, 1280:], fourier) and torch.equal(y[1, 1280:], fourier)
    y = sdxl_refiner_vector_cond(pooled, (1024, 1024), (0, 0), 6.0)
    assert y.shape == (2, 2560)
    assert torch.equal(y[0, -256:], timestep_embedding(torch.tensor([6.0]), 256)[0])
    with pytest.raises(ValueError, match="pooled must be"):
        sdxl_vector_cond(pooled[0], (1, 1), (0, 0), (1, 1))


def test_emphasis_of_a_zero_mean_chunk_is_finite():
    from unfog.conditioning import apply_emphasis

    z = torch.tensor([[[1.0, -1.0], [2.0, -2.0]]])  # mean exactly 0
    out = apply_emphasis(z, torch.ones(1, 2), "original")
    assert torch.equal(out, z)
    out = apply_emphasis(z, torch.tensor([[1.0, 1.5]]), "original")
    assert torch.isfinite(out).all()


# --- CLIP skip counts from the trained depth (diffusers' 23-layer SD 2.x text_encoder) ------------


def test_truncated_encoder_reads_the_same_layer_as_the_full_one(tok):
    """A 3-layer "ViT-H" and the same network without its last layer (``trained_layers=3``),
    as diffusers' SD 2.x folders store it: the default SD 2 readout (penultimate) and CLIP skip 3
    give the same context from both; CLIP skip 1 needs the missing layer and says so."""
    full_cfg = replace(TINY_CLIP, layers=3, activation="gelu")
    full = CLIPTextEncoder(full_cfg).eval()
    with torch.no_grad():
        for p in full.parameters():
            p.normal_(0, 0.3, generator=torch.Generator().manual_seed(p.numel()))
    short = CLIPTextEncoder(replace(full_cfg, layers=2, trained_layers=3)).eval()
    missing = short.load_state_dict(full.state_dict(), strict=False)
    assert not missing.missing_keys and all(k.startswith("encoder.layers.2.") for k in missing.unexpected_keys)
    prompts, negative = ["a (cat:1.2) on a mat", "a dog"], "blurry"
    with torch.no_grad():
        for clip_skip in (None, 2, 3):
            a = encode_prompt("sd2", [full], tok, prompts, negative, clip_skip=clip_skip)
            b = encode_prompt("sd2", [short], tok, prompts, negative, clip_skip=clip_skip)
            assert torch.equal(a.context, b.context) and torch.equal(a.negative_context, b.negative_context)
        # the default reads the short module's last layer (2 of 3), not its own penultimate one
        states = short(torch.tensor([[tok.bos_id, tok.eos_id] + [0] * 75])).hidden_states
        ctx = encode_prompt("sd2", [short], tok, "").context
        assert torch.equal(ctx, short.final_layer_norm(states[2]))
    with pytest.raises(ValueError, match="keeps only its first 2 .* use clip_skip >= 2"):
        encode_prompt("sd2", [short], tok, "a", clip_skip=1)
    with pytest.raises(ValueError, match=r"clip_skip must be between 1 \(last layer\) and 3"):
        encode_prompt("sd2", [short], tok, "a", clip_skip=4)


def test_trained_depth_of_loaded_text_encoders():
    from unfog.checkpoint.detect import _fit_text_encoder, with_trained_depth
    from unfog.checkpoint.diffusers_folder import clip_config_from_transformers
    from unfog.models.clip_text import CLIP_L, OPENCLIP_H

    sd2_folder = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 23, "num_attention_heads": 16,
                  "hidden_act": "gelu", "projection_dim": 512, "vocab_size": 49408}
    cfg = with_trained_depth(clip_config_from_transformers(sd2_folder, has_projection=False))
    assert (cfg.layers, cfg.trained_layers, cfg.depth) == (23, 24, 24)
    assert with_trained_depth(OPENCLIP_H) == OPENCLIP_H and with_trained_depth(CLIP_L) == CLIP_L
    wd = _fit_text_encoder(OPENCLIP_H, [f"transformer.resblocks.{i}.ln_1.weight" for i in range(23)])
    assert (wd.layers, wd.depth, wd.projection_dim) == (23, 24, None)
    assert _fit_text_encoder(OPENCLIP_H, [f"transformer.resblocks.{i}.ln_1.weight" for i in range(24)]).trained_layers is None
    with pytest.raises(ValueError, match="trained_layers"):
        replace(TINY_CLIP, layers=3, trained_layers=2)


def test_training_through_a_prompt_without_emphasis_gets_the_plain_encoders_gradient():
    """A text encoder trained through encode_prompt (the trainers do) gets the gradient of its own
    last state: the "original" emphasis rescale, the identity without emphasis, adds nothing. A new
    encoder's final LayerNorm makes every state zero-mean, where the rescale's gradient (rounding
    over the mean) was huge and turned training NaN."""
    te = tiny_encoder(0)
    tok = CLIPTokenizer.from_bpe_file()
    prompts = ["a red circle above a blue square", "a cat"]
    ids = torch.tensor([[BOS_ID, *tok.encode(p), EOS_ID] + [EOS_ID] * (75 - len(tok.encode(p))) for p in prompts])
    plain = te(ids).last_hidden_state
    (expected,) = torch.autograd.grad(plain.square().sum(), te.embeddings.token_embedding.weight)
    context = encode_prompt("sd1", [te], tok, prompts).context
    (got,) = torch.autograd.grad(context.square().sum(), te.embeddings.token_embedding.weight)
    assert torch.equal(context, plain)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)
