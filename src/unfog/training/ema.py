"""Exponential moving average of model weights (Polyak averaging), as DDPM trains with it."""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """Keeps ``shadow = decay * shadow + (1 - decay) * weights`` after each optimizer step.

    The decay warms up as min(decay, (1 + n) / (10 + n)) over the first updates, so the average
    is not dominated by the random initialisation early in short runs.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999):
        if not 0 <= decay < 1:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.num_updates = 0
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.num_updates += 1
        d = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        for shadow, p in zip(self.model.parameters(), model.parameters()):
            shadow.lerp_(p.detach(), 1 - d)
        for shadow, b in zip(self.model.buffers(), model.buffers()):
            shadow.copy_(b)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "num_updates": self.num_updates, "model": self.model.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.decay, self.num_updates = state["decay"], state["num_updates"]
        self.model.load_state_dict(state["model"])
