"""FastFlow (arXiv 2602.11105): the skipping loop, its bandits and their state files.

Time convention: t = 1 noise, t = 0 data. Truths used: the Euler solver of the registry, a
closed-form left Riemann sum, a brute-force search over skip plans, recomputed extrapolation
errors, and counts that must add up across processes.
"""

from __future__ import annotations

import json
import multiprocessing
import time
from functools import lru_cache

import numpy as np
import pytest
from click.testing import CliRunner

from anchorflow.base.errors import ConfigError, StateFileError
from anchorflow.runtime import FastFlowBandit, make_grid, solve
from anchorflow.runtime.fastflow import state as bandit_state
from anchorflow.runtime.fastflow.bandit import BanditKey
from anchorflow.runtime.fastflow.learning import run_with_state
from anchorflow.runtime.solving.solvers.fastflow_loop import extrapolate

T = 12  # a small grid keeps every test fast; the rules do not depend on T
HUGE_MU = 1e6  # reward per skipped step far above any mse (< 10 here) and UCB bonus (< 2 sqrt(ln n))


def _noise(seed: int, b: int = 8) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((b, 2)).astype(np.float32)


def _labels(b: int = 8) -> np.ndarray:
    return np.arange(b) % 2


def _warm(mixture, bandit: FastFlowBandit, generations: int, **kw):
    """Run ``generations`` batches with fresh noise; return the last Result."""
    for g in range(generations):
        res = solve("fastflow", mixture, _noise(g), bandit.T, y=_labels(), bandit=bandit, grid=bandit.grid, **kw)
    return res


def _min_calls(T_: int, arms, tail: int) -> int:
    """Brute force over every allowed skip plan: fewest computed steps from step 0 to the end."""

    @lru_cache(None)
    def best(k: int) -> int:  # k is a computed step >= 1; calls from k+1 on
        if k >= T_ - tail - 1:
            return T_ - 1 - k
        return min(1 + best(k + a + 1) for a in arms if k + a + 1 <= T_ - tail)

    return 2 + best(1)


# -- the loop ------------------------------------------------------------------------------------
@pytest.mark.parametrize("cfg", [1.0, 1.5])
def test_mu_zero_is_plain_euler(mixture, cfg):
    noise = _noise(0)
    kw = dict(y=_labels(), cfg_scale=cfg, null_label=mixture.null_label)
    ff = solve("fastflow", mixture, noise, T, mu=0.0, **kw)
    eu = solve("euler", mixture, noise, T, **kw)
    assert ff.nfe == T and all(s.info["computed"] for s in ff.steps)
    np.testing.assert_array_equal(ff.x, eu.x)  # same arithmetic in the same order: bitwise equal


@pytest.mark.parametrize("arms,tail", [((0, 2, 4, 6), 1), ((0, 2, 4, 6), 3), ((0, 1, 3), 1), ((0, 5), 2)])
def test_huge_mu_skips_as_much_as_allowed(mixture, counting, arms, tail):
    bandit = FastFlowBandit(T, arms=arms, mu=HUGE_MU)
    # Every unsettled generation tries one new (step, arm) pair, so T * len(arms) generations
    # are enough for UCB to settle on the largest arm that fits wherever the path goes.
    _warm(mixture, bandit, T * len(arms), tail=tail)
    velocity = counting(mixture)
    res = solve("fastflow", velocity, _noise(99), T, y=_labels(), bandit=bandit, tail=tail)
    assert res.nfe == len(velocity.calls) == res.info["calls"] == _min_calls(T, arms, tail)
    computed = [s.info["computed"] for s in res.steps]
    assert computed[:2] == [True, True] and all(computed[T - tail:])  # never skips into the tail


def test_calls_counted_exactly_and_records_add_up(mixture, counting):
    velocity = counting(mixture)
    bandit = FastFlowBandit(T, mu=1e-3, gamma=0.5)
    for g in range(6):
        before = len(velocity.calls)
        res = solve("fastflow", velocity, _noise(g), T, y=_labels(), cfg_scale=2.0,
                    null_label=mixture.null_label, bandit=bandit)
        made = len(velocity.calls) - before
        assert res.nfe == made == res.info["calls"] == sum(s.calls for s in res.steps)
        assert all(c["rows"] == 16 for c in velocity.calls)  # CFG: one call carries 2B rows
        assert sum(res.info["skip_hist"].values()) == sum(a is not None for a in res.info["arms"])
    assert bandit.generations == 6


@pytest.mark.parametrize("grid", ["uniform", "shift:3"])
def test_extrapolation_exact_on_velocity_linear_in_t(grid):
    a, b = np.array([0.3, -1.2], np.float64), np.array([2.0, 0.5], np.float64)

    def linear(x, t, y):  # v(x, t) = a + b t, independent of x
        return (a + b * np.asarray(t, np.float64)[:, None]).astype(x.dtype)

    noise = np.random.default_rng(0).standard_normal((4, 2))
    bandit = FastFlowBandit(T, grid, mu=HUGE_MU)
    for _ in range(3 * 4):
        res = solve("fastflow", linear, noise, T, bandit=bandit, grid=grid)
    assert res.nfe < T // 2  # it really skipped
    # Euler's update is the left Riemann sum of v over the grid; with an exact extrapolation the
    # skipped steps change nothing. float64 round-off on O(1) numbers: 1e-12.
    g = make_grid(T, grid)
    expected = noise + np.sum(np.diff(g)[:, None] * (a + b * g[:-1, None]), axis=0)
    np.testing.assert_allclose(res.x, expected, rtol=0, atol=1e-12)


def test_extrapolate_uses_true_times():
    v_p, v_q = np.array([1.0]), np.array([3.0])
    # slope (3 - 1) / (0.5 - 0.9) = -5; at t = 0.2: 3 + (0.2 - 0.5) * -5 = 4.5
    assert extrapolate((0.9, v_p), (0.5, v_q), 0.2)[0] == pytest.approx(4.5, abs=1e-15)


def test_first_generation_calibrates_mu(mixture):
    noise, y = _noise(3), _labels()
    res = solve("fastflow", mixture, noise, T, y=y)
    assert res.nfe == T and res.info["calibration"]
    # Independent recomputation: Euler trajectory, then each step's error of the extrapolation
    # from the two previous velocities. Same float32 inputs; mse in float64, so 1e-6 relative.
    g, x, vs = make_grid(T), noise.copy(), []
    for k in range(T):
        vs.append(mixture(x, np.full(len(x), g[k], np.float32), y))
        x = x + (g[k + 1] - g[k]) * vs[-1]
    mses = [np.mean((extrapolate((g[k - 2], vs[k - 2]), (g[k - 1], vs[k - 1]), g[k]).astype(np.float64) - vs[k]) ** 2)
            for k in range(2, T)]
    assert res.info["calibrated_mu"] == pytest.approx(max(mses) / T, rel=1e-6)


def test_ucb1_choice_matches_formula():
    bandit = FastFlowBandit(T, mu=0.5, gamma=1.0)
    assert [bandit.select(3, 6) for _ in range(2)] == [0, 0]  # untried: lowest first
    for arm, r in [(0, -0.1), (2, 0.9), (4, 1.5), (6, 0.2), (2, 0.7), (4, 1.1)]:
        bandit.observe(3, arm, r)
    assert bandit.select(3, 3) == 2  # arms 4 and 6 do not fit
    n, q = np.array([1, 2, 2, 1]), np.array([-0.1, 0.8, 1.3, 0.2])
    score = q + 1.0 * 0.5 * np.sqrt(np.log(6) / n)  # bonus unit mu = 0.5
    assert bandit.select(3, 6) == (0, 2, 4, 6)[int(np.argmax(score))]
    assert bandit.greedy()[3] == 4 and bandit.greedy()[2] is None


def test_bad_options_refused(mixture):
    with pytest.raises(ConfigError, match="tail"):
        solve("fastflow", mixture, _noise(0), T, y=_labels(), tail=0)
    with pytest.raises(ConfigError, match="another grid"):
        solve("fastflow", mixture, _noise(0), T + 1, y=_labels(), bandit=FastFlowBandit(T))
    with pytest.raises(ConfigError, match="belong to the bandit"):
        solve("fastflow", mixture, _noise(0), T, y=_labels(), bandit=FastFlowBandit(T), mu=1.0)
    with pytest.raises(ConfigError, match="include 0"):
        FastFlowBandit(T, arms=(2, 4))
    with pytest.raises(ConfigError, match="nfe >= 3"):
        solve("fastflow", mixture, _noise(0), 2, y=_labels())


# -- persistence ---------------------------------------------------------------------------------
def test_reloaded_bandit_makes_the_same_choices(mixture, tmp_path):
    mem = FastFlowBandit(T, mu=2e-3, seed=7, model_id="gm")
    _warm(mixture, mem, 5)
    mem.Q[4], mem.N[4] = 0.25, 3  # an exact tie at step 4: broken by the seeded generator
    bandit_state.write(mem, tmp_path / "s.json")
    disk = bandit_state.load(tmp_path / "s.json", key=mem.key)
    np.testing.assert_array_equal(disk.Q, mem.Q)
    ties = [(mem.select(4, 6), disk.select(4, 6)) for _ in range(20)]
    assert len({a for a, _ in ties}) > 1 and all(a == b for a, b in ties)
    for g in range(5, 10):
        a = solve("fastflow", mixture, _noise(g), T, y=_labels(), bandit=mem)
        b = solve("fastflow", mixture, _noise(g), T, y=_labels(), bandit=disk)
        assert a.info["arms"] == b.info["arms"]
        np.testing.assert_array_equal(a.x, b.x)


def test_truncated_and_foreign_files_refused(tmp_path):
    path = tmp_path / "s.json"
    bandit_state.write(FastFlowBandit(T, mu=1e-3, model_id="m"), path)
    text = path.read_text()
    path.write_text(text[: len(text) // 2])
    with pytest.raises(StateFileError, match="corrupt or truncated"):
        bandit_state.load(path)
    path.write_text(json.dumps({"schema": "anchorflow.bundle/1"}))
    with pytest.raises(StateFileError, match="schema"):
        bandit_state.load(path)
    d = json.loads(text)
    d["Q"] = d["Q"][:-1]
    path.write_text(json.dumps(d))
    with pytest.raises(StateFileError, match="Q must be"):
        bandit_state.load(path)


def test_crash_during_save_keeps_old_file(tmp_path, monkeypatch):
    path = tmp_path / "s.json"
    old = FastFlowBandit(T, mu=1e-3, model_id="m")
    bandit_state.write(old, path)
    before = path.read_bytes()
    new = old.copy()
    new.observe(2, 4, 1.0)

    def crash(fd):  # the new bytes are written to the temporary file, then the "power fails"
        raise OSError("simulated crash")

    monkeypatch.setattr("anchorflow.base._io.os.fsync", crash)
    with pytest.raises(StateFileError, match="cannot write the bandit state .*simulated"):
        bandit_state.update(path, lambda b: b.observe(2, 4, 1.0))
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert bandit_state.load(path).N.sum() == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.json", "s.json.lock"]  # no temp left


def test_mismatched_state_refused(mixture, tmp_path):
    path = tmp_path / "s.json"
    run_with_state(mixture, _noise(0), T, path, "model-a", y=_labels(), mu=1e-3)
    for T_, grid, model, what in [(T + 2, None, "model-a", "grid size"), (T, "shift:3", "model-a", "grid values"),
                                  (T, None, "model-b", "model")]:
        with pytest.raises(StateFileError, match=what):
            run_with_state(mixture, _noise(0), T_, path, model, grid=grid, y=_labels())
    with pytest.raises(StateFileError, match="model"):  # a guided field is another field
        run_with_state(mixture, _noise(0), T, path, "model-a", y=_labels(), cfg_scale=1.5,
                       null_label=mixture.null_label)
    with pytest.raises(StateFileError, match="mu="):
        run_with_state(mixture, _noise(0), T, path, "model-a", y=_labels(), mu=5.0)
    with pytest.raises(StateFileError, match="grid size"):
        bandit_state.load(path, key=BanditKey.of(make_grid(T + 1), "model-a"))
    assert bandit_state.load(path).generations == 1  # refusals changed nothing


def test_mu_factor_scales_calibration_and_is_part_of_the_state(mixture, tmp_path):
    plain = solve("fastflow", mixture, _noise(3), T, y=_labels())
    path = tmp_path / "s.json"
    run_with_state(mixture, _noise(3), T, path, "m", y=_labels(), mu_factor=20.0)
    # the same fully computed generation, so the same max mse: exactly 20 times the plain rule
    assert bandit_state.load(path).mu == pytest.approx(20.0 * plain.info["calibrated_mu"], rel=1e-12)
    with pytest.raises(StateFileError, match="mu_factor"):
        run_with_state(mixture, _noise(4), T, path, "m", y=_labels(), mu_factor=5.0)
    with pytest.raises(ConfigError, match="mu_factor"):
        FastFlowBandit(T, mu_factor=0.0)


def test_run_with_state_calibrates_then_learns(mixture, tmp_path):
    path = tmp_path / "s.json"
    first = run_with_state(mixture, _noise(0), T, path, "m", y=_labels())
    assert first.nfe == T and bandit_state.load(path).mu == pytest.approx(first.info["calibrated_mu"])
    second = run_with_state(mixture, _noise(1), T, path, "m", y=_labels())
    state = bandit_state.load(path)
    assert state.generations == 2 and not second.info["calibration"]
    assert state.N.sum() == len(first.info["rewards"]) + len(second.info["rewards"])


def _worker(path: str, seed: int, n: int) -> None:
    from anchorflow.runtime.evaluation.analytic import GaussianMixture

    gm = GaussianMixture.random((2,), 3, classes=2, seed=0, spread=1.5, std=(0.4, 0.7))

    def slow(x, t, y):  # widen the window between load and save so a lost update would show
        time.sleep(0.002)
        return gm(x, t, y)

    for g in range(n):
        run_with_state(slow, _noise(seed * 100 + g), T, path, "m", y=_labels(), mu=1e-3)


def test_concurrent_writers_all_counted(tmp_path):
    path = str(tmp_path / "s.json")
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_worker, args=(path, s, 4)) for s in (1, 2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    state = bandit_state.load(path)
    assert state.generations == 8
    # every generation makes decisions at steps 1 .. paid before the tail; none may be lost
    assert state.N.sum() >= 8 and state.N[1].sum() == 8


# -- CLI -----------------------------------------------------------------------------------------
def test_cli_show_text_json_and_plot(mixture, tmp_path):
    from anchorflow.cli import cli

    path = tmp_path / "s.json"
    for g in range(3):
        run_with_state(mixture, _noise(g), T, path, "m", y=_labels(), mu=1e-3)
    runner = CliRunner()
    out = runner.invoke(cli, ["bandit", "show", str(path)])
    assert out.exit_code == 0 and "generations seen: 3" in out.output and "greedy" in out.output
    js = runner.invoke(cli, ["bandit", "show", str(path), "--json"])
    data = json.loads(js.output)
    assert data["generations"] == 3 and data["steps"][0]["step"] == 1 and sum(data["steps"][0]["N"]) == 3
    png = tmp_path / "b.png"
    pytest.importorskip("matplotlib")
    res = runner.invoke(cli, ["bandit", "show", str(path), "--plot", str(png)])
    assert res.exit_code == 0 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (tmp_path / "bad.json").write_text("{")
    bad = runner.invoke(cli, ["bandit", "show", str(tmp_path / "bad.json")])
    assert bad.exit_code != 0 and isinstance(bad.exception, StateFileError)
