"""CLIP score (Hessel et al. 2021, "CLIPScore"; torchmetrics' ``CLIPScore`` scaling): how well
each image matches its prompt, by a CLIP model.

    CLIPScore(I, C) = 100 * max(cos(E_I, E_C), 0)

with E_I and E_C CLIP's projected image and text embeddings, averaged over the (image, prompt)
pairs. (Hessel et al. use a weight of 2.5 where torchmetrics uses 100. torchmetrics' code clamps
the *average* at 0 rather than each pair; the two agree whenever no pair has a negative cosine,
which real CLIP models practically never give a caption and its image.)

Images are prepared as transformers' ``CLIPImageProcessor`` (which torchmetrics uses) does on
8-bit images: resize the shorter side to 224 with PIL's bicubic filter (the longer to
``int(224 * long / short)``), centre crop 224x224 (the top-left corner at ``(H - 224) // 2``,
``(W - 224) // 2``), scale to [0, 1], normalise by CLIP's mean and std. OpenAI's original
preprocessing crops at ``round((H - 224) / 2)`` instead, which differs by one pixel for some odd
margins. Prompts are tokenized by unfog's CLIP tokenizer and truncated to 77 tokens, keeping the
end-of-text token.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from unfog.metrics.clip_model import CLIPModel
from unfog.models.tokenizer import CLIPTokenizer

# OpenAI CLIP's image normalisation (RGB), shared by every CLIP model we load.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _to_uint8_hwc(image) -> np.ndarray:
    """A PIL image, or a (3, H, W) tensor (float in [0, 1] or uint8) -> (H, W, 3) uint8 RGB."""
    if isinstance(image, torch.Tensor):
        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"each image must be (3, H, W), got shape {tuple(image.shape)}")
        if image.dtype != torch.uint8:
            image = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)  # as saving a PNG does
        return image.permute(1, 2, 0).cpu().numpy()
    return np.asarray(image.convert("RGB"))


def clip_preprocess(images, size: int = 224) -> torch.Tensor:
    """Images -> (B, 3, size, size) float32 CLIP pixel values (see the module docstring).

    ``images``: a (B, 3, H, W) tensor (float in [0, 1], quantised to 8 bits first as a saved
    image is, or uint8), or a sequence of such (3, H, W) tensors or PIL images.
    """
    from PIL import Image  # images are an edge concern: imported only where used

    if isinstance(images, torch.Tensor) and images.ndim != 4:
        raise ValueError(f"images must be (B, 3, H, W), got shape {tuple(images.shape)}")
    out = []
    for image in images:
        pixels = _to_uint8_hwc(image)  # (H, W, 3) uint8
        h, w = pixels.shape[:2]
        short, long = min(h, w), max(h, w)
        new_long = int(size * long / short)
        new_h, new_w = (new_long, size) if w <= h else (size, new_long)
        resized = np.asarray(Image.fromarray(pixels).resize((new_w, new_h), resample=Image.Resampling.BICUBIC))
        top, left = (new_h - size) // 2, (new_w - size) // 2
        crop = resized[top : top + size, left : left + size]  # (size, size, 3) uint8
        out.append(torch.from_numpy(crop.astype(np.float32) / 255.0).permute(2, 0, 1))
    x = torch.stack(out)  # (B, 3, size, size) in [0, 1]
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def clip_score_from_embeddings(image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
    """(B, E), (B, E) embeddings of matching pairs (normalised or not) -> (B,) scores
    ``100 * max(cos, 0)``, float32."""
    if image_embeds.shape != text_embeds.shape or image_embeds.ndim != 2:
        raise ValueError(f"need two (B, E) tensors of one shape, got {tuple(image_embeds.shape)} "
                         f"and {tuple(text_embeds.shape)}")
    cos = F.cosine_similarity(image_embeds.float(), text_embeds.float(), dim=-1, eps=0.0)  # (B,)
    return 100.0 * cos.clamp(min=0.0)


@torch.no_grad()
def clip_scores(
    model: CLIPModel,
    images,
    prompts: Sequence[str],
    tokenizer: CLIPTokenizer | None = None,
    batch_size: int = 32,
) -> torch.Tensor:
    """(B,) CLIP scores of image i against prompt i, computed in batches of ``batch_size`` on the
    model's device. ``images`` as for ``clip_preprocess``; ``tokenizer`` defaults to OpenAI's
    vocabulary (the one every OpenAI and OpenCLIP model uses)."""
    if isinstance(prompts, str):
        raise ValueError("prompts must be a sequence of strings, one per image, not a single string")
    images = list(images)
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts; they are scored in pairs")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    tokenizer = tokenizer or CLIPTokenizer.from_bpe_file()
    device = model.logit_scale.device
    size = model.config.vision.image_size
    max_length = model.config.text.max_positions
    scores = []
    for start in range(0, len(images), batch_size):
        pixels = clip_preprocess(images[start : start + batch_size], size).to(device)  # (b, 3, S, S)
        tokens = tokenizer(list(prompts[start : start + batch_size]), max_length=max_length)
        image_embeds = model.encode_image(pixels)  # (b, E)
        text_embeds = model.encode_text(tokens.input_ids.to(device), tokens.attention_mask.to(device))  # (b, E)
        scores.append(clip_score_from_embeddings(image_embeds, text_embeds).cpu())
    return torch.cat(scores)


def clip_score(model: CLIPModel, images, prompts: Sequence[str], tokenizer: CLIPTokenizer | None = None,
               batch_size: int = 32) -> float:
    """The CLIP score of a set of (image, prompt) pairs: the mean of ``clip_scores``."""
    return float(clip_scores(model, images, prompts, tokenizer, batch_size).mean())
