"""Token ids of our ``CLIPTokenizer`` are those of transformers' ``CLIPTokenizer`` on a corpus of
~1,400 varied prompts, with either padding convention.

The oracle is built the way diffusers' ``tokenizer`` folders are: ``vocab.json`` + ``merges.txt``,
written from OpenAI's BPE file by CLIP's construction, independently of our code
(``write_tokenizer_folder`` in tests/model_checks.py).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import transformers

from unfog.models.tokenizer import BOS_ID, EOS_ID, CLIPTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: model_checks
sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/parity: prompt_corpus
from model_checks import write_tokenizer_folder  # noqa: E402
from prompt_corpus import prompt_corpus  # noqa: E402

@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return write_tokenizer_folder(tmp_path_factory.mktemp("clip_tokenizer"))


@pytest.fixture(scope="module")
def ours() -> CLIPTokenizer:
    return CLIPTokenizer.from_bpe_file()


@pytest.fixture(scope="module")
def oracle(folder) -> transformers.CLIPTokenizer:
    return transformers.CLIPTokenizer.from_pretrained(folder)  # pads with <|endoftext|>, as SD 1.x


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    prompts = prompt_corpus()
    assert len(prompts) >= 1000
    return prompts


def test_folder_and_bpe_file_give_the_same_tokenizer(ours, folder):
    other = CLIPTokenizer.from_folder(folder)
    assert other.vocab == ours.vocab and other.ranks == ours.ranks
    assert len(ours.vocab) == 49408 and (ours.bos_id, ours.eos_id) == (BOS_ID, EOS_ID)


def test_unpadded_ids_match(ours, oracle, corpus):
    """Full, untruncated encodings: differences past position 77 would show here."""
    expected = oracle(corpus, add_special_tokens=False).input_ids
    mismatches = [(p, e, ours.encode(p)) for p, e in zip(corpus, expected) if ours.encode(p) != e]
    assert not mismatches, f"{len(mismatches)} prompts differ, e.g. {mismatches[:3]}"


def test_eos_padding_matches(ours, oracle, corpus):
    expected = oracle(corpus, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    got = ours(corpus, pad="eos")
    assert torch.equal(got.input_ids, expected.input_ids)
    assert torch.equal(got.attention_mask, expected.attention_mask)
    assert torch.equal(got.eos_index, expected.attention_mask.sum(-1) - 1)
    assert (got.input_ids[torch.arange(len(corpus)), got.eos_index] == EOS_ID).all()
    # What the encoder pools, unless the prompt itself wrote "<|endoftext|>" (pooled there).
    literal = torch.tensor(["<|endoftext|>" in p for p in corpus])
    assert torch.equal(got.input_ids.argmax(-1) == got.eos_index, ~literal)
    assert (got.eos_index == 76).sum() >= 80  # the long prompts were truncated


def test_zero_padding_matches(ours, oracle, folder, corpus):
    """OpenCLIP's convention (SD 2.x, SDXL encoder 2): the same ids, zeros after the EOS."""
    expected = oracle(corpus, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    got = ours(corpus, pad="zero")
    assert torch.equal(got.input_ids, expected.input_ids * expected.attention_mask)
    assert torch.equal(got.attention_mask, expected.attention_mask)
    # diffusers' SD 2 / SDXL tokenizer_2 folders get there with pad_token="!" (id 0) ...
    bang = transformers.CLIPTokenizer.from_pretrained(folder, pad_token="!")
    plain = [p for p in corpus if "!" not in p]
    expected = bang(plain, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    assert torch.equal(ours(plain, pad="zero").input_ids, expected.input_ids)
    # ... which makes every "!" in a prompt that special token: 0, where OpenCLIP and we keep "!".
    assert bang("wow!!!").input_ids == [BOS_ID, 2781, 0, 0, 0, EOS_ID]
    assert ours.encode("wow!!!") == [2781, 995]
