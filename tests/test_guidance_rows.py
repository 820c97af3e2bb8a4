"""Guidance rows only where guidance is on: B rows per backbone call outside the CFG interval.

Outside the interval the guided velocity is the conditional one alone, so the unconditional
half of a [cond; null] call is never used there. Checked on the closed-form mixture (rows are
independent, float64): the rows each call is fed, and samples equal to those of the old
always-2B field to float64 round-off.
"""

from __future__ import annotations

import numpy as np
import pytest

from anchorflow.runtime import GuidedField, solve
from anchorflow.runtime.field import in_interval, overlaps

INTERVAL = (0.0, 0.7)  # the BA authors' default guidance interval
SINGLE_CALL = ["euler", "midpoint", "heun", "ab2", "ipndm", "dpmpp2m"]


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
