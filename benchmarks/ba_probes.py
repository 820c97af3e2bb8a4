"""BA-solver ablation on the bundled digits model: merged probes (N SideNet calls) against the paper's (2N - 1).

Same noise (the benchmark's seed 0, first ``--n`` samples), labels and grid for both; PSNR
against a plain-RK4 reference (``--reference-steps`` steps, float64 states), guidance 1.0 and 1.5,
on the uniform grid and on the bundle's tuned BA grid for each budget (the grid ``sample`` uses by
default; tuned for the merged probes at guidance 1.0). Time convention: t = 1 noise, t = 0 data.

    python benchmarks/ba_probes.py [--n 32] [--reference-steps 128]

Writes benchmarks/results/digits/ba_probes.json.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

from anchorflow.base import _io
from anchorflow.bench.evaluate import data_range
from anchorflow.bench.plan import make_inputs
from anchorflow.bench.reference import Guidance, _solve_once
from anchorflow.bench.results import machine_info
from anchorflow.modelref import open_model
from anchorflow.runtime.evaluation import metrics as M
from anchorflow.runtime import solve
from anchorflow.runtime.bundles.tuned_grids import read_tuning

RESULTS = Path(__file__).resolve().parent / "results" / "digits" / "ba_probes.json"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--reference-steps", type=int, default=128)
    ap.add_argument("--nfe", default="3,4,5,6,7,8,10")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    m = open_model("default", backend="ort-cpu")
    noise, y = make_inputs(m.meta["state_shape"], int(m.meta["num_classes"]), 128, 0)
    noise, y = noise[: args.n], y[: args.n]
    tuning = read_tuning(m.files.bundle) if m.files.bundle is not None else None
    rows = []
    for cfg in (1.0, 1.5):
        ref, _ = _solve_once(m.velocity, noise, Guidance(y, cfg, (0.0, 1.0), m.meta["null_label"]), "rk4",
                             args.reference_steps)
        for nfe in (int(k) for k in args.nfe.split(",")):
            tuned = None if tuning is None else tuning.grid_for("ba", nfe)
            grids = [("uniform", "uniform")] + ([] if tuned is None else [(tuned.spec, np.asarray(tuned.times))])
            for name, grid in grids:
                row = {"cfg": cfg, "nfe": nfe, "grid": name}
                for probes in ("merged", "paper"):
                    res = solve("ba", m.velocity, noise, nfe, y=y, sidenet=m.sidenet, cfg_scale=cfg,
                                null_label=m.meta["null_label"], probes=probes, grid=grid)
                    row[probes] = {"psnr": M.psnr(res.x, ref, data_range(m)), "sidenet_calls": res.sidenet_calls}
                row["merged_minus_paper_db"] = row["merged"]["psnr"] - row["paper"]["psnr"]
                rows.append(row)
                print(f"cfg {cfg:g} nfe {nfe} grid {name}: merged {row['merged']['psnr']:.2f} dB "
                      f"({row['merged']['sidenet_calls']} SideNet calls), paper {row['paper']['psnr']:.2f} dB "
                      f"({row['paper']['sidenet_calls']})")
    out = {"command": " ".join(["benchmarks/ba_probes.py", *(argv if argv is not None else sys.argv[1:])]),
           "n": args.n, "reference": f"rk4:{args.reference_steps}", "grids": "uniform and the bundle's tuned ba@N",
           "rows": rows,
           "worst_merged_minus_paper_db": min(r["merged_minus_paper_db"] for r in rows),
           "machine": machine_info(m), "load_average_1_5_15": list(os.getloadavg())}
    _io.write_json(args.out, out)
    print(f"worst merged - paper: {out['worst_merged_minus_paper_db']:+.2f} dB; wrote {args.out}")
    return out


if __name__ == "__main__":
    main()
