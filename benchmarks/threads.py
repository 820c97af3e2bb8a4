"""onnxruntime CPU thread policies for a bundle's two sessions: which one to choose, measured.

For each policy (``session-1``: a pool of 1 non-spinning thread per session;
``session-2-nospin``: 2 non-spinning threads per session; ``session-2``: a pool of 2 spinning
threads per session, onnxruntime's default on 2 cores; ``shared-2``: one
global pool of 2 threads joined by the backbone and SideNet sessions) and batch 1 and 16: the
median latency of one backbone call and of a 10-NFE BA solve (guidance 1.5) on the bundled
digits bundle, quiet and next to a busy neighbour (a second process running the same solve in
a loop). Each policy runs in a fresh process (onnxruntime fixes the global pool per process).

    python benchmarks/threads.py [--repeats 30] [--out benchmarks/results/threads.json]

The machine's load average is recorded with the figures: compare ratios within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
POLICIES = {"session-1": ("session", 1, False), "session-2-nospin": ("session", 2, False),
            "session-2": ("session", 2, True), "shared-2": ("shared", 2, True)}
WORKER = r"""
import json, sys, time, statistics
import numpy as np
from anchorflow.runtime import load_bundle, solve
from anchorflow.runtime.bundles import threads
from anchorflow.modelref import BUNDLED, DEFAULT_NAME
mode, n, batches, repeats, loop = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3]), int(sys.argv[4]), sys.argv[5] == "loop"
spin = len(sys.argv) > 6 and sys.argv[6] == "spin"
pol = threads.configure(n, mode)
if mode == "session":  # spinning on is onnxruntime's own default for per-session pools
    object.__setattr__(pol, "spin", spin)
b = load_bundle(BUNDLED / DEFAULT_NAME / "bundle", backend="ort-cpu", threads=n)
def run(batch):
    x = np.random.default_rng(0).standard_normal((batch, 1, 8, 8)).astype(np.float32)
    y = np.arange(batch) % 10
    return solve("ba", b.velocity, x, 10, sidenet=b.sidenet, y=y, null_label=10, cfg_scale=1.5, cfg_interval=(0, 1))
if loop:
    end = time.time() + 600
    while time.time() < end:
        run(16)
    sys.exit(0)
out = {}
for batch in batches:
    x = np.random.default_rng(0).standard_normal((batch, 1, 8, 8)).astype(np.float32)
    t = np.full(batch, 0.5, np.float32); c = {"y": np.arange(batch) % 10}
    for _ in range(5):
        b.velocity(x, t, c); run(batch)
    call, solve_ms = [], []
    for _ in range(repeats):
        s = time.perf_counter(); b.velocity(x, t, c); call.append(time.perf_counter() - s)
        s = time.perf_counter(); run(batch); solve_ms.append(time.perf_counter() - s)
    out[str(batch)] = {"call_ms": 1e3 * statistics.median(call), "solve_ms": 1e3 * statistics.median(solve_ms)}
print(json.dumps({"policy": pol.describe(), "results": out}))
"""


def measure(mode: str, threads: int, spin: bool, batches: list[int], repeats: int) -> dict:
    proc = subprocess.run([sys.executable, "-c", WORKER, mode, str(threads), json.dumps(batches), str(repeats), "once",
                           "spin" if spin else "nospin"],
                          capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--batches", default="1,16")
    p.add_argument("--out", type=Path, default=RESULTS / "threads.json")
    args = p.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    rows = []
    for neighbour in (False, True):
        busy = None
        if neighbour:  # the same solve in a loop, 1 thread per session like a second tenant would run
            busy = subprocess.Popen([sys.executable, "-c", WORKER, "session", "1", "[]", "0", "loop"])
            time.sleep(3)
        try:
            for name, (mode, n, spin) in POLICIES.items():
                load = os.getloadavg()[0]
                got = measure(mode, n, spin, batches, args.repeats)
                for batch, r in got["results"].items():
                    rows.append({"policy": name, "neighbour": neighbour, "batch": int(batch), "load_1min": round(load, 2),
                                 **{k: round(v, 3) for k, v in r.items()}})
                    print(f"{name:10s} neighbour={neighbour!s:5s} batch={batch:>3s} call {r['call_ms']:7.2f} ms  "
                          f"BA-10 solve {r['solve_ms']:8.2f} ms  (load {load:.1f})", flush=True)
        finally:
            if busy is not None:
                busy.kill()
                busy.wait()
    cmd = "python benchmarks/threads.py " + " ".join(argv if argv is not None else sys.argv[1:])
    from anchorflow.base import _io

    _io.write_json(args.out, {"command": cmd.strip(), "cpus": os.cpu_count(), "rows": rows})
    md = ["| policy | neighbour | batch | call (ms) | BA-10 solve (ms) | load |", "|---|---|---:|---:|---:|---:|"]
    md += [f"| {r['policy']} | {'busy' if r['neighbour'] else 'none'} | {r['batch']} | {r['call_ms']:.2f} | "
           f"{r['solve_ms']:.2f} | {r['load_1min']:.1f} |" for r in rows]
    _io.write_bytes(args.out.with_suffix(".md"), ("\n".join([f"`{cmd.strip()}`", "", *md]) + "\n").encode())


if __name__ == "__main__":
    main()
