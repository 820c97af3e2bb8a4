"""Closed-form test problem: a Gaussian-mixture data distribution on the linear path.

Data ``x0 ~ sum_k pi_k N(mu_k, s_k^2 I)`` in D dimensions, noise ``eps ~ N(0, I)``, and the
linear path ``x_t = (1 - t) x0 + t eps`` (t = 1 noise, t = 0 data). Given component k,
``(x0, eps, x_t)`` is jointly Gaussian with

    x_t | k ~ N(m_k, S_k I),  m_k = (1 - t) mu_k,  S_k = (1 - t)^2 s_k^2 + t^2,
    Cov(eps - x0, x_t | k) = (t - (1 - t) s_k^2) I,

so the conditional expectation of the velocity ``eps - x0`` is linear in x_t per component:

    E[eps - x0 | x_t, k] = -mu_k + (t - (1 - t) s_k^2) / S_k * (x_t - m_k),

and the marginal velocity field (the flow-matching target, Lipman et al. 2023) is the average
under the posterior component weights ``r_k(x, t) ∝ pi_k N(x; m_k, S_k I)``:

    v(x, t) = sum_k r_k(x, t) E[eps - x0 | x_t = x, k].

Integrating ``dx/dt = v`` from t = 1 to 0 transports N(0, I) exactly onto the mixture, so a
solver's error against :func:`exact_flow` is pure discretisation error. Components may carry a
class label; a label selects its components (classifier-free guidance can then be tested), and
the null label ``C = num_classes`` selects the full mixture. Numpy only; states of any shape
(B, ...) are flattened to D = prod(...) dimensions. Used by the solver tests and the benchmark.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import numpy as np

from ...base.errors import ConfigError

TimeLike = float | np.ndarray


class GaussianMixture:
    """Isotropic Gaussian mixture data with its exact flow-matching velocity.

    Args:
        means: (K, D) or (K, *state_shape) component means mu_k.
        stds: (K,) per-component standard deviations s_k > 0 (or one float for all).
        weights: (K,) mixture weights pi_k (normalised here); None: uniform.
        classes: (K,) class of each component in 0..C-1, or None for an unconditional mixture.

    The instance is a ``velocity(x, t, cond)`` callable (see :class:`anchorflow.runtime.Velocity`).
    """

    def __init__(
        self,
        means: np.ndarray,
        stds: float | Sequence[float] | np.ndarray,
        weights: Optional[Sequence[float] | np.ndarray] = None,
        classes: Optional[Sequence[int] | np.ndarray] = None,
    ) -> None:
        means = np.asarray(means, dtype=np.float64)
        if means.ndim < 2:
            raise ConfigError(f"means must have shape (K, D) or (K, *state_shape), got {means.shape}")
        k = means.shape[0]
        self.state_shape = tuple(means.shape[1:])
        self.means = means.reshape(k, -1)
        self.stds = np.broadcast_to(np.asarray(stds, dtype=np.float64), (k,)).copy()
        if not np.all(self.stds > 0):
            raise ConfigError("every component standard deviation must be > 0")
        w = np.full(k, 1.0 / k) if weights is None else np.asarray(weights, dtype=np.float64)
        if w.shape != (k,) or not np.all(w > 0):
            raise ConfigError(f"weights must be {k} positive numbers")
        self.log_weights = np.log(w / w.sum())
        self.classes = None if classes is None else np.asarray(classes, dtype=np.int64)
        if self.classes is not None and (self.classes.shape != (k,) or self.classes.min() < 0):
            raise ConfigError(f"classes must be {k} labels in 0..C-1")
        self.num_classes = 0 if self.classes is None else int(self.classes.max()) + 1
        self.null_label = self.num_classes

    @classmethod
    def random(cls, state_shape: tuple[int, ...], components: int, classes: int = 0, seed: int = 0,
               spread: float = 1.5, std: tuple[float, float] = (0.3, 0.6)) -> "GaussianMixture":
        """A reproducible random mixture: means ~ N(0, spread^2), stds ~ U(std), components
        dealt round-robin to ``classes`` labels (0: unconditional)."""
        rng = np.random.default_rng(seed)
        means = spread * rng.standard_normal((components, *state_shape))
        stds = rng.uniform(std[0], std[1], components)
        weights = rng.uniform(0.5, 1.5, components)
        labels = np.arange(components) % classes if classes else None
        return cls(means, stds, weights, labels)

    # -- the field ----------------------------------------------------------------------------
    def _mask(self, y: Optional[np.ndarray], batch: int) -> Optional[np.ndarray]:
        """(B, K) bool: the components each row's label allows (None: all of them)."""
        if y is None or self.classes is None:
            return None
        y = np.asarray(y, dtype=np.int64).reshape(-1)
        if y.shape != (batch,) or y.min() < 0 or y.max() > self.null_label:
            raise ConfigError(f"labels must be (B,) integers in 0..{self.null_label} ({self.null_label} = null)")
        return (self.classes[None, :] == y[:, None]) | (y[:, None] == self.null_label)

    def velocity(self, x: np.ndarray, t: TimeLike, cond: Optional[dict] = None) -> np.ndarray:
        """Exact ``v(x, t, cond)``: x (B, ...) with prod(...) = D, t scalar or (B,), cond None or
        ``{"y": (B,) labels}`` (a bare (B,) label array is accepted too, for tests)."""
        y = cond.get("y") if isinstance(cond, dict) else cond
        b = x.shape[0]
        xf = np.asarray(x, dtype=np.float64).reshape(b, -1)
        if xf.shape[1] != self.means.shape[1]:
            raise ConfigError(f"state has {xf.shape[1]} dims per sample, the mixture {self.means.shape[1]}")
        tt = np.broadcast_to(np.asarray(t, dtype=np.float64).reshape(-1), (b,))[:, None]  # (B, 1)
        var = (1.0 - tt) ** 2 * self.stds**2 + tt**2  # (B, K)
        diff = xf[:, None, :] - (1.0 - tt)[:, :, None] * self.means[None]  # (B, K, D)
        logp = self.log_weights - 0.5 * xf.shape[1] * np.log(var) - 0.5 * np.sum(diff**2, -1) / var
        mask = self._mask(y, b)
        if mask is not None:
            logp = np.where(mask, logp, -np.inf)
        resp = np.exp(logp - logp.max(axis=1, keepdims=True))
        resp /= resp.sum(axis=1, keepdims=True)  # posterior r_k(x, t), (B, K)
        gain = (tt - (1.0 - tt) * self.stds**2) / var  # (B, K)
        v = -resp @ self.means + np.einsum("bk,bkd->bd", resp * gain, diff)
        return v.reshape(x.shape).astype(np.result_type(x.dtype, np.float32), copy=False)

    __call__ = velocity

    def sample(self, n: int, rng: np.random.Generator, y: Optional[np.ndarray] = None) -> np.ndarray:
        """``n`` data samples (t = 0), shape (n, *state_shape); ``y`` (n,) restricts each to its class."""
        logits = np.broadcast_to(self.log_weights, (n, len(self.stds)))
        mask = self._mask(y, n)
        if mask is not None:
            logits = np.where(mask, logits, -np.inf)
        gumbel = logits - np.log(-np.log(rng.uniform(size=logits.shape)))
        comp = np.argmax(gumbel, axis=1)
        x = self.means[comp] + self.stds[comp, None] * rng.standard_normal((n, self.means.shape[1]))
        return x.reshape(n, *self.state_shape)


def exact_flow(velocity: Callable, x: np.ndarray, t_from: TimeLike = 1.0, t_to: TimeLike = 0.0,
               cond: Optional[dict] = None, steps: int = 1000) -> np.ndarray:
    """Reference solution of ``dx/dt = velocity(x, t, cond)`` from ``t_from`` to ``t_to`` (either way).

    Classic RK4 in float64 with ``steps`` equal sub-steps; ``t_from`` / ``t_to`` may be scalars
    or per-sample (B,) arrays (one shared step count, so the batch stays one call). The
    substitution ``t = t_from + s (t_to - t_from)``, s in [0, 1], gives every sample the same
    s-grid. Global error O((|t_to - t_from| / steps)^4): about 1e-12 for the mixtures of
    :meth:`GaussianMixture.random` at the default (the tests check it by halving ``steps``).
    """
    from ..solving.solvers.classic import RK4, rk_step

    b = x.shape[0]
    t0 = np.broadcast_to(np.asarray(t_from, dtype=np.float64).reshape(-1), (b,))
    span = np.broadcast_to(np.asarray(t_to, dtype=np.float64).reshape(-1), (b,)) - t0
    span_x = span.reshape(b, *([1] * (x.ndim - 1)))

    def ds_field(z: np.ndarray, s: float) -> np.ndarray:  # dx/ds = span * v(x, t(s))
        return span_x * velocity(z, t0 + s * span, cond)

    z = np.asarray(x, dtype=np.float64)
    for s in np.linspace(0.0, 1.0, int(steps) + 1)[:-1]:
        z = rk_step(ds_field, z, float(s), 1.0 / steps, RK4)
    return z


class ExactSideNet:
    """The ideal SideNet: ``delta = v(Phi(x; t -> t - h), t - h) - v`` along the exact flow.

    A ``sidenet(x, v, t, h, cond)`` callable (per-sample t and h, (B,)) for tests and as the
    benchmark's upper bound. ``scale`` multiplies delta (``scale < 1``: a systematically
    under-trained SideNet whose error grows with |h|). ``steps`` sub-steps per call.
    """

    def __init__(self, velocity: Callable, scale: float = 1.0, steps: int = 200) -> None:
        self.velocity, self.scale, self.steps, self.calls = velocity, float(scale), int(steps), 0

    def __call__(self, x: np.ndarray, v: np.ndarray, t: np.ndarray, h: np.ndarray,
                 cond: Optional[dict]) -> np.ndarray:
        self.calls += 1
        target = np.asarray(t, np.float64) - np.asarray(h, np.float64)
        x_end = exact_flow(self.velocity, x, t, target, cond, steps=self.steps)
        delta = self.velocity(x_end, target, cond) - np.asarray(v, np.float64)
        return (self.scale * delta).astype(x.dtype, copy=False)
