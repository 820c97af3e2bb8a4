"""FastFlow's bandit maths: the reward's sign, the bonus unit, the budget and the quality guard.

Each rule has a test a mutant cannot pass: a flipped reward sign (``mse - mu a`` or
``mu a + mse``), a bonus unit forced to 1, a budget that does not adapt, a Q that is not
shifted when mu moves. Truths: independent recomputation of the extrapolation errors along the
trajectory, the UCB1 formula by hand, exact scale invariance under a power-of-two rescaling,
and the mean of recomputed rewards. Time convention: t = 1 noise, t = 0 data.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from anchorflow.base.errors import ConfigError
from anchorflow.runtime import FastFlowBandit, make_grid, solve
from anchorflow.runtime.solving.solvers.fastflow_loop import extrapolate


def _noise(seed, b: int = 8) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((b, 2)).astype(np.float32)


def _labels(b: int = 8) -> np.ndarray:
    return np.arange(b) % 2


def _stream(velocity, bandit: FastFlowBandit, generations: int, seed: int = 0) -> list:
    return [solve("fastflow", velocity, _noise([seed, g]), bandit.T, y=_labels(), bandit=bandit)
            for g in range(generations)]


def _replay_mses(velocity, res, noise, y) -> dict[int, float]:
    """Independent replay of a FastFlow run's trajectory from its per-step ``computed`` flags:
    the extrapolation error (float64 mse) at every computed step with two anchors before it."""
    g, x, anchors, out = make_grid(len(res.steps)), noise.astype(np.float32), [], {}
    for k, st in enumerate(res.steps):
        t = float(g[k])
        if st.info["computed"]:
            v = velocity(x, np.full(len(x), t, np.float32), y).astype(np.float32)
            if len(anchors) == 2:
                out[k] = float(np.mean((extrapolate(*anchors, t).astype(np.float64) - v) ** 2))
            anchors = [*anchors[-1:], (t, v)]
        else:
            v = extrapolate(*anchors, t)
        x = x + (float(g[k + 1]) - t) * v  # python floats, as the solver: x stays float32
    return out


def test_reward_is_mu_times_skip_minus_error(mixture):
    """Pins the sign: r = mu * a - mse, with mse recomputed along the trajectory (kills both
    ``mse - mu * a`` and ``mu * a + mse``)."""
    mu = 0.05  # the same order as the errors here, so both terms matter
    bandit = FastFlowBandit(20, mu=mu, gamma=0.5)
    _stream(mixture, bandit, 4)  # learn a little so that later choices differ from "try all"
    noise, y = _noise(99), _labels()
    before = bandit.copy()
    res = solve("fastflow", mixture, noise, 20, y=y, bandit=bandit)
    mses = _replay_mses(mixture, res, noise, y)
    rewards = res.info["rewards"]
    assert rewards and any(a > 0 for _, a, _ in rewards)
    computed = [k for k, s in enumerate(res.steps) if s.info["computed"]]
    for k, a, r in rewards:
        m = computed[computed.index(k) + 1]  # the next computed step pays B_k
        assert m == k + a + 1
        # the float32 trajectory replayed with the same arithmetic: equal up to float64 round-off
        assert r == pytest.approx(mu * a - mses[m], rel=1e-12, abs=1e-15)
    # and the state's Q is the running mean of exactly those rewards
    k, a, r = rewards[-1]
    i = bandit.arms.index(a)
    n = before.N[k, i] + sum(1 for kk, aa, _ in rewards if (kk, aa) == (k, a))
    assert bandit.N[k, i] == n
    assert bandit.Q[k, i] == pytest.approx((before.Q[k, i] * before.N[k, i] + sum(
        rr for kk, aa, rr in rewards if (kk, aa) == (k, a))) / n, rel=1e-12)


def test_small_error_skips_win_and_large_error_skips_lose():
    """Behaviour of the sign: v = 1 + t for t >= 1/2 (linear: every extrapolation exact) and
    v = 1 + t + c (1/2 - t)^2 below (quadratic: a linear extrapolation d ahead of anchors h
    apart misses by c d (d + h), so skipping 2 costs 36x the mse of skipping none). With mu
    far below that gap, the settled path skips on the linear part and computes on the curved
    one; a flipped sign does the opposite on one of the two parts."""

    def bent(x, t, y):
        t = np.asarray(t, np.float64)[:, None]
        return ((1.0 + t + 100.0 * np.clip(0.5 - t, 0, None) ** 2) * np.ones(x.shape[1:])).astype(x.dtype)

    T = 24
    bandit = FastFlowBandit(T, mu=1e-3, gamma=0.5, arms=(0, 2))
    for g in range(40):
        res = solve("fastflow", bent, _noise(g), T, bandit=bandit)
    grid, arms = make_grid(T), res.info["arms"]
    early = [arms[k] for k in range(1, T) if arms[k] is not None and grid[k + 3] > 0.5]
    late = [arms[k] for k in range(1, T) if arms[k] is not None and grid[k] < 0.5]
    assert early and all(a == 2 for a in early)
    assert late and all(a == 0 for a in late)


def test_bonus_unit_is_mu():
    """UCB1 with the bonus measured in mu: ``Q + gamma * mu * sqrt(ln n / N)``. Here the two
    units choose differently (by hand: unit mu -> arm 2 scores 3.51e-3 vs 1.52e-3; unit 1 ->
    arm 0 scores 1.52 vs 0.51), so a bonus forced to unit 1 fails."""
    mu, gamma = 1e-3, 1.0
    for bonus, expected in [("mu", 2), ("raw", 0)]:
        b = FastFlowBandit(10, mu=mu, gamma=gamma, arms=(0, 2), bonus=bonus)
        b.observe(3, 0, 0.0)
        for _ in range(9):
            b.observe(3, 2, 3e-3)
        unit = mu if bonus == "mu" else 1.0
        score = np.array([0.0, 3e-3]) + gamma * unit * np.sqrt(math.log(10) / np.array([1, 9]))
        assert (0, 2)[int(np.argmax(score))] == expected == b.select(3, 6)


def test_choices_do_not_depend_on_the_velocity_scale(mixture):
    """With the bonus in units of mu, scaling the field by 4 (exact in floating point: x and v
    scale by 4, every mse and mu by 16) leaves every choice identical, budget included. With the
    literal unit-1 bonus the choices change: this is what the unit is for."""

    def scaled(x, t, y):
        return 4.0 * mixture(x / 4.0, t, y)

    def arms(velocity, bonus, factor):
        b = FastFlowBandit(16, bonus=bonus, seed=3)
        out = []
        for g in range(25):
            r = solve("fastflow", velocity, factor * _noise(g), 16, y=_labels(), bandit=b)
            out.append(r.info["arms"])
        return out, b

    base, b1 = arms(mixture, "mu", 1.0)
    big, b4 = arms(scaled, "mu", 4.0)
    assert base == big and b4.mu == 16.0 * b1.mu
    assert arms(mixture, "raw", 1.0)[0] != arms(scaled, "raw", 4.0)[0]


@pytest.mark.parametrize("seed", [0, 1])
def test_budget_converges_on_the_closed_form_field(mixture, seed):
    """A 3x budget on T = 30 (target 10 calls): within 60 generations the average calls settle;
    generations 60-99 average within 10 % of the target (measured: 10.0-10.8 for both seeds).
    Without adaptation (the paper's calibrated fixed mu) they stay far above it."""
    b = FastFlowBandit(30, speedup=3, seed=seed)
    assert b.target == 10.0 and b.adaptive
    calls = [r.nfe for r in _stream(mixture, b, 100, seed)]
    assert calls[0] == 30  # the first generation calibrates: every step computed
    assert abs(np.mean(calls[60:100]) - 10.0) <= 1.0
    fixed = FastFlowBandit(30, adapt=False, seed=seed)
    assert np.mean([r.nfe for r in _stream(mixture, fixed, 100, seed)][60:]) > 15


def test_mu_follows_the_rule_and_q_is_shifted_exactly():
    """``mu <- mu exp(eta (calls - C) / C)``; every Q(a) becomes the mean reward under the new mu."""
    b = FastFlowBandit(12, calls=4, mu=0.1, eta=0.3)
    losses = [(2, 2, 0.05, True), (2, 2, 0.07, True), (3, 4, 0.2, True), (3, 4, 0.9, False), (3, 0, 0.01, True)]
    b.merge({"losses": losses, "calls": 7, "calibration": False})
    mu = 0.1 * math.exp(0.3 * (7 - 4) / 4)
    assert b.mu == pytest.approx(mu, rel=1e-14)
    # independent truth: the mean of each arm's rewards recomputed under the new mu; a skip the
    # guard refused (paid False) is charged -mu * a instead of paid +mu * a
    assert b.Q[2, 1] == pytest.approx(np.mean([mu * 2 - 0.05, mu * 2 - 0.07]), rel=1e-12)
    assert b.Q[3, 2] == pytest.approx(np.mean([mu * 4 - 0.2, -mu * 4 - 0.9]), rel=1e-12)
    assert b.Q[3, 0] == pytest.approx(-0.01, rel=1e-12)
    assert b.history[-1] == [7.0, b.mu]


def test_quality_guard_refuses_skips_above_tolerance(mixture):
    """With tol, a skip whose RMS error exceeds tol * RMS(v) is charged ``-mu a - mse`` (as much as
    an allowed skip is paid); a loose tol pays every skip ``mu a - mse``."""
    for tol, expect_refused in [(1e-4, True), (1e3, False)]:
        b = FastFlowBandit(16, mu=1.0, tol=tol)
        res = _stream(mixture, b, 6)
        paid = [p for r in res for (_, a, _, p) in r.info["losses"] if a > 0]
        assert paid and (not any(paid)) == expect_refused
        for r in res:
            for (k, a, mse, p), (_, _, rew) in zip(r.info["losses"], r.info["rewards"]):
                assert rew == pytest.approx((1.0 if p else -1.0) * a - mse, rel=1e-12)
    # refused skips earn less than computing: a tight guard turns skipping off
    tight = FastFlowBandit(16, mu=1.0, tol=1e-4)
    assert np.mean([r.nfe for r in _stream(mixture, tight, 40)][-10:]) > 14


def test_budget_options_checked():
    assert FastFlowBandit(30).target == 10.0  # default: a 3x speed-up
    assert FastFlowBandit(4).target == 3.0  # ... or as close as a short grid allows
    assert FastFlowBandit(30, calls=12).target == 12.0
    assert FastFlowBandit(30, mu=0.1).target is None  # a fixed mu: the paper's behaviour
    assert FastFlowBandit(30, mu=0.1, speedup=2).target == 15.0  # mu is then only the start
    for kw, msg in [(dict(calls=2), "calls must be"), (dict(calls=40), "calls must be"),
                    (dict(speedup=20), "speedup"), (dict(calls=10, speedup=3), "not both"),
                    (dict(speedup=2, adapt=False), "adapts mu"), (dict(tol=0), "tol"), (dict(eta=-1), "eta")]:
        with pytest.raises(ConfigError, match=msg):
            FastFlowBandit(30, **kw)
