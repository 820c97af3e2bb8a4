"""FastFlow's context bandits and the predictor-corrector ("estimate") reward.

Truths: (1) the defaults are bit-identical to the release before these options: a fingerprint
(sha256 of every x, nfe and the final Q / N / R / mu of a fixed 12-generation case) recorded
with commit 0dde21b (before this change) by the same code as :func:`_fingerprint`; (2) the
closed form of the predictor-corrector difference (``pc_weight``) against numpy's ``polyfit``
of the two polynomials, summed (Euler) or integrated by scipy's ``quad`` (Adams), on
non-uniform times, and exactly 0 on a velocity polynomial of degree <= k; (3) a contextual
run equals separate plain runs on each context's rows, sample for sample and table for table.
Time convention: t = 1 noise, t = 0 data.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from anchorflow.base.errors import ConfigError, StateFileError
from anchorflow.runtime import FastFlowBandit, make_grid, solve
from anchorflow.runtime.evaluation.analytic import GaussianMixture
from anchorflow.runtime.fastflow import state as bandit_state
from anchorflow.runtime.fastflow.context import ContextBandits, solve_contextual
from anchorflow.runtime.solving.solvers.fastflow_loop import pc_weight

FINGERPRINT_0DDE21B = "b33b58d249c78bb40d5ad4054536ead0582eebb825888df32ee5e9d7f2fd8322"
T = 20
GROUPS = {i: ("lo" if i < 5 else "hi") for i in range(10)}


@pytest.fixture(scope="module")
def gm() -> GaussianMixture:
    return GaussianMixture.random((1, 8, 8), 20, classes=10, seed=0, spread=0.6, std=(0.2, 0.4))


def _fingerprint(gm, **extra) -> str:
    rng = np.random.default_rng(3)
    h = hashlib.sha256()
    for base, order in (("euler", 1), ("adams", 2)):
        b = FastFlowBandit(30, "shift:2", calls=10, seed=0, **extra)
        for _ in range(6):
            noise = rng.standard_normal((4, 1, 8, 8)).astype(np.float32)
            y = rng.integers(0, 10, 4)
            r = solve("fastflow", gm, noise, 30, y=y, grid="shift:2", bandit=b, base=base, order=order, max_calls=10)
            h.update(np.ascontiguousarray(r.x).tobytes())
            h.update(str(r.nfe).encode())
        for m in (b.Q, b.N, b.R):
            h.update(np.ascontiguousarray(m).tobytes())
        h.update(repr(b.mu).encode())
    return h.hexdigest()


def test_defaults_are_bit_identical_to_before(gm):
    assert _fingerprint(gm) == FINGERPRINT_0DDE21B
    assert _fingerprint(gm, reward="residual") == FINGERPRINT_0DDE21B
    assert _fingerprint(gm, reward="estimate") != FINGERPRINT_0DDE21B  # the option does change the run


# -- the predictor-corrector closed form ---------------------------------------------------------
def _case(order: int, seed: int):
    """Non-uniform grid; computed anchors at indices ending at k0 = 4, next computed m = 8."""
    rng = np.random.default_rng(seed)
    g = np.sort(rng.uniform(0.05, 0.95, 11))[::-1].copy()
    idx = [0, 1, 3, 4][-(order + 1):]
    ts = g[idx]
    vs = rng.standard_normal((order + 1, 3))
    v_m = rng.standard_normal(3)
    return g, ts, vs, 4, 8, v_m


def _truth(g, ts, vs, k0, m, v_m, base):
    from scipy.integrate import quad

    order = len(ts) - 1
    P = [np.polyfit(ts, vs[:, j], order) for j in range(3)]
    Q = [np.polyfit(np.r_[ts, g[m]], np.r_[vs[:, j], v_m[j]], order + 1) for j in range(3)]
    if base == "euler":
        nodes = np.arange(k0 + 1, m)
        return np.array([np.sum((g[nodes + 1] - g[nodes]) * (np.polyval(Q[j], g[nodes]) - np.polyval(P[j], g[nodes])))
                         for j in range(3)]), P
    return np.array([quad(lambda s: np.polyval(Q[j], s) - np.polyval(P[j], s), g[k0], g[m])[0] for j in range(3)]), P


def _closed(g, ts, k0, m, P, v_m, base, weight=pc_weight):
    e = v_m - np.array([np.polyval(p, g[m]) for p in P])
    span = g[k0 + 1:m + 1] if base == "euler" else g[k0:m + 1]
    return weight(ts, g[m], span, base) * e


@pytest.mark.parametrize("base", ["euler", "adams"])
@pytest.mark.parametrize("order", [1, 2, 3])
def test_pc_weight_matches_the_two_polynomials(order, base):
    for seed in range(3):
        g, ts, vs, k0, m, v_m = _case(order, seed)
        want, P = _truth(g, ts, vs, k0, m, v_m, base)
        np.testing.assert_allclose(_closed(g, ts, k0, m, P, v_m, base), want, rtol=1e-7, atol=1e-10)  # polyfit round-off


def _mutant_right_node(ts, t_m, span, base):
    sp = np.asarray(span)
    return float(np.sum(np.diff(sp) * np.prod(sp[1:, None] - np.asarray(ts)[None, :], axis=1))
                 / np.prod(t_m - np.asarray(ts)))


def _mutant_one_root_short(ts, t_m, span, base):
    return pc_weight(ts[1:], t_m, span, base)


def _mutant_adams_skips_k0(ts, t_m, span, base):
    return pc_weight(ts, t_m, span[1:], base)


@pytest.mark.parametrize("mutant,base", [(_mutant_right_node, "euler"), (_mutant_one_root_short, "euler"),
                                         (_mutant_one_root_short, "adams"), (_mutant_adams_skips_k0, "adams")])
def test_a_wrong_coefficient_fails(mutant, base):
    g, ts, vs, k0, m, v_m = _case(2, 0)
    want, P = _truth(g, ts, vs, k0, m, v_m, base)
    got = _closed(g, ts, k0, m, P, v_m, base, weight=mutant)
    assert not np.allclose(got, want, rtol=1e-3, atol=1e-6)


def _poly_field(coef):
    def v(x, t, y=None):
        t = np.asarray(t, np.float64)[:, None]
        return sum(c * t ** i for i, c in enumerate(coef)) * np.ones_like(x)
    return v


@pytest.mark.parametrize("base", ["euler", "adams"])
@pytest.mark.parametrize("order", [1, 2])
def test_estimate_reward_in_the_solver(order, base):
    """Degree <= k velocity: every skip is charged exactly 0; degree k + 1: each charge equals the
    mean square of the re-integrated difference, rebuilt from the computed steps with polyfit."""
    noise = np.random.default_rng(1).standard_normal((2, 3))
    coef = [0.4, -1.1, 2.3, -1.7][: order + 2]
    g = make_grid(T, "shift:2")
    def runs(c):  # a few generations: UCB1 tries arm 0 first, then the skips
        b = FastFlowBandit(T, "shift:2", mu=1e3, reward="estimate")
        return [solve("fastflow", _poly_field(c), noise, T, grid="shift:2", bandit=b, order=order, base=base)
                for _ in range(4)]

    exact = [loss for r in runs(coef[: order + 1]) for _, a, loss, _ in r.info["losses"] if a > 0]
    assert exact and all(abs(loss) < 1e-24 for loss in exact)
    for r in runs(coef):
        assert r.info["reward"] == "estimate"
        _check_charges(r, coef, order, base, g)
    assert r.info["losses"] and any(a > 0 and loss > 1e-12 for _, a, loss, _ in r.info["losses"])


def _check_charges(r, coef, order, base, g):
    computed = np.flatnonzero(r.info["computed"])
    vel = lambda t: sum(c * t ** i for i, c in enumerate(coef))  # noqa: E731
    for k0, a, loss, _ in r.info["losses"]:
        m = k0 + a + 1
        idx = computed[computed <= k0][-(order + 1):]
        P = np.polyfit(g[idx], vel(g[idx]), order)
        Q = np.polyfit(np.r_[g[idx], g[m]], np.r_[vel(g[idx]), vel(g[m])], order + 1)
        nodes = np.arange(k0 + 1 if base == "euler" else k0, m)
        if base == "euler":
            d = np.sum((g[nodes + 1] - g[nodes]) * (np.polyval(Q, g[nodes]) - np.polyval(P, g[nodes])))
        else:
            d = np.polyval(np.polyint(np.polysub(Q, P)), g[m]) - np.polyval(np.polyint(np.polysub(Q, P)), g[k0])
        np.testing.assert_allclose(loss, d * d, rtol=1e-6, atol=1e-20)


@pytest.mark.parametrize("reward", ["residual", "estimate"])
def test_mu_calibration_units(gm, reward):
    """residual: max_k mse_k / T; estimate: max_k mse_k h_k^2 / T (h_k the step from t_k)."""
    noise = np.random.default_rng(0).standard_normal((4, 1, 8, 8))
    b = FastFlowBandit(T, "shift:2", reward=reward)
    r = solve("fastflow", gm, noise, T, grid="shift:2", y=np.arange(4), bandit=b)
    h2 = np.diff(make_grid(T, "shift:2")) ** 2
    w = np.ones(T) if reward == "residual" else h2
    want = max(e * w[k] for k, e in enumerate(r.info["mse"]) if e is not None) / T
    assert r.info["calibration"] and r.info["calibrated_mu"] == pytest.approx(want, rel=1e-12)
    assert b.mu == pytest.approx(want, rel=1e-12)


# -- contexts --------------------------------------------------------------------------------------
def _stream(n_gen: int = 4, b: int = 8):
    rng = np.random.default_rng(5)
    return [(rng.standard_normal((b, 1, 8, 8)).astype(np.float32), rng.integers(0, 10, b)) for _ in range(n_gen)]


@pytest.mark.parametrize("reward", ["residual", "estimate"])
def test_contextual_run_equals_separate_runs(gm, reward):
    opts = dict(calls=7, seed=2, reward=reward)
    cb = ContextBandits(T, "shift:2", model_id="m", groups=GROUPS, **opts)
    sep = {g: FastFlowBandit(T, "shift:2", model_id="m", **opts) for g in ("lo", "hi")}
    for noise, y in _stream():
        r = solve_contextual(gm, noise, T, cb, y=y, max_calls=8, base="adams")
        want_x, calls = np.empty_like(noise), 0.0
        for g, bandit in sep.items():
            idx = np.flatnonzero([GROUPS[int(v)] == g for v in y])
            if idx.size:
                s = solve("fastflow", gm, noise[idx], T, grid="shift:2", y=y[idx], bandit=bandit, max_calls=8,
                          base="adams")
                want_x[idx] = s.x
                calls += idx.size * s.nfe
                assert r.info["contexts"][f"{g}|cfg 1"]["calls"] == s.nfe
        np.testing.assert_array_equal(r.x, want_x)
        assert r.info["calls_per_sample"] == pytest.approx(calls / len(y))
        assert r.nfe == sum(c["calls"] for c in r.info["contexts"].values()) == sum(s.calls for s in r.steps)
    assert set(cb.tables) == {"lo|cfg 1", "hi|cfg 1"}
    for g, bandit in sep.items():
        t = cb.tables[f"{g}|cfg 1"]
        for name in ("Q", "N", "R"):
            np.testing.assert_array_equal(getattr(t, name), getattr(bandit, name))
        assert t.mu == bandit.mu and t.generations == bandit.generations
    assert cb.tables["lo|cfg 1"].mu != cb.tables["hi|cfg 1"].mu  # they did learn apart


def test_guidance_and_row_contexts(gm):
    noise, y = _stream(1)[0]
    cb = ContextBandits(T, model_id="m", by="guidance", calls=7)
    for s in (1.0, 1.5):
        solve_contextual(gm, noise, T, cb, y=y, cfg_scale=s, null_label=10)
    assert sorted(cb.tables) == ["cfg 1", "cfg 1.5"]
    rows = ContextBandits(T, model_id="m", by="rows", calls=7)
    r = solve_contextual(gm, noise, T, rows, y=y, context=["a", "b"] * 4)
    plain = solve("fastflow", gm, noise[::2], T, y=y[::2], bandit=FastFlowBandit(T, model_id="m", calls=7))
    np.testing.assert_array_equal(r.x[::2], plain.x)
    assert sorted(rows.tables) == ["a|cfg 1", "b|cfg 1"]


@pytest.mark.parametrize("make,match", [
    (lambda: ContextBandits(T, by="weather"), "context must be one of"),
    (lambda: ContextBandits(T, groups={1: ""}), "non-empty name"),
    (lambda: ContextBandits(T, by="rows", groups={1: "a"}), "need by='label'"),
    (lambda: FastFlowBandit(T, reward="loss"), "reward must be one of"),
])
def test_bad_settings_one_line(make, match):
    with pytest.raises(ConfigError, match=match) as e:
        make()
    assert "\n" not in str(e.value)


def test_bad_rows_one_line(gm):
    noise, y = _stream(1)[0]
    cb = ContextBandits(T, groups={i: "a" for i in range(5)}, calls=7)
    with pytest.raises(ConfigError, match=r"label\(s\) \[.*\] have no group"):
        solve_contextual(gm, noise, T, cb, y=y)
    with pytest.raises(ConfigError, match="needs a per-row context of 8"):
        solve_contextual(gm, noise, T, ContextBandits(T, by="rows"), y=y, context=["a"])
    with pytest.raises(ConfigError, match="reward belongs to the bandit"):
        solve("fastflow", gm, noise, T, y=y, bandit=FastFlowBandit(T), reward="estimate")
    assert not cb.tables


# -- the state file --------------------------------------------------------------------------------
def _learned(gm) -> ContextBandits:
    cb = ContextBandits(T, model_id="m", groups=GROUPS, calls=7, reward="estimate")
    for noise, y in _stream(3):
        solve_contextual(gm, noise, T, cb, y=y)
    return cb


def test_context_state_round_trip_and_spec_check(gm, tmp_path):
    cb = _learned(gm)
    path = tmp_path / "s.json"
    bandit_state.write(cb, path)
    back = bandit_state.load(path, key=cb.key, context=cb.spec())
    assert isinstance(back, ContextBandits) and bandit_state.to_dict(back) == bandit_state.to_dict(cb)
    assert json.loads(path.read_text())["version"] == 3
    noise, y = _stream(1)[0]  # the loaded tables go on exactly as the live ones
    a, b = solve_contextual(gm, noise, T, cb, y=y), solve_contextual(gm, noise, T, back, y=y)
    np.testing.assert_array_equal(a.x, b.x)
    with pytest.raises(StateFileError, match="holds context bandits") as e:  # a one-table reader
        bandit_state.load(path)
    assert "\n" not in str(e.value) and bandit_state.load(path, contexts=True).spec() == cb.spec()
    with pytest.raises(StateFileError, match="not {'by': 'guidance'"):
        bandit_state.load(path, context={"by": "guidance", "groups": None})
    bandit_state.write(FastFlowBandit(T, model_id="m"), tmp_path / "plain.json")
    with pytest.raises(StateFileError, match="context None"):
        bandit_state.load(tmp_path / "plain.json", context=cb.spec())


def test_version_2_file_migrates(gm, tmp_path):
    """A file exactly as the previous release wrote it (version 2: no reward, no context)."""
    b = FastFlowBandit(T, model_id="m", calls=7, tol=0.5)
    for noise, y in _stream(3):
        solve("fastflow", gm, noise, T, y=y, bandit=b)
    d = bandit_state.to_dict(b)
    del d["reward"], d["context"]
    d["version"] = 2
    path = tmp_path / "v2.json"
    path.write_text(json.dumps(d))
    back = bandit_state.load(path)
    assert isinstance(back, FastFlowBandit) and back.reward_mode == "residual"
    for name in ("Q", "N", "R"):
        np.testing.assert_array_equal(getattr(back, name), getattr(b, name))
    assert back.mu == b.mu and back.target == b.target and back.generations == 3
    bandit_state.write(back, path)
    assert json.loads(path.read_text())["version"] == 3


@pytest.mark.parametrize("edit,match", [
    (lambda d: d["context"].update(by="weather"), "unknown context 'weather'"),
    (lambda d: d["tables"].update({"mid|cfg 1": d["tables"]["lo|cfg 1"]}), "unknown context"),
    (lambda d: d.update(context="label"), "unknown context 'label'"),
    (lambda d: d["tables"]["lo|cfg 1"].update(Q=[[0.0]]), "table 'lo|cfg 1'"),
    (lambda d: d["tables"]["hi|cfg 1"].pop("rng"), "bad or missing field"),
    (lambda d: d.update(reward="loss"), "reward must be one of"),
])
def test_bad_context_file_refused_in_one_line(gm, tmp_path, edit, match):
    path = tmp_path / "s.json"
    bandit_state.write(_learned(gm), path)
    d = json.loads(path.read_text())
    edit(d)
    path.write_text(json.dumps(d))
    with pytest.raises(StateFileError, match=match) as e:
        bandit_state.load(path, contexts=True)
    assert "\n" not in str(e.value)


def test_a_bad_update_leaves_the_file_as_it_was(gm, tmp_path):
    path = tmp_path / "s.json"
    cb = _learned(gm)
    bandit_state.write(cb, path)
    before = path.read_bytes()
    cb.tables["lo|cfg 1"].Q[3, 1] = np.nan
    with pytest.raises(StateFileError, match="not written"):
        bandit_state.write(cb, path)
    assert path.read_bytes() == before


def test_cli_bandit_show_refuses_a_context_file_in_one_line(gm, tmp_path):
    from click.testing import CliRunner

    from anchorflow.cli import cli

    path = tmp_path / "s.json"
    bandit_state.write(_learned(gm), path)
    res = CliRunner().invoke(cli, ["bandit", "show", str(path)])
    assert res.exit_code == 1 and "holds context bandits" in str(res.exception)
    assert "\n" not in str(res.exception)
