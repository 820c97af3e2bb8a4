"""How well does ``Result.error_estimate`` rank samples by their true error?

Per model, solver and NFE: the Spearman rank correlation, over the samples of one batch, between
the solver's free per-sample error estimate (``runtime/solving/estimate.py``) and the true per-sample
RMSE against a reference solve of the same noise (closed-form mixture: ``exact_flow``, RK4 with
1000 steps in float64; digits: RK4 with 256 steps, 1024 backbone calls, on the bundled ORT CPU
bundle). Also the ratio median(estimate / true error), to show the scale (an indicator, not a bound).

Models:
- ``mixture``: :class:`GaussianMixture.random` in 8 dimensions, 6 components, stds 0.05..0.4;
  BA with :class:`ExactSideNet` scaled by 0.8 (a systematically under-trained SideNet).
- ``digits``: the bundled digits bundle (DiT backbone + its trained SideNet), labels 0..9 cycled.

    python benchmarks/autoconfig_estimate.py [--n 256] [--models mixture,digits]

Writes benchmarks/results/autoconfig_estimate.json and .md with the command and the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from anchorflow.runtime import solve
from anchorflow.runtime.evaluation.analytic import ExactSideNet, GaussianMixture, exact_flow
from anchorflow.runtime.solving.estimate import spearman

RESULTS = Path(__file__).resolve().parent / "results"
SOLVERS = ("ba", "ab2", "ipndm", "unipc")
NFES = (5, 8, 12)


def per_sample_rmse(x: np.ndarray, ref: np.ndarray) -> np.ndarray:
    d = (np.asarray(x, np.float64) - np.asarray(ref, np.float64)).reshape(x.shape[0], -1)
    return np.sqrt(np.mean(d * d, axis=1))


def mixture_case(n: int):
    gm = GaussianMixture.random((8,), 6, seed=3, std=(0.05, 0.4))
    noise = np.random.default_rng(11).standard_normal((n, 8))
    ref = exact_flow(gm.velocity, noise, steps=1000)
    return dict(velocity=gm.velocity, sidenet=ExactSideNet(gm.velocity, scale=0.8, steps=100), noise=noise,
                ref=ref, kwargs={})


def digits_case(n: int):
    from anchorflow.runtime import load_bundle

    b = load_bundle("default", backend="ort-cpu")
    shape = tuple(b.meta["model"]["state_shape"])
    noise = np.random.default_rng(11).standard_normal((n, *shape)).astype(np.float32)
    y = np.arange(n) % int(b.meta["model"]["num_classes"])
    ref = solve("rk4", b.velocity, noise, 1024, y=y).x
    return dict(velocity=b.velocity, sidenet=b.sidenet, noise=noise, ref=ref, kwargs={"y": y})


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--models", default="mixture,digits")
    args = ap.parse_args(argv)
    rows = []
    started = time.time()
    for model in args.models.split(","):
        case = {"mixture": mixture_case, "digits": digits_case}[model](args.n)
        for s in SOLVERS:
            for k in NFES:
                sidenet = case["sidenet"] if s.startswith("ba") else None
                res = solve(s, case["velocity"], case["noise"], k, sidenet=sidenet, **case["kwargs"])
                true = per_sample_rmse(res.x, case["ref"])
                est = res.error_estimate
                rho = spearman(est, true)
                ratio = float(np.median(est / np.maximum(true, 1e-30)))
                rows.append({"model": model, "solver": s, "nfe": k, "spearman": round(rho, 4),
                             "median_est_over_true": round(ratio, 4), "mean_true_rmse": float(true.mean())})
                print(f"{model:8s} {s:6s} nfe={k:3d} spearman={rho:+.3f} est/true={ratio:.3f} "
                      f"rmse={true.mean():.2e}", flush=True)
    out = {"command": "python benchmarks/" + " ".join([Path(__file__).name, *sys.argv[1:]]),
           "loadavg": open("/proc/loadavg").read().strip(), "n": args.n, "seconds": round(time.time() - started, 1),
           "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "autoconfig_estimate.json").write_text(json.dumps(out, indent=1))
    lines = ["# Per-sample error estimate vs true error (Spearman over the samples)", "",
             f"Command: `{out['command']}`  ", f"Load average at the end: {out['loadavg']}  ",
             f"Samples per batch: {args.n}", "", "| model | solver | NFE | Spearman | median est/true | mean RMSE |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['solver']} | {r['nfe']} | {r['spearman']:+.3f} | {r['median_est_over_true']:.3f} "
              f"| {r['mean_true_rmse']:.2e} |" for r in rows]
    (RESULTS / "autoconfig_estimate.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    raise SystemExit(main())
