"""FID against the pytorch-fid formula (scipy sqrtm), closed forms, and the .npz format."""

import numpy as np
import pytest
import scipy.linalg
import torch

from unfog.metrics.fid import (
    feature_statistics,
    fid_from_features,
    frechet_distance,
    load_statistics,
    save_statistics,
)


def reference_fid(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """pytorch-fid's calculate_frechet_distance (src/pytorch_fid/fid_score.py), verbatim maths."""
    diff = mu1 - mu2
    covmean = scipy.linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = scipy.linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        assert np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3)
        covmean = covmean.real
    return diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean)


def random_features(rng, n, d, near_singular=False):
    mix = rng.normal(size=(d, d)) / np.sqrt(d)
    f = rng.normal(size=(n, d)) @ mix + rng.normal(size=d)
    if near_singular:  # last column = a combination of the others + a tiny residual
        f[:, -1] = f[:, :-1] @ rng.normal(size=d - 1) + 1e-5 * rng.normal(size=n)
    return f


@pytest.mark.parametrize("d", [8, 64])
@pytest.mark.parametrize("near_singular", [False, True])
def test_matches_scipy_sqrtm_reference(d, near_singular):
    rng = np.random.default_rng(d + near_singular)
    f1 = random_features(rng, 4 * d, d, near_singular)
    f2 = 0.8 * random_features(rng, 4 * d, d, near_singular) + 0.3
    s1, s2 = feature_statistics(f1), feature_statistics(f2)
    ours, ref = frechet_distance(*s1, *s2), reference_fid(*s1, *s2)
    assert ours == pytest.approx(ref, rel=1e-6)


def test_rank_deficient_covariance_matches_reference():
    # Fewer samples than dimensions: both covariances are singular (rank 39 in 64 dims).
    rng = np.random.default_rng(7)
    s1 = feature_statistics(random_features(rng, 40, 64))
    s2 = feature_statistics(random_features(rng, 40, 64) + 0.5)
    assert frechet_distance(*s1, *s2) == pytest.approx(reference_fid(*s1, *s2), rel=1e-6)


def test_statistics_are_float64_mean_and_unbiased_covariance():
    f = torch.randn(50, 6, generator=torch.Generator().manual_seed(0))
    mu, sigma = feature_statistics(f)
    assert mu.dtype == sigma.dtype == np.float64 and mu.shape == (6,) and sigma.shape == (6, 6)
    np.testing.assert_allclose(mu, f.double().mean(0).numpy(), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(f.double().numpy(), rowvar=False), rtol=1e-12)


def test_distance_to_itself_is_zero():
    rng = np.random.default_rng(1)
    mu, sigma = feature_statistics(random_features(rng, 200, 64))
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-9 * np.trace(sigma))


def test_diagonal_gaussians_closed_form():
    rng = np.random.default_rng(2)
    mu1, mu2 = rng.normal(size=32), rng.normal(size=32)
    a, b = rng.uniform(0.01, 4.0, size=32), rng.uniform(0.01, 4.0, size=32)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    got = frechet_distance(mu1, np.diag(a), mu2, np.diag(b))
    assert got == pytest.approx(expected, rel=1e-8, abs=1e-8)


def test_symmetric_and_accepts_tensors():
    rng = np.random.default_rng(3)
    f1, f2 = random_features(rng, 100, 16), random_features(rng, 120, 16) * 1.5
    d12 = fid_from_features(torch.from_numpy(f1).float(), f2)
    d21 = fid_from_features(f2, f1)
    assert d12 == pytest.approx(d21, rel=1e-5)  # float32 input: only its rounding differs


def test_shape_errors_are_clear():
    mu, sigma = np.zeros(4), np.eye(4)
    with pytest.raises(ValueError, match="sigma1 must be"):
        frechet_distance(mu, np.eye(3), mu, sigma)
    with pytest.raises(ValueError, match="mu2 must be 1-D"):
        frechet_distance(mu, sigma, np.zeros((4, 1)), sigma)
    with pytest.raises(ValueError, match="feature dimensions differ"):
        frechet_distance(mu, sigma, np.zeros(5), np.eye(5))
    with pytest.raises(ValueError, match="2-D"):
        feature_statistics(np.zeros(10))
    with pytest.raises(ValueError, match="at least 2"):
        feature_statistics(np.zeros((1, 3)))
    with pytest.raises(ValueError, match="NaN"):
        feature_statistics(np.full((3, 3), np.nan))


def test_npz_round_trip(tmp_path):
    mu, sigma = feature_statistics(random_features(np.random.default_rng(4), 30, 8))
    path = tmp_path / "ref_stats.npz"
    save_statistics(path, mu, sigma)
    assert path.exists()
    with np.load(path) as data:
        assert sorted(data.files) == ["mu", "sigma"]
    mu2, sigma2 = load_statistics(path)
    assert mu2.dtype == np.float64
    np.testing.assert_array_equal(mu2, mu)
    np.testing.assert_array_equal(sigma2, sigma)


def test_load_statistics_names_missing_keys(tmp_path):
    path = tmp_path / "bad.npz"
    np.savez(path, mean=np.zeros(3))
    with pytest.raises(ValueError, match=r"lacks key\(s\) \['mu', 'sigma'\]; it has \['mean'\]"):
        load_statistics(path)
