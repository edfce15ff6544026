"""Data-parallel training under ``torchrun``: one process per device, gradients averaged.

``torchrun --nproc_per_node N -m unfog.cli train CONFIG`` (or ``torchrun ... $(which unfog) train``)
sets RANK / WORLD_SIZE / LOCAL_RANK; without them training runs as a single process. Each step
every rank takes the same global batch of ``batch_size`` indices and draws the same random
numbers for all of it (timesteps, noise, condition dropout), then works on its own contiguous
slice of ``batch_size / N`` samples. DistributedDataParallel averages the slices' gradients,
which is the gradient of the global batch's mean loss, so N processes follow the trajectory of
one process with the same ``batch_size`` up to float summation order. Rank 0 alone writes
files (states, model, samples, logs).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def local_slice(self, global_batch: int) -> slice:
        """This rank's part of a global batch (contiguous, equal parts)."""
        if global_batch % self.size:
            raise ValueError(f"batch_size {global_batch} is not divisible by the {self.size} processes")
        per = global_batch // self.size
        return slice(self.rank * per, (self.rank + 1) * per)

    def mean(self, value: float) -> float:
        """The average of a per-rank number over all ranks (the loss of the global batch)."""
        if not self.distributed:
            return value
        t = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(t)
        return t.item() / self.size

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` is true on any rank (so that all ranks stop at the same step)."""
        if not self.distributed:
            return flag
        t = torch.tensor([float(flag)])
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def wrap(self, module: nn.Module, device: torch.device) -> nn.Module:
        """``module`` under DistributedDataParallel when there is more than one process."""
        if not self.distributed:
            return module
        ids = [device.index] if device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(module, device_ids=ids)

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def init_world(device: torch.device) -> World:
    """Join the process group that torchrun describes in the environment (gloo on the CPU,
    NCCL on CUDA), or a one-process world when there is none."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def training_device(requested: str | None) -> torch.device:
    """The requested device, else this rank's GPU when there is one, else the CPU."""
    if requested is not None:
        return torch.device(requested)
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        return torch.device("cuda", local)
    return torch.device("cpu")
