"""The full training state, saved atomically and read back for an exact resume.

A state holds the model, its EMA, the optimizer and LR schedule, every RNG stream (torch CPU and,
when present, CUDA; the data order and the diffusion noise come from our own generators, which
are part of the state too), the data position and the step. Files are written to a temporary
name, flushed and renamed, and only the last ``keep`` are kept.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from ..checkpoint.io import atomic_write

_NAME = re.compile(r"^state_(\d{8})\.pt$")


def state_path(directory: Path, step: int) -> Path:
    return Path(directory) / f"state_{step:08d}.pt"


def is_state_file(path: Path) -> bool:
    """Whether ``path`` is named as a training state (``state_XXXXXXXX.pt``)."""
    return bool(_NAME.match(Path(path).name))


def list_states(directory: Path) -> list[Path]:
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if _NAME.match(p.name))


def save_state(directory: Path, step: int, state: dict[str, Any], keep: int) -> Path:
    path = state_path(directory, step)
    atomic_write(path, lambda tmp: torch.save(state, tmp))
    for old in list_states(directory)[:-keep]:
        old.unlink()
    return path


def load_state(path: Path) -> dict[str, Any]:
    # weights_only: a training state is tensors, numbers and strings; never run pickled code.
    return torch.load(path, map_location="cpu", weights_only=True)
