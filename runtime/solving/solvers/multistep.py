"""Multistep solvers, one backbone call per step: Adams-Bashforth 2, iPNDM, DPM-Solver++(2M).

Time runs from t = 1 (noise) to t = 0 (data) on any decreasing grid; ``dt = t_{i+1} - t_i < 0``.
The state is (B, ...); the history holds guided velocities (one per earlier grid point).
"""

from __future__ import annotations

import functools
import math

import numpy as np

from ....base.errors import ConfigError
from ..estimate import ErrorEstimate, adams_difference
from ..field import GuidedField
from ..registry import register
from ..result import SolverOutput, StepRecord


def adams_weights(times: np.ndarray, t_next: float) -> np.ndarray:
    """Variable-step Adams-Bashforth weights: ``x_{n+1} = x_n + dt * sum_j w_j f_j``.

    ``times`` (m,) are the past nodes, oldest first, ending at the current t_n; ``dt = t_next - t_n``.
    The weights integrate the Lagrange interpolant of the f_j over [t_n, t_next] exactly, i.e.
    they solve ``sum_j w_j u_j^p = 1 / (p + 1)`` for p < m, with ``u_j = (t_j - t_n) / dt``. On a
    uniform grid u = (.., -2, -1, 0) and they are the textbook coefficients (m = 2: [-1, 3] / 2;
    m = 4: [-9, 37, -59, 55] / 24).
    """
    times = np.asarray(times, dtype=np.float64)
    u = (times - times[-1]) / (t_next - times[-1])
    m = u.size
    return np.linalg.solve(np.vander(u, m, increasing=True).T, 1.0 / np.arange(1, m + 1))


@functools.lru_cache(maxsize=1024)
def _weights(times: tuple[float, ...], t_next: float) -> tuple[float, ...]:
    """:func:`adams_weights` as Python floats, computed once per (nodes, t_next): a solve on the
    same grid again reuses them (np.linalg.solve costs more than the rest of a step at batch 1)."""
    return tuple(float(w) for w in adams_weights(np.array(times), t_next))


def _adams(field: GuidedField, x: np.ndarray, grid: np.ndarray, order: int) -> SolverOutput:
    """Adams-Bashforth of ``order`` with the lower-order warm start (Euler, AB2, ...)."""
    ts: list[float] = []
    vs: list[np.ndarray] = []
    steps, est = [], ErrorEstimate()
    for i in range(len(grid) - 1):
        t, t_next = float(grid[i]), float(grid[i + 1])
        ts, vs = (ts + [t])[-order:], (vs + [field(x, t)])[-order:]
        w = _weights(tuple(ts), t_next)
        x = x + (t_next - t) * sum(wj * vj for wj, vj in zip(w, vs))
        if len(ts) > 1:  # the lower-order companion on the same history (runtime/solving/estimate.py)
            est.add(adams_difference(w, _weights(tuple(ts[1:]), t_next), vs, t_next - t))
        steps.append(StepRecord(i, t, t_next, calls=1, info={"order": len(ts)}))
    return SolverOutput(x, steps, error_estimate=est.value(x.shape[0]))


@register("ab2", calls_per_step=1, order=2, summary="Adams-Bashforth 2 (variable step), 1 call per step")
def ab2(field: GuidedField, x: np.ndarray, grid: np.ndarray) -> SolverOutput:
    """Two-step Adams-Bashforth, exact variable-step coefficients, Euler for the first step."""
    return _adams(field, x, grid, 2)


@register("ipndm", calls_per_step=1, order=4, summary="iPNDM (Adams-Bashforth up to 4, warm start), 1 call per step")
def ipndm(field: GuidedField, x: np.ndarray, grid: np.ndarray, order: int = 4) -> SolverOutput:
    """iPNDM (Zhang & Chen 2023, "Fast sampling of diffusion models with exponential integrator").

    Adams-Bashforth of ``order`` (1..4, default 4) with the lower-order warm start: Euler, then
    AB2, AB3, AB4 once enough history exists. On a uniform grid the coefficients are exactly
    the paper's; on other grids the variable-step Adams weights of :func:`adams_weights` are used
    (the "iPNDM-v" form), not the uniform coefficients. The Euler warm start makes the global
    order 2 asymptotically; at few steps the AB4 steps dominate and the error falls faster.
    """
    if isinstance(order, bool) or order not in (1, 2, 3, 4):
        raise ConfigError(f"ipndm order must be 1, 2, 3 or 4, got {order!r}")
    return _adams(field, x, grid, int(order))


def _lam(t: float) -> float:
    """Half log-SNR of the linear path, ``log(alpha_t / sigma_t) = log((1 - t) / t)``; -inf at t = 1."""
    return -math.inf if t >= 1.0 else (math.inf if t <= 0.0 else math.log((1.0 - t) / t))


@register("dpmpp2m", calls_per_step=1, order=2, summary="DPM-Solver++(2M) for flows (data prediction), 1 call per step")
def dpmpp2m(field: GuidedField, x: np.ndarray, grid: np.ndarray) -> SolverOutput:
    """DPM-Solver++(2M) (Lu et al. 2022, arXiv 2211.01095) on the linear path.

    With ``alpha_t = 1 - t``, ``sigma_t = t``, the data prediction is ``x0 = x - t v`` and the
    exponential-integrator step t -> t' reads ``x' = (t'/t) x + ((t - t')/t) D`` where
    ``D = (1 + 1/(2r)) x0_n - 1/(2r) x0_{n-1}``, ``r = h_{n-1} / h_n`` and ``h = lambda' - lambda``.
    End points: lambda(1) = -inf, so the first step (and the second, whose r is infinite) use
    D = x0_n (first order; identical to Euler on this path); the last step to t = 0 returns the
    data prediction D = x0_n ("lower order final", as the reference code does). A bounded number
    of first-order steps keeps the global order 2.
    """
    steps = []
    x0_prev = None
    for i in range(len(grid) - 1):
        t, t_next = float(grid[i]), float(grid[i + 1])
        x0 = x - t * field(x, t)
        d = x0
        if x0_prev is not None and t_next > 0.0 and math.isfinite(_lam(float(grid[i - 1]))):
            r = (_lam(t) - _lam(float(grid[i - 1]))) / (_lam(t_next) - _lam(t))
            d = (1.0 + 0.5 / r) * x0 - (0.5 / r) * x0_prev
        x = (t_next / t) * x + ((t - t_next) / t) * d
        steps.append(StepRecord(i, t, t_next, calls=1, info={"order": 1 if d is x0 else 2}))
        x0_prev = x0
    return SolverOutput(x, steps)
