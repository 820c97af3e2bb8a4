"""Issue 26: the free per-sample error estimate (``Result.error_estimate``) and ``autoconfigure``.

Time convention: t = 1 noise, t = 0 data; NFE = backbone calls.
"""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest

from anchorflow.cli import main
from anchorflow.base.errors import CheckpointError, ConfigError
from test_export import tiny_bundle, tiny_root  # noqa: F401  (session fixtures, exported once)

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
    is h/2 |v1 - v0|, weighted by h / t_end ("stiff", default) or 1 ("plain"); the final interval
    keeps its predictor and adds nothing."""
    n = 5
    grid = np.linspace(1.0, 0.0, n + 1)
    x, expect, plain = noise.copy(), np.zeros(noise.shape[0]), np.zeros(noise.shape[0])
    v0 = mixture(x, np.full(x.shape[0], 1.0), None)
    for i in range(n):
        h = grid[i] - grid[i + 1]
        x_pred = x - h * v0
        if i == n - 1:
            x = x_pred
            break
        v1 = mixture(x_pred, np.full(x.shape[0], grid[i + 1]), None)
        x = x - h * (v0 + v1) / 2
        expect += h / grid[i + 1] * _rms(h / 2 * (v1 - v0))
        plain += _rms(h / 2 * (v1 - v0))
        v0 = v1
    res = solve("ba", mixture, noise, n, sidenet=zero_sidenet)
    np.testing.assert_allclose(res.x, x, atol=1e-12)
    np.testing.assert_allclose(res.error_estimate, expect, rtol=1e-10)
    res = solve("ba", mixture, noise, n, sidenet=zero_sidenet, estimate="plain")
    np.testing.assert_allclose(res.x, x, atol=1e-12)
    np.testing.assert_allclose(res.error_estimate, plain, rtol=1e-10)
    with pytest.raises(ConfigError, match="ba option estimate must be one of stiff, plain"):
        solve("ba", mixture, noise, n, sidenet=zero_sidenet, estimate="flat")


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


def test_latency_model_is_calls_times_pooled_per_call_times():
    """Independent truth: hand-made timings; the medians per backbone call, per SideNet call and per
    solver's step overhead, then calls x those (a wall-time outlier moves a median only one rank)."""
    from types import SimpleNamespace as NS

    from anchorflow.autoconfig import latency_model, modelled_latency
    from anchorflow.runtime.solving.result import Timing

    def r(nfe, side, steps, back_s, side_s, total_s):
        return NS(nfe=nfe, sidenet_calls=side, steps=(None,) * steps, timing=Timing(total_s, back_s, side_s))

    timings = [("euler", r(4, 0, 4, 0.040, 0.0, 0.044)), ("euler", r(2, 0, 2, 0.020, 0.0, 0.022)),
               ("euler", r(8, 0, 8, 4.0, 0.0, 4.008)),  # a load burst: 0.5 s per call, one of five
               ("ba", r(5, 5, 5, 0.050, 0.025, 0.080)), ("ba", r(3, 3, 3, 0.030, 0.015, 0.048))]
    pc = latency_model(timings)
    assert pc["backbone_s"] == pytest.approx(0.010) and pc["sidenet_s"] == pytest.approx(0.005)
    assert pc["overhead_s_per_step"] == pytest.approx({"euler": 0.001, "ba": 0.001})
    assert modelled_latency(pc, "ba", 6, 6, 6) == pytest.approx(6 * 0.010 + 6 * 0.005 + 6 * 0.001)
    assert modelled_latency(pc, "unipc", 4, 0, 4) == pytest.approx(4 * 0.010 + 4 * 0.001)  # unseen: median


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


# -- the search's promise -------------------------------------------------------------------------
def test_prediction_bound_matches_the_normal_formula():
    """Independent truth: for normal values the bound on a fresh batch of m is about
    mean - z_c s sqrt(1/n + 1/m); on the population mean about mean - z_c s / sqrt(n)."""
    from anchorflow.autoconfig import bootstrap_lower

    v = np.random.default_rng(5).normal(30.0, 2.0, 400)
    z, s = 1.6449, v.std()
    for future, width in ((None, z * s / 20.0), (400, z * s * np.sqrt(2 / 400)), (25, z * s * np.sqrt(1 / 400 + 1 / 25))):
        got = v.mean() - bootstrap_lower(v, 0.95, 5000, np.random.default_rng(0), future)
        assert got == pytest.approx(width, rel=0.08)


def test_two_level_bound_pays_for_the_conditions():
    """Independent truth (random-effects model): with G groups the two-level bound on the population
    mean sits about z_c sd(group means) / sqrt(G) below the mean; without a group effect it is about
    the one-level bound; one group, or one sample per group, IS the one-level bound (same draws)."""
    from anchorflow.autoconfig import bootstrap_lower

    rng = np.random.default_rng(3)
    g = np.repeat(np.arange(40), 10)
    v = rng.normal(0.0, 2.0, 40)[g] + rng.normal(0.0, 1.0, g.size)
    z, sd_means = 1.6449, np.array([v[g == k].mean() for k in range(40)]).std()
    got = v.mean() - bootstrap_lower(v, 0.95, 4000, np.random.default_rng(0), None, g)
    assert got == pytest.approx(z * sd_means / np.sqrt(40), rel=0.1)
    one = v.mean() - bootstrap_lower(v, 0.95, 4000, np.random.default_rng(0), None)
    assert got > 2.5 * one  # the group effect dominates: the one-level bound is far too optimistic
    flat = rng.normal(0.0, 1.0, g.size)
    a = flat.mean() - bootstrap_lower(flat, 0.95, 4000, np.random.default_rng(0), 32, g)
    b = flat.mean() - bootstrap_lower(flat, 0.95, 4000, np.random.default_rng(0), 32)
    assert a == pytest.approx(b, rel=0.15)
    for same in (np.zeros(g.size), np.arange(g.size)):
        assert (bootstrap_lower(v, 0.95, 500, np.random.default_rng(1), 32, same)
                == bootstrap_lower(v, 0.95, 500, np.random.default_rng(1), 32))


def test_bad_groups_refused_in_one_line():
    from anchorflow.autoconfig import _groups, bootstrap_lower

    with pytest.raises(ConfigError, match="one id per sample"):
        bootstrap_lower(np.zeros(8), 0.95, 100, np.random.default_rng(0), None, np.zeros(7))
    with pytest.raises(ConfigError, match="one condition id per sample"):
        _groups(np.zeros(3), None, 4, {})
    with pytest.raises(ConfigError, match="'labels'"):
        _groups("classes", None, 4, {})
    with pytest.raises(ConfigError, match="class-conditional"):
        _groups("labels", None, 4, {})
    np.testing.assert_array_equal(_groups("labels", None, 5, {"num_classes": 2}), [0, 1, 0, 1, 0])


@pytest.fixture(scope="module")
def mixture_search():
    """Every candidate of one search on the closed-form mixture (target low enough to be met)."""
    from anchorflow.autoconfig import autoconfigure

    m = _Mixture()
    found = autoconfigure(m, 0.0, reference="rk4@64", solvers=("euler", "ab2", "ba"), nfes=(2, 3, 4, 6, 8),
                          grids=("uniform", "shift:3"), samples=24, seed=4, resamples=400, repeats=1)
    return m, found


def test_search_never_returns_a_configuration_whose_bound_misses_the_target(mixture_search):
    """For targets placed between each candidate's bound and its mean (where a search on the mean would
    pick it), the chosen configuration's bound, recomputed here from an independent solve of the same
    noise against an independent reference, meets the target; an unreachable target is refused."""
    from anchorflow.autoconfig import autoconfigure, bootstrap_lower
    from anchorflow.base.errors import ConfigError
    from anchorflow.runtime.evaluation import metrics as M

    m, everything = mixture_search
    noise = np.random.default_rng(4).standard_normal((24, 4)).astype(np.float32)
    ref = solve("rk4", m.velocity, noise, 64).x
    traps = [c for c in everything.candidates if c.lower_bound < c.mean_psnr - 0.2]
    assert traps  # the targets below would catch a search that compared the mean, not the bound
    for c in traps[::3]:
        target = (c.lower_bound + c.mean_psnr) / 2
        try:
            found = autoconfigure(m, target, reference="rk4@64", solvers=("euler", "ab2", "ba"), nfes=(2, 3, 4, 6, 8),
                                  grids=("uniform", "shift:3"), samples=24, seed=4, resamples=400, repeats=1)
        except ConfigError as exc:
            assert max(x.lower_bound for x in everything.candidates) < target and "not reachable" in str(exc)
            continue
        p = found.preset
        x = solve(p.solver, m.velocity, noise, p.nfe, grid=np.asarray(p.times), sidenet=m.sidenet).x
        per = M.psnr_per_sample(x, ref, (-3.0, 3.0))
        assert np.mean(per) == pytest.approx(p.mean_psnr, abs=1e-6)
        bound = bootstrap_lower(per, 0.95, 400, np.random.default_rng(5), future=24)
        assert bound == pytest.approx(p.lower_bound, abs=1e-6) and bound >= target
        assert (p.solver, p.nfe, p.times) != (c.solver, c.nfe, c.times)  # the trap itself is never chosen


def test_preset_for_a_higher_target_is_the_fastest_timed_candidate_meeting_it(mixture_search):
    """One search, several presets: for each higher target the choice is the fastest candidate (by
    the search's modelled latency) whose bound meets it; the search's own target gives its preset;
    an unmet one is refused."""
    from anchorflow.autoconfig import preset_for
    from anchorflow.base.errors import ConfigError

    _, found = mixture_search
    assert preset_for(found, found.settings["target_psnr"]) == found.preset
    bounds = sorted(c.lower_bound for c in found.candidates if c.meets)
    for q in bounds[len(bounds) // 3:]:
        p = preset_for(found, q, name="hi")
        ok = [c for c in found.candidates if c.lower_bound >= q]
        assert p.name == "hi" and p.lower_bound >= q and p.target_psnr == q
        assert p.latency_s == min(c.latency_s for c in ok)
        assert (p.solver, p.nfe, p.times) in {(c.solver, c.nfe, c.times) for c in ok}
    with pytest.raises(ConfigError, match="no candidate of this search has a 95% lower bound >= "):
        preset_for(found, bounds[-1] + 1.0)


def test_an_impossible_target_is_refused_in_one_line_naming_the_best(quality_root, capsys):
    folder = quality_root / "bundle"
    before = (folder / "tuned.json").read_bytes()
    with pytest.raises(SystemExit) as exc:
        main(["tune", str(folder), "--target-psnr", "300", "--solvers", "euler,ba", "--nfe", "2,3", "--samples",
              "4", "--grids", "uniform", "--backend", "ort-cpu"])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 1 and len(err.splitlines()) == 1 and err.startswith("error: target PSNR 300 dB")
    assert re.search(r"the best 95% lower bound is -?[0-9.]+ dB \((euler|ba)@[23] uniform\)", err)
    assert (folder / "tuned.json").read_bytes() == before  # nothing written


# -- presets in the bundle: hashed, used by sample --quality, dropped with other weights ---------------
@pytest.fixture(scope="module")
def quality_root(tiny_root, tiny_bundle, tmp_path_factory):  # noqa: F811
    """A copy of the tiny exported model root with two presets recorded by the CLI."""
    root = tmp_path_factory.mktemp("quality") / "root"
    for part in ("backbone", "sidenet", "bundle"):
        shutil.copytree(tiny_root / part, root / part)
    for name, target in (("fast", "-100"), ("best", "5")):
        main(["tune", str(root / "bundle"), "--target-psnr", target, "--name", name, "--solvers", "euler,ab2,ba",
              "--nfe", "2,3,6", "--samples", "6", "--grids", "uniform", "--reference", "euler@12",
              "--backend", "ort-cpu", "--plot", str(root / f"{name}.png")])
    return root


def test_presets_are_hashed_with_the_bundle_and_a_changed_one_is_refused(quality_root, tmp_path):
    from anchorflow.runtime.bundles.format import file_sha256
    from anchorflow.runtime.bundles.tuned_grids import read_tuning

    folder = quality_root / "bundle"
    entry = json.loads((folder / "bundle.json").read_text())["tuned"]
    assert entry["grids"]["sha256"] == file_sha256(folder / "tuned.json")
    presets = read_tuning(folder).presets
    assert set(presets) == {"fast", "best"} and presets["best"].lower_bound >= 5.0
    assert (quality_root / "fast.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    copy = tmp_path / "b"
    shutil.copytree(folder, copy)
    data = json.loads((copy / "tuned.json").read_text())
    data["presets"]["fast"]["lower_bound"] = 99.0  # claim a better bound than measured
    (copy / "tuned.json").write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="does not match the sha256"):
        read_tuning(copy)


def test_sample_quality_solves_with_the_preset_and_records_it(quality_root, tmp_path, capsys):
    from anchorflow.runtime import load_bundle
    from anchorflow.runtime.bundles.tuned_grids import read_tuning

    folder = quality_root / "bundle"
    p = read_tuning(folder).presets["best"]
    main(["sample", str(folder), "--quality", "best", "--n", "5", "--seed", "3", "--backend", "ort-cpu",
          "--out", str(tmp_path / "s.png"), "--npy", str(tmp_path / "s.npy"), "--json", str(tmp_path / "s.json")])
    err = capsys.readouterr().err
    assert f"quality best: {p.solver}@{p.nfe} uniform" in err
    b = load_bundle(folder, backend="ort-cpu")
    noise = np.random.default_rng(3).standard_normal((5, *b.meta["model"]["state_shape"])).astype(np.float32)
    y = np.arange(5) % int(b.meta["model"]["num_classes"])
    want = solve(p.solver, b.velocity, noise, p.nfe, y=y, grid=np.asarray(p.times), sidenet=b.sidenet)
    np.testing.assert_allclose(np.load(tmp_path / "s.npy"), want.x, atol=1e-5)
    rec = json.loads((tmp_path / "s.json").read_text())
    assert rec["quality"]["name"] == "best" and rec["solver"] == p.solver and rec["backbone_calls"] == p.nfe
    if want.error_estimate is not None:
        np.testing.assert_allclose(rec["error_estimate"], want.error_estimate, rtol=1e-4, atol=1e-7)
    # a number of dB picks the fastest preset whose bound meets it
    main(["sample", str(folder), "--quality", f"{p.lower_bound - 1e-3:.6f}", "--n", "2", "--backend", "ort-cpu",
          "--out", str(tmp_path / "t.png")])
    assert "quality " in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["sample", str(folder), "--quality", "best", "--solver", "euler", "--out", str(tmp_path / "u.png")])
    assert "drop --solver" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["sample", str(folder), "--quality", "nosuch", "--out", str(tmp_path / "u.png")])
    assert "quality 'nosuch' is not recorded in this bundle (presets: best, fast)" in capsys.readouterr().err
    assert not (tmp_path / "u.png").exists()


def test_reexport_keeps_presets_of_the_same_weights_and_drops_them_with_other_weights(quality_root, tmp_path,
                                                                                     capsys):
    from anchorflow.export.bundle import export_bundle
    from anchorflow.runtime.bundles.tuned_grids import read_tuning
    from _bundles import train_further

    root = tmp_path / "root"
    for part in ("backbone", "sidenet", "bundle"):
        shutil.copytree(quality_root / part, root / part)
    before = read_tuning(root / "bundle").presets
    res = export_bundle(root, tmp_path / "same", precisions=["fp32"], validate=False, progress=False)
    assert read_tuning(res.path).presets == before  # same weights: kept, hash-checked in the new bundle
    train_further(root / "sidenet")  # other weights: the presets were measured for the old ones
    main(["export", str(root), "--precision", "fp32", "--no-validate"])
    assert "not kept" in capsys.readouterr().err
    assert read_tuning(root / "bundle") is None
    with pytest.raises(SystemExit):
        main(["sample", str(root / "bundle"), "--quality", "best", "--out", str(tmp_path / "u.png")])
    assert "presets: none recorded" in capsys.readouterr().err


# -- escalation ----------------------------------------------------------------------------------
def test_escalation_resolves_only_the_samples_above_the_threshold():
    """Samples whose estimate exceeds E are re-solved with the next rung (equal to that rung's own
    solve of the same rows), the others keep their first solve bit for bit; still-high ones climb."""
    from anchorflow.autoconfig import escalate
    from anchorflow.runtime.plan import plan

    m = _Mixture()
    noise = np.random.default_rng(9).standard_normal((40, 4))
    first = plan(m, solver="ab2", nfe=3, noise=noise, tuning=None)
    rungs = [plan(m, solver="ab2", nfe=6, noise=noise, tuning=None), plan(m, solver="euler", nfe=40, noise=noise,
                                                                           tuning=None)]
    res = first.run()
    e = float(np.quantile(res.error_estimate, 0.7))
    esc = escalate(first, res, e, rungs)
    above = res.error_estimate > e
    assert esc.rungs[0]["samples"] == above.sum() == 12 and esc.resolved >= 12
    np.testing.assert_array_equal(esc.x[~above], res.x[~above])
    full = [r.run() for r in rungs]
    second = full[0].error_estimate > e
    climb = above & second
    np.testing.assert_allclose(esc.x[above & ~second], full[0].x[above & ~second], atol=1e-12)
    np.testing.assert_allclose(esc.x[climb], full[1].x[climb], atol=1e-12)
    assert esc.extra_calls == 6 + (40 if climb.any() else 0) and esc.above == 0
    assert escalate(first, res, float(res.error_estimate.max()), rungs).resolved == 0
    other = [plan(m, solver="ipndm", nfe=6, noise=noise, tuning=None), rungs[1]]  # another solver's units
    esc = escalate(first, res, e, other)
    assert [u["samples"] for u in esc.rungs] == [12] and esc.extra_calls == 6 and esc.above == 0
    np.testing.assert_allclose(esc.x[above], other[0].run().x[above], atol=1e-12)


def test_the_ladder_has_one_rung_per_configuration():
    from anchorflow.autoconfig import ladder
    from anchorflow.runtime.bundles.presets import Preset
    from anchorflow.runtime.bundles.tuned_grids import Tuning

    def p(name, solver, nfe, lcb, ms):
        return Preset(name, solver, nfe, "backbone", "uniform", tuple(np.linspace(1, 0, nfe + 1)), 30.0, "euler@50",
                      0.95, lcb, lcb + 1, 0.1, lcb - 1, ms, 32, "cpu")

    ps = {"a": p("a", "unipc", 5, 31.0, 0.07), "b": p("b", "ba", 6, 40.0, 0.2), "c": p("c", "ba", 6, 40.0, 0.2),
          "d": p("d", "euler", 3, 20.0, 0.03)}
    rungs = ladder(Tuning(presets=ps), ps["a"])
    assert [(r.solver, r.nfe) for r in rungs] == [("ba", 6), ("euler", 50)]


def test_escalation_slices_label_rows(quality_root):
    """On an exported class-conditional bundle: the re-solved rows keep their own labels."""
    from anchorflow.autoconfig import escalate
    from anchorflow.runtime import load_bundle
    from anchorflow.runtime.plan import plan

    b = load_bundle(quality_root / "bundle", backend="ort-cpu")
    first = plan(b, solver="ab2", nfe=3, n=8, labels=[3, 1, 4, 1, 5, 9, 2, 6], tuning=None)
    rung = plan(b, solver="ab2", nfe=6, n=8, labels=[3, 1, 4, 1, 5, 9, 2, 6], tuning=None)
    res = first.run()
    e = float(np.median(res.error_estimate))
    esc = escalate(first, res, e, [rung])
    above = res.error_estimate > e
    np.testing.assert_allclose(esc.x[above], rung.run().x[above], atol=1e-5)


def test_bound_over_conditions_is_wired_through_the_search_and_the_cli(quality_root, capsys):
    """``groups="labels"``: every candidate's bound is the two-level bound of its own per-sample PSNRs over
    the tuning batch's cycled labels (recomputed here), and the settings say so; the CLI takes
    ``--bound conditions --batch``."""
    from anchorflow.autoconfig import autoconfigure, bootstrap_lower
    from anchorflow.runtime import load_bundle

    b = load_bundle(quality_root / "bundle", backend="ort-cpu")
    found = autoconfigure(b, -100.0, reference="euler@6", solvers=("euler", "ab2"), nfes=(2, 3), grids=("uniform",),
                          samples=12, seed=2, resamples=300, repeats=1, groups="labels", batch=4)
    assert "two-level" in found.settings["bootstrap"]
    labels = np.arange(12) % int(b.meta["model"]["num_classes"])
    for c in found.candidates:
        assert c.lower_bound == bootstrap_lower(c.per_sample, 0.95, 300, np.random.default_rng(3), 4, labels)
    main(["tune", str(quality_root / "bundle"), "--target-psnr", "-100", "--solvers", "euler", "--nfe", "2",
          "--samples", "8", "--batch", "4", "--bound", "conditions", "--grids", "uniform", "--reference", "euler@4",
          "--backend", "ort-cpu", "--dry-run"])
    assert "quality psnr-100: euler@2 uniform" in capsys.readouterr().out


def test_python_api_plan_takes_a_quality(quality_root):
    """``b.plan(quality=NAME|dB)``: the preset's solver, NFE, grid and first call (the same numbers as
    solving with them by hand), named on the plan; giving both is refused; an unknown one names the
    recorded ones."""
    from anchorflow.runtime import load_bundle
    from anchorflow.runtime.bundles.tuned_grids import read_tuning

    b = load_bundle(quality_root / "bundle", backend="ort-cpu")
    p = read_tuning(quality_root / "bundle").presets["best"]
    pl = b.plan(quality="best", n=3, seed=2)
    assert (pl.solver, pl.nfe, pl.grid, pl.first_call, pl.quality) == (p.solver, p.nfe, p.times, p.first_call, "best")
    by_hand = b.plan(solver=p.solver, nfe=p.nfe, grid=np.asarray(p.times), first_call=p.first_call, n=3, seed=2)
    assert pl.key == by_hand.key  # the name is not part of the numbers
    np.testing.assert_array_equal(pl.run().x, by_hand.run().x)
    assert b.plan(quality=f"{p.lower_bound:.6f}", n=1).quality in ("best", "fast")
    with pytest.raises(ConfigError, match="do not also give solver, nfe"):
        b.plan(quality="best", solver="euler", nfe=3)
    with pytest.raises(ConfigError, match=r"not recorded in this bundle \(presets: best, fast\)"):
        b.plan(quality="nope")


def test_search_tries_the_cached_first_call_where_the_bundle_has_a_table():
    """On the bundled digits bundle (its t = 1 table measured by `anchorflow tune`): every solver x NFE is
    also tried with the cached first call, one more interval for the same backbone calls; its score is
    the same as the plan asked for by hand; a preset chosen from it carries first_call "cached" and
    `quality_plans` solves it that way. A bundle without a table skips the mode, and says so."""
    from anchorflow.autoconfig import _choose, autoconfigure, quality_plans
    from anchorflow.runtime import load_bundle
    from anchorflow.runtime.bundles.tuned_grids import Tuning, read_tuning
    from anchorflow.runtime.evaluation import metrics as M

    from anchorflow.modelref import BUNDLED

    b = load_bundle("default", backend="ort-cpu")
    tuning = read_tuning(BUNDLED / "digits" / "bundle")
    found = autoconfigure(b, -100.0, reference="euler@8", solvers=("ab2",), nfes=(3,), grids=("uniform",),
                          samples=6, seed=3, resamples=200, repeats=1, tuning=tuning)
    by_mode = {c.first_call: c for c in found.candidates}
    assert set(by_mode) == {"backbone", "cached"} and found.settings["first_calls"] == ["backbone", "cached"]
    c = by_mode["cached"]
    assert c.grid_label == "uniform +cached" and len(c.times) == 5 and c.calls == 3  # 4 intervals, 3 calls
    noise = np.random.default_rng(3).standard_normal((6, *b.meta["model"]["state_shape"])).astype(np.float32)
    ref = b.plan(solver="euler", nfe=8, grid="uniform", noise=noise, tuning=None).run().x
    x = b.plan(solver="ab2", nfe=3, grid="uniform", first_call="cached", noise=noise, tuning=tuning).run().x
    assert np.mean(M.psnr_per_sample(x, ref, (-1.0, 1.0))) == pytest.approx(c.mean_psnr, abs=1e-9)
    p = _choose([c], -100.0, "fc", {"reference": "euler@8", "confidence": 0.95, "samples": 6, "backend": ""})
    assert p.first_call == "cached"
    _, pl, _ = quality_plans(b, "fc", tuning=Tuning(presets={"fc": p}, first_call=tuning.first_call))
    assert pl.first_call == "cached" and pl.grid == c.times
    bare = autoconfigure(b, -100.0, reference="euler@8", solvers=("ab2",), nfes=(3,), grids=("uniform",),
                         samples=6, seed=3, resamples=200, repeats=1, tuning=None)
    assert {c.first_call for c in bare.candidates} == {"backbone"}
    assert "skipped" in bare.settings["first_calls"][-1]


def test_fastflow_candidates_are_scored_within_their_budget_and_never_chosen():
    """FastFlow at each budget k (T = speedup x k steps, the hard cap k): its bandit learns on its own
    noise, then is frozen and scored with the others; a preset cannot hold a learned bandit, so it is
    never chosen, even where it is the fastest meeting the target; ``speedups=()`` tries none."""
    from anchorflow.autoconfig import _choose, autoconfigure

    m = _Mixture()
    kw = dict(reference="rk4@64", solvers=("euler",), nfes=(4, 6), grids=("uniform",), samples=12, seed=4,
              resamples=200, repeats=1)
    found = autoconfigure(m, -100.0, speedups=(2.0, 3.0), **kw)
    ff = [c for c in found.candidates if c.solver == "fastflow"]
    assert sorted((c.nfe, c.calls <= c.nfe // 2 or c.calls <= c.nfe // 3) for c in ff) == [(8, True), (12, True),
                                                                                           (12, True), (18, True)]
    assert all(not c.recordable and np.isfinite(c.mean_psnr) and c.latency_s is not None for c in ff)
    assert len({c.key for c in found.candidates}) == len(found.candidates)  # two budgets on T = 12: two keys
    assert found.preset.solver == "euler"
    for c in ff:  # even alone and meeting the target, a FastFlow candidate is not a preset
        with pytest.raises(ConfigError, match="no candidate"):
            _choose([c], -100.0, "x", {"reference": "rk4@64", "confidence": 0.95, "samples": 12, "backend": ""})
    assert not [c for c in autoconfigure(m, -100.0, speedups=(), **kw).candidates if c.solver == "fastflow"]
