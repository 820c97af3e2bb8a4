"""One-step explicit Runge-Kutta solvers, as Butcher tableaus consumed by one generic step.

Time runs from t = 1 (noise) to t = 0 (data); with ``dt = t_{i+1} - t_i < 0``,
``x_{i+1} = x_i + dt * sum_j b_j k_j`` and ``k_j = v(x_i + dt * sum_l a_jl k_l, t_i + c_j dt)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..field import GuidedField
from ..registry import register
from ..result import SolverOutput, StepRecord


@dataclass(frozen=True)
class Tableau:
    """Explicit Butcher tableau: ``a`` strictly lower-triangular rows, weights ``b``, nodes ``c``."""

    a: tuple[tuple[float, ...], ...]
    b: tuple[float, ...]
    c: tuple[float, ...]


EULER = Tableau(a=((),), b=(1.0,), c=(0.0,))
MIDPOINT = Tableau(a=((), (0.5,)), b=(0.0, 1.0), c=(0.0, 0.5))
HEUN = Tableau(a=((), (1.0,)), b=(0.5, 0.5), c=(0.0, 1.0))
RK4 = Tableau(
    a=((), (0.5,), (0.0, 0.5), (0.0, 0.0, 1.0)),
    b=(1 / 6, 1 / 3, 1 / 3, 1 / 6),
    c=(0.0, 0.5, 0.5, 1.0),
)


def rk_step(field: Callable[[np.ndarray, float], np.ndarray], x: np.ndarray, t: float, dt: float,
            tab: Tableau) -> np.ndarray:
    """One explicit RK step from t to t + dt (dt < 0 integrates toward data).

    ``field(x, t) -> v`` is a guided :class:`GuidedField` in the solvers, or any callable of
    that form (e.g. the reference integrator of :mod:`anchorflow.runtime.analytic`).
    """
    ks: list[np.ndarray] = []
    for a_row, c in zip(tab.a, tab.c):
        xi = x
        for a, k in zip(a_row, ks):
            if a:
                xi = xi + (dt * a) * k
        ks.append(field(xi, t + c * dt))
    out = x
    for b, k in zip(tab.b, ks):
        if b:
            out = out + (dt * b) * k
    return out


def _run(tab: Tableau, field: GuidedField, x: np.ndarray, grid: np.ndarray) -> SolverOutput:
    steps = []
    for i in range(len(grid) - 1):
        t, t_next = float(grid[i]), float(grid[i + 1])
        x = rk_step(field, x, t, t_next - t, tab)
        steps.append(StepRecord(i, t, t_next, calls=len(tab.b)))
    return SolverOutput(x, steps)


@register("euler", calls_per_step=1, order=1, summary="Euler, 1 call per step")
def euler(field: GuidedField, x: np.ndarray, grid: np.ndarray) -> SolverOutput:
    """Explicit Euler."""
    return _run(EULER, field, x, grid)


@register("midpoint", calls_per_step=2, order=2, summary="explicit midpoint (RK2), 2 calls per step", min_nfe=2)
def midpoint(field: GuidedField, x: np.ndarray, grid: np.ndarray) -> SolverOutput:
    """Explicit midpoint rule."""
    return _run(MIDPOINT, field, x, grid)


@register("heun", calls_per_step=2, order=2, summary="Heun (trapezoidal RK2), 2 calls per step", min_nfe=2)
def heun(field: GuidedField, x: np.ndarray, grid: np.ndarray) -> SolverOutput:
    """Heun's method (explicit trapezoidal rule)."""
    return _run(HEUN, field, x, grid)


@register("rk4", calls_per_step=4, order=4, summary="classic Runge-Kutta 4, 4 calls per step", min_nfe=4)
def rk4(field: GuidedField, x: np.ndarray, grid: np.ndarray) -> SolverOutput:
    """Classic fourth-order Runge-Kutta."""
    return _run(RK4, field, x, grid)
