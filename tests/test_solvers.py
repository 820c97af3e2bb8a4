"""Classic and multistep solvers against the closed-form Gaussian-mixture flow (t = 1 noise, t = 0 data)."""

from __future__ import annotations

import numpy as np
import pytest

from anchorflow.base.errors import ConfigError
from anchorflow.runtime import SOLVERS, solve, solver_names
from anchorflow.runtime.evaluation.analytic import GaussianMixture, exact_flow
from anchorflow.runtime.solving.solvers.multistep import adams_weights

# method -> (expected global order, NFE values inside the asymptotic regime of the test mixture)
ORDERS = {
    "euler": (1, (64, 128, 256)),
    "midpoint": (2, (64, 128, 256)),
    # Heun and RK4e take an Euler last step (k-diffusion / EDM): 2N - 1 and 4N - 3 calls; the
    # Euler step's O(h^2) local error leaves RK4e at global order 2.
    "heun": (2, (65, 129, 257)),
    "rk4": (4, (32, 64, 128)),
    "rk4e": (2, (65, 129, 257)),
    "ab2": (2, (64, 128, 256)),
    # AB4 body, but the Euler warm-start step leaves an O(h^2) global error: asymptotic order 2.
    "ipndm": (2, (64, 128, 256)),
    # Uniform-t grid: the log-SNR steps at both ends do not shrink, error ~ N^-2 log N (slope ~1.8).
    "dpmpp2m": (2, (128, 256, 512)),
    # UniPC-bh2: first-order steps at both ends (lambda = -inf at t = 1, lower-order final).
    "unipc": (2, (64, 128, 256)),
}


def test_every_plain_method_has_an_order_case():
    mine = {n for n in solver_names() if SOLVERS[n].fn.__module__.rsplit(".", 1)[-1] in ("classic", "multistep", "unipc")}
    assert mine == set(ORDERS)


@pytest.mark.parametrize("method", sorted(ORDERS))
def test_textbook_order(method, mixture, noise, reference, rmse, tol):
    order, nfes = ORDERS[method]
    errors = [rmse(solve(method, mixture, noise, n).x, reference) for n in nfes]
    slope = -np.polyfit(np.log(nfes), np.log(errors), 1)[0]
    assert abs(slope - order) <= tol["order"], f"{method}: slope {slope:.2f}, errors {errors}"
    assert errors[-1] > 100 * tol["reference"]  # the reference is far more accurate than the solver


@pytest.mark.parametrize("method", sorted(ORDERS))
def test_nfe_is_the_number_of_velocity_calls(method, mixture, noise, counting):
    field = counting(mixture)
    nfe = SOLVERS[method].nfe_for_steps(2)
    out = solve(method, field, noise, nfe)
    assert out.nfe == len(field.calls) == nfe and len(out.steps) == 2
    assert sum(s.calls for s in out.steps) == nfe
    assert all(c["rows"] == noise.shape[0] for c in field.calls)


def _heun_by_hand(v, x, grid):
    """Heun on every interval but the last, Euler on the last (written out, independent of the tableaus)."""
    for i, (t, tn) in enumerate(zip(grid[:-1], grid[1:])):
        k1 = v(x, np.full(len(x), t), None)
        if i == len(grid) - 2:
            return x + (tn - t) * k1
        k2 = v(x + (tn - t) * k1, np.full(len(x), tn), None)
        x = x + (tn - t) * 0.5 * (k1 + k2)


@pytest.mark.parametrize("method", ["heun", "rk4e"])
def test_euler_last_step_never_calls_at_t0(method, mixture, noise, counting):
    """k-diffusion's sample_heun / EDM: the step to t = 0 is Euler, so no call is made at t = 0."""
    field = counting(mixture)
    out = solve(method, field, noise, SOLVERS[method].nfe_for_steps(3))
    assert min(float(np.min(c["t"])) for c in field.calls) > 0.0
    assert [s.calls for s in out.steps] == [SOLVERS[method].calls_per_step] * 2 + [1]


def test_heun_with_an_euler_last_step_matches_the_hand_written_form(mixture, noise, tol):
    grid = [1.0, 0.7, 0.45, 0.2, 0.0]
    out = solve("heun", mixture, noise, 7, grid=grid)
    np.testing.assert_allclose(out.x, _heun_by_hand(mixture, noise, np.array(grid)), atol=tol["float64"])


def test_shifted_grid_keeps_the_order(mixture, noise, reference, rmse, tol):
    """Non-uniform grids: variable-step Adams weights keep AB2 at order 2."""
    nfes = (64, 128, 256)
    errors = [rmse(solve("ab2", mixture, noise, n, grid="shift:3").x, reference) for n in nfes]
    slope = -np.polyfit(np.log(nfes), np.log(errors), 1)[0]
    assert abs(slope - 2) <= tol["order"], errors


def test_adams_weights_uniform_are_textbook(tol):
    grid = np.linspace(1.0, 0.0, 9)
    expected = {2: [-1, 3], 3: [5, -16, 23], 4: [-9, 37, -59, 55]}
    denom = {2: 2, 3: 12, 4: 24}
    for m, coef in expected.items():
        w = adams_weights(grid[4 - m + 1 : 5], grid[5])
        np.testing.assert_allclose(w, np.array(coef) / denom[m], atol=tol["float64"])


def test_adams_weights_integrate_polynomials_exactly_on_any_grid(tol):
    rng = np.random.default_rng(3)
    times = np.sort(rng.uniform(0.3, 1.0, 4))[::-1]  # decreasing past nodes t_{n-3} > .. > t_n
    t_next = times[-1] - 0.17
    w = adams_weights(times, t_next)
    for p in range(4):  # integral of t^p over [t_n, t_next] / (t_next - t_n)
        exact = (t_next ** (p + 1) - times[-1] ** (p + 1)) / (p + 1) / (t_next - times[-1])
        assert abs(np.dot(w, times**p) - exact) <= tol["float64"]


def test_ab2_is_exact_after_the_euler_step_on_a_non_uniform_grid(tol):
    """v = 2t + 1: AB2 integrates linear velocities exactly, Euler's first step errs by h^2 (here 0.01)."""
    out = solve("ab2", lambda x, t, y: np.broadcast_to(2 * t[:, None] + 1, x.shape), np.zeros((2, 1)), 4,
                grid=[1.0, 0.9, 0.5, 0.2, 0.0])
    np.testing.assert_allclose(out.x, -2.0 - 0.01, atol=tol["float64"])


def dpmpp2m_reference(velocity, x, grid):
    """DPM-Solver++(2M) as written in Lu et al. 2022 (Alg. 2) with alpha = 1 - t, sigma = t."""
    lam = np.log(np.clip(1 - grid, 0, None)) - np.log(np.clip(grid, 0, None))  # -inf at t=1, +inf at t=0
    x0_prev = None
    for i in range(len(grid) - 1):
        t, tn = grid[i], grid[i + 1]
        x0 = x - t * velocity(x, np.full(len(x), t), None)
        d = x0
        if i >= 2 and tn > 0:
            r = (lam[i] - lam[i - 1]) / (lam[i + 1] - lam[i])
            d = (1 + 1 / (2 * r)) * x0 - 1 / (2 * r) * x0_prev
        x = d if tn == 0 else (tn / t) * x - (1 - tn) * np.expm1(-(lam[i + 1] - lam[i])) * d
        x0_prev = x0
    return x


@pytest.mark.parametrize("grid", ["shift:3", "uniform", [1.0, 0.95, 0.8, 0.7, 0.4, 0.3, 0.1, 0.0]])
def test_dpmpp2m_matches_the_paper_form(grid, mixture, noise, tol):
    out = solve("dpmpp2m", mixture, noise, 7, grid=grid)
    with np.errstate(divide="ignore"):
        np.testing.assert_allclose(out.x, dpmpp2m_reference(mixture, noise, out.grid), atol=tol["float64"])


@pytest.mark.parametrize("nfe", [1, 2, 3])
def test_dpmpp2m_is_euler_until_two_past_steps_exist(nfe, mixture, noise, tol):
    """On the linear path the first-order DPM-Solver++ step is exactly Euler (lambda(1) = -inf)."""
    a, b = solve("dpmpp2m", mixture, noise, nfe).x, solve("euler", mixture, noise, nfe).x
    np.testing.assert_allclose(a, b, atol=tol["float64"])


@pytest.mark.parametrize("order", [0, 5, 2.5, True])
def test_ipndm_order_option_is_checked(order, mixture, noise):
    with pytest.raises(ConfigError, match="order must be 1, 2, 3 or 4"):
        solve("ipndm", mixture, noise, 4, order=order)


# -- the analytic field itself -------------------------------------------------------------------
@pytest.mark.parametrize("t, label", [(0.9, None), (0.5, 0), (0.5, 2), (0.2, 1)])
def test_closed_form_velocity_matches_monte_carlo(t, label, mixture, tol):
    """E[eps - x0 | x_t] by self-normalised importance sampling over data samples x0."""
    rng = np.random.default_rng(1)
    n = 200_000
    x = np.array([[0.3, -0.5]])
    y = None if label is None else np.full(n, label)
    x0 = mixture.sample(n, rng, y)
    eps = (x - (1 - t) * x0) / t  # the noise that makes x_t = x from this x0
    logw = -0.5 * np.sum(eps**2, axis=1)
    w = np.exp(logw - logw.max())
    w /= w.sum()
    f = eps - x0
    est = w @ f
    stderr = np.sqrt(w**2 @ (f - est) ** 2)
    v = mixture(x, np.array([t]), None if label is None else np.array([label]))[0]
    assert np.all(np.abs(v - est) <= tol["mc_sigmas"] * stderr), (v, est, stderr)


def test_velocity_accepts_any_state_shape(tol):
    flat = GaussianMixture.random((4,), 3, classes=2, seed=5)
    shaped = GaussianMixture(flat.means.reshape(3, 1, 2, 2), flat.stds, np.exp(flat.log_weights), flat.classes)
    x = np.random.default_rng(2).standard_normal((5, 1, 2, 2))
    t, y = np.linspace(0.1, 0.9, 5), np.array([0, 1, 2, 0, 1])
    np.testing.assert_allclose(shaped(x, t, y), flat(x.reshape(5, 4), t, y).reshape(x.shape), atol=tol["float64"])


def test_null_label_is_the_full_mixture(mixture, noise, tol):
    t = np.full(len(noise), 0.4)
    np.testing.assert_allclose(mixture(noise, t, np.full(len(noise), mixture.null_label)),
                               mixture(noise, t, None), atol=tol["float64"])
    with pytest.raises(ConfigError, match="labels must be"):
        mixture(noise, t, np.full(len(noise), mixture.null_label + 1))


def test_reference_flow_is_converged_and_reversible(mixture, noise, reference, tol):
    assert np.abs(exact_flow(mixture, noise, 1.0, 0.0, steps=1000) - reference).max() <= tol["reference"]
    mid = exact_flow(mixture, noise, 1.0, 0.4, steps=300)
    np.testing.assert_allclose(exact_flow(mixture, mid, 0.4, 1.0, steps=300), noise, atol=tol["reference"])
    # per-sample end times: each row flows to its own t_to
    t_to = np.linspace(0.2, 0.8, len(noise))
    rows = exact_flow(mixture, noise, 1.0, t_to, steps=300)
    one = exact_flow(mixture, noise[3:4], 1.0, t_to[3], steps=300)[0]
    np.testing.assert_allclose(rows[3], one, atol=tol["reference"])


def test_flow_transports_noise_to_the_data_distribution(mixture):
    """Exact flow of N(0, I) samples has the mixture's mean (4 standard errors, 2000 samples)."""
    rng = np.random.default_rng(7)
    x = exact_flow(mixture, rng.standard_normal((2000, 2)), steps=100)
    data = mixture.sample(200_000, rng)
    se = data.std(axis=0) / np.sqrt(2000)
    assert np.all(np.abs(x.mean(axis=0) - data.mean(axis=0)) <= 4 * se)


class StateRecorder:
    """x-independent velocity v(t) = t^3 that records the state it is called at (one row)."""

    def __init__(self) -> None:
        self.states = []

    def __call__(self, x, t, y):
        self.states.append(np.array(x[0, 0]))
        return np.broadcast_to(np.asarray(t, float)[:, None] ** 3, x.shape).copy()


@pytest.mark.parametrize("method, exact_from", [("ipndm", 3), ("ab2", None)])
def test_ipndm_steps_are_ab4_once_four_values_exist(method, exact_from, tol):
    """v = t^3 depends on t only, so every past value is exact and an Adams-Bashforth step of
    order m integrates it exactly iff m >= 4: iPNDM's 4th step onward is exact on any grid, AB2's
    never (its per-step error here is ~h^3 / 4, far above float64 round-off)."""
    grid = [1.0, 0.85, 0.72, 0.55, 0.4, 0.3, 0.12, 0.0]
    rec = StateRecorder()
    out = solve(method, rec, np.zeros((1, 1)), len(grid) - 1, grid=grid)
    xs = [*rec.states, out.x[0, 0]]  # the state at every grid point
    for i in range(3, len(grid) - 1):
        exact = -(grid[i] ** 4 - grid[i + 1] ** 4) / 4  # x_{i+1} - x_i = int_{t_i}^{t_{i+1}} t^3 dt
        err = abs((xs[i + 1] - xs[i]) - exact)
        if exact_from is None:
            assert err > 1e-5, (i, err)
        else:
            assert err <= tol["float64"], (i, err)


@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("n", [3, 5, 8])
def test_unipc_matches_diffusers(order, n, mixture, noise):
    """UniPC-bh2 against diffusers' UniPCMultistepScheduler (flow sigmas, data prediction, lower-order
    final) on the scheduler's own sigmas (it moves sigma = 1 to 1 - 1e-6 to keep lambda finite).
    Tolerance: diffusers keeps sigmas in float32 and steps in torch float64 here; 1e-6 covers it."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    from anchorflow.runtime.solving.field import GuidedField
    from anchorflow.runtime.solving.solvers.unipc import unipc

    sched = diffusers.UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                              solver_order=order, final_sigmas_type="zero")
    sched.set_timesteps(sigmas=np.linspace(1, 0, n + 1)[:-1])
    x = torch.tensor(noise)
    for i, step in enumerate(sched.timesteps):
        v = mixture(x.numpy(), np.full(len(noise), float(sched.sigmas[i])), None)
        x = sched.step(torch.tensor(v), step, x).prev_sample
    mine = unipc(GuidedField(mixture, len(noise), dtype=np.float64), noise.copy(),
                 sched.sigmas.numpy().astype(np.float64), order=order).x
    np.testing.assert_allclose(mine, x.numpy(), atol=1e-6)


def test_unipc_first_and_last_steps_are_first_order(mixture, noise, tol):
    """From t = 1 (lambda = -inf) UniPC's first step is DDIM = Euler on this path, and the last step
    (lower-order final) returns the data prediction m = x - t v at the state it reached."""
    np.testing.assert_allclose(solve("unipc", mixture, noise, 1).x, solve("euler", mixture, noise, 1).x,
                               atol=tol["float64"])
    x1 = noise - 0.5 * mixture(noise, np.ones(len(noise)), None)  # Euler to t = 1/2
    m1 = x1 - 0.5 * mixture(x1, np.full(len(noise), 0.5), None)
    np.testing.assert_allclose(solve("unipc", mixture, noise, 2).x, m1, atol=tol["float64"])
