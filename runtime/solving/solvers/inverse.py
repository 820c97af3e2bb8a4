"""The training-free inversion baselines: RF-Solver's second-order Taylor step and FireFlow's reused midpoint.

Both are plain ODE solvers over a :class:`GuidedField` and work in either time direction (they only
use ``dt = t_{i+1} - t_i``); :func:`anchorflow.runtime.solving.invert.invert` runs them, as every solver,
from t = 0 (data) to t = 1 (noise). Time convention: t = 1 noise, t = 0 data.
"""

from __future__ import annotations

import numpy as np

from ..field import GuidedField
from ..registry import register
from ..result import SolverOutput, StepRecord


@register("rf-solver", calls_per_step=2, order=2, min_nfe=2,
          summary="RF-Solver-2: second-order Taylor step, derivative by a half-step difference, 2 calls per step")
def rf_solver(field: GuidedField, x: np.ndarray, grid: np.ndarray) -> SolverOutput:
    """RF-Solver (Wang et al. 2024, "Taming Rectified Flow for Inversion and Editing", arXiv 2411.04746).

    ``x' = x + dt v + dt^2 / 2 * dv/dt`` with ``dv/dt ~ (v(x + dt/2 v, t + dt/2) - v) / (dt/2)``: the
    paper's Taylor form, written as the paper writes it. Algebraically it is the explicit midpoint
    rule (the dt v terms cancel), so the iterates agree with ``midpoint`` to rounding.
    """
    steps = []
    for i in range(len(grid) - 1):
        t, t_next = float(grid[i]), float(grid[i + 1])
        dt = t_next - t
        v = field(x, t)
        v_mid = field(x + (0.5 * dt) * v, t + 0.5 * dt)
        dv = (v_mid - v) / (0.5 * dt)
        x = x + dt * v + (0.5 * dt * dt) * dv
        steps.append(StepRecord(i, t, t_next, calls=2))
    return SolverOutput(x, steps)


# calls: 2 in the first step, 1 in every later one; ``last_calls=2`` gives the registry that count
# (k (steps - 1) + last = steps + 1), so N calls buy N - 1 steps
@register("fireflow", calls_per_step=1, order=2, min_nfe=2, last_calls=2,
          summary="FireFlow: midpoint steps reusing the previous midpoint velocity, N calls for N - 1 steps")
def fireflow(field: GuidedField, x: np.ndarray, grid: np.ndarray) -> SolverOutput:
    """FireFlow (Deng et al. 2024, "FireFlow: Fast Inversion of Rectified Flow for Image Semantic
    Editing", arXiv 2412.07517): a midpoint step whose half step uses the previous step's midpoint
    velocity instead of a new call; one call per step after the first (which makes two)."""
    steps = []
    reused = None
    for i in range(len(grid) - 1):
        t, t_next = float(grid[i]), float(grid[i + 1])
        dt = t_next - t
        v = field(x, t) if reused is None else reused
        reused = field(x + (0.5 * dt) * v, t + 0.5 * dt)
        x = x + dt * reused
        steps.append(StepRecord(i, t, t_next, calls=2 if i == 0 else 1))
    return SolverOutput(x, steps)
