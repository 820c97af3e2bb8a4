"""Issue 24 item: `export SOURCE --sidenet CKPT --precision fp32,fp16` exports an fp16 SideNet too,
so `sample --solver ba --precision fp16` runs (before: the bundle had backbone.fp16.onnx only and
sample failed, advising the export that had just run)."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("diffusers")

from test_train_sidenet_adapters import _conds, _run_cli, _tiny  # noqa: E402

pytestmark = pytest.mark.slow  # ~50 s: trains and exports a tiny SD3 SideNet through the CLI


@pytest.fixture(scope="module")
def sd3_fp16_bundle(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sd3fp16")
    mp = pytest.MonkeyPatch()
    try:
        _tiny("sd3", tmp / "sd3")
        _conds(tmp / "cond.npz", 2, 0)
        _conds(tmp / "null.npz", 1, 1)
        _run_cli(["train", "sidenet", "--backbone", str(tmp / "sd3"), "--out", str(tmp / "side"), "--data", "none",
                  "--cond", str(tmp / "cond.npz"), "--null-cond", str(tmp / "null.npz"), "--iters", "2", "--batch", "4",
                  "--chain", "2", "--width", "8", "--lr", "1e-2", "--start-states", "4", "--solve-steps", "2",
                  "--cache-dir", str(tmp / "cache")], mp)
        _run_cli(["export", str(tmp / "sd3"), "--sidenet", str(tmp / "side"), "--out", str(tmp / "bundle"),
                  "--precision", "fp32,fp16", "--max-batch", "2"], mp)
    finally:
        mp.undo()
    return tmp


def test_sidenet_fp16_variant_is_exported_and_checked(sd3_fp16_bundle):
    meta = json.loads((sd3_fp16_bundle / "bundle" / "bundle.json").read_text())
    side = meta["networks"]["sidenet"]["precisions"]
    assert set(side) == {"fp16"} and side["fp16"]["file"] == "sidenet.fp16.onnx"
    assert side["fp16"]["validation"]["passed"] and side["fp16"]["validation"]["tolerance"]["atol"] == 2.0**-11  # fp16 row
    import onnx

    graph = onnx.load(str(sd3_fp16_bundle / "bundle" / "sidenet.fp16.onnx")).graph
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in graph.initializer)  # really fp16 weights


def test_sample_ba_fp16_runs_and_matches_fp32(sd3_fp16_bundle, monkeypatch, tmp_path):
    out = {}
    for p in ("fp32", "fp16"):
        out[p] = tmp_path / f"{p}.npy"
        _run_cli(["sample", str(sd3_fp16_bundle / "bundle"), "--solver", "ba", "--nfe", "4", "--n", "2",
                  "--precision", p, "--backend", "ort-cpu", "--cond", str(sd3_fp16_bundle / "cond.npz"),
                  "--npy", str(out[p])], monkeypatch)  # latents without a VAE: no --out (issue 23)
    a, b = np.load(out["fp32"]), np.load(out["fp16"])
    assert np.isfinite(b).all()
    # fp16 rounding (unit roundoff 4.9e-4) over 4 BA steps of O(1) states: well under 1e-2, while a
    # wrong SideNet (none, or the fp32 one fed fp16 tensors) would not change the outcome this way
    assert 0 < np.abs(a - b).max() < 2e-2
