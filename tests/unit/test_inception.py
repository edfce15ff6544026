"""Contracts of the FID Inception-v3 (``unfog.metrics.inception``).

The official weights cannot be fetched here, so the file is imitated: random values in exactly
the layout of pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` (``tests/fixtures/
fid_inception_layout.json``, transcribed from torchvision's constructors, see its generator),
written by ``torch.save`` in the legacy format the official file uses. Each block is checked
against a functional re-implementation written here from the architecture (Szegedy et al. 2016,
figs. 5-7, and the FID graph's pooling quirks), with ``F.conv2d`` and the batch-norm formula on the
same weights.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from unfog.metrics.inception import (
    FID_WEIGHTS_SHA256,
    FID_WEIGHTS_URL,
    FIDInceptionV3,
    load_fid_inception,
    resize_for_inception,
)

pytestmark = pytest.mark.usefixtures("single_thread")  # tests/conftest.py

LAYOUT = json.loads((Path(__file__).resolve().parents[1] / "fixtures/fid_inception_layout.json").read_text())
EPS = 0.001  # batch norm eps of the TF graph


def official_random_weights(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random, well-scaled values for every tensor of the official layout (not our module's)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in LAYOUT["tensors"].items():
        if name.endswith("conv.weight") or name == "fc.weight":
            fan_in = math.prod(shape[1:])
            out[name] = torch.randn(shape, generator=g) * math.sqrt(2.0 / fan_in)
        elif name.endswith("running_var"):
            out[name] = 0.5 + torch.rand(shape, generator=g)
        elif name.endswith("bn.weight"):
            out[name] = 0.5 + torch.rand(shape, generator=g)
        else:  # bn.bias, running_mean, fc.bias
            out[name] = 0.1 * torch.randn(shape, generator=g)
    return out


@pytest.fixture(scope="module")
def weights() -> dict[str, torch.Tensor]:
    return official_random_weights()


@pytest.fixture(scope="module")
def model(weights) -> FIDInceptionV3:
    net = FIDInceptionV3().double().eval()
    net.load_state_dict({k: v.double() for k, v in weights.items()}, strict=False)
    return net


# ---------------------------------------------------------------------------------------------
# A functional reference, written from the architecture.


def ref_conv(x, w, name, stride=1, padding=0):
    """conv (no bias) -> batch norm with running statistics (eps 0.001) -> ReLU."""
    y = F.conv2d(x, w[f"{name}.conv.weight"], stride=stride, padding=padding)
    shape = (1, -1, 1, 1)
    mean, var = w[f"{name}.bn.running_mean"].view(shape), w[f"{name}.bn.running_var"].view(shape)
    y = (y - mean) / torch.sqrt(var + EPS) * w[f"{name}.bn.weight"].view(shape) + w[f"{name}.bn.bias"].view(shape)
    return torch.relu(y)


def same(k):
    """'SAME' padding of a stride-1 kernel (kh, kw)."""
    return (k[0] // 2, k[1] // 2)


def ref_pool3(x, kind, count_include_pad=False):
    if kind == "max":
        return F.max_pool2d(x, 3, stride=1, padding=1)
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=count_include_pad)


def ref_a(x, w, p, count_include_pad=False):
    """Fig. 5: 1x1 | 1x1 -> 5x5 | 1x1 -> 3x3 -> 3x3 | avg pool -> 1x1."""
    b1 = ref_conv(x, w, f"{p}.branch1x1")
    b5 = ref_conv(ref_conv(x, w, f"{p}.branch5x5_1"), w, f"{p}.branch5x5_2", padding=2)
    b3 = ref_conv(x, w, f"{p}.branch3x3dbl_1")
    b3 = ref_conv(b3, w, f"{p}.branch3x3dbl_2", padding=1)
    b3 = ref_conv(b3, w, f"{p}.branch3x3dbl_3", padding=1)
    bp = ref_conv(ref_pool3(x, "avg", count_include_pad), w, f"{p}.branch_pool")
    return torch.cat([b1, b5, b3, bp], 1)


def ref_b(x, w, p):
    """Grid reduction 35 -> 17: 3x3/2 | 1x1 -> 3x3 -> 3x3/2 | max pool 3x3/2."""
    b3 = ref_conv(x, w, f"{p}.branch3x3", stride=2)
    d = ref_conv(ref_conv(x, w, f"{p}.branch3x3dbl_1"), w, f"{p}.branch3x3dbl_2", padding=1)
    d = ref_conv(d, w, f"{p}.branch3x3dbl_3", stride=2)
    return torch.cat([b3, d, F.max_pool2d(x, 3, stride=2)], 1)


def ref_c(x, w, p, count_include_pad=False):
    """Fig. 6, n = 7: 1x1 | 1x1 -> 1x7 -> 7x1 | 1x1 -> 7x1 -> 1x7 -> 7x1 -> 1x7 | avg pool -> 1x1."""
    b1 = ref_conv(x, w, f"{p}.branch1x1")
    b7 = ref_conv(x, w, f"{p}.branch7x7_1")
    b7 = ref_conv(b7, w, f"{p}.branch7x7_2", padding=same((1, 7)))
    b7 = ref_conv(b7, w, f"{p}.branch7x7_3", padding=same((7, 1)))
    d = ref_conv(x, w, f"{p}.branch7x7dbl_1")
    for i, k in zip(range(2, 6), [(7, 1), (1, 7), (7, 1), (1, 7)]):
        d = ref_conv(d, w, f"{p}.branch7x7dbl_{i}", padding=same(k))
    bp = ref_conv(ref_pool3(x, "avg", count_include_pad), w, f"{p}.branch_pool")
    return torch.cat([b1, b7, d, bp], 1)


def ref_d(x, w, p):
    """Grid reduction 17 -> 8: 1x1 -> 3x3/2 | 1x1 -> 1x7 -> 7x1 -> 3x3/2 | max pool 3x3/2."""
    b3 = ref_conv(ref_conv(x, w, f"{p}.branch3x3_1"), w, f"{p}.branch3x3_2", stride=2)
    b7 = ref_conv(x, w, f"{p}.branch7x7x3_1")
    b7 = ref_conv(b7, w, f"{p}.branch7x7x3_2", padding=same((1, 7)))
    b7 = ref_conv(b7, w, f"{p}.branch7x7x3_3", padding=same((7, 1)))
    b7 = ref_conv(b7, w, f"{p}.branch7x7x3_4", stride=2)
    return torch.cat([b3, b7, F.max_pool2d(x, 3, stride=2)], 1)


def ref_e(x, w, p, pool, count_include_pad=False):
    """Fig. 7: 1x1 | 1x1 -> (1x3 ; 3x1) | 1x1 -> 3x3 -> (1x3 ; 3x1) | pool -> 1x1."""
    b1 = ref_conv(x, w, f"{p}.branch1x1")
    s = ref_conv(x, w, f"{p}.branch3x3_1")
    b3 = torch.cat([ref_conv(s, w, f"{p}.branch3x3_2a", padding=(0, 1)),
                    ref_conv(s, w, f"{p}.branch3x3_2b", padding=(1, 0))], 1)
    d = ref_conv(ref_conv(x, w, f"{p}.branch3x3dbl_1"), w, f"{p}.branch3x3dbl_2", padding=1)
    d = torch.cat([ref_conv(d, w, f"{p}.branch3x3dbl_3a", padding=(0, 1)),
                   ref_conv(d, w, f"{p}.branch3x3dbl_3b", padding=(1, 0))], 1)
    bp = ref_conv(ref_pool3(x, pool, count_include_pad), w, f"{p}.branch_pool")
    return torch.cat([b1, b3, d, bp], 1)


def ref_features(x, w):
    """The whole pool3 network, in [-1, 1] -> (B, 2048)."""
    x = ref_conv(x, w, "Conv2d_1a_3x3", stride=2)
    x = ref_conv(x, w, "Conv2d_2a_3x3")
    x = F.max_pool2d(ref_conv(x, w, "Conv2d_2b_3x3", padding=1), 3, stride=2)
    x = ref_conv(x, w, "Conv2d_3b_1x1")
    x = F.max_pool2d(ref_conv(x, w, "Conv2d_4a_3x3"), 3, stride=2)
    for p in ("Mixed_5b", "Mixed_5c", "Mixed_5d"):
        x = ref_a(x, w, p)
    x = ref_b(x, w, "Mixed_6a")
    for p in ("Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e"):
        x = ref_c(x, w, p)
    x = ref_d(x, w, "Mixed_7a")
    x = ref_e(x, w, "Mixed_7b", "avg")
    x = ref_e(x, w, "Mixed_7c", "max")
    return x.mean(dim=(2, 3))


def _w64(weights):
    return {k: v.double() for k, v in weights.items()}


# ---------------------------------------------------------------------------------------------
# Layout and loading.


def test_module_has_exactly_the_official_layout():
    ours = {k: list(v.shape) for k, v in FIDInceptionV3().state_dict().items()
            if not k.endswith("num_batches_tracked")}
    assert ours == LAYOUT["tensors"]
    assert sum(math.prod(s) for s in ours.values()) == LAYOUT["num_values"] == 23_885_392


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_official_layout_file_loads_every_tensor(tmp_path, weights, suffix):
    path = tmp_path / f"pt_inception-2015-12-05-6726825d{suffix}"
    if suffix == ".pth":
        torch.save(weights, path, _use_new_zipfile_serialization=False)  # the official file's format
    else:
        from safetensors.torch import save_file

        save_file(weights, str(path))
    net = load_fid_inception(path)
    assert not net.training and not any(p.requires_grad for p in net.parameters())
    state = net.state_dict()
    for name, value in weights.items():  # every tensor of the file is consumed, unchanged
        assert torch.equal(state[name], value), name
    assert set(state) - set(weights) == {k for k in state if k.endswith("num_batches_tracked")}
    images = torch.rand(2, 3, 64, 80, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        feats = net(images)
    assert feats.shape == (2, 2048) and feats.dtype == torch.float32 and torch.isfinite(feats).all()


def test_num_batches_tracked_entries_are_accepted(tmp_path, weights):
    path = tmp_path / "with_counters.pth"
    counters = {k: torch.tensor(0) for k in FIDInceptionV3().state_dict() if k.endswith("num_batches_tracked")}
    torch.save({**weights, **counters}, path)
    assert torch.equal(load_fid_inception(path).fc.bias, weights["fc.bias"])


def test_wrong_files_are_refused_with_the_reason(tmp_path, weights):
    path = tmp_path / "bad.pth"
    cases = {
        "unknown tensors: AuxLogits.fc.weight": {**weights, "AuxLogits.fc.weight": torch.zeros(1008, 768)},
        "missing tensors: Mixed_7c.branch_pool.bn.running_var": {
            k: v for k, v in weights.items() if k != "Mixed_7c.branch_pool.bn.running_var"},
        "wrong shape: fc.weight": {**weights, "fc.weight": torch.zeros(1000, 2048)},
    }
    for message, tensors in cases.items():
        torch.save(tensors, path)
        with pytest.raises(ValueError, match=message.replace(".", r"\.")):
            load_fid_inception(path)


def test_missing_file_says_where_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        load_fid_inception(tmp_path / "nowhere.pth")
    assert FID_WEIGHTS_URL in str(err.value) and FID_WEIGHTS_SHA256 in str(err.value)
    assert FID_WEIGHTS_URL.endswith("pt_inception-2015-12-05-6726825d.pth")
    assert FID_WEIGHTS_SHA256.startswith("6726825d")


def test_checksum_is_checked_on_request(tmp_path, weights):
    path = tmp_path / "copy.safetensors"
    from safetensors.torch import save_file

    save_file(weights, str(path))
    with pytest.raises(ValueError, match="sha256 .* is not the official"):
        load_fid_inception(path, check_sha256=True)


def test_closed_option_sets_list_the_valid_values():
    with pytest.raises(ValueError, match="unknown resize 'bicubic'; valid choices: legacy, clean"):
        FIDInceptionV3(resize="bicubic")
    with pytest.raises(ValueError, match="unknown resize 'nearest'; valid choices: legacy, clean"):
        resize_for_inception(torch.rand(1, 3, 8, 8), "nearest")


# ---------------------------------------------------------------------------------------------
# The blocks against the reference.


@pytest.mark.parametrize(
    "block, ref, c_in, size",
    [
        ("Mixed_5b", ref_a, 192, 9),
        ("Mixed_5d", ref_a, 288, 9),
        ("Mixed_6a", ref_b, 288, 9),
        ("Mixed_6b", ref_c, 768, 9),
        ("Mixed_6e", ref_c, 768, 9),
        ("Mixed_7a", ref_d, 768, 9),
        ("Mixed_7b", lambda x, w, p: ref_e(x, w, p, "avg"), 1280, 5),
        ("Mixed_7c", lambda x, w, p: ref_e(x, w, p, "max"), 2048, 5),
    ],
)
def test_block_matches_reference(model, weights, block, ref, c_in, size):
    x = torch.randn(2, c_in, size, size + 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    with torch.no_grad():
        ours = getattr(model, block)(x)
    expected = ref(x, _w64(weights), block)
    assert ours.shape == expected.shape
    torch.testing.assert_close(ours, expected, rtol=1e-10, atol=1e-10)


def test_whole_network_matches_reference(model, weights):
    x = 2 * torch.rand(2, 3, 139, 151, generator=torch.Generator().manual_seed(3), dtype=torch.float64) - 1
    with torch.no_grad():
        ours = model.features(x)
    torch.testing.assert_close(ours, ref_features(x, _w64(weights)).float(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("block, ref, c_in", [("Mixed_5b", ref_a, 192), ("Mixed_6b", ref_c, 768),
                                              ("Mixed_7b", lambda x, w, p, c: ref_e(x, w, p, "avg", c), 1280)])
def test_average_pool_ignores_padding(model, weights, block, ref, c_in):
    """On a spatially constant input, TF's SAME average pool is constant up to the border; counting
    the zero padding (torchvision's ImageNet model) would darken the border. The pool branch is
    the last 192 (or pool_features) channels."""
    x = torch.full((1, c_in, 6, 6), 0.7, dtype=torch.float64)
    with torch.no_grad():
        ours = getattr(model, block)(x)
    pool_channels = getattr(model, block).branch_pool.conv.out_channels
    pooled = ours[:, -pool_channels:]  # (1, P, 6, 6)
    assert pooled.abs().max() > 0.1  # the case is not vacuous (ReLU did not zero it)
    assert torch.allclose(pooled, pooled[:, :, :1, :1].expand_as(pooled), atol=1e-12)
    w = _w64(weights)
    torch.testing.assert_close(ours, ref(x, w, block, False), rtol=1e-10, atol=1e-10)
    counting = ref(x, w, block, True)[:, -pool_channels:]
    assert (counting - pooled).abs().max() > 1e-3


def test_last_block_pools_by_max(model, weights):
    x = torch.randn(1, 2048, 4, 4, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    with torch.no_grad():
        ours = model.Mixed_7c(x)
    w = _w64(weights)
    torch.testing.assert_close(ours, ref_e(x, w, "Mixed_7c", "max"), rtol=1e-10, atol=1e-10)
    assert (ours - ref_e(x, w, "Mixed_7c", "avg")).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------------
# Resizing and input scaling.


def test_legacy_resize_is_bilinear_interpolate():
    images = torch.rand(2, 3, 40, 56, generator=torch.Generator().manual_seed(5))
    expected = F.interpolate(images, size=(299, 299), mode="bilinear", align_corners=False)
    assert torch.equal(resize_for_inception(images, "legacy"), expected)
    same_size = torch.rand(1, 3, 299, 299)
    assert torch.equal(resize_for_inception(same_size, "legacy"), same_size)


def test_clean_resize_is_pil_bicubic_per_channel():
    images = torch.rand(2, 3, 64, 48, generator=torch.Generator().manual_seed(6))
    out = resize_for_inception(images, "clean")
    assert out.shape == (2, 3, 299, 299) and out.dtype == torch.float32
    for b in range(2):
        for c in range(3):
            channel = Image.fromarray(images[b, c].numpy() * 255, mode="F").resize((299, 299), Image.BICUBIC)
            expected = np.clip(np.asarray(channel), 0, 255) / 255
            np.testing.assert_allclose(out[b, c].numpy(), expected, rtol=0, atol=1e-6)
    assert (out >= 0).all() and (out <= 1).all()  # bicubic overshoot is clipped, as in clean-fid
    legacy = resize_for_inception(images, "legacy")
    assert (out - legacy).abs().max() > 1e-3  # the two modes are different resamplings


def test_forward_resizes_then_maps_to_minus_one_one(model):
    net = FIDInceptionV3(resize="clean").double().eval()
    net.load_state_dict(model.state_dict())
    images = torch.rand(1, 3, 80, 80, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        for m, mode in ((model, "legacy"), (net, "clean")):
            x = resize_for_inception(images, mode).double()
            torch.testing.assert_close(m(images), m.features(2 * x - 1), rtol=0, atol=0)
