"""BA-solver (Algorithm 1 of arXiv 2601.21542) and its single-anchor ablation (t = 1 noise, t = 0 data)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from anchorflow.base.errors import ConfigError
from anchorflow.runtime import solve
from anchorflow.runtime.evaluation.analytic import ExactSideNet
from anchorflow.runtime.solving.solvers.ba import LOBATTO_A, bi_anchor_rule, gauss_legendre

NULL = 2  # the test mixture has classes 0, 1


def zero_sidenet(x, v, t, h, y):
    return np.zeros_like(x)


class RecordingSideNet:
    """Zero SideNet that records each call's rows and offsets h."""

    def __init__(self) -> None:
        self.calls = []

    def __call__(self, x, v, t, h, cond):
        self.calls.append({"rows": x.shape[0], "h": np.array(h), "t": np.array(t)})
        return np.zeros_like(x)


def call_rows(batch: int, grid, guided: bool) -> list[int]:
    """Rows of BA's backbone call i (at t_i) with guidance on (0, 0.7]: its lowest guided time is
    t_{i+1} (the forward probe's last node), so 2B iff t_{i+1} <= 0.7, else the B conditional rows."""
    return [batch * (2 if guided and grid[i + 1] <= 0.7 else 1) for i in range(len(grid) - 1)]


def slope(nfes, errors) -> float:
    return float(-np.polyfit(np.log(nfes), np.log(errors), 1)[0])


# -- cost ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("guided", [False, True])
@pytest.mark.parametrize("n", range(2, 13))
def test_paper_probes_make_n_backbone_calls_and_2n_minus_1_sidenet_calls(n, guided, mixture, noise, counting):
    field, side = counting(mixture), RecordingSideNet()
    y = np.arange(len(noise)) % 2
    cfg = dict(cfg_scale=1.5, cfg_interval=(0.0, 0.7), null_label=NULL) if guided else {}
    out = solve("ba", field, noise, n, y=y, sidenet=side, probes="paper", **cfg)
    rows = call_rows(len(noise), 1.0 - np.arange(n + 1) / n, guided)
    assert out.nfe == len(field.calls) == n and [c["rows"] for c in field.calls] == rows
    assert out.sidenet_calls == len(side.calls) == 2 * n - 1
    assert [s.calls for s in out.steps] == [2] + [1] * (n - 2) + [0]
    assert [s.sidenet_calls for s in out.steps] == [3] + [2] * (n - 2) + [0]  # next forward probe included
    # from anchor i: a forward probe (3 x its rows), then from anchor i + 1 the backward probe (1 x)
    want = [3 * rows[0]] + [r * k for r in rows[1:] for k in (1, 3)]
    assert [c["rows"] for c in side.calls] == want
    h, a = 1.0 / n, LOBATTO_A
    forward, backward = side.calls[0], side.calls[1]  # first interval: forward then backward probe
    np.testing.assert_allclose(forward["h"], np.repeat([a * h, (1 - a) * h, h], rows[0]))
    np.testing.assert_allclose(backward["h"], -a * h)
    np.testing.assert_allclose(backward["t"], 1.0 - h)


@pytest.mark.parametrize("guided", [False, True])
@pytest.mark.parametrize("n", range(2, 13))
def test_merged_probes_make_n_sidenet_calls_for_n_intervals(n, guided, mixture, noise, counting):
    """One SideNet call per interval: the backward probe and the next forward probe share the
    terminal anchor (x_pred, v_end, t_{i+1}); offsets [-a h, a h', (1-a) h', h'] (4 x the rows)."""
    field, side = counting(mixture), RecordingSideNet()
    y = np.arange(len(noise)) % 2
    cfg = dict(cfg_scale=1.5, cfg_interval=(0.0, 0.7), null_label=NULL) if guided else {}
    grid = np.concatenate([[1.0], np.sort(np.random.default_rng(n).uniform(0.05, 0.95, n - 1))[::-1], [0.0]])
    # merged is the default; corrector_limit=inf: every interval but the last corrects on these random
    # grids (the default keeps the predictor where h > 2.5 t_{i+1}, tests/test_ba_tail.py)
    out = solve("ba", field, noise, n, y=y, sidenet=side, grid=grid, corrector_limit=math.inf, **cfg)
    rows = call_rows(len(noise), grid, guided)
    assert out.nfe == len(field.calls) == n and [c["rows"] for c in field.calls] == rows
    assert out.sidenet_calls == len(side.calls) == n
    assert [c["rows"] for c in side.calls] == [3 * rows[0]] + [4 * r for r in rows[1:]]  # the anchor's rows
    a = LOBATTO_A
    for i, call in enumerate(side.calls[1:]):  # the call after backbone call i + 1, at t_{i+1}
        h, hn = grid[i] - grid[i + 1], grid[i + 1] - grid[i + 2]
        np.testing.assert_allclose(call["h"], np.repeat([-a * h, a * hn, (1 - a) * hn, hn], rows[i + 1]))
        np.testing.assert_allclose(call["t"], grid[i + 1])


def test_ba_single_costs_one_call_and_one_sidenet_call_per_interval(mixture, noise, counting):
    field, side = counting(mixture), RecordingSideNet()
    out = solve("ba-single", field, noise, 5, sidenet=side, k=4)
    assert out.nfe == len(field.calls) == 5 and out.sidenet_calls == len(side.calls) == 5
    assert all(c["rows"] == 4 * len(noise) for c in side.calls)


# -- algebra ---------------------------------------------------------------------------------------
def pece_reference(velocity, x, grid):
    """Euler predictor, trapezoidal corrector, end velocity reused as the next start velocity."""
    v = velocity(x, grid[0])
    for i in range(len(grid) - 1):
        h = grid[i] - grid[i + 1]
        x_pred = x - h * v
        if i == len(grid) - 2:
            return x_pred
        v_end = velocity(x_pred, grid[i + 1])
        x, v = x - 0.5 * h * (v + v_end), v_end


@pytest.mark.parametrize("a", [LOBATTO_A, 1 / 3, 0.25, 0.1])
@pytest.mark.parametrize("scale", [1.0, 1.5])
def test_zero_sidenet_is_a_trapezoidal_predictor_corrector(a, scale, mixture, noise, tol):
    """Guidance over the whole of (0, 1] guides every node alike, so the reference stays simple."""
    y = np.arange(len(noise)) % 2
    null = np.full(len(noise), NULL)

    def guided(x, t):
        tt = np.full(len(x), t)
        v_c, v_u = mixture(x, tt, y), mixture(x, tt, null)
        return v_u + scale * (v_c - v_u)

    out = solve("ba", mixture, noise, 6, y=y, sidenet=zero_sidenet, cfg_scale=scale, null_label=NULL, a=a)
    np.testing.assert_allclose(out.x, pece_reference(guided, noise, np.linspace(1, 0, 7)), atol=tol["float64"])


def ba_zero_sidenet_by_hand(field, x, y, grid, a, scale, interval):
    """BA with delta = 0 written out from the spec (every node reuses its anchor's raw velocity and
    is guided at its OWN time: lo < t <= hi, t = 0 included when lo = 0), independent of the solver."""
    w_in = 1 / (3 * (1 - (1 - 2 * a) ** 2))
    w = [0.5 - w_in, w_in, w_in, 0.5 - w_in]

    def g(x, t):  # guided velocity at time t of the anchor state x (raw call at the anchor's time)
        return lambda tau: (field(x, [t], [NULL]) + scale * (field(x, [t], y) - field(x, [t], [NULL]))
                            if (interval[0] < tau or interval[0] == 0) and tau <= interval[1] else field(x, [t], y))

    anchor = g(x, grid[0])
    for i in range(len(grid) - 1):
        t, tn = grid[i], grid[i + 1]
        h = t - tn
        nodes = [t, t - a * h, t - (1 - a) * h, tn]
        x_pred = x - h * sum(wk * anchor(tau) for wk, tau in zip(w, nodes))
        if i == len(grid) - 2:
            return x_pred
        end = g(x_pred, tn)
        x = x - h * (w[0] * anchor(t) + w[1] * anchor(nodes[1]) + w[2] * end(tn + a * h) + w[3] * end(tn))
        anchor = end


@pytest.mark.parametrize("probes", ["merged", "paper"])
@pytest.mark.parametrize("interval", [(0.55, 1.0), (0.0, 0.7), (0.6, 0.65), (0.3, 0.9)])
@pytest.mark.parametrize("n", [2, 3])
def test_every_node_is_guided_at_its_own_time(n, interval, probes, tol):
    """The intervals put the backward node (t_{i+1} + a h) and its neighbours t_i, t_i - a h,
    t_{i+1}, t_{i+1} - a h on different sides of the CFG interval's ends, so guiding any node at
    another node's time changes the result (a = 1/4, uniform grid)."""
    x, y, s = np.array([[1.0, -2.0]]), np.array([0]), 3.0

    def field(x, t, cond):  # v = (label + 1) x + t
        lab = cond["y"] if isinstance(cond, dict) else cond
        return (np.asarray(lab, float)[:, None] + 1.0) * x + np.asarray(t)[:, None]

    out = solve("ba", field, x, n, y=y, sidenet=zero_sidenet, cfg_scale=s, cfg_interval=interval,
                null_label=NULL, a=0.25, probes=probes)
    expected = ba_zero_sidenet_by_hand(field, x, y, np.linspace(1, 0, n + 1), 0.25, s, interval)
    np.testing.assert_allclose(out.x, expected, atol=tol["float64"])


@pytest.mark.parametrize("probes", ["merged", "paper"])
@pytest.mark.parametrize("scale", [1.0, 2.0])
@pytest.mark.parametrize("n", [2, 3, 5, 8])
def test_zero_sidenet_on_a_uniform_grid_is_exactly_ab2(n, scale, probes, mixture, noise, tol):
    """With delta = 0 the predictors y_{i+1} = x_i - h v_i follow y_{i+2} = y_{i+1} - h (3/2 v_{i+1} -
    1/2 v_i), v_i = v(y_i): AB2 with an Euler start; the last interval returns y_N."""
    y = np.arange(len(noise)) % 2
    cfg = dict(y=y, cfg_scale=scale, null_label=NULL)
    ba = solve("ba", mixture, noise, n, sidenet=zero_sidenet, probes=probes, **cfg).x
    np.testing.assert_allclose(ba, solve("ab2", mixture, noise, n, **cfg).x, atol=tol["float64"])


def test_guidance_is_applied_per_node_at_its_own_time(tol):
    """N = 2, a = 1/4, CFG on (0, 0.7]; first-interval nodes at t = 1, .875 (unguided), .625, .5 (guided)."""
    x, y, s = np.array([[1.0, -2.0]]), np.array([0]), 3.0

    def field(x, t, cond):  # v = (label + 1) x + t
        return (np.asarray(cond["y"], float)[:, None] + 1.0) * x + np.asarray(t)[:, None]

    def g(x, t):  # guided velocity, all rows of one (x, t)
        v_c, v_u = field(x, [t], {"y": y}), field(x, [t], {"y": [NULL]})
        return v_u + s * (v_c - v_u)

    out = solve("ba", field, x, 2, y=y, sidenet=zero_sidenet, cfg_scale=s, cfg_interval=(0.0, 0.7),
                null_label=NULL, a=0.25)
    v_c0, g0 = field(x, [1.0], {"y": y}), g(x, 1.0)  # zero SideNet: every node reuses the raw start velocity
    x_pred = x - 0.5 * (0.5 * v_c0 + 0.5 * g0)  # weights: out + in unguided, in + out guided
    x1 = x - 0.5 * (0.5 * v_c0 + 0.5 * g(x_pred, 0.5))  # end and backward node (t = .625) guided
    expected = x1 - 0.5 * g(x_pred, 0.5)  # last interval: predictor from the reused anchor, all guided
    np.testing.assert_allclose(out.x, expected, atol=tol["float64"])


@pytest.mark.parametrize("a, weights", [(LOBATTO_A, [1, 5, 5, 1]), (1 / 3, [1.5, 4.5, 4.5, 1.5])])
def test_bi_anchor_rule_weights(a, weights, tol):
    rule = bi_anchor_rule(a)
    np.testing.assert_allclose(rule.weights, np.array(weights) / 12, atol=tol["float64"])


@pytest.mark.parametrize("rule, degree", [(bi_anchor_rule(0.2), 3), (bi_anchor_rule(), 5),
                                          (gauss_legendre(3), 5), (gauss_legendre(1), 1)])
def test_quadrature_rules_are_exact_for_polynomials(rule, degree, tol):
    c, w = np.array(rule.nodes), np.array(rule.weights)
    for p in range(degree + 1):
        assert abs(w @ c**p - 1 / (p + 1)) <= tol["float64"]
    assert abs(w @ c ** (degree + 1) - 1 / (degree + 2)) > 1e-6  # and not one degree more


@pytest.mark.parametrize("a", [0.0, 0.5, -0.1, 0.7, "0.3", True, float("nan")])
def test_bad_node_fraction_is_refused(a, mixture, noise):
    with pytest.raises(ConfigError, match="0 < a < 1/2"):
        solve("ba", mixture, noise, 4, sidenet=zero_sidenet, a=a)


@pytest.mark.parametrize("k", [0, 11, 2.5])
def test_bad_node_count_is_refused(k, mixture, noise):
    with pytest.raises(ConfigError, match="integer in 1..10"):
        solve("ba-single", mixture, noise, 4, sidenet=zero_sidenet, k=k)


@pytest.mark.parametrize("method", ["ba", "ba-single"])
def test_sidenet_is_required(method, mixture, noise):
    with pytest.raises(ConfigError, match="needs a SideNet"):
        solve(method, mixture, noise, 4)


# -- accuracy on the closed-form field -----------------------------------------------------------------
def test_exact_sidenet_beats_heun(mixture, noise, reference, rmse):
    """With delta = v(exact flow to t - h) - v the quadrature nodes are exact velocities: the error
    is quadrature error only (Lobatto: O(h^6) per step) and falls far faster than Heun's O(h^2)."""
    nfes = (5, 7, 9)  # Heun (Euler last step) spends 2N - 1 calls
    side = ExactSideNet(mixture, steps=50)
    err = {m: [rmse(solve(m, mixture, noise, n, sidenet=side).x, reference) for n in nfes]
           for m in ("ba", "ba-single", "heun")}
    err["ba-paper"] = [rmse(solve("ba", mixture, noise, n, sidenet=side, probes="paper").x, reference) for n in nfes]
    for m in ("ba", "ba-paper", "ba-single"):
        assert all(e < 1e-3 * h for e, h in zip(err[m], err["heun"])), err
        assert slope(nfes, err[m]) > slope(nfes, err["heun"]) + 2, err


@pytest.mark.parametrize("scale", [0.0, 0.5])
def test_bi_anchor_beats_single_anchor_with_an_imperfect_sidenet(scale, mixture, noise, reference, rmse):
    """SideNet = scale * exact delta: its error grows with the offset. The single anchor's nodes all
    err to the same side (order 1); the bi-anchor corrector's two inner nodes come from opposite
    anchors with offsets +-a h, their errors cancel to leading order and BA keeps order 2."""
    nfes = (4, 8, 12)
    side = ExactSideNet(mixture, scale=scale, steps=20)
    err = {m: [rmse(solve(m, mixture, noise, n, sidenet=side).x, reference) for n in nfes]
           for m in ("ba", "ba-single")}
    assert all(b < 0.5 * s for b, s in zip(err["ba"], err["ba-single"])), err
    assert slope(nfes, err["ba"]) > 1.7 and slope(nfes, err["ba-single"]) < 1.3, err


@pytest.mark.parametrize("method", ["ba", "ba-single"])
def test_float32_states_stay_float32(method, mixture, noise):
    out = solve(method, mixture, noise.astype(np.float32), 4, sidenet=ExactSideNet(mixture, steps=4))
    assert out.x.dtype == np.float32 and np.isfinite(out.x).all()
