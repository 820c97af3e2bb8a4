"""BA-solver on time grids that end with a long step and a tiny last one (a "tail").

Bundled digits model (ONNX on onnxruntime, torch-free), guidance 1, a batch of start noise,
PSNR (data range 2) against RK4 with 256 calls from the same noise. Three parts:

1. ``table``: Euler, AB2, ba-single and BA with the corrector on every interval
   (``corrector_limit=inf``, the solver before the fix) and with the default limit, on the uniform
   grid of N intervals and on the same grid with a tail at 0.001 appended (N + 1 intervals).
2. ``diagnosis``: the long interval [1/N, 0.001] of the tail grid, started from BA's own state:
   each quadrature node's error against the exact solution of that interval (RK4, step 1/128,
   from the same state), the corrector with one node replaced by the truth, and how strongly the
   backbone's velocity at the interval's end reacts to an error in its input.
3. ``sweep``: tails tau between 0.001 and 1/(2N); BA with and without the corrector on the
   interval [1/N, tau] only, against the ratio h / tau that ``corrector_limit`` thresholds.
4. ``identical``: the default is bit-identical to ``corrector_limit=inf`` on the uniform grids
   and on every BA grid tuned in the bundle.

    python benchmarks/ba_tail.py            # ~3 min on 2 busy cores
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import time
from pathlib import Path

import numpy as np

from anchorflow.modelref import open_model
from anchorflow.runtime import solve
from anchorflow.runtime.solving.field import GuidedField
from anchorflow.runtime.evaluation.metrics import psnr
from anchorflow.runtime.solving.solvers.ba import (
    CORRECTOR_LIMIT, _forward_nodes, _interval, _probe, _span, _weighted, bi_anchor_rule)

OUT = Path(__file__).resolve().parent / "results"
TAIL = 0.001
SWEEP_RATIOS = (1.2, 1.5, 1.8, 2.2, 2.6, 3.0, 4.0, 8.0, 16.0, 32.0, 100.0)


def solve_grid(n: int, spec: str) -> list[float]:
    from anchorflow.runtime.solving.grids import make_grid

    return [float(t) for t in make_grid(n, spec)]


def stiffness(model, field: GuidedField, noise: np.ndarray, y: np.ndarray, grid, n: int) -> float:
    """|v(x_pred, t_end) - v(x_exact, t_end)| / |x_pred - x_exact| on interval n - 1 of ``grid``, from BA's state."""
    grid = np.asarray(grid)
    rule = bi_anchor_rule()
    g = GuidedField(model.velocity, len(noise), sidenet=model.sidenet, y=y, null_label=model.meta["null_label"])
    f = GuidedField(model.velocity, len(noise), y=y, null_label=model.meta["null_label"])
    x = noise.copy()
    t0, offs, tms = float(grid[0]), *_forward_nodes(float(grid[0]), float(grid[1]), rule.nodes[1])
    v_raw = g.raw(x, t0, span=_span(t0, *tms))
    fwd = _probe(g, x, v_raw, t0, offs, tms)
    for i in range(n - 1):
        x, v_raw, fwd = _interval(g, x, v_raw, fwd, grid, i, rule, True)
    t, tn = float(grid[n - 1]), float(grid[n])
    x_pred = x - (t - tn) * _weighted(rule.weights, [v_raw, *fwd])
    xe = rk4(f, x, t, tn, dt=1 / 64)
    return rms(f(x_pred, tn) - f(xe, tn)) / rms(x_pred - xe)


def tail_grid(n: int, tau: float = TAIL) -> list[float]:
    """The uniform grid of n intervals with its last point 0 replaced by (tau, 0): n + 1 intervals."""
    return [*np.linspace(1.0, 0.0, n + 1)[:-1], tau, 0.0]


def rms(a: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(a, dtype=np.float64))))


def rk4(f: GuidedField, x: np.ndarray, t0: float, t1: float, dt: float = 1 / 128) -> np.ndarray:
    """Classic RK4 from t0 down to t1 in equal steps of at most dt (float64 state)."""
    k = max(1, math.ceil((t0 - t1) / dt - 1e-9))
    ts = np.linspace(t0, t1, k + 1)
    x = x.astype(np.float64)
    v = lambda xx, tt: f(xx.astype(np.float32), float(tt)).astype(np.float64)  # noqa: E731
    for a, b in zip(ts[:-1], ts[1:]):
        h = b - a
        k1 = v(x, a); k2 = v(x + h / 2 * k1, a + h / 2); k3 = v(x + h / 2 * k2, a + h / 2); k4 = v(x + h * k3, b)
        x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return x.astype(np.float32)


def diagnose(model, field, noise, y, n: int) -> dict:
    """Node errors on the long interval [1/n, TAIL] of tail_grid(n), from BA's state at 1/n."""
    grid = np.asarray(tail_grid(n))
    rule = bi_anchor_rule()
    a, w = rule.nodes[1], rule.weights
    g = GuidedField(model.velocity, len(noise), sidenet=model.sidenet, y=y, null_label=model.meta["null_label"])
    x = noise.copy()
    t0, offs, tms = float(grid[0]), *_forward_nodes(float(grid[0]), float(grid[1]), a)
    v_raw = g.raw(x, t0, span=_span(t0, *tms))
    fwd = _probe(g, x, v_raw, t0, offs, tms)
    for i in range(n - 1):
        x, v_raw, fwd = _interval(g, x, v_raw, fwd, grid, i, rule, True)
    t, tn = float(grid[n - 1]), float(grid[n])
    h = t - tn
    tb = tn + a * h  # the node the backward probe lands on (= t - (1 - a) h)
    xb = rk4(field, x, t, tb)
    xe = rk4(field, xb, tb, tn)  # exact end state from BA's state at t
    vb_true, ve_true = field(xb, tb), field(xe, tn)
    va, vb, ve = fwd
    x_pred = x - h * _weighted(w, [v_raw, va, vb, ve])
    v1 = field.raw(x_pred, tn)
    (vb2,) = _probe(field, x_pred, v1, tn, [-a * h], [tb])
    (vb2_exact_anchor,) = _probe(field, xe, ve_true, tn, [-a * h], [tb])
    corr = lambda nb, ne: x - h * _weighted(w, [v_raw, va, nb, ne])  # noqa: E731
    p = lambda z: float(psnr(z, xe, data_range=2.0))  # noqa: E731
    rng = np.random.default_rng(1)
    dx = (0.01 * rng.standard_normal(xe.shape)).astype(np.float32)
    return {
        "n": n, "interval": [t, tn], "h": h, "h_over_t_end": h / tn,
        "psnr_at_t_end_vs_exact": {
            "predictor": p(x_pred), "corrector": p(corr(vb2, v1)),
            "corrector, v1 exact": p(corr(vb2, ve_true)), "corrector, backward node exact": p(corr(vb_true, v1)),
            "corrector, both exact": p(corr(vb_true, ve_true)),
            "corrector, backward probe from the exact end anchor": p(corr(vb2_exact_anchor, v1)),
            "corrector, exact end anchor (v1 and the probe's anchor)": p(corr(vb2_exact_anchor, ve_true)),
        },
        "rms_error": {
            "x_pred": rms(x_pred - xe),
            "ve (forward probe, offset h)": rms(ve - ve_true), "v1 (backbone at x_pred)": rms(v1 - ve_true),
            "vb (forward probe, offset (1-a)h)": rms(vb - vb_true),
            "vb2 (backward probe from (x_pred, v1), offset -a h)": rms(vb2 - vb_true),
            "vb2's SideNet delta alone ((vb2 - v1) - (vb - ve) exact)": rms((vb2 - v1) - (vb_true - ve_true)),
            "backward probe from the exact end anchor": rms(vb2_exact_anchor - vb_true),
        },
        "x_error_contribution (weight * h * rms error)": {
            "predictor: w_in h |vb|": w[2] * h * rms(vb - vb_true), "predictor: w_out h |ve|": w[3] * h * rms(ve - ve_true),
            "corrector: w_in h |vb2|": w[2] * h * rms(vb2 - vb_true), "corrector: w_out h |v1|": w[3] * h * rms(v1 - ve_true),
        },
        "velocity_sensitivity": {
            "at t_end along x_pred's error: |v1 - v_exact| / |x_pred - x_exact|": rms(v1 - ve_true) / rms(x_pred - xe),
            "at t_end, random 0.01 perturbation": rms(field(xe + dx, tn) - ve_true) / rms(dx),
            "at the backward node, random 0.01 perturbation": rms(field(xb + dx, tb) - vb_true) / rms(dx),
            "1 / t_end": 1.0 / tn,
        },
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=128, help="samples")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--intervals", default="3,5,10")
    ap.add_argument("--out", type=Path, default=OUT / "ba_tail")
    args = ap.parse_args()
    start = time.time()
    model = open_model("default", backend="ort-cpu")
    meta = model.meta
    rng = np.random.default_rng(args.seed)
    noise = rng.standard_normal((args.n, *meta["state_shape"])).astype(np.float32)
    y = np.resize(np.arange(meta["num_classes"]), args.n).astype(np.int64)
    common = dict(y=y, null_label=meta["null_label"], sidenet=model.sidenet)
    ref = solve("rk4", model.velocity, noise, 256, **common).x
    field = GuidedField(model.velocity, args.n, sidenet=model.sidenet, y=y, null_label=meta["null_label"])
    ns = [int(v) for v in args.intervals.split(",")]

    def run(method, grid, **opt):
        r = solve(method, model.velocity, noise, len(grid) - 1, grid=list(grid), **common, **opt)
        return r, float(psnr(r.x, ref, data_range=2.0))

    methods = {"euler": {}, "ab2": {}, "ba-single": {}, "ba (limit inf, before)": {"corrector_limit": math.inf},
               f"ba (limit {CORRECTOR_LIMIT:g}, after)": {}}
    table = []
    for n in ns:
        for kind, grid in (("uniform", list(np.linspace(1, 0, n + 1))), (f"tail {TAIL}", tail_grid(n))):
            row = {"n": n, "grid": kind, "times": [round(float(t), 6) for t in grid]}
            for name, opt in methods.items():
                r, db = run(name.split(" ")[0], grid, **opt)
                row[name] = {"psnr": db, "calls": r.nfe, "sidenet_calls": r.sidenet_calls}
            table.append(row)
            print(n, kind, {k: round(v["psnr"], 2) for k, v in row.items() if isinstance(v, dict)}, flush=True)

    sweep = []
    for n in ns:
        for ratio in SWEEP_RATIOS:
            tau = 1.0 / (n * (1.0 + ratio))  # (1/n - tau) / tau = ratio
            grid = tail_grid(n, tau)
            _, keep = run("ba", grid, corrector_limit=math.inf)
            _, pred = run("ba", grid, corrector_limit=0.999 * ratio)  # every other interval has h / t_end <= 1
            gain = stiffness(model, field, noise[:32], y[:32], grid, n)
            sweep.append({"n": n, "tau": tau, "h_over_tau": ratio, "with_corrector": keep, "predictor_kept": pred,
                          "L_along_pred_error": gain, "h_L_over_2": (1.0 / n - tau) * gain / 2})
            print(f"sweep n={n} tau={tau:.5f} h/tau={ratio:g}: corrector {keep:.2f} predictor {pred:.2f} "
                  f"L {gain:.1f}", flush=True)

    named = []
    for n in ns:
        # diffusers' FlowMatchEulerDiscreteScheduler(shift=3) sigmas for n steps (0.8577, 0.6022, 0.0089, 0 at
        # n = 4): timesteps linspace(1, shift(1/1000)) shifted again, then 0 appended
        u = np.linspace(1.0, 3 * 0.001 / (1 + 2 * 0.001), n)
        grids = {"shift:0.5": solve_grid(n, "shift:0.5"), "warp:1,2": solve_grid(n, "warp:1,2"),
                 "warp:1,3": solve_grid(n, "warp:1,3"), "diffusers shift 3": [*(3 * u / (1 + 2 * u)), 0.0]}
        for name, grid in grids.items():
            t = np.asarray(grid)
            row = {"n": n, "grid": name, "max_h_over_t_end": float(((t[:-1] - t[1:])[:-1] / t[1:-1]).max())}
            for label, method, opt in (("ab2", "ab2", {}), ("before", "ba", {"corrector_limit": math.inf}),
                                       ("after", "ba", {})):
                row[label] = run(method, grid, **opt)[1]
            named.append(row)
            print(row, flush=True)

    diagnosis = [diagnose(model, field, noise, y, n) for n in ns]
    for d in diagnosis:
        print(json.dumps(d["psnr_at_t_end_vs_exact"]), flush=True)

    tuned = json.loads((Path(model.files.bundle) / "tuned.json").read_text())["grids"]
    grids = {f"uniform {k}": list(np.linspace(1, 0, k + 1)) for k in range(2, 13)}
    grids.update({k: g["times"] for k, g in tuned.items() if g["solver"] == "ba"})
    identical = {}
    for name, grid in grids.items():
        a, _ = run("ba", grid)
        b, _ = run("ba", grid, corrector_limit=math.inf)
        identical[name] = bool(np.array_equal(a.x, b.x))
    print("bit-identical:", all(identical.values()), flush=True)

    out = {
        "command": "python benchmarks/ba_tail.py " + " ".join(f"--{k} {v}" for k, v in
                                                             (("n", args.n), ("seed", args.seed),
                                                              ("intervals", args.intervals))),
        "settings": {"samples": args.n, "seed": args.seed, "cfg_scale": 1.0, "reference": "rk4, 256 calls",
                     "tail": TAIL, "default_corrector_limit": CORRECTOR_LIMIT, "backend": model.providers},
        "git": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip(),
        "platform": platform.platform(), "load": os.getloadavg(), "wall_s": round(time.time() - start, 1),
        "table": table, "sweep": sweep, "named_grids": named, "diagnosis": diagnosis, "identical_to_limit_inf": identical,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(out, indent=1))
    args.out.with_suffix(".md").write_text(markdown(out))
    print(f"wrote {args.out}.json/.md in {out['wall_s']} s")


def markdown(o: dict) -> str:
    s = o["settings"]
    names = [k for k in o["table"][0] if isinstance(o["table"][0][k], dict)]
    lines = [
        "# BA-solver on grids with a tiny last step", "",
        f"Command: `{o['command']}` (commit {o['git']}, {o['wall_s']} s, load {', '.join(f'{v:.2f}' for v in o['load'])}).",
        f"Bundled digits model on {', '.join(s['backend'])}, {s['samples']} samples, guidance 1, seed {s['seed']}; "
        f"PSNR (dB) against {s['reference']} from the same noise. `tail` = the uniform grid of N intervals with "
        f"(0.001, 0) in place of its last point: N + 1 intervals and N + 1 calls.", "",
        "## PSNR", "", "| N | grid | calls | " + " | ".join(names) + " |", "|---:|---|---:|" + "---:|" * len(names)]
    for r in o["table"]:
        lines.append(f"| {r['n']} | {r['grid']} | {r[names[0]]['calls']} | "
                     + " | ".join(f"{r[k]['psnr']:.2f}" for k in names) + " |")
    lines += ["", "## Where the loss is: the long interval [1/N, 0.001], from BA's own state", "",
              "PSNR of the state at t = 0.001 against the exact solution of that interval from the same state:", "",
              "| N | h / t_end | " + " | ".join(o["diagnosis"][0]["psnr_at_t_end_vs_exact"]) + " |",
              "|---:|---:|" + "---:|" * len(o["diagnosis"][0]["psnr_at_t_end_vs_exact"])]
    for d in o["diagnosis"]:
        lines.append(f"| {d['n']} | {d['h_over_t_end']:.0f} | "
                     + " | ".join(f"{v:.2f}" for v in d["psnr_at_t_end_vs_exact"].values()) + " |")
    for key in ("rms_error", "x_error_contribution (weight * h * rms error)", "velocity_sensitivity"):
        lines += ["", f"{key}:", "", "| quantity | " + " | ".join(f"N = {d['n']}" for d in o["diagnosis"]) + " |",
                  "|---|" + "---:|" * len(o["diagnosis"])]
        for q in o["diagnosis"][0][key]:
            lines.append(f"| {q} | " + " | ".join(f"{d[key][q]:.4g}" for d in o["diagnosis"]) + " |")
    lines += ["", "## Threshold: corrector on [1/N, tau] or not (every other interval corrected)", "",
              "L: |v(x_pred, tau) - v(x_exact, tau)| / |x_pred - x_exact| (first 32 samples; exact: RK4 step 1/64 "
              "from BA's state at 1/N). (h/2) L: how much the corrector's two terminal-anchor nodes (weight h/2) "
              "amplify the predictor's error.", "",
              "| N | tau | h / tau | with corrector | predictor kept | L | (h/2) L |", "|---:|---:|---:|---:|---:|---:|---:|"]
    for r in o["sweep"]:
        lines.append(f"| {r['n']} | {r['tau']:.5f} | {r['h_over_tau']:g} | {r['with_corrector']:.2f} | "
                     f"{r['predictor_kept']:.2f} | {r['L_along_pred_error']:.1f} | {r['h_L_over_2']:.2f} |")
    lines += ["", "## Other grids (PSNR dB; before = `corrector_limit=inf`, after = default)", "",
              "| N | grid | max h / t_end | ab2 | ba before | ba after |", "|---:|---|---:|---:|---:|---:|"]
    for r in o["named_grids"]:
        lines.append(f"| {r['n']} | {r['grid']} | {r['max_h_over_t_end']:.2f} | {r['ab2']:.2f} | {r['before']:.2f} | "
                     f"{r['after']:.2f} |")
    same = o["identical_to_limit_inf"]
    lines += ["", f"Default limit bit-identical to `corrector_limit=inf` on {sum(same.values())} of {len(same)} grids "
              f"(uniform 2-12 intervals and every BA grid tuned in the bundle)"
              + ("." if all(same.values()) else f"; differs on: {', '.join(k for k, v in same.items() if not v)}."), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
