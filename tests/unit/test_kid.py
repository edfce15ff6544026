"""KID (``unfog.metrics.kid``) against references written here from the formula in float64 numpy
(Bińkowski et al. 2018, eq. 2, with k(x, y) = (x.y/d + 1)^3), and against the population value of
MMD^2 between two finite distributions, which the unbiased estimator must hit on average."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from unfog.metrics.kid import KIDResult, kernel_inception_distance, mmd2_unbiased, polynomial_kernel


def k(a: np.ndarray, b: np.ndarray) -> float:
    return (float(a @ b) / a.shape[0] + 1.0) ** 3


def mmd2_by_loops(x: np.ndarray, y: np.ndarray) -> float:
    """The estimator term by term: pairs i != j within each set, all pairs across."""
    m, n = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i, j in itertools.permutations(range(m), 2)) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i, j in itertools.permutations(range(n), 2)) / (n * (n - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return xx + yy - 2 * xy


def kid_reference(f1, f2, num_subsets, subset_size, seed):
    """Subsets drawn as documented (features1 first, then features2, without replacement)."""
    rng = np.random.default_rng(seed)
    m = min(subset_size, len(f1), len(f2))
    values = [mmd2_by_loops(f1[rng.choice(len(f1), m, replace=False)], f2[rng.choice(len(f2), m, replace=False)])
              for _ in range(num_subsets)]
    return np.mean(values), np.std(values)


def gaussian(n, d, shift=0.0, seed=0):
    return np.random.default_rng(seed).normal(size=(n, d)) + shift


def test_kernel_is_cubic_polynomial():
    x, y = gaussian(3, 5, seed=1), gaussian(4, 5, seed=2)
    expected = np.array([[k(a, b) for b in y] for a in x])
    np.testing.assert_allclose(polynomial_kernel(x, y), expected, rtol=1e-14)


@pytest.mark.parametrize("m, n", [(9, 9), (7, 12)])
def test_mmd2_matches_term_by_term_reference(m, n):
    x, y = gaussian(m, 6, seed=3), gaussian(n, 6, shift=0.3, seed=4)
    assert mmd2_unbiased(x, y) == pytest.approx(mmd2_by_loops(x, y), rel=1e-12, abs=1e-14)


def test_kid_matches_reference_on_the_same_subsets():
    f1, f2 = gaussian(40, 8, seed=5), gaussian(30, 8, shift=0.2, seed=6)
    result = kernel_inception_distance(f1, f2, num_subsets=5, subset_size=12, generator=7)
    mean, std = kid_reference(f1, f2, 5, 12, seed=7)
    assert isinstance(result, KIDResult) and (result.num_subsets, result.subset_size) == (5, 12)
    assert result.mean == pytest.approx(mean, rel=1e-6, abs=1e-12)
    assert result.std == pytest.approx(std, rel=1e-6, abs=1e-12)


def test_subset_size_is_capped_and_full_sets_do_not_depend_on_the_seed():
    f1, f2 = gaussian(15, 4, seed=8), gaussian(11, 4, shift=0.5, seed=9)
    a = kernel_inception_distance(f1, f2, num_subsets=1, subset_size=1000, generator=0)
    assert a.subset_size == 11
    full = kernel_inception_distance(f1[:11], f2, num_subsets=3, subset_size=1000, generator=1)
    assert full.mean == pytest.approx(mmd2_by_loops(f1[:11], f2), rel=1e-12)  # every subset is the whole set
    assert full.std == pytest.approx(0.0, abs=1e-12)


def test_generator_makes_it_reproducible_and_accepts_torch_float32():
    f1 = torch.randn(50, 6, generator=torch.Generator().manual_seed(0))
    f2 = torch.randn(50, 6, generator=torch.Generator().manual_seed(1)) + 0.1
    a = kernel_inception_distance(f1, f2, num_subsets=4, subset_size=20, generator=np.random.default_rng(3))
    b = kernel_inception_distance(f1.numpy().astype(np.float64), f2.numpy().astype(np.float64), 4, 20, 3)
    assert a == b
    assert kernel_inception_distance(f1, f2, 4, 20, generator=4) != a


def test_same_distribution_is_near_zero_and_a_shift_is_positive():
    d = 16
    same = kernel_inception_distance(gaussian(400, d, seed=10), gaussian(400, d, seed=11), 20, 200, generator=0)
    shifted = kernel_inception_distance(gaussian(400, d, seed=10), gaussian(400, d, 0.5, seed=11), 20, 200, generator=0)
    assert abs(same.mean) < 3 * same.std + 1e-3
    assert shifted.mean > 0 and shifted.mean > 50 * abs(same.mean) and shifted.mean > 5 * shifted.std


def test_unbiased_on_average_against_the_population_mmd():
    """P, Q uniform on 4 points each: MMD^2(P, Q) = E k(p, p') + E k(q, q') - 2 E k(p, q) over
    independent draws is a finite sum. Feature sets holding each point 500 times stand for P and Q;
    the mean over many small subsets must hit the population value (1.5% off here, 4000 subsets),
    where the biased V-statistic (diagonal kept) would be 60% too high at this subset size."""
    rng = np.random.default_rng(12)
    a, b = rng.normal(size=(4, 3)), rng.normal(size=(4, 3)) + 0.4
    population = (polynomial_kernel(a, a).mean() + polynomial_kernel(b, b).mean()
                  - 2 * polynomial_kernel(a, b).mean())
    x, y = np.repeat(a, 500, axis=0), np.repeat(b, 500, axis=0)
    result = kernel_inception_distance(x, y, num_subsets=4000, subset_size=8, generator=13)
    assert result.mean == pytest.approx(population, rel=0.05)


def test_invalid_inputs_are_refused():
    f = gaussian(10, 4)
    with pytest.raises(ValueError, match="feature dimensions differ"):
        kernel_inception_distance(f, gaussian(10, 5))
    with pytest.raises(ValueError, match="num_subsets must be >= 1"):
        kernel_inception_distance(f, f, num_subsets=0)
    with pytest.raises(ValueError, match="subset_size must be >= 2"):
        kernel_inception_distance(f, f, subset_size=1)
    with pytest.raises(ValueError, match="at least 2 vectors"):
        mmd2_unbiased(f[:1], f)
    with pytest.raises(ValueError, match="NaN or infinite"):
        kernel_inception_distance(np.full((3, 4), np.nan), f)
