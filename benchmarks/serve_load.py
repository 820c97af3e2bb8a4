"""Load benchmark of `anchorflow serve` on loopback: latency and throughput vs concurrent clients.

Workload: single-sample requests (n = 1 by default) of one kind, ``{"solver": "ba", "nfe": 6,
"cfg": 1.5, "labels": [i % 10], "seed": i}`` on the bundled digits bundle (ORT CPU). For each
client count C (1, 8, 32) the service (Ray local, one replica) gets C client threads sending
requests back to back, bounded by ``--requests`` per level and ``--seconds`` per level; the
baseline runs the same requests one by one in this process (open_model + solve, no HTTP). The
batching gain is the service's throughput at 32 clients over the baseline's. Machine load
(`uptime`) is recorded before and after: figures from a loaded machine are noisy. Both sides run
onnxruntime with ``--threads`` intra-op threads (1 by default: the replica's one reserved CPU;
on a busy 2-core machine a second spinning thread makes a lone solve ~3x slower).

    python benchmarks/serve_load.py [--clients 1,8,32] [--requests 200] [--seconds 60] [--n 1]

Writes benchmarks/results/serve_load.json and serve_load.md (``--name`` changes the stem).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from anchorflow.base import _io

RESULTS = Path(__file__).resolve().parent / "results"


def body(i: int, args) -> dict:
    return {"solver": args.solver, "nfe": args.nfe, "n": args.n, "labels": [i % 10], "cfg": args.cfg, "seed": i}


def summary(lat_s: list[float], wall_s: float, n: int) -> dict:
    lat = np.asarray(lat_s) * 1e3
    return {"requests": len(lat_s), "wall_s": round(wall_s, 3), "p50_ms": round(float(np.percentile(lat, 50)), 1),
            "p99_ms": round(float(np.percentile(lat, 99)), 1), "req_per_s": round(len(lat_s) / wall_s, 2),
            "samples_per_s": round(len(lat_s) * n / wall_s, 2)}


def baseline(args) -> dict:
    """The same requests one by one in this process: what a caller without the service does."""
    from anchorflow.modelref import open_model
    from anchorflow.runtime import solve
    from anchorflow.sampling import cycle_labels, start_noise

    m = open_model("default", backend="ort-cpu", need_sidenet=True, threads=args.threads)
    lat, start = [], time.perf_counter()
    for i in range(args.requests):
        t0 = time.perf_counter()
        b = body(i, args)
        solve(b["solver"], m.velocity, start_noise(b["seed"], b["n"], m.meta["state_shape"]), b["nfe"],
              y=cycle_labels(b["labels"], b["n"], m.meta["num_classes"]), sidenet=m.sidenet,
              cfg_scale=b["cfg"], null_label=m.meta["null_label"], grid="uniform")
        lat.append(time.perf_counter() - t0)
        if time.perf_counter() - start > args.seconds:
            break
    return summary(lat, time.perf_counter() - start, args.n)


def load(client, clients: int, args, offset: int) -> dict:
    """``clients`` threads, each sending its share of the requests back to back."""
    before = client.stats()
    deadline = time.perf_counter() + args.seconds
    counter = iter(range(args.requests))
    lat: list[float] = []
    failures: list[int] = []

    def worker() -> None:
        for i in counter:
            if time.perf_counter() > deadline:
                return
            t0 = time.perf_counter()
            status, _, _ = client.sample(body(offset + i, args))
            if status == 200:
                lat.append(time.perf_counter() - t0)
            else:
                failures.append(status)

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        for f in [pool.submit(worker) for _ in range(clients)]:
            f.result()
    wall = time.perf_counter() - start
    after = client.stats()
    solves = after["solves"] - before["solves"]
    out = summary(lat, wall, args.n)
    out.update(clients=clients, failures=len(failures), solves=solves,
               requests_per_solve=round((after["requests"] - before["requests"]) / max(1, solves), 2))
    return out


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def markdown(res: dict) -> str:
    lines = [f"# `anchorflow serve` load benchmark (loopback, {res['workload']})", "",
             f"Command: `{res['command']}`", "",
             f"Machine load: before `{res['uptime_before']}`; after `{res['uptime_after']}`", "",
             "| run | clients | requests | p50 (ms) | p99 (ms) | requests/s | requests per solve | failures |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    b = res["baseline"]
    lines.append(f"| one by one, in process | 1 | {b['requests']} | {b['p50_ms']} | {b['p99_ms']} | {b['req_per_s']} | 1 | 0 |")
    for r in res["service"]:
        lines.append(f"| service | {r['clients']} | {r['requests']} | {r['p50_ms']} | {r['p99_ms']} | {r['req_per_s']} | "
                     f"{r['requests_per_solve']} | {r['failures']} |")
    lines += ["", f"Batching gain at {res['gain_clients']} clients (service throughput / one-by-one throughput): "
              f"**{res['gain']:.2f}x**.", ""]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", default="1,8,32")
    p.add_argument("--requests", type=int, default=200, help="most requests per level")
    p.add_argument("--seconds", type=float, default=60.0, help="most seconds per level")
    p.add_argument("--solver", default="ba")
    p.add_argument("--nfe", type=int, default=6)
    p.add_argument("--cfg", type=float, default=1.5)
    p.add_argument("--n", type=int, default=1, help="samples per request")
    p.add_argument("--batch-wait-ms", type=float, default=5.0)
    p.add_argument("--num-cpus", type=int, default=2)
    p.add_argument("--threads", type=int, default=1,
                   help="onnxruntime threads, the same for the one-by-one baseline and the service's replica")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--name", default="serve_load", help="results file stem")
    args = p.parse_args()
    from anchorflow.serve.client import ServiceProcess

    levels = [int(c) for c in args.clients.split(",")]
    res = {"command": "python benchmarks/serve_load.py " + " ".join(sys.argv[1:]), "uptime_before": uptime(),
           "workload": f"{args.solver} NFE {args.nfe}, cfg {args.cfg:g}, n={args.n} per request, bundled digits, ORT CPU"}
    res["baseline"] = baseline(args)
    print("one by one:", res["baseline"], flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        with ServiceProcess(["default", "--num-cpus", str(args.num_cpus), "--backend", "ort-cpu",
                             "--batch-wait-ms", str(args.batch_wait_ms), "--bandit-dir", tmp,
                             "--threads", str(args.threads)], cwd=tmp,
                            log=str(Path(tmp) / "serve.log")) as svc:
            load(svc.client, 1, argparse.Namespace(**{**vars(args), "requests": 8}), 10**6)  # warm-up
            res["service"] = []
            for i, c in enumerate(levels):
                r = load(svc.client, c, args, offset=(i + 1) * 10**5)
                print("service:", r, flush=True)
                res["service"].append(r)
    res["uptime_after"] = uptime()
    top = max(res["service"], key=lambda r: r["clients"])
    res["gain_clients"], res["gain"] = top["clients"], top["req_per_s"] / res["baseline"]["req_per_s"]
    out = Path(args.out)
    _io.write_json(out / f"{args.name}.json", res)
    _io.write_text(out / f"{args.name}.md", markdown(res))
    print(markdown(res))


if __name__ == "__main__":
    main()
