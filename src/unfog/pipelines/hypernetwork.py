"""Hypernetworks on a pipeline: read, checked against the U-Net, and applied through its attention
layers' context transform (``UNet.set_context_transform``), several in the order loaded, as A1111
chains them. Nothing is written into the weights, so unloading is exact by construction.

Also here, for the image commands: A1111's prompt tag ``<hypernet:NAME:W>``, resolved in
hypernetwork folders, and the short hash A1111 records (``Hypernet hashes: name:hash``, the first
10 hex digits of the file's sha256).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..checkpoint.hypernetwork import read_hypernetwork
from ..checkpoint.io import sha256_from
from ..models.unet import UNet
from ..nn.hypernetwork import Hypernetwork, HypernetworkTransform
from .extra_networks import extract_network_tags, find_named_file, finite_weight

HYPERNETWORK_EXTENSIONS = (".pt", ".safetensors")
FAMILY_OF_WIDTH = {768: "SD 1.x", 1024: "SD 2.x", 2048: "SDXL"}


def short_hash(path: str | Path) -> str:
    """A1111's hypernetwork hash: the first 10 hex digits of the whole file's sha256."""
    with open(path, "rb") as f:
        return sha256_from(f)[:10]


@dataclass(frozen=True)
class AppliedHypernetwork:
    name: str
    path: Path
    weight: float
    hash: str


class HypernetworkStack:
    """The hypernetworks applied to one U-Net, in order."""

    def __init__(self, unet: UNet):
        self.unet = unet
        self.applied: list[AppliedHypernetwork] = []
        self._hypernetworks: list[Hypernetwork] = []

    def add(self, path: str | Path, weight: float = 1.0, name: str | None = None) -> AppliedHypernetwork:
        """Read ``path`` in full, check that it has modules for this U-Net's context width, then
        apply it (a bad file changes nothing)."""
        weight = finite_weight(weight, "hypernetwork weight")
        path = Path(path)
        hn = read_hypernetwork(path)
        context = self.unet.config.context_dim
        if context not in hn.widths:
            fits = sorted(FAMILY_OF_WIDTH[w] for w in hn.widths if w in FAMILY_OF_WIDTH)
            raise ValueError(f"{path}: a hypernetwork for context widths {', '.join(map(str, hn.widths))}"
                             f"{' (' + ', '.join(fits) + ')' if fits else ''}; this model's text context is "
                             f"{context} wide")
        hn.multiplier = weight
        param = next(self.unet.parameters())
        hn.to(param.device)
        applied = AppliedHypernetwork(name or path.stem, path, weight, short_hash(path))
        self._hypernetworks.append(hn)
        self.applied.append(applied)
        self.unet.set_context_transform(HypernetworkTransform(self._hypernetworks))
        return applied

    def to(self, device: str | torch.device) -> None:
        for hn in self._hypernetworks:
            hn.to(device)

    def clear(self) -> None:
        if self._hypernetworks:  # none applied: nothing to take off (a DiT has no hook for them)
            self.unet.set_context_transform(None)
        self._hypernetworks.clear()
        self.applied.clear()


@dataclass(frozen=True)
class HypernetTag:
    """``<hypernet:NAME>`` or ``<hypernet:NAME:W>`` in a prompt (W: the multiplier, default 1)."""

    name: str
    weight: float


def extract_hypernet_tags(prompt: str) -> tuple[str, list[HypernetTag]]:
    """The prompt without its ``<hypernet:…>`` tags, and the tags."""
    text, found = extract_network_tags(prompt, ("hypernet",))
    tags = []
    for tag, name, fields in found:
        if len(fields) > 1:
            raise ValueError(f"{tag}: a hypernetwork tag is <hypernet:NAME> or <hypernet:NAME:WEIGHT>")
        tags.append(HypernetTag(name, finite_weight(fields[0], f"the weight in {tag}") if fields else 1.0))
    return text, tags


def find_hypernetwork(name: str, folders: Sequence[str | Path]) -> Path:
    return find_named_file(name, folders, HYPERNETWORK_EXTENSIONS, "hypernetwork", "hypernet", "--hypernetwork-dir")


def hashes_text(applied: Iterable[AppliedHypernetwork]) -> str:
    """The value A1111 writes as ``Hypernet hashes``: ``name:hash, name2:hash2``."""
    return ", ".join(f"{a.name}:{a.hash}" for a in applied)
