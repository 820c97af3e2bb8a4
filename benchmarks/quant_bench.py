"""int8 / fp8 bundles: sample quality at equal calls, trajectory vs random calibration, ORT CPU latency.

One run, one model (``--model digits``: the bundled digits DiT; ``--model sd3``: the SD3-architecture
digits transformer of benchmarks/results/sd3_digits/model with its SideNet):

1. The bundle, made by the real exporter: digits: a copy of the bundled bundle (fp32 + fp16) and
   ``export.quantize.add_quantized(.., ["fp32", "int8"])`` (what ``anchorflow export --precision
   fp32,fp16,int8`` runs after the float variants); sd3: ``anchorflow export MODEL/transformer
   --sidenet MODEL/sidenet --precision fp32,fp16,int8`` in this process. The int8 file is the one the
   exporter's measured rule chose and its guard passed.
2. Variants, every other thing equal: int8 with the same quantised nodes but calibrated on random
   inputs (``random_calibration``: x ~ N(0,1), t ~ U(0,1), random labels / embeddings, the same
   row counts); the SideNet quantised too (int8, every weight op but the norms, calibrated on the
   SideNet's own feeds along the same trajectories); fp16 backbone (the bundle's fp16 file, SideNet
   fp32 and fp16); fp8 (E4M3, the same nodes as int8) where onnxruntime CPU runs its Q/DQ graph.
3. Quality: the same noise and labels (``--n`` samples, labels cycled over the classes; sd3: fixed
   random condition embeddings, the bundle carries no prompts) for BA / AB2 / Euler at 5 and 10 calls
   and Euler at 50, on the bundle's tuned grids, guidance 1: PSNR (dB) against the fp32 RK4
   reference (``--ref`` calls) and against the fp32 bundle's result of the same solver and calls.
4. Latency per backbone call on ORT CPU (one session thread), batch 1 and 16: fp32, fp16, the
   bundle's int8, and int8 with every weight op quantised (the speed bound: not quality-guarded).

    python benchmarks/quant_bench.py --model digits [--n 32] [--ref 256]
Writes benchmarks/results/quant_<model>.json and .md with the command and the load average.
Time: t = 1 noise, t = 0 data; NFE = backbone calls.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from anchorflow.base._io import read_json, write_json, write_text
from anchorflow.export import quantize as Q
from anchorflow.modelref import BUNDLED
from anchorflow.runtime import solve
from anchorflow.runtime.evaluation.metrics import psnr

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results"
SD3 = ROOT / "benchmarks" / "results" / "sd3_digits" / "model"
SOLVES = [("ba", 5), ("ba", 10), ("ab2", 5), ("ab2", 10), ("euler", 5), ("euler", 10), ("euler", 50)]


def loadavg() -> str:
    try:
        return Path("/proc/loadavg").read_text().strip()
    except OSError:
        return "n/a"


def make_bundle(model: str, work: Path) -> tuple[Path, float]:
    dst = work / "bundle"
    start = time.perf_counter()
    if model == "digits":
        shutil.copytree(BUNDLED / "digits" / "bundle", dst)
        for p in [dst, *dst.rglob("*")]:
            p.chmod(0o755 if p.is_dir() else 0o644)
        Q.add_quantized(dst, ["fp32", "fp16", "int8"])
    else:
        from anchorflow.cli import main

        args = ["export", str(SD3 / "transformer"), "--sidenet", str(SD3 / "sidenet"), "--out", str(dst),
                "--precision", "fp32,fp16,int8"]
        try:
            main(args)
        except SystemExit as e:
            if e.code:
                raise
    return dst, time.perf_counter() - start


def sidenet_rows(nets: Q.Nets, configs: list) -> list[dict]:
    """The SideNet's feeds along the BA calibration solves (same noise / labels as the backbone's)."""
    from anchorflow.runtime.bundles.backends import ort_run
    from anchorflow.runtime.bundles.networks import WRAPPERS

    decl = nets.fmt.networks["sidenet"]
    rec = Q.Recorder(ort_run(nets.sessions["sidenet"], decl), on=False)
    side = WRAPPERS["sidenet"](decl, rec, nets.fmt.guidance.null, ["CPUExecutionProvider"])
    noise, kwargs = Q.problem(nets.fmt, Q.CAL_SAMPLES, 11)
    rec.on = True
    for c in configs:
        if c.solver == "ba":
            Q.run_config(nets, c, noise, kwargs, sidenet=side)
    rec.on = False
    return rec.calls


def variants(folder: Path, nets: Q.Nets, meta: dict, log) -> tuple[dict, dict]:
    """name -> (backbone src, sidenet src) with src None (fp32), a Path or ONNX bytes; and notes."""
    import onnx

    fmt = nets.fmt
    back = meta["networks"]["backbone"]
    chosen = [n for v in back["precisions"]["int8"]["quantization"]["quantized_nodes"].values() for n in v]
    configs = Q.calibration_configs(fmt)
    rows = Q.record_calibration(nets, configs)
    base = onnx.load(str(fmt.network_file("backbone")))
    state = [i.name for i in fmt.backbone.inputs if i.role == "state"]
    out = {"fp32": (None, None), "fp16": (folder / back["precisions"]["fp16"]["file"], None)}
    side16 = meta["networks"].get("sidenet", {}).get("precisions", {}).get("fp16")
    if side16:
        out["fp16 + SideNet fp16"] = (out["fp16"][0], folder / side16["file"])
    out["int8"] = (folder / back["precisions"]["int8"]["file"], None)
    notes = {"int8_quantized_nodes": len(chosen), "calibration_calls": len(rows),
             "int8_weights_quantized": back["precisions"]["int8"]["quantization"]["weights_quantized"]}
    log("random calibration")
    rq = Q.Quantizer(base, "int8", Q.random_calibration(fmt, rows), state)
    try:
        out["int8, random calibration"] = (rq.quantize(nodes=chosen).SerializeToString(), None)
    finally:
        rq.close()
    if "sidenet" in fmt.networks:
        log("SideNet int8")
        side_model = onnx.load(str(fmt.network_file("sidenet")))
        srows = sidenet_rows(nets, configs)
        sq = Q.Quantizer(side_model, "int8", srows, [i.name for i in fmt.networks["sidenet"].inputs if i.role == "state"])
        try:
            snodes = [n for c in ("embedding", "input_projection", "body", "attention", "final_projection")
                      for n in sq.classes[c]]
            out["int8 + SideNet int8"] = (out["int8"][0], sq.quantize(nodes=snodes).SerializeToString())
            notes["sidenet_int8_nodes"] = len(snodes)
            notes["sidenet_calibration_calls"] = len(srows)
        finally:
            sq.close()
    log("fp8")
    fq = Q.Quantizer(base, "fp8", rows, state)
    try:
        fp8 = fq.quantize(nodes=chosen)
        notes["fp8_qdq"] = Q.qdq_summary(fp8)
        try:
            Q._session(fp8.SerializeToString())
            out["fp8 (E4M3, fake-quantised on ORT CPU)"] = (fp8.SerializeToString(), None)
        except Exception as e:  # noqa: BLE001 - recorded: onnxruntime CPU has no kernel for it
            notes["fp8_not_run"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    finally:
        fq.close()
    log("int8, every weight op (speed bound)")
    aq = Q.Quantizer(base, "int8", rows, state)
    try:
        every = [n for c in ("embedding", "input_projection", "body", "attention", "final_projection") for n in aq.classes[c]]
        notes["int8_all_weight_ops_nodes"] = len(every)
        speed_only = aq.quantize(nodes=every).SerializeToString()
    finally:
        aq.close()
    return out, {"notes": notes, "speed_only": speed_only, "rows": rows}


class Eval:
    """The bench's held-out problem (seed 7, not the rule's 21 or the guard's 22) and its fp32 reference."""

    def __init__(self, nets: Q.Nets, n: int, ref_calls: int) -> None:
        fmt = nets.fmt
        self.noise, self.kwargs = Q.problem(fmt, n, seed=7)
        lo_hi = fmt.model.get("data_range")
        self.ref = solve("rk4", nets.velocity, self.noise, ref_calls, cfg_scale=1.0, **self.kwargs).x
        half = solve("rk4", nets.velocity, self.noise, ref_calls // 2, cfg_scale=1.0, **self.kwargs).x
        self.span = float(lo_hi[1] - lo_hi[0]) if lo_hi else float(self.ref.max() - self.ref.min())
        self.head = {"reference": f"rk4 {ref_calls} calls", "self_check_psnr_vs_half_db": round(psnr(half, self.ref, self.span), 2)}

    def psnr(self, nets: Q.Nets, solver: str, nfe: int) -> float:
        x = Q.run_config(nets, Q.config(nets.fmt, solver, nfe, cfg=1.0), self.noise, self.kwargs)
        return float(psnr(x, self.ref, self.span)) if np.isfinite(x).all() else float("-inf")


def tradeoff(nets: Q.Nets, judge: Q.Judge, ev: "Eval", meta: dict, rows: list, log) -> list[dict]:
    """Held-out BA@10 (Euler@10 without SideNet) against the share of weights quantised: the rule's
    order (each node's own measured cost, cheapest first) cut at several prefix lengths, and every
    weight op; one Quantizer (all MatMul inputs smoothed: function-preserving) for all points."""
    import onnx

    fmt = nets.fmt
    q8 = meta["networks"]["backbone"]["precisions"]["int8"]["quantization"]
    costs = q8["sensitivity"]["node_alone_drop_db"]
    order = sorted(costs, key=lambda n: costs[n][1])
    chosen = [n for v in q8["quantized_nodes"].values() for n in v]
    solver = "ba" if "sidenet" in fmt.networks else "euler"
    base = onnx.load(str(fmt.network_file("backbone")))
    state = [i.name for i in fmt.backbone.inputs if i.role == "state"]
    qz = Q.Quantizer(base, "int8", rows, state)
    every = [n for c in ("embedding", "input_projection", "body", "attention", "final_projection") for n in qz.classes[c]]
    fp32 = ev.psnr(nets, solver, 10)
    points = sorted({len(chosen), min(2 * len(chosen), len(order)), min(4 * len(chosen), len(order)), len(order)})
    out = []
    try:
        for label, nodes in [*((f"rule order, first {k} nodes" + (" (the bundle's)" if k == len(chosen) else ""),
                                order[:k]) for k in points if k), ("every weight op", every)]:
            got = ev.psnr(judge.variant(qz.quantize(nodes=nodes).SerializeToString()), solver, 10)
            out.append({"variant": label, "nodes": len(nodes), "weights_quantized": Q.weight_share(qz.model, nodes),
                        "solve": f"{solver}@10", "fp32_psnr_db": round(fp32, 3), "psnr_db": round(got, 3),
                        "gap_db": round(fp32 - got, 3)})
            log(f"trade-off {label}: {out[-1]['gap_db']} dB")
    finally:
        qz.close()
    return out


def quality(nets: Q.Nets, judge: Q.Judge, srcs: dict, ev: "Eval", log) -> list[dict]:
    fmt = nets.fmt
    noise, kwargs, ref, span = ev.noise, ev.kwargs, ev.ref, ev.span
    rows = [dict(ev.head)]
    fp32_out = {}
    solves = [(s, k) for s, k in SOLVES if s != "ba" or "sidenet" in fmt.networks]
    for name, (back, side) in srcs.items():
        v = judge.variant(_bytes(back), _bytes(side))
        for solver, nfe in solves:
            if side is not None and solver != "ba":
                continue  # the SideNet only runs in BA
            cfg = Q.config(fmt, solver, nfe, cfg=1.0)
            x = Q.run_config(v, cfg, noise, kwargs)
            if name == "fp32":
                fp32_out[(solver, nfe)] = x
            finite = bool(np.isfinite(x).all())
            rows.append({"variant": name, "solver": solver, "nfe": nfe, "grid": "tuned" if not isinstance(cfg.grid, str) else "uniform",
                         "finite": finite,
                         "psnr_vs_reference_db": round(psnr(x, ref, span), 3) if finite else None,
                         "psnr_vs_fp32_same_solve_db": (round(psnr(x, fp32_out[(solver, nfe)], span), 3)
                                                        if finite and name != "fp32" else None)})
        log(f"quality {name} done")
    return rows


def _bytes(src):
    return src.read_bytes() if isinstance(src, Path) else src


def latency(fmt, srcs: dict, batches=(1, 16), repeats=(30, 10)) -> list[dict]:
    rows = []
    for batch, reps in zip(batches, repeats):
        noise, kwargs = Q.problem(fmt, batch, seed=3)
        feeds = {"x": noise, "t": np.full(batch, 0.5, np.float32)}
        for k, v in kwargs.items():
            if k == "y":
                feeds["y"] = v
            elif k == "cond":
                feeds.update(v)
        for name, src in srcs.items():
            sess = Q._session(_bytes(src) if src is not None else fmt.network_file("backbone"), threads=1)
            names = {i.name for i in sess.get_inputs()}
            f = {k: v for k, v in feeds.items() if k in names}
            for _ in range(3):
                sess.run(None, f)
            ts = []
            for _ in range(reps):
                t0 = time.perf_counter()
                sess.run(None, f)
                ts.append(time.perf_counter() - t0)
            rows.append({"variant": name, "batch": batch, "ms_per_call_median": round(1e3 * float(np.median(ts)), 3),
                         "ms_per_call_min": round(1e3 * float(np.min(ts)), 3), "repeats": reps})
    base = {r["batch"]: r["ms_per_call_median"] for r in rows if r["variant"] == "fp32"}
    for r in rows:
        r["speed_vs_fp32"] = round(base[r["batch"]] / r["ms_per_call_median"], 3)
    return rows


def write_md(path: Path, res: dict) -> None:
    q = [r for r in res["quality"] if "variant" in r]
    lines = [f"# int8 / fp8 bundles: quality at equal calls and ORT CPU latency ({res['model']})", "",
             f"Command: `{res['command']}`  ", f"Load average before / after: {res['loadavg_before']} / {res['loadavg_after']} "
             "(2 shared cores, other engineers' jobs running: latencies are noisy, ratios more than absolutes).  ",
             f"Bundle made by the real exporter in {res['export_seconds']} s; {res['n']} samples, guidance 1, tuned grids; "
             f"reference {res['quality'][0]['reference']} (self-check vs half the calls: "
             f"{res['quality'][0]['self_check_psnr_vs_half_db']} dB).", "",
             "## PSNR against the fp32 RK4 reference (dB), same noise and labels", ""]
    solves = sorted({(r["solver"], r["nfe"]) for r in q}, key=lambda s: SOLVES.index(s))
    names = list(dict.fromkeys(r["variant"] for r in q))
    cell = {(r["variant"], r["solver"], r["nfe"]): r for r in q}
    lines += ["| variant | " + " | ".join(f"{s}@{k}" for s, k in solves) + " |", "|---|" + "---:|" * len(solves)]
    for nm in names:
        vals = []
        for s, k in solves:
            r = cell.get((nm, s, k))
            vals.append("" if r is None else ("NaN" if not r["finite"] else f"{r['psnr_vs_reference_db']:.2f}"))
        lines.append(f"| {nm} | " + " | ".join(vals) + " |")
    lines += ["", "## PSNR against the fp32 bundle's result of the same solver and calls (dB)", "",
              "| variant | " + " | ".join(f"{s}@{k}" for s, k in solves) + " |", "|---|" + "---:|" * len(solves)]
    for nm in names[1:]:
        vals = []
        for s, k in solves:
            r = cell.get((nm, s, k))
            vals.append("" if r is None or r["psnr_vs_fp32_same_solve_db"] is None else f"{r['psnr_vs_fp32_same_solve_db']:.2f}")
        lines.append(f"| {nm} | " + " | ".join(vals) + " |")
    g = res["goal"]
    lines += ["", f"Goal: int8 BA@10 within 1 dB of fp32 BA@10 (vs the reference): fp32 {g['fp32']} dB, "
              f"int8 {g['int8']} dB, gap {g['gap_db']} dB -> {'met' if g['met'] else 'MISSED'}.  ",
              f"Trajectory vs random calibration (same nodes, same rows count), gap at BA@10 / Euler@10: "
              f"{res['calibration_gap_db']} dB (positive: trajectories better).", "",
              "## Trade-off: share of weights in int8 against the held-out gap to fp32 (vs the reference)", "",
              "| int8 nodes | nodes | weights int8 | solve | fp32 dB | int8 dB | gap dB |", "|---|---:|---:|---|---:|---:|---:|"]
    for r in res["tradeoff"]:
        lines.append(f"| {r['variant']} | {r['nodes']} | {r['weights_quantized']} | {r['solve']} | {r['fp32_psnr_db']} | "
                     f"{r['psnr_db']} | {r['gap_db']} |")
    lines += ["", "## Latency per backbone call, ORT CPU, 1 session thread (median ms)", "",
              "| variant | batch | ms / call | speed vs fp32 |", "|---|---:|---:|---:|"]
    for r in res["latency"]:
        lines.append(f"| {r['variant']} | {r['batch']} | {r['ms_per_call_median']} | {r['speed_vs_fp32']} |")
    lines += ["", "Notes: " + ", ".join(f"{k}: {v}" for k, v in res["notes"].items()), "",
              "Not measured here: TensorRT engines (no GPU on this machine); fp8 speed (ORT CPU has no fp8 GEMM: "
              "fp8 Q/DQ runs fake-quantised in fp32, so only its quality means anything)."]
    write_text(path, "\n".join(lines) + "\n")


def dit30m(args, log) -> None:
    """Latency only (a random-init model: its sample quality means nothing): benchmarks/floor.py's
    ~33 M-parameter DiT exported by export_bundle, its fp16 variant (export.precision.convert), and
    two int8 Q/DQ graphs calibrated on its own Euler trajectories (2 samples, 3 calls: the
    calibrator keeps every activation of every row in memory): the classes the digits / SD3 rules
    quantise (body, attention, softmax, final projection; norms, embeddings, input projection fp32)
    and every weight op."""
    import onnx

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import floor
    from anchorflow.export.precision import convert

    before = loadavg()
    with tempfile.TemporaryDirectory(prefix="quant-dit30m-") as tmp:
        folder, info = floor.dit30m_bundle(Path(tmp), 16)
        log("dit30m exported")
        nets = Q.open_nets(folder)
        fmt = nets.fmt
        base = onnx.load(str(fmt.network_file("backbone")))
        fp16 = Path(tmp) / "backbone.fp16.onnx"
        onnx.save(convert(base, "fp16"), str(fp16))
        rows = Q.record_calibration(nets, [Q.config(fmt, "euler", 3)], samples=2)
        state = [i.name for i in fmt.backbone.inputs if i.role == "state"]
        qz = Q.Quantizer(base, "int8", rows, state)
        try:
            body = [n for c in ("body", "attention", "softmax", "final_projection") for n in qz.classes[c]]
            every = [n for c in ("embedding", "input_projection", "body", "attention", "final_projection") for n in qz.classes[c]]
            srcs = {"fp32": None, "fp16": fp16,
                    "int8 (body, attention, final projection)": qz.quantize(nodes=body).SerializeToString(),
                    "int8, every weight op": qz.quantize(nodes=every).SerializeToString()}
            shares = {"int8 (body, attention, final projection)": Q.weight_share(qz.model, body),
                      "int8, every weight op": Q.weight_share(qz.model, every)}
        finally:
            qz.close()
        log("variants made")
        lat = latency(fmt, srcs, repeats=(20, 5))
        log("latency done")
    res = {"model": "dit30m", "command": "python benchmarks/quant_bench.py --model dit30m", "loadavg_before": before,
           "loadavg_after": loadavg(), "cpu_count": os.cpu_count(), "backbone": info, "weights_quantized": shares,
           "latency": lat}
    out = Path(args.out)
    write_json(out / "quant_dit30m.json", res)
    lines = ["# int8 / fp16 / fp32 latency per backbone call, ORT CPU: a ~33 M-parameter DiT (random init)", "",
             f"Command: `{res['command']}`  ", f"Load average before / after: {before} / {res['loadavg_after']} "
             "(2 shared cores, other engineers' jobs running: latencies are noisy, ratios more than absolutes).  ",
             f"Backbone: benchmarks/floor.py's DiT 384 x 12 on [4, 16, 16], {info['backbone_params']:,} parameters, "
             "random init (quality not measured: it means nothing for an untrained model); int8 calibrated on its "
             "own Euler@3 trajectories (2 samples), SmoothQuant alpha "
             f"{Q.SMOOTH_ALPHA}, ORT quantize_static QDQ, 1 session thread, median of 20 (batch 1) / 5 (batch 16).", "",
             "| variant | weights int8 | batch | ms / call | speed vs fp32 |", "|---|---:|---:|---:|---:|"]
    for r in lat:
        lines.append(f"| {r['variant']} | {shares.get(r['variant'], '')} | {r['batch']} | {r['ms_per_call_median']} | "
                     f"{r['speed_vs_fp32']} |")
    write_text(out / "quant_dit30m.md", "\n".join(lines) + "\n")
    log(f"wrote {out / 'quant_dit30m.md'}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=("digits", "sd3", "dit30m"), default="digits")
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--ref", type=int, default=256)
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args()
    t0 = time.perf_counter()
    log = lambda s: print(f"[{time.perf_counter() - t0:6.1f}s] {s}", file=sys.stderr, flush=True)  # noqa: E731
    if args.model == "dit30m":
        return dit30m(args, log)
    before = loadavg()
    with tempfile.TemporaryDirectory(prefix="quant-bench-") as tmp:
        folder, secs = make_bundle(args.model, Path(tmp))
        log("bundle exported")
        meta = read_json(folder / "bundle.json")
        nets = Q.open_nets(folder)
        srcs, extra = variants(folder, nets, meta, log)
        judge = Q.Judge(nets, Q.default_config(nets.fmt), 2, seed=0, reference_steps=4)  # only its .variant() is used
        ev = Eval(nets, args.n, args.ref)
        rows = quality(nets, judge, srcs, ev, log)
        trade = tradeoff(nets, judge, ev, meta, extra["rows"], log)
        lat = latency(nets.fmt, {"fp32": None, "fp16": srcs["fp16"][0], "int8 (bundle)": srcs["int8"][0],
                                 "int8, every weight op (not guarded)": extra["speed_only"]})
        log("latency done")
        guard = meta["networks"]["backbone"]["precisions"]["int8"]["validation"]["guard"]
        sens = meta["networks"]["backbone"]["precisions"]["int8"]["quantization"]["sensitivity"]["class_alone_drop_db"]
        kept = meta["networks"]["backbone"]["precisions"]["int8"]["quantization"]["kept_fp32_classes"]
    cell = {(r["variant"], r["solver"], r["nfe"]): r for r in rows if "variant" in r}
    main_solver = "ba" if ("fp32", "ba", 10) in cell else "euler"
    a, b = cell[("fp32", main_solver, 10)]["psnr_vs_reference_db"], cell[("int8", main_solver, 10)]["psnr_vs_reference_db"]
    gap = {f"{s}@10": round(cell[("int8", s, 10)]["psnr_vs_reference_db"]
                            - (cell[("int8, random calibration", s, 10)]["psnr_vs_reference_db"] or float("nan")), 3)
           for s in ("ba", "euler") if ("int8", s, 10) in cell}
    res = {"model": args.model, "command": "python " + " ".join(shlex.quote(a) for a in ["benchmarks/quant_bench.py", *sys.argv[1:]]),
           "loadavg_before": before, "loadavg_after": loadavg(), "cpu_count": os.cpu_count(), "n": args.n,
           "export_seconds": round(secs, 1), "seconds": round(time.perf_counter() - t0, 1),
           "int8_guard": guard, "int8_class_alone_drop_db": sens, "int8_kept_fp32_classes": kept,
           "goal": {"solve": f"{main_solver}@10", "fp32": a, "int8": b, "gap_db": round(a - b, 3), "met": bool(a - b <= 1.0)},
           "calibration_gap_db": gap, "notes": extra["notes"], "quality": rows, "tradeoff": trade, "latency": lat}
    out = Path(args.out)
    write_json(out / f"quant_{args.model}.json", res)
    write_md(out / f"quant_{args.model}.md", res)
    log(f"wrote {out / f'quant_{args.model}.md'}")


if __name__ == "__main__":
    main()
