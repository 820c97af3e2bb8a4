"""Grids, NFE budgets, options and classifier-free guidance of ``solve`` (t = 1 noise, t = 0 data)."""

from __future__ import annotations

import numpy as np
import pytest

from anchorflow.base.errors import ConfigError
from anchorflow.runtime import solve

X = np.array([[1.0, -2.0], [0.5, 3.0]])
Y = np.array([0, 1])
NULL = 2


def linear_field(x, t, cond):
    """v = (y + 1) x + t: conditional rows (y = 0, 1) and the null rows (y = 2) differ."""
    return (np.asarray(cond["y"], float)[:, None] + 1.0) * x + np.asarray(t)[:, None]


def zero(x, t, cond):
    return np.zeros_like(x)


@pytest.mark.parametrize("method, nfe, match", [
    ("heun", 4, "heun makes 2 backbone calls per step and 1 in its last .Euler. step, so nfe must be one of 3, 5, "
                "7, ... .got 4; try 3 or 5"),
    ("midpoint", 3, "multiple of 2"),
    ("rk4", 6, "rk4 .* multiple of 4 .got 6; try 4 or 8"),
    ("rk4", 2, r"rk4 needs nfe >= 4 \(4 backbone calls per step\), got 2"),
    ("ba", 1, "ba needs nfe >= 2, got 1"),
])
def test_budget_the_method_cannot_honour_is_refused(method, nfe, match):
    with pytest.raises(ConfigError, match=match):
        solve(method, zero, X, nfe, sidenet=zero)


@pytest.mark.parametrize("nfe", [0, -3, 2.5, "4", True])
def test_bad_nfe_is_refused(nfe):
    with pytest.raises(ConfigError, match="nfe"):
        solve("euler", zero, X, nfe)


def test_unknown_method_lists_the_known_ones():
    with pytest.raises(ConfigError, match="unknown solver 'eulr'.*known solvers: .*ab2.*ba.*euler.*rk4"):
        solve("eulr", zero, X, 4)


def test_unknown_option_names_the_accepted_ones():
    with pytest.raises(ConfigError, match="'ipndm' has no option 'a'; it takes: order"):
        solve("ipndm", zero, X, 4, a=0.3)
    with pytest.raises(ConfigError, match="takes: no options"):
        solve("euler", zero, X, 4, order=2)


@pytest.mark.parametrize("grid, match", [
    ([0.9, 0.5, 0.0], "from t = 1"),
    ([1.0, 0.5, 0.1], "from t = 1"),
    ([1.0, 0.3, 0.6, 0.0], "strictly decreasing"),
    ([1.0, 0.5, 0.5, 0.0], "strictly decreasing"),
    ([1.0, 0.0], "has 1 steps but this method and NFE need 3"),
    ([1.0, np.nan, 0.0, 0.0], "finite"),
    ("cosine", "unknown grid"),
    ("shift:abc", "bad grid"),
    ("shift:-1", "shift must be > 0"),
])
def test_bad_grids_are_refused(grid, match):
    with pytest.raises(ConfigError, match=match):
        solve("euler", zero, X, 3, grid=grid)


@pytest.mark.parametrize("grid, expected", [
    ("shift:3", 3 * np.linspace(1, 0, 5) / (1 + 2 * np.linspace(1, 0, 5))),
    ([1.0, 0.9, 0.5, 0.2, 0.0], np.array([1.0, 0.9, 0.5, 0.2, 0.0])),
])
def test_grids_reach_the_backbone(grid, expected, counting, tol):
    field = counting(zero)
    out = solve("euler", field, X, 4, grid=grid)
    np.testing.assert_allclose(out.grid, expected, atol=tol["float64"])
    np.testing.assert_allclose([c["t"][0] for c in field.calls], expected[:-1], atol=tol["float64"])


def test_noise_needs_a_batch_axis():
    with pytest.raises(ConfigError, match="batch axis"):
        solve("euler", zero, np.zeros(3), 2)


def test_guidance_needs_labels_and_null():
    with pytest.raises(ConfigError, match="needs conditions .or class labels y=."):
        solve("euler", zero, X, 2, cfg_scale=2.0)
    with pytest.raises(ConfigError, match="cfg_interval"):
        solve("euler", zero, X, 2, y=Y, null_label=NULL, cfg_scale=2.0, cfg_interval=(0.8, 0.2))


@pytest.mark.parametrize("interval, guided", [((0.0, 1.0), (True, True)), ((0.0, 0.7), (False, True)),
                                              ((0.0, 0.5), (False, True)), ((0.6, 1.0), (True, False))])
def test_cfg_one_call_per_evaluation_only_inside_the_interval(interval, guided, counting, tol):
    """Euler on grid [1, 0.5, 0], s = 2, checked against a hand computation per step. A call
    outside the interval feeds the B conditional rows only (guidance off means v_c alone)."""
    s = 2.0
    field = counting(linear_field)
    out = solve("euler", field, X, 2, y=Y, null_label=NULL, cfg_scale=s, cfg_interval=interval)
    assert out.nfe == len(field.calls) == 2
    for call, g in zip(field.calls, guided):
        assert call["rows"] == (2 if g else 1) * len(X)
        np.testing.assert_array_equal(call["y"], [0, 1, NULL, NULL] if g else [0, 1])
    x = X.copy()
    for t, g in zip((1.0, 0.5), guided):
        v_c = (Y[:, None] + 1.0) * x + t
        v_u = (NULL + 1.0) * x + t
        x = x - 0.5 * (v_u + s * (v_c - v_u) if g else v_c)
    np.testing.assert_allclose(out.x, x, atol=tol["float64"])


def test_no_guidance_sends_b_rows_and_the_labels(counting):
    field = counting(linear_field)
    solve("heun", field, X, 5, y=Y)
    assert [c["rows"] for c in field.calls] == [2] * 5
    assert all(np.array_equal(c["y"], Y) for c in field.calls)
