"""Inversion (t = 0 -> 1) and editing over every solver, against closed forms (t = 1 noise, t = 0 data)."""

from __future__ import annotations

import numpy as np
import pytest

from anchorflow.base.errors import ConfigError
from anchorflow.runtime import SOLVERS, solve
from anchorflow.runtime.evaluation.analytic import ExactSideNet
from anchorflow.runtime.solving.field import GuidedField
from anchorflow.runtime.solving.invert import condition_weight, edit, invert, inverting_solvers, regenerate

# method -> (order of the inversion's error, order of the round trip invert(solve(noise))'s, NFE pair in the
# asymptotic regime of the test mixture). The midpoint family and RK4 gain one order in the round trip: the
# same explicit step backwards on the same nodes cancels the leading error term (measured slopes: midpoint,
# RF-Solver 3.00, FireFlow 3.03, RK4 4.98; Euler, Heun, AB2 ... keep theirs, as a method and its adjoint do
# only for these symmetric node patterns).
ORDERS = {
    "euler": (1, 1, (64, 128)),
    "midpoint": (2, 3, (64, 128)),
    "rf-solver": (2, 3, (64, 128)),
    "fireflow": (2, 3, (64, 128)),
    "heun": (2, 2, (65, 129)),
    "rk4": (4, 5, (32, 64)),
    "rk4e": (2, 2, (65, 129)),
    "ab2": (2, 2, (64, 128)),
    "ipndm": (2, 2, (64, 128)),
    # uniform-t grid: the log-SNR steps at both ends do not shrink (slope ~1.8, as forward)
    "dpmpp2m": (2, 2, (128, 256)),
    "unipc": (2, 2, (64, 128)),
}
SIDENET = {"ba", "ba-single"}
# solvers whose steps use only dt = t_{i+1} - t_i: on an increasing grid they already run backwards
DT_ONLY = ("euler", "midpoint", "heun", "rk4", "rk4e", "ab2", "ipndm", "rf-solver", "fireflow")


class Zero:
    """A SideNet predicting delta = 0 (BA then reuses anchor velocities)."""

    def __call__(self, x, v, t, h, cond):
        return np.zeros_like(v)


def _kw(method, velocity):
    return {"sidenet": Zero()} if method in SIDENET else {}


def _nfe(method, steps=4):
    return SOLVERS[method].nfe_for_steps(steps)


def test_every_inverting_solver_has_an_order_case():
    assert set(inverting_solvers()) == set(ORDERS) | SIDENET  # fastflow (calls at run time) excluded


@pytest.mark.parametrize("method", sorted(ORDERS))
def test_round_trip_error_falls_at_the_solvers_order(method, mixture, noise, rmse, tol):
    """invert(exact data) -> noise with error ~ N^-p, invert(solve(noise)) -> noise ~ N^-q (not p, q +- 1)."""
    one, two, nfes = ORDERS[method]
    exact = solve("rk4", mixture, noise, 800).x  # the data of ``noise`` (RK4 error ~1e-13 here)
    one_way = [rmse(invert(method, mixture, exact, n).x, noise) for n in nfes]
    trip = [rmse(invert(method, mixture, solve(method, mixture, noise, n).x, n).x, noise) for n in nfes]
    for errors, order in ((one_way, one), (trip, two)):
        slope = np.log(errors[0] / errors[1]) / np.log(nfes[1] / nfes[0])
        # two NFE values instead of three: 0.4 (the measured slopes sit within 0.25 of these orders)
        assert abs(slope - order) <= tol["order"] + 0.1, f"{method}: slope {slope:.2f}, errors {errors}"


def test_ba_with_the_exact_sidenet_inverts_far_above_ab2s_order(mixture, noise, reference, rmse):
    """BA backwards asks the SideNet for negative offsets; with the exact one its error falls much
    faster than its zero-SideNet neighbour AB2 (order 2): a sign error in the offsets would not."""
    side = ExactSideNet(mixture, steps=40)
    errors = [rmse(invert("ba", mixture, reference, n, sidenet=side).x, noise) for n in (6, 12)]
    slope = np.log(errors[0] / errors[1]) / np.log(2)
    ab2 = rmse(invert("ab2", mixture, reference, 12).x, noise)
    assert slope > 3.5 and errors[1] < ab2 / 20, (slope, errors, ab2)


def test_ba_with_a_zero_sidenet_inverts_exactly_as_ab2(mixture, noise, reference, tol):
    """On a uniform grid BA with delta = 0 gives AB2's iterates (the spec), backwards too."""
    ba = invert("ba", mixture, reference, 7, sidenet=Zero()).x
    np.testing.assert_allclose(ba, invert("ab2", mixture, reference, 7).x, atol=tol["float64"])


@pytest.mark.parametrize("method", DT_ONLY)
def test_reversed_time_equals_the_solver_on_an_increasing_grid(method, mixture, reference, tol):
    """The reversed-time field is the increasing grid: same iterates as the solver run 0 -> 1 directly."""
    spec = SOLVERS[method]
    n = _nfe(method, 5)
    grid = np.linspace(0.0, 1.0, spec.steps_for_nfe(n) + 1)
    field = GuidedField(mixture, reference.shape[0], dtype=np.float64)
    direct = spec.fn(field, reference.copy(), grid).x
    np.testing.assert_allclose(invert(method, mixture, reference, n).x, direct, atol=tol["float64"])


def test_rf_solver_is_the_midpoint_rule(mixture, reference, tol):
    np.testing.assert_allclose(invert("rf-solver", mixture, reference, 8).x, invert("midpoint", mixture, reference, 8).x,
                               atol=tol["float64"])


class Straight:
    """v = (p - x) / (pole - t): straight trajectories x(t) = p + (pole - t) / pole (x(0) - p), velocity
    constant along each one; with the pole at t = 1 the noise prediction x + (1 - t) v = p is constant too."""

    def __init__(self, p, pole):
        self.p, self.pole = p, pole

    def __call__(self, x, t, cond):
        t = np.asarray(t, np.float64).reshape(-1, *([1] * (x.ndim - 1)))
        return (self.p - x) / (self.pole - t)

    def at_one(self, x0):
        return self.p + (self.pole - 1.0) / self.pole * (x0 - self.p)


@pytest.mark.parametrize("method", sorted(ORDERS) + sorted(SIDENET))
def test_straight_field_is_inverted_exactly_by_every_solver(method, tol):
    """Each solver is exact on straight-line flows (the exponential ones need their pole at the end, t = 1)."""
    rng = np.random.default_rng(1)
    x0, p = rng.standard_normal((5, 3)), rng.standard_normal((5, 3))
    field = Straight(p, 1.0 if method in ("unipc", "dpmpp2m") else 1.5)
    out = invert(method, field, x0, _nfe(method, 3), **_kw(method, field)).x
    np.testing.assert_allclose(out, field.at_one(x0), atol=1e3 * tol["float64"])
    assert np.abs(field.at_one(x0) - x0).max() > 0.1  # the field moves the state


@pytest.mark.parametrize("method", sorted(ORDERS) + sorted(SIDENET))
def test_exactly_n_calls_each_way(method, mixture, noise, counting):
    """N backbone calls to invert and N to regenerate, each one a single call with CFG's 2B rows."""
    nfe = _nfe(method, 3)
    y = np.arange(len(noise)) % 2
    for run in (invert, regenerate):
        field = counting(mixture)
        res = run(method, field, noise, nfe, y=y, null_label=2, cfg_scale=1.5, **_kw(method, mixture))
        assert res.nfe == len(field.calls) == nfe
        assert {c["rows"] for c in field.calls} == {2 * len(noise)}
        times = np.concatenate([c["t"] for c in field.calls])
        assert times.min() >= 0.0 and times.max() <= 1.0


def test_inversion_calls_run_from_data_up(mixture, noise, counting):
    field = counting(mixture)
    invert("euler", field, noise, 4)
    assert [float(c["t"][0]) for c in field.calls] == [0.0, 0.25, 0.5, 0.75]


def test_regenerate_from_one_is_solve(mixture, noise):
    for method in ("ab2", "unipc", "heun"):
        n = _nfe(method, 4)
        np.testing.assert_array_equal(regenerate(method, mixture, noise, n).x, solve(method, mixture, noise, n).x)


def test_partial_inversion_stops_at_t_end(mixture, reference, counting):
    field = counting(mixture)
    res = invert("euler", field, reference, 4, t_end=0.5)
    assert [float(c["t"][0]) for c in field.calls] == [0.0, 0.125, 0.25, 0.375] and res.grid[-1] == 0.5


@pytest.mark.parametrize("bad", [0.0, 1.5, -0.2, "x"])
def test_bad_trajectory_fraction_is_refused(mixture, reference, bad):
    with pytest.raises(ConfigError, match="trajectory fraction"):
        invert("euler", mixture, reference, 4, t_end=bad)


def test_fastflow_cannot_invert(mixture, reference):
    with pytest.raises(ConfigError, match="cannot invert"):
        invert("fastflow", mixture, reference, 4)


def test_budget_is_refused_not_rounded(mixture, reference):
    with pytest.raises(ConfigError, match="nfe must be"):
        invert("midpoint", mixture, reference, 5)


# -- edit --------------------------------------------------------------------------------------------------------
def test_edit_with_equal_conditions_is_invert_then_regenerate(mixture, reference):
    y = np.arange(len(reference)) % 2
    e = edit("ab2", mixture, reference, 6, source=y, target=y, strength=0.7)
    inv = invert("ab2", mixture, reference, 6, y=y, t_end=0.7)
    gen = regenerate("ab2", mixture, inv.x, 6, y=y, t_start=0.7)
    np.testing.assert_array_equal(e.noise, inv.x)
    np.testing.assert_array_equal(e.x, gen.x)
    assert e.nfe == 12


def test_edit_regenerates_under_the_target(mixture, reference):
    y = np.zeros(len(reference), np.int64)
    e = edit("euler", mixture, reference, 6, source=y, target=1 - y, strength=0.6)
    gen = regenerate("euler", mixture, e.noise, 6, y=1 - y, t_start=0.6)
    np.testing.assert_array_equal(e.x, gen.x)


def test_switch_runs_the_source_above_it(mixture, reference, counting):
    y = np.zeros(len(reference), np.int64)
    field = counting(mixture)
    edit("euler", field, reference, 4, source=y, target=1 - y, strength=1.0, switch=0.5)
    regen = field.calls[4:]
    assert [float(c["t"][0]) for c in regen] == [1.0, 0.75, 0.5, 0.25]
    assert [int(c["cond"]["y"][0]) for c in regen] == [0, 0, 1, 1]  # source above t = 0.5, target from it


def test_injection_blends_the_source_velocity_in_one_call(mixture, reference, counting, tol):
    """inject=2, weight w: the first two steps run v_t + w (v_s - v_t), one call on both rows; then the target."""
    y = np.zeros(len(reference), np.int64)
    w = 0.3
    field = counting(mixture)
    e = edit("euler", field, reference, 4, source=y, target=1 - y, strength=1.0, inject=2, inject_weight=w)
    regen = field.calls[4:]
    assert len(field.calls) == 8 and e.regeneration.nfe == 4
    assert [c["rows"] for c in regen] == [2 * len(y)] * 2 + [len(y)] * 2

    def blended(x, t, cond):  # the rule written out: the blend in the first two steps (t > 0.5)
        vt, vs = mixture(x, t, {"y": 1 - y}), mixture(x, t, {"y": y})
        return vt + w * (vs - vt) if float(np.asarray(t).reshape(-1)[0]) > 0.5 else vt

    np.testing.assert_allclose(e.x, regenerate("euler", blended, e.noise, 4).x, atol=tol["float64"])


def test_ba_edit_blends_the_sidenet_too(mixture, reference):
    """The SideNet follows the same schedule (its rows timed at their nodes); calls stay N each way."""
    y = np.zeros(len(reference), np.int64)
    side = ExactSideNet(mixture, steps=20)
    e = edit("ba", mixture, reference, 5, source=y, target=1 - y, strength=0.9, inject=2, inject_weight=0.5,
             sidenet=side)
    assert e.inversion.nfe == 5 and e.regeneration.nfe == 5 and np.all(np.isfinite(e.x))


def test_condition_weight_rule():
    t = np.array([1.0, 0.8, 0.6, 0.4, 0.2, 0.0])
    np.testing.assert_array_equal(condition_weight(t, switch=0.7, inject_until=0.3, inject_weight=0.25),
                                  [1.0, 1.0, 0.25, 0.25, 0.0, 0.0])


@pytest.mark.parametrize("kw, match", [
    (dict(switch=0.9), "switch"), (dict(inject=-1), "inject"), (dict(inject_weight=2.0), "inject_weight"),
    (dict(target=None), "target condition"), (dict(strength=0.0), "trajectory fraction"),
])
def test_edit_refuses_bad_controls(mixture, reference, kw, match):
    y = np.zeros(len(reference), np.int64)
    args = {**dict(source=y, target=1 - y, strength=0.8), **kw}
    with pytest.raises(ConfigError, match=match):
        edit("euler", mixture, reference, 4, **args)


def test_guidance_interval_is_read_in_real_time(mixture, reference, tol):
    """CFG on for t in (0, 0.5] only: the inversion guides its first half (from the data), not its second."""
    y = np.arange(len(reference)) % 2
    res = invert("euler", mixture, reference, 4, y=y, null_label=2, cfg_scale=2.0, cfg_interval=(0.0, 0.5))
    x = reference.copy()
    for t in (0.0, 0.25, 0.5, 0.75):  # Euler upward, written out
        vc = mixture(x, np.full(len(x), t), {"y": y})
        vu = mixture(x, np.full(len(x), t), {"y": np.full(len(x), 2)})
        x = x + 0.25 * (vu + 2.0 * (vc - vu) if t <= 0.5 else vc)
    np.testing.assert_allclose(res.x, x, atol=tol["float64"])
