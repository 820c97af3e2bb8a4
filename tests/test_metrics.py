"""Metrics against closed forms (and against scipy where it is installed)."""

from __future__ import annotations

import numpy as np
import pytest

from anchorflow.base.errors import ConfigError
from anchorflow.runtime.evaluation import metrics as M

RNG = np.random.default_rng(0)


def _rotation(d: int, seed: int = 1) -> np.ndarray:
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((d, d)))
    return q


def test_psnr_of_known_noise():
    # x = ref +- c_b elementwise, so mse_b = c_b^2 exactly and PSNR_b = 10 log10(R^2 / c_b^2).
    ref = RNG.uniform(-1, 1, (5, 1, 4, 4))
    c = np.array([0.1, 0.2, 0.05, 0.3, 0.01])
    signs = RNG.choice([-1.0, 1.0], ref.shape)
    x = ref + c[:, None, None, None] * signs
    expected = 10 * np.log10(2.0**2 / c**2)
    np.testing.assert_allclose(M.psnr_per_sample(x, ref, (-1.0, 1.0)), expected, rtol=1e-10)
    assert M.psnr(x, ref, (-1.0, 1.0)) == pytest.approx(expected.mean(), rel=1e-10)
    assert M.psnr(x, ref, 2.0) == pytest.approx(expected.mean(), rel=1e-10)  # span given directly
    assert M.rmse(x, ref) == pytest.approx(np.sqrt(np.mean(c**2)), rel=1e-10)


def test_psnr_identical_is_capped_and_bad_range_refused():
    x = RNG.standard_normal((3, 2))
    assert M.psnr(x, x, (-1, 1)) == M.MAX_PSNR_DB
    with pytest.raises(ConfigError, match="data_range"):
        M.psnr(x, x, (1.0, 1.0))
    with pytest.raises(ConfigError, match="same shape"):
        M.psnr(x, x[:2], (-1, 1))


@pytest.mark.parametrize("p", [1.0, 2.0, 4.0])
def test_empirical_order_recovers_power_law(p):
    nfes = np.array([2, 4, 8, 16, 32])
    errors = 3.0 * nfes**-p
    assert M.empirical_order(nfes, errors) == pytest.approx(p, abs=1e-10)
    # an exact (zero-error) point carries no slope and is dropped, not turned into -inf
    assert M.empirical_order([*nfes, 64], [*errors, 0.0]) == pytest.approx(p, abs=1e-10)


def test_empirical_order_needs_two_points():
    with pytest.raises(ConfigError, match="two distinct"):
        M.empirical_order([4, 8], [0.1, 0.0])


def test_frechet_distance_commuting_covariances_closed_form():
    # s1 = Q diag(a) Q^T, s2 = Q diag(b) Q^T commute, so tr sqrt(s1 s2) = sum sqrt(a b) and
    # FD = |mu1 - mu2|^2 + sum (sqrt a - sqrt b)^2.
    d = 6
    q = _rotation(d)
    a, b = RNG.uniform(0.1, 3, d), RNG.uniform(0.1, 3, d)
    mu1, mu2 = RNG.standard_normal(d), RNG.standard_normal(d)
    s1, s2 = (q * a) @ q.T, (q * b) @ q.T
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert M.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)
    assert M.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_symmetric_and_zero_for_identical_singular_stats():
    f = RNG.standard_normal((5, 8))  # 5 samples in 8-D: rank-deficient covariance
    mu, s = M.feature_statistics(f)
    # eigenvalues that should be 0 come out slightly negative; they must not turn into NaN
    assert M.frechet_distance(mu, s, mu, s) == pytest.approx(0.0, abs=1e-9)
    mu2, s2 = M.feature_statistics(RNG.standard_normal((20, 8)) * 2 + 1)
    assert M.frechet_distance(mu, s, mu2, s2) == pytest.approx(M.frechet_distance(mu2, s2, mu, s), rel=1e-9)


def test_frechet_distance_matches_scipy_sqrtm():
    linalg = pytest.importorskip("scipy.linalg")
    d = 10
    x1, x2 = RNG.standard_normal((40, d)), RNG.standard_normal((40, d)) @ RNG.standard_normal((d, d))
    mu1, s1 = M.feature_statistics(x1)
    mu2, s2 = M.feature_statistics(x2)
    covmean = linalg.sqrtm(s1 @ s2).real
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)
    assert M.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8)


def test_feature_statistics_and_accuracy():
    # Hand-computed truth (not np.cov again): mean (1, 1); deviations (0, 1), (2, -1), (-2, 0), (0, 0);
    # the unbiased covariance sums their outer products and divides by N - 1 = 3.
    f = np.array([[1.0, 2.0], [3.0, 0.0], [-1.0, 1.0], [1.0, 1.0]])
    mu, s = M.feature_statistics(f)
    np.testing.assert_allclose(mu, [1.0, 1.0], rtol=0, atol=1e-15)
    np.testing.assert_allclose(s, [[8 / 3, -2 / 3], [-2 / 3, 2 / 3]], rtol=0, atol=1e-15)
    # one feature (D = 1) is still a (1, 1) matrix: 1, 2, 3 has unbiased variance 1
    assert M.feature_statistics(np.array([[1.0], [2.0], [3.0]]))[1].tolist() == [[1.0]]
    logits = np.array([[2.0, 1.0], [0.0, 3.0], [1.0, 0.5], [0.2, 0.1]])
    assert M.class_accuracy(logits, np.array([0, 1, 1, 1])) == 0.5
    with pytest.raises(ConfigError, match="labels"):
        M.class_accuracy(logits, np.array([0, 1]))


def test_sliced_wasserstein_identical_and_shifted():
    a = RNG.standard_normal((500, 2))
    assert M.sliced_wasserstein(a, a, n_proj=64, seed=0) == 0.0
    assert M.sliced_wasserstein(a, a[::-1], n_proj=64, seed=0) == 0.0  # order does not matter
    # b = a + d: every projection shifts by theta.d, so SW2 = sqrt(mean (theta.d)^2) -> |d|/sqrt(2)
    # in 2-D. With 4000 directions the mean of cos^2 has std 0.35/sqrt(4000) = 0.0056 around 0.5,
    # i.e. ~0.6 % on the square root; 3 % is > 5 sigma.
    d = np.array([1.0, -2.0])
    got = M.sliced_wasserstein(a, a + d, n_proj=4000, seed=1)
    assert got == pytest.approx(np.linalg.norm(d) / np.sqrt(2), rel=0.03)


def test_sliced_wasserstein_unequal_sizes():
    # two samples of one Gaussian: the estimate is sampling noise, O(n^-1/2) ~ 0.02-0.05;
    # a unit shift gives about 1/sqrt(2) = 0.71.
    a, b = RNG.standard_normal((3000, 2)), RNG.standard_normal((2000, 2))
    same = M.sliced_wasserstein(a, b, n_proj=128)
    shifted = M.sliced_wasserstein(a, b + np.array([1.0, 0.0]), n_proj=128)
    assert same < 0.1
    assert shifted == pytest.approx(1 / np.sqrt(2), rel=0.15)
    with pytest.raises(ConfigError, match="point clouds"):
        M.sliced_wasserstein(a, b[:, :1])
