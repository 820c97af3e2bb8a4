"""Session creation with and without the cache of onnxruntime's optimised graphs (runtime/bundles/graph_cache.py).

For each network of a bundle (default: the bundled digits bundle), the median time of
``make_session`` over ``--repeats`` rounds, each round timing in turn: no cache
(``ANCHORFLOW_ORT_GRAPH_CACHE=0``: onnxruntime optimises the graph), a cache miss (optimises
and writes the entry) and a cache hit (opens the optimised graph, optimisation off). The rounds
alternate so machine load hits all three alike; the load average is printed with the figures.
A benchmark print, not a test.

    python benchmarks/session_cache.py [--bundle PATH] [--repeats 9]

Writes benchmarks/results/session_cache.json.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from anchorflow.base import _io
from anchorflow.runtime.bundles.backends import make_session
from anchorflow.runtime.bundles.format import read_bundle

RESULTS = Path(__file__).resolve().parent / "results" / "session_cache.json"


def timed(path: Path, sha: str, env: dict) -> float:
    """Seconds to make one CPU session of ``path`` under the cache settings ``env``."""
    os.environ.update(env)
    start = time.perf_counter()
    make_session(path, "ort-cpu", graph_sha256=sha)
    return time.perf_counter() - start


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", default=None, help="a bundle folder (default: the bundled digits bundle)")
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--json", default=str(RESULTS))
    args = ap.parse_args(argv)
    bundle = read_bundle(args.bundle or _default())
    load = os.getloadavg()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, decl in bundle.networks.items():
            path, sha = bundle.network_file(name, "fp32"), decl.sha256
            times = {"no cache": [], "miss": [], "hit": []}
            for i in range(args.repeats + 1):
                root = Path(tmp) / f"{name}-{i}"
                t_off = timed(path, sha, {"ANCHORFLOW_ORT_GRAPH_CACHE": "0"})
                t_miss = timed(path, sha, {"ANCHORFLOW_ORT_GRAPH_CACHE": "1", "ANCHORFLOW_CACHE": str(root)})
                t_hit = timed(path, sha, {"ANCHORFLOW_ORT_GRAPH_CACHE": "1", "ANCHORFLOW_CACHE": str(root)})
                shutil.rmtree(root)
                if i:  # round 0 warms the file cache and onnxruntime
                    for k, v in zip(times, (t_off, t_miss, t_hit)):
                        times[k].append(v)
            med = {k: 1e3 * statistics.median(v) for k, v in times.items()}
            row = {"network": name, "onnx_mb": round(path.stat().st_size / 2**20, 2),
                   **{f"{k.replace(' ', '_')}_ms": round(v, 2) for k, v in med.items()},
                   "speedup_hit": round(med["no cache"] / med["hit"], 2)}
            rows.append(row)
            print(f"{name}: {row['onnx_mb']} MB; no cache {med['no cache']:.1f} ms, miss {med['miss']:.1f} ms, "
                  f"hit {med['hit']:.1f} ms: {row['speedup_hit']:.2f}x faster from the cache", flush=True)
    out = {"command": "python benchmarks/session_cache.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "bundle": str(bundle.folder), "repeats": args.repeats, "load_before": load,
           "load_after": os.getloadavg(), "rows": rows}
    print(f"load average {load[0]:.2f} -> {out['load_after'][0]:.2f}")
    _io.write_json(args.json, out)
    return out


def _default() -> Path:
    from anchorflow.modelref import BUNDLED, DEFAULT_NAME

    return BUNDLED / DEFAULT_NAME / "bundle"


if __name__ == "__main__":
    main()
