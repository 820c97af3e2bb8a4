"""SideNet cost at scale: its share of backbone time per BA interval, on ORT CPU.

Subject: a DiT-S/2-sized backbone (our DiT, hidden 384, depth 12, 6 heads, patch 2, 4 x 32 x 32
latent, 1000 classes: ~33 M parameters, random init -- cost does not depend on the weights) and
SideNets sized to 1.5 % of it (``sidenet_arch(..., ratio=0.015)``) whose body runs at full
resolution (patch 1, the paper's body), at the backbone's patch resolution (patch 2: space-to-
depth stem, the default for large latents) and coarser (patch 4). Both nets are exported with
anchorflow's exporter and timed with onnxruntime on the CPU, 1 intra-op thread.

Per BA interval (runtime/solving/solvers/ba.py) the backbone runs once on B rows and the SideNet, with
the default merged probes, ONCE on 4B rows (backward probe -a h and the next forward probe a h',
(1 - a) h', h'); with the paper's probes once on 3B rows (forward probe) and once on B rows
(backward probe). The figures are ``side(4B) / backbone(B)`` (merged, what ``solve("ba")`` runs)
and ``(side(3B) + side(B)) / backbone(B)`` (paper), medians of ``--repeats`` rounds after one
warm-up; each round times the backbone and every SideNet call back to back, so machine load hits
numerator and denominator alike. Goal: <= 10 % at batch 1 and 16.

    python benchmarks/sidenet_cost.py [--batches 1,16] [--patches 1,2,4] [--repeats 5]

Writes benchmarks/results/sidenet_cost.json (with ``uptime`` load before and after).
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from anchorflow.base import _io
from anchorflow.bench import machine_info

RESULTS = Path(__file__).resolve().parent / "results" / "sidenet_cost.json"
GOAL = 0.10
DIT_S = {"type": "dit", "state_shape": [4, 32, 32], "num_classes": 1000, "hidden": 384, "depth": 12, "heads": 6,
         "patch": 2}


def _session(path: Path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = 1, 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _latencies(calls: dict, repeats: int) -> dict:
    """Median seconds of each ``name -> (session, feeds)`` call, timed round-robin ``repeats`` times."""
    for sess, feeds in calls.values():
        sess.run(None, feeds)  # warm-up
    times: dict = {name: [] for name in calls}
    for _ in range(repeats):
        for name, (sess, feeds) in calls.items():
            start = time.perf_counter()
            sess.run(None, feeds)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def _feeds(names, rows: int, shape, rng) -> dict:
    out = {}
    for name in names:
        if name in ("x", "v"):
            out[name] = rng.standard_normal((rows, *shape)).astype(np.float32)
        elif name in ("t", "h"):
            out[name] = rng.uniform(0.1, 0.9, rows).astype(np.float32)
        else:
            out[name] = rng.integers(0, 1000, rows).astype(np.int64)
    return out


def _export(module, spec, path: Path, max_batch: int) -> Path:
    import onnx

    from anchorflow.export.onnx_export import export_onnx

    proto = export_onnx(module, spec, tuple(DIT_S["state_shape"]), DIT_S["num_classes"], max_batch=max_batch)
    onnx.save(proto, str(path))
    return path


def uptime() -> str:
    try:
        return Path("/proc/loadavg").read_text().split(" ", 3)[:3].__str__()
    except OSError:
        return "unknown"


def main() -> dict:
    import torch

    from anchorflow.export.onnx_export import BACKBONE, SIDENET
    from anchorflow.trainers.backbone import build_backbone
    from anchorflow.trainers.sidenet import SideNet, count_params, sidenet_arch

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--patches", default="1,2,4")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", default=str(RESULTS))
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    patches = [int(p) for p in args.patches.split(",")]
    torch.set_num_threads(1)
    torch.manual_seed(0)
    load_before = uptime()
    backbone = build_backbone(DIT_S).eval()
    n_back = count_params(backbone)
    rng = np.random.default_rng(0)
    shape = tuple(DIT_S["state_shape"])
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        bsess = _session(_export(backbone, BACKBONE, Path(tmp) / "backbone.onnx", max(batches)))
        sides = {}
        for p in patches:
            arch = sidenet_arch(backbone, ratio=0.015, backbone_params=n_back, patch=p)
            side = SideNet(arch).eval()
            sides[p] = (arch, count_params(side), _session(_export(side, SIDENET, Path(tmp) / f"sidenet_p{p}.onnx",
                                                                    max(batches))))
        for b in batches:
            calls = {"backbone": (bsess, _feeds(BACKBONE.inputs, b, shape, rng))}
            for p, (_, _, ssess) in sides.items():
                for k in (1, 3, 4):
                    calls[(p, k)] = (ssess, _feeds(SIDENET.inputs, k * b, shape, rng))
            ms = {name: 1e3 * sec for name, sec in _latencies(calls, args.repeats).items()}
            for p, (arch, params, _) in sides.items():
                merged, paper = ms[(p, 4)] / ms["backbone"], (ms[(p, 3)] + ms[(p, 1)]) / ms["backbone"]
                rows.append({"patch": p, "batch": b, "width": arch["width"], "blocks": arch["blocks"],
                             "sidenet_params": params, "param_ratio": params / n_back,
                             "backbone_ms": round(ms["backbone"], 2), "sidenet_4b_ms": round(ms[(p, 4)], 2),
                             "sidenet_3b_ms": round(ms[(p, 3)], 2), "sidenet_b_ms": round(ms[(p, 1)], 2),
                             "share_per_interval": round(merged, 4), "share_per_interval_paper_probes": round(paper, 4),
                             "within_goal": merged <= GOAL})
                print(f"patch {p} batch {b:>2}: SideNet {params:,} params ({100 * params / n_back:.2f} %), "
                      f"backbone {ms['backbone']:.1f} ms; merged {ms[(p, 4)]:.1f} ms = {100 * merged:.1f} %, "
                      f"paper {ms[(p, 3)]:.1f} + {ms[(p, 1)]:.1f} ms = {100 * paper:.1f} % per BA interval", flush=True)
    result = {"command": shlex.join(["python", *sys.argv]), "backbone": {**DIT_S, "params": n_back},
              "goal_share": GOAL, "threads": 1, "provider": "CPUExecutionProvider", "repeats": args.repeats,
              "loadavg_before": load_before, "loadavg_after": uptime(), "machine": machine_info(None), "rows": rows}
    _io.write_json(args.json, result)
    return result


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
