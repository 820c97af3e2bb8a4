"""BA-solver on grids ending with a long step and a tiny last one: ``corrector_limit`` (t = 1 noise, t = 0 data).

An interval [t, tn] with ``h > corrector_limit * tn`` keeps its predictor (runtime/solving/solvers/ba.py).
Truths: the exact flow of a closed-form Gaussian mixture (RK4, 2000 steps, error ~1e-12) and,
for the bundled digits model, RK4 with 256 calls from the same noise.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from anchorflow.base.errors import ConfigError
from anchorflow.runtime import solve
from anchorflow.runtime.evaluation.analytic import ExactSideNet, GaussianMixture, exact_flow
from anchorflow.runtime.evaluation.metrics import psnr
from anchorflow.runtime.solving.solvers.ba import CORRECTOR_LIMIT, LOBATTO_A, corrects

# concentrated data (stds 1e-3..2e-3, like images near their manifold): the field near t = 0 is
# stiff (Lipschitz ~ 1/t off the data), which is what makes the corrector fail on a tail
NARROW = dict(state_shape=(2,), components=3, seed=0, spread=1.5, std=(0.001, 0.002))
# broad data (stds 0.4..0.7): no stiffness, the corrector pays on every interval it is allowed
BROAD = dict(state_shape=(2,), components=3, seed=0, spread=1.5, std=(0.4, 0.7))


def uniform(n: int) -> list[float]:
    return [float(t) for t in np.linspace(1.0, 0.0, n + 1)]


def with_tail(n: int, tau: float = 0.001) -> list[float]:
    """The uniform grid of n intervals with (tau, 0) in place of its last point: n + 1 intervals."""
    return uniform(n)[:-1] + [tau, 0.0]


def rmse(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sqrt(np.mean((np.asarray(a) - np.asarray(b)) ** 2)))


class RecordingSideNet:
    """Zero SideNet recording each call's offsets h (one entry per row)."""

    def __init__(self) -> None:
        self.calls: list[np.ndarray] = []

    def __call__(self, x, v, t, h, cond):
        self.calls.append(np.array(h))
        return np.zeros_like(x)


@pytest.fixture(scope="module")
def narrow():
    mix = GaussianMixture.random(**NARROW)
    noise = np.random.default_rng(0).standard_normal((32, 2))
    return mix, noise, exact_flow(mix, noise, 1.0, 0.0, steps=2000), ExactSideNet(mix, steps=100)


# -- the rule --------------------------------------------------------------------------------------
@pytest.mark.parametrize("t, tn, limit, want", [
    (0.35, 0.1, 2.4, False), (0.35, 0.1, 2.6, True),  # h / tn = 2.5 (within rounding)
    (1 / 3, 0.001, 2.5, False), (1 / 3, 1 / 6, 2.5, True), (0.5, 0.0, math.inf, False), (0.5, 0.25, 0.0, False),
])
def test_corrects_compares_h_with_limit_times_t_end(t, tn, limit, want):
    assert corrects(t, tn, limit) is want


@pytest.mark.parametrize("grid, flags", [
    (with_tail(3), [True, True, False, False]),  # [1/3, 0.001]: h / tn = 332
    ([1.0, 0.6, 0.35, 0.1, 0.0], [True, True, True, False]),  # h / tn = 0.67, 0.71, 2.5 (within rounding)
    ([1.0, 0.6, 0.35, 0.097, 0.0], [True, True, False, False]),  # h / tn = 2.61
    (uniform(6), [True] * 5 + [False]),  # h / tn = 1 / (N - i - 1) <= 1
])
def test_steps_say_which_intervals_corrected(grid, flags, narrow):
    mix, noise, _, _ = narrow
    out = solve("ba", mix, noise, len(grid) - 1, grid=grid, sidenet=RecordingSideNet())
    assert [s.info["corrected"] for s in out.steps] == flags
    assert out.info["corrector_limit"] == CORRECTOR_LIMIT


# -- cost ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("probes", ["merged", "paper"])
@pytest.mark.parametrize("n", [2, 3, 5, 10])
def test_a_tail_costs_one_call_per_interval_and_drops_only_its_backward_probe(n, probes, narrow, counting):
    """N + 1 intervals, N + 1 backbone calls; the uncorrected interval [1/n, 0.001] has no backward probe
    (merged: its terminal SideNet call has the next forward probe's 3 offsets only; paper: one call fewer)."""
    mix, noise, _, _ = narrow
    field, side = counting(mix), RecordingSideNet()
    grid = with_tail(n)
    out = solve("ba", field, noise, n + 1, grid=grid, sidenet=side, probes=probes)
    assert out.nfe == len(field.calls) == n + 1
    assert [float(c["t"][0]) for c in field.calls] == pytest.approx(grid[:-1])
    b, a = len(noise), LOBATTO_A
    backward = [c for c in side.calls if np.all(c < 0)] if probes == "paper" else [c[:b] for c in side.calls[1:-1]]
    assert out.sidenet_calls == len(side.calls) == (n + 1 if probes == "merged" else 2 * (n + 1) - 1 - 1)
    # every corrected interval i < n - 1 probes back by -a h_i from its end; the tail's start (i = n - 1) does not
    np.testing.assert_allclose([float(c[0]) for c in backward], [-a / n] * (n - 1))
    last = side.calls[-1]  # from the anchor at 0.001: the tiny interval's forward probe only
    np.testing.assert_allclose(last, np.repeat([a * 0.001, (1 - a) * 0.001, 0.001], b), rtol=1e-12)


# -- quality against the exact flow ----------------------------------------------------------------
@pytest.mark.parametrize("n", [3, 5])
def test_tail_on_concentrated_data_recovers_with_the_default(n, narrow):
    """Exact SideNet, stiff field near t = 0: correcting [1/n, 0.001] multiplies the error (measured
    0.72 / 0.27 RMSE at n = 3 / 5); keeping the predictor gives 0.0125 / 0.0063, below the same grid
    without the tail (0.026 / 0.014) and AB2 on the tail grid (0.135 / 0.118)."""
    mix, noise, ref, side = narrow
    err = lambda grid, method="ba", **o: rmse(solve(method, mix, noise, len(grid) - 1, grid=grid,  # noqa: E731
                                                    sidenet=side if method == "ba" else None, **o).x, ref)
    fixed, before = err(with_tail(n)), err(with_tail(n), corrector_limit=math.inf)
    assert fixed <= err(uniform(n))  # the same grid without the tail (margin 2x as measured)
    assert fixed <= err(with_tail(n), "ab2")  # margin 10x
    assert before >= 10 * fixed  # margin 4x: what the fix is for


def test_the_corrector_still_runs_where_it_pays(counting):
    """Broad data, an under-trained SideNet (scale 0.8): on a uniform grid (h / tn <= 1) the corrector
    cuts the error 3x (measured 0.0195 vs 0.0566 with every corrector off); a limit that switched it
    off there would fail this."""
    mix = GaussianMixture.random(**BROAD)
    noise = np.random.default_rng(0).standard_normal((32, 2))
    ref = exact_flow(mix, noise, 1.0, 0.0, steps=2000)
    side = ExactSideNet(mix, scale=0.8, steps=100)
    default = rmse(solve("ba", mix, noise, 3, sidenet=side).x, ref)
    never = rmse(solve("ba", mix, noise, 3, sidenet=side, corrector_limit=0.0).x, ref)
    assert default < 0.5 * never


# -- unchanged where there is no tail --------------------------------------------------------------
@pytest.mark.parametrize("probes", ["merged", "paper"])
@pytest.mark.parametrize("grid", [None, "shift:3", "shift:0.5", "warp:0.6,1.2"])
@pytest.mark.parametrize("n", [2, 3, 5, 8, 12])
def test_grids_within_the_limit_are_bit_identical_to_always_correcting(n, grid, probes, narrow):
    mix, noise, _, _ = narrow
    side = lambda x, v, t, h, cond: 0.3 * h.reshape(-1, 1) * (x - v) * np.cos(t).reshape(-1, 1)  # noqa: E731
    g = solve("ba", mix, noise, n, grid=grid, sidenet=side, probes=probes, corrector_limit=math.inf)
    t = np.asarray(g.grid)
    assert np.all((t[:-2] - t[1:-1]) <= CORRECTOR_LIMIT * t[1:-1])  # the premise: no interval is over the limit
    out = solve("ba", mix, noise, n, grid=grid, sidenet=side, probes=probes)
    assert np.array_equal(out.x, g.x) and out.sidenet_calls == g.sidenet_calls


def test_bad_corrector_limit_is_refused(narrow):
    mix, noise, _, _ = narrow
    for bad in (-1.0, float("nan"), "2", True, None):
        with pytest.raises(ConfigError, match="corrector_limit"):
            solve("ba", mix, noise, 3, sidenet=RecordingSideNet(), corrector_limit=bad)


# -- the bundled digits model (ONNX, onnxruntime) --------------------------------------------------
@pytest.fixture(scope="module")
def digits():
    from anchorflow.modelref import open_model

    m = open_model("default", backend="ort-cpu", need_sidenet=True)
    noise = np.random.default_rng(0).standard_normal((32, *m.meta["state_shape"])).astype(np.float32)
    kw = dict(y=np.arange(32) % 10, null_label=m.meta["null_label"], sidenet=m.sidenet)
    ref = solve("rk4", m.velocity, noise, 256, **kw).x
    return m, noise, kw, ref


def test_digits_tail_grid_is_at_least_as_good_as_without_the_tail(digits):
    """benchmarks/ba_tail.py (128 samples): uniform 3 intervals 29.0 dB, + tail 0.001 17.9 dB before the
    fix, 29.0 after; AB2 on the tail grid 27.1. Tolerance 0.3 dB for 32 samples instead of 128."""
    m, noise, kw, ref = digits
    db = lambda grid, method="ba", **o: float(psnr(solve(method, m.velocity, noise, len(grid) - 1,  # noqa: E731
                                                         grid=grid, **kw, **o).x, ref, data_range=2.0))
    fixed = db(with_tail(3))
    assert fixed >= db(uniform(3)) - 0.3
    assert fixed >= db(with_tail(3), "ab2")
    assert db(with_tail(3), corrector_limit=math.inf) <= fixed - 5.0  # measured 11 dB lower


def test_digits_tuned_grids_are_unchanged(digits):
    """The BA grids `anchorflow tune` recorded in the bundle (max h / tn 2.21) keep every corrector."""
    m, noise, kw, _ = digits
    noise, kw = noise[:8], {**kw, "y": kw["y"][:8]}
    tuned = json.loads((m.files.bundle / "tuned.json").read_text())["grids"]
    grids = [g["times"] for g in tuned.values() if g["solver"] == "ba"]
    assert len(grids) >= 10
    for grid in grids:
        a = solve("ba", m.velocity, noise, len(grid) - 1, grid=grid, **kw)
        b = solve("ba", m.velocity, noise, len(grid) - 1, grid=grid, corrector_limit=math.inf, **kw)
        assert np.array_equal(a.x, b.x) and all(s.info["corrected"] for s in a.steps[:-1])
