"""onnxruntime backends of the runtime (runtime/bundles/backends.py), on hand-built ONNX graphs.

Truth: closed forms. The graphs compute ``v = t * x + y`` and ``delta = h * t * (x - v) + y``
(y cast to float, broadcast per sample), so every output is known exactly in numpy; no torch.
Time convention: t = 1 noise, t = 0 data.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper  # noqa: E402

from anchorflow.base.errors import BackendError, ConfigError  # noqa: E402
from anchorflow.runtime.bundles.backends import (  # noqa: E402
    CPU, CUDA, TRT, BackendFallbackWarning, OrtSideNet, OrtVelocity, make_session, resolve_backend)

STATE = (1, 2, 2)
# float32 products and sums of O(1) values: a couple of roundings, 1e-6 is ~10 ulps at 1.
TOL = 1e-6


def _per_sample(name: str, out: str) -> list:
    """(B,) -> (B, 1, 1, 1) for broadcasting against the state."""
    axes = helper.make_tensor(f"{out}_axes", TensorProto.INT64, [3], [1, 2, 3])
    return [helper.make_node("Constant", [], [f"{out}_axes"], value=axes),
            helper.make_node("Unsqueeze", [name, f"{out}_axes"], [out])]


def _model(kind: str) -> onnx.ModelProto:
    state = lambda n: helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", *STATE])  # noqa: E731
    vec = lambda n, t=TensorProto.FLOAT: helper.make_tensor_value_info(n, t, ["batch"])  # noqa: E731
    nodes = [helper.make_node("Cast", ["y"], ["yf"], to=TensorProto.FLOAT), *_per_sample("yf", "y4"),
             *_per_sample("t", "t4")]
    if kind == "backbone":
        inputs, out = [state("x"), vec("t"), vec("y", TensorProto.INT64)], "v"
        nodes += [helper.make_node("Mul", ["t4", "x"], ["tx"]), helper.make_node("Add", ["tx", "y4"], ["v"])]
    else:
        inputs, out = [state("x"), state("v"), vec("t"), vec("h"), vec("y", TensorProto.INT64)], "delta"
        nodes += [*_per_sample("h", "h4"), helper.make_node("Sub", ["x", "v"], ["d"]),
                  helper.make_node("Mul", ["h4", "t4"], ["ht"]), helper.make_node("Mul", ["ht", "d"], ["hd"]),
                  helper.make_node("Add", ["hd", "y4"], ["delta"])]
    graph = helper.make_graph(nodes, kind, inputs, [state(out)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("graphs")
    out = {}
    for kind in ("backbone", "sidenet"):
        out[kind] = folder / f"{kind}.onnx"
        onnx.save(_model(kind), str(out[kind]))
    return out


def _inputs(b: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    x, v = (rng.standard_normal((b, *STATE)).astype(np.float32) for _ in range(2))
    t, h = rng.random(b).astype(np.float32), (rng.random(b) - 0.5).astype(np.float32)
    return x, v, t, h, rng.integers(0, 4, b)


@pytest.mark.parametrize("batch", [1, 7, 32])
def test_ort_velocity_and_sidenet_match_the_closed_form(files, batch):
    x, v, t, h, y = _inputs(batch)
    vel = OrtVelocity(make_session(files["backbone"], "ort-cpu"))
    side = OrtSideNet(make_session(files["sidenet"], "ort-cpu"))
    col = lambda a: a.reshape(-1, 1, 1, 1)  # noqa: E731
    c = {"y": y}
    assert np.abs(vel(x, t, c) - (col(t) * x + col(y))).max() <= TOL
    assert np.abs(side(x, v, t, h, c) - (col(h * t) * (x - v) + col(y))).max() <= TOL
    # float64 / int32 arguments are converted to the graph's dtypes
    assert np.abs(vel(x.astype(np.float64), t.astype(np.float64), {"y": y.astype(np.int32)}) - vel(x, t, c)).max() == 0


def test_missing_labels_use_the_null_label(files):
    x, _, t, _, _ = _inputs(3)
    sess = make_session(files["backbone"], "ort-cpu")
    assert np.array_equal(OrtVelocity(sess, null={"y": 10})(x, t, None), OrtVelocity(sess)(x, t, {"y": np.full(3, 10)}))
    with pytest.raises(ConfigError, match="needs the condition 'y' and this bundle has no null value.*y int64 .batch."):
        OrtVelocity(sess)(x, t, None)
    with pytest.raises(ConfigError, match=r"input 'y' got shape \(2,\), expected y int64 \(batch\) \(batch = 3 rows"):
        OrtVelocity(sess)(x, t, {"y": np.zeros(2, np.int64)})


def test_wrapper_refuses_the_wrong_network(files):
    with pytest.raises(BackendError, match="not a backbone"):
        OrtVelocity(make_session(files["sidenet"], "ort-cpu"))
    with pytest.raises(BackendError, match="not a SideNet"):
        OrtSideNet(make_session(files["backbone"], "ort-cpu"))


def test_cpu_and_auto_report_the_real_provider(files):
    assert make_session(files["backbone"], "ort-cpu").get_providers() == [CPU]
    available = ort.get_available_providers()
    best = resolve_backend("auto")
    assert best == ("ort-trt" if TRT in available else "ort-cuda" if CUDA in available else "ort-cpu")
    got = make_session(files["backbone"], "auto").get_providers()
    assert got[0] in available and got[-1] == CPU


@pytest.mark.skipif(CUDA in ort.get_available_providers(), reason="needs an onnxruntime build without CUDA")
@pytest.mark.parametrize("backend", ["ort-cuda", "ort-trt"])
def test_gpu_backend_that_does_not_load_is_an_error_or_a_named_fallback(files, backend):
    with pytest.raises(BackendError, match=f"backend {backend} unavailable.*--allow-fallback"):
        make_session(files["backbone"], backend)
    with pytest.warns(BackendFallbackWarning, match=f"{backend} unavailable.*falling back to {CPU}"):
        sess = make_session(files["backbone"], backend, allow_fallback=True)
    assert sess.get_providers() == [CPU]


def test_unknown_backend_and_bad_threads(files):
    with pytest.raises(ConfigError, match="unknown onnxruntime backend 'cuda'.*ort-cpu"):
        make_session(files["backbone"], "cuda")
    with pytest.raises(ConfigError, match="threads must be a positive"):
        make_session(files["backbone"], "ort-cpu", threads=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert make_session(files["backbone"], "ort-cpu", threads=1).get_providers() == [CPU]


def test_a_graph_onnxruntime_cannot_run_is_a_backend_error(tmp_path):
    # onnxruntime's CPU provider has no bf16 Mul kernel; the error must say so, not crash later.
    pytest.importorskip("onnx.reference")
    from anchorflow.export.precision import to_low

    path = tmp_path / "bf16.onnx"
    onnx.save(to_low(_model("backbone"), "bf16"), str(path))
    try:
        make_session(path, "ort-cpu")
    except BackendError as exc:
        assert "onnxruntime cannot run bf16.onnx on ort-cpu" in str(exc)
    else:  # a future onnxruntime with bf16 CPU kernels: then it must compute the right thing
        x, _, t, _, y = _inputs(2)
        v = OrtVelocity(make_session(path, "ort-cpu"))(x, t, y)
        assert np.abs(v - (t.reshape(-1, 1, 1, 1) * x + y.reshape(-1, 1, 1, 1))).max() <= 2**-7 * 4
