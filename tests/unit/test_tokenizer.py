"""Contracts of the CLIP tokenizer: the known ids of the real vocabulary, both padding
conventions, truncation, special tokens, cleanup, and argument checks."""

from __future__ import annotations

import pytest
import torch

from unfog.models.tokenizer import BOS_ID, EOS_ID, CLIPTokenizer, byte_alphabet, clean


@pytest.fixture(scope="module")
def tok() -> CLIPTokenizer:
    return CLIPTokenizer.from_bpe_file()


def test_known_ids_of_the_real_vocabulary(tok):
    # The ids every SD user has seen: "a photo of a cat".
    assert tok.encode("a photo of a cat") == [320, 1125, 539, 320, 2368]
    assert tok.encode("A  PHOTO\tof a\ncat") == [320, 1125, 539, 320, 2368]
    assert len(tok.vocab) == 49408
    assert tok.vocab["<|startoftext|>"] == BOS_ID and tok.vocab["<|endoftext|>"] == EOS_ID
    assert tok.vocab["!"] == 0 and tok.vocab["!</w>"] == 256


@pytest.mark.parametrize("pad, pad_id", [("eos", EOS_ID), ("zero", 0)])
def test_padding_conventions(tok, pad, pad_id):
    out = tok(["a cat", ""], pad=pad)
    assert out.input_ids.shape == out.attention_mask.shape == (2, 77)
    assert out.input_ids.dtype == torch.long
    assert out.input_ids[0, :4].tolist() == [BOS_ID, 320, 2368, EOS_ID]
    assert out.input_ids[1, :2].tolist() == [BOS_ID, EOS_ID]
    assert (out.input_ids[0, 4:] == pad_id).all() and (out.input_ids[1, 2:] == pad_id).all()
    assert out.attention_mask.sum(-1).tolist() == [4, 2]
    assert out.eos_index.tolist() == [3, 1]


def test_truncation_keeps_bos_and_ends_with_eos(tok):
    out = tok("cat " * 200)
    assert out.input_ids[0].tolist() == [BOS_ID] + [2368] * 75 + [EOS_ID]
    assert out.eos_index.tolist() == [76] and out.attention_mask.sum().item() == 77
    short = tok(["cat dog bird fish"], max_length=4)
    assert short.input_ids.tolist() == [[BOS_ID, 2368, 1929, EOS_ID]]


def test_special_tokens_in_text(tok):
    assert tok.encode("<|endoftext|>") == [EOS_ID]
    assert tok.encode("a<|startoftext|>b") == [320, BOS_ID, 321]
    # another case is ordinary text after lowercasing: "<|", "endoftext", "|>"
    assert tok.encode("<|EndOfText|>") == [27, 347, 40786, 4160, 91, 285]


def test_cleanup_mirrors_transformers(tok):
    assert clean("ΟΔΟΣ") == "οδοσ"  # per-character lowercasing: no final sigma
    assert clean("e\u0301") == "\u00e9"  # NFC
    assert clean("a\u3000\u00a0 b") == "a b"
    assert clean("a\x1cb") == "a\x1cb"  # an ASCII separator, not Unicode whitespace
    assert tok.encode("&amp;") == [261, 6259, 282]  # no HTML unescaping: "&", "amp", ";"


def test_byte_alphabet_is_a_bijection_onto_printable_characters():
    alphabet = byte_alphabet()
    assert len(set(alphabet)) == 256
    assert all(c.isprintable() and not c.isspace() for c in alphabet)
    assert alphabet[ord("a")] == "a" and alphabet[ord(" ")] == "Ġ"


def test_argument_checks(tok):
    with pytest.raises(ValueError, match="unknown pad 'left'; valid choices: eos, zero"):
        tok("a", pad="left")
    with pytest.raises(ValueError, match="max_length must be >= 2"):
        tok("a", max_length=1)
