"""`anchorflow bench`: the error estimate's calibration (issue 26 item 3) on the bundled digits bundle.

The bundled digits bundle was made by the real exporter (its backbone, SideNet and classifier are
ONNX files). Every number the bench records is checked against an independent recomputation: the
solver solved again through the runtime from the same noise (its ``Result.error_estimate`` and
samples), the reference solved again by a float64 RK4 loop written here on the bundle's velocity,
and Spearman by scipy (or the rank computation below when scipy is missing).
Time convention: t = 1 noise, t = 0 data.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from anchorflow import bench
from anchorflow.bench import calibration

BUNDLED = Path(bench.__file__).resolve().parents[1] / "bundled" / "digits" / "bundle" / "bundle.json"
pytestmark = pytest.mark.skipif(not BUNDLED.is_file(), reason="the bundled digits bundle has not been exported")

SOLVERS = ["euler", "ba", "ab2", "unipc"]  # euler gives no estimate; the other three do
NFES = [4, 6]
N, SEED, REF_STEPS = 12, 5, 16
KW = dict(reference=f"rk4:{REF_STEPS}", progress=False, euler_ladder=[1, 2], self_check=False, seed=SEED)
# Tolerances, and why.
TOL = {
    # The same ONNX graphs on the same float32 inputs, solved again through the same runtime: bitwise
    # equal in practice; 1e-9 relative leaves room for a BLAS that reorders sums between calls.
    "rerun_rel": 1e-9,
    # The true error against this file's own float64 RK4 loop instead of the bench's: both are RK4 on the
    # same 16 uniform steps, differing only in round-off (float32 model inputs): ~1e-7 of an error ~1e-2.
    "true_rel": 1e-5,
    # Spearman from the CSV (17-digit floats, exact round trip) against scipy: round-off only.
    "rho": 1e-12,
}


def _ranks(v: np.ndarray) -> np.ndarray:
    """Mean ranks (ties share their mean), written here independently of anchorflow's helper."""
    v = np.asarray(v, np.float64)
    r = np.empty(len(v))
    for i, x in enumerate(v):
        r[i] = np.sum(v < x) + (np.sum(v == x) - 1) / 2.0
    return r


def _spearman(a, b) -> float:
    try:
        from scipy.stats import spearmanr
    except ImportError:
        ra, rb = _ranks(a), _ranks(b)
        return float(np.corrcoef(ra, rb)[0, 1])
    return float(spearmanr(a, b).statistic)


@pytest.fixture(scope="module")
def digits():
    from anchorflow.modelref import open_model

    return open_model("default", backend="ort-cpu")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The bench through its CLI (the same open_model path and settings as ``KW``)."""
    from anchorflow.cli import main

    out = tmp_path_factory.mktemp("calib")
    main(["bench", "default", "--solvers", ",".join(SOLVERS), "--nfe", ",".join(map(str, NFES)), "--n", str(N),
          "--seed", str(SEED), "--reference", KW["reference"], "--no-self-check", "--euler-ladder", "1,2",
          "--backend", "ort-cpu", "--out", str(out), "--quiet"])
    return out, json.loads((out / "results.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in JSON"))


def _rk4(model, noise, y, steps):
    """Float64 classic RK4 from t = 1 to t = 0 on ``steps`` uniform steps (the model sees float32)."""
    def v(x, t):
        return np.asarray(model.velocity(x.astype(np.float32), np.full(len(x), t, np.float32), {"y": y}), np.float64)

    x, ts = noise.astype(np.float64), np.linspace(1.0, 0.0, steps + 1)
    for t0, t1 in zip(ts[:-1], ts[1:]):
        h = t1 - t0
        k1 = v(x, t0)
        k2 = v(x + h / 2 * k1, t0 + h / 2)
        k3 = v(x + h / 2 * k2, t0 + h / 2)
        k4 = v(x + h * k3, t1)
        x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return x


def _by_run(rows):
    out = {}
    for r in rows:
        out.setdefault((r["solver"], r["nfe_requested"], r["cfg"]), []).append(r)
    return {k: sorted(v, key=lambda r: r["sample"]) for k, v in out.items()}


def check_against_independent(out: Path, model) -> int:
    """Every run's CSV columns against a re-solve (estimate) and an independent reference (true
    error); the recorded Spearman / median ratio against scipy on the CSV. Returns the runs checked."""
    from anchorflow.runtime.plan import plan

    res = json.loads((out / "results.json").read_text())
    rows = _by_run(calibration.read_csv(out / "calibration.csv"))
    noise, y = bench.make_inputs((1, 8, 8), 10, N, SEED)
    ref = _rk4(model, noise, y, REF_STEPS)
    checked = 0
    for r in res["runs"]:
        key = (r["solver"], r["nfe_requested"], r["cfg"])
        if "error_estimate" not in r:
            assert key not in rows
            continue
        est = np.array([q["estimate"] for q in rows[key]])
        true = np.array([q["true_error"] for q in rows[key]])
        assert [q["sample"] for q in rows[key]] == list(range(N))
        again = plan(model, solver=r["solver"], nfe=r["nfe_requested"], grid="uniform", noise=noise, labels=y,
                     tuning=None).run()
        np.testing.assert_allclose(est, again.error_estimate, rtol=TOL["rerun_rel"], atol=0)
        want = np.sqrt(np.mean((again.x.astype(np.float64) - ref).reshape(N, -1) ** 2, axis=1))
        np.testing.assert_allclose(true, want, rtol=TOL["true_rel"], atol=0)
        c = r["error_estimate"]
        assert c["spearman"] == pytest.approx(_spearman(est, true), abs=TOL["rho"])
        assert c["median_ratio"] == pytest.approx(float(np.median(est / true)), rel=1e-12)
        assert c["samples"] == N and c["mean_true_error"] == pytest.approx(true.mean(), rel=1e-12)
        checked += 1
    return checked


def test_recorded_numbers_match_an_independent_recomputation(run, digits):
    out, res = run
    assert check_against_independent(out, digits) == 3 * len(NFES)  # ba, ab2, unipc at every NFE
    # the estimate is informative on digits: BA ranks the samples (measured 0.66-0.93 at n = 32)
    pooled = {p["solver"]: p["spearman"] for p in res["calibration"]["pooled"]}
    assert pooled["ba"] > 0.5, pooled


def test_a_mutant_pairing_with_the_wrong_run_fails_the_check(digits, tmp_path, monkeypatch):
    """The check above is not vacuous: pair each estimate with the previous run's true errors (the
    same samples one NFE apart, strongly correlated) and it fails."""
    real, last = calibration.per_sample_rmse, []

    def previous_runs_error(x, ref):
        now = real(x, ref)
        last.append(now)
        return last[-2] if len(last) > 1 else now

    monkeypatch.setattr(calibration, "per_sample_rmse", previous_runs_error)
    bench.run_bench(digits, ["ba"], NFES, N, [1.0], out=tmp_path, **KW)
    with pytest.raises(AssertionError):
        check_against_independent(tmp_path, digits)


def test_report_table_and_solver_without_estimate(run):
    out, res = run
    cal = res["calibration"]
    assert cal["with_estimate"] == ["ba", "ab2", "unipc"] and cal["without_estimate"] == ["euler"]
    assert not any("error_estimate" in r for r in res["runs"] if r["solver"] == "euler")
    assert all("error_estimate" in r for r in res["runs"] if r["solver"] != "euler")
    assert {q["solver"] for q in calibration.read_csv(out / "calibration.csv")} == {"ba", "ab2", "unipc"}
    report = (out / "report.md").read_text()
    section = report.split("### Error estimate vs true error")[1].split("###")[0]
    table = [line for line in section.splitlines() if line.startswith("| ") and "solver" not in line]
    assert [line.split("|")[1].strip() for line in table] == ["ba", "ab2", "unipc"]  # no euler row
    by = {(r["solver"], r["nfe_requested"]): r["error_estimate"] for r in res["runs"] if "error_estimate" in r}
    for line in table:
        cells = [c.strip() for c in line.split("|")[2:-1]]
        name = line.split("|")[1].strip()
        for k, c in zip(NFES, cells):
            assert c == f"{by[(name, k)]['spearman']:.2f} / {by[(name, k)]['median_ratio']:.2g}"
    assert "No error estimate (not in the table or the figure): euler." in section


def test_calibration_png(run):
    out, res = run
    png = out / "calibration.png"
    assert res["files"]["calibration"] == "calibration.png" and res["files"]["calibration_csv"] == "calibration.csv"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    with Image.open(png) as im:
        assert im.format == "PNG" and im.size[0] > 3 * im.size[1]  # three solver panels side by side
    assert not list(out.glob(".*tmp*"))  # written atomically: no temporary left behind


def test_without_matplotlib_or_without_estimates(digits, tmp_path, monkeypatch):
    from anchorflow.base import _deps

    real = _deps.available
    monkeypatch.setattr(_deps, "available", lambda m: False if m.startswith("matplotlib") else real(m))
    res = bench.run_bench(digits, ["ab2"], [4], 4, [1.0], out=tmp_path / "a", **KW)
    assert res["files"]["calibration"].startswith("skipped: matplotlib is not installed")
    assert not (tmp_path / "a" / "calibration.png").exists() and (tmp_path / "a" / "calibration.csv").is_file()
    monkeypatch.undo()
    res = bench.run_bench(digits, ["euler"], [4], 4, [1.0], out=tmp_path / "b", **KW)
    assert res["files"]["calibration"] == "skipped: no solver of this run gives an error estimate"
    assert res["calibration"]["without_estimate"] == ["euler"] and not res["calibration"]["with_estimate"]
    assert not (tmp_path / "b" / "calibration.png").exists() and not (tmp_path / "b" / "calibration.csv").exists()
    assert "No error estimate (not in the table or the figure): euler." in (tmp_path / "b" / "report.md").read_text()


def test_summarize_edge_cases():
    s = calibration.summarize(np.array([0.0, 0.2, 0.1]), np.array([0.0, 0.4, 0.1]))
    assert s["median_ratio"] == pytest.approx(0.75)  # the exact sample (true error 0) is left out
    assert s["spearman"] == pytest.approx(1.0)
    one = calibration.summarize(np.array([0.3]), np.array([0.1]))
    assert one["spearman"] is None and one["median_ratio"] == pytest.approx(3.0)
    flat = calibration.summarize(np.zeros(4), np.zeros(4))
    assert flat["spearman"] is None and flat["median_ratio"] is None
    json.dumps(flat, allow_nan=False)
    nan = calibration.summarize(np.array([np.nan, 0.1, 0.2, 0.3]), np.array([0.5, 0.1, 0.3, 0.2]))
    assert nan["nonfinite"] == 1 and nan["samples"] == 3 and nan["spearman"] == pytest.approx(0.5)
    json.dumps(nan, allow_nan=False)


def test_a_coarse_reference_is_flagged(digits, tmp_path):
    """rk4:4 (its own error, by Richardson, ~7e-3 on digits) is too coarse to judge an NFE-12 solve
    (true error ~5e-2, under 10x that) but fine for NFE 2 (~0.26): only the first is flagged."""
    res = bench.run_bench(digits, ["ipndm"], [2, 12], 4, [1.0], out=tmp_path, reference="rk4:4", progress=False,
                          euler_ladder=[1], seed=SEED)
    floor = res["references"][0]["reference_error"]["rmse_estimate"]
    mean = {r["nfe_requested"]: r["error_estimate"]["mean_true_error"] for r in res["runs"]}
    assert mean[12] < calibration.FLOOR_FACTOR * floor < mean[2]
    caution = [line for line in (tmp_path / "report.md").read_text().splitlines() if line.startswith("Caution")]
    assert len(caution) == 1 and caution[0].startswith("Caution: the true error of ipndm@12 is under 10x")
