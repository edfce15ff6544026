"""Textual inversion against diffusers' ``load_textual_inversion`` on the same tiny random CLIP
encoders (those of ``test_conditioning_diffusers.py``; fp32, max abs error <= 1e-5).

diffusers adds the embedding's name (and "name_1", ... for more vectors) to the tokenizer as new
tokens, grows the encoder's token table by those rows and rewrites "name" in a prompt as
"name name_1 ...": a mechanism that shares nothing with ours (A1111's: the name's CLIP ids are
matched and its rows written over placeholder positions). The files are written here in their
published layouts: a random A1111 ``.pt`` (SD 1.x) and a random SDXL ``clip_l`` / ``clip_g``
``.safetensors``, read by our ``read_embedding`` and by diffusers from the same path / tensors.

Pooled outputs: with the legacy ``eos_token_id=2`` configs transformers pools at the largest id,
which after diffusers adds tokens is the embedding's, not the end of text (transformers' own
comment on it); the SDXL bigG twin here uses ``eos_token_id=49407`` (first end-of-text) so
pooling reads the end of text, as A1111 and we do.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import transformers
from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
from safetensors.torch import save_file

from unfog.checkpoint.embeddings import read_embedding
from unfog.conditioning import encode_prompt
from unfog.models.tokenizer import CLIPTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: model_checks
sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/parity: oracles
from model_checks import write_tokenizer_folder  # noqa: E402
from oracles import clip_pair, with_text_model_alias  # noqa: E402

TOL = 1e-5
NAME = "mystyle"
PROMPTS = [f"a photo of a {NAME} cat, highly detailed", f"{NAME}", "a plain prompt without it"]
NEGATIVE = f"blurry, {NAME}, low quality"

pytestmark = pytest.mark.usefixtures("single_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return write_tokenizer_folder(tmp_path_factory.mktemp("clip_tokenizer"))


@pytest.fixture(scope="module")
def ours_tokenizer() -> CLIPTokenizer:
    return CLIPTokenizer.from_bpe_file()


def first_eos_pooling(model):
    """Pool at the first end-of-text token (the non-legacy transformers path)."""
    for module in model.modules():
        if "eos_token_id" in vars(module):
            module.eos_token_id = 49407
    return model


def assert_close(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().max().item() <= TOL


def test_sd1_a1111_pt(tmp_path, folder, ours_tokenizer):
    ref, ours = clip_pair(32, 2, "quick_gelu", None, seed=3)
    vectors = torch.randn(3, 32, generator=torch.Generator().manual_seed(1))
    path = tmp_path / f"{NAME}.pt"
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vectors}, "name": NAME, "step": 10}, path)
    pipe = StableDiffusionPipeline(
        vae=None, text_encoder=with_text_model_alias(ref), unet=None, safety_checker=None, feature_extractor=None,
        tokenizer=transformers.CLIPTokenizer.from_pretrained(folder, model_max_length=77),
        scheduler=EulerDiscreteScheduler(steps_offset=1), requires_safety_checker=False)
    pipe.load_textual_inversion(str(path), token=NAME)
    embedding = read_embedding(path)
    with torch.no_grad():
        theirs, theirs_neg = pipe.encode_prompt(PROMPTS, "cpu", 1, True, [NEGATIVE] * len(PROMPTS))
        mine = encode_prompt("sd1", [ours], ours_tokenizer, PROMPTS, NEGATIVE, embeddings=[embedding])
        without = encode_prompt("sd1", [ours], ours_tokenizer, PROMPTS, NEGATIVE)
    assert_close(mine.context, theirs)
    assert_close(mine.negative_context, theirs_neg)
    assert (mine.context[0] - without.context[0]).abs().max() > 1e-3  # the embedding did change something


def test_sdxl_clip_l_clip_g(tmp_path, folder, ours_tokenizer):
    clip_l, ours_l = clip_pair(32, 2, "quick_gelu", None, seed=0)
    big_g, ours_g = clip_pair(48, 2, "gelu", 40, seed=1)
    g = torch.Generator().manual_seed(2)
    tensors = {"clip_l": torch.randn(2, 32, generator=g), "clip_g": torch.randn(2, 48, generator=g)}
    path = tmp_path / f"{NAME}.safetensors"
    save_file(tensors, str(path))
    pipe = StableDiffusionXLPipeline(
        vae=None, text_encoder=clip_l, text_encoder_2=first_eos_pooling(big_g), unet=None,
        tokenizer=transformers.CLIPTokenizer.from_pretrained(folder, model_max_length=77),
        tokenizer_2=transformers.CLIPTokenizer.from_pretrained(folder, model_max_length=77, pad_token="!"),
        scheduler=EulerDiscreteScheduler(steps_offset=1), add_watermarker=False)
    pipe.load_textual_inversion(tensors["clip_l"], token=NAME, text_encoder=pipe.text_encoder,
                                tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(tensors["clip_g"], token=NAME, text_encoder=pipe.text_encoder_2,
                                tokenizer=pipe.tokenizer_2)
    embedding = read_embedding(path)
    with torch.no_grad():
        ctx, neg_ctx, pooled, neg_pooled = pipe.encode_prompt(PROMPTS, negative_prompt=[NEGATIVE] * len(PROMPTS),
                                                              device="cpu")
        mine = encode_prompt("sdxl", [ours_l, ours_g], ours_tokenizer, PROMPTS, NEGATIVE, embeddings=[embedding])
    for ours, theirs in zip(mine, (ctx, neg_ctx, pooled, neg_pooled)):
        assert_close(ours, theirs)


def test_embedding_moved_whole_to_the_next_chunk_encodes_as_there(tmp_path, folder, ours_tokenizer):
    """74 tokens, then a 2-vector embedding: it starts chunk 2 (A1111's rule), whose states are
    then those diffusers gives for the prompt of the name alone."""
    ref, ours = clip_pair(32, 2, "quick_gelu", None, seed=4)
    vectors = torch.randn(2, 32, generator=torch.Generator().manual_seed(5))
    path = tmp_path / f"{NAME}.safetensors"
    save_file({"emb_params": vectors}, str(path))
    pipe = StableDiffusionPipeline(
        vae=None, text_encoder=with_text_model_alias(ref), unet=None, safety_checker=None, feature_extractor=None,
        tokenizer=transformers.CLIPTokenizer.from_pretrained(folder, model_max_length=77),
        scheduler=EulerDiscreteScheduler(steps_offset=1), requires_safety_checker=False)
    pipe.load_textual_inversion({NAME: vectors}, token=NAME)
    head = " ".join(["cat"] * 74)
    with torch.no_grad():
        mine = encode_prompt("sd1", [ours], ours_tokenizer, f"{head} {NAME}", embeddings=[read_embedding(path)])
        first, _ = pipe.encode_prompt(head, "cpu", 1, False)
        second, _ = pipe.encode_prompt(NAME, "cpu", 1, False)
    assert mine.context.shape == (1, 154, 32)
    assert_close(mine.context[:, :77], first)
    assert_close(mine.context[:, 77:], second)
