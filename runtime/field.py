"""The backbone seen by a solver: classifier-free guidance, call counting and timing in one place.

Every solver talks to the backbone through :class:`GuidedField`, so guidance, the NFE count
and the time split (backbone / SideNet / rest) are handled once for every method.

Shapes: the state ``x`` is (B, ...). With guidance (``cfg_scale != 1``) the backbone is called
on ``[x; x]`` with labels ``[y; null]`` (2B rows, one NFE); such per-row outputs are "raw".
Time convention: t = 1 noise, t = 0 data.
"""

from __future__ import annotations

import time
from typing import Callable, Optional, Protocol, Sequence

import numpy as np

from ..errors import ConfigError
from .result import StepRecord


class Velocity(Protocol):
    """``velocity(x, t, y) -> v``: x (B, ...) float32, t (B,) float32, y (B,) int64 or None."""

    def __call__(self, x: np.ndarray, t: np.ndarray, y: Optional[np.ndarray]) -> np.ndarray: ...


class SideNet(Protocol):
    """``sidenet(x, v, t, h, y) -> delta`` with per-sample t and h (B,); v_hat(t - h) = v + delta."""

    def __call__(
        self, x: np.ndarray, v: np.ndarray, t: np.ndarray, h: np.ndarray, y: Optional[np.ndarray]
    ) -> np.ndarray: ...


def in_interval(t: float, interval: tuple[float, float]) -> bool:
    """Guidance is active for ``lo < t <= hi``; with ``lo == 0`` the end point t = 0 is included."""
    lo, hi = interval
    return t <= hi and (t > lo or lo <= 0.0)


class GuidedField:
    """Wraps a velocity callable (and optional SideNet) with CFG, counting and timing.

    Args:
        velocity: the backbone callable.
        batch: B, rows of the state.
        y: (B,) int labels or None (unconditional model).
        cfg_scale: guidance scale s; 1.0 means none (the backbone then sees B rows only).
        cfg_interval: (lo, hi); guidance applies for t in (lo, hi] (see :func:`in_interval`).
        null_label: the label of the unconditional rows; required when cfg_scale != 1.
        sidenet: optional SideNet callable.
    """

    def __init__(
        self,
        velocity: Callable,
        batch: int,
        y: Optional[np.ndarray] = None,
        cfg_scale: float = 1.0,
        cfg_interval: tuple[float, float] = (0.0, 1.0),
        null_label: Optional[int] = None,
        sidenet: Optional[Callable] = None,
        dtype: np.dtype = np.float32,
    ) -> None:
        if not np.isfinite(cfg_scale):
            raise ConfigError(f"cfg_scale must be finite, got {cfg_scale}")
        lo, hi = (float(cfg_interval[0]), float(cfg_interval[1]))
        if not (0.0 <= lo < hi <= 1.0):
            raise ConfigError(f"cfg_interval must satisfy 0 <= lo < hi <= 1, got {cfg_interval}")
        self.velocity = velocity
        self.sidenet = sidenet
        self.batch = int(batch)
        self.cfg_scale = float(cfg_scale)
        self.cfg_interval = (lo, hi)
        self.guided = self.cfg_scale != 1.0
        self.dtype = dtype
        if y is not None:
            y = np.asarray(y)
            if y.shape != (self.batch,):
                raise ConfigError(f"labels must have shape ({self.batch},), got {y.shape}")
            y = y.astype(np.int64)
        if self.guided:
            if y is None or null_label is None:
                raise ConfigError(
                    "classifier-free guidance (cfg_scale != 1) needs class labels and the model's null label"
                )
            self.labels = np.concatenate([y, np.full(self.batch, int(null_label), np.int64)])
            self.rows = 2
        else:
            self.labels = y
            self.rows = 1
        self.nfe = 0
        self.sidenet_calls = 0
        self.backbone_s = 0.0
        self.sidenet_s = 0.0

    # -- rows ---------------------------------------------------------------------------------
    def expand(self, x: np.ndarray) -> np.ndarray:
        """(B, ...) -> (rows*B, ...): the state repeated for the cond and uncond rows."""
        return x if self.rows == 1 else np.concatenate([x, x], axis=0)

    def _times(self, t: float | np.ndarray, n: int) -> np.ndarray:
        t = np.asarray(t, dtype=self.dtype)
        return np.full(n, t, self.dtype) if t.ndim == 0 else t.astype(self.dtype)

    # -- backbone -----------------------------------------------------------------------------
    def raw(self, x: np.ndarray, t: float) -> np.ndarray:
        """One backbone call (one NFE) at scalar time t; returns raw velocities (rows*B, ...)."""
        xe = self.expand(x).astype(self.dtype, copy=False)
        tt = self._times(t, xe.shape[0])
        start = time.perf_counter()
        v = self.velocity(xe, tt, self.labels)
        self.backbone_s += time.perf_counter() - start
        self.nfe += 1
        v = np.asarray(v).astype(self.dtype, copy=False)  # the state's precision, whatever the backend
        if v.shape != xe.shape:
            raise ConfigError(f"velocity returned shape {v.shape}, expected {xe.shape}")
        return v

    def guide(self, v_raw: np.ndarray, t: float) -> np.ndarray:
        """Raw (rows*B, ...) -> guided (B, ...): ``v_u + s (v_c - v_u)`` inside the CFG interval, else v_c."""
        if self.rows == 1:
            return v_raw
        v_c, v_u = v_raw[: self.batch], v_raw[self.batch :]
        if not in_interval(float(t), self.cfg_interval):
            return v_c
        out = v_c - v_u  # in place from here: one temporary instead of three
        out *= self.cfg_scale
        out += v_u
        return out

    def __call__(self, x: np.ndarray, t: float) -> np.ndarray:
        """Guided velocity at scalar time t (one NFE)."""
        return self.guide(self.raw(x, t), t)

    # -- bookkeeping --------------------------------------------------------------------------
    def counts(self) -> tuple[int, int]:
        """(backbone calls, SideNet calls) made so far."""
        return self.nfe, self.sidenet_calls

    def record(self, index: int, t_start: float, t_end: float, since: tuple[int, int], **info) -> StepRecord:
        """A :class:`StepRecord` charging the calls made since the ``counts()`` snapshot ``since``."""
        return StepRecord(index, t_start, t_end, self.nfe - since[0], self.sidenet_calls - since[1], info)

    # -- SideNet ------------------------------------------------------------------------------
    def side(self, x: np.ndarray, v_raw: np.ndarray, t: float, offsets: Sequence[float]) -> list[np.ndarray]:
        """ONE batched SideNet call for all ``offsets``; returns one raw delta (rows*B, ...) per offset.

        ``x`` is the (B, ...) state, ``v_raw`` the raw backbone output at (x, t).
        """
        if self.sidenet is None:
            raise ConfigError("this solver needs a SideNet; pass sidenet=... (or use a bundle that has one)")
        k = len(offsets)
        n = x.shape[0] * self.rows
        xs = np.concatenate([x] * (self.rows * k), axis=0) if self.rows * k > 1 else x
        xs = xs.astype(self.dtype, copy=False)
        vs = np.concatenate([v_raw] * k, axis=0) if k > 1 else v_raw
        ts = np.full(n * k, t, self.dtype)
        hs = np.repeat(np.asarray(offsets, self.dtype), n)
        ys = None if self.labels is None else np.tile(self.labels, k)
        start = time.perf_counter()
        d = np.asarray(self.sidenet(xs, vs.astype(self.dtype, copy=False), ts, hs, ys)).astype(self.dtype, copy=False)
        self.sidenet_s += time.perf_counter() - start
        self.sidenet_calls += 1
        if d.shape != xs.shape:
            raise ConfigError(f"sidenet returned shape {d.shape}, expected {xs.shape}")
        return [d[i * n : (i + 1) * n] for i in range(k)]
