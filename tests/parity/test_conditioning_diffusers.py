"""``unfog.conditioning`` against diffusers' pipelines on the same tiny random CLIP encoders.

* ``encode_prompt`` of ``StableDiffusionPipeline`` (SD 1.x, with the clip_skip mapping),
  ``StableDiffusionXLPipeline`` (context and pooled) and ``StableDiffusionXLImg2ImgPipeline`` with
  bigG alone (the refiner), for prompts of at most 75 tokens without emphasis syntax: diffusers
  truncates at 77 tokens and knows no emphasis, so beyond that there is nothing to compare.
* SDXL's vector conditioning: the ids of ``_get_add_time_ids`` (base, and refiner with aesthetic
  scores) and the vector that enters the U-Net's ``add_embedding``, captured by a hook on a tiny
  diffusers ``UNet2DConditionModel`` with ``addition_embed_type="text_time"``.

The encoders are transformers ``CLIPTextModel`` / ``CLIPTextModelWithProjection`` with the real
vocabulary and small widths, loaded into ours with ``convert_transformers_clip_text``
(``clip_pair`` in oracles.py); the tokenizers are transformers' ``CLIPTokenizer`` built from
OpenAI's BPE file (as in ``test_clip_tokenizer_transformers.py``), the second one padding with "!"
(id 0) as diffusers' SDXL ``tokenizer_2`` folders do.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import transformers
from diffusers import (
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)

from unfog.conditioning import encode_prompt, sdxl_refiner_vector_cond, sdxl_vector_cond
from unfog.models.tokenizer import CLIPTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: model_checks
sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/parity: oracles
from model_checks import write_tokenizer_folder  # noqa: E402
from oracles import clip_pair, with_text_model_alias  # noqa: E402

PROJ = 40
TOL = 1e-5
PROMPTS = [
    "a photo of an astronaut riding a horse on mars, highly detailed, 8k",
    "",
    "portrait of a woman: oil on canvas; dramatic lighting, isn't it? 1990s style & more",
    " ".join(["cat"] * 75),  # exactly 75 tokens: BOS + 75 + EOS = 77, nothing truncated
]
NEGATIVE = "blurry, low quality, watermark"


pytestmark = pytest.mark.usefixtures("single_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return write_tokenizer_folder(tmp_path_factory.mktemp("clip_tokenizer"))


@pytest.fixture(scope="module")
def hf_tokenizer(folder):
    return transformers.CLIPTokenizer.from_pretrained(folder, model_max_length=77)  # pads with EOS


@pytest.fixture(scope="module")
def hf_tokenizer_2(folder):
    return transformers.CLIPTokenizer.from_pretrained(folder, model_max_length=77, pad_token="!")  # id 0


@pytest.fixture(scope="module")
def ours_tokenizer() -> CLIPTokenizer:
    return CLIPTokenizer.from_bpe_file()


@pytest.fixture(scope="module")
def clip_l():
    return clip_pair(32, 2, "quick_gelu", None, seed=0)


@pytest.fixture(scope="module")
def big_g():
    return clip_pair(48, 2, "gelu", PROJ, seed=1)


def tiny_unet(n_ids: int) -> UNet2DConditionModel:
    """A small SDXL-like U-Net: ``text_time`` conditioning, 256 Fourier features per id."""
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        cross_attention_dim=16,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=PROJ + n_ids * 256,
    ).eval()


def sd1_pipeline(clip_l, hf_tokenizer) -> StableDiffusionPipeline:
    return StableDiffusionPipeline(
        vae=None,
        text_encoder=with_text_model_alias(clip_l[0]),
        tokenizer=hf_tokenizer,
        unet=None,
        scheduler=EulerDiscreteScheduler(steps_offset=1),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def assert_close(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().max().item() <= TOL


# --- SD 1.x ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("diffusers_skip, our_skip", [(None, 1), (1, 2), (2, 3)])
def test_sd1_encode_prompt(clip_l, hf_tokenizer, ours_tokenizer, diffusers_skip, our_skip):
    pipe = sd1_pipeline(clip_l, hf_tokenizer)
    negatives = [NEGATIVE] * len(PROMPTS)
    with torch.no_grad():
        theirs, theirs_neg = pipe.encode_prompt(PROMPTS, "cpu", 1, True, negatives, clip_skip=diffusers_skip)
        ours = encode_prompt("sd1", [clip_l[1]], ours_tokenizer, PROMPTS, negatives, clip_skip=our_skip)
    assert_close(ours.context, theirs)
    assert ours.pooled is None
    if diffusers_skip is None:  # diffusers encodes the negative prompt without clip_skip
        assert_close(ours.negative_context, theirs_neg)


def test_sd1_brackets_as_text(clip_l, hf_tokenizer, ours_tokenizer):
    """diffusers reads brackets as text: so do we with emphasis="none", or with escapes."""
    literal = "a (red) car [photo], \\ 50mm"
    escaped = "a \\(red\\) car \\[photo\\], \\\\ 50mm"
    pipe = sd1_pipeline(clip_l, hf_tokenizer)
    with torch.no_grad():
        theirs, _ = pipe.encode_prompt(literal, "cpu", 1, False)
        plain = encode_prompt("sd1", [clip_l[1]], ours_tokenizer, literal, emphasis="none")
        unescaped = encode_prompt("sd1", [clip_l[1]], ours_tokenizer, escaped)
    assert_close(plain.context, theirs)
    assert_close(unescaped.context, theirs)


# --- SDXL ------------------------------------------------------------------------------------------


def sdxl_pipeline(clip_l, big_g, hf_tokenizer, hf_tokenizer_2, unet=None) -> StableDiffusionXLPipeline:
    return StableDiffusionXLPipeline(
        vae=None,
        text_encoder=clip_l[0],
        text_encoder_2=big_g[0],
        tokenizer=hf_tokenizer,
        tokenizer_2=hf_tokenizer_2,
        unet=unet,
        scheduler=EulerDiscreteScheduler(steps_offset=1),
        add_watermarker=False,
    )


@pytest.mark.parametrize("diffusers_skip, our_skip", [(None, None), (None, 2), (1, 3)])
def test_sdxl_encode_prompt(
    clip_l, big_g, hf_tokenizer, hf_tokenizer_2, ours_tokenizer, diffusers_skip, our_skip
):
    pipe = sdxl_pipeline(clip_l, big_g, hf_tokenizer, hf_tokenizer_2)
    negatives = [NEGATIVE] * len(PROMPTS)
    with torch.no_grad():
        ctx, neg_ctx, pooled, neg_pooled = pipe.encode_prompt(
            PROMPTS, negative_prompt=negatives, device="cpu", clip_skip=diffusers_skip
        )
        encoders = [clip_l[1], big_g[1]]
        ours = encode_prompt("sdxl", encoders, ours_tokenizer, PROMPTS, negatives, clip_skip=our_skip)
    assert ours.context.shape == (len(PROMPTS), 77, 32 + 48)
    assert_close(ours.context, ctx)
    assert_close(ours.pooled, pooled)
    assert_close(ours.negative_pooled, neg_pooled)
    if diffusers_skip is None:  # diffusers encodes the negative prompt without clip_skip
        assert_close(ours.negative_context, neg_ctx)


def test_sdxl_empty_negative_is_zeros_as_force_zeros_for_empty_prompt(
    clip_l, big_g, hf_tokenizer, hf_tokenizer_2, ours_tokenizer
):
    pipe = sdxl_pipeline(clip_l, big_g, hf_tokenizer, hf_tokenizer_2)
    with torch.no_grad():
        theirs = pipe.encode_prompt(PROMPTS[0], device="cpu")  # no negative prompt: zeros
        ours = encode_prompt("sdxl", [clip_l[1], big_g[1]], ours_tokenizer, PROMPTS[0])
    for mine, ref in zip((ours.context, ours.negative_context, ours.pooled, ours.negative_pooled), theirs):
        assert_close(mine, ref)
    assert (ours.negative_context == 0).all() and (ours.negative_pooled == 0).all()


def refiner_pipeline(big_g, hf_tokenizer_2, unet=None, **options) -> StableDiffusionXLImg2ImgPipeline:
    return StableDiffusionXLImg2ImgPipeline(
        vae=None,
        text_encoder=None,
        text_encoder_2=big_g[0],
        tokenizer=None,
        tokenizer_2=hf_tokenizer_2,
        unet=unet,
        scheduler=EulerDiscreteScheduler(steps_offset=1),
        requires_aesthetics_score=True,
        add_watermarker=False,
        **options,
    )


def test_sdxl_refiner_encode_prompt(big_g, hf_tokenizer_2, ours_tokenizer):
    pipe = refiner_pipeline(big_g, hf_tokenizer_2, force_zeros_for_empty_prompt=False)
    negatives = [NEGATIVE] * len(PROMPTS)
    with torch.no_grad():
        theirs = pipe.encode_prompt(PROMPTS, negative_prompt=negatives, device="cpu")
        ours = encode_prompt("sdxl_refiner", [big_g[1]], ours_tokenizer, PROMPTS, negatives)
    assert ours.context.shape == (len(PROMPTS), 77, 48)
    for mine, ref in zip(ours, theirs):
        assert_close(mine, ref)


# --- SDXL vector conditioning ---------------------------------------------------------------------


def add_embedding_input(unet: UNet2DConditionModel, text_embeds: torch.Tensor, time_ids: torch.Tensor):
    """The vector diffusers' U-Net feeds its ``add_embedding`` MLP for these added conditions."""
    captured = []
    handle = unet.add_embedding.register_forward_pre_hook(lambda module, args: captured.append(args[0]))
    b = text_embeds.shape[0]
    try:
        with torch.no_grad():
            unet(
                torch.zeros(b, 4, 8, 8),
                10,
                encoder_hidden_states=torch.zeros(b, 5, 16),
                added_cond_kwargs={"text_embeds": text_embeds, "time_ids": time_ids},
            )
    finally:
        handle.remove()
    return captured[0]


@pytest.mark.parametrize(
    "original, crop, target", [((1024, 1024), (0, 0), (1024, 1024)), ((768, 1344), (64, 32), (1024, 896))]
)
def test_sdxl_base_vector_cond(clip_l, big_g, hf_tokenizer, hf_tokenizer_2, original, crop, target):
    unet = tiny_unet(6)
    pipe = sdxl_pipeline(clip_l, big_g, hf_tokenizer, hf_tokenizer_2, unet=unet)
    time_ids = pipe._get_add_time_ids(original, crop, target, torch.float32, text_encoder_projection_dim=PROJ)
    assert time_ids.tolist() == [[*original, *crop, *target]]
    pooled = torch.randn(2, PROJ, generator=torch.Generator().manual_seed(0))
    theirs = add_embedding_input(unet, pooled, time_ids.repeat(2, 1))
    ours = sdxl_vector_cond(pooled, original, crop, target)
    assert ours.shape == theirs.shape == (2, PROJ + 6 * 256)
    assert_close(ours, theirs)


def test_sdxl_refiner_vector_cond(big_g, hf_tokenizer_2):
    unet = tiny_unet(5)
    pipe = refiner_pipeline(big_g, hf_tokenizer_2, unet=unet)
    original, crop, target = (896, 1152), (16, 8), (1024, 1024)
    ids, neg_ids = pipe._get_add_time_ids(
        original, crop, target, 6.0, 2.5, original, crop, target, torch.float32,
        text_encoder_projection_dim=PROJ,
    )
    assert ids.tolist() == [[*original, *crop, 6.0]] and neg_ids.tolist() == [[*original, *crop, 2.5]]
    pooled = torch.randn(1, PROJ, generator=torch.Generator().manual_seed(1))
    for time_ids, score in ((ids, 6.0), (neg_ids, 2.5)):
        theirs = add_embedding_input(unet, pooled, time_ids)
        ours = sdxl_refiner_vector_cond(pooled, original, crop, score)
        assert ours.shape == theirs.shape == (1, PROJ + 5 * 256)
        assert_close(ours, theirs)
