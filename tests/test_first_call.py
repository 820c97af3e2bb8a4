"""The free first call (cached t = 1 velocity) on the closed-form field (t = 1 noise, t = 0 data)."""

from __future__ import annotations

import numpy as np
import pytest

from anchorflow.base.errors import ConfigError
from anchorflow.runtime import solve
from anchorflow.runtime.solving.first_call import CachedStartField, FirstCallTable, measure_first_call


def class_means(mixture) -> np.ndarray:
    """E[x0 | c] in closed form: the weighted means of class c's components; last row: the null label."""
    w = np.exp(mixture.log_weights)
    rows = [(w[mixture.classes == c] @ mixture.means[mixture.classes == c]) / w[mixture.classes == c].sum()
            for c in range(mixture.num_classes)]
    return np.stack([*rows, w @ mixture.means / w.sum()]).reshape(-1, *mixture.state_shape)


@pytest.fixture(scope="module")
def table(mixture):
    return measure_first_call(mixture, mixture.state_shape, mixture.num_classes, samples=32)


def test_measured_table_is_the_closed_form_class_mean(table, mixture):
    """At t = 1 the exact field is x - E[x0 | c], so every noise draw gives the mean exactly: float32
    round-off of x (~1e-7 relative) is the only error; 1e-5 covers it, and the residual is ~0."""
    np.testing.assert_allclose(table.means, class_means(mixture), atol=1e-5)
    assert table.residual < 1e-5 and table.samples == 32


@pytest.mark.parametrize("scale", [1.0, 1.5])
def test_cached_first_call_equals_the_backbone_at_t1(scale, table, mixture, noise):
    """The cached rows (cond and null rows under guidance) equal the field's own t = 1 output to
    float32 tolerance (the table is stored in float32: 1e-5), and cost no NFE."""
    y = np.arange(len(noise)) % 2
    kw = dict(y=y, cfg_scale=scale, null_label=mixture.null_label)
    cached = CachedStartField(mixture, len(noise), table=table, dtype=np.float64, **kw)
    v = cached(noise, 1.0)
    rows = np.concatenate([y, np.full(len(y), mixture.null_label)])
    raw = mixture(np.concatenate([noise, noise]), np.ones(2 * len(y)), rows)
    truth = raw[len(y):] + scale * (raw[: len(y)] - raw[len(y):])
    np.testing.assert_allclose(v, truth, atol=1e-5)
    assert cached.nfe == 0 and cached.cached_calls == 1


@pytest.mark.parametrize("method", ["euler", "ab2", "unipc", "heun", "ba"])
def test_cached_first_call_buys_one_more_interval(method, table, mixture, noise, counting):
    """N calls with the cache = N + 1 intervals; the calls never touch t = 1, and the result equals
    the backbone-first solve on the same N + 1 interval grid (exact table: float32 tolerance 1e-4)."""
    from anchorflow.runtime import get_solver
    from anchorflow.runtime.evaluation.analytic import ExactSideNet

    field, spec = counting(mixture), get_solver(method)
    side = ExactSideNet(mixture, steps=8) if spec.needs_sidenet else None
    steps = 3
    nfe = spec.nfe_for_steps(steps, free_calls=1)
    out = solve(method, field, noise, nfe, sidenet=side, first_call=table)
    assert out.nfe == len(field.calls) == nfe and len(out.grid) == steps + 1
    assert all(float(np.max(c["t"])) < 1.0 for c in field.calls)
    full = solve(method, mixture, noise, spec.nfe_for_steps(steps), sidenet=side)
    np.testing.assert_allclose(out.x, full.x, atol=1e-4)


def test_a_large_residual_is_refused(mixture, noise):
    bad = FirstCallTable(np.zeros((3, 2), np.float32), residual=0.2)
    with pytest.raises(ConfigError, match="refused.*0.2.*bound 0.05"):
        solve("euler", mixture, noise, 3, first_call=bad)
    with pytest.raises(ConfigError, match="needs the table"):
        solve("euler", mixture, noise, 3, first_call="cached")
    with pytest.raises(ConfigError, match="no cached first call"):
        solve("fastflow", mixture, noise, 6, first_call=FirstCallTable(np.zeros((3, 2), np.float32), 0.0))
