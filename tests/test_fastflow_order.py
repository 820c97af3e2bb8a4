"""FastFlow's higher-order extrapolation and the UCB1 bonus's ``ln n``: rules a mutant breaks.

Truths: (1) the interpolating polynomial of degree <= k through k + 1 points (numpy's
``polyfit`` of exactly k + 1 points, an independent solver) on non-uniform times; (2) exactness:
order-k extrapolation reproduces any velocity polynomial in t of degree <= k, so skipped steps
change nothing and Euler's result is the left Riemann sum of v over the grid; a velocity of
degree k + 1 is *not* reproduced (the test can fail); (3) the UCB1 score by hand with
``ln n`` where ``ln(n + 1)`` picks another arm. Time convention: t = 1 noise, t = 0 data.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from anchorflow.base.errors import ConfigError
from anchorflow.runtime import FastFlowBandit, make_grid, solve
from anchorflow.runtime.solving.solvers.fastflow_loop import extrapolate, extrapolate_order

T = 24


@pytest.mark.parametrize("order", [1, 2, 3])
def test_extrapolate_order_matches_polyfit_on_non_uniform_times(order):
    rng = np.random.default_rng(order)
    ts = np.array([0.97, 0.83, 0.71, 0.42][: order + 1])  # non-uniform, decreasing like the grid
    vs = rng.standard_normal((order + 1, 3))
    got = extrapolate_order([(t, v) for t, v in zip(ts, vs)], 0.18, order)
    want = np.array([np.polyval(np.polyfit(ts, vs[:, j], order), 0.18) for j in range(3)])
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9)  # polyfit's lstsq round-off


def test_order_one_is_the_papers_rule():
    p, q = (0.9, np.array([1.0, -2.0])), (0.5, np.array([3.0, 0.25]))
    np.testing.assert_allclose(extrapolate_order([p, q], 0.2, 1), extrapolate(p, q, 0.2), rtol=1e-15, atol=1e-15)


def _poly_field(coef):
    def v(x, t, y=None):  # v(x, t) = sum_i coef_i t^i, independent of x
        t = np.asarray(t, np.float64)[:, None]
        return sum(c * t ** i for i, c in enumerate(coef)) * np.ones_like(x)
    return v


def _riemann(noise, coef, g):
    t = g[:-1, None]
    return noise + np.sum(np.diff(g)[:, None] * sum(c * t ** i for i, c in enumerate(coef)), axis=0)


@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("grid", ["uniform", "shift:3"])
def test_order_k_exact_for_degree_k_and_not_for_k_plus_1(order, grid):
    noise = np.random.default_rng(1).standard_normal((4, 2))
    g = make_grid(T, grid)
    coef = [0.4, -1.1, 2.3, -1.7, 1.3][: order + 2]
    exact, beyond = coef[: order + 1], coef
    res = solve("fastflow", _poly_field(exact), noise, T, grid=grid, fixed_skip=3, order=order)
    assert res.nfe < T // 2  # it really skipped
    # float64 on O(1) numbers through <= 3 divided differences of spacing >= 0.01: 1e-9
    np.testing.assert_allclose(res.x, _riemann(noise, exact, g), rtol=0, atol=1e-9)
    off = solve("fastflow", _poly_field(beyond), noise, T, grid=grid, fixed_skip=3, order=order)
    assert np.max(np.abs(off.x - _riemann(noise, beyond, g))) > 1e-6


def test_higher_order_bandit_measures_its_own_error():
    """The mse the bandit is paid on is the error of the order actually used: 0 on a quadratic."""
    noise = np.random.default_rng(2).standard_normal((4, 2))
    field = _poly_field([0.4, -1.1, 2.3])
    bandit = FastFlowBandit(T, mu=1e6)
    res = solve("fastflow", field, noise, T, bandit=bandit, order=2)
    # from step 3 on three anchors exist (step 2 is measured with the two it has)
    assert max(m for m in res.info["mse"][3:] if m is not None) < 1e-20
    res1 = solve("fastflow", field, noise, T, bandit=FastFlowBandit(T, mu=1e6), order=1)
    assert max(m for m in res1.info["mse"][3:] if m is not None) > 1e-8


@pytest.mark.parametrize("bad", [0, 4, 1.5, True, "2"])
def test_bad_order_refused(bad):
    with pytest.raises(ConfigError, match="order"):
        solve("fastflow", _poly_field([1.0]), np.zeros((2, 2)), T, order=bad)


def test_ucb_bonus_uses_ln_n_not_ln_n_plus_1():
    """Counts N = (1, 3), n = 4: the bonus gap is 2 sqrt(ln n) (1 - 1/sqrt 3) = 0.9952 with ln 4
    and 1.0722 with ln 5; a Q gap of 1.03 between them picks arm 2 only with ln n."""
    bandit = FastFlowBandit(T, mu=1.0, gamma=2.0, arms=(0, 2), adapt=False)
    bandit.observe(3, 0, 0.0)
    for _ in range(3):
        bandit.observe(3, 2, 1.03)
    gap = 2.0 * (1 - 1 / math.sqrt(3))
    assert gap * math.sqrt(math.log(4)) < 1.03 < gap * math.sqrt(math.log(5))
    assert bandit.select(3, 2) == 2
