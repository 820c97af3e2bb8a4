"""int8 Q/DQ variants of the bundled digits backbone (export/quantize.py): node classes, calibration on
solver trajectories, Q/DQ placement, parity at the int8 tolerance, the quality guard, TensorRT's
precision rules against the real lean bindings, and (slow) the whole export path."""

from __future__ import annotations

import logging
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow  # ~6 CPU-minutes: calibrates and quantises real bundles (run by .ci/run)
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime.quantization")

from anchorflow.base.errors import BackendError, CheckpointError  # noqa: E402
from anchorflow.export import quantize as Q  # noqa: E402
from anchorflow.modelref import BUNDLED  # noqa: E402
from anchorflow.runtime.evaluation.parity.stats import TOLERANCES, compare  # noqa: E402

BUNDLE = BUNDLED / "digits" / "bundle"
logging.getLogger("root").setLevel(logging.ERROR)  # onnxruntime.quantization's pre-processing advice


@pytest.fixture(scope="module")
def copy(tmp_path_factory) -> Path:
    dst = tmp_path_factory.mktemp("quant") / "bundle"
    shutil.copytree(BUNDLE, dst)
    for p in [dst, *dst.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    return dst


@pytest.fixture(scope="module")
def nets(copy):
    return Q.open_nets(copy)


@pytest.fixture(scope="module")
def rows(nets):
    return Q.record_calibration(nets, Q.calibration_configs(nets.fmt))


@pytest.fixture(scope="module")
def base():
    return onnx.load(str(BUNDLE / "backbone.onnx"))


@pytest.fixture(scope="module")
def quantizer(base, rows):
    q = Q.Quantizer(base, "int8", rows)
    yield q
    q.close()


@pytest.fixture(scope="module")
def attn_variant(quantizer):
    """attention + softmax + final projection quantised, the rest fp32 (within the rule's 1 dB budget)."""
    return quantizer.quantize(["attention", "softmax", "final_projection"])


def test_node_classes_follow_the_digits_dit_architecture(base):
    """4 DiT blocks: patch-embedding Conv in, one output projection, 2 activation MatMuls and one
    Softmax per block; every Gemm (time MLP, adaLN modulation) and the label embedding path do not
    depend on x -- checked by running the graph: changing x leaves those nodes' outputs unchanged."""
    import onnxruntime as ort

    model = Q.named(base)
    classes = Q.node_classes(model)
    ops = {n.name: n.op_type for n in model.graph.node}
    assert [ops[n] for n in classes["input_projection"]] == ["Conv"]
    assert len(classes["final_projection"]) == 1 and len(classes["softmax"]) == 4 == len(classes["attention"]) // 2
    assert set(classes["norm"]) == {n for n, o in ops.items() if o == "LayerNormalization"}
    assert {ops[n] for n in classes["embedding"]} == {"Gemm"} and len(classes["embedding"]) >= 6
    # independent check of "does not depend on x": expose the embedding outputs, vary x
    outs = [o for n in model.graph.node if n.name in classes["embedding"] + classes["body"][:2] for o in n.output]
    probe = onnx.ModelProto.FromString(model.SerializeToString())
    probe.graph.output.extend([onnx.helper.make_empty_tensor_value_info(o) for o in outs])
    sess = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    r = np.random.default_rng(0)
    feeds = {"t": np.full(2, 0.4, np.float32), "y": np.array([1, 3])}
    a = sess.run(outs, {"x": r.standard_normal((2, 1, 8, 8)).astype(np.float32), **feeds})
    b = sess.run(outs, {"x": r.standard_normal((2, 1, 8, 8)).astype(np.float32), **feeds})
    n_emb = len([o for n in model.graph.node if n.name in classes["embedding"] for o in n.output])
    assert all(np.array_equal(u, v) for u, v in zip(a[:n_emb], b[:n_emb]))  # embeddings: x-independent
    assert not all(np.array_equal(u, v) for u, v in zip(a[n_emb:], b[n_emb:]))  # body: x-dependent


def test_calibration_rows_are_the_solvers_calls_at_the_tuned_grid_times(nets):
    """The recorder sees exactly the backbone calls of the solves: Euler at the tuned euler@5 grid
    evaluates at every grid time but t = 0, with the labels cycled over all classes."""
    from anchorflow.runtime.bundles.tuned_grids import read_tuning

    cfg = Q.config(nets.fmt, "euler", 5)
    grid = np.asarray(read_tuning(BUNDLE).grid_for("euler", 5).times, np.float32)
    assert not isinstance(cfg.grid, str)
    calls = Q.record_calibration(nets, [cfg], samples=10)
    assert len(calls) == 5 and nets.recorder.times() == {float(t) for t in grid[:-1]}
    assert [float(c["t"][0]) for c in calls] == [float(t) for t in grid[:-1]]
    assert sorted(np.unique(calls[0]["y"])) == list(range(10))
    assert not nets.recorder.on  # recording stops after the solves
    # and the uniform grid differs from the tuned one (so the test above saw the tuned times)
    uniform = Q.record_calibration(nets, [Q.Config("euler", 5, "uniform", 1.0)], samples=10)
    assert {float(c["t"][0]) for c in uniform} != {float(t) for t in grid[:-1]}


def test_calibration_covers_ba_ab2_euler_at_several_budgets(nets, rows):
    labels = [c.label() for c in Q.calibration_configs(nets.fmt)]
    assert {lab.split("@")[0] for lab in labels} == {"ba", "ab2", "euler"} and all("tuned" in lab for lab in labels)
    assert len(rows) == sum(Q.CAL_NFES) * 3  # one backbone call per step for BA, AB2 and Euler alike
    assert all(r["x"].shape[0] == Q.CAL_SAMPLES for r in rows)


def test_qdq_structure_quantises_the_chosen_nodes_only(quantizer, attn_variant):
    """Every chosen node reads only DequantizeLinear outputs on its float inputs; no kept node (norms,
    embeddings, input / final projection) reads one; int8, symmetric (zero points 0), weights per channel."""
    g = attn_variant.graph
    producer = {o: n for n in g.node for o in n.output}
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in g.initializer}
    chosen = {n for c in ("attention", "softmax", "final_projection") for n in quantizer.classes[c]}
    kept = {n for c in ("norm", "embedding", "input_projection", "body") for n in quantizer.classes[c]}
    by_name = {n.name: n for n in g.node}
    for name in chosen:
        node = by_name[name]
        first = node.input[:1] if node.op_type == "Softmax" else node.input[:2]
        assert all(producer[i].op_type == "DequantizeLinear" if i in producer else False for i in first), name
    for name in kept:
        assert all(producer.get(i) is None or producer[i].op_type != "DequantizeLinear" for i in by_name[name].input), name
    summary = Q.qdq_summary(attn_variant)
    assert summary["types"] == ["INT8"]
    for n in g.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear") and len(n.input) > 2:
            assert not inits[n.input[2]].any()  # symmetric
    weight_dq = [n for n in g.node if n.op_type == "DequantizeLinear" and n.input[0] in inits
                 and inits[n.input[0]].dtype == np.int8 and inits[n.input[0]].ndim == 2]
    assert weight_dq and all(inits[n.input[1]].size == inits[n.input[0]].shape[
        next((a.i for a in n.attribute if a.name == "axis"), 1)] for n in weight_dq)  # one scale per channel
    assert Counter(n.op_type for n in g.node)["MatMul"] == Counter(
        n.op_type for n in quantizer.model.graph.node)["MatMul"]  # nothing removed


def _run(model_bytes, feeds):
    import onnxruntime as ort

    return ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def test_int8_parity_within_the_measured_tolerance_and_a_broken_scale_fails(nets, quantizer, attn_variant):
    """On held-out trajectory rows (BA@10 calls), int8 vs fp32 ORT passes TOLERANCES['int8'];
    doubling the weight scales (a broken export) fails it, and so does quantising every MLP / qkv
    layer (the whole body class, 2.9 dB end to end, which the rule refuses) at the last BA step."""
    held = Q.record_calibration(nets, [Q.config(nets.fmt, "ba", 10)], samples=8, seed=99)
    ref = Q._session(nets.fmt.network_file("backbone"))
    data = attn_variant.SerializeToString()
    for feeds in held[::3]:
        stats = compare(_run(data, feeds), ref.run(None, feeds)[0], TOLERANCES["int8"])
        assert stats.passed and stats.mean_abs > 1e-5, stats  # quantised (not fp32), within the bound
    broken = onnx.ModelProto.FromString(data)
    ints = {t.name for t in broken.graph.initializer if t.data_type == onnx.TensorProto.INT8}
    weight_scales = {n.input[1] for n in broken.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in ints}
    assert weight_scales
    for t in [t for t in broken.graph.initializer if t.name in weight_scales]:
        arr = onnx.numpy_helper.to_array(t) * 2.0
        t.CopyFrom(onnx.numpy_helper.from_array(arr.astype(np.float32), t.name))
    feeds = held[len(held) // 2]
    assert not compare(_run(broken.SerializeToString(), feeds), ref.run(None, feeds)[0], TOLERANCES["int8"]).passed
    body = quantizer.quantize(["body"]).SerializeToString()
    assert not compare(_run(body, held[-1]), ref.run(None, held[-1])[0], TOLERANCES["int8"]).passed


def test_guard_refuses_a_broken_variant_and_passes_a_good_one(nets, quantizer, attn_variant):
    judge = Q.Judge(nets, Q.default_config(nets.fmt), samples=8, seed=5, reference_steps=16)
    good = Q.guard(judge, attn_variant.SerializeToString(), "int8", bound_db=Q.GUARD_DB + 2.0)
    assert np.isfinite(good.variant) and good.drop < Q.GUARD_DB + 2.0
    broken = quantizer.quantize(["norm", "input_projection", "embedding", "body"])  # the classes the rule keeps
    with pytest.raises(CheckpointError) as err:
        Q.guard(judge, broken.SerializeToString(), "int8", bound_db=Q.GUARD_DB)
    msg = str(err.value)
    assert "\n" not in msg and "export refused" in msg and "nothing was written" in msg and "drop int8" in msg


def test_add_quantized_refusal_writes_nothing(copy, monkeypatch):
    """The guard inside add_quantized: refused -> CheckpointError, bundle.json and the folder unchanged."""
    before = {p.name: p.read_bytes() for p in copy.iterdir() if p.is_file()}
    monkeypatch.setattr(Q, "choose", lambda qz, judge: (qz.classes["norm"] + qz.classes["input_projection"], {}))
    monkeypatch.setattr(Q, "EVAL_SAMPLES", 8)
    monkeypatch.setattr(Q, "CAL_NFES", (5,))
    with pytest.raises(CheckpointError, match="export refused"):
        Q.add_quantized(copy, ["fp32", "int8"])
    assert {p.name: p.read_bytes() for p in copy.iterdir() if p.is_file()} == before


def test_smoothing_keeps_the_function_and_moves_channel_outliers_into_the_weights(nets, rows, base):
    """SmoothQuant: the smoothed fp32 graph computes the same velocity (float rounding only) on a
    held-out trajectory call; every smoothed activation gets exactly one Mul and its MatMuls new
    weights; the per-channel spread of a smoothed MatMul input (max / median channel amax) shrinks;
    ``nodes=`` smooths only the groups with a member in it."""
    held = Q.record_calibration(nets, [Q.config(nets.fmt, "ba", 10)], samples=8, seed=99)
    named = Q.named(base)
    model, rec = Q.smooth(named, rows)
    groups = Q.smooth_groups(named)
    assert rec["activations"] == len(groups) >= 8 and rec["matmuls"] == sum(map(len, groups.values()))
    muls = [n for n in model.graph.node if n.op_type == "Mul" and n.name.endswith("__smooth")]
    assert len(muls) == len(groups)
    onnx.checker.check_model(model)
    ref, got = _run(named.SerializeToString(), held[5]), _run(model.SerializeToString(), held[5])
    assert np.abs(got - ref).max() < 1e-4 * max(1.0, np.abs(ref).max())
    x = next(iter(groups))
    before = Q.channel_amax(named, [x], rows[::4])[x]
    after = Q.channel_amax(model, [f"{x}__smoothed"], rows[::4])[f"{x}__smoothed"]
    spread = lambda a: float(a.max() / np.median(a))  # noqa: E731
    assert spread(after) < spread(before)
    one = groups[x][:1]
    part, rec1 = Q.smooth(named, rows, nodes=one)
    assert rec1["activations"] == 1 and rec1["matmuls"] == len(groups[x])


def test_smoothing_lowers_the_int8_error_of_the_mlps(nets, rows, base):
    """The same nodes (every body MatMul) and calibration, smoothing on (the default) vs off: the
    per-call mean abs error against fp32 on held-out late trajectory calls is lower with it (the
    measured reason for SMOOTH_ALPHA; flipping it off fails this)."""
    held = Q.record_calibration(nets, [Q.config(nets.fmt, "ba", 10)], samples=8, seed=98)
    ref = Q._session(nets.fmt.network_file("backbone"))
    err = {}
    for alpha in (Q.SMOOTH_ALPHA, None):
        q = Q.Quantizer(base, "int8", rows[::2], smooth_alpha=alpha)
        try:
            data = q.quantize(["body"]).SerializeToString()
        finally:
            q.close()
        err[alpha] = np.mean([np.abs(_run(data, f) - ref.run(None, f)[0]).mean() for f in held[5:]])
    assert err[Q.SMOOTH_ALPHA] < 0.9 * err[None], err


def test_random_calibration_keeps_shapes_but_not_the_trajectory_states(nets, rows):
    rnd = Q.random_calibration(nets.fmt, rows)
    assert [r["x"].shape for r in rnd] == [r["x"].shape for r in rows]
    assert not np.allclose(np.sort(np.unique(rnd[0]["t"])), np.sort(np.unique(rows[0]["t"])))


# -- TensorRT precision rules against the real lean bindings ---------------------------------------
def test_trt_precision_flags_against_the_lean_bindings():
    lean = pytest.importorskip("tensorrt_lean", reason="the TensorRT lean runtime is not installed")
    from anchorflow.engines import build, compat

    for p in ("fp32", "fp16", "bf16", "int8", "fp8"):
        assert build.precision_flags(lean, p) == []  # strongly typed: the graph carries the precision
        assert hasattr(lean.DataType, build.GRAPH_TYPES[p])
    if compat.major(lean) >= 11:  # the flags our docstring says are gone really are
        assert not {"FP16", "INT8", "FP8", "BF16"} & set(lean.BuilderFlag.__members__)

    class Old:  # a TensorRT without FP8
        __version__ = "8.6"

        class DataType:
            FLOAT = HALF = INT8 = 0
    with pytest.raises(BackendError, match="no FP8 data type"):
        build.precision_flags(Old, "fp8")
    compat.check_precision("int8", (7, 5))
    with pytest.raises(BackendError, match="fp8 engines need .* >= 8.9"):
        compat.check_precision("fp8", (8, 6))


def test_trt_build_refuses_an_int8_request_on_a_graph_without_qdq(tmp_path, attn_variant):
    from anchorflow.engines.build import check_qdq_graph

    onnx.save(attn_variant, str(tmp_path / "q.onnx"))
    check_qdq_graph(tmp_path / "q.onnx", "int8")
    with pytest.raises(BackendError, match="no fp8 QuantizeLinear"):
        check_qdq_graph(tmp_path / "q.onnx", "fp8")
    with pytest.raises(BackendError, match="no int8 QuantizeLinear"):
        check_qdq_graph(BUNDLE / "backbone.onnx", "int8")


# -- the whole path (slow: the rule measures ~50 variants end to end) -------------------------------
@pytest.fixture(scope="module")
def quantised_bundle(tmp_path_factory):
    dst = tmp_path_factory.mktemp("quantfull") / "bundle"
    shutil.copytree(BUNDLE, dst)
    for p in [dst, *dst.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    meta = Q.add_quantized(dst, ["fp32", "int8"])
    return dst, meta


def test_add_quantized_records_the_rule_and_samples_through_the_cli(quantised_bundle, tmp_path, monkeypatch):
    import sys

    from anchorflow.cli import main

    folder, meta = quantised_bundle
    entry = meta["networks"]["backbone"]["precisions"]["int8"]
    q = entry["quantization"]
    assert q["kept_fp32_classes"] and "norm" in q["kept_fp32_classes"]
    assert q["sensitivity"]["configuration"].startswith(f"ba@{Q.RULE_NFE} ")  # judged where the goal is set
    assert q["smoothing"]["alpha"] == Q.SMOOTH_ALPHA
    graph = onnx.load(str(folder / entry["file"])).graph
    smoothed = [n for n in graph.node if n.op_type == "Mul" and n.name.endswith("__smooth")]
    assert len(smoothed) == q["smoothing"]["activations"]  # only the groups of quantised MatMuls
    assert q["quantized_nodes"] and q["qdq"]["types"] == ["INT8"]
    assert entry["validation"]["guard"]["drop_db"] <= Q.GUARD_DB
    assert q["calibration"]["source"].startswith("solver trajectories") and q["calibration"]["calls"] > 50
    assert meta["networks"]["sidenet"]["precisions"]["int8"]["computes"] == "fp32"
    assert "int8" in meta["precisions"]
    out = {}
    for p in ("fp32", "int8"):
        out[p] = tmp_path / f"{p}.npy"
        args = ["sample", str(folder), "--precision", p, "--backend", "ort-cpu", "--n", "8",
                "--out", str(tmp_path / f"{p}.png"), "--npy", str(out[p])]
        monkeypatch.setattr(sys, "argv", ["anchorflow", *args])
        try:  # cli.main returns on success (click's standalone_mode=False); errors end in SystemExit(1)
            main(args)
        except SystemExit as exit_:
            assert not exit_.code, exit_
        assert out[p].exists()
    a, b = np.load(out["fp32"]), np.load(out["int8"])
    from anchorflow.runtime.evaluation.metrics import psnr

    assert 30.0 < psnr(b, a, 2.0) < 80.0  # close to fp32, but not the fp32 graph


def test_fp8_graph_structure_runs_on_ort_and_the_trt_check_accepts_it(tmp_path, rows, base):
    """fp8 (E4M3) Q/DQ: zero points FLOAT8E4M3FN, opset >= 19, Softmax left out (ORT pins its range
    without the avg/std fp8 scales need), the graph runs on ORT CPU (fake-quantised) with finite
    outputs that differ from fp32, and the TensorRT build check takes it as fp8, not int8."""
    from anchorflow.engines.build import check_qdq_graph

    q = Q.Quantizer(base, "fp8", rows)
    try:
        model = q.quantize(["attention", "softmax", "final_projection"])
        softmax = set(q.classes["softmax"])
    finally:
        q.close()
    assert Q.qdq_summary(model)["types"] == ["FLOAT8E4M3FN"]
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 19
    producer = {o: n for n in model.graph.node for o in n.output}
    for n in model.graph.node:
        if n.name in softmax:
            assert producer[n.input[0]].op_type != "DequantizeLinear"
    feeds = rows[len(rows) // 2]
    out, ref = _run(model.SerializeToString(), feeds), _run(base.SerializeToString(), feeds)
    assert np.isfinite(out).all() and not np.allclose(out, ref, atol=1e-6)
    onnx.save(model, str(tmp_path / "f.onnx"))
    check_qdq_graph(tmp_path / "f.onnx", "fp8")
    with pytest.raises(BackendError, match="no int8 QuantizeLinear"):
        check_qdq_graph(tmp_path / "f.onnx", "int8")


def test_rebatch_keeps_every_row_in_order_at_one_batch_size():
    r = np.random.default_rng(0)
    rows = [{"x": r.standard_normal((b, 2)).astype(np.float32), "t": r.random(b).astype(np.float32)} for b in (64, 48, 64)]
    out = Q.rebatch(rows)
    assert {len(o["x"]) for o in out} == {16} and len(out) == 11
    for k in ("x", "t"):
        assert np.array_equal(np.concatenate([o[k] for o in out]), np.concatenate([x[k] for x in rows]))
    same = [rows[0], rows[2]]
    assert Q.rebatch(same) == same  # one size: untouched


def test_export_parity_record_passes_the_rule_variant_and_refuses_a_broken_one(nets, quantizer, attn_variant, rows, base):
    """add_quantized's per-call parity (TOLERANCES[int8] / [fp8] against fp32 ORT, held-out calls):
    the record export prints; a broken variant (every class quantised) is refused in one line; an
    fp8 variant of the rule's kind passes the fp8 bound while fp8 MLPs too (5 dB end to end) fail it."""
    rec = Q.parity(nets, attn_variant.SerializeToString(), "int8")
    assert rec["passed"] and rec["tolerance"]["stat"] == "mean" and len(rec["cases"]) == 4
    assert rec["worst"]["mean_abs"] > 1e-4  # measured a quantised graph, not fp32
    broken = quantizer.quantize(["norm", "input_projection", "embedding", "body"]).SerializeToString()
    with pytest.raises(CheckpointError, match="fails parity against fp32.*nothing was written"):
        Q.parity(nets, broken, "int8")
    q = Q.Quantizer(base, "fp8", rows)
    try:
        assert Q.parity(nets, q.quantize(["attention", "final_projection"]).SerializeToString(), "fp8")["passed"]
        with pytest.raises(CheckpointError, match="fails parity"):
            Q.parity(nets, q.quantize(["attention", "final_projection", "body"]).SerializeToString(), "fp8")
    finally:
        q.close()
