"""Feature extractors for FID / KID, and the reference set they compare with.

- ``"inception"``: the FID Inception-v3 (2048-d pool3), from a weights file you supply. It
  resizes every image to 299 x 299 itself, by the run's resize convention.
- ``"digits"``: the shipped digit classifier's 128-d penultimate features, on 16 x 16 greyscale.
- ``"shapes-vae"``: the pooled posterior means of an unfog text-to-image model's own autoencoder
  (``metrics.shapes_eval.vae_features``), at the model's image size.

The last two resize images of another size to theirs, by the run's convention (and the report
says how many). These features compare models on their own data set only; they are not FIDs.

A reference is a folder of images (features kept: FID and KID), a ``.npz`` of statistics written
by ``unfog eval-stats`` or pytorch-fid (FID only), or, when none is given, a built-in held-out
set: the digits test split, or held-out ``shapes`` images (never in any training set).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..metrics.fid import feature_statistics, load_statistics
from ..metrics.images import stack_at_size, to_unit_tensor
from ..pipelines.images import open_image
from .image_sets import image_files

BATCH = 64


@dataclass
class Extractor:
    """``fn``: (B, C, S, S) in [0, 1] -> (B, dim). ``size`` None: the network takes any size."""

    name: str
    dim: int
    size: int | None
    channels: int
    resize: str
    fn: Callable[[Tensor], Tensor]

    @torch.no_grad()
    def __call__(self, images) -> tuple[Tensor, dict[str, int]]:
        """Images (PIL, or tensors (C, H, W) in [-1, 1]) -> (N, dim) float32 features, and how many
        images of each other size were resized to the network's."""
        if self.size is not None:
            x, resized = stack_at_size(images, self.size, self.resize, self.channels)
            return self.fn(x).float().cpu(), resized
        tensors = [to_unit_tensor(image, self.channels) for image in images]
        out = [None] * len(tensors)
        for shape in {tuple(t.shape) for t in tensors}:  # the network resizes; batch by size
            idx = [i for i, t in enumerate(tensors) if tuple(t.shape) == shape]
            feats = self.fn(torch.stack([tensors[i] for i in idx])).float().cpu()
            for i, f in zip(idx, feats):
                out[i] = f
        return (torch.stack(out) if out else torch.empty(0, self.dim)), {}


def make_extractor(name: str, resize: str, *, inception_weights: Path | None = None, model=None,
                   device: str = "cpu") -> Extractor:
    """The extractor ``name`` ("inception", "shapes-vae", "digits"); weights are loaded here, so a
    missing file fails before anything is generated."""
    from .settings import FEATURES, RESIZES

    if resize not in RESIZES:
        raise ValueError(f"unknown resize convention {resize!r}; valid: {', '.join(RESIZES)}")
    if name == "inception":
        from ..metrics.inception import FEATURE_DIM, load_fid_inception, weights_help

        if inception_weights is None:
            raise FileNotFoundError(f"the inception features need --inception-weights FILE. {weights_help()}")
        net = load_fid_inception(inception_weights, resize=resize, device=device)
        return Extractor(name, FEATURE_DIM, None, 3, resize, lambda x: net(x.to(device)))
    if name == "digits":
        from ..metrics.digits_classifier import load_digit_classifier

        clf = load_digit_classifier().to(device)
        return Extractor(name, clf.config.feature_dim, clf.config.image_size, 1, resize,
                         lambda x: clf.features(x.to(device) * 2 - 1))
    if name == "shapes-vae":
        from ..metrics.shapes_eval import vae_features

        if model is None or model.kind != "text2image":
            raise ValueError("the shapes-vae features are those of an unfog text-to-image model's autoencoder: "
                             "give --model MODEL.safetensors (trained with `unfog train`)")
        vae, size = model.pipe.vae, model.pipe.default_size
        side = size // vae.config.downsample_factor // 2  # vae_features pools 2 x 2
        return Extractor(name, vae.config.latent_channels * side * side, size, 3, resize,
                         lambda x: vae_features(vae, x * 2 - 1))
    raise ValueError(f"unknown feature extractor {name!r}; valid: {', '.join(FEATURES)}")


# ---------------------------------------------------------------- the reference


@dataclass
class Reference:
    source: str
    mu: np.ndarray
    sigma: np.ndarray
    count: int
    features: Tensor | None = None  # None for statistics from a file: no KID
    sizes: dict[str, int] = field(default_factory=dict)  # image sizes seen ("WxH": count)
    resized: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _from_features(source: str, feats: Tensor, sizes: dict[str, int], resized: dict[str, int]) -> Reference:
    mu, sigma = feature_statistics(feats)
    return Reference(source, mu, sigma, feats.shape[0], feats, sizes, resized)


def _builtin(extractor: Extractor, count_hint: int) -> Reference:
    if extractor.name == "digits":
        from ..datasets.digits import digits_tensors

        images, _ = digits_tensors("test", size=extractor.size)
        images = ((images + 1) * 127.5).round() / 127.5 - 1  # 8-bit, as the PNGs they are compared with
        feats, _ = extractor(list(images))
        side = f"{extractor.size}x{extractor.size}"
        return _from_features("built-in: the digits test split (never trained on)", feats, {side: len(images)}, {})
    if extractor.name == "shapes-vae":
        from ..metrics.shapes_eval import HELD_OUT_SEED, held_out_images

        n = max(count_hint, 200)
        feats, _ = extractor(list(held_out_images(n, extractor.size)))
        side = f"{extractor.size}x{extractor.size}"
        return _from_features(f"built-in: {n} held-out shapes images (seed {HELD_OUT_SEED})", feats, {side: n}, {})
    raise ValueError("FID and KID with the inception features need --reference: a folder of real images, or a "
                     ".npz of their statistics (unfog eval-stats)")


def folder_features(extractor: Extractor, folder: Path) -> tuple[Tensor, dict[str, int], dict[str, int]]:
    """Features of every image under ``folder`` (subfolders too), with their sizes and resizes."""
    files = image_files(folder, recursive=True)
    if not files:
        raise ValueError(f"the reference folder {folder} holds no images")
    feats, sizes, resized = [], {}, {}
    for start in range(0, len(files), BATCH):
        chunk = [open_image(p) for p in files[start : start + BATCH]]
        for image in chunk:
            key = f"{image.width}x{image.height}"
            sizes[key] = sizes.get(key, 0) + 1
        f, r = extractor(chunk)
        feats.append(f)
        for k, v in r.items():
            resized[k] = resized.get(k, 0) + v
    return torch.cat(feats), sizes, resized


def load_reference(path: Path | None, extractor: Extractor, count_hint: int = 0) -> Reference:
    """The reference of a run (module docstring); ``count_hint``: images per cell."""
    if path is None:
        return _builtin(extractor, count_hint)
    path = Path(path)
    if path.is_dir():
        feats, sizes, resized = folder_features(extractor, path)
        if feats.shape[0] < 2:
            raise ValueError(f"the reference folder {path} holds {feats.shape[0]} image; FID needs at least 2")
        return _from_features(str(path), feats, sizes, resized)
    if not path.is_file():
        raise FileNotFoundError(f"reference not found: {path} (give a folder of images or a .npz of statistics)")
    if path.suffix.lower() != ".npz":
        raise ValueError(f"--reference must be a folder of images or a .npz of statistics, got {path}")
    mu, sigma = load_statistics(path)
    meta = read_statistics_metadata(path)
    if mu.shape[0] != extractor.dim:
        made = f" (made with the {meta['features']} features)" if "features" in meta else ""
        raise ValueError(f"{path} holds {mu.shape[0]}-d statistics{made}, but the {extractor.name} features are "
                         f"{extractor.dim}-d; use the same --features as for the reference")
    if meta.get("features", extractor.name) != extractor.name:
        raise ValueError(f"{path} was made with the {meta['features']} features, not {extractor.name}")
    ref = Reference(str(path), mu, sigma, int(meta.get("count", 0)))
    if meta.get("resize") not in (None, extractor.resize):
        ref.notes.append(f"the reference statistics were computed with resize '{meta['resize']}', this run uses "
                         f"'{extractor.resize}': FIDs are comparable only with one convention")
    if "features" not in meta:
        ref.notes.append(f"{path} does not say how it was made (e.g. a pytorch-fid file); it is assumed to hold "
                         f"{extractor.name} features")
    return ref


def read_statistics_metadata(path: Path) -> dict[str, str | int]:
    """What ``save_reference_statistics`` records beside mu and sigma (absent in other files)."""
    with np.load(path, allow_pickle=False) as data:
        out = {k: data[k].item() for k in ("features", "resize", "count", "source") if k in data.files}
    return {k: (int(v) if k == "count" else str(v)) for k, v in out.items()}


def save_reference_statistics(folder: Path, out: Path, extractor: Extractor, overwrite: bool = False) -> Reference:
    """``unfog eval-stats``: mu and sigma (float64) of the features of a folder of images, as a
    ``.npz`` with pytorch-fid's keys (``metrics.fid.load_statistics`` reads it), and beside them
    the extractor, resize convention, image count and source folder."""
    out = Path(out)
    if out.suffix.lower() != ".npz":
        raise ValueError(f"the statistics file must end in .npz, got {out}")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; pass --overwrite to replace it")
    feats, sizes, resized = folder_features(extractor, Path(folder))
    ref = _from_features(str(folder), feats, sizes, resized)
    with open(out, "wb") as f:  # a file object, so numpy does not append ".npz" to the name
        np.savez(f, mu=ref.mu, sigma=ref.sigma, features=np.array(extractor.name), resize=np.array(extractor.resize),
                 count=np.array(ref.count), source=np.array(str(folder)))
    return ref
