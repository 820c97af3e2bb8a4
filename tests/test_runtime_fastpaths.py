"""The runtime's batch-1 fast paths feed and return exactly what the plain code did.

Each cache or shortcut added to cut Python overhead (benchmarks/floor.py) is checked
against the plain numpy formula it replaces, written out here, with ``np.array_equal``: the
arrays fed to the networks and the samples must be bit-identical, not merely close.
Time convention: t = 1 noise, t = 0 data.
"""

from __future__ import annotations

import numpy as np
import pytest

from anchorflow.base.errors import ConfigError
from anchorflow.runtime import GuidedField, load_bundle, solve
from anchorflow.runtime.solving.grids import make_grid
from anchorflow.runtime.solving.solvers.multistep import adams_weights


class Recorder:
    """A linear velocity (closed form, float32) that keeps a copy of everything it is fed."""

    def __init__(self, scale: float = -0.7) -> None:
        self.scale, self.fed = np.float32(scale), []

    def __call__(self, x, t, cond):
        self.fed.append((x.copy(), t.copy(), None if cond is None else {k: v.copy() for k, v in cond.items()}))
        return self.scale * x + t.reshape(-1, *([1] * (x.ndim - 1)))


def test_scalar_times_fill_exactly_what_np_full_gave():
    rec = Recorder()
    field = GuidedField(rec, 3, y=np.array([0, 1, 2]), null_label=5, cfg_scale=2.0)
    x = np.ones((3, 2), np.float32)
    times = [1.0, 0.7, 1 / 3, 0.1 + 0.2, 1e-9, np.float64(0.123456789012)]  # values that round to float32
    for t in times:
        field.raw(x, t)
    for (_, tt, _), t in zip(rec.fed, times):
        want = np.full(6, np.asarray(t, dtype=np.float32), np.float32)
        assert tt.dtype == want.dtype and np.array_equal(tt, want)


def test_sidenet_feeds_equal_the_plain_concatenations():
    fed = []

    def side(x, v, t, h, cond):
        fed.append((x.copy(), v.copy(), t.copy(), h.copy(), {k: c.copy() for k, c in cond.items()}))
        return np.zeros_like(x)

    b, y = 2, np.array([3, 4])
    field = GuidedField(Recorder(), b, y=y, null_label=9, cfg_scale=1.5, cfg_interval=(0.0, 0.7), sidenet=side)
    x = np.arange(b * 3, dtype=np.float32).reshape(b, 3)
    offsets = [0.1, 0.25, -0.05, 1 / 3]
    for rows in (2, 1, 2):  # guided anchor, conditional-only anchor, guided again (the cached tiles)
        v_raw = np.full((rows * b, 3), 0.5, np.float32)
        field.side(x, v_raw, 0.6, offsets)
        xs, vs, ts, hs, cs = fed[-1]
        k, n = len(offsets), rows * b
        assert np.array_equal(xs, np.concatenate([x] * (rows * k), axis=0))
        assert np.array_equal(vs, np.concatenate([v_raw] * k, axis=0))
        assert np.array_equal(ts, np.full(n * k, 0.6, np.float32))
        assert np.array_equal(hs, np.repeat(np.asarray(offsets, np.float32), n))
        labels = np.concatenate([y, [9, 9]]) if rows == 2 else y
        assert np.array_equal(cs["y"], np.concatenate([labels] * k))


def _plain_adams(velocity, x, grid, order):
    """Adams-Bashforth as written before the weight cache: np.linalg weights every step."""
    ts, vs = [], []
    for i in range(len(grid) - 1):
        t, t_next = float(grid[i]), float(grid[i + 1])
        ts, vs = (ts + [t])[-order:], (vs + [velocity(x, t)])[-order:]
        w = adams_weights(np.array(ts), t_next)
        x = x + (t_next - t) * sum(float(wj) * vj for wj, vj in zip(w, vs))
    return x


@pytest.mark.parametrize("method, order", [("ab2", 2), ("ipndm", 4)])
def test_adams_with_cached_weights_is_bit_identical(method, order):
    rng = np.random.default_rng(0)
    noise = rng.standard_normal((4, 3)).astype(np.float32)
    rec = Recorder()

    def velocity(x, t):
        return rec(x, np.full(x.shape[0], t, np.float32), None)

    for grid in ("shift:3", [1.0, 0.9, 0.55, 0.5, 0.2, 0.0]):
        want = _plain_adams(velocity, noise.copy(), make_grid(5, grid), order)
        for _ in range(2):  # the second solve reads every weight from the cache
            got = solve(method, rec, noise, 5, grid=grid).x
            assert got.dtype == want.dtype and np.array_equal(got, want)


def test_named_grids_are_cached_but_never_shared():
    noise = np.zeros((1, 2), np.float32)
    first = solve("euler", Recorder(), noise, 4, grid="shift:2")
    first.grid[1] = 0.123  # a caller scribbling on its result
    second = solve("euler", Recorder(), noise, 4, grid="shift:2")
    assert np.array_equal(second.grid, make_grid(4, "shift:2")) and second.grid[1] != 0.123
    with pytest.raises(ConfigError, match="finite"):
        solve("euler", Recorder(), noise, 4, grid="shift:inf")  # refusals are not cached as grids
    with pytest.raises(ConfigError, match="has no option"):
        solve("euler", Recorder(), noise, 4, a=0.3)  # the cached option list still refuses


def test_checked_inputs_are_remembered_per_shape_and_still_refused():
    b = load_bundle("default", backend="ort-cpu")
    x, t, y = np.zeros((2, 1, 8, 8), np.float32), np.full(2, 0.5, np.float32), {"y": np.array([1, 2])}
    v = b.velocity(x, t, y)
    assert np.array_equal(b.velocity(x, t, y), v)  # the remembered signature gives the same call
    with pytest.raises(ConfigError, match="got shape"):
        b.velocity(np.zeros((2, 1, 8, 7), np.float32), t, y)  # a new, bad shape is checked
    with pytest.raises(ConfigError, match="got shape"):
        b.velocity(np.zeros((2, 1, 8, 7), np.float32), t, y)  # and refused again, never remembered
    f64 = b.velocity(x.astype(np.float64), t, {"y": np.array([1, 2], np.int32)})  # cast as before
    assert np.array_equal(f64, v)
