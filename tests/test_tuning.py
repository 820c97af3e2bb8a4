"""`anchorflow tune`: the grid search, and tuned grids stored, hashed and used (t = 1 noise, t = 0 data)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from anchorflow.cli import main
from anchorflow.base.errors import CheckpointError
from anchorflow.modelref import BUNDLED
from anchorflow.runtime.solving.grids import make_grid, warped
from anchorflow.runtime.bundles.tuned_grids import read_tuning
from anchorflow.tuning import coordinate_descent
from test_export import tiny_bundle, tiny_root  # noqa: F401  (session fixtures, exported once)

BUNDLE = BUNDLED / "digits" / "bundle"


def test_coordinate_descent_finds_the_maximum_of_a_quadratic():
    """-(a - 0.7)^2 - 2 (b + 0.3)^2 peaks at (0.7, -0.3); steps halve from 0.5 down to < 0.06, so the
    search ends within one final step (0.0625) of the peak on each axis."""
    (a, b), best, evals = coordinate_descent(lambda a, b: -(a - 0.7) ** 2 - 2 * (b + 0.3) ** 2, max_evals=200)
    assert abs(a - 0.7) <= 0.0625 and abs(b + 0.3) <= 0.0625 and evals < 200
    assert best == pytest.approx(-(a - 0.7) ** 2 - 2 * (b + 0.3) ** 2)


def test_warp_grid_family():
    np.testing.assert_allclose(warped(5, 1.0, 1.0), np.linspace(1, 0, 6), atol=1e-15)  # (1, 1) is uniform
    np.testing.assert_allclose(make_grid(5, "warp:0.4,1"), make_grid(5, "shift:0.4"), atol=1e-15)
    g = make_grid(6, "warp:0.5,1.5")
    assert g[0] == 1.0 and g[-1] == 0.0 and np.all(np.diff(g) < 0)


@pytest.fixture(scope="module")
def tuned_bundle(tmp_path_factory):
    if not (BUNDLE / "bundle.json").is_file():
        pytest.skip("the bundled digits bundle has not been exported yet")
    folder = tmp_path_factory.mktemp("tuned") / "bundle"
    shutil.copytree(BUNDLE, folder, ignore=shutil.ignore_patterns("tuned.json", "first_call.npy"))
    meta = json.loads((folder / "bundle.json").read_text())
    meta.pop("tuned", None)
    (folder / "bundle.json").write_text(json.dumps(meta))
    main(["tune", str(folder), "--solvers", "euler,ba", "--nfe", "3", "--samples", "2", "--max-evals", "3",
          "--reference-steps", "4", "--backend", "ort-cpu", "--quiet"])
    return folder


def test_tuned_grids_are_stored_and_hashed(tuned_bundle):
    entry = json.loads((tuned_bundle / "bundle.json").read_text())["tuned"]
    from anchorflow.runtime.bundles.format import file_sha256

    for key, name in (("grids", "tuned.json"), ("first_call", "first_call.npy")):
        assert entry[key]["file"] == name and entry[key]["sha256"] == file_sha256(tuned_bundle / name)
    tuning = read_tuning(tuned_bundle)
    assert set(tuning.grids) == {"euler@3", "euler@3+cached", "ba@3", "ba@3+cached"}
    assert tuning.first_call is not None and tuning.first_call.means.shape == (11, 1, 8, 8)
    g = tuning.grid_for("ba", 3, "cached")
    assert len(g.times) == 5 and g.times[0] == 1.0 and g.times[-1] == 0.0  # 3 calls, 4 intervals
    assert g.psnr >= g.uniform_psnr  # the search starts at uniform and only accepts gains


def test_sample_uses_the_tuned_grid_and_says_so(tuned_bundle, tmp_path, capsys):
    main(["sample", str(tuned_bundle), "--solver", "ba", "--nfe", "3", "--n", "2", "--first-call", "cached",
          "--backend", "ort-cpu", "--out", str(tmp_path / "s.png"), "--npy", str(tmp_path / "s.npy")])
    err = capsys.readouterr().err
    spec = read_tuning(tuned_bundle).grid_for("ba", 3, "cached").spec
    assert f"grid: tuned {spec} for ba@3+cached" in err
    main(["sample", str(tuned_bundle), "--solver", "ba", "--nfe", "3", "--n", "2", "--first-call", "cached",
          "--grid", "uniform", "--backend", "ort-cpu", "--out", str(tmp_path / "t.png"), "--npy", str(tmp_path / "t.npy")])
    assert "grid: tuned" not in capsys.readouterr().err  # an explicit --grid wins
    if spec != "warp:1,1":  # the search moved off uniform: the tuned samples differ from the uniform ones
        assert np.abs(np.load(tmp_path / "s.npy") - np.load(tmp_path / "t.npy")).max() > 1e-4


def test_a_modified_tuning_file_is_refused(tuned_bundle, tmp_path):
    folder = tmp_path / "b"
    shutil.copytree(tuned_bundle, folder)
    data = json.loads((folder / "tuned.json").read_text())
    data["grids"]["ba@3"]["times"][1] = 0.5
    (folder / "tuned.json").write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="does not match the sha256"):
        read_tuning(folder)


def test_tuning_the_bundled_model_in_place_is_refused(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["tune", "default"])
    assert exc.value.code == 1 and "read-only" in capsys.readouterr().err


# -- a re-export keeps the tuned grids of the same weights -------------------------------------------
@pytest.fixture
def tuned_root(tiny_root, tiny_bundle, tmp_path):  # noqa: F811
    """A copy of the tiny exported model root, tuned (euler and ba at 3 calls; seconds)."""
    root = tmp_path / "root"
    for part in ("backbone", "sidenet", "bundle"):
        shutil.copytree(tiny_root / part, root / part)
    main(["tune", str(root / "bundle"), "--solvers", "euler,ba", "--nfe", "3", "--samples", "2", "--max-evals", "2",
          "--reference-steps", "4", "--backend", "ort-cpu", "--quiet"])
    return root


def test_export_keeps_the_tuned_grids_of_the_same_weights_and_drops_stale_ones(tuned_root, tmp_path, capsys):
    from anchorflow.export.bundle import export_bundle
    from _bundles import train_further

    before = read_tuning(tuned_root / "bundle")
    assert before is not None and set(before.grids) == {"euler@3", "ba@3"}  # random weights: no t = 1 table
    # to a new folder: the grids come from the model root's own bundle (the bundle being replaced,
    # when there is one at --out, is looked at first; both by runtime.tuned.carried_tuning)
    res = export_bundle(tuned_root, tmp_path / "elsewhere", precisions=["fp32"], validate=False, progress=False)
    after = read_tuning(res.path)  # hash-checked against the new bundle.json
    assert after is not None and set(after.grids) == set(before.grids) and "kept the tuned grids" in res.notes[0]
    for key, grid in before.grids.items():
        assert after.grids[key].times == grid.times
    assert after.first_call is None and after.first_call_refused == before.first_call_refused
    assert res.meta["tuned"] == json.loads((res.path / "bundle.json").read_text())["tuned"]
    train_further(tuned_root / "sidenet")  # new SideNet weights: BA's grids were tuned for the old ones
    main(["export", str(tuned_root), "--precision", "fp32", "--no-validate"])  # in place, through the CLI
    err = capsys.readouterr().err
    assert "tuned grids of" in err and "not kept" in err and "anchorflow tune" in err
    assert read_tuning(tuned_root / "bundle") is None
