"""FastFlow's hard calls cap (``max_calls``): rules a mutant breaks.

Truths: (1) the count of backbone calls, counted by a wrapper around the field (not by the
solver's own bookkeeping), never exceeds the cap, over bandits in every state, fixed patterns,
orders, tails, grids and mu = 0 / calibration runs; (2) where the uncapped run would spend
more (mu = 0 computes every step it may) the capped one spends exactly the cap, so an
off-by-one in the remaining-calls count fails one way or the other; (3) a cap that never binds
changes nothing (bit-identical result to the uncapped run); (4) the skip lengths the cap
forces, and the shorter arms it forbids, never reach the bandit's statistics.
Time convention: t = 1 noise, t = 0 data.
"""

from __future__ import annotations

import numpy as np
import pytest

from anchorflow.base.errors import ConfigError
from anchorflow.runtime import FastFlowBandit, solve
from anchorflow.runtime.evaluation.analytic import GaussianMixture


@pytest.fixture(scope="module")
def gm():
    return GaussianMixture.random((1, 4, 4), 6, classes=3, seed=3, spread=0.6, std=(0.2, 0.4))


class Counted:
    """The field, counting the calls that reach it."""

    def __init__(self, f):
        self.f, self.calls = f, 0

    def __call__(self, x, t, y=None):
        self.calls += 1
        return self.f(x, t, y)


def _run(gm, T, cap, rng, **kw):
    field = Counted(gm)
    res = solve("fastflow", field, rng.standard_normal((2, 1, 4, 4)), T, y=rng.integers(0, 3, 2),
                max_calls=cap, **kw)
    assert res.nfe == field.calls == sum(res.info["computed"])
    return res


@pytest.mark.parametrize("T,cap,order,tail", [(30, 10, 1, 1), (45, 15, 2, 1), (60, 5, 1, 2), (16, 6, 3, 1),
                                               (40, 20, 1, 3)])
def test_never_more_calls_than_the_cap(gm, T, cap, order, tail):
    rng = np.random.default_rng(T + cap)
    bandit = FastFlowBandit(T, calls=min(T, 2 * cap), seed=1, arms=(0, 1, 3))  # a budget above the cap
    counts = [_run(gm, T, cap, rng, bandit=bandit, order=order, tail=tail).nfe for _ in range(25)]
    assert max(counts) <= cap
    for grid in (None, "shift:3"):  # mu = 0 never skips on its own: the cap spends exactly max_calls
        assert _run(gm, T, cap, rng, mu=0.0, order=order, tail=tail, grid=grid).nfe == cap
    assert _run(gm, T, cap, rng, fixed_skip=0, order=order, tail=tail).nfe == cap
    calib = _run(gm, T, cap, rng, bandit=FastFlowBandit(T, calls=cap), order=order, tail=tail)
    assert calib.info["calibration"] and calib.nfe == cap


def test_tail_and_first_steps_stay_computed(gm):
    rng = np.random.default_rng(0)
    res = _run(gm, 60, 5, rng, mu=0.0, tail=2)
    c = res.info["computed"]
    assert c[0] and c[1] and c[-1] and c[-2] and sum(c) == 5


def test_a_cap_that_never_binds_changes_nothing(gm):
    rng = np.random.default_rng(4)
    noise, y = rng.standard_normal((3, 1, 4, 4)), rng.integers(0, 3, 3)
    b1, b2 = FastFlowBandit(30, calls=10, seed=2), FastFlowBandit(30, calls=10, seed=2)
    for _ in range(5):
        n, yy = rng.standard_normal((2, 1, 4, 4)), rng.integers(0, 3, 2)
        solve("fastflow", gm, n, 30, y=yy, bandit=b1)
        solve("fastflow", gm, n, 30, y=yy, bandit=b2, max_calls=30)
    a = solve("fastflow", gm, noise, 30, y=y, bandit=b1, learn=False)
    b = solve("fastflow", gm, noise, 30, y=y, bandit=b2, learn=False, max_calls=30)
    np.testing.assert_array_equal(a.x, b.x)
    np.testing.assert_array_equal(b1.Q, b2.Q)


def test_forced_skips_are_not_learned(gm):
    rng = np.random.default_rng(5)
    bandit = FastFlowBandit(40, calls=30, seed=0, arms=(0, 2))  # it wants ~30 calls; the cap allows 6
    losses = forced = 0
    for _ in range(10):
        res = _run(gm, 40, 6, rng, bandit=bandit)
        assert res.nfe <= 6
        losses += len(res.info["losses"])
        c, arms = res.info["computed"], res.info["arms"]
        # a computed step followed by a skip with no bandit decision recorded: the cap forced it
        forced += sum(1 for k in range(1, 38) if c[k] and not c[k + 1] and arms[k] is None)
        assert all(a is None or a in bandit.arms for a in arms)
    assert forced > 0  # the cap really forced skips no arm (0 or 2) fits
    assert bandit.N.sum() == losses  # ... and only the bandit's own decisions were learned


def test_select_respects_min_arm():
    b = FastFlowBandit(20, mu=1.0, adapt=False, arms=(0, 2, 4))
    for _ in range(3):
        b.observe(5, 0, 10.0)  # arm 0 by far the best ...
        b.observe(5, 2, -1.0)
        b.observe(5, 4, -2.0)
    assert b.select(5, 10) == 0
    assert b.select(5, 10, min_arm=1) == 2  # ... but forbidden
    assert b.select(5, 10, min_arm=3) == 4
    with pytest.raises(ConfigError, match="fits in 5..10"):
        b.select(5, 10, min_arm=5)


@pytest.mark.parametrize("bad", [0, 2, 31, 1.5, True, "9"])
def test_bad_cap_refused(gm, bad):
    with pytest.raises(ConfigError, match="max_calls"):
        solve("fastflow", gm, np.zeros((1, 1, 4, 4)), 30, y=np.zeros(1, int), max_calls=bad)





def test_mu_still_rises_while_the_cap_binds(gm):
    """Tiny mu, budget = cap: the calls sit at the cap, so a budget fed the calls alone would
    never move mu (exp(eta * 0)); fed ``calls_demand`` (calls + those the cap refused at the
    bandit's own rate) it rises every generation until the bandit skips on its own."""
    rng = np.random.default_rng(6)
    bandit = FastFlowBandit(30, calls=10, mu=1e-9, seed=0)
    mus = []
    for _ in range(6):
        res = _run(gm, 30, 10, rng, bandit=bandit)
        assert res.nfe == 10 and res.info["calls_demand"] > 10
        mus.append(bandit.mu)
    assert all(b > a for a, b in zip([1e-9] + mus, mus)) and mus[-1] > 1.4e-9  # calls alone: 1e-9 throughout
    free = solve("fastflow", gm, rng.standard_normal((2, 1, 4, 4)), 30, y=rng.integers(0, 3, 2), mu=1.0)
    assert free.info["calls_demand"] == free.nfe  # uncapped: the demand is the calls
