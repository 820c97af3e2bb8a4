"""The sampling plan on exported bundles: a factory bundle with text conditions and ``data_range: null``
(latents), tune / bench / sample with --cond, tune's writer (merge under the lock, refusals write
nothing), and the tuned files' validation (``runtime.tuned.check_tuning``).
Time convention: t = 1 noise, t = 0 data.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from anchorflow.cli import cli, main
from anchorflow.base.errors import CheckpointError, ConfigError, StateFileError
from anchorflow.modelref import BUNDLED
from anchorflow.runtime import load_bundle
from anchorflow.runtime.bundles.format import file_sha256
from anchorflow.runtime.bundles.tuned_grids import check_tuning, read_tuning
from _bundles import snapshot

DIGITS = BUNDLED / "digits" / "bundle"
TESTS = Path(__file__).resolve().parent
TUNE_FAST = ["--nfe", "3", "--samples", "2", "--max-evals", "2", "--reference-steps", "4", "--first-call", "backbone",
             "--backend", "ort-cpu", "--quiet"]


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> dict:
    """A factory bundle exported by the real exporter (test_adapters:make_backbone: text (batch, L, 2),
    CFG rows without an inline null, data_range null) and its condition files."""
    root = tmp_path_factory.mktemp("toy")
    res = CliRunner().invoke(cli, ["export", "test_adapters:make_backbone", "--out", str(root / "bundle")])
    assert res.exit_code == 0, res.output
    rng = np.random.default_rng(3)
    np.savez(root / "cond.npz", text=rng.standard_normal((1, 3, 2)).astype(np.float32))
    np.savez(root / "null.npz", text=np.zeros((1, 3, 2), np.float32))
    return {"bundle": root / "bundle", "cond": root / "cond.npz", "null": root / "null.npz", "root": root}


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _conds(toy):
    return ({"text": np.load(toy["cond"])["text"]}, {"text": np.load(toy["null"])["text"]})


def test_guided_sample_on_text_conditions_equals_the_plan(toy, tmp_path):
    cond, null = _conds(toy)
    p = load_bundle(toy["bundle"], backend="ort-cpu").plan(solver="euler", nfe=4, cfg_scale=2.0, n=3, cond=cond,
                                                          null_cond=null)
    assert json.loads((toy["bundle"] / "bundle.json").read_text())["model"]["data_range"] is None
    main_args = ["sample", str(toy["bundle"]), "--solver", "euler", "--nfe", "4", "--cfg", "2", "--n", "3",
                 "--cond", str(toy["cond"]), "--null-cond", str(toy["null"]), "--backend", "ort-cpu",
                 "--npy", str(tmp_path / "s.npy")]  # latents without a VAE: --out is refused (issue 23)
    res = CliRunner().invoke(cli, main_args)
    assert res.exit_code == 0, res.output
    np.testing.assert_array_equal(p.run().x, np.load(tmp_path / "s.npy"))


@pytest.mark.parametrize("change, message", [
    (dict(cfg_scale=2.0, null_cond=None), "guidance needs a null value for text and this bundle has none; pass null_cond"),
    (dict(cond=None), "missing text"),
    (dict(cond={"text": np.full((1, 3, 2), np.nan, np.float32)}), "text holds NaN or Inf"),
    (dict(cond={"text": np.zeros((1, 9, 2), np.float32)}), "text has shape (1, 9, 2)"),
    (dict(labels=[1]), "this model has no class labels"),
    (dict(cfg_scale=2.0, cond=None, null_cond=None), "guidance (cfg_scale != 1) needs conditions"),
])
def test_text_condition_refusals(toy, change, message):
    cond, null = _conds(toy)
    kwargs = {**dict(solver="euler", nfe=4, n=2, cond=cond, null_cond=null), **change}
    with pytest.raises(ConfigError) as exc:
        load_bundle(toy["bundle"], backend="ort-cpu").plan(**kwargs)
    assert message in str(exc.value) and "\n" not in str(exc.value)


def test_tune_and_bench_take_held_out_conditions_on_latents(toy, tmp_path):
    bundle = _copy(toy["bundle"], tmp_path / "bundle")
    conds = ["--cond", str(toy["cond"]), "--null-cond", str(toy["null"])]
    res = CliRunner().invoke(cli, ["tune", str(bundle), "--solvers", "euler", "--cfg", "2", *conds, *TUNE_FAST])
    assert res.exit_code == 0, res.output
    tuning = check_tuning(bundle)
    assert set(tuning.grids) == {"euler@3"}
    held = tuning.settings["held_out"]
    assert held["cond"]["sha256"] == file_sha256(toy["cond"]) and held["null_cond"]["sha256"] == file_sha256(toy["null"])
    out = tmp_path / "bench"
    res = CliRunner().invoke(cli, ["bench", str(bundle), "--solvers", "euler,heun", "--nfe", "2,3", "--n", "4",
                                   "--cfg", "1.0,2.0", "--reference", "rk4:8", "--euler-ladder", "2,3", *conds,
                                   "--grids", "tuned", "--backend", "ort-cpu", "--out", str(out), "--quiet"])
    assert res.exit_code == 0, res.output
    runs = [r for r in json.loads((out / "results.json").read_text())["runs"] if "skipped" not in r]
    assert runs and all(np.isfinite(r["psnr"]) for r in runs)
    assert {r.get("grid", "uniform") for r in runs if r["solver"] == "euler" and r["nfe_requested"] == 3} != {"uniform"}


def test_bench_latents_psnr_uses_the_reference_span(toy, tmp_path):
    """data_range null: PSNR's peak is the reference's own (max - min), checked against the formula."""
    from anchorflow.bench.evaluate import Evaluator

    ref = np.random.default_rng(0).standard_normal((4, 2, 4, 4))
    x = ref + 0.01
    ev = Evaluator(None, None)
    ev.ref = ref
    span = ref.max() - ref.min()
    assert ev(x)["psnr"] == pytest.approx(20 * np.log10(span / 0.01), rel=1e-9)


def test_a_refused_tune_writes_nothing(tmp_path, capsys):
    bundle = _copy(DIGITS, tmp_path / "bundle")
    before = snapshot(bundle)
    for bad, message in ((["--solvers", "bogus"], "bogus"), (["--cfg", "0"], "--cfg must be finite and > 0"),
                         (["--cfg", "-1"], "--cfg must be finite and > 0"), (["--seed", "-1"], "--seed must be in 0.."),
                         (["--solvers", "ba", "--nfe", "0"], "--nfe"), (["--samples", "0"], "--samples")):
        with pytest.raises(SystemExit) as exc:
            main(["tune", str(bundle), *TUNE_FAST, *bad])
        err = capsys.readouterr().err.strip()
        assert exc.value.code == 1 and message in err and err.count("\n") == 0, (bad, err)
    assert snapshot(bundle) == before


def test_a_tune_keeps_the_grids_it_did_not_tune(tmp_path):
    bundle = _copy(DIGITS, tmp_path / "bundle")
    old = read_tuning(bundle)
    main_ok(["tune", str(bundle), "--solvers", "euler", *TUNE_FAST])
    new = check_tuning(bundle)
    assert set(new.grids) >= set(old.grids) and "euler@3" in new.grids
    assert all(new.grids[k] == g for k, g in old.grids.items() if k != "euler@3")
    np.testing.assert_array_equal(new.first_call.means, old.first_call.means)  # not re-measured: kept


def main_ok(args):
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output


def test_four_concurrent_tunes_keep_every_grid(toy, tmp_path):
    """Four processes tune one bundle at once (different solvers); every grid survives, and the bundle
    still opens (hashes consistent)."""
    bundle = _copy(toy["bundle"], tmp_path / "bundle")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    procs = [subprocess.Popen([sys.executable, "-m", "anchorflow", "tune", str(bundle), "--solvers", s, *TUNE_FAST,
                              "--cond", str(toy["cond"])],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for s in ("euler", "ab2", "unipc", "ipndm")]
    outs = [p.communicate(timeout=240) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-400:] for o in outs]
    assert set(check_tuning(bundle).grids) == {"euler@3", "ab2@3", "unipc@3", "ipndm@3"}
    assert not list(bundle.glob("*.tmp")) and load_bundle(bundle, backend="ort-cpu").plan(
        solver="ab2", nfe=3, cond=_conds(toy)[0]).tuned_spec


# -- the tuned files validated (one line, StateFileError), even with their sha256 updated -----------


def _tamper_grids(bundle: Path, edit) -> None:
    data = json.loads((bundle / "tuned.json").read_text())
    edit(data)
    (bundle / "tuned.json").write_text(json.dumps(data))
    _rehash(bundle, "grids", "tuned.json")


def _rehash(bundle: Path, key: str, name: str) -> None:
    meta = json.loads((bundle / "bundle.json").read_text())
    meta["tuned"][key].update(sha256=file_sha256(bundle / name), bytes=(bundle / name).stat().st_size)
    (bundle / "bundle.json").write_text(json.dumps(meta))


def _g(data):
    return data["grids"]["ba@7"]


TAMPERED = {
    "nan": lambda d: _g(d)["times"].__setitem__(2, float("nan")),
    "increasing": lambda d: _g(d)["times"].__setitem__(2, 0.99),
    "not from 1": lambda d: _g(d)["times"].__setitem__(0, 0.9),
    "string times": lambda d: _g(d).__setitem__("times", "1,0.5,0"),
    "string in times": lambda d: _g(d)["times"].__setitem__(1, "0.5"),
    "one point": lambda d: _g(d).__setitem__("times", [1.0]),
    "nested": lambda d: _g(d).__setitem__("times", [[1.0, 0.0]]),
    "wrong key": lambda d: d["grids"].__setitem__("ba@8", d["grids"].pop("ba@7")),
    "nan shift": lambda d: _g(d).__setitem__("shift", float("nan")),
    "bool nfe": lambda d: _g(d).__setitem__("nfe", True),
    "missing field": lambda d: _g(d).pop("power"),
    "grids a list": lambda d: d.__setitem__("grids", []),
    "other schema": lambda d: d.__setitem__("schema", "x/9"),
}


@pytest.fixture
def digits_copy(tmp_path):
    return _copy(DIGITS, tmp_path / "bundle")


@pytest.mark.parametrize("case", list(TAMPERED))
def test_a_damaged_tuned_json_is_one_line_with_its_hash_updated(digits_copy, tmp_path, capsys, case):
    _tamper_grids(digits_copy, TAMPERED[case])
    # trust's runtime/bundles/grid_check.py names grid faults CheckpointError, the first-call table StateFileError
    with pytest.raises((StateFileError, CheckpointError)) as exc:
        check_tuning(digits_copy)
    assert "tuned.json" in str(exc.value) and "\n" not in str(exc.value)
    with pytest.raises(SystemExit) as code:
        main(["sample", str(digits_copy), "--n", "2", "--backend", "ort-cpu", "--out", str(tmp_path / "s.png")])
    err = capsys.readouterr().err.strip()
    assert code.value.code == 1 and err.startswith("error: ") and err.count("\n") == 0


@pytest.mark.parametrize("table", ["pickle", "shape", "nan", "ints"])
def test_a_damaged_first_call_table_is_one_line(digits_copy, table):
    path = digits_copy / "first_call.npy"
    good = np.load(path)
    if table == "pickle":
        np.save(path, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    else:
        bad = {"shape": good[:3], "nan": np.full_like(good, np.nan), "ints": good.astype(np.int64)}[table]
        np.save(path, bad)
    _rehash(digits_copy, "first_call", "first_call.npy")
    # trust's runtime/bundles/grid_check.py names grid faults CheckpointError, the first-call table StateFileError
    with pytest.raises((StateFileError, CheckpointError)) as exc:
        check_tuning(digits_copy)
    assert "first_call.npy" in str(exc.value) and "\n" not in str(exc.value)


def test_plots_show_latents_on_their_own_range():
    from anchorflow.plots import to_uint8

    x = np.array([[[[-3.0, 1.0]]]])
    assert to_uint8(x, None).tolist() == [[[[0, 255]]]]
