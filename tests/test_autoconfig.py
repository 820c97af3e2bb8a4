"""Issue 26: the free per-sample error estimate (``Result.error_estimate``) and ``autoconfigure``.

Time convention: t = 1 noise, t = 0 data; NFE = backbone calls.
"""

from __future__ import annotations

import numpy as np
import pytest

from anchorflow.runtime import solve
from anchorflow.runtime.evaluation.analytic import ExactSideNet, GaussianMixture, exact_flow
from anchorflow.runtime.solving.estimate import spearman

ESTIMATING = ("ba", "ab2", "ipndm", "unipc")


def constant_field(c: np.ndarray):
    """v(x, t) = c: the closed-form linear field of the coupling x0 = noise - c (straight, parallel
    paths); every solver here is exact on it and every companion agrees bit for bit."""
    def velocity(x, t, cond):
        return np.broadcast_to(c, x.shape).astype(x.dtype)
    return velocity


def zero_sidenet(x, v, t, h, cond):
    return np.zeros_like(v)  # exact for a constant field: v(t - h) = v(t)


@pytest.mark.parametrize("method", ESTIMATING)
@pytest.mark.parametrize("grid", ["uniform", "shift:3"])
def test_estimate_is_exactly_zero_where_the_solver_is_exact(method, grid):
    rng = np.random.default_rng(0)
    c = rng.standard_normal((1, 3))
    noise = rng.standard_normal((6, 3))
    res = solve(method, constant_field(c), noise, 6, sidenet=zero_sidenet, grid=grid)
    np.testing.assert_allclose(res.x, noise - c, atol=1e-12)  # the solver is exact here ...
    assert res.error_estimate.shape == (6,) and res.error_estimate.dtype == np.float64
    if method == "unipc":  # ... its data prediction x - t c is only equal up to rounding across steps
        assert np.all(res.error_estimate <= 1e-13)
    else:
        assert np.all(res.error_estimate == 0.0)


def test_solvers_without_a_companion_give_none(mixture, noise):
    for method, nfe in (("euler", 4), ("heun", 5), ("rk4", 8), ("dpmpp2m", 4)):
        assert solve(method, mixture, noise, nfe).error_estimate is None


def _rms(d):
    return np.sqrt(np.mean(np.asarray(d, np.float64).reshape(d.shape[0], -1) ** 2, axis=1))


def test_ab2_estimate_is_the_euler_companion_difference(mixture, noise):
    """Independent truth on a uniform grid: AB2 - Euler from the same state = dt/2 (v_n - v_{n-1});
    the first step (Euler, no history) contributes nothing; per-step RMS summed."""
    n = 5
    grid = np.linspace(1.0, 0.0, n + 1)
    x, v_prev, expect = noise.copy(), None, np.zeros(noise.shape[0])
    for i in range(n):
        dt = grid[i + 1] - grid[i]
        v = mixture(x, np.full(x.shape[0], grid[i]), None)
        if v_prev is None:
            x = x + dt * v
        else:
            x = x + dt * (1.5 * v - 0.5 * v_prev)
            expect += _rms(dt / 2 * (v - v_prev))
        v_prev = v
    res = solve("ab2", mixture, noise, n)
    np.testing.assert_allclose(res.x, x, atol=1e-12)
    np.testing.assert_allclose(res.error_estimate, expect, rtol=1e-10)


def test_ba_estimate_is_corrector_minus_predictor(mixture, noise):
    """Independent truth: with a zero SideNet every forward node is v0, so per corrected interval
    predictor = x - h v0 and corrector = x - h (v0 + v1) / 2 (w_out + w_in = 1/2): the difference
    is h/2 |v1 - v0|; the final interval keeps its predictor and adds nothing."""
    n = 5
    grid = np.linspace(1.0, 0.0, n + 1)
    x, expect = noise.copy(), np.zeros(noise.shape[0])
    v0 = mixture(x, np.full(x.shape[0], 1.0), None)
    for i in range(n):
        h = grid[i] - grid[i + 1]
        x_pred = x - h * v0
        if i == n - 1:
            x = x_pred
            break
        v1 = mixture(x_pred, np.full(x.shape[0], grid[i + 1]), None)
        x = x - h * (v0 + v1) / 2
        expect += _rms(h / 2 * (v1 - v0))
        v0 = v1
    res = solve("ba", mixture, noise, n, sidenet=zero_sidenet)
    np.testing.assert_allclose(res.x, x, atol=1e-12)
    np.testing.assert_allclose(res.error_estimate, expect, rtol=1e-10)


@pytest.mark.parametrize("method,nfe", [("ba", 5), ("ab2", 5), ("ipndm", 5), ("unipc", 8)])
def test_estimate_ranks_samples_by_their_true_error(method, nfe):
    """On a sharp closed-form mixture (stds 0.05-0.4) the estimate and the true per-sample RMSE against
    the exact flow rank samples alike (Spearman > 0.2; measured 0.3-0.7 per solver in
    benchmarks/results/autoconfig_estimate.md, UniPC only 0.18 at 5 NFE, hence 8); a random
    estimate would give 0 +- 0.06 (one standard error at 256 samples)."""
    gm = GaussianMixture.random((8,), 6, seed=3, std=(0.05, 0.4))
    noise = np.random.default_rng(11).standard_normal((256, 8))
    ref = exact_flow(gm.velocity, noise, steps=400)
    side = ExactSideNet(gm.velocity, scale=0.8, steps=50) if method == "ba" else None
    res = solve(method, gm.velocity, noise, nfe, sidenet=side)
    true = _rms(res.x - ref)
    assert spearman(res.error_estimate, true) > 0.2
    assert spearman(-res.error_estimate, true) < -0.2  # the mutant (sign flipped) fails


def test_spearman():
    a = np.arange(10.0)
    assert spearman(a, a**3) == pytest.approx(1.0)
    assert spearman(a, -a) == pytest.approx(-1.0)
    assert spearman([1, 2, 2, 3], [1, 2, 2, 3]) == pytest.approx(1.0)  # ties
    assert np.isnan(spearman(np.ones(4), a[:4]))


class _Mixture:
    """A closed-form model as plan() takes it (no bundle: labels only)."""

    def __init__(self):
        self.gm = GaussianMixture.random((4,), 4, seed=2, std=(0.2, 0.5))
        self.velocity, self.sidenet = self.gm.velocity, zero_sidenet
        self.meta = {"state_shape": [4], "num_classes": 0, "null_label": None, "model_id": "mixture",
                     "data_range": [-3.0, 3.0]}
        self.files = None


def test_autoconfigure_meets_its_bound_and_refuses_the_impossible():
    from anchorflow.autoconfig import autoconfigure
    from anchorflow.base.errors import ConfigError

    m = _Mixture()
    found = autoconfigure(m, 30.0, reference="rk4@64", solvers=("euler", "ab2", "ba"), nfes=(2, 4, 8),
                          grids=("uniform",), samples=16, resamples=200, repeats=1)
    p = found.preset
    assert p.lower_bound >= 30.0 and p.reference == "rk4@64" and p.confidence == 0.95
    assert all(c.lower_bound <= c.mean_psnr for c in found.candidates)  # a lower bound, below the mean
    met = [c for c in found.candidates if c.meets]
    assert all(c.lower_bound >= 30.0 for c in met) and all(c.latency_s is not None for c in met)
    assert p.latency_s == min(c.latency_s for c in met)
    keys = [(c.solver, c.nfe, c.times) for c in found.candidates]
    assert len(keys) == len(set(keys)) == found.cost["configurations"]  # no configuration solved twice
    with pytest.raises(ConfigError, match=r"not reachable .* best 95% lower bound is [0-9.]+ dB"):
        autoconfigure(m, 150.0, reference="rk4@64", solvers=("euler",), nfes=(2, 4), grids=("uniform",),
                      samples=8, resamples=200, repeats=1)


def test_preset_round_trips_and_is_checked_on_read(tmp_path):
    from anchorflow.base.errors import StateFileError
    from anchorflow.runtime.bundles.presets import Preset, presets_from_json
    from anchorflow.runtime.bundles.tuned_grids import Tuning

    p = Preset("fast", "ba", 5, "backbone", "uniform", (1.0, 0.5, 0.0), 30.0, "euler@50", 0.95, 31.0, 32.0, 0.1,
               29.0, 0.01, 16, "cpu")
    data = Tuning(presets={"fast": p}).to_json()
    assert Tuning.from_json(data).presets == {"fast": p}
    bad = {**data["presets"]["fast"], "times": [1.0, 0.7, 0.8, 0.0]}
    with pytest.raises(StateFileError, match="decrease strictly"):
        presets_from_json({"fast": bad}, "tuned.json")
