"""The Inception-v3 of FID (Heusel et al. 2017): pool3 features, 2048-d, of the 2015-12-05 graph.

Every published FID uses one network: TensorFlow's ``inception-2015-12-05`` graph (Szegedy et al.
2016, "Rethinking the Inception Architecture", fig. 5-7 and table 1), read at its ``pool_3``
layer. pytorch-fid ported its weights to PyTorch as ``pt_inception-2015-12-05-6726825d.pth`` (the
same file torch-fidelity serves as ``weights-inception-2015-12-05-6726825d.pth``), in the module
names of torchvision's ``Inception3``; this module has exactly those names, so that file loads
with strict name and shape checks::

    Conv2d_1a_3x3.conv.weight                   (32, 3, 3, 3)     conv, no bias
    Conv2d_1a_3x3.bn.{weight,bias,running_mean,running_var}   (32,)  batch norm, eps 0.001
    Conv2d_2a_3x3 ... Conv2d_4a_3x3             the stem
    Mixed_5b.branch1x1.conv.weight ...          Mixed_5b/5c/5d (A), 6a (B), 6b-6e (C), 7a (D), 7b/7c (E)
    fc.weight, fc.bias                          (1008, 2048), (1008,): the classifier, kept, unused

The graph differs from torchvision's ImageNet Inception3 in two places, which pytorch-fid
patches (``FIDInceptionA/C/E_1/E_2``) and we build in:

- the 3x3 average pool of the A, C and first E blocks does not count the zero padding
  (TensorFlow's ``avg_pool`` with SAME padding): ``count_include_pad=False``;
- the pool branch of the last E block (``Mixed_7c``) is a 3x3 *max* pool, not an average.

As in torchvision, every batch norm has eps 0.001 (TensorFlow's), not PyTorch's default 1e-5.

Input: RGB images in [0, 1], any size, resized to 299x299 (see ``Resize``), then mapped to
[-1, 1] by ``2x - 1`` as pytorch-fid does. (The TF graph itself computes ``(v - 128) / 128`` on
[0, 255] values, as torch-fidelity reproduces; the two maps differ by at most 1/128, about one
grey level at white.)

Architecture (shapes at 299x299; each conv is conv -> batch norm -> ReLU)::

    (B, 3, 299, 299) -1a 3x3/2-> (B, 32, 149, 149) -2a 3x3-> (B, 32, 147, 147)
        -2b 3x3 pad 1-> (B, 64, 147, 147) -maxpool 3/2-> (B, 64, 73, 73) -3b 1x1-> (B, 80, 73, 73)
        -4a 3x3-> (B, 192, 71, 71) -maxpool 3/2-> (B, 192, 35, 35)
        -5b-> 256 -5c-> 288 -5d-> 288 (35x35) -6a-> 768 (17x17) -6b..6e-> 768
        -7a-> 1280 (8x8) -7b-> 2048 -7c-> 2048 -global average-> (B, 2048) = pool3
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Literal, get_args

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..choices import check_choice

FID_WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{FID_WEIGHTS_NAME}"
# sha256 of that file (95,628,359 bytes), as several projects that pin it record it; its first 8
# hex digits are the 6726825d in the file name (torch.hub's convention for checkable names).
FID_WEIGHTS_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"
INPUT_SIZE = 299
FEATURE_DIM = 2048
NUM_CLASSES = 1008  # the 2015 graph's classifier: 1000 ImageNet classes + 8 unused

Resize = Literal["legacy", "clean"]
PoolType = Literal["avg", "max"]


# ---------------------------------------------------------------------------------------------
# Resizing to 299x299.


def resize_for_inception(images: torch.Tensor, mode: Resize = "legacy", size: int = INPUT_SIZE) -> torch.Tensor:
    """(B, 3, H, W) images in [0, 1] -> (B, 3, size, size) float32, still in [0, 1] (about).

    ``"legacy"``: pytorch-fid's resize, ``F.interpolate(mode="bilinear", align_corners=False)`` on
        the tensor, with no antialiasing: shrinking a large image this way skips pixels (aliasing),
        and the result depends on the library that resizes. Every FID reported with pytorch-fid
        (and most papers) used it. Output may leave [0, 1] by rounding only. Runs on any device.
    ``"clean"``: clean-fid's "clean" mode (Parmar et al. 2022, "On Aliased Resizing and
        Surprising Subtleties in GAN Evaluation"): each channel, as a float32 image of values in
        [0, 255], is resized by PIL's bicubic filter in mode "F" (a properly antialiased
        resampling, identical everywhere), then clipped to [0, 255]; we rescale by 1/255. clean-fid
        feeds uint8 images; quantise yours (``(x * 255).round() / 255``) to match it exactly.
        Runs on the CPU (PIL), one image and channel at a time; the result returns to the input's
        device.

    A 299x299 input is returned unchanged by "legacy" (bilinear at scale 1 is the identity) and
    by "clean" up to float32 rounding.
    """
    if mode not in get_args(Resize):
        check_choice("resize", mode, get_args(Resize))
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (B, 3, H, W), got shape {tuple(images.shape)}")
    if mode == "legacy":
        x = images.to(torch.float32)
        return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return _resize_clean(images, size)


def _resize_clean(images: torch.Tensor, size: int) -> torch.Tensor:
    from PIL import Image  # images are an edge concern: imported only where used

    arrays = images.detach().to("cpu", torch.float32).numpy() * 255.0  # (B, 3, H, W) in [0, 255]
    out = np.empty((arrays.shape[0], 3, size, size), dtype=np.float32)
    for b in range(arrays.shape[0]):
        for c in range(3):
            channel = Image.fromarray(np.ascontiguousarray(arrays[b, c]), mode="F")
            resized = channel.resize((size, size), resample=Image.Resampling.BICUBIC)
            out[b, c] = np.asarray(resized, dtype=np.float32).clip(0.0, 255.0)
    return torch.from_numpy(out / np.float32(255.0)).to(images.device)  # (B, 3, size, size)


# ---------------------------------------------------------------------------------------------
# The network.


class BasicConv2d(nn.Module):
    """conv (no bias) -> batch norm (eps 0.001) -> ReLU: every convolution of the network."""

    def __init__(self, c_in: int, c_out: int, kernel: int | tuple[int, int], stride: int = 1,
                 padding: int | tuple[int, int] = 0):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(c_out, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _pool_3x3(x: torch.Tensor, pool: PoolType) -> torch.Tensor:
    """3x3 stride-1 pool with padding 1; the average ignores the padding (TensorFlow SAME)."""
    if pool == "max":
        return F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    """35x35 block (Mixed_5b/5c/5d): 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool-1x1 -> 224 + pool_features."""

    def __init__(self, c_in: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(c_in, 64, 1)
        self.branch5x5_1 = BasicConv2d(c_in, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(c_in, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(c_in, pool_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        pool = self.branch_pool(_pool_3x3(x, "avg"))
        return torch.cat([self.branch1x1(x), b5, b3, pool], dim=1)  # (B, 224 + pool_features, H, W)


class InceptionB(nn.Module):
    """Grid reduction 35 -> 17 (Mixed_6a): 3x3/2 | 1x1-3x3-3x3/2 | maxpool 3/2 -> 384 + 96 + C_in."""

    def __init__(self, c_in: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(c_in, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(c_in, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        pool = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([self.branch3x3(x), b3, pool], dim=1)  # (B, 480 + C_in, H', W')


class InceptionC(nn.Module):
    """17x17 block with factorised 7x7 convs (Mixed_6b-6e): 1x1 | 1x1-1x7-7x1 |
    1x1-7x1-1x7-7x1-1x7 | avgpool-1x1 -> 4 x 192 = 768."""

    def __init__(self, c_in: int, channels_7x7: int):
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(c_in, 192, 1)
        self.branch7x7_1 = BasicConv2d(c_in, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(c_in, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(c_in, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = x
        for conv in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                     self.branch7x7dbl_5):
            d = conv(d)
        pool = self.branch_pool(_pool_3x3(x, "avg"))
        return torch.cat([self.branch1x1(x), b7, d, pool], dim=1)  # (B, 768, H, W)


class InceptionD(nn.Module):
    """Grid reduction 17 -> 8 (Mixed_7a): 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | maxpool 3/2 -> 320 + 192 + C_in."""

    def __init__(self, c_in: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(c_in, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(c_in, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        pool = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([b3, b7, pool], dim=1)  # (B, 512 + C_in, H', W')


class InceptionE(nn.Module):
    """8x8 block with expanded filter banks (Mixed_7b/7c): 1x1 | 1x1-(1x3, 3x1) |
    1x1-3x3-(1x3, 3x1) | pool-1x1 -> 320 + 768 + 768 + 192 = 2048. ``pool``: "avg" in Mixed_7b,
    "max" in Mixed_7c (a quirk of the 2015 graph that FID inherits)."""

    def __init__(self, c_in: int, pool: PoolType):
        super().__init__()
        if pool not in get_args(PoolType):
            check_choice("pool", pool, get_args(PoolType))
        self.pool = pool
        self.branch1x1 = BasicConv2d(c_in, 320, 1)
        self.branch3x3_1 = BasicConv2d(c_in, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(c_in, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(c_in, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(s), self.branch3x3_2b(s)], dim=1)  # (B, 768, H, W)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        d = torch.cat([self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d)], dim=1)  # (B, 768, H, W)
        pool = self.branch_pool(_pool_3x3(x, self.pool))
        return torch.cat([self.branch1x1(x), b3, d, pool], dim=1)  # (B, 2048, H, W)


class FIDInceptionV3(nn.Module):
    """The FID feature network: images in [0, 1] -> pool3 features (B, 2048).

    ``resize``: how images reach 299x299, "legacy" (pytorch-fid) or "clean" (clean-fid); see
    ``resize_for_inception``. Build it with random weights here; ``load_fid_inception`` gives the
    real ones. Inference only: call ``.eval()`` (the loader does), or batch norm would use batch
    statistics.
    """

    def __init__(self, resize: Resize = "legacy"):
        super().__init__()
        if resize not in get_args(Resize):
            check_choice("resize", resize, get_args(Resize))
        self.resize = resize
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, pool="avg")
        self.Mixed_7c = InceptionE(2048, pool="max")
        self.fc = nn.Linear(FEATURE_DIM, NUM_CLASSES)  # loaded with the file; FID does not use it

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) RGB in [0, 1] -> (B, 2048) pool3 features, float32."""
        x = resize_for_inception(images, self.resize)  # (B, 3, 299, 299) in [0, 1]
        dtype = self.Conv2d_1a_3x3.conv.weight.dtype
        return self.features(2.0 * x.to(dtype) - 1.0)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) already in [-1, 1] (299x299 for FID; at least 75x75) -> (B, 2048)."""
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))  # (B, 64, 147, 147)
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # (B, 64, 73, 73)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))  # (B, 192, 71, 71)
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # (B, 192, 35, 35)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b,
                      self.Mixed_6c, self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b,
                      self.Mixed_7c):
            x = block(x)  # ... -> (B, 2048, 8, 8)
        return x.mean(dim=(2, 3)).float()  # (B, 2048): the global average pool, "pool_3"

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """(B, 2048) pool3 features -> (B, 1008) class logits of the 2015 graph (Inception Score)."""
        return self.fc(features.to(self.fc.weight.dtype))


# ---------------------------------------------------------------------------------------------
# Loading the weights.

_BOOKKEEPING = "num_batches_tracked"  # a training counter of BatchNorm; files may or may not carry it


def weights_help() -> str:
    """Where to get the FID Inception weights: the text of every error about a missing file."""
    return (
        f"unfog downloads nothing; fetch pytorch-fid's port of the TensorFlow 2015-12-05 Inception "
        f"graph from {FID_WEIGHTS_URL} (95.6 MB, sha256 {FID_WEIGHTS_SHA256}; torch-fidelity serves "
        f"the same file as weights-inception-2015-12-05-6726825d.pth) and pass its path. It is read "
        f"without running any code from it."
    )


def _missing_weights_message(path: Path) -> str:
    return f"FID Inception weights not found: {path}. {weights_help()}"


def sha256_of(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_fid_inception(
    path: str | Path,
    resize: Resize = "legacy",
    device: torch.device | str = "cpu",
    check_sha256: bool = False,
) -> FIDInceptionV3:
    """The FID Inception-v3 with the weights of ``path``, in eval mode, gradients off.

    ``path``: pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` (read by unfog's pickle
    reader, which runs no code from the file) or the same tensors as ``.safetensors``. Names and
    shapes are checked strictly: every tensor of the file must be a tensor of the network and
    every tensor of the network must be in the file; only batch norm's ``num_batches_tracked``
    counters may be absent. ``check_sha256``: also require the official file's checksum
    (``FID_WEIGHTS_SHA256``); off by default so converted copies load.
    """
    from unfog.checkpoint.io import load_state_dict

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(_missing_weights_message(path))
    if check_sha256:
        digest = sha256_of(path)
        if digest != FID_WEIGHTS_SHA256:
            raise ValueError(f"{path}: sha256 {digest} is not the official FID Inception's {FID_WEIGHTS_SHA256}")
    tensors, _ = load_state_dict(path)
    model = FIDInceptionV3(resize)
    expected = model.state_dict()
    unknown = sorted(set(tensors) - set(expected))
    missing = sorted(k for k in set(expected) - set(tensors) if not k.endswith(_BOOKKEEPING))
    wrong = sorted(k for k in set(tensors) & set(expected) if tuple(tensors[k].shape) != tuple(expected[k].shape))
    if unknown or missing or wrong:
        problems = [
            f"{len(items)} {what}: {', '.join(items[:6])}{' ...' if len(items) > 6 else ''}"
            for items, what in ((unknown, "unknown tensors"), (missing, "missing tensors"),
                                (wrong, "tensors of the wrong shape"))
            if items
        ]
        raise ValueError(f"{path} is not the FID Inception-v3 ({FID_WEIGHTS_NAME} layout): " + "; ".join(problems))
    full = {**{k: v for k, v in expected.items() if k.endswith(_BOOKKEEPING)}, **tensors}
    model.load_state_dict(full, strict=True)
    model.requires_grad_(False)
    return model.to(device).eval()
