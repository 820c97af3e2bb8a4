"""Named conditions through the service's core, on a hand-built bundle (schema /2) with a closed form.

The toy backbone's condition ``emb`` (batch, L, 3) gives c = mean_L(emb) @ A, reshaped to the
(1, 2, 2) state, and ``v(x, t, emb) = x - c``. In our time (t = 1 noise -> t = 0 data) the exact
flow is ``x(0) = c + (x(1) - c) / e``: the truth each request's rows are checked against, so
rows mixed up between merged requests cannot pass.
"""

from __future__ import annotations

import base64
import io
import json
import math

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from anchorflow.runtime.bundles.format import SCHEMA, file_sha256  # noqa: E402
from anchorflow.sampling import start_noise  # noqa: E402
from anchorflow.serve.request import RequestError  # noqa: E402

A = np.arange(12, dtype=np.float32).reshape(3, 4) / 10.0
# RK4 with 10 steps on dx/dt = x - c: local error ~ h^5 / 120 per step (h = 0.1), ~1e-7 over the
# path for |x| ~ 3; float32 arithmetic adds ~1e-6. 1e-5 separates right rows from any wrong row.
RK4_ATOL = 1e-5


def _graph() -> onnx.ModelProto:
    nodes = [
        helper.make_node("ReduceMean", ["emb", "ax1"], ["m"], keepdims=0),
        helper.make_node("MatMul", ["m", "A"], ["c4"]),
        helper.make_node("Reshape", ["c4", "shape"], ["c"]),
        helper.make_node("Sub", ["x", "c"], ["d"]),
        helper.make_node("Unsqueeze", ["t", "ax123"], ["t4"]),
        helper.make_node("Mul", ["t4", "zero"], ["t0"]),
        helper.make_node("Add", ["d", "t0"], ["v"]),
    ]
    inits = [numpy_helper.from_array(A, "A"), numpy_helper.from_array(np.array([1], np.int64), "ax1"),
             numpy_helper.from_array(np.array([-1, 1, 2, 2], np.int64), "shape"),
             numpy_helper.from_array(np.array([1, 2, 3], np.int64), "ax123"),
             numpy_helper.from_array(np.zeros((), np.float32), "zero")]
    g = helper.make_graph(nodes, "toy", [
        helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 1, 2, 2]),
        helper.make_tensor_value_info("t", TensorProto.FLOAT, ["batch"]),
        helper.make_tensor_value_info("emb", TensorProto.FLOAT, ["batch", "L", 3])],
        [helper.make_tensor_value_info("v", TensorProto.FLOAT, ["batch", 1, 2, 2])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    from anchorflow.serve.service import SamplerService

    folder = tmp_path_factory.mktemp("toy_bundle")
    onnx.save(_graph(), folder / "backbone.onnx")
    tensor = lambda name, shape, role: {"name": name, "dtype": "float32", "shape": shape, "role": role}  # noqa: E731
    meta = {"schema": SCHEMA, "model": {"name": "toy", "state_shape": [1, 2, 2], "data_range": [-3.0, 3.0]},
            "time": {"map": "identity"}, "guidance": {"mode": "rows", "null": {}},
            "networks": {"backbone": {
                "file": "backbone.onnx", "sha256": file_sha256(folder / "backbone.onnx"),
                "inputs": [tensor("x", ["batch", 1, 2, 2], "state"), tensor("t", ["batch"], "time"),
                           tensor("emb", ["batch", "L", 3], "condition")],
                "outputs": [tensor("v", ["batch", 1, 2, 2], "velocity")],
                "batch": {"min": 1, "opt": 8, "max": 16}, "axes": {"L": {"min": 1, "opt": 4, "max": 8}}}}}
    (folder / "bundle.json").write_text(json.dumps(meta))
    return SamplerService(str(folder), backend="ort-cpu", max_n=64)


def b64(a: np.ndarray) -> str:
    buf = io.BytesIO()
    np.save(buf, a)
    return base64.b64encode(buf.getvalue()).decode()


def body(**kw) -> bytes:
    kw = {"solver": "rk4", "nfe": 40, **kw}
    kw["conditions"] = {k: b64(v) for k, v in kw.get("conditions", {}).items()}
    if "null_conditions" in kw:
        kw["null_conditions"] = {k: b64(v) for k, v in kw["null_conditions"].items()}
    return json.dumps(kw).encode()


def exact(noise: np.ndarray, emb: np.ndarray) -> np.ndarray:
    c = (emb.astype(np.float64).mean(axis=1) @ A).reshape(-1, 1, 2, 2)
    return c + (noise - c) / math.e


def test_merged_requests_with_conditions_follow_the_closed_form(service):
    rng = np.random.default_rng(0)
    e1, e2, e3 = rng.normal(size=(3, 4, 3)), rng.normal(size=(1, 4, 3)), rng.normal(size=(2, 6, 3))
    reqs = [service.parse(body(n=3, seed=1, conditions={"emb": e1})),
            service.parse(body(n=2, seed=2, conditions={"emb": e2})),     # one row shared by both samples
            service.parse(body(n=2, seed=3, conditions={"emb": e3}))]     # L = 6: cannot share the solve
    assert reqs[0].key == reqs[1].key != reqs[2].key
    replies = service.sample_batch(reqs)
    assert [r.batch_requests for r in replies] == [2, 2, 1]
    for r, rep, e in zip(reqs, replies, (e1, np.repeat(e2, 2, axis=0), e3)):
        assert rep.error is None and rep.nfe == 40
        np.testing.assert_allclose(rep.x, exact(start_noise(r.seed, r.n, (1, 2, 2)), e), rtol=0, atol=RK4_ATOL)


def test_guidance_with_conditions_uses_the_requests_null(service):
    from anchorflow.runtime import solve

    rng = np.random.default_rng(1)
    emb, null = rng.normal(size=(2, 3, 3)), np.zeros((1, 3, 3))
    with pytest.raises(RequestError, match="needs a null value for emb"):
        service.parse(body(n=2, cfg=2.0, conditions={"emb": emb}))
    r = service.parse(body(n=2, cfg=2.0, seed=4, conditions={"emb": emb}, null_conditions={"emb": null}))
    got = service.sample_batch([r])[0].x
    ref = solve("rk4", service.model.velocity, start_noise(4, 2, (1, 2, 2)), 40,
                cond={"emb": emb.astype(np.float32)}, null_cond={"emb": null.astype(np.float32)}, cfg_scale=2.0).x
    assert np.array_equal(got, ref)


@pytest.mark.parametrize("kw, words", [
    ({"conditions": {"text": np.zeros((1, 2, 3))}}, "unknown condition"),
    ({"conditions": {"emb": np.zeros((1, 2, 5))}}, "must have shape"),
    ({"conditions": {"emb": np.zeros((1, 9, 3))}}, "axis L is 9, the bundle takes 1..8"),
    ({"n": 4, "conditions": {"emb": np.zeros((3, 2, 3))}}, "has 3 rows"),
    ({"conditions": {"emb": np.zeros((1, 2, 3), np.int64) > 0}}, "must be float32"),
])
def test_bad_conditions_are_refused(service, kw, words):
    with pytest.raises(RequestError, match=words):
        service.parse(body(**kw))


def test_malformed_condition_data_is_refused(service):
    with pytest.raises(RequestError, match="not base64 .npy"):
        service.parse(json.dumps({"solver": "euler", "conditions": {"emb": "???"}}).encode())
    with pytest.raises(RequestError, match="either as 'labels' or as the condition"):
        service.parse(body(labels=[1], conditions={"emb": np.zeros((1, 2, 3))}))
