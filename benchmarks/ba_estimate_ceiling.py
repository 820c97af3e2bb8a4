"""How well can ANY cheap per-sample error estimate rank BA's samples? The ceiling, measured.

Issue 26 asks for ``Result.error_estimate`` with Spearman >= 0.8 against the true per-sample error for
BA. BA's estimate (runtime/solving/estimate.py) sums the corrector - predictor differences of its
corrected intervals; the final interval [t_{n-1}, 0] has no corrector (it would need a backbone call at
t = 0), and it carries most of the error. This benchmark replays BA step by step (the runtime's own
``_interval``, checked bit for bit against ``solve("ba")``) and scores, per model and NFE, the Spearman
rank correlation with the true per-sample RMSE of:

- ``estimate``: BA's shipped estimate (``Result.error_estimate``, the default "stiff" weighting);
- ``oracle: final interval``: the final interval's OWN local error (BA's last predictor against an exact
  solve of [t_{n-1}, 0] from the same state: RK4 with 64 steps): what a perfect estimate of the
  uncorrected interval would know, the ceiling for anything that estimates the final interval;
- ``oracle: carried in``: the error of the state entering the final interval, carried exactly to t = 0;
- cheap final-interval candidates that need no backbone call: the last corrected interval's difference
  alone; the SideNet's final-interval velocities against a quadratic extrapolation of the backbone's
  last three (the multistep companion); the change of the last two backbone velocities; the SideNet's own
  predicted change over the final interval; a second SideNet prediction of the final interval's nodes from
  the anchor before (one extra SideNet call: two predictors disagreeing);
- ``fit``: a log-linear least-squares fit of log(true error) on the logs of every cheap feature above
  and the per-interval differences, fitted on one half of the samples and scored on the other half;
- ``+1 backbone call at t = 0``: the final interval's own corrector - predictor, with a real backbone call
  at the final state (one extra call per sample: not free; for comparison only).

Models: the closed-form class-conditional mixture of benchmarks/autoconfig_bench.py (8-d, 20 components,
10 classes, ExactSideNet x 0.8, reference: the exact flow, RK4 1000 steps in float64), the bundled digits
bundle (ORT CPU; reference RK4 with 512 calls), and the SD3-architecture digits transformer exported fp32
(``--sd3-bundle``, made by autoconfig_bench.py; reference RK4 with 256 calls). Labels 0..9 cycled.

    python benchmarks/ba_estimate_ceiling.py [--n 256] [--models mixture,digits,sd3]

Writes benchmarks/results/ba_estimate_ceiling.{json,md} with the command and the load average.
Time convention: t = 1 noise, t = 0 data.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from autoconfig_bench import open_case  # noqa: E402

from anchorflow.base._io import write_json, write_text  # noqa: E402
from anchorflow.runtime import solve  # noqa: E402
from anchorflow.runtime.evaluation.analytic import exact_flow  # noqa: E402
from anchorflow.runtime.solving.estimate import spearman  # noqa: E402
from anchorflow.runtime.solving.field import GuidedField  # noqa: E402
from anchorflow.runtime.solving.solvers import ba as B  # noqa: E402
from anchorflow.runtime.solving.solvers.fastflow_loop import extrapolate_order  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
NFES = (5, 8, 12)
REF_CALLS = {"mixture": None, "digits": 512, "sd3": 256}


def rms(d: np.ndarray) -> np.ndarray:
    d = np.asarray(d, np.float64).reshape(d.shape[0], -1)
    return np.sqrt(np.mean(d * d, axis=1))


class Differences:
    """Stands in for ErrorEstimate inside ``_interval``: keeps each corrected interval's difference."""

    def __init__(self) -> None:
        self.d: list[np.ndarray] = []
        self.w: list[float] = []

    def add(self, diff: np.ndarray, weight: float = 1.0) -> None:
        self.d.append(rms(diff))
        self.w.append(float(weight))


def features(f: GuidedField, velocity, cond, noise: np.ndarray, nfe: int, ref: np.ndarray, shipped: np.ndarray,
             x_shipped: np.ndarray) -> dict:
    grid = np.linspace(1.0, 0.0, nfe + 1)
    rule = B.bi_anchor_rule()
    a, w = rule.nodes[1], rule.weights
    x = noise.copy()
    offsets, times = B._forward_nodes(1.0, float(grid[1]), a)
    v_raw = f.raw(x, 1.0, span=B._span(1.0, *times))
    fwd = B._probe(f, x, v_raw, 1.0, offsets, times)
    diffs, anchors = Differences(), [(1.0, f.guide(v_raw, 1.0))]
    for i in range(nfe):
        if i == nfe - 2:
            before = (x.copy(), v_raw.copy(), float(grid[i]))
        if i == nfe - 1:
            x_in, fwd_last = x.copy(), fwd
        x, v_raw, fwd = B._interval(f, x, v_raw, fwd, grid, i, rule, True, B.CORRECTOR_LIMIT, diffs, True)
        if i < nfe - 1:
            anchors.append((float(grid[i + 1]), f.guide(v_raw, float(grid[i + 1]))))
    if not np.array_equal(x, x_shipped):
        raise SystemExit("the replay differs from solve('ba'): the benchmark is out of date with the solver")
    true = rms(x - ref)
    h = float(grid[-2])
    nodes = [h - a * h, h - (1 - a) * h, 0.0]
    exact_last = exact_flow(velocity, x_in.astype(np.float64), h, 0.0, cond, steps=64)
    quad = [extrapolate_order(anchors, tt, 2) for tt in nodes]
    vp, vq = anchors[-2][1], anchors[-1][1]
    xs, vs, ts = before
    second = B._probe(f, xs, vs, ts, [ts - tt for tt in nodes], nodes)  # one extra SideNet call
    cheap = {
        "last corrected interval's difference": diffs.d[-1],
        "SideNet vs quadratic extrapolation (final interval)": rms(h * sum(w[j + 1] * (fwd_last[j] - quad[j])
                                                                          for j in range(3))),
        "change of the last two backbone velocities": rms(h * (vq - vp)),
        "SideNet's predicted change (final interval)": rms(h * sum(w[j + 1] * (fwd_last[j] - vq) for j in range(3))),
        "two SideNet predictions disagreeing (+1 SideNet call)": rms(h * sum(w[j + 1] * (fwd_last[j] - second[j])
                                                                             for j in range(3))),
    }
    # +1 backbone call at the final state: the final interval's own corrector - predictor
    ve_raw = f.raw(x, 0.0, span=(0.0, a * h))
    (vb,) = B._probe(f, x, ve_raw, 0.0, [-a * h], [a * h])
    terminal = rms(h * (w[2] * (vb - fwd_last[1]) + w[3] * (f.guide(ve_raw, 0.0) - fwd_last[2])))
    cols = [np.log(d + 1e-30) for d in diffs.d] + [np.log(v + 1e-30) for v in cheap.values()]
    X = np.stack(cols + [np.ones_like(true)], axis=1)
    half = np.random.default_rng(0).permutation(true.size)
    fit_on, score_on = half[: true.size // 2], half[true.size // 2:]
    A = X[fit_on]
    coef = np.linalg.solve(A.T @ A + 1.0 * np.eye(A.shape[1]), A.T @ np.log(true[fit_on]))  # ridge 1: 12-14 columns
    rows = {"estimate (shipped)": spearman(shipped, true),
            "oracle: final interval's own error": spearman(rms(x - exact_last), true),
            "oracle: error carried into the final interval": spearman(rms(exact_last - ref), true)}
    rows.update({k: spearman(v, true) for k, v in cheap.items()})
    rows["fit of all cheap features (held-out half)"] = spearman(X[score_on] @ coef, true[score_on])
    rows["+1 backbone call at t = 0: final corrector - predictor"] = spearman(terminal, true)
    return {"spearman": rows, "mean_rmse": float(true.mean()),
            "final_interval_share": float(np.median(rms(x - exact_last) / true))}


def run_model(name: str, n: int, sd3_bundle: Path) -> dict:
    model, _, conds_for, desc = open_case(name, sd3_bundle)
    shape = tuple(int(v) for v in (model.meta.get("state_shape") or model.meta["model"]["state_shape"]))
    noise = np.random.default_rng(11).standard_normal((n, *shape)).astype(np.float32)
    y = np.arange(n) % 10
    cond = {"y": y} if name != "sd3" else conds_for(y)["cond"]
    velocity = model.velocity
    if name == "mixture":
        ref = exact_flow(velocity, noise, cond=cond, steps=1000)
    else:
        ref = solve("rk4", velocity, noise, REF_CALLS[name], cond=cond).x
    out = {"model": name, "description": desc, "n": n, "reference": "exact flow (RK4 1000, float64)"
           if name == "mixture" else f"rk4@{REF_CALLS[name]}", "nfe": {}}
    for k in NFES:
        shipped = solve("ba", velocity, noise, k, sidenet=model.sidenet, cond=cond)
        f = GuidedField(velocity, n, cond, sidenet=model.sidenet, dtype=noise.dtype)
        out["nfe"][str(k)] = features(f, velocity, cond, noise, k, ref, shipped.error_estimate, shipped.x)
        print(name, k, {q: round(v, 3) for q, v in out["nfe"][str(k)]["spearman"].items()}, flush=True)
    return out


def markdown(res: dict) -> str:
    L = ["# BA's per-sample error estimate: how far a cheap estimate can go (issue 26)", "",
         f"Command: `{res['command']}`  ", f"Load average at the end: {res['loadavg']}; {res['seconds']} s  ",
         f"Samples per model: {res['n']}; Spearman rank correlation with the true per-sample RMSE "
         "(uniform grids; BA with its shipped defaults).", ""]
    for m in res["models"]:
        keys = list(next(iter(m["nfe"].values()))["spearman"])
        L += [f"## {m['model']}: {m['description']} (reference {m['reference']})", "",
              "| quantity | " + " | ".join(f"NFE {k}" for k in m["nfe"]) + " |",
              "|---|" + "---:|" * len(m["nfe"])]
        L += [f"| {q} | " + " | ".join(f"{v['spearman'][q]:+.3f}" for v in m["nfe"].values()) + " |" for q in keys]
        L += ["| median (final interval's error / total error) | "
              + " | ".join(f"{v['final_interval_share']:.2f}" for v in m["nfe"].values()) + " |", ""]
    return "\n".join(L) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--models", default="mixture,digits,sd3")
    ap.add_argument("--sd3-bundle", default="/tmp/anchorflow_autoconfig_sd3")
    args = ap.parse_args(argv)
    started = time.time()
    models = [run_model(m, args.n, Path(args.sd3_bundle)) for m in args.models.split(",")]
    res = {"command": "python benchmarks/" + " ".join([Path(__file__).name, *(argv if argv is not None else sys.argv[1:])]),
           "loadavg": open("/proc/loadavg").read().strip(), "n": args.n, "seconds": round(time.time() - started, 1),
           "models": models}
    write_json(RESULTS / "ba_estimate_ceiling.json", res)
    write_text(RESULTS / "ba_estimate_ceiling.md", markdown(res))
    print(markdown(res))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    raise SystemExit(main())
