"""Token merging for Stable Diffusion (ToMe for SD; Bolya & Hoffman 2023, "Token Merging for Fast
Stable Diffusion"): before a transformer block's self-attention, merge the most redundant image
tokens, run the attention on fewer tokens, and copy each merged result back to every token it
stands for ("unmerging"), so the block's output keeps its shape.

Which tokens merge (bipartite soft matching, sec. 3 of the paper, with its 2D partition):

1. The h x w token grid is cut into sy x sx cells; one token per cell (the top-left one, or one
   drawn at random) is a destination, all others are sources.
2. Each source's most similar destination by cosine similarity of the block's input tokens x
   (the metric), and that similarity.
3. The r = floor(ratio * N) sources most similar to their destination are merged into it: the
   destination becomes the mean of itself and the sources merged into it.
4. Attention runs on [unmerged sources, destinations]; its output for a destination is copied to
   the sources merged into it.

As ToMe for SD's defaults (and A1111's "Token merging ratio"), merging is applied to the
self-attention only, in the blocks of the U-Net's highest resolutions (``max_downsample`` 1: the
top level alone), with 2 x 2 cells. Random destinations are drawn only for an even batch (a CFG
batch holds the conditional and unconditional rows of the same images), as ToMe for SD does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class TokenMerging:
    """ratio: the fraction of a block's tokens merged away (0 <= ratio < 1; 0: off);
    max_downsample: merge in blocks at most this many times smaller than the input (1, 2, 4, 8);
    stride: (sx, sy) of the cells with one destination each; random: a random destination per
    cell (else the top-left one), drawn from ``seed``."""

    ratio: float = 0.5
    max_downsample: int = 1
    stride: tuple[int, int] = (2, 2)
    random: bool = True
    seed: int = 0

    def __post_init__(self):
        if not 0 <= self.ratio < 1:
            raise ValueError(f"token merging ratio must be in [0, 1), got {self.ratio}")
        if self.max_downsample not in (1, 2, 4, 8):
            raise ValueError(f"token merging max_downsample must be 1, 2, 4 or 8, got {self.max_downsample}")
        if min(self.stride) < 1:
            raise ValueError(f"token merging stride must be >= 1, got {self.stride}")


class TokenMerger:
    """Token merging over one sampling run: its random destinations come from one generator,
    seeded by ``settings.seed``, drawn afresh for every block of every step (as ToMe for SD)."""

    def __init__(self, settings: TokenMerging):
        self.settings = settings
        self.generator = torch.Generator(device="cpu").manual_seed(settings.seed)

    def start(self, height: int, width: int) -> MergingRun:
        """The merging of one U-Net call on latents of ``height`` x ``width``."""
        return MergingRun(self.settings, height, width, self.generator)


class MergingRun:
    """Token merging during one U-Net call: ``plan`` gives each transformer block its ``Merge``."""

    def __init__(self, settings: TokenMerging, height: int, width: int, generator: torch.Generator):
        self.settings, self.height, self.width, self.generator = settings, height, width, generator

    def plan(self, x: Tensor, height: int, width: int) -> Merge | None:
        """The merge of a block whose input tokens are x (B, height * width, C), or None at the
        levels it skips (deeper than ``max_downsample``) and where nothing would merge."""
        s = self.settings
        downsample = math.ceil(math.sqrt(self.height * self.width // x.shape[1]))
        r = int(x.shape[1] * s.ratio)
        if downsample > s.max_downsample or r == 0:
            return None
        use_random = s.random and x.shape[0] % 2 == 0
        return Merge(x, height, width, s.stride, r, self.generator if use_random else None)


class Merge:
    """One block's merge of r tokens of x (B, N, C), N = height * width (module docstring)."""

    def __init__(self, metric: Tensor, height: int, width: int, stride: tuple[int, int], r: int,
                 generator: torch.Generator | None):
        n = metric.shape[1]
        sx, sy = stride
        rows, cols = height // sy, width // sx  # cells; a remainder of the grid holds sources only
        if generator is None:
            offset = torch.zeros(rows, cols, dtype=torch.long)
        else:
            offset = torch.randint(sx * sy, (rows, cols, 1), generator=generator)[..., 0]
        grid = torch.zeros(height, width, dtype=torch.bool)
        cy, cx = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
        grid[cy * sy + offset // sx, cx * sx + offset % sx] = True
        is_dst = grid.flatten().to(metric.device)
        self.dst = is_dst.nonzero()[:, 0]  # (D,) token positions
        self.src = (~is_dst).nonzero()[:, 0]  # (S,)
        self.n = n
        with torch.no_grad():
            unit = metric / metric.norm(dim=-1, keepdim=True)
            similarity = unit[:, self.src] @ unit[:, self.dst].transpose(1, 2)  # (B, S, D) cosine
            best, target = similarity.max(dim=-1)  # (B, S): each source's nearest destination
            order = best.argsort(dim=-1, descending=True)  # most similar first
        r = min(r, len(self.src))
        self.merged, self.kept = order[:, :r], order[:, r:]  # (B, r), (B, S - r): indices into src
        self.merged_target = target.gather(1, self.merged)  # (B, r): their destinations

    def merge(self, x: Tensor) -> Tensor:
        """(B, N, C) -> (B, N - r, C): the kept sources, then the destinations averaged with the
        sources merged into them."""
        c = x.shape[-1]
        src, dst = x[:, self.src], x[:, self.dst]
        kept = src.gather(1, self.kept[..., None].expand(-1, -1, c))
        moving = src.gather(1, self.merged[..., None].expand(-1, -1, c))
        dst = dst.scatter_reduce(1, self.merged_target[..., None].expand(-1, -1, c), moving, reduce="mean")
        return torch.cat([kept, dst], dim=1)

    def unmerge(self, y: Tensor) -> Tensor:
        """(B, N - r, C) -> (B, N, C): every token gets the output of the token it was merged into."""
        b, _, c = y.shape
        kept, dst = y[:, : self.kept.shape[1]], y[:, self.kept.shape[1] :]
        src = y.new_empty(b, len(self.src), c)
        src.scatter_(1, self.kept[..., None].expand(-1, -1, c), kept)
        from_dst = dst.gather(1, self.merged_target[..., None].expand(-1, -1, c))
        src.scatter_(1, self.merged[..., None].expand(-1, -1, c), from_dst)
        out = y.new_empty(b, self.n, c)
        out[:, self.src] = src
        out[:, self.dst] = dst
        return out
