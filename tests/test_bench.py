"""The benchmark harness end to end on closed-form Gaussian-mixture stand-in models, and its CLI errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from anchorflow import bench
from anchorflow.cli import main
from anchorflow.runtime import solve
from anchorflow.runtime.evaluation.analytic import ExactSideNet, GaussianMixture, exact_flow
from anchorflow.runtime.evaluation.metrics import psnr

# Tolerances, and why.
TOL = {
    # RK4-512 on these mixtures: global error ~(1/512)^4 * C ~ 1e-9 plus float32 velocity round-off.
    "rk4_ref_rmse": 1e-6,
    # Dormand-Prince at rtol = atol = 1e-6 per step: a few 1e-6 globally on these fields.
    "dopri5_ref_rmse": 2e-5,
    # PSNR recomputed outside the harness against exact_flow instead of the harness's RK4-512
    # reference: the two references differ by < 1e-6, Euler errors are ~1e-2, so < 1e-3 dB.
    "psnr_db": 1e-3,
}


def _model(gm: GaussianMixture, name: str, data_range, sidenet=None, classifier=None, sampler=True):
    meta = dict(name=name, state_shape=gm.state_shape, num_classes=gm.num_classes, null_label=gm.null_label,
                data_range=list(data_range), model_id=f"{name}-test")
    if sampler:
        meta["sampler"] = lambda n, y, seed: gm.sample(n, np.random.default_rng(seed), y)
    return SimpleNamespace(velocity=gm.velocity, sidenet=sidenet, meta=meta, providers=["numpy"], classifier=classifier)


@pytest.fixture(scope="module")
def gmm2d():
    return GaussianMixture.random((2,), 6, classes=3, seed=0)


@pytest.fixture(scope="module")
def points_run(gmm2d, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_points")
    res = bench.run_bench(_model(gmm2d, "gmm2d", (-4, 4)), ["euler", "heun", "rk4", "ba"], [1, 2, 3, 4, 5, 8, 9], 24,
                          [1.0, 2.0], seed=3, out=out, progress=False)
    return out, res


def test_files_and_fields(points_run):
    out, res = points_run
    for f in ("results.json", "report.md", "quality_vs_nfe.png", "samples_cfg1.png", "samples_cfg2.png"):
        assert (out / f).is_file(), f
    on_disk = json.loads((out / "results.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
    assert on_disk["schema"] == bench.SCHEMA
    for key in ("platform", "cpu_count", "numpy", "onnxruntime", "providers"):
        assert key in on_disk["machine"]
    assert on_disk["settings"]["seed"] == 3 and on_disk["settings"]["command"]
    assert {r["cfg"] for r in on_disk["references"]} == {1.0, 2.0}
    assert len(on_disk["runs"]) == 4 * 7 * 2  # every (solver, nfe, cfg), skipped ones included
    done = [r for r in on_disk["runs"] if "skipped" not in r]
    for r in done:
        assert {"psnr", "rmse", "nfe", "sidenet_calls", "timing", "swd", "euler_nfe_to_match"} <= set(r)
        assert r["nfe"] == r["nfe_requested"]  # counted by the runtime: classic solvers spend exactly the budget
        assert "x" not in r
    report = (out / "report.md").read_text()
    assert "PSNR (dB) against the reference" in report and "Euler NFE needed to match" in report


def test_skips_are_recorded_with_reasons(points_run):
    _, res = points_run
    skipped = {(r["solver"], r["nfe_requested"]): r["skipped"]
               for r in res["runs"] if "skipped" in r and r["cfg"] == 1.0}
    expected = {*(("heun", k) for k in (1, 2, 4, 8)), *(("rk4", k) for k in (1, 2, 3, 5, 9)),
                *(("ba", k) for k in (1, 2, 3, 4, 5, 8, 9))}
    assert set(skipped) == expected
    assert "must be one of 3, 5, 7" in skipped[("heun", 4)]  # 2N - 1 calls: Euler last step
    assert "needs nfe >= 4" in skipped[("rk4", 2)]
    assert "needs a SideNet" in skipped[("ba", 4)]


def test_reference_is_accurate(points_run, gmm2d):
    _, res = points_run
    for ref in res["references"]:
        assert ref["nfe"] == 4 * 512
        assert ref["self_check"]["rmse"] < TOL["rk4_ref_rmse"]


def test_psnr_grows_with_nfe_and_matches_an_independent_computation(points_run, gmm2d):
    _, res = points_run
    eul = {r["nfe"]: r["psnr"] for r in res["runs"] if r["solver"] == "euler" and r["cfg"] == 1.0}
    values = [eul[k] for k in sorted(eul)]
    assert all(b > a for a, b in zip(values, values[1:])), eul
    noise, y = bench.make_inputs((2,), 3, 24, 3)
    truth = exact_flow(gmm2d.velocity, noise.astype(np.float64), cond={"y": y})
    x8 = solve("euler", gmm2d.velocity, noise, 8, y=y).x
    assert eul[8] == pytest.approx(psnr(x8, truth, (-4, 4)), abs=TOL["psnr_db"])


def test_order_and_euler_match(points_run):
    _, res = points_run
    order = {(o["solver"], o["cfg"]): o for o in res["orders"]}
    assert order[("euler", 1.0)]["empirical"] == pytest.approx(1.0, abs=0.25)  # Euler is first order
    assert order[("heun", 1.0)]["empirical"] > 1.5
    assert order[("ba", 1.0)]["empirical"] is None  # never ran
    for r in res["runs"]:
        if r["solver"] == "euler":  # Euler's own PSNR is reached by Euler at the same NFE (a ladder rung)
            assert r["euler_nfe_to_match"]["nfe"] == pytest.approx(r["nfe"], rel=1e-9)
        if r["solver"] == "heun" and r["nfe_requested"] == 9:  # second order beats first order on a smooth field
            assert r["euler_nfe_to_match"]["nfe"] is None or r["euler_nfe_to_match"]["nfe"] > 16


def test_euler_nfe_to_match_interpolates_in_log_nfe():
    ladder = [(k, 20 * np.log10(k)) for k in (1, 2, 4, 8, 16)]  # PSNR exactly linear in log NFE
    m = bench.euler_nfe_to_match(ladder, 20 * np.log10(6.0))
    assert m["nfe"] == pytest.approx(6.0, rel=1e-12) and m["bracket"] == [4, 8]
    assert bench.euler_nfe_to_match(ladder, 99.0) == {"nfe": None, "bracket": [16, None]}
    assert bench.euler_nfe_to_match(ladder, -5.0) == {"nfe": 1.0, "bracket": [None, 1]}
    assert bench.euler_nfe_to_match(ladder, ladder[2][1]) == {"nfe": 4.0, "bracket": [4, 4]}  # a rung exactly


def test_dopri5_reference_against_exact_flow(gmm2d):
    model = _model(gmm2d, "gmm2d", (-4, 4), sampler=False)
    noise, y = bench.make_inputs((2,), 3, 16, 0)
    x, info = bench.reference_solution(model, noise, y, 1.0, (0.0, 1.0), "dopri5")
    err = np.sqrt(np.mean((x - exact_flow(gmm2d.velocity, noise.astype(np.float64), cond={"y": y})) ** 2))
    assert err < TOL["dopri5_ref_rmse"]
    assert info["nfe"] < 4 * 512  # adaptive: far fewer calls than RK4-512
    assert info["self_check"]["rmse"] > err  # the looser-tolerance check bounds the true error


def test_sidenet_solver_runs_and_is_timed(gmm2d, tmp_path):
    # the ideal SideNet (exact flow) makes BA far better than Euler at the same NFE
    model = _model(gmm2d, "gmm2d", (-4, 4), sidenet=ExactSideNet(gmm2d.velocity, steps=20), sampler=False)
    res = bench.run_bench(model, ["euler", "ba"], [4], 8, [1.0], out=tmp_path, progress=False, reference="rk4:64")
    ba, eu = (next(r for r in res["runs"] if r["solver"] == s) for s in ("ba", "euler"))
    assert ba["nfe"] == 4 and ba["sidenet_calls"] > 0 and ba["timing"]["sidenet_ms"] > 0
    assert eu["sidenet_calls"] == 0 and eu["timing"]["sidenet_ms"] == 0
    assert ba["psnr"] > eu["psnr"] + 10


def _classifier(folder: Path, gm: GaussianMixture) -> Path:
    """A real ONNX classifier: features = the flattened image, logits = nearest class mean."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    d = gm.means.shape[1]
    mus = np.stack([gm.means[gm.classes == c].mean(0) for c in range(gm.num_classes)]).astype(np.float32)
    nodes = [helper.make_node("Flatten", ["x"], ["features"]),
             helper.make_node("MatMul", ["features", "w"], ["score"]),
             helper.make_node("Add", ["score", "b"], ["logits"])]
    inits = [numpy_helper.from_array(mus.T.copy(), "w"), numpy_helper.from_array(-0.5 * (mus**2).sum(1), "b")]
    graph = helper.make_graph(nodes, "cls", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 1, 4, 4])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", gm.num_classes]),
                               helper.make_tensor_value_info("features", TensorProto.FLOAT, ["n", d])], inits)
    folder.mkdir()
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)  # ORT-loadable
    onnx.save(model, folder / "classifier.onnx")
    real = gm.sample(2000, np.random.default_rng(9)).reshape(2000, -1)
    np.savez(folder / "real_stats.npz", mu=real.mean(0), sigma=np.cov(real.T), n=2000)
    return folder


def test_image_model_with_classifier(tmp_path):
    gm = GaussianMixture(3.0 * np.eye(2, 16).reshape(2, 1, 4, 4) - 1.5, 0.3, classes=[0, 1])
    model = _model(gm, "gmm-img", (-2.5, 2.5), classifier=_classifier(tmp_path / "cls", gm), sampler=False)
    res = bench.run_bench(model, ["euler", "heun"], [1, 2, 4], 64, [1.0], out=tmp_path / "out", progress=False,
                          reference="rk4:64")
    ref = res["references"][0]
    eu1 = next(r for r in res["runs"] if r["solver"] == "euler" and r["nfe"] == 1)
    assert ref["accuracy"] >= 0.95  # two well separated classes
    # One Euler step from t = 1 lands exactly on the class means (v(x, 1) = x - E[x0 | y]): the
    # within-class covariance 0.3^2 I is missing in the 15 directions orthogonal to the mean
    # difference, so FD -> 15 * (0.3 - 0)^2 = 1.35; the real statistics come from 2000 samples
    # (entry noise ~ 0.09 sqrt(2/2000) ~ 3e-3), 0.1 covers it. The reference is near 0.
    assert eu1["fd"] == pytest.approx(15 * 0.3**2, abs=0.1)
    assert ref["fd"] < 0.5 * eu1["fd"]
    png = tmp_path / "out" / res["files"]["samples"]["euler nfe=4 cfg=1"]  # NFE closest to GRID_NFE = 8
    from PIL import Image

    with Image.open(png) as im:  # 4x4 tiles upscaled 8x to 32 px, 2 per row (classes), 8 rows, 1 px gaps
        assert im.size == (2 * 33 + 1, 8 * 33 + 1)


def test_save_grid_without_matplotlib_and_bench_without_torch(tmp_path):
    code = (
        "import sys, numpy as np; sys.modules['matplotlib'] = None\n"
        "from anchorflow.plots import save_grid\n"
        "imgs = np.stack([np.full((1, 2, 2), -1.0), np.full((1, 2, 2), 1.0), np.zeros((1, 2, 2))])\n"
        f"save_grid(imgs, {str(tmp_path / 'g.png')!r}, nrow=2, data_range=(-1, 1), upscale=3, pad=1)\n"
        "assert 'matplotlib' not in sys.modules or sys.modules['matplotlib'] is None\n"
        "import anchorflow.bench, anchorflow.commands.bench\n"
        "assert 'torch' not in sys.modules, 'the bench must stay torch-free'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    from PIL import Image

    a = np.asarray(Image.open(tmp_path / "g.png"))
    assert a.shape == (2 * 7 + 1, 2 * 7 + 1)  # 2 rows x 2 cols of 6 px tiles, 1 px gaps
    assert (a[1:7, 1:7] == 0).all() and (a[1:7, 8:14] == 255).all() and (a[8:14, 1:7] == 128).all()
    assert (a[8:14, 8:14] == 0).all() and (a[0] == 0).all()  # empty cell and padding stay black


@pytest.mark.parametrize("args, message", [
    (["--solvers", "euler,nope"], "unknown solver 'nope'; known solvers:"),
    (["--nfe", "4,0"], "--nfe must be positive"),
    (["--n", "0"], "must be a positive integer"),
    (["--reference", "rk4:7"], "bad reference"),
])
def test_cli_errors_are_one_line(args, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", "default", *args])
    assert exc.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err


def test_unconditional_model_refuses_guidance(tmp_path):
    gm = GaussianMixture.random((2,), 3, classes=0, seed=1)
    with pytest.raises(bench.ConfigError, match="unconditional"):
        bench.run_bench(_model(gm, "u", (-4, 4)), ["euler"], [2], 4, [1.5], out=tmp_path, progress=False)


BUNDLED = Path(bench.__file__).resolve().parents[1] / "bundled" / "digits" / "bundle" / "bundle.json"


@pytest.mark.skipif(not BUNDLED.is_file(), reason="the bundled digits bundle has not been exported yet")
def test_cli_on_the_bundled_model(tmp_path, capsys):
    main(["bench", "default", "--solvers", "euler,heun", "--nfe", "3", "--n", "10", "--reference", "rk4:8",
          "--backend", "ort-cpu", "--out", str(tmp_path), "--json", "--quiet"])
    captured = capsys.readouterr()
    res = json.loads(captured.out)
    assert (tmp_path / "report.md").is_file() and "wrote" in captured.err
    assert {r["solver"] for r in res["runs"]} == {"euler", "heun"}
    assert all("accuracy" in r and "fd" in r for r in res["runs"])  # the bundled classifier is used
    assert res["machine"]["providers"] == ["CPUExecutionProvider"]


def test_cli_end_to_end_on_a_checkpoint(tmp_path, capsys):
    """`anchorflow bench` on a tiny (random) torch MLP backbone checkpoint through open_model."""
    torch = pytest.importorskip("torch")
    from anchorflow.trainers.backbone import MLPBackbone
    from anchorflow.trainers.checkpoint import save_checkpoint

    torch.manual_seed(0)
    torch.set_num_threads(1)
    net = MLPBackbone((2,), num_classes=3, hidden=16, depth=1)
    torch.nn.init.normal_(net.out.weight, std=0.5)  # the zero-initialised output layer would give v = 0
    arch = {"type": "mlp", "state_shape": [2], "num_classes": 3, "hidden": 16, "depth": 1}
    save_checkpoint(tmp_path / "backbone", net, {"kind": "backbone", "arch": arch,
                                                 "data": {"name": "toy", "data_range": [-3.0, 3.0]}})
    main(["bench", str(tmp_path / "backbone"), "--backend", "torch", "--solvers", "euler,heun", "--nfe", "2,3,4",
          "--n", "6", "--cfg", "1.0,2.0", "--reference", "rk4:16", "--out", str(tmp_path / "out"), "--json", "--quiet"])
    captured = capsys.readouterr()
    res = json.loads(captured.out)
    assert res["model"]["name"] == "toy" and res["settings"]["cfg_scales"] == [1.0, 2.0]
    assert (tmp_path / "out" / "report.md").is_file() and "wrote" in captured.err
    heun4 = [r for r in res["runs"] if r["solver"] == "heun" and r["nfe_requested"] == 4]
    assert len(heun4) == 2 and all("must be one of 3, 5, 7" in r["skipped"] for r in heun4)
    assert all(r["psnr"] > 0 for r in res["runs"] if "skipped" not in r)
