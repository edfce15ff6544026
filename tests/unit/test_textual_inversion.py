"""Applying textual-inversion embeddings: the chunking rule (A1111's ``tokenize_line``), name
matching for both tokenizers, the encoder's ``inputs_embeds`` path, and bad inputs."""

from __future__ import annotations

import pytest
import torch

from unfog.checkpoint.embeddings import Embedding
from unfog.conditioning import encode_prompt, used_embeddings
from unfog.models.clip_text import TINY_CLIP, CLIPTextEncoder
from unfog.models.tokenizer import CLIPTokenizer, SubVocabTokenizer
from unfog.prompt_parser import Word, tokenize_prompt


@pytest.fixture(scope="module")
def tok() -> CLIPTokenizer:
    return CLIPTokenizer.from_bpe_file()


def words(tok, **lengths) -> dict:
    return {tuple(tok.encode_clip(name)): Word(name, n) for name, n in lengths.items()}


def test_multi_vector_embedding_never_splits(tok):
    chunks = tokenize_prompt(" ".join(["cat"] * 74) + " mystyle dog", tok, words=words(tok, mystyle=2))
    assert [len(c.ids) for c in chunks] == [74, 3]
    assert chunks[0].fixes == () and chunks[1].fixes == ((0, "mystyle"),)
    assert chunks[1].ids[:2] == [0, 0] and chunks[1].ids[2] == tok.encode("dog")[0]
    fits = tokenize_prompt(" ".join(["cat"] * 73) + " mystyle", tok, words=words(tok, mystyle=2))
    assert len(fits) == 1 and fits[0].fixes == ((73, "mystyle"),)


def test_emphasis_weights_the_vectors_and_longest_name_wins(tok):
    [chunk] = tokenize_prompt("a (my style:1.3) my", tok, words=words(tok, **{"my style": 3, "my": 1}))
    assert chunk.fixes == ((1, "my style"), (4, "my"))
    assert chunk.weights[1:4] == [1.3] * 3 and chunk.weights[4] == 1.0


def test_comma_backtrack_moves_embeddings_along(tok):
    head = " ".join(["cat"] * 60) + ","
    chunks = tokenize_prompt(head + " mystyle " + " ".join(["dog"] * 20), tok, words=words(tok, mystyle=2))
    assert len(chunks[0].ids) == 61 and chunks[0].fixes == ()
    assert chunks[1].fixes == ((0, "mystyle"),) and chunks[1].ids[:2] == [0, 0]


def test_sub_vocab_tokenizer_matches_on_clip_ids(tok):
    small = SubVocabTokenizer.from_texts(tok, ["a red circle"])
    assert 0 in small.encode("a zorblax circle")  # unknown pieces are id 0
    [chunk] = tokenize_prompt("a zorblax circle", small, words=words(small, zorblax=2))
    assert chunk.fixes == ((1, "zorblax"),) and chunk.ids == small.encode("a") + [0, 0] + small.encode("circle")


def test_inputs_embeds_path_equals_the_lookup():
    torch.manual_seed(0)
    enc = CLIPTextEncoder(TINY_CLIP).eval()
    ids = torch.randint(0, 49406, (2, 10))
    with torch.no_grad():
        plain = enc(ids)
        rows = enc(ids, inputs_embeds=enc.embeddings.token_embedding(ids))
    for a, b in zip(plain.hidden_states, rows.hidden_states):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="inputs_embeds must be"):
        enc(ids, inputs_embeds=torch.zeros(2, 9, TINY_CLIP.width))


def test_rows_go_after_bos_and_gradients_reach_them(tok):
    torch.manual_seed(0)
    enc = CLIPTextEncoder(TINY_CLIP).eval()
    vectors = torch.randn(2, TINY_CLIP.width, requires_grad=True)
    e = Embedding("mystyle", (vectors,))
    c = encode_prompt("sd1", [enc], tok, "mystyle cat", embeddings=[e])
    c.context.sum().backward()
    assert vectors.grad is not None and vectors.grad.abs().sum() > 0
    # the same as writing the rows by hand at positions 1, 2 of [BOS, 0, 0, cat, EOS, ...]
    ids = torch.full((1, 77), tok.eos_id)
    ids[0, 0], ids[0, 1:3], ids[0, 3] = tok.bos_id, 0, tok.encode("cat")[0]
    with torch.no_grad():
        rows = enc.embeddings.token_embedding(ids)
        rows[0, 1:3] = vectors
        expected = enc.final_layer_norm(enc(ids, inputs_embeds=rows).hidden_states[-1])
    assert torch.allclose(c.context.detach(), expected, atol=1e-6)


def test_bad_embeddings(tok):
    enc = CLIPTextEncoder(TINY_CLIP)
    wide = Embedding("wide", (torch.zeros(1, 768),))
    with pytest.raises(ValueError, match="'wide' is for SD 1.x \\(768\\); this model's text encoders are 32 wide"):
        encode_prompt("sd1", [enc], tok, "wide", embeddings=[wide])
    twins = [Embedding("Style", (torch.zeros(1, 32),)), Embedding("style", (torch.zeros(1, 32),))]
    with pytest.raises(ValueError, match="'Style' and 'style' are the same word"):
        encode_prompt("sd1", [enc], tok, "style", embeddings=twins)
    huge = Embedding("huge", (torch.zeros(76, 32),))
    with pytest.raises(ValueError, match="'huge' has 76 vectors; a prompt chunk holds at most 75"):
        encode_prompt("sd1", [enc], tok, "huge", embeddings=[huge])


def test_used_embeddings_in_order_of_use(tok):
    a, b, c = (Embedding(n, (torch.zeros(1, 32),)) for n in ("alpha", "beta", "gamma"))
    assert [e.name for e in used_embeddings(["beta and alpha", "beta"], tok, [a, b, c])] == ["beta", "alpha"]


def test_pipeline_second_file_of_one_name_wins_and_says_so(tmp_path):
    """Two files whose names the tokenizer reads as one word: the later one is used, and the
    message names both files; a file of another width is skipped naming its family."""
    import unfog
    from unfog.embedded import DEFAULT_TEXT_MODEL, default_model_path

    pipe = unfog.load(default_model_path(DEFAULT_TEXT_MODEL))
    width = pipe.text_encoder.config.width
    g = torch.Generator().manual_seed(0)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    torch.save({"string_to_param": {"*": torch.randn(1, width, generator=g)}}, tmp_path / "a" / "Sks.pt")
    torch.save({"string_to_param": {"*": torch.randn(2, width, generator=g)}}, tmp_path / "b" / "sks.pt")
    torch.save({"string_to_param": {"*": torch.randn(1, 768, generator=g)}}, tmp_path / "wide.pt")
    said = []
    pipe.load_embedding(tmp_path / "a" / "Sks.pt", warn=said.append)
    pipe.load_embedding(tmp_path / "b" / "sks.pt", warn=said.append)
    assert len(said) == 1 and "embedding sks" in said[0] and "replaces Sks" in said[0] and "later one wins" in said[0]
    assert [(e.name, e.vectors[0].shape[0]) for e in pipe.embeddings] == [("sks", 2)]
    assert pipe.load_embedding(tmp_path / "wide.pt", warn=said.append) is None
    assert "skipped embedding wide" in said[-1] and "SD 1.x" in said[-1]
    assert [e.name for e in pipe.embeddings] == ["sks"]
