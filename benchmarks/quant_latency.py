"""fp32 / fp16 / int8 latency per backbone call on ORT CPU: the three models side by side, one run.

benchmarks/quant_bench.py measures each model in its own run (``--model digits|sd3|dit30m``), so
machine-load drift between runs lands in the comparison. This script builds, in one process, every
model's variants exactly as quant_bench.py does (its ``make_bundle`` / ``variants(extras=False)`` /
``dit30m_variants``: the digits bundle + ``add_quantized``; ``anchorflow export --precision
fp32,fp16,int8`` of the SD3-on-digits transformer; floor.py's random-init ~33 M-parameter DiT with
its fp16 conversion and trajectory-calibrated int8), opens one 1-thread ORT CPU session per variant,
warms each up, then times one call of every (model, variant, batch) per repeat, round-robin in a
freshly shuffled order each repeat (seeded), so load drift hits all cells alike. Medians.

Variants: fp32, fp16, int8 (digits / SD3: the bundle's int8, the file the exporter's measured
rule chose and its guard passed; dit30m: the classes those rules quantise), and int8 with every
weight op quantised (the speed bound, not quality-guarded). Quality is not measured here (it stays
in benchmarks/results/quant_{digits,sd3}.md).

    nice -n 5 python benchmarks/quant_latency.py [--models digits,sd3,dit30m] [--repeats 30,12]
Writes benchmarks/results/quant_latency.json and .md with the command and /proc/loadavg before/after.
"""

from __future__ import annotations

import argparse
import os
import random
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quant_bench as QB  # noqa: E402

from anchorflow.base._io import read_json, write_json, write_text  # noqa: E402
from anchorflow.export import quantize as Q  # noqa: E402

MODELS = ("digits", "sd3", "dit30m")
LABELS = {"digits": "digits DiT (bundled)", "sd3": "SD3-on-digits", "dit30m": "DiT ~33 M (random init)"}


def build(model: str, work: Path, log) -> tuple:
    """(fmt, [(variant, src, int8 weight share or None)], info) for one model, built as quant_bench.py does."""
    work.mkdir(parents=True, exist_ok=True)
    if model == "dit30m":
        fmt, srcs, shares, info = QB.dit30m_variants(work, log)
        names = {"int8 (body, attention, final projection)": "int8", "int8, every weight op": "int8, every weight op"}
        return fmt, [(names.get(k, k), v, shares.get(k)) for k, v in srcs.items()], {
            "backbone_params": info["backbone_params"], "export_s": info["export_s"]}
    folder, secs = QB.make_bundle(model, work)
    log(f"{model} bundle exported ({secs:.0f} s)")
    meta = read_json(folder / "bundle.json")
    nets = Q.open_nets(folder)
    srcs, extra = QB.variants(folder, nets, meta, log, extras=False)
    notes = extra["notes"]
    out = [("fp32", None, None), ("fp16", srcs["fp16"][0], None),
           ("int8", srcs["int8"][0], notes["int8_weights_quantized"]),
           ("int8, every weight op", extra["speed_only"], notes["int8_all_weight_ops_weights_quantized"])]
    return nets.fmt, out, {"export_s": round(secs, 1), "int8_quantized_nodes": notes["int8_quantized_nodes"],
                           "int8_all_weight_ops_nodes": notes["int8_all_weight_ops_nodes"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--repeats", default="30,12", help="timed calls per cell, per batch")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0, help="seed of the per-repeat shuffle")
    ap.add_argument("--out", default=str(QB.OUT))
    args = ap.parse_args()
    models = [m for m in args.models.split(",") if m]
    bad = [m for m in models if m not in MODELS]
    if bad:
        raise SystemExit(f"error: unknown model {bad[0]!r} (choose from {', '.join(MODELS)})")
    batches = [int(b) for b in args.batches.split(",")]
    reps = dict(zip(batches, (int(r) for r in args.repeats.split(","))))
    if len(reps) != len(batches):
        raise SystemExit("error: --repeats needs one count per batch")
    t0 = time.perf_counter()
    log = lambda s: print(f"[{time.perf_counter() - t0:6.1f}s] {s}", file=sys.stderr, flush=True)  # noqa: E731
    loadavg_before = QB.loadavg()
    cells, info = [], {}
    with tempfile.TemporaryDirectory(prefix="quant-latency-") as tmp:
        for m in models:
            fmt, vs, info[m] = build(m, Path(tmp) / m, log)
            feeds = {b: QB.latency_feeds(fmt, b) for b in batches}
            for name, src, share in vs:
                sess = QB.latency_session(fmt, src)
                for b in batches:
                    f = QB.session_feeds(sess, feeds[b])
                    cells.append({"model": m, "variant": name, "batch": b, "share": share, "sess": sess, "feeds": f,
                                  "ts": []})
            log(f"{m}: {len(vs)} variants ready")
        build_s = time.perf_counter() - t0
        load_timing_before = QB.loadavg()
        for c in cells:
            for _ in range(args.warmup):
                c["sess"].run(None, c["feeds"])
        log("warm; timing round-robin")
        rng = random.Random(args.seed)
        t1 = time.perf_counter()
        for i in range(max(reps.values())):
            order = [c for c in cells if i < reps[c["batch"]]]
            rng.shuffle(order)
            for c in order:
                s = time.perf_counter()
                c["sess"].run(None, c["feeds"])
                c["ts"].append(time.perf_counter() - s)
        timing_s = time.perf_counter() - t1
        log(f"timed in {timing_s:.0f} s")
    base = {(c["model"], c["batch"]): float(np.median(c["ts"])) for c in cells if c["variant"] == "fp32"}
    rows = []
    for c in cells:
        med = float(np.median(c["ts"]))
        rows.append({"model": c["model"], "variant": c["variant"], "batch": c["batch"],
                     "int8_weights_share": c["share"], "ms_per_call_median": round(1e3 * med, 3),
                     "ms_per_call_min": round(1e3 * float(np.min(c["ts"])), 3), "repeats": len(c["ts"]),
                     "speed_vs_fp32": round(base[(c["model"], c["batch"])] / med, 3)})
    cmd = "nice -n 5 python " + " ".join(shlex.quote(a) for a in ["benchmarks/quant_latency.py", *sys.argv[1:]])
    res = {"command": cmd, "niceness": os.nice(0), "loadavg_before": loadavg_before,
           "loadavg_before_timing": load_timing_before, "loadavg_after": QB.loadavg(), "cpu_count": os.cpu_count(),
           "session_threads": 1, "warmup": args.warmup, "repeats_per_batch": reps, "shuffle_seed": args.seed,
           "build_seconds": round(build_s, 1), "timing_seconds": round(timing_s, 1),
           "seconds": round(time.perf_counter() - t0, 1), "models": info, "latency": rows}
    out = Path(args.out)
    write_json(out / "quant_latency.json", res)
    write_md(out / "quant_latency.md", res)
    log(f"wrote {out / 'quant_latency.md'}")


def write_md(path: Path, res: dict) -> None:
    reps = ", ".join(f"{n} (batch {b})" for b, n in res["repeats_per_batch"].items())
    lines = ["# fp32 / fp16 / int8 latency per backbone call, ORT CPU, three models in one run (issue 28)", "",
             f"Command: `{res['command']}` (niceness {res['niceness']})  ",
             f"Load average before build / before timing / after: {res['loadavg_before']} / "
             f"{res['loadavg_before_timing']} / {res['loadavg_after']} ({res['cpu_count']} shared cores, other "
             "engineers' jobs running: absolutes are noisy; the ratios are what the interleaving protects).  ",
             f"One process: variants built as benchmarks/quant_bench.py builds them ({res['build_seconds']} s), one "
             f"1-thread ORT CPU session each, {res['warmup']} warm-up calls, then {reps} timed calls per cell, "
             "round-robin over every (model, variant, batch) with the order shuffled each repeat "
             f"({res['timing_seconds']} s). Median ms per backbone call; speed = fp32 median / variant median "
             "(same model, same batch). Weights int8 = share of the weight-op parameters (MatMul/Gemm/Conv) "
             "in quantised nodes.", "",
             "| model | variant | weights int8 | batch | ms / call | speed vs fp32 |", "|---|---|---:|---:|---:|---:|"]
    for r in sorted(res["latency"], key=lambda r: (MODELS.index(r["model"]), r["batch"])):
        share = "" if r["int8_weights_share"] is None else f"{r['int8_weights_share']:.3f}"
        lines.append(f"| {LABELS[r['model']]} | {r['variant']} | {share} | {r['batch']} | "
                     f"{r['ms_per_call_median']:.3f} | {r['speed_vs_fp32']:.2f} |")
    lines += ["", "## int8 vs fp32 (speed ratio, >1 = int8 faster)", "",
              "| model | batch | int8 | int8, every weight op |", "|---|---:|---:|---:|"]
    cell = {(r["model"], r["variant"], r["batch"]): r["speed_vs_fp32"] for r in res["latency"]}
    for m in [m for m in MODELS if m in res["models"]]:
        for b in res["repeats_per_batch"]:
            lines.append(f"| {LABELS[m]} | {b} | {cell.get((m, 'int8', b), '')} | "
                         f"{cell.get((m, 'int8, every weight op', b), '')} |")
    lines += ["", "Models: " + "; ".join(f"{m}: " + ", ".join(f"{k} {v}" for k, v in i.items())
                                        for m, i in res["models"].items()) + ".  ",
              "int8 = digits / SD3: the bundle's int8 (the nodes the exporter's measured rule chose, guard passed); "
              "dit30m (random init, no quality rule possible): the classes those rules quantise (body, attention, "
              "softmax, final projection). 'every weight op' is the speed bound, not quality-guarded. Quality: "
              "benchmarks/results/quant_digits.md, quant_sd3.md. Not measured: TensorRT (no GPU here)."]
    write_text(path, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
