"""FastFlow over an Adams base (``base="adams"``): rules a mutant breaks.

Truths: (1) the closed-form integral of a polynomial over [a, b]: ``interval_weights`` of m nodes
integrates every polynomial of degree < m exactly on non-uniform nodes and an interval that
does not start at the last node, and degree m not (the test can fail); (2) an independent
solver: a run with any skip pattern (fixed or bandit-chosen) is Adams-Bashforth of order + 1 on
the sub-grid of computed times, i.e. the registry's ``ab2`` / ``ipndm`` (their own weights,
:func:`anchorflow.runtime.solving.solvers.multistep.adams_weights`) on that explicit grid.
Time convention: t = 1 noise, t = 0 data.
"""

from __future__ import annotations

import numpy as np
import pytest

from anchorflow.base.errors import ConfigError
from anchorflow.runtime import FastFlowBandit, make_grid, solve
from anchorflow.runtime.evaluation.analytic import GaussianMixture
from anchorflow.runtime.solving.solvers.fastflow_loop import interval_weights

T = 24


@pytest.fixture(scope="module")
def gm():
    return GaussianMixture.random((1, 4, 4), 6, classes=3, seed=3, spread=0.6, std=(0.2, 0.4))


@pytest.mark.parametrize("m", [1, 2, 3, 4])
def test_interval_weights_integrate_degree_below_m_exactly(m):
    nodes = np.array([0.93, 0.81, 0.64, 0.52][:m])  # non-uniform, decreasing, last = newest
    a, b = 0.47, 0.31  # an interval after a skip: it does not start at the last node
    w = interval_weights(nodes, a, b)
    for deg in range(m + 1):
        mean = (b ** (deg + 1) - a ** (deg + 1)) / ((deg + 1) * (b - a))  # (1/(b-a)) int_a^b s^deg ds
        err = abs(float(np.dot(w, nodes ** deg)) - mean)
        if deg < m:
            assert err < 1e-12  # a 4x4 solve on O(1) numbers
        else:
            assert err > 1e-6  # degree m is outside the rule: a mutant that "passes" everything fails here


def test_interval_weights_from_the_last_node_are_adams_bashforth():
    from anchorflow.runtime.solving.solvers.multistep import adams_weights

    nodes = np.array([0.9, 0.7, 0.55])
    np.testing.assert_allclose(interval_weights(nodes, 0.55, 0.3), adams_weights(nodes, 0.3), rtol=0, atol=1e-12)
    np.testing.assert_allclose(interval_weights([0.5, 0.4], 0.4, 0.3), [-0.5, 1.5], rtol=0, atol=1e-14)


def _sub_grid(res, grid):
    g = make_grid(T, grid)
    return np.r_[g[:-1][np.array(res.info["computed"])], 0.0]


@pytest.mark.parametrize("order,twin", [(1, ("ab2", {})), (2, ("ipndm", {"order": 3})), (3, ("ipndm", {"order": 4}))])
@pytest.mark.parametrize("grid", ["uniform", "shift:3"])
def test_fixed_skip_over_adams_is_adams_on_the_computed_sub_grid(gm, order, twin, grid):
    rng = np.random.default_rng(order)
    noise, y = rng.standard_normal((3, 1, 4, 4)), rng.integers(0, 3, 3)
    res = solve("fastflow", gm, noise, T, grid=grid, y=y, fixed_skip=2, order=order, base="adams")
    sub = _sub_grid(res, grid)
    assert res.nfe == len(sub) - 1 < T // 2  # it really skipped
    ref = solve(twin[0], gm, noise, len(sub) - 1, grid=sub, y=y, **twin[1])
    # float64, <= 8 steps of O(1) velocities: the two weight solvers agree to ~1e-15 per step
    np.testing.assert_allclose(res.x, ref.x, rtol=0, atol=1e-11)
    euler = solve("fastflow", gm, noise, T, grid=grid, y=y, fixed_skip=2, order=order)
    assert np.max(np.abs(euler.x - ref.x)) > 1e-4  # the base matters: Euler's update is another solver


def test_bandit_over_adams_is_ab2_on_the_grid_it_chose(gm):
    rng = np.random.default_rng(7)
    bandit = FastFlowBandit(T, calls=9, seed=0)
    for _ in range(6):  # learn a little, so the pattern is the bandit's, not a fixed rule
        solve("fastflow", gm, rng.standard_normal((2, 1, 4, 4)), T, y=rng.integers(0, 3, 2), bandit=bandit,
              base="adams")
    noise, y = rng.standard_normal((3, 1, 4, 4)), rng.integers(0, 3, 3)
    res = solve("fastflow", gm, noise, T, y=y, bandit=bandit, base="adams", learn=False)
    skipped = [k for k, c in enumerate(res.info["computed"]) if not c]
    assert skipped and res.info["base"] == "adams" and res.info["order"] == 1
    sub = _sub_grid(res, None)
    ref = solve("ab2", gm, noise, len(sub) - 1, grid=sub, y=y)
    np.testing.assert_allclose(res.x, ref.x, rtol=0, atol=1e-11)


@pytest.mark.parametrize("bad", ["ab2", "", None, 1])
def test_bad_base_refused(gm, bad):
    with pytest.raises(ConfigError, match="fastflow base must be one of euler, adams"):
        solve("fastflow", gm, np.zeros((1, 1, 4, 4)), T, y=np.zeros(1, int), base=bad)
