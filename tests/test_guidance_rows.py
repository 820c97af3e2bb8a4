"""Guidance rows only where guidance is on: B rows per backbone call outside the CFG interval.

Single-call solvers guide a call's velocity at its own time; the SideNet solvers (BA, ba-single)
pass the span of node times each call's velocities are guided at, and their SideNet probes
follow the anchor call's rows.

Outside the interval the guided velocity is the conditional one alone, so the unconditional
half of a [cond; null] call is never used there. Checked on the closed-form mixture (rows are
independent, float64): the rows each call is fed, and samples equal to those of the old
always-2B field to float64 round-off.
"""

from __future__ import annotations

import numpy as np
import pytest

from anchorflow.runtime import GuidedField, solve
from anchorflow.runtime.evaluation.analytic import ExactSideNet
from anchorflow.runtime.solving.field import in_interval, overlaps
from anchorflow.runtime.solving.first_call import measure_first_call

INTERVAL = (0.0, 0.7)  # the BA authors' default guidance interval
SINGLE_CALL = ["euler", "midpoint", "heun", "ab2", "ipndm", "dpmpp2m"]
SIDENET = [("ba", {"probes": "merged"}), ("ba", {"probes": "paper"}), ("ba-single", {}), ("ba", {"first_call": "table"})]


def _labels(mixture, n):
    return np.arange(n) % mixture.num_classes


@pytest.mark.parametrize("method, nfe", [(m, 9 if m == "heun" else 10) for m in SINGLE_CALL])  # heun: 2N - 1
def test_rows_follow_the_guidance_interval(method, nfe, mixture, noise, counting):
    counted = counting(mixture.velocity)
    y, b = _labels(mixture, len(noise)), len(noise)
    solve(method, counted, noise, nfe, y=y, null_label=mixture.null_label, cfg_scale=1.5, cfg_interval=INTERVAL)
    assert counted.calls, "no backbone call was made"
    for call in counted.calls:
        t = float(np.asarray(call["t"]).ravel()[0])
        guided = in_interval(t, INTERVAL)
        assert call["rows"] == (2 * b if guided else b), f"t = {t}: {call['rows']} rows"
        want = np.concatenate([y, np.full(b, mixture.null_label)]) if guided else y
        np.testing.assert_array_equal(call["y"], want)
    # at least one call on each side of 0.7, or the test says nothing
    times = [float(np.asarray(c["t"]).ravel()[0]) for c in counted.calls]
    assert any(t > 0.7 for t in times) and any(t <= 0.7 for t in times)


@pytest.mark.parametrize("method", SINGLE_CALL)
def test_samples_equal_the_always_two_row_field(method, mixture, noise, monkeypatch, tol):
    y = _labels(mixture, len(noise))
    kwargs = dict(y=y, null_label=mixture.null_label, cfg_scale=1.5, cfg_interval=INTERVAL)
    nfe = 9 if method == "heun" else 10  # heun: 2N - 1 calls (Euler last step)
    new = solve(method, mixture.velocity, noise, nfe, **kwargs)
    monkeypatch.setattr(GuidedField, "rows_for", lambda self, span: self.rows)  # the old rule: 2B always
    old = solve(method, mixture.velocity, noise, nfe, **kwargs)
    np.testing.assert_allclose(new.x, old.x, rtol=0, atol=tol["float64"])


class SideRows:
    """A SideNet wrapper recording each call's rows, anchor time and labels."""

    def __init__(self, sidenet) -> None:
        self.sidenet, self.calls = sidenet, []

    def __call__(self, x, v, t, h, cond):
        self.calls.append({"rows": x.shape[0], "t": float(t[0]), "y": np.array(cond["y"])})
        return self.sidenet(x, v, t, h, cond)


@pytest.mark.parametrize("probes", ["merged", "paper"])
def test_ba_rows_follow_the_times_each_call_is_guided_at(probes, mixture, noise, counting):
    """BA's call at t_i is guided at t_i, at its backward node and at its forward probe's nodes, the
    lowest being t_{i+1}: 2B rows iff t_{i+1} <= 0.7. Its SideNet probes get the same row blocks
    (and only the conditional labels where the anchor has B rows)."""
    counted, side = counting(mixture.velocity), SideRows(lambda x, v, t, h, c: np.zeros_like(x))
    y, b, n = _labels(mixture, len(noise)), len(noise), 10
    solve("ba", counted, noise, n, y=y, null_label=mixture.null_label, sidenet=side, cfg_scale=1.5,
          cfg_interval=INTERVAL, probes=probes)
    grid = 1.0 - np.arange(n + 1) / n
    want = [2 * b if grid[i + 1] <= 0.7 else b for i in range(n)]
    assert [c["rows"] for c in counted.calls] == want and b in want and 2 * b in want
    anchor = {float(g): r for g, r in zip(grid, want)}  # SideNet calls are made from anchors at grid times
    for call in side.calls:
        r = anchor[min(anchor, key=lambda g: abs(g - call["t"]))]
        assert call["rows"] % r == 0 and call["rows"] // r in ((3, 4) if probes == "merged" else (1, 3))
        labels = np.concatenate([y, np.full(b, mixture.null_label)]) if r == 2 * b else y
        np.testing.assert_array_equal(call["y"], np.tile(labels, call["rows"] // r))


@pytest.mark.parametrize("method, options", SIDENET, ids=[f"{m}-{next(iter(o.values()), 'k3')}" for m, o in SIDENET])
def test_sidenet_samples_equal_the_always_two_row_field(method, options, mixture, noise, monkeypatch, tol):
    """BA (both probes, and with the cached first call) and ba-single with the exact SideNet: the
    samples equal those of the old always-2B field to float64 round-off (rows are independent)."""
    y = _labels(mixture, len(noise))
    if options.get("first_call") == "table":
        options = {"first_call": measure_first_call(mixture, mixture.state_shape, mixture.num_classes, samples=8)}
    kwargs = dict(y=y, null_label=mixture.null_label, cfg_scale=1.5, cfg_interval=INTERVAL,
                  sidenet=ExactSideNet(mixture, steps=4), **options)
    new = solve(method, mixture.velocity, noise, 7, **kwargs)
    monkeypatch.setattr(GuidedField, "rows_for", lambda self, span: self.rows)  # the old rule: 2B always
    old = solve(method, mixture.velocity, noise, 7, **kwargs)
    assert new.nfe == old.nfe
    np.testing.assert_allclose(new.x, old.x, rtol=0, atol=tol["float64"])


def test_an_unguided_call_guided_inside_the_interval_is_an_internal_error(mixture, noise):
    field = GuidedField(mixture.velocity, len(noise), y=_labels(mixture, len(noise)), null_label=mixture.null_label,
                        cfg_scale=2.0, cfg_interval=INTERVAL)
    v = field.raw(noise, 0.9, span=(0.8, 0.9))  # guidance off there: B rows
    assert v.shape[0] == len(noise)
    with pytest.raises(RuntimeError, match="no unconditional rows"):
        field.guide(v, 0.5)


@pytest.mark.parametrize("span, expected", [((0.8, 0.9), False), ((0.6, 0.8), True), ((0.7, 0.7), True),
                                            ((0.71, 1.0), False), ((0.0, 0.0), True)])
def test_overlaps_matches_in_interval_on_a_dense_grid(span, expected):
    assert overlaps(span, INTERVAL) is expected
    dense = np.linspace(span[0], span[1], 1001)
    assert any(in_interval(float(t), INTERVAL) for t in dense) is expected
