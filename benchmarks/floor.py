"""How close is sampling to its physical floor: NFE x one backbone call?

For Euler, AB2 and BA at NFE 5 and 10, batch 1 / 16 / 256, guidance 1.0 and 1.5 (interval
(0, 0.7], the BA authors' default), on the bundled digits bundle (ORT CPU): the median solve
latency divided by the floor, the sum over the solve's backbone calls of one call's median
latency at that call's rows (B rows, or 2B where guidance is on), at the same batch and
threads; with the split backbone / SideNet / other (the runtime's own timing). Goals (issue
18): Euler <= 1.05, BA <= 1.25, other <= 5 % at batch 1.

Then peak memory of ``anchorflow sample default --solver ba --nfe 5 --n 4096 --npy out.npy``
(goal <= 600 MiB) and whether its output equals an unchunked solve (one onnxruntime call per
network evaluation on every row, same seed).

    python benchmarks/floor.py [--repeats 7] [--skip-memory]

Writes benchmarks/results/floor.json and floor.md; the load average is recorded with them.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from anchorflow import _io
from anchorflow.modelref import BUNDLED, DEFAULT_NAME
from anchorflow.runtime import load_bundle, solve

RESULTS = Path(__file__).resolve().parent / "results"
BUNDLE = BUNDLED / DEFAULT_NAME / "bundle"
INTERVAL = (0.0, 0.7)


class Rows:
    """Records the rows of every backbone call (to price the floor call by call)."""

    def __init__(self, velocity) -> None:
        self.velocity, self.rows = velocity, []

    def __call__(self, x, t, cond):
        self.rows.append(int(x.shape[0]))
        return self.velocity(x, t, cond)


def call_ms(velocity, rows: int, repeats: int) -> float:
    x = np.random.default_rng(0).standard_normal((rows, 1, 8, 8)).astype(np.float32)
    t, c = np.full(rows, 0.5, np.float32), {"y": np.arange(rows) % 10}
    for _ in range(3):
        velocity(x, t, c)
    out = []
    for _ in range(repeats):
        s = time.perf_counter()
        velocity(x, t, c)
        out.append(time.perf_counter() - s)
    return 1e3 * statistics.median(out)


def floor_rows(b, args) -> list[dict]:
    rows, prices = [], {}
    for batch in args.batches:
        noise = np.random.default_rng(0).standard_normal((batch, 1, 8, 8)).astype(np.float32)
        y = np.arange(batch) % 10
        for cfg in args.cfg:
            for method in args.solvers:
                for nfe in args.nfe:
                    counted = Rows(b.velocity)
                    kw = dict(y=y, null_label=10, cfg_scale=cfg, cfg_interval=INTERVAL,
                              sidenet=b.sidenet if method == "ba" else None)
                    solve(method, counted, noise, nfe, **kw)  # warm-up, and the rows of each call
                    runs = [solve(method, b.velocity, noise, nfe, **kw) for _ in range(args.repeats)]
                    for r in set(counted.rows):
                        if r not in prices:
                            prices[r] = call_ms(b.velocity, r, max(args.repeats, 10))
                    floor = sum(prices[r] for r in counted.rows)
                    total = statistics.median(1e3 * r.timing.total_s for r in runs)
                    bb = statistics.median(1e3 * r.timing.backbone_s for r in runs)
                    sn = statistics.median(1e3 * r.timing.sidenet_s for r in runs)
                    row = dict(method=method, nfe=nfe, batch=batch, cfg=cfg, solve_ms=round(total, 3),
                               floor_ms=round(floor, 3), ratio=round(total / floor, 3), backbone_ms=round(bb, 3),
                               sidenet_ms=round(sn, 3), other_frac=round(max(total - bb - sn, 0.0) / total, 4),
                               rows_per_call=counted.rows)
                    rows.append(row)
                    print(f"{method:5s} nfe={nfe:2d} batch={batch:3d} cfg={cfg:.1f}: {total:8.2f} ms / floor {floor:8.2f}"
                          f" = {row['ratio']:.2f}x (SideNet {sn:.2f} ms, other {100 * row['other_frac']:.1f} %)",
                          flush=True)
    return rows


def memory_check(n: int = 4096) -> dict:
    """Peak RSS of the CLI run, and its output against an unchunked solve in this process."""
    with tempfile.TemporaryDirectory() as tmp:
        npy = Path(tmp) / "out.npy"
        cmd = [sys.executable, "-c", "from anchorflow.cli import main; main()", "sample", "default", "--solver", "ba", "--nfe", "5", "--n", str(n),
               "--npy", str(npy), "--out", str(Path(tmp) / "out.png")]
        before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        subprocess.run(cmd, check=True, capture_output=True)
        peak_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        chunked = np.load(npy)
    import onnxruntime as ort

    from anchorflow.sampling import start_noise

    # unchunked: the raw sessions, every network evaluation in ONE call on all rows
    sess = {k: ort.InferenceSession(str(BUNDLE / f"{k}.onnx"), providers=["CPUExecutionProvider"])
            for k in ("backbone", "sidenet")}
    vel = lambda x, t, c: sess["backbone"].run(None, {"x": x, "t": t, "y": c["y"]})[0]  # noqa: E731
    side = lambda x, v, t, h, c: sess["sidenet"].run(None, {"x": x, "v": v, "t": t, "h": h, "y": c["y"]})[0]  # noqa: E731
    from anchorflow.runtime.tuned import read_tuning

    tuned = read_tuning(BUNDLE)  # sample's default grid: the bundle's tuned one for (ba, 5), else uniform
    grid = None if tuned is None or tuned.grid_for("ba", 5) is None else np.asarray(tuned.grid_for("ba", 5).times)
    noise = start_noise(0, n, (1, 8, 8))
    whole = solve("ba", vel, noise, 5, sidenet=side, y=np.arange(n) % 10, null_label=10, grid=grid).x
    return {"command": f"anchorflow sample default --solver ba --nfe 5 --n {n} --npy out.npy", "n": n, "peak_rss_mib": round(peak_mib, 1),
            "measured_before_mib": round(before / 1024, 1), "goal_mib": 600,
            "max_abs_diff_vs_unchunked": float(np.abs(chunked - whole).max()),
            "identical": bool(np.array_equal(chunked, whole))}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--solvers", default="euler,ab2,ba")
    p.add_argument("--nfe", default="5,10")
    p.add_argument("--batches", default="1,16,256")
    p.add_argument("--cfg", default="1.0,1.5")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--skip-memory", action="store_true")
    args = p.parse_args(argv)
    args.solvers = args.solvers.split(",")
    args.nfe = [int(v) for v in args.nfe.split(",")]
    args.batches = [int(v) for v in args.batches.split(",")]
    args.cfg = [float(v) for v in args.cfg.split(",")]
    load = os.getloadavg()
    b = load_bundle(BUNDLE, backend="ort-cpu", threads=args.threads)
    from anchorflow.runtime.threads import policy

    rows = floor_rows(b, args)
    mem = None if args.skip_memory else memory_check()
    if mem:
        print(f"sample --n 4096: peak RSS {mem['peak_rss_mib']} MiB (goal 600), identical to unchunked: {mem['identical']}"
              f" (max abs diff {mem['max_abs_diff_vs_unchunked']:.3g})")
    cmd = "python benchmarks/floor.py " + " ".join(argv if argv is not None else sys.argv[1:])
    out = {"command": cmd.strip(), "threads": policy().describe(), "load_before": load, "load_after": os.getloadavg(),
           "rows": rows, "memory": mem}
    _io.write_json(RESULTS / "floor.json", out)
    md = [f"`{cmd.strip()}` ({out['threads']}; load {load[0]:.1f} -> {out['load_after'][0]:.1f})", "",
          "| solver | NFE | batch | cfg | solve (ms) | floor (ms) | ratio | SideNet (ms) | other |",
          "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    md += [f"| {r['method']} | {r['nfe']} | {r['batch']} | {r['cfg']} | {r['solve_ms']:.2f} | {r['floor_ms']:.2f} | "
           f"{r['ratio']:.2f} | {r['sidenet_ms']:.2f} | {100 * r['other_frac']:.1f} % |" for r in rows]
    if mem:
        md += ["", f"`{mem['command']}`: peak RSS {mem['peak_rss_mib']} MiB (goal 600); identical to an unchunked solve: "
               f"{mem['identical']} (max abs diff {mem['max_abs_diff_vs_unchunked']:.3g})"]
    _io.write_bytes(RESULTS / "floor.md", ("\n".join(md) + "\n").encode())


if __name__ == "__main__":
    main()
