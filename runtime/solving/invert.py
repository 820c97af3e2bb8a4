"""Inversion and editing: data (t = 0) -> noise (t = 1) -> edited data, in N backbone calls each way.

``invert`` integrates the probability-flow ODE ``dx/dt = v(x, t, cond)`` upward, from an image at
t = 0 to its noise at ``t_end`` (1 by default), with any registered solver but FastFlow (whose
bandit decides calls at run time). It does not copy the solvers: it runs each one unchanged in the
reversed time ``s = 1 - t`` (:class:`ReversedField`), where the same ODE reads ``dx/ds = -v(x, 1 - s)``
from s = 1 down to s = 0, i.e. exactly the problem every solver is written for. For the one-step
and multistep methods that use only ``dt`` (Euler, Heun, RK4, AB2, iPNDM, RF-Solver, FireFlow)
this gives the same iterates as running them on the increasing grid (tests check it bit for bit);
for UniPC and DPM-Solver++ (exponential integrators in the data prediction ``x - t v``, which
cannot start at t = 0 where sigma = 0) it gives their noise-prediction form ``x + (1 - t) v``, the
form used to invert toward noise; for the BA-solver the SideNet is asked for negative offsets
(h < 0: toward noise, the direction its training samples with probability 1/2).

Calls and guidance follow :func:`anchorflow.runtime.solve`: the same :class:`GuidedField` (CFG rows,
counting, timing), the same budget rule (``SolverSpec.steps_for_nfe``: a budget refused, never
rounded) and the same count check. ``edit`` inverts under the source condition to ``strength``,
then regenerates under the target condition (see its docstring for the controls).
Time convention: t = 1 noise, t = 0 data.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np

from ...base.errors import ConfigError
from .field import Cond, GuidedField
from .grids import GridSpec, make_grid
from .registry import SolverSpec
from .result import Result, StepRecord, Timing
from .solve import _check_options
from .solvers import get_solver, solver_names

SOURCE_PREFIX = "__source__:"  # the source condition's names inside an edit's GuidedField (see _Scheduled)
_EPS_T = 1e-6  # times within this of a switch point count as on it (float32 grids)


def inverting_solvers() -> list[str]:
    """Every registered solver that can run from t = 0 to t = 1 (all but those deciding calls at run time)."""
    return [n for n in solver_names() if get_solver(n).nfe_rule != "grid"]


def _spec(method: str) -> SolverSpec:
    spec = get_solver(method)
    if spec.nfe_rule == "grid":
        raise ConfigError(f"solver {method!r} decides its calls at run time and cannot invert; use one of "
                          f"{', '.join(inverting_solvers())}")
    return spec


class ReversedField:
    """A :class:`GuidedField` seen in reversed time ``s = 1 - t``: velocity ``-v(x, 1 - s)``.

    What a solver asks at time s is asked of the wrapped field at t = 1 - s, and every velocity
    comes back negated (guidance is linear, so ``guide`` commutes with the sign). The SideNet
    predicts the raw velocity at ``t - h``; an offset h' at s is the node ``s - h'`` = t + h', so
    it is asked with ``h = -h'`` and its delta is negated. Records are written in real time t.
    """

    def __init__(self, field: GuidedField) -> None:
        self.inner = field
        self.shared_body = field.shared_body

    def __getattr__(self, name: str):  # counts, nfe, batch, rows ... : the wrapped field's own
        return getattr(self.inner, name)

    @staticmethod
    def _span(span: Optional[tuple[float, float]]) -> Optional[tuple[float, float]]:
        return None if span is None else (1.0 - span[1], 1.0 - span[0])

    def raw(self, x: np.ndarray, s: float, span: Optional[tuple[float, float]] = None) -> np.ndarray:
        return -self.inner.raw(x, 1.0 - s, self._span(span))

    def guide(self, v_raw: np.ndarray, s: float) -> np.ndarray:
        return self.inner.guide(v_raw, 1.0 - s)

    def rows_for(self, span: Optional[tuple[float, float]]) -> int:
        return self.inner.rows_for(self._span(span))

    def __call__(self, x: np.ndarray, s: float) -> np.ndarray:
        return self.guide(self.raw(x, s, (s, s)), s)

    def side(self, x: np.ndarray, v_raw: np.ndarray, s: float, offsets: Sequence[float]) -> list[np.ndarray]:
        deltas = self.inner.side(x, -v_raw, 1.0 - s, [-float(o) for o in offsets])
        return [-d for d in deltas]

    def record(self, index: int, s_start: float, s_end: float, since: tuple[int, int], **info) -> StepRecord:
        return self.inner.record(index, 1.0 - s_start, 1.0 - s_end, since, **info)


def _times(steps: int, grid: GridSpec, t_top: float) -> np.ndarray:
    """The decreasing times ``t_top -> 0`` of ``steps`` intervals: the named or explicit grid (1 -> 0) scaled by t_top."""
    if not (isinstance(t_top, (int, float, np.floating)) and 0.0 < float(t_top) <= 1.0):
        raise ConfigError(f"the trajectory fraction (t_end / strength) must be a number in (0, 1], got {t_top!r}")
    return make_grid(steps, grid) * float(t_top)


def _integrate(spec: SolverSpec, field, x: np.ndarray, solver_grid: np.ndarray, real_grid: np.ndarray,
               options: dict) -> Result:
    """Run ``spec`` on ``field`` over ``solver_grid``; check the calls against the registry, as solve does."""
    steps = len(solver_grid) - 1
    start = time.perf_counter()
    out = spec.fn(field, x, solver_grid, **options)
    total = time.perf_counter() - start
    expected = spec.nfe_for_steps(steps)
    if field.nfe != expected:
        raise RuntimeError(f"internal error: {spec.name} made {field.nfe} backbone calls, expected {expected}")
    return Result(x=out.x, nfe=field.nfe, sidenet_calls=field.sidenet_calls, steps=tuple(out.steps), method=spec.name,
                  grid=real_grid, timing=Timing(total, field.backbone_s, field.sidenet_s), info=out.info)


def _field(velocity: Callable, x: np.ndarray, cond: Cond, null_cond: Cond, sidenet, cfg_scale: float,
           cfg_interval, y, null_label, check_finite: bool) -> GuidedField:
    return GuidedField(velocity, x.shape[0], cond, null_cond, cfg_scale=cfg_scale, cfg_interval=cfg_interval,
                       sidenet=sidenet, dtype=x.dtype, y=y, null_label=null_label, check_finite=check_finite)


def _state(x: np.ndarray, what: str) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim < 2:
        raise ConfigError(f"{what} must have a batch axis, shape (B, ...); got shape {x.shape}")
    if not np.issubdtype(x.dtype, np.floating):
        raise ConfigError(f"{what} must be floating point, got {x.dtype}")
    return x.astype(x.dtype if x.dtype in (np.float32, np.float64) else np.float32, copy=True)


def _prepare(method: str, nfe: int, sidenet, options: dict) -> tuple[SolverSpec, int]:
    spec = _spec(method)
    _check_options(spec.name, spec.fn, options)
    steps = spec.steps_for_nfe(nfe)
    if spec.needs_sidenet and sidenet is None:
        raise ConfigError(f"solver {method!r} needs a SideNet (sidenet=...); train one with 'anchorflow train sidenet'")
    return spec, steps


def invert(
    method: str,
    velocity: Callable,
    x0: np.ndarray,
    nfe: int,
    *,
    cond: Cond = None,
    null_cond: Cond = None,
    y: Optional[np.ndarray] = None,
    sidenet: Optional[Callable] = None,
    cfg_scale: float = 1.0,
    cfg_interval: tuple[float, float] = (0.0, 1.0),
    null_label: Optional[int] = None,
    grid: GridSpec = None,
    t_end: float = 1.0,
    check_finite: bool = True,
    **options,
) -> Result:
    """Integrate ``dx/dt = v(x, t, cond)`` from t = 0 (``x0``, data) up to ``t_end`` (noise at 1) with ``method``.

    Arguments as :func:`anchorflow.runtime.solve` (conditions, guidance, SideNet, options, NFE:
    exactly ``nfe`` backbone calls or refused). ``grid`` names the same grids as ``solve``
    (times 1 -> 0, scaled by ``t_end``); the inversion visits them in reverse, so regenerating on
    the same grid retraces its nodes. ``x0`` (B, ...). Returns a :class:`Result` whose ``x`` is the
    state at ``t_end`` and whose ``grid`` / step records are in real time t, increasing.
    """
    spec, steps = _prepare(method, nfe, sidenet, options)
    x = _state(x0, "the image x0")
    times = _times(steps, grid, t_end)  # t_end -> 0
    field = _field(velocity, x, cond, null_cond, sidenet, cfg_scale, cfg_interval, y, null_label, check_finite)
    return _integrate(spec, ReversedField(field), x, 1.0 - times[::-1], times[::-1].copy(), options)


def regenerate(
    method: str,
    velocity: Callable,
    x_t: np.ndarray,
    nfe: int,
    *,
    t_start: float = 1.0,
    cond: Cond = None,
    null_cond: Cond = None,
    y: Optional[np.ndarray] = None,
    sidenet: Optional[Callable] = None,
    cfg_scale: float = 1.0,
    cfg_interval: tuple[float, float] = (0.0, 1.0),
    null_label: Optional[int] = None,
    grid: GridSpec = None,
    check_finite: bool = True,
    **options,
) -> Result:
    """``solve`` from ``t_start`` (<= 1) down to t = 0: the grid (1 -> 0) scaled by ``t_start``; at
    ``t_start = 1`` the same iterates and calls as :func:`anchorflow.runtime.solve` (a test checks it)."""
    spec, steps = _prepare(method, nfe, sidenet, options)
    x = _state(x_t, "the start state")
    times = _times(steps, grid, t_start)
    field = _field(velocity, x, cond, null_cond, sidenet, cfg_scale, cfg_interval, y, null_label, check_finite)
    return _integrate(spec, field, x, times, times, options)


# -- editing ---------------------------------------------------------------------------------------------------
def _as_cond(value, what: str) -> dict:
    """A condition dict, or class labels (an int or a (B,) array) as ``{"y": ...}``."""
    if isinstance(value, dict):
        if not value:
            raise ConfigError(f"the {what} condition is empty")
        return value
    if value is None:
        raise ConfigError(f"edit needs a {what} condition (a dict of conditions, or class labels)")
    arr = np.asarray(value)
    if not np.issubdtype(arr.dtype, np.integer) or arr.ndim > 1:
        raise ConfigError(f"the {what} labels must be an integer or a (B,) integer array, got {value!r}")
    return {"y": arr.astype(np.int64)}


class _Scheduled:
    """A backbone or SideNet callable whose condition follows a time schedule (one call each time).

    The edit's :class:`GuidedField` carries the target condition under its own names and the source
    under ``SOURCE_PREFIX + name`` (so CFG doubles both alike). ``weight(t)`` per row: 0 feeds the
    target, 1 the source, in between one call on the rows twice ([target; source]) blended
    ``v_target + w (v_source - v_target)``. The SideNet's rows are timed at their node ``t - h``.
    """

    def __init__(self, fn: Callable, names: Sequence[str], weight: Callable, sidenet: bool) -> None:
        self.fn, self.names, self.weight, self.is_sidenet = fn, tuple(names), weight, sidenet
        self.shared_body = bool(getattr(fn, "shared_body", False))

    def __call__(self, *args):
        *arrays, cond = args
        tgt = {k: cond[k] for k in self.names}
        src = {k: cond[SOURCE_PREFIX + k] for k in self.names}
        if self.is_sidenet:
            x, v, t, h = arrays
            times = (t[None, :] if h.ndim == 2 else t) - h  # node times; (K, n) for a shared-body SideNet
        else:
            times = arrays[1]
        w = self.weight(np.asarray(times, np.float64))
        if not np.any(w):
            return self.fn(*arrays, tgt)
        if np.all(w == 1.0):
            return self.fn(*arrays, src)
        axis_h = 1 if self.is_sidenet and arrays[3].ndim == 2 else 0
        both = [np.concatenate([a, a], axis=axis_h if i == 3 else 0) for i, a in enumerate(arrays)]
        out = np.asarray(self.fn(*both, {k: np.concatenate([tgt[k], src[k]]) for k in self.names}))
        n = arrays[0].shape[0]
        v_t, v_s = (out[:, :n], out[:, n:]) if axis_h else (out[:n], out[n:])
        wb = w.reshape(w.shape + (1,) * (v_t.ndim - w.ndim)).astype(v_t.dtype)
        return v_t + wb * (v_s - v_t)


def condition_weight(t: np.ndarray, switch: float, inject_until: float, inject_weight: float) -> np.ndarray:
    """The source condition's weight at times t during regeneration: 1 above ``switch`` (the source
    condition), ``inject_weight`` in ``(inject_until, switch]`` (the injected source velocity), 0 below."""
    w = np.where(t > inject_until + _EPS_T, float(inject_weight), 0.0)
    return np.where(t > switch + _EPS_T, 1.0, w)


@dataclass(frozen=True)
class EditResult:
    """``x`` the edited batch (B, ...) at t = 0; ``noise`` the inversion's state at ``strength``;
    ``inversion`` / ``regeneration`` their :class:`Result` (calls counted separately)."""

    x: np.ndarray
    noise: np.ndarray
    inversion: Result
    regeneration: Result
    strength: float
    switch: float

    @property
    def nfe(self) -> int:
        return self.inversion.nfe + self.regeneration.nfe


def edit(
    method: str,
    velocity: Callable,
    x0: np.ndarray,
    nfe: int,
    *,
    source,
    target,
    null_cond: Cond = None,
    null_label: Optional[int] = None,
    sidenet: Optional[Callable] = None,
    strength: float = 1.0,
    switch: Optional[float] = None,
    inject: int = 0,
    inject_weight: float = 1.0,
    cfg_scale: float = 1.0,
    cfg_interval: tuple[float, float] = (0.0, 1.0),
    invert_cfg_scale: float = 1.0,
    invert_method: Optional[str] = None,
    invert_nfe: Optional[int] = None,
    grid: GridSpec = None,
    check_finite: bool = True,
    **options,
) -> EditResult:
    """Invert ``x0`` under ``source`` to t = ``strength``, then regenerate to t = 0 under ``target``.

    Args:
        method, nfe: the regeneration's solver and backbone calls (also the inversion's, unless
            ``invert_method`` / ``invert_nfe`` say otherwise); both on the same grid, so the
            regeneration starts exactly where the inversion ended.
        source, target: condition dicts (the bundle's names), or class labels (int or (B,)).
        null_cond / null_label: the null condition (for guidance in either direction).
        strength: the fraction of the trajectory re-solved, in (0, 1]: 1 inverts to pure noise, less
            keeps more of the image (SDEdit's strength, but deterministic).
        switch: where the target condition takes over, in [0, strength]; regeneration uses the
            source condition for t > switch and the target below. Default ``strength`` (target throughout).
        inject, inject_weight: for the first ``inject`` regeneration steps below ``switch`` the velocity
            is ``v_target + inject_weight (v_source - v_target)`` at the same state, from ONE backbone
            call on both conditions' rows (counted once, as CFG's rows are), so the calls stay N.
        cfg_scale, cfg_interval: guidance of the regeneration; ``invert_cfg_scale`` the inversion's
            (default 1: guided inversion amplifies its error).
        options: solver options for both directions.
    """
    if invert_method is None:
        invert_method = method
    if invert_nfe is None:
        invert_nfe = nfe
    src, tgt = _as_cond(source, "source"), _as_cond(target, "target")
    if set(src) != set(tgt):
        raise ConfigError(f"source and target must name the same conditions; got {sorted(src)} and {sorted(tgt)}")
    if isinstance(inject, bool) or not isinstance(inject, (int, np.integer)) or inject < 0:
        raise ConfigError(f"inject (steps with the source velocity) must be an integer >= 0, got {inject!r}")
    if not (isinstance(inject_weight, (int, float)) and 0.0 <= float(inject_weight) <= 1.0):
        raise ConfigError(f"inject_weight must be a number in [0, 1], got {inject_weight!r}")
    # the inversion (validates strength, the budget and the grid)
    inv = invert(invert_method, velocity, x0, invert_nfe, cond=src, null_cond=null_cond, null_label=null_label,
                 sidenet=sidenet, cfg_scale=invert_cfg_scale, cfg_interval=cfg_interval, grid=grid, t_end=strength,
                 check_finite=check_finite, **options)
    switch = float(strength) if switch is None else switch
    if not (isinstance(switch, (int, float)) and 0.0 <= float(switch) <= float(strength)):
        raise ConfigError(f"switch (where the target condition takes over) must be in [0, strength = {strength}], "
                          f"got {switch!r}")
    spec, steps = _prepare(method, nfe, sidenet, options)
    times = _times(steps, grid, strength)
    below = times[times <= switch + _EPS_T]  # the steps the target condition runs
    # the injected steps' calls lie above the time that ends them (every step's when inject covers them all)
    inject_until = np.inf if not inject else (float(below[inject]) if inject < len(below) - 1 else -1.0)
    names = sorted(tgt)
    cond = {**tgt, **{SOURCE_PREFIX + k: v for k, v in src.items()}}
    nulls = dict(null_cond or {})
    if null_label is not None and "y" in tgt and "y" not in nulls:
        nulls["y"] = np.asarray(int(null_label), np.int64)
    nulls.update({SOURCE_PREFIX + k: v for k, v in list(nulls.items()) if k in tgt})

    def weight(t: np.ndarray) -> np.ndarray:
        return condition_weight(t, float(switch), inject_until, float(inject_weight))

    vel = _Scheduled(velocity, names, weight, sidenet=False)
    side = None if sidenet is None else _Scheduled(sidenet, names, weight, sidenet=True)
    x = inv.x.copy()
    field = _field(vel, x, cond, nulls or None, side, cfg_scale, cfg_interval, None, None, check_finite)
    gen = _integrate(spec, field, x, times, times, options)
    return EditResult(gen.x, inv.x, inv, gen, float(strength), float(switch))
