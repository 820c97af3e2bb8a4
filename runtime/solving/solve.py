"""``solve``: the one entry point of the runtime."""

from __future__ import annotations

import functools
import inspect
import time
from typing import Callable, Optional

import numpy as np

from ...base.errors import ConfigError
from .field import GuidedField
from .first_call import CachedStartField, FirstCallTable
from .grids import GridSpec, make_grid
from .solvers import get_solver
from .result import Result, Timing


def solve(
    method: str,
    velocity: Callable,
    noise: np.ndarray,
    nfe: int,
    *,
    cond: Optional[dict] = None,
    null_cond: Optional[dict] = None,
    y: Optional[np.ndarray] = None,
    sidenet: Optional[Callable] = None,
    cfg_scale: float = 1.0,
    cfg_interval: tuple[float, float] = (0.0, 1.0),
    null_label: Optional[int] = None,
    grid: GridSpec = None,
    first_call="backbone",
    check_finite: bool = True,
    **options,
) -> Result:
    """Integrate ``dx/dt = v(x, t, cond)`` from t = 1 (``noise``) to t = 0 with ``method``.

    Args:
        method: a name from :data:`anchorflow.runtime.SOLVERS`.
        velocity: ``velocity(x, t, cond) -> v`` (x (B, ...), t (B,), cond a dict of row arrays or None).
        noise: the start state at t = 1, shape (B, ...).
        nfe: backbone calls to spend (for ``fastflow``: the grid size T). A budget the method
            cannot honour exactly is refused, never rounded.
        cond: dict name -> (B, ...) condition array (or (1, ...) / 0-d, broadcast to every
            sample), None for an unconditional model.
        null_cond: the same for the unconditional rows of classifier-free guidance.
        y: (B,) integer labels; shorthand for ``cond={"y": y}`` (and ``null_label`` for
            ``null_cond={"y": null_label}``).
        sidenet: ``sidenet(x, v, t, h, cond) -> delta`` for the BA solvers.
        cfg_scale, cfg_interval, null_label: classifier-free guidance, applied in one place
            (:class:`GuidedField`): every condition is doubled as ``[cond; null]`` and one
            backbone call carries both rows.
        grid: None / "uniform", "shift:S", "warp:S,P", or an explicit decreasing list of times 1 -> 0.
        first_call: "backbone" (default) or a :class:`~anchorflow.runtime.solving.first_call.FirstCallTable`
            ("cached"): the solver's velocity at t = 1 comes from the table, costs no NFE, and the
            same budget buys one more interval (see :mod:`anchorflow.runtime.solving.first_call`).
        check_finite: refuse NaN/Inf from the backbone or SideNet at the call that made it
            (:class:`GuidedField`); False skips that check for speed.
        options: method-specific options (e.g. ``a`` for ``ba``, ``bandit`` for ``fastflow``).

    Returns:
        :class:`Result` with ``x``, ``nfe`` (counted calls), ``sidenet_calls``, per-step records
        and the timing split.
    """
    spec = get_solver(method)
    noise = np.asarray(noise)
    if noise.ndim < 2:
        raise ConfigError(f"noise must have a batch axis, shape (B, ...); got shape {noise.shape}")
    if not np.issubdtype(noise.dtype, np.floating):
        raise ConfigError(f"noise must be floating point, got {noise.dtype}")
    _check_options(spec.name, spec.fn, options)
    table = _first_call_table(first_call)
    free = 0 if table is None else 1
    steps = spec.steps_for_nfe(nfe, free)
    t_grid = _grid(steps, grid)
    if spec.needs_sidenet and sidenet is None:
        raise ConfigError(f"solver {method!r} needs a SideNet (sidenet=...); train one with 'anchorflow train sidenet'")
    dtype = noise.dtype if noise.dtype in (np.float32, np.float64) else np.float32
    kinds = {} if table is None else {"table": table}
    field = (GuidedField if table is None else CachedStartField)(
        velocity, noise.shape[0], cond, null_cond, cfg_scale=cfg_scale, cfg_interval=cfg_interval,
        sidenet=sidenet, dtype=dtype, y=y, null_label=null_label, check_finite=check_finite, **kinds,
    )
    start = time.perf_counter()
    out = spec.fn(field, noise.astype(dtype, copy=True), t_grid, **options)
    total = time.perf_counter() - start
    expected = None if spec.nfe_rule == "grid" else spec.nfe_for_steps(steps, free)
    if expected is not None and field.nfe != expected:
        raise RuntimeError(f"internal error: {method} made {field.nfe} backbone calls, expected {expected}")
    return Result(
        x=out.x,
        nfe=field.nfe,
        sidenet_calls=field.sidenet_calls,
        steps=tuple(out.steps),
        method=method,
        grid=t_grid,
        timing=Timing(total, field.backbone_s, field.sidenet_s),
        info=out.info,
        error_estimate=out.error_estimate,
    )


def _first_call_table(first_call) -> Optional[FirstCallTable]:
    """None for "backbone"; the table (checked) for a FirstCallTable; refuse anything else."""
    if isinstance(first_call, FirstCallTable):
        return first_call.check()
    if first_call in (None, "backbone"):
        return None
    if first_call == "cached":
        raise ConfigError("first_call='cached' needs the table: pass first_call=<FirstCallTable> "
                          "(a bundle's first_call entry, made by 'anchorflow tune')")
    raise ConfigError(f"first_call must be 'backbone' or a FirstCallTable, got {first_call!r}")


_ACCEPTED: dict = {}  # solver function -> the option names it takes (None: any, it has **kwargs)


def _accepted(fn: Callable) -> Optional[list]:
    """The option names ``fn`` takes after (field, x, grid), read once per function (inspect is slow)."""
    if fn not in _ACCEPTED:
        params = list(inspect.signature(fn).parameters.values())[3:]
        _ACCEPTED[fn] = None if any(p.kind is p.VAR_KEYWORD for p in params) else [p.name for p in params]
    return _ACCEPTED[fn]


@functools.lru_cache(maxsize=256)
def _named_grid(steps: int, grid: Optional[str]) -> np.ndarray:
    out = make_grid(steps, grid)
    out.flags.writeable = False
    return out


def _grid(steps: int, grid: GridSpec) -> np.ndarray:
    """:func:`make_grid`; grids given by name (None, "uniform", "shift:S", "warp:S,P") are built
    once per (steps, name) and copied, explicit lists are checked every time."""
    if grid is None or isinstance(grid, str):
        return _named_grid(int(steps), grid).copy()
    return make_grid(steps, grid)


def _check_options(name: str, fn: Callable, options: dict) -> None:
    """Refuse options the solver function does not take, naming the ones it does."""
    accepted = _accepted(fn)
    if accepted is None or not options:
        return
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        takes = ", ".join(accepted) if accepted else "no options"
        raise ConfigError(f"solver {name!r} has no option {', '.join(map(repr, unknown))}; it takes: {takes}")
