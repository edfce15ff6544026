"""Contracts of the CLIP model and score that need no oracle: config validation, input checks,
loading errors. (Numerical parity with transformers: tests/parity/test_clip_model_transformers.py.)"""

from __future__ import annotations

import pytest
import torch

from unfog.metrics.clip_model import (
    TINY_CLIP_MODEL,
    CLIPConfig,
    CLIPModel,
    CLIPVisionConfig,
    clip_config_from_transformers,
    load_clip_model,
)
from unfog.metrics.clip_score import clip_score_from_embeddings, clip_scores
from unfog.models.clip_text import CLIPTextConfig

pytestmark = pytest.mark.usefixtures("single_thread")  # tests/conftest.py


def test_configs_refuse_inconsistent_values():
    with pytest.raises(ValueError, match="image_size 30 is not a multiple of patch_size 8"):
        CLIPVisionConfig(image_size=30, patch_size=8)
    with pytest.raises(ValueError, match="width 30 is not divisible by heads=4"):
        CLIPVisionConfig(width=30, heads=4)
    with pytest.raises(ValueError, match="unknown activation 'relu'; valid choices: quick_gelu, gelu"):
        CLIPVisionConfig(activation="relu")
    with pytest.raises(ValueError, match="text.projection_dim must be None"):
        CLIPConfig(text=CLIPTextConfig(projection_dim=8))
    with pytest.raises(ValueError, match="needs text_config and vision_config"):
        clip_config_from_transformers({"hidden_size": 512})


def test_tiny_model_shapes_and_unit_embeddings():
    model = CLIPModel(TINY_CLIP_MODEL).eval()
    assert model.vision_model.embeddings.position_embedding.weight.shape == (17, 32)  # 1 + (32 / 8)^2
    ids = torch.full((2, 77), 49407)
    ids[:, 0], ids[:, 1] = 49406, 320
    with torch.no_grad():
        out = model(ids, torch.randn(3, 3, 32, 32))
    assert out.logits_per_image.shape == (3, 2) and torch.equal(out.logits_per_text, out.logits_per_image.T)
    torch.testing.assert_close(out.image_embeds.norm(dim=-1), torch.ones(3))
    with pytest.raises(ValueError, match=r"pixel_values must be \(B, 3, 32, 32\)"):
        model.encode_image(torch.randn(1, 3, 64, 64))


def test_clip_score_formula_and_pairing_checks():
    a = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 2.0]])
    b = torch.tensor([[2.0, 0.0], [-1.0, -1.0], [1.0, 1.0]])
    torch.testing.assert_close(clip_score_from_embeddings(a, b), torch.tensor([100.0, 0.0, 100 / 2**0.5]))
    model = CLIPModel(TINY_CLIP_MODEL).eval()
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        clip_scores(model, torch.rand(2, 3, 40, 40), ["one"])
    with pytest.raises(ValueError, match="not a single string"):
        clip_scores(model, torch.rand(1, 3, 40, 40), "one")


def test_loading_errors_say_what_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="CLIP model not found"):
        load_clip_model(tmp_path / "nothing.safetensors")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_clip_model(tmp_path)
    with pytest.raises(FileNotFoundError, match="none of model.safetensors, pytorch_model.bin"):
        load_clip_model(tmp_path, config=TINY_CLIP_MODEL)
