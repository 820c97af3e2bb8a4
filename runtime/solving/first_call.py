"""The free first call: the velocity at t = 1 from a per-condition table instead of the backbone.

On the linear path ``x_t = (1 - t) x_0 + t noise``, x_1 is the noise itself, independent of x_0,
so the ideal field at t = 1 is ``v(x, 1, c) = x - E[x_0 | c]``. A model that learned the field
agrees up to a residual; where the measured residual is small, caching ``E[x_0 | c]`` per label
(the null label's row included, for guidance) replaces every solver's first backbone call, and
the same budget buys one more interval. Time convention: t = 1 noise, t = 0 data.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from ...base.errors import ConfigError
from .field import GuidedField

RESIDUAL_BOUND = 0.05  # refuse the cache when rms(v - (x - m_c)) / rms(v) at t = 1 exceeds this


@dataclass(frozen=True)
class FirstCallTable:
    """``means`` (L, *state): row l is E[x_0 | label l] (labels 0..C-1, row C the null label), or
    one row for an unconditional model. ``residual``: measured rms(v(x, 1, c) - (x - m_c)) / rms(v)."""

    means: np.ndarray
    residual: float
    samples: int = 0
    bound: float = RESIDUAL_BOUND

    def check(self) -> "FirstCallTable":
        """Refuse a table whose residual exceeds its bound (the model does not behave ideally at t = 1)."""
        if not np.all(np.isfinite(self.means)) or not self.residual <= self.bound:
            raise ConfigError(
                f"the cached first call is refused for this model: its t = 1 velocity differs from x - E[x0|c] "
                f"by {self.residual:.3g} (relative rms; bound {self.bound:g}); use first_call='backbone'"
            )
        return self

    def velocity(self, x: np.ndarray, labels: Optional[np.ndarray]) -> np.ndarray:
        """``x - means[labels]`` for x (R, *state) and labels (R,); None: the last row (the null label's,
        or the single row of an unconditional model)."""
        m = self.means[-1] if labels is None or self.means.shape[0] == 1 else self.means[np.asarray(labels)]
        return (x - m).astype(x.dtype, copy=False)


def measure_first_call(velocity: Callable, state_shape, num_classes: int, samples: int = 64, seed: int = 0,
                       batch: int = 64) -> FirstCallTable:
    """Estimate E[x_0 | c] = mean over noise of (x - v(x, 1, c)) per label, and the relative residual.

    ``samples`` noise draws per label (labels 0..C including the null label C; one unconditional
    row when C = 0), in batches of at most ``batch`` rows. Costs ``ceil(L samples / batch)`` calls.
    """
    labels = np.repeat(np.arange(num_classes + 1, dtype=np.int64), samples) if num_classes else None
    rows = samples * (num_classes + 1 if num_classes else 1)
    x = np.random.default_rng([seed, 11]).standard_normal((rows, *state_shape)).astype(np.float32)
    v = np.concatenate([np.asarray(velocity(x[i:i + batch], np.ones(len(x[i:i + batch]), np.float32),
                                            None if labels is None else {"y": labels[i:i + batch]}), np.float64)
                        for i in range(0, rows, batch)])
    d = (x - v).reshape(-1, samples, *state_shape)  # (L, samples, *state): each estimates E[x0 | c]
    means = d.mean(axis=1)
    resid = d - means[:, None]
    residual = float(np.sqrt(np.mean(resid ** 2)) / np.sqrt(np.mean(v ** 2)))
    return FirstCallTable(means.astype(np.float32), residual, samples)


class CachedStartField(GuidedField):
    """A :class:`GuidedField` whose backbone calls at t = 1 come from a :class:`FirstCallTable`:
    not counted as NFE, not timed as backbone (the rows, CFG and guidance are the field's own)."""

    def __init__(self, *args, table: FirstCallTable, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.table = table.check()
        self.cached_calls = 0
        other = sorted(set(self.cond or {}) - {"y"})
        if other:
            raise ConfigError(f"the cached first call is tabulated per class label y; this model also takes "
                              f"{', '.join(other)}; use first_call='backbone'")
        self.labels = None if self.cond is None else self.cond.get("y")

    def raw(self, x: np.ndarray, t: float, span=None) -> np.ndarray:
        """The table's rows at t = 1 (no NFE, no backbone time); a backbone call elsewhere. Rows as
        the backbone's would be: B conditional rows where guidance is off over ``span``, else 2B."""
        if float(t) != 1.0:
            return super().raw(x, t, span)
        self.cached_calls += 1
        rows = self.rows_for(span)
        labels = self.labels if self.labels is None or rows == self.rows else self.labels[: self.batch]
        return self.table.velocity(self.expand(x, rows).astype(self.dtype, copy=False), labels)


def load_means(path, state_shape, num_classes: int | None) -> np.ndarray:
    """The table's rows from ``first_call.npy``, checked: a plain float array (never a pickle), of
    shape (C + 1, *state) for C classes (one row when unconditional) and finite. CheckpointError
    naming the file and the fault otherwise."""
    from ...base.errors import CheckpointError

    try:
        means = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise CheckpointError(f"{path} is not a readable .npy array ({str(exc)[:200]}); rerun 'anchorflow tune'") from None
    if not isinstance(means, np.ndarray) or not np.issubdtype(means.dtype, np.floating):
        raise CheckpointError(f"{path}: expected a float array, got {getattr(means, 'dtype', type(means).__name__)}; "
                              "rerun 'anchorflow tune'")
    rows = {int(num_classes) + 1, 1} if num_classes else {1}
    if means.ndim != 1 + len(tuple(state_shape)) or tuple(means.shape[1:]) != tuple(state_shape) \
            or means.shape[0] not in rows:
        raise CheckpointError(f"{path}: shape {tuple(means.shape)}, expected ({' or '.join(map(str, sorted(rows)))}, "
                              f"{', '.join(map(str, state_shape))}) (a row per label and the null label); "
                              "rerun 'anchorflow tune'")
    if not np.all(np.isfinite(means)):
        raise CheckpointError(f"{path} holds NaN or Inf; rerun 'anchorflow tune'")
    return means.astype(np.float32, copy=False)
