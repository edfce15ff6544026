"""Helpers shared by the model tests: official checkpoint layouts, random weights, relative error.

Import with ``sys.path.insert(0, <tests dir>)`` then ``from model_checks import ...``.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

LAYOUTS = Path(__file__).resolve().parents[1].parent / "shared/fixtures/checkpoint-layouts"


def read_layout(name: str) -> set[tuple[str, tuple[int, ...]]]:
    """{(tensor name, shape)} from a fixture file of ``name [d0,d1,...]`` lines."""
    entries = set()
    for line in (LAYOUTS / f"{name}.txt").read_text().splitlines():
        if line.strip():
            key, shape = line.split()
            entries.add((key, tuple(int(d) for d in shape.strip("[]").split(","))))
    return entries


def layout_mismatch(model: torch.nn.Module, name: str) -> str:
    """"" when ``model``'s state_dict has exactly the names and shapes of layout ``name``, else a
    message listing a few missing and unexpected entries."""
    ours = {(k, tuple(v.shape)) for k, v in model.state_dict().items()}
    official = read_layout(name)
    missing, unexpected = sorted(official - ours), sorted(ours - official)
    if not missing and not unexpected:
        return ""
    return (
        f"{name}: {len(missing)} missing, e.g. {missing[:5]}; "
        f"{len(unexpected)} unexpected, e.g. {unexpected[:5]}"
    )


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every parameter (including the zero-initialised ones) a random, well-scaled value:
    matrices ~ N(0, 1/fan_in), norm scales ~ 1 + N(0, 0.1^2), biases ~ N(0, 0.1^2)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.ndim > 1:
                p.copy_(noise / math.sqrt(p[0].numel()))
            else:
                p.copy_(0.1 * noise + (1.0 if name.endswith("weight") else 0.0))
    return model


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|"""
    return ((a - b).abs().max() / b.abs().max()).item()
