"""Quality metrics for generated samples, in numpy only (no scipy, no torch).

Used by the benchmark (``anchorflow.bench``), defined here:
PSNR / RMSE against a reference solution of the same noise, the empirical convergence order,
a Frechet distance between classifier-feature statistics (as FID, Heusel et al. 2017,
"GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash Equilibrium", with a
project-trained classifier instead of Inception), class accuracy, and the sliced Wasserstein
distance for low-dimensional data (Rabin et al. 2011, "Wasserstein Barycenter and its
Application to Texture Mixing").

Shapes: samples are (B, ...) arrays; per-sample quantities reduce over every non-batch axis.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import numpy as np

from ...base.errors import ConfigError

DataRange = Union[float, Sequence[float]]

# PSNR of two identical samples is infinite; per-sample values are capped here so averages and
# JSON reports stay finite (200 dB is far beyond float32 round-off, about 140 dB for range 2).
MAX_PSNR_DB = 200.0


def _pair(x: np.ndarray, ref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    if x.shape != ref.shape:
        raise ConfigError(f"samples and reference must have the same shape, got {x.shape} and {ref.shape}")
    if x.ndim < 1 or x.shape[0] == 0:
        raise ConfigError(f"samples need a non-empty batch axis, shape (B, ...); got {x.shape}")
    return x.reshape(x.shape[0], -1), ref.reshape(ref.shape[0], -1)


def _span(data_range: DataRange) -> float:
    """``hi - lo`` from a ``(lo, hi)`` pair, or a span given directly as one number."""
    r = np.asarray(data_range, np.float64)
    span = float(r) if r.ndim == 0 else float(r[1] - r[0]) if r.shape == (2,) else float("nan")
    if not np.isfinite(span) or span <= 0:
        raise ConfigError(f"data_range must be (lo, hi) with hi > lo, or a positive span; got {data_range!r}")
    return span


def psnr_per_sample(x: np.ndarray, ref: np.ndarray, data_range: DataRange) -> np.ndarray:
    """PSNR in dB of each sample against its reference: ``10 log10(R^2 / mse_b)``, shape (B,).

    ``data_range`` is the data's own ``(lo, hi)`` (R = hi - lo) or R itself. Values are capped
    at :data:`MAX_PSNR_DB` (identical samples).
    """
    a, b = _pair(x, ref)
    mse = np.mean((a - b) ** 2, axis=1)
    span = _span(data_range)
    floor = span**2 * 10.0 ** (-MAX_PSNR_DB / 10.0)
    return 10.0 * np.log10(span**2 / np.maximum(mse, floor))


def psnr(x: np.ndarray, ref: np.ndarray, data_range: DataRange) -> float:
    """Mean over the batch of :func:`psnr_per_sample` (dB)."""
    return float(np.mean(psnr_per_sample(x, ref, data_range)))


def rmse(x: np.ndarray, ref: np.ndarray) -> float:
    """Root mean squared error over every element of the batch."""
    a, b = _pair(x, ref)
    return float(np.sqrt(np.mean((a - b) ** 2)))


def empirical_order(nfes: Sequence[float], errors: Sequence[float]) -> float:
    """Convergence order p from a least-squares fit of ``log(error) = c - p log(NFE)``.

    Returns p = minus the slope of log error against log NFE (Euler -> about 1, RK4 -> about 4).
    Pairs whose error is zero (exact to round-off) carry no slope information and are dropped.
    """
    n, e = np.asarray(nfes, np.float64), np.asarray(errors, np.float64)
    if n.shape != e.shape or n.ndim != 1:
        raise ConfigError(f"nfes and errors must be 1-D and of equal length, got {n.shape} and {e.shape}")
    keep = (e > 0) & (n > 0) & np.isfinite(e)
    if np.unique(n[keep]).size < 2:
        raise ConfigError("the empirical order needs at least two distinct NFE values with a positive error")
    slope = np.polyfit(np.log(n[keep]), np.log(e[keep]), 1)[0]
    return float(-slope)


def _psd_eig(w: np.ndarray) -> np.ndarray:
    """Eigenvalues of a PSD matrix with round-off removed: anything below D * eps * max|w| -> 0.

    Without this a singular covariance (fewer samples than features) yields eigenvalues of
    about +-1e-16 whose square roots (1e-8) would leak into the distance.
    """
    tol = w.size * np.finfo(np.float64).eps * max(float(np.max(np.abs(w), initial=0.0)), 1e-300)
    return np.where(w > tol, w, 0.0)


def _sym_sqrt(s: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix (via ``eigh``)."""
    w, u = np.linalg.eigh((s + s.T) / 2.0)
    return (u * np.sqrt(_psd_eig(w))) @ u.T


def trace_sqrt_product(s1: np.ndarray, s2: np.ndarray) -> float:
    """``tr sqrt(s1 s2)`` for covariances s1, s2 (D, D).

    ``s1 s2`` is similar to the symmetric PSD matrix ``s1^1/2 s2 s1^1/2``, whose eigenvalues
    are computed with ``eigh``; round-off makes the zero ones slightly +-, and they are set to 0.
    """
    r = _sym_sqrt(s1)
    m = r @ s2 @ r
    return float(np.sum(np.sqrt(_psd_eig(np.linalg.eigvalsh((m + m.T) / 2.0)))))


def frechet_distance(mu1: np.ndarray, s1: np.ndarray, mu2: np.ndarray, s2: np.ndarray) -> float:
    """Frechet (2-Wasserstein) distance squared between N(mu1, s1) and N(mu2, s2).

    ``|mu1 - mu2|^2 + tr(s1) + tr(s2) - 2 tr sqrt(s1 s2)``; mu (D,), s (D, D). This is the FID
    formula (Heusel et al. 2017); here the features come from the project's own classifier.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(s1, np.float64)), np.atleast_2d(np.asarray(s2, np.float64))
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise ConfigError(
            f"Frechet distance needs means (D,) and covariances (D, D) of one D; got {mu1.shape}, {s1.shape}, "
            f"{mu2.shape}, {s2.shape}"
        )
    diff = mu1 - mu2
    fd = diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * trace_sqrt_product(s1, s2)
    return float(max(fd, 0.0))


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and unbiased covariance (D, D) of features (N, D), N >= 2."""
    f = np.asarray(features, np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ConfigError(f"feature statistics need features of shape (N, D) with N >= 2, got {f.shape}")
    return f.mean(axis=0), np.atleast_2d(np.cov(f, rowvar=False))


def class_accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of rows whose arg-max logit (N, C) equals the asked label (N,)."""
    logits, labels = np.asarray(logits), np.asarray(labels)
    if logits.ndim != 2 or labels.shape != (logits.shape[0],):
        raise ConfigError(f"accuracy needs logits (N, C) and labels (N,), got {logits.shape} and {labels.shape}")
    return float(np.mean(np.argmax(logits, axis=1) == labels))


def _quantiles(p: np.ndarray, m: int) -> np.ndarray:
    """Sorted projections (n, P) -> m quantiles per column (m, P) at levels (k + 1/2) / m."""
    s = np.sort(p, axis=0)
    if s.shape[0] == m:
        return s
    return np.quantile(s, (np.arange(m) + 0.5) / m, axis=0)


def sliced_wasserstein(a: np.ndarray, b: np.ndarray, n_proj: int = 256, seed: Optional[int] = 0) -> float:
    """Sliced 2-Wasserstein distance between two point clouds a (N, D) and b (M, D).

    ``sqrt(mean over random unit directions theta of W2^2(a theta, b theta))``; each 1-D W2 is
    exact from sorted projections (equal sizes) or from matched quantiles (unequal sizes).
    Directions are drawn uniformly on the sphere from ``seed``.
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(a.shape[0], b.shape[0]) < 1:
        raise ConfigError(f"sliced Wasserstein needs point clouds (N, D) and (M, D), got {a.shape} and {b.shape}")
    if int(n_proj) < 1:
        raise ConfigError(f"n_proj must be >= 1, got {n_proj}")
    theta = np.random.default_rng(seed).standard_normal((a.shape[1], int(n_proj)))
    theta /= np.linalg.norm(theta, axis=0, keepdims=True)
    m = max(a.shape[0], b.shape[0])
    qa, qb = _quantiles(a @ theta, m), _quantiles(b @ theta, m)
    return float(np.sqrt(np.mean((qa - qb) ** 2)))
