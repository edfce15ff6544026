"""A text-to-image model measured on `shapes`: GenEval-style prompt adherence and FID.

Adherence: for each category, ``per_category`` canonical prompts (``evaluation_prompts``, every
prompt of the category equally often), one image each, scored by the deterministic analyzer
(``shapes_analyzer``); "overall" is the mean over categories, as GenEval reports it.

FID: Fréchet distance between Gaussians fitted to features of the generated images and of
held-out `shapes` images (a seed the training set never used). The features are our own: the
posterior means of the autoencoder trained on `shapes` (stage 1 of the model), average-pooled
2 x 2, i.e. 4 x 8 x 8 = 256 numbers per 64 x 64 image. They are not Inception features, so the
numbers compare models on this data set only; ``real_floor`` is the FID of a second held-out
set of the same size, the value a perfect model would reach at this sample size.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from ..datasets.shapes import ShapesDataset
from ..datasets.shapes_text import CATEGORIES, PromptSpec, evaluation_prompts
from ..models.vae import AutoencoderKL
from .fid import fid_from_features
from .shapes_analyzer import score_batch

HELD_OUT_SEED = 1_000_003  # the training sets use small seeds (configs/shapes*.json: 0)


@dataclass
class ShapesScores:
    adherence: dict[str, float]  # per category, and "overall"
    fid: float | None
    real_floor: float | None  # FID of held-out real images against the reference set
    num_images: int
    settings: dict = field(default_factory=dict)


def prompt_set(per_category: int, seed: int = 0, categories=CATEGORIES) -> list[PromptSpec]:
    return [spec for c in categories for spec in evaluation_prompts(c, per_category, seed)]


@torch.no_grad()
def generate(pipe, specs: list[PromptSpec], *, sampler: str = "dpmpp_2m", steps: int = 20, cfg_scale: float = 4.0,
             seed: int = 0, batch: int = 64, progress: bool = True, **options) -> Tensor:
    """One image per prompt, (N, 3, H, W) in [-1, 1]; batch k is drawn with seed ``seed + k``;
    ``options`` go to the pipeline (e.g. ``cfg_truncation``)."""
    out = []
    chunks = [specs[i : i + batch] for i in range(0, len(specs), batch)]
    for k, chunk in enumerate(tqdm(chunks, desc="generate", unit="batch", disable=not progress)):
        out.append(pipe([s.text for s in chunk], steps=steps, sampler=sampler, cfg_scale=cfg_scale,
                        seed=seed + k, output="tensor", **options))
    return torch.cat(out)


@torch.no_grad()
def vae_features(vae: AutoencoderKL, images: Tensor, batch: int = 256) -> Tensor:
    """(N, 3, H, W) in [-1, 1] -> (N, D) pooled posterior means of the trained autoencoder."""
    device = next(vae.parameters()).device
    feats = [F.avg_pool2d(vae.encode(x.to(device, next(vae.parameters()).dtype)).mean.float(), 2).flatten(1).cpu()
             for x in images.split(batch)]
    return torch.cat(feats)


def held_out_images(n: int, size: int, seed: int = HELD_OUT_SEED) -> Tensor:
    data = ShapesDataset(n, size=size, seed=seed)
    return torch.stack([data[i]["image"] for i in range(n)])


def evaluate(pipe, per_category: int = 100, *, sampler: str = "dpmpp_2m", steps: int = 20, cfg_scale: float = 4.0,
             seed: int = 0, fid_reference: Tensor | None = None, real_floor: float | None = None,
             progress: bool = True, **options) -> ShapesScores:
    """Adherence per category (and FID against ``fid_reference`` features when given); ``options``
    go to the pipeline."""
    specs = prompt_set(per_category, seed)
    images = generate(pipe, specs, sampler=sampler, steps=steps, cfg_scale=cfg_scale, seed=seed, progress=progress,
                      **options)
    adherence = score_batch(images, specs)
    fid = None
    if fid_reference is not None:
        fid = fid_from_features(vae_features(pipe.vae, images), fid_reference)
    settings = dict(sampler=sampler, steps=steps, cfg_scale=cfg_scale, seed=seed, per_category=per_category, **options)
    return ShapesScores(adherence, fid, real_floor, len(specs), settings)


def reference_features(vae: AutoencoderKL, n: int, size: int) -> tuple[Tensor, float]:
    """Features of ``n`` held-out images, and the FID of ``n`` other held-out images against them."""
    ref = vae_features(vae, held_out_images(n, size))
    other = vae_features(vae, held_out_images(n, size, seed=HELD_OUT_SEED + 1))
    return ref, fid_from_features(other, ref)
