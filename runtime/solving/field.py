"""The backbone seen by a solver: classifier-free guidance, call counting and timing in one place.

Every solver talks to the backbone through :class:`GuidedField`, so guidance, the NFE count
and the time split (backbone / SideNet / rest) are handled once for every method.

Shapes: the state ``x`` is (B, ...). Conditions are a dict name -> (B, ...) array (class labels
are the condition ``y`` int64 (B,)). With guidance (``cfg_scale != 1``) the backbone is called on
``[x; x]`` with every condition ``[cond; null]`` (2B rows, one NFE); such per-row outputs are
"raw". The SideNet's k offsets are one call on k copies of those rows, conditions tiled alike,
or, for a shared-body SideNet (``sidenet.shared_body``: the polynomial offset forms), one call on
those rows once with h (k, rows) -> delta (k, rows, ...).
Time convention: t = 1 noise, t = 0 data.
"""

from __future__ import annotations

import time
from typing import Callable, Optional, Protocol, Sequence

import numpy as np

from ...base.errors import ConfigError
from .result import StepRecord


Cond = Optional[dict]  # condition name -> np.ndarray with the row axis first, or None


class Velocity(Protocol):
    """``velocity(x, t, cond) -> v``: x (B, ...) float32, t (B,) float32 (t = 1 noise), cond None or
    a dict name -> array whose leading axis is the row axis (already expanded for CFG rows)."""

    def __call__(self, x: np.ndarray, t: np.ndarray, cond: Cond) -> np.ndarray: ...


class SideNet(Protocol):
    """``sidenet(x, v, t, h, cond) -> delta`` with per-sample t and h (B,); v_hat(t - h) = v + delta."""

    def __call__(
        self, x: np.ndarray, v: np.ndarray, t: np.ndarray, h: np.ndarray, cond: Cond
    ) -> np.ndarray: ...


def in_interval(t: float, interval: tuple[float, float]) -> bool:
    """Guidance is active for ``lo < t <= hi``; with ``lo == 0`` the end point t = 0 is included."""
    lo, hi = interval
    return t <= hi and (t > lo or lo <= 0.0)


def overlaps(span: tuple[float, float], interval: tuple[float, float]) -> bool:
    """Is guidance active for some t in the closed ``span`` (a <= t <= b)? Derived from
    :func:`in_interval` (the one rule): the span's largest time not above hi decides."""
    a, b = min(span), max(span)
    return a <= interval[1] and in_interval(min(b, interval[1]), interval)


def label_conditions(y: Optional[np.ndarray], null_label: Optional[int], cond: Cond = None,
                     null_cond: Cond = None) -> tuple[Cond, Cond]:
    """The ``y=`` shorthand: ``cond={"y": y}`` and ``null_cond={"y": null_label}`` (refused with cond=)."""
    if y is None:  # null_label only completes a cond= that carries labels
        if null_label is not None and null_cond is None and (cond is None or "y" in cond):
            null_cond = {"y": np.asarray(int(null_label), np.int64)}
        return cond, null_cond
    if cond is not None:
        raise ConfigError("give either y= (class labels) or cond= (a dict of conditions), not both")
    if np.asarray(y).ndim != 1:
        raise ConfigError(f"labels y must have shape (B,), got {np.asarray(y).shape}")
    if null_cond is None and null_label is not None:
        null_cond = {"y": np.asarray(int(null_label), np.int64)}
    return {"y": np.asarray(y).astype(np.int64)}, null_cond


def _rows(name: str, value: np.ndarray, batch: int) -> np.ndarray:
    """A condition with ``batch`` rows: (B, ...) as is, (1, ...) and 0-d values broadcast."""
    value = np.asarray(value)
    if value.ndim == 0:
        return np.full(batch, value, value.dtype)
    if value.shape[0] == batch:
        return value
    if value.shape[0] == 1:
        return np.broadcast_to(value, (batch, *value.shape[1:]))
    raise ConfigError(f"condition {name!r} has {value.shape[0]} rows (shape {value.shape}); "
                      f"it needs {batch} (one per sample) or 1 (shared by every sample)")


def expand_conditions(cond: Cond, null_cond: Cond, batch: int, guided: bool) -> Cond:
    """Per-row conditions for a backbone call: (B, ...) each, or [cond; null] (2B, ...) with CFG.

    Broadcast rows are allowed: a (1, ...) or 0-d condition is repeated for every sample, and a
    null value is broadcast to its condition's shape (e.g. one empty-prompt embedding for all rows).
    """
    if cond is None:
        if guided:
            raise ConfigError("classifier-free guidance (cfg_scale != 1) needs conditions (or class labels y=) "
                              "and their null values (null_cond=, or the model's null label)")
        return None
    if not isinstance(cond, dict):
        raise ConfigError(f"cond must be a dict of condition name -> array, got {type(cond).__name__}")
    rows = {name: _rows(name, value, batch) for name, value in cond.items()}
    if not guided:
        return {name: np.ascontiguousarray(value) for name, value in rows.items()}
    null_cond = null_cond or {}
    missing = sorted(set(rows) - set(null_cond))
    if missing:
        raise ConfigError(f"classifier-free guidance needs a null value for every condition; null_cond lacks "
                          f"{', '.join(missing)} (pass null_cond=..., --null-cond FILE or the model's null label)")
    out = {}
    for name, value in rows.items():
        try:
            null = np.broadcast_to(np.asarray(null_cond[name], value.dtype), value.shape)
        except ValueError:
            raise ConfigError(f"the null value of condition {name!r} has shape {np.shape(null_cond[name])}, which does "
                              f"not broadcast to the condition's {value.shape}") from None
        out[name] = np.concatenate([value, null], axis=0)
    return out


def _filled(n: int, t: float, dtype) -> np.ndarray:
    """``np.full(n, t, dtype)``, the same values, without np.full's overhead."""
    out = np.empty(n, dtype)
    out.fill(t)
    return out


def _finite(out: np.ndarray, network: str, call: int, t: float) -> None:
    """NonFiniteError naming the network, its call number and the time when ``out`` holds NaN/Inf."""
    if not np.isfinite(out).all():
        from ...base.errors import NonFiniteError

        bad = int(out.size - np.count_nonzero(np.isfinite(out)))
        raise NonFiniteError(f"the {network} returned NaN/Inf ({bad} of {out.size} values) at its call {call}, "
                             f"t = {float(t):.4g}; its weights or inputs are broken (re-export or retrain it); "
                             "nothing was written")


class GuidedField:
    """Wraps a velocity callable (and optional SideNet) with CFG, counting and timing.

    Args:
        velocity: the backbone callable ``velocity(x, t, cond)``.
        batch: B, rows of the state.
        cond: dict name -> (B, ...) or (1, ...) condition arrays, or None (unconditional model).
        null_cond: the same for the unconditional rows; required when cfg_scale != 1.
        cfg_scale: guidance scale s; 1.0 means none (the backbone then sees B rows only).
        cfg_interval: (lo, hi); guidance applies for t in (lo, hi] (see :func:`in_interval`).
        sidenet: optional SideNet callable.
        y, null_label: shorthand for ``cond={"y": y}``, ``null_cond={"y": null_label}``.
        check_finite: refuse (NonFiniteError) any backbone or SideNet output holding NaN/Inf,
            naming the network, the call and the time; one ``isfinite`` pass per call, off for speed.
    """

    def __init__(
        self,
        velocity: Callable,
        batch: int,
        cond: Cond = None,
        null_cond: Cond = None,
        cfg_scale: float = 1.0,
        cfg_interval: tuple[float, float] = (0.0, 1.0),
        sidenet: Optional[Callable] = None,
        dtype: np.dtype = np.float32,
        *,
        y: Optional[np.ndarray] = None,
        null_label: Optional[int] = None,
        check_finite: bool = True,
    ) -> None:
        if not np.isfinite(cfg_scale):
            raise ConfigError(f"cfg_scale must be finite, got {cfg_scale}")
        lo, hi = (float(cfg_interval[0]), float(cfg_interval[1]))
        if not (0.0 <= lo < hi <= 1.0):
            raise ConfigError(f"cfg_interval must satisfy 0 <= lo < hi <= 1, got {cfg_interval}")
        self.velocity = velocity
        self.sidenet = sidenet
        self.shared_body = bool(getattr(sidenet, "shared_body", False))  # h (K, rows): see side()
        self.batch = int(batch)
        self.cfg_scale = float(cfg_scale)
        self.cfg_interval = (lo, hi)
        self.guided = self.cfg_scale != 1.0
        self.dtype = dtype
        self.check_finite = check_finite
        if y is not None and np.asarray(y).shape != (self.batch,):
            raise ConfigError(f"labels must have shape ({self.batch},), got {np.asarray(y).shape}")
        cond, null_cond = label_conditions(y, null_label, cond, null_cond)
        self.cond = expand_conditions(cond, null_cond, self.batch, self.guided)
        self.rows = 2 if self.guided else 1
        # the conditional rows alone, for calls whose velocities are never guided (outside the interval)
        self.cond_only = None if self.cond is None or not self.guided else {
            name: value[: self.batch] for name, value in self.cond.items()}
        self._tiles: dict = {}  # (row blocks, offsets) -> tiled conditions for the SideNet
        self.nfe = 0
        self.sidenet_calls = 0
        self.backbone_s = 0.0
        self.sidenet_s = 0.0

    # -- rows ---------------------------------------------------------------------------------
    def expand(self, x: np.ndarray, rows: Optional[int] = None) -> np.ndarray:
        """(B, ...) -> (rows*B, ...): the state repeated for the cond and uncond rows."""
        return x if (rows or self.rows) == 1 else np.concatenate([x, x], axis=0)

    def rows_for(self, span: Optional[tuple[float, float]]) -> int:
        """Row blocks a backbone call needs when its velocities are guided at times in ``span``:
        2 (cond and uncond) if guidance is active anywhere in it, else 1. ``span=None``: every
        time may be asked for, so 2 whenever guidance is on (the conservative default)."""
        if self.rows == 1 or span is None:
            return self.rows
        return 2 if overlaps(span, self.cfg_interval) else 1

    def _times(self, t: float | np.ndarray, n: int) -> np.ndarray:
        if isinstance(t, float):  # the solvers' scalar times: one fill (np.full costs 4x more at batch 1)
            return _filled(n, t, self.dtype)
        t = np.asarray(t, dtype=self.dtype)
        return np.full(n, t, self.dtype) if t.ndim == 0 else t.astype(self.dtype)

    # -- backbone -----------------------------------------------------------------------------
    def raw(self, x: np.ndarray, t: float, span: Optional[tuple[float, float]] = None) -> np.ndarray:
        """One backbone call (one NFE) at scalar time t; returns raw velocities (rows*B, ...).

        ``span``: the times (lo, hi) at which these velocities, or SideNet predictions from them,
        will be guided. Where guidance is off over the whole span only the B conditional rows
        are computed (guidance off means v_c alone); None keeps both row blocks.
        """
        rows = self.rows_for(span)
        xe = self.expand(x, rows).astype(self.dtype, copy=False)
        tt = self._times(t, xe.shape[0])
        cond = self.cond if rows == self.rows else self.cond_only
        start = time.perf_counter()
        v = self.velocity(xe, tt, cond)
        self.backbone_s += time.perf_counter() - start
        self.nfe += 1
        v = np.asarray(v).astype(self.dtype, copy=False)  # the state's precision, whatever the backend
        if v.shape != xe.shape:
            raise ConfigError(f"velocity returned shape {v.shape}, expected {xe.shape}")
        if self.check_finite:
            _finite(v, "backbone", self.nfe, t)
        return v

    def guide(self, v_raw: np.ndarray, t: float) -> np.ndarray:
        """Raw (rows*B, ...) -> guided (B, ...): ``v_u + s (v_c - v_u)`` inside the CFG interval, else v_c."""
        if self.rows == 1:
            return v_raw
        active = in_interval(float(t), self.cfg_interval)
        if v_raw.shape[0] == self.batch:  # a call made with the conditional rows only
            if active:
                raise RuntimeError(f"internal error: guidance is on at t = {float(t):g} but the backbone call "
                                   "computed no unconditional rows (its span was too narrow)")
            return v_raw
        v_c, v_u = v_raw[: self.batch], v_raw[self.batch :]
        if not active:
            return v_c
        out = v_c - v_u  # in place from here: one temporary instead of three
        out *= self.cfg_scale
        out += v_u
        return out

    def __call__(self, x: np.ndarray, t: float) -> np.ndarray:
        """Guided velocity at scalar time t (one NFE; B rows where guidance is off at t)."""
        return self.guide(self.raw(x, t, (t, t)), t)

    # -- bookkeeping --------------------------------------------------------------------------
    def counts(self) -> tuple[int, int]:
        """(backbone calls, SideNet calls) made so far."""
        return self.nfe, self.sidenet_calls

    def record(self, index: int, t_start: float, t_end: float, since: tuple[int, int], **info) -> StepRecord:
        """A :class:`StepRecord` charging the calls made since the ``counts()`` snapshot ``since``."""
        return StepRecord(index, t_start, t_end, self.nfe - since[0], self.sidenet_calls - since[1], info)

    # -- SideNet ------------------------------------------------------------------------------
    def _tiled(self, rows: int, k: int) -> Cond:
        """The conditions of ``rows`` row blocks tiled ``k`` times (made once per (rows, k))."""
        key = (rows, k)
        if key not in self._tiles:
            base = self.cond if rows == self.rows else self.cond_only
            self._tiles[key] = None if base is None else {
                name: np.concatenate([c] * k, axis=0) if k > 1 else c for name, c in base.items()}
        return self._tiles[key]

    def side(self, x: np.ndarray, v_raw: np.ndarray, t: float, offsets: Sequence[float]) -> list[np.ndarray]:
        """ONE batched SideNet call for all ``offsets``; returns one raw delta (rows*B, ...) per offset.

        ``x`` is the (B, ...) state, ``v_raw`` the raw backbone output at (x, t).
        """
        if self.sidenet is None:
            raise ConfigError("this solver needs a SideNet; pass sidenet=... (or use a bundle that has one)")
        k = len(offsets)
        rows = v_raw.shape[0] // x.shape[0]  # the anchor call's row blocks (1 where guidance was off)
        n = x.shape[0] * rows
        if self.shared_body:
            return self._side_shared(x, v_raw, t, offsets, rows, n)
        xs = np.concatenate([x] * (rows * k), axis=0) if rows * k > 1 else x
        xs = xs.astype(self.dtype, copy=False)
        vs = np.concatenate([v_raw] * k, axis=0) if k > 1 else v_raw
        ts = _filled(n * k, t, self.dtype) if isinstance(t, float) else np.full(n * k, t, self.dtype)
        hs = np.asarray(offsets, self.dtype).repeat(n)
        d = self._side_call(xs, vs, ts, hs, self._tiled(rows, k), t, xs.shape)
        return [d[i * n : (i + 1) * n] for i in range(k)]

    def _side_shared(self, x: np.ndarray, v_raw: np.ndarray, t: float, offsets: Sequence[float], rows: int,
                     n: int) -> list[np.ndarray]:
        """A shared-body SideNet: the n anchor rows once, h (K, n) -> delta (K, n, ...)."""
        k = len(offsets)
        xs = (self.expand(x, rows) if rows > 1 else x).astype(self.dtype, copy=False)
        ts = _filled(n, t, self.dtype) if isinstance(t, float) else np.full(n, t, self.dtype)
        hs = np.asarray(offsets, self.dtype).repeat(n).reshape(k, n)
        return list(self._side_call(xs, v_raw, ts, hs, self._tiled(rows, 1), t, (k, *xs.shape)))

    def _side_call(self, xs: np.ndarray, vs: np.ndarray, ts: np.ndarray, hs: np.ndarray, cs: Cond, t: float,
                   shape: tuple) -> np.ndarray:
        """The one SideNet call: timed, counted, its shape (``shape``) and finiteness checked."""
        start = time.perf_counter()
        d = np.asarray(self.sidenet(xs, vs.astype(self.dtype, copy=False), ts, hs, cs)).astype(self.dtype, copy=False)
        self.sidenet_s += time.perf_counter() - start
        self.sidenet_calls += 1
        if d.shape != tuple(shape):
            raise ConfigError(f"sidenet returned shape {d.shape}, expected {tuple(shape)}")
        if self.check_finite:
            _finite(d, "SideNet", self.sidenet_calls, t)
        return d
