"""UniPC (bh2) for flow matching: a unified predictor-corrector, one backbone call per step.

Zhao et al., "UniPC: A Unified Predictor-Corrector Framework for Fast Sampling of Diffusion
Models" (NeurIPS 2023, arXiv 2302.04867), in its data-prediction form with ``B(h) = e^h - 1``
("bh2") as diffusers' UniPCMultistepScheduler runs it for flows (``lower_order_final``, warm
start from order 1). On the linear path ``alpha_t = 1 - t``, ``sigma_t = t``, the data
prediction is ``m = x - t v`` and ``lambda_t = log(alpha_t / sigma_t)``. The corrector reuses
the model output at the predicted point (no extra call), so N steps cost N calls.

Time runs from t = 1 (noise; lambda = -inf) to t = 0 (data; lambda = +inf): history points
with an infinite lambda carry no finite difference and lower the order (at t = 1 the first
step is first order, as for DPM-Solver++ here); the last step is first order (it returns m).
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np

from ....base.errors import ConfigError
from ..estimate import ErrorEstimate
from ..field import GuidedField
from ..registry import register
from ..result import SolverOutput, StepRecord


def _lam(t: float) -> float:
    """``log(alpha_t / sigma_t) = log((1 - t) / t)``; -inf at t = 1, +inf at t = 0."""
    return -math.inf if t >= 1.0 else (math.inf if t <= 0.0 else math.log((1.0 - t) / t))


def _rhs(rks: list[float], hh: float) -> tuple[np.ndarray, np.ndarray]:
    """UniPC's linear system for ``len(rks)`` = order: R[i] = rks^i, b[i] = i! phi_{i+1}(hh) / B(hh)."""
    order = len(rks)
    h_phi_1 = math.expm1(hh)
    b_h = math.expm1(hh)  # bh2: B(h) = e^h - 1 (with hh = -h for data prediction)
    h_phi_k, fact, b = h_phi_1 / hh - 1.0, 1.0, []
    for i in range(1, order + 1):
        b.append(h_phi_k * fact / b_h)
        fact *= i + 1
        h_phi_k = h_phi_k / hh - 1.0 / fact
    rk = np.asarray(rks, np.float64)
    return np.stack([rk ** i for i in range(order)]), np.asarray(b)


def _update(x_s: np.ndarray, t_s: float, t: float, hist: list[tuple[float, np.ndarray]], order: int,
            m_t: Optional[np.ndarray]) -> np.ndarray:
    """One UniP (``m_t`` None) or UniC (``m_t``: data prediction at t) update from (x_s, t_s) to t.

    ``hist``: (lambda, data prediction) pairs, newest last; the newest is at t_s. Uses
    ``order - 1`` older finite-lambda points (fewer when they are not there).
    """
    lam_s, m0 = hist[-1]
    lam_t = _lam(t)
    h = lam_t - lam_s
    older = [(lam, m) for lam, m in reversed(hist[:-1]) if math.isfinite(lam)] if math.isfinite(h) else []
    older = older[: order - 1]
    rks = [(lam - lam_s) / h for lam, _ in older]
    d1s = [(m - m0) / rk for (_, m), rk in zip(older, rks)]
    hh = -h
    alpha_t, sigma_t, sigma_s = 1.0 - t, t, t_s
    x_t = (sigma_t / sigma_s) * x_s - (alpha_t * math.expm1(hh)) * m0
    r, b = _rhs([*rks, 1.0], hh)
    if m_t is None:  # predictor
        if not d1s:
            return x_t
        rhos = np.array([0.5]) if len(d1s) == 1 else np.linalg.solve(r[:-1, :-1], b[:-1])
        res = sum(float(p) * d for p, d in zip(rhos, d1s))
    else:  # corrector: the new point's own difference joins the older ones
        rhos = np.array([0.5]) if not d1s else np.linalg.solve(r, b)
        res = sum(float(p) * d for p, d in zip(rhos[:-1], d1s)) + float(rhos[-1]) * (m_t - m0)
    return x_t - (alpha_t * math.expm1(hh)) * res


@register("unipc", calls_per_step=1, order=2, summary="UniPC-bh2 for flows (data prediction), 1 call per step")
def unipc(field: GuidedField, x: np.ndarray, grid: np.ndarray, order: int = 2) -> SolverOutput:
    """UniPC with B(h) = e^h - 1 (arXiv 2302.04867; diffusers' default ``solver_order = 2``, 3 also
    common for unguided sampling): per step the corrector UniC (with the new data prediction),
    then the predictor UniP of order ``min(order, steps done + 1, steps left)``."""
    if isinstance(order, bool) or order not in (1, 2, 3):
        raise ConfigError(f"unipc order must be 1, 2 or 3, got {order!r}")
    hist: list[tuple[float, np.ndarray]] = []
    est = ErrorEstimate(signed=True)
    steps, last = [], None  # last: (state before the previous predictor, its time, that predictor's order)
    n = len(grid) - 1
    for i in range(n):
        t, t_next = float(grid[i]), float(grid[i + 1])
        m = x - t * field(x, t)
        if last is not None:
            x_pred, x = x, _update(last[0], last[1], t, hist, last[2], m)
            est.add(x - x_pred)  # UniC - UniP (runtime/solving/estimate.py)
        hist = (hist + [(_lam(t), m)])[-order:]
        k = min(order, i + 1, n - i)
        last = (x, t, k)
        x = _update(x, t, t_next, hist, k, None)
        steps.append(StepRecord(i, t, t_next, calls=1, info={"order": k}))
    return SolverOutput(x, steps, error_estimate=est.value(x.shape[0]))
