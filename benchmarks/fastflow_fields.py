"""Closed-form velocity fields for the FastFlow benchmark, with their exact flows.

Time convention: t = 1 noise, t = 0 data; states (B, 1, 8, 8) (float32 in, float32 out; float64
in, float64 out); each field is a
``velocity(x, t, cond)`` callable that ignores ``cond`` (it is unconditional) and has an exact
solution ``flow(x1) -> x(0)``, so a solver's error is pure discretisation error.

- :class:`Relax`: stiff linear relaxation toward a moving target c(t),
  ``v = lam(t) (x - c(t)) + c'(t)``, ``lam(t) = lam0 + lam1 (1 - t)^2`` (stiffer toward the
  data: lam(0) = 42, so Euler-50's lam h reaches 0.84). Exact:
  ``x(0) = c(0) + (x(1) - c(1)) exp(-(lam0 + lam1 / 3))``.
- :class:`Swirl`: pixel pairs rotate about a centre m at a rate that bursts around t = 1/2,
  ``v = alpha (x - m) + omega(t) J (x - m)``, ``omega(t) = omega0 exp(-((t - 1/2) / w)^2)``:
  the difficulty sits in one part of the trajectory, which is where a bandit can beat a fixed
  skip pattern. omega0 = 8 (peak omega h = 0.16 on 50 steps) keeps Euler-50 near converged, as a
  generative model's 50-step trajectory is; at omega0 = 20 Euler-50 itself is at 24 dB. Exact: ``x(0) - m = exp(-alpha) R(-W) (x(1) - m)``, ``W = int_0^1 omega``.
- :class:`AnisoMixture`: a Gaussian mixture whose components have per-pixel (diagonal)
  standard deviations, its exact flow-matching velocity in closed form (the path
  ``x_t = (1 - t) x_0 + t eps``); the end state has no closed form, so it is measured against
  RK4 with many steps. A held-out field: none of FastFlow's defaults were chosen on it.
"""

from __future__ import annotations

import math

import numpy as np

SHAPE = (1, 8, 8)


def _times(t, b: int) -> np.ndarray:
    return np.broadcast_to(np.asarray(t, np.float64).reshape(-1), (b,)).reshape(b, 1, 1, 1)


class Relax:
    """Stiff relaxation toward c(t) = a + b t^2 (a, b fixed random images)."""

    name = "relax (stiff linear relaxation, lam(0) = 42)"

    def __init__(self, lam0: float = 2.0, lam1: float = 40.0, seed: int = 1) -> None:
        rng = np.random.default_rng(seed)
        self.lam0, self.lam1 = lam0, lam1
        self.a = 0.8 * rng.standard_normal(SHAPE)
        self.b = 0.8 * rng.standard_normal(SHAPE)

    def __call__(self, x: np.ndarray, t, cond=None) -> np.ndarray:
        tt = _times(t, x.shape[0])
        lam = self.lam0 + self.lam1 * (1.0 - tt) ** 2
        c = self.a + self.b * tt**2
        return (lam * (np.asarray(x, np.float64) - c) + 2.0 * self.b * tt).astype(np.result_type(x.dtype, np.float32))

    def flow(self, x1: np.ndarray) -> np.ndarray:
        decay = math.exp(-(self.lam0 + self.lam1 / 3.0))
        return self.a + (np.asarray(x1, np.float64) - (self.a + self.b)) * decay


class Swirl:
    """Damped rotation of pixel pairs about m, with a rotation burst around t = 1/2."""

    name = "swirl (rotation burst at t = 0.5, 1.4 rad in all)"

    def __init__(self, alpha: float = 0.5, omega0: float = 8.0, width: float = 0.1, seed: int = 2) -> None:
        self.alpha, self.omega0, self.width = alpha, omega0, width
        self.m = 0.7 * np.random.default_rng(seed).standard_normal(SHAPE)

    def _pairs(self, x: np.ndarray) -> np.ndarray:
        return (np.asarray(x, np.float64) - self.m).reshape(x.shape[0], -1, 2)

    def __call__(self, x: np.ndarray, t, cond=None) -> np.ndarray:
        b = x.shape[0]
        tt = np.broadcast_to(np.asarray(t, np.float64).reshape(-1), (b,))[:, None]
        omega = self.omega0 * np.exp(-(((tt - 0.5) / self.width) ** 2))
        d = self._pairs(x)
        rot = np.stack([-d[..., 1], d[..., 0]], axis=-1)  # J d
        v = self.alpha * d + omega[..., None] * rot
        return v.reshape(x.shape).astype(np.result_type(x.dtype, np.float32))

    def flow(self, x1: np.ndarray) -> np.ndarray:
        w = self.omega0 * self.width * math.sqrt(math.pi) * math.erf(0.5 / self.width)  # int_0^1 omega
        d = self._pairs(x1)
        c, s = math.cos(-w), math.sin(-w)
        rotated = np.stack([c * d[..., 0] - s * d[..., 1], s * d[..., 0] + c * d[..., 1]], axis=-1)
        return self.m + (math.exp(-self.alpha) * rotated).reshape(x1.shape)


class AnisoMixture:
    """Gaussian mixture with diagonal (anisotropic) components: ``x_0 ~ sum_k pi_k N(m_k, diag(s_k^2))``.

    Per component, ``x_t | k ~ N((1 - t) m_k, diag(var_k))`` with ``var_k = (1 - t)^2 s_k^2 + t^2``
    and ``E[eps - x_0 | x_t, k] = -m_k + (t - (1 - t) s_k^2) / var_k * (x_t - (1 - t) m_k)``
    (per pixel); v is that mean under the posterior of k. Stds span ``std`` across pixels *within*
    a component (ratio 25 by default), so stiffness differs per direction.
    """

    name = "aniso (Gaussian mixture, 12 diagonal components, per-pixel stds 0.02-0.5)"

    def __init__(self, components: int = 12, spread: float = 0.7, std: tuple[float, float] = (0.02, 0.5),
                 seed: int = 4) -> None:
        rng = np.random.default_rng(seed)
        d = int(np.prod(SHAPE))
        self.means = spread * rng.standard_normal((components, d))
        self.stds = np.exp(rng.uniform(math.log(std[0]), math.log(std[1]), (components, d)))
        w = rng.uniform(0.5, 1.5, components)
        self.log_w = np.log(w / w.sum())

    def __call__(self, x: np.ndarray, t, cond=None) -> np.ndarray:
        b = x.shape[0]
        xf = np.asarray(x, np.float64).reshape(b, 1, -1)
        tt = np.broadcast_to(np.asarray(t, np.float64).reshape(-1), (b,))[:, None, None]
        var = (1.0 - tt) ** 2 * self.stds[None] ** 2 + tt ** 2  # (B, K, D)
        diff = xf - (1.0 - tt) * self.means[None]
        logp = self.log_w - 0.5 * np.sum(np.log(var) + diff ** 2 / var, axis=-1)  # (B, K)
        r = np.exp(logp - logp.max(axis=1, keepdims=True))
        r /= r.sum(axis=1, keepdims=True)
        vk = -self.means[None] + (tt - (1.0 - tt) * self.stds[None] ** 2) / var * diff
        v = np.einsum("bk,bkd->bd", r, vk)
        return v.reshape(x.shape).astype(np.result_type(x.dtype, np.float32))
