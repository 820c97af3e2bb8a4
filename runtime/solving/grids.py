"""Time grids from t = 1 (noise) to t = 0 (data)."""

from __future__ import annotations

from typing import Optional, Sequence, Union

import numpy as np

from ...base.errors import ConfigError

GridSpec = Union[None, str, Sequence[float], np.ndarray]


def uniform(steps: int) -> np.ndarray:
    """``t_i = 1 - i/N``, i = 0..N."""
    return np.linspace(1.0, 0.0, int(steps) + 1)


def shifted(steps: int, shift: float) -> np.ndarray:
    """SD3/FLUX time shift of the uniform grid: ``s t / (1 + (s - 1) t)``."""
    if not (shift > 0 and np.isfinite(shift)):
        raise ConfigError(f"grid shift must be > 0 and finite, got {shift}")
    t = uniform(steps)
    return _ends(shift * t / (1.0 + (shift - 1.0) * t))


def _ends(g: np.ndarray) -> np.ndarray:
    """Pin the end points to exactly 1 and 0 (the formulas can miss them by an ulp)."""
    g[0], g[-1] = 1.0, 0.0
    return g


def warped(steps: int, shift: float, power: float) -> np.ndarray:
    """Two-parameter schedule: the SD3/FLUX shift of ``u^P`` (u uniform from 1 to 0).

    ``P > 1`` or ``S < 1`` put more points near t = 0 (data), ``P < 1`` or ``S > 1`` near t = 1;
    (S, P) = (1, 1) is uniform, P = 1 is "shift:S". Used by ``anchorflow tune`` (coordinate descent
    in log S, log P).
    """
    if not (shift > 0 and power > 0 and np.isfinite(shift) and np.isfinite(power)):
        raise ConfigError(f"grid warp needs finite S > 0 and P > 0, got S={shift}, P={power}")
    u = uniform(steps) ** power
    return _ends(shift * u / (1.0 + (shift - 1.0) * u))


def _numbers(grid: str, count: int) -> list[float]:
    try:
        vals = [float(v) for v in grid.split(":", 1)[1].split(",")]
    except ValueError:
        vals = []
    if len(vals) != count or not all(np.isfinite(v) for v in vals):
        raise ConfigError(f"bad grid {grid!r}; use 'uniform', 'shift:S' or 'warp:S,P' with finite numbers")
    return vals


def make_grid(steps: int, grid: GridSpec = None) -> np.ndarray:
    """Build or check a decreasing grid with ``steps`` intervals.

    ``grid`` is None / "uniform", "shift:S" (e.g. "shift:3"), "warp:S,P" (see :func:`warped`),
    or an explicit decreasing sequence from 1 to 0 with ``steps + 1`` points.
    """
    if steps < 1:
        raise ConfigError(f"a grid needs at least one step, got {steps}")
    if grid is None or (isinstance(grid, str) and grid == "uniform"):
        return uniform(steps)
    if isinstance(grid, str):
        if grid.startswith("shift:"):
            return check_grid(shifted(steps, *_numbers(grid, 1)), steps)
        if grid.startswith("warp:"):
            return check_grid(warped(steps, *_numbers(grid, 2)), steps)
        raise ConfigError(f"unknown grid {grid!r}; use 'uniform', 'shift:S', 'warp:S,P' or an explicit list of times")
    return check_grid(grid, steps)


def check_grid(grid: Sequence[float] | np.ndarray, steps: Optional[int] = None) -> np.ndarray:
    """Accept any strictly decreasing grid from exactly 1 to exactly 0; refuse anything else."""
    g = np.asarray(grid, dtype=np.float64)
    if g.ndim != 1 or g.size < 2:
        raise ConfigError("a grid must be a 1-D list of at least two times")
    if not np.all(np.isfinite(g)):
        raise ConfigError("a grid must hold finite times")
    if g[0] != 1.0 or g[-1] != 0.0:
        raise ConfigError(f"a grid must run from t = 1 (noise) to t = 0 (data); got {g[0]} .. {g[-1]}")
    if not np.all(np.diff(g) < 0):
        raise ConfigError("a grid must be strictly decreasing (t = 1 noise -> t = 0 data)")
    if steps is not None and g.size != steps + 1:
        raise ConfigError(f"the grid has {g.size - 1} steps but this method and NFE need {steps}")
    return g
