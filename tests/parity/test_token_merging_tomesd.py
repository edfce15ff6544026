"""Token merging (``nn.token_merging``) against ToMe for SD itself (the ``tomesd`` package).

- One merge: on random tokens, ``Merge`` and tomesd's ``bipartite_soft_matching_random2d`` (top-left
  destinations, and random ones drawn from equal generators) give the same tokens after a
  token-wise function has run on the merged set and the result has been unmerged (exactly: both
  average the same tokens). The merged sets are the same up to order.
- A whole U-Net: unfog's ``UNet(..., merger=)`` against the same U-Net whose transformer blocks run
  tomesd's own ``compute_merge`` with tomesd's settings dictionary (ratio, max_downsample, 2 x 2
  cells, self-attention only), the formula of its LDM patch: outputs within 1e-5.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest
import torch
from tomesd.merge import bipartite_soft_matching_random2d
from tomesd.patch import compute_merge

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: model_checks
from model_checks import randomize_, rel_err  # noqa: E402

from unfog.models.presets import TINY  # noqa: E402
from unfog.models.unet import UNet  # noqa: E402
from unfog.nn.blocks import BasicTransformerBlock  # noqa: E402
from unfog.nn.token_merging import Merge, TokenMerger, TokenMerging  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.mark.parametrize("height, width, random", [(8, 8, False), (8, 8, True), (7, 10, False), (6, 9, True)])
def test_one_merge_equals_tomesd(height, width, random):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, height * width, 16, generator=g)
    r = int(x.shape[1] * 0.5)
    ours = Merge(x, height, width, (2, 2), r, torch.Generator().manual_seed(5) if random else None)
    merge, unmerge = bipartite_soft_matching_random2d(x, width, height, 2, 2, r, no_rand=not random,
                                                      generator=torch.Generator().manual_seed(5))
    a, b = ours.merge(x), merge(x)
    assert a.shape == b.shape == (2, height * width - r, 16)
    for i in range(2):  # the same set of merged tokens, in whatever order
        assert torch.allclose(a[i][a[i][:, 0].argsort()], b[i][b[i][:, 0].argsort()], atol=1e-6)
    f = lambda t: torch.tanh(t) * 3  # noqa: E731 (any token-wise function)
    assert torch.allclose(ours.unmerge(f(a)), unmerge(f(b)), atol=1e-6)
    assert not torch.allclose(ours.unmerge(f(a)), f(x), atol=1e-3)  # merging changed something


def _tomesd_blocks(unet: UNet, info: dict) -> None:
    """Every transformer block of ``unet`` runs tomesd's merge, as its LDM patch does."""

    def forward(self, x, context, merge=None):
        m_a, m_c, m_m, u_a, u_c, u_m = compute_merge(x, info)
        x = u_a(self.attn1(m_a(self.norm1(x)))) + x
        x = u_c(self.attn2(m_c(self.norm2(x)), context)) + x
        return u_m(self.ff(m_m(self.norm3(x)))) + x

    for module in unet.modules():
        if isinstance(module, BasicTransformerBlock):
            module.forward = types.MethodType(forward, module)


@pytest.mark.parametrize("ratio, max_downsample, batch", [(0.5, 1, 2), (0.3, 2, 2), (0.6, 2, 1)])
@torch.no_grad()
def test_unet_with_token_merging_equals_tomesd(ratio, max_downsample, batch):
    unet = randomize_(UNet(TINY), seed=1).eval()
    g = torch.Generator().manual_seed(2)
    x, ctx = torch.randn(batch, 4, 16, 16, generator=g), torch.randn(batch, 7, TINY.context_dim, generator=g)
    t = torch.tensor([700.0] * batch)
    settings = TokenMerging(ratio, max_downsample, seed=3)
    ours = unet(x, t, ctx, merger=TokenMerger(settings))
    plain = unet(x, t, ctx)
    info = {"size": (16, 16), "args": {"ratio": ratio, "max_downsample": max_downsample, "sx": 2, "sy": 2,
                                       "use_rand": True, "generator": torch.Generator().manual_seed(3),
                                       "merge_attn": True, "merge_crossattn": False, "merge_mlp": False}}
    _tomesd_blocks(unet, info)
    theirs = unet(x, t, ctx)
    assert rel_err(ours, theirs) < 1e-5
    assert rel_err(ours, plain) > 1e-3  # merging changes the output: the check can fail


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match=r"token merging ratio must be in \[0, 1\), got 1.0"):
        TokenMerging(1.0)
    with pytest.raises(ValueError, match="max_downsample must be 1, 2, 4 or 8, got 3"):
        TokenMerging(0.5, 3)
