"""One-step explicit Runge-Kutta solvers, as Butcher tableaus consumed by one generic step.

Time runs from t = 1 (noise) to t = 0 (data); with ``dt = t_{i+1} - t_i < 0``,
``x_{i+1} = x_i + dt * sum_j b_j k_j`` and ``k_j = v(x_i + dt * sum_l a_jl k_l, t_i + c_j dt)``.
The adaptive Dormand-Prince 5(4) reference of the benchmark is one more tableau here (with
embedded weights) driven by :func:`adaptive_solve`, over the same stage function.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from ..field import GuidedField
from ..registry import register
from ..result import SolverOutput, StepRecord


@dataclass(frozen=True)
class Tableau:
    """Explicit Butcher tableau: ``a`` strictly lower-triangular rows, weights ``b``, nodes ``c``.

    ``b_low``: embedded lower-order weights of an adaptive pair (None for fixed-step methods);
    ``fsal``: the last stage is evaluated at the new state, so it is the next step's first.
    """

    a: tuple[tuple[float, ...], ...]
    b: tuple[float, ...]
    c: tuple[float, ...]
    b_low: Optional[tuple[float, ...]] = None
    fsal: bool = False


EULER = Tableau(a=((),), b=(1.0,), c=(0.0,))
MIDPOINT = Tableau(a=((), (0.5,)), b=(0.0, 1.0), c=(0.0, 0.5))
HEUN = Tableau(a=((), (1.0,)), b=(0.5, 0.5), c=(0.0, 1.0))
RK4 = Tableau(
    a=((), (0.5,), (0.0, 0.5), (0.0, 0.0, 1.0)),
    b=(1 / 6, 1 / 3, 1 / 3, 1 / 6),
    c=(0.0, 0.5, 0.5, 1.0),
)


# Dormand & Prince (1980), "A family of embedded Runge-Kutta formulae": 5th-order solution b,
# embedded 4th-order b_low; the 7th stage is evaluated at the new state (first same as last).
_DP_B = (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84)
DOPRI5 = Tableau(
    a=((), (1 / 5,), (3 / 40, 9 / 40), (44 / 45, -56 / 15, 32 / 9),
       (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
       (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656), _DP_B),
    b=(*_DP_B, 0.0),
    c=(0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0),
    b_low=(5179 / 57600, 0.0, 7571 / 16695, 393 / 640, -92097 / 339200, 187 / 2100, 1 / 40),
    fsal=True,
)

Field = Callable[[np.ndarray, float], np.ndarray]


def _combine(x: np.ndarray, dt: float, weights: tuple[float, ...], ks: list[np.ndarray]) -> np.ndarray:
    """``x + dt * sum_j w_j k_j`` over the nonzero weights."""
    out = x
    for w, k in zip(weights, ks):
        if w:
            out = out + (dt * w) * k
    return out


def rk_stages(field: Field, x: np.ndarray, t: float, dt: float, tab: Tableau,
              k1: Optional[np.ndarray] = None) -> list[np.ndarray]:
    """The stage velocities k_j of one step from t to t + dt (``k1`` given: the first is not recomputed)."""
    ks: list[np.ndarray] = []
    for a_row, c in zip(tab.a, tab.c):
        ks.append(k1 if not ks and k1 is not None else field(_combine(x, dt, a_row, ks), t + c * dt))
    return ks


def rk_step(field: Field, x: np.ndarray, t: float, dt: float, tab: Tableau) -> np.ndarray:
    """One explicit RK step from t to t + dt (dt < 0 integrates toward data).

    ``field(x, t) -> v`` is a guided :class:`GuidedField` in the solvers, or any callable of
    that form (e.g. the reference integrator of :mod:`anchorflow.runtime.evaluation.analytic`).
    """
    return _combine(x, dt, tab.b, rk_stages(field, x, t, dt, tab))


def adaptive_solve(field: Field, x: np.ndarray, tab: Tableau = DOPRI5, rtol: float = 1e-6, atol: float = 1e-6,
                   h0: float = 0.02, max_steps: int = 100_000) -> tuple[np.ndarray, dict]:
    """Adaptive embedded RK (default Dormand-Prince 5(4)) from t = 1 (noise, ``x``) to t = 0.

    The error norm is the RMS over every element of ``err / (atol + rtol max(|x|, |x_new|))``
    with ``err = dt sum_j (b_j - b_low_j) k_j``; steps with norm > 1 are retried, sizes follow
    ``0.9 norm^(-1/5)`` clipped to [0.2, 5]. Returns x at t = 0 and the accepted/rejected counts.
    """
    if tab.b_low is None:
        raise ValueError("adaptive_solve needs a tableau with embedded weights (b_low)")
    diff = tuple(b - bl for b, bl in zip(tab.b, tab.b_low))
    t, h, k1 = 1.0, h0, field(x, 1.0)
    accepted = rejected = 0
    while t > 0.0:
        h = min(h, t)
        ks = rk_stages(field, x, t, -h, tab, k1)
        x_new, err = _combine(x, -h, tab.b, ks), _combine(np.zeros_like(x), -h, diff, ks)
        norm = float(np.sqrt(np.mean((err / (atol + rtol * np.maximum(np.abs(x), np.abs(x_new)))) ** 2)))
        if norm <= 1.0:
            t, x, accepted = (0.0 if h >= t else t - h), x_new, accepted + 1
            k1 = ks[-1] if tab.fsal else field(x, t) if t > 0.0 else None
        else:
            rejected += 1
        h *= min(5.0, max(0.2, 0.9 * norm ** -0.2)) if norm > 0 else 5.0
        if accepted + rejected > max_steps:
            raise RuntimeError(f"adaptive solve did not finish in {max_steps} steps")
    return x, {"accepted_steps": accepted, "rejected_steps": rejected}


def fixed_step_solve(field: Field, x: np.ndarray, grid: np.ndarray, tab: Tableau) -> np.ndarray:
    """Every step of ``grid`` (decreasing, t = 1 -> 0) with ``tab``, no special last step: x at grid[-1]."""
    for t, t_next in zip(grid[:-1], grid[1:]):
        x = rk_step(field, x, float(t), float(t_next) - float(t), tab)
    return x


def _run(tab: Tableau, field: GuidedField, x: np.ndarray, grid: np.ndarray, euler_last: bool = False) -> SolverOutput:
    """Steps of ``tab`` over the grid; ``euler_last``: the step that ends at t = 0 is an Euler step,
    so the network is never called at t = 0 (k-diffusion's ``sample_heun``, EDM Algorithm 1)."""
    steps = []
    for i in range(len(grid) - 1):
        t, t_next = float(grid[i]), float(grid[i + 1])
        step = EULER if euler_last and i == len(grid) - 2 else tab
        x = rk_step(field, x, t, t_next - t, step)
        steps.append(StepRecord(i, t, t_next, calls=len(step.b)))
    return SolverOutput(x, steps)


@register("euler", calls_per_step=1, order=1, summary="Euler, 1 call per step")
def euler(field: GuidedField, x: np.ndarray, grid: np.ndarray) -> SolverOutput:
    """Explicit Euler."""
    return _run(EULER, field, x, grid)


@register("midpoint", calls_per_step=2, order=2, summary="explicit midpoint (RK2), 2 calls per step", min_nfe=2)
def midpoint(field: GuidedField, x: np.ndarray, grid: np.ndarray) -> SolverOutput:
    """Explicit midpoint rule (its stages never reach t = 0)."""
    return _run(MIDPOINT, field, x, grid)


@register("heun", calls_per_step=2, order=2, min_nfe=3, last_calls=1,
          summary="Heun (trapezoidal RK2), 2 calls per step, Euler last step (EDM): 2N - 1 calls")
def heun(field: GuidedField, x: np.ndarray, grid: np.ndarray) -> SolverOutput:
    """Heun's method as k-diffusion and EDM (Karras et al. 2022, Algorithm 1) run it: the last
    step, to t = 0, is an Euler step (no call at t = 0)."""
    return _run(HEUN, field, x, grid, euler_last=True)


@register("rk4", calls_per_step=4, order=4, summary="classic Runge-Kutta 4, 4 calls per step", min_nfe=4)
def rk4(field: GuidedField, x: np.ndarray, grid: np.ndarray) -> SolverOutput:
    """Classic fourth-order Runge-Kutta on every step (the plain method; references use it)."""
    return _run(RK4, field, x, grid)


@register("rk4e", calls_per_step=4, order=2, min_nfe=5, last_calls=1,
          summary="RK4 with an Euler last step (no call at t = 0): 4N - 3 calls")
def rk4e(field: GuidedField, x: np.ndarray, grid: np.ndarray) -> SolverOutput:
    """Classic fourth-order Runge-Kutta, the last step (to t = 0) an Euler step as for Heun.

    The Euler step's O(h^2) local error makes the global order 2 (Heun keeps its order 2)."""
    return _run(RK4, field, x, grid, euler_last=True)
