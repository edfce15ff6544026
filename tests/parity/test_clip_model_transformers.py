"""Numerical parity of ``unfog.metrics.clip_model.CLIPModel`` with transformers' ``CLIPModel`` on
the same random weights (fp32, relative error <= 1e-4), loaded from a transformers folder
(``save_pretrained``: config.json + model.safetensors) and from the same weights in OpenCLIP
naming, written here by an independent mapping (fused qkv, raw ``x @ P`` projections). The CLIP
score is checked against 100 * max(cos, 0) of transformers' features, with transformers' own image
processor and tokenizer preparing the inputs.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from unfog.checkpoint.convert import convert_openclip_clip
from unfog.metrics.clip_model import CLIPModel, clip_config_from_transformers, load_clip_model
from unfog.metrics.clip_score import clip_preprocess, clip_score, clip_score_from_embeddings, clip_scores

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, home of model_checks
from model_checks import randomize_, rel_err, write_tokenizer_folder  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")  # tests/conftest.py

TOL = 1e-4
IMAGE, PATCH = 32, 8


def hf_clip(activation: str, seed: int) -> transformers.CLIPModel:
    text = transformers.CLIPTextConfig(
        vocab_size=49408, hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=77, hidden_act=activation, bos_token_id=49406, eos_token_id=2,  # legacy argmax
    )
    vision = transformers.CLIPVisionConfig(
        hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4, image_size=IMAGE,
        patch_size=PATCH, hidden_act=activation,
    )
    config = transformers.CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=24)
    config._attn_implementation = "eager"
    return randomize_(transformers.CLIPModel(config), seed=seed).eval()


@pytest.fixture(scope="module", params=["quick_gelu", "gelu"])
def pair(request, tmp_path_factory):
    """A random transformers CLIPModel and ours, loaded from its saved folder."""
    theirs = hf_clip(request.param, seed=3)
    folder = tmp_path_factory.mktemp(f"clip_{request.param}")
    theirs.save_pretrained(folder)
    return theirs, load_clip_model(folder)


def inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randn(3, 3, IMAGE, IMAGE, generator=g)
    ids = torch.randint(1, 49405, (2, 77), generator=g)
    ids[:, 0] = 49406
    for row, eos in enumerate((6, 30)):
        ids[row, eos:] = 49407  # end of text, then padding with it (SD 1.x / OpenAI style)
    return pixels, ids


def assert_matches(ours: CLIPModel, theirs: transformers.CLIPModel) -> None:
    pixels, ids = inputs()
    with torch.no_grad():
        mine, ref = ours(ids, pixels), theirs(input_ids=ids, pixel_values=pixels)
        assert rel_err(ours.encode_image(pixels), theirs.get_image_features(pixel_values=pixels).pooler_output) <= TOL
        assert rel_err(ours.encode_text(ids), theirs.get_text_features(input_ids=ids).pooler_output) <= TOL
    assert mine.logits_per_image.shape == (3, 2)
    for name in ("image_embeds", "text_embeds", "logits_per_image", "logits_per_text"):
        assert rel_err(getattr(mine, name), getattr(ref, name)) <= TOL, name


def test_transformers_folder_loads_and_matches(pair):
    theirs, ours = pair
    assert not ours.training and not any(p.requires_grad for p in ours.parameters())
    assert ours.config == clip_config_from_transformers(theirs.config.to_dict())
    assert ours.config.vision.mlp_width == 80 and ours.config.text.pooling == "argmax"
    assert_matches(ours, theirs)


def to_openclip(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers' CLIPModel names -> OpenCLIP's, written out here (not via unfog's tables)."""
    out = {"logit_scale": sd["logit_scale"]}
    towers = {"text_model.": "", "vision_model.": "visual."}
    renames = {
        "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
        "text_model.embeddings.position_embedding.weight": "positional_embedding",
        "text_model.final_layer_norm.weight": "ln_final.weight",
        "text_model.final_layer_norm.bias": "ln_final.bias",
        "vision_model.embeddings.patch_embedding.weight": "visual.conv1.weight",
        "vision_model.embeddings.class_embedding": "visual.class_embedding",
        "vision_model.embeddings.position_embedding.weight": "visual.positional_embedding",
        "vision_model.pre_layrnorm.weight": "visual.ln_pre.weight",
        "vision_model.pre_layrnorm.bias": "visual.ln_pre.bias",
        "vision_model.post_layernorm.weight": "visual.ln_post.weight",
        "vision_model.post_layernorm.bias": "visual.ln_post.bias",
    }
    out.update({dst: sd[src] for src, dst in renames.items()})
    out["text_projection"] = sd["text_projection.weight"].T.contiguous()  # used as x @ P
    out["visual.proj"] = sd["visual_projection.weight"].T.contiguous()
    layer_parts = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": "attn.out_proj",
                   "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
    for tower, dst in towers.items():
        i = 0
        while f"{tower}encoder.layers.{i}.layer_norm1.weight" in sd:
            src, block = f"{tower}encoder.layers.{i}.", f"{dst}transformer.resblocks.{i}."
            for part, open_part in layer_parts.items():
                for p in ("weight", "bias"):
                    out[f"{block}{open_part}.{p}"] = sd[f"{src}{part}.{p}"]
            for p in ("weight", "bias"):
                qkv = [sd[f"{src}self_attn.{x}_proj.{p}"] for x in "qkv"]
                out[f"{block}attn.in_proj_{p}"] = torch.cat(qkv, dim=0)
            i += 1
    assert len(out) == len([k for k in sd if not k.endswith("position_ids")]) - 2 * 2 * sum(
        1 for k in sd if k.endswith("self_attn.q_proj.weight"))  # q, k, v fused into one weight and one bias
    return out


def test_openclip_naming_converts_to_the_same_model(pair):
    theirs, ours = pair
    openclip = to_openclip(theirs.state_dict())
    converted = CLIPModel(ours.config).eval()
    converted.load_state_dict(convert_openclip_clip(openclip), strict=True)
    assert_matches(converted, theirs)
    with pytest.raises(ValueError, match="not in the OpenCLIP CLIP model naming: visual.attnpool"):
        convert_openclip_clip({**openclip, "visual.attnpool.c_proj.weight": torch.zeros(1)})


def test_single_file_in_either_naming_needs_and_takes_a_config(pair, tmp_path):
    from safetensors.torch import save_file

    theirs, ours = pair
    openclip = tmp_path / "open_clip_model.safetensors"
    save_file(to_openclip(theirs.state_dict()), str(openclip))
    with pytest.raises(ValueError, match="carries no config"):
        load_clip_model(openclip)
    assert_matches(load_clip_model(openclip, config=ours.config), theirs)


def test_clip_score_is_100_times_clamped_cosine_of_transformers_features(pair, tmp_path):
    theirs, ours = pair
    g = torch.Generator().manual_seed(5)
    images = torch.rand(6, 3, 40, 52, generator=g)  # float in [0, 1], non-square
    prompts = ["a red cube", "two dogs", "a lighthouse at dusk", "", "an astronaut riding a horse", "x " * 100]
    processor = CLIPImageProcessorPil(size={"shortest_edge": IMAGE}, crop_size={"height": IMAGE, "width": IMAGE})
    tokenizer = transformers.CLIPTokenizer(*(str(write_tokenizer_folder(tmp_path / "tok") / f)
                                             for f in ("vocab.json", "merges.txt")))
    as_uint8 = [(im * 255).round().to(torch.uint8) for im in images]  # an 8-bit image, as saved
    pixel_values = processor(images=[Image.fromarray(im.permute(1, 2, 0).numpy()) for im in as_uint8],
                             return_tensors="pt")["pixel_values"]
    ids = tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        img = theirs.get_image_features(pixel_values=pixel_values).pooler_output
        txt = theirs.get_text_features(input_ids=ids).pooler_output
    cos = (img / img.norm(dim=-1, keepdim=True) * (txt / txt.norm(dim=-1, keepdim=True))).sum(-1)
    expected = 100 * cos.clamp(min=0)
    assert (cos < 0).any() and (cos > 0).any()  # random weights: the clamp is exercised
    scores = clip_scores(ours, images, prompts, batch_size=4)
    torch.testing.assert_close(scores, expected, rtol=TOL, atol=TOL * 100)
    assert clip_score(ours, images, prompts) == pytest.approx(expected.mean().item(), rel=TOL, abs=TOL)
    torch.testing.assert_close(clip_score_from_embeddings(img, txt), expected, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("h, w", [(227, 301), (300, 225), (224, 227), (231, 224), (90, 500)])
def test_preprocessing_matches_transformers_image_processor(h, w):
    rng = np.random.default_rng(h * w)
    image = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    expected = CLIPImageProcessorPil()(images=[Image.fromarray(image)], return_tensors="pt")["pixel_values"]
    ours_pil = clip_preprocess([Image.fromarray(image)])
    ours_tensor = clip_preprocess(torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255)
    assert ours_pil.shape == expected.shape == (1, 3, 224, 224)
    torch.testing.assert_close(ours_pil, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(ours_tensor, expected, rtol=0, atol=1e-5)


# The official OpenAI models, as their transformers config.json files describe them.
OFFICIAL = {
    "CLIP_VIT_L14": dict(text=dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12),
                         vision=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                     num_attention_heads=16, patch_size=14), projection_dim=768),
    "CLIP_VIT_B32": dict(text={}, vision=dict(patch_size=32), projection_dim=512),
    "CLIP_VIT_B16": dict(text={}, vision=dict(patch_size=16), projection_dim=512),
}


@pytest.mark.parametrize("preset", sorted(OFFICIAL))
def test_presets_have_the_layout_of_the_official_models(preset):
    """Names and shapes of ours == transformers' CLIPModel for the official configs (meta device:
    no memory). transformers' defaults are ViT-B/32 with a 512-wide text tower."""
    from unfog.metrics import clip_model

    spec = OFFICIAL[preset]
    config = transformers.CLIPConfig(
        text_config=transformers.CLIPTextConfig(eos_token_id=2, **spec["text"]).to_dict(),
        vision_config=transformers.CLIPVisionConfig(**spec["vision"]).to_dict(),
        projection_dim=spec["projection_dim"],
    )
    with torch.device("meta"):
        theirs = transformers.CLIPModel(config)
        ours = CLIPModel(getattr(clip_model, preset))
    shapes = lambda m: {k: tuple(v.shape) for k, v in m.state_dict().items() if not k.endswith("position_ids")}  # noqa: E731
    assert shapes(ours) == shapes(theirs)
    assert clip_config_from_transformers(config.to_dict()) == getattr(clip_model, preset)
