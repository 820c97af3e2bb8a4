"""How much of a solve is the runtime's own work (everything outside backbone and SideNet calls)?

Goal: overhead <= 5 % of wall time for a 10-NFE Euler solve at batch 16 on the CPU backend
(onnxruntime). With a SideNet (BA-solver, arXiv 2601.21542): SideNet time <= 15 % of backbone
time at batch 16, measured for the merged probes (the default: N SideNet calls of 4B rows) and
the paper's (2N - 1 calls of B and 3B rows) in the same run; the load average is recorded.

The model is the bundled digits bundle (``open_model("default", backend="ort-cpu")``) when it
exists; otherwise a stand-in ONNX backbone built here with ``onnx.helper`` whose cost is of the
same order as the bundled DiT (16 tokens, width 256, 6 dense layers: ~7 M multiply-adds per
sample against the DiT's ~13 M). The figures come from the runtime's own timing split
(:class:`anchorflow.runtime.Timing`): backbone and SideNet time are measured around each call,
overhead is the rest. Medians over ``--repeats`` solves after warm-up; ``per_call`` adds the
median latency of single calls (backbone on B rows, SideNet on B and 3B rows).

    python benchmarks/overhead.py [--repeats 30] [--batch 16] [--nfe 10] [--threads 1] [--bundle B]

``--bundle B --out F``: another bundle, e.g. one with a shared-body (polynomial-offset) SideNet,
whose merged probe is one call on B rows with h (4, B) (``per_call`` then times that call).

Writes benchmarks/results/overhead.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from anchorflow.base import _io
from anchorflow.bench import machine_info
from anchorflow.modelref import BUNDLED, DEFAULT_NAME
from anchorflow.runtime import solve

RESULTS = Path(__file__).resolve().parent / "results" / "overhead.json"
GOAL_OVERHEAD = 0.05
GOAL_SIDENET = 0.15


def build_standin(path: Path, state=(1, 8, 8), classes: int = 10, width: int = 256, layers: int = 6) -> Path:
    """A dense ONNX backbone x (B,1,8,8), t (B,), y (B,) -> v, 16 tokens of 4 values, ``layers`` MatMuls."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = lambda *s: numpy_helper.from_array((rng.standard_normal(s) / np.sqrt(s[0])).astype(np.float32))  # noqa: E731
    inits = [w(4, width), w(1, 1, width), w(classes + 1, width), w(width, 4),
             *(w(width, width) for _ in range(layers))]
    names = ["w_in", "t_scale", "y_table", "w_out", *(f"w{i}" for i in range(layers))]
    for init, name in zip(inits, names):
        init.name = name
    shape = lambda name, vals: numpy_helper.from_array(np.array(vals, np.int64), name)  # noqa: E731
    inits += [shape("tok", [-1, 16, 4]), shape("col", [-1, 1, 1]), shape("row", [-1, 1, width])]
    nodes = [
        helper.make_node("Reshape", ["x", "tok"], ["xt"]),
        helper.make_node("MatMul", ["xt", "w_in"], ["h0"]),
        helper.make_node("Reshape", ["t", "col"], ["t3"]),
        helper.make_node("Mul", ["t3", "t_scale"], ["te"]),
        helper.make_node("Gather", ["y_table", "y"], ["ye2"]),
        helper.make_node("Reshape", ["ye2", "row"], ["ye"]),
        helper.make_node("Add", ["h0", "te"], ["h1"]),
        helper.make_node("Add", ["h1", "ye"], ["a0"]),
    ]
    for i in range(layers):
        nodes += [helper.make_node("MatMul", [f"a{i}", f"w{i}"], [f"m{i}"]),
                  helper.make_node("Tanh", [f"m{i}"], [f"a{i + 1}"])]
    nodes += [helper.make_node("MatMul", [f"a{layers}", "w_out"], ["vt"]),
              helper.make_node("Shape", ["x"], ["xs"]),
              helper.make_node("Reshape", ["vt", "xs"], ["v"])]
    f = TensorProto.FLOAT
    graph = helper.make_graph(
        nodes, "standin_backbone",
        [helper.make_tensor_value_info("x", f, ["batch", *state]), helper.make_tensor_value_info("t", f, ["batch"]),
         helper.make_tensor_value_info("y", TensorProto.INT64, ["batch"])],
        [helper.make_tensor_value_info("v", f, ["batch", *state])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9), path)
    return path


def ort_velocity(path: Path, threads: int) -> tuple[Callable, list[str]]:
    """An onnxruntime CPU session as a ``velocity(x, t, cond)`` callable (labels ``cond["y"]``)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])

    def velocity(x: np.ndarray, t: np.ndarray, cond: Optional[dict]) -> np.ndarray:
        return sess.run(["v"], {"x": x, "t": t, "y": cond["y"]})[0]

    return velocity, sess.get_providers()


def measure(method: str, velocity, sidenet, nfe: int, batch: int, repeats: int, cfg: float, meta: dict,
            **options) -> dict:
    """Median timing split of ``repeats`` solves (after 3 warm-up solves) at one batch size."""
    rng = np.random.default_rng(0)
    y = np.arange(batch, dtype=np.int64) % int(meta["num_classes"])
    kw = dict(y=y, sidenet=sidenet, cfg_scale=cfg, null_label=meta["null_label"], **options)
    splits = []
    for i in range(repeats + 3):
        noise = rng.standard_normal((batch, *meta["state_shape"])).astype(np.float32)
        t = solve(method, velocity, noise, nfe, **kw).timing
        if i >= 3:
            splits.append((t.total_s, t.backbone_s, t.sidenet_s, t.overhead_s))
    med = [statistics.median(s[k] for s in splits) for k in range(4)]
    frac = statistics.median(s[3] / s[0] for s in splits)
    return {
        "method": method, **options, "nfe": nfe, "batch": batch, "cfg": cfg, "repeats": repeats,
        "total_ms": med[0] * 1e3, "backbone_ms": med[1] * 1e3, "sidenet_ms": med[2] * 1e3, "overhead_ms": med[3] * 1e3,
        "overhead_frac": frac, "overhead_us_per_nfe": med[3] / nfe * 1e6,
        "sidenet_over_backbone": med[2] / med[1] if med[1] > 0 else None,
    }


def call_latency(net: Callable, args: tuple, repeats: int = 200) -> float:
    """Median wall time (ms) of one ``net(*args)`` call after 20 warm-up calls."""
    for _ in range(20):
        net(*args)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        net(*args)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def per_call(velocity, sidenet, batch: int, meta: dict) -> dict:
    """Per-call latency of the backbone on ``batch`` rows and of the SideNet on ``batch``, ``3 * batch``
    and ``4 * batch`` rows (per BA interval the paper's probes make one call of B and one of 3B rows,
    the merged probes one call of 4B rows)."""
    rng = np.random.default_rng(1)

    def feeds(rows: int) -> dict:
        state = lambda: rng.standard_normal((rows, *meta["state_shape"])).astype(np.float32)  # noqa: E731
        return {"x": state(), "v": state(), "t": rng.random(rows).astype(np.float32),
                "h": (0.1 * rng.random(rows)).astype(np.float32), "y": np.arange(rows) % int(meta["num_classes"])}

    f = feeds(batch)
    out = {"backbone_ms": call_latency(velocity, (f["x"], f["t"], {"y": f["y"]}))}
    if getattr(sidenet, "shared_body", False):  # one body row per state row: h (4, B) on B rows
        h4 = (0.1 * rng.random((4, batch))).astype(np.float32)
        out[f"sidenet_{batch}_rows_4_offsets_ms"] = call_latency(sidenet, (f["x"], f["v"], f["t"], h4, {"y": f["y"]}))
        out["merged_sidenet_per_interval_over_backbone"] = out[f"sidenet_{batch}_rows_4_offsets_ms"] / out["backbone_ms"]
        return out
    if sidenet is not None:
        side_args = lambda f: (f["x"], f["v"], f["t"], f["h"], {"y": f["y"]})  # noqa: E731
        out |= {f"sidenet_{rows}_rows_ms": call_latency(sidenet, side_args(feeds(rows)))
                for rows in (batch, 3 * batch, 4 * batch)}
        out["sidenet_per_interval_over_backbone"] = (out[f"sidenet_{batch}_rows_ms"]
                                                     + out[f"sidenet_{3 * batch}_rows_ms"]) / out["backbone_ms"]
        out["merged_sidenet_per_interval_over_backbone"] = out[f"sidenet_{4 * batch}_rows_ms"] / out["backbone_ms"]
        # why: the SideNet's cost per row against the backbone's, and BA feeds it 4 rows per state row
        out["sidenet_row_over_backbone_row"] = out[f"sidenet_{4 * batch}_rows_ms"] / 4 / out["backbone_ms"]
        out["sidenet_fixed_ms"] = (4 * out[f"sidenet_{batch}_rows_ms"] - out[f"sidenet_{4 * batch}_rows_ms"]) / 3
    return out


def open_subject(threads: int, tmp: Path, bundle: Optional[str] = None):
    """(velocity, sidenet, meta, providers, description): ``bundle``, else the bundled bundle, else the stand-in."""
    if bundle is not None:
        from anchorflow.modelref import open_model

        m = open_model(bundle, backend="ort-cpu")
        from anchorflow.runtime.bundles.format import read_bundle

        side = read_bundle(bundle).meta["networks"].get("sidenet") or {}
        form = ((side.get("checkpoint") or {}).get("arch") or {}).get("offset")
        return m.velocity, m.sidenet, m.meta, m.providers, f"bundle {bundle} (ort-cpu, SideNet offset form {form or 'film'})"
    if (BUNDLED / DEFAULT_NAME / "bundle" / "bundle.json").is_file():
        from anchorflow.modelref import open_model

        m = open_model("default", backend="ort-cpu")
        return m.velocity, m.sidenet, m.meta, m.providers, "bundled digits bundle (ort-cpu)"
    vel, providers = ort_velocity(build_standin(tmp / "standin.onnx"), threads)
    meta = {"state_shape": (1, 8, 8), "num_classes": 10, "null_label": 10, "name": "standin"}
    return vel, None, meta, providers, "stand-in ONNX backbone (no bundled model yet): 16 tokens x width 256, 6 MatMuls"


def _thread_policy() -> Optional[str]:
    """The onnxruntime thread policy the bundle's sessions ran with (decided once per process)."""
    from anchorflow.runtime.bundles.threads import policy

    p = policy()
    return None if p is None else p.describe()


def main(argv: Optional[list[str]] = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--nfe", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads of the stand-in session")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--bundle", default=None, help="a bundle to measure instead of the bundled digits bundle")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        vel, side, meta, providers, what = open_subject(args.threads, Path(tmp), args.bundle)
        rows = [measure("euler", vel, None, args.nfe, args.batch, args.repeats, cfg, meta) for cfg in (1.0, 1.5)]
        ba = paper = None
        guided = []
        if side is not None:  # merged probes (the default, N SideNet calls) and the paper's (2N - 1)
            ba = measure("ba", vel, side, args.nfe, args.batch, args.repeats, 1.0, meta, probes="merged")
            paper = measure("ba", vel, side, args.nfe, args.batch, args.repeats, 1.0, meta, probes="paper")
            # guidance 1.5: both row blocks everywhere, and the authors' interval (0, 0.7] (B rows above 0.7)
            guided = [measure("ba", vel, side, args.nfe, args.batch, args.repeats, 1.5, meta, probes="merged",
                              cfg_interval=interval) for interval in ((0.0, 1.0), (0.0, 0.7))]
        calls = per_call(vel, side, args.batch, meta)
    euler = rows[0]
    result = {
        "subject": what, "providers": providers, "machine": machine_info(None) | {"providers": providers},
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "euler": rows, "overhead_frac": euler["overhead_frac"], "goal_overhead_frac": GOAL_OVERHEAD,
        "overhead_ok": euler["overhead_frac"] <= GOAL_OVERHEAD,
        "ba": ba if ba is not None else "skipped: the bundled model has no SideNet yet",
        "ba_paper_probes": paper, "ba_guided": guided, "load_average_1_5_15": list(os.getloadavg()),
        "thread_policy": _thread_policy(),
        "goal_sidenet_over_backbone": GOAL_SIDENET,
        "sidenet_ok": None if ba is None else ba["sidenet_over_backbone"] <= GOAL_SIDENET,
        "per_call": calls,
    }
    _io.write_json(args.out, result)
    for r in rows:
        print(f"euler nfe={r['nfe']} batch={r['batch']} cfg={r['cfg']}: total {r['total_ms']:.2f} ms, backbone "
              f"{r['backbone_ms']:.2f} ms, overhead {r['overhead_ms']:.3f} ms = {r['overhead_frac']:.2%} "
              f"({r['overhead_us_per_nfe']:.1f} us per NFE); goal <= {GOAL_OVERHEAD:.0%}")
    if ba is not None:
        for r in (ba, paper, *guided):
            print(f"ba ({r['probes']} probes, cfg {r['cfg']:g} on {tuple(r.get('cfg_interval', (0, 1)))}) "
                  f"nfe={r['nfe']}: total {r['total_ms']:.2f} ms, SideNet {r['sidenet_ms']:.2f} ms vs backbone "
                  f"{r['backbone_ms']:.2f} ms = {r['sidenet_over_backbone']:.1%} (goal <= {GOAL_SIDENET:.0%})")
    print("per call (ms): " + ", ".join(f"{k[:-3]} {v:.3f}" for k, v in calls.items() if k.endswith("_ms")))
    print(f"subject: {what}; wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
