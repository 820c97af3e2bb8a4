"""Few-step inversion and editing, measured: reconstruction PSNR, the SideNet backwards, digit edits.

Parts (``--parts``, comma-separated; each one run of a few minutes on 2 cores):

- ``reconstruction``: ``invert`` (N calls, t = 0 -> 1, the image's own label) then ``regenerate`` (N
  calls, same label, same grid) on the bundled digits model (real test digits, onnxruntime CPU); PSNR
  against the input at N = 3, 5, 8, 10, 20 for every inverting solver, against Euler at 50 + 50 calls.
- ``mixture``: the same on the closed-form Gaussian mixture, where the exact inverse is known, so the
  inversion error itself is reported too (SideNet: the exact one scaled by 0.9).
- ``sd3``: the same on the SD3-architecture digits model (torch through the adapter; sd3_digits_bench.py).
- ``backwards``: the forward-trained BA SideNet asked for negative offsets: inversion RMSE of ``ba``,
  of ``ba`` with a zero SideNet (= AB2's iterates on a uniform grid), of AB2 and Euler, against a
  reference inversion (RK4, ``--ref`` calls).
- ``edits``: every test digit of class a regenerated as class b = (a + 1) mod 10 at N = 5 and 10 per
  solver, per ``--strengths``, with ``--switch`` / ``--inject``: the bundled classifier's accuracy on b
  and the PSNR to the source on the pixels that are background in both the source and the mean
  training image of class b (the "outside the changed strokes" region); baselines SDEdit (forward
  noising, no inversion) and a fresh sample of b; a picture (sources, inversions, edits) at ``--grid``.

    python benchmarks/inversion_bench.py --parts reconstruction --n 120 --out benchmarks/results/inversion_digits

Time convention: t = 1 noise, t = 0 data. Calls are the runtime's own counts (checked per run).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path

import numpy as np

from anchorflow.base import _io
from anchorflow.runtime import SOLVERS
from anchorflow.runtime.solving.invert import edit, invert, inverting_solvers, regenerate
from anchorflow.runtime.evaluation.metrics import psnr, rmse

ROOT = Path(__file__).resolve().parent.parent
NFES = (3, 5, 8, 10, 20)
EDIT_NFES = (5, 10)
SKIP = ("rk4e",)  # RK4 with an Euler last step: reported as rk4; kept out to keep the table short


class ZeroSideNet:
    """delta = 0: BA with it is AB2 on a uniform grid (the SideNet's contribution is BA minus this)."""

    def __call__(self, x, v, t, h, cond):
        return np.zeros_like(v)


def honours(method: str, nfe: int) -> bool:
    try:
        SOLVERS[method].steps_for_nfe(nfe)
        return True
    except Exception:
        return False


def methods(sidenet) -> list[tuple[str, str, dict]]:
    """(row name, solver, extra kwargs) for every inverting solver; BA with its SideNet and with a zero one."""
    out = []
    for m in inverting_solvers():
        if m in SKIP:
            continue
        if SOLVERS[m].needs_sidenet:
            if sidenet is None:
                continue
            out.append((m, m, {"sidenet": sidenet}))
            if m == "ba":
                out.append(("ba (zero SideNet)", m, {"sidenet": ZeroSideNet()}))
        else:
            out.append((m, m, {}))
    return out


GRID = "uniform"  # the reconstructions' grid (--recon-grid)


def reconstruct(method, velocity, x0, nfe, cond, kw, data_range):
    inv = invert(method, velocity, x0, nfe, cond=cond, grid=GRID, **kw)
    gen = regenerate(method, velocity, inv.x, nfe, cond=cond, grid=GRID, **kw)
    assert inv.nfe == nfe and gen.nfe == nfe, (method, inv.nfe, gen.nfe)
    return inv.x, gen.x, psnr(gen.x, x0, data_range)


def reconstruction_table(name, velocity, x0, cond, sidenet, data_range, exact_noise=None):
    rows = {}
    for row, m, kw in methods(sidenet):
        cells = {}
        for n in NFES:
            if not honours(m, n):
                continue
            noise, back, p = reconstruct(m, velocity, x0, n, cond, kw, data_range)
            cells[n] = {"psnr": p}
            if exact_noise is not None:
                cells[n]["inversion_rmse"] = rmse(noise, exact_noise)
        rows[row] = cells
        print(f"[{name}] {row}: " + ", ".join(f"{n}:{c['psnr']:.2f}" for n, c in cells.items()), flush=True)
    _, _, p50 = reconstruct("euler", velocity, x0, 50, cond, {}, data_range)
    return {"rows": rows, "euler50": p50, "grid": GRID}


def _digits_data(args):
    from anchorflow.runtime import load_bundle
    from anchorflow.trainers.data import load_dataset

    bundle = load_bundle("default", backend="ort-cpu")
    x_test, y_test = load_dataset("digits", "test")
    return bundle, tuple(bundle.meta["model"]["data_range"]), x_test[: args.n], y_test[: args.n]


def digits_reconstruction(args):
    bundle, dr, x0, y = _digits_data(args)
    cond = {"y": y}
    start = time.perf_counter()
    res = {"n": int(len(x0)), "data_range": list(dr),
           "reconstruction": reconstruction_table("digits", bundle.velocity, x0, cond, bundle.sidenet, dr)}
    res["reconstruction_s"] = time.perf_counter() - start
    return res


def digits_backwards(args):
    """The forward-trained SideNet asked for negative offsets: inversion error against a reference inversion."""
    bundle, dr, x0, y = _digits_data(args)
    cond = {"y": y}
    # the learned velocity is stiff near t = 0 (v = (x - x0_hat) / t): the reference needs its steps there
    ref = invert("rk4", bundle.velocity, x0, args.ref, cond=cond, grid=args.ref_grid).x
    half = invert("rk4", bundle.velocity, x0, 4 * (args.ref // 8), cond=cond, grid=args.ref_grid).x
    back = {"n": int(len(x0)), "reference": f"rk4 at {args.ref} calls on grid {args.ref_grid}",
            "reference_self_rmse": rmse(half, ref), "rows": {}}
    for row, m, kw in [("ba", "ba", {"sidenet": bundle.sidenet}), ("ba (zero SideNet)", "ba", {"sidenet": ZeroSideNet()}),
                       ("ab2", "ab2", {}), ("euler", "euler", {})]:
        back["rows"][row] = {n: rmse(invert(m, bundle.velocity, x0, n, cond=cond, **kw).x, ref) for n in NFES}
        print(f"[backwards] {row}: " + ", ".join(f"{n}:{e:.4f}" for n, e in back["rows"][row].items()), flush=True)
    return back


def digits_edits(args):
    """Every test digit of class a regenerated as b = (a + 1) mod 10, per solver, N = 5 and 10, each strength.

    Baselines at the same strength, with the BA solver: ``sdedit`` (the forward noising
    x_s = (1 - s) x0 + s eps instead of an inversion: N calls in all) and ``fresh noise`` (a sample of
    class b from unrelated noise at t = 1: what keeping nothing of the source scores)."""
    from anchorflow.runtime import solve
    from anchorflow.runtime.evaluation.classifier import Classifier
    from anchorflow.trainers.data import load_dataset

    bundle, dr, x0, y = _digits_data(args)
    clf = Classifier(ROOT / "anchorflow" / "bundled" / "digits" / "classifier")
    x_train, y_train = load_dataset("digits", "train")
    means = np.stack([x_train[y_train == c].mean(axis=0) for c in range(10)])
    tgt = (y + 1) % 10
    keep = (x0 < 0.0) & (means[tgt] < 0.0)  # background in the source and in the target class's mean
    null = bundle.meta["model"]["null_label"]
    eps = np.random.default_rng(0).standard_normal(x0.shape).astype(np.float32)

    def score(x):
        mse = float(np.sum(((x - x0) ** 2) * keep) / max(1, keep.sum()))
        return {"target_accuracy": float(np.mean(clf.labels(x) == tgt)),
                "psnr_kept": 10 * np.log10((dr[1] - dr[0]) ** 2 / max(mse, 1e-12))}

    edits = {"n": int(len(x0)), "pairs": "b = (a + 1) mod 10", "switch": args.switch, "inject": args.inject,
             "inject_weight": args.inject_weight, "kept_pixels": float(keep.mean()),
             "source_accuracy": float(np.mean(clf.labels(x0) == y)), "strengths": {}}
    pictures = {}
    for strength in (float(s) for s in args.strengths.split(",")):
        rows = {}
        for row, m, kw in methods(bundle.sidenet):
            cells = {}
            for n in EDIT_NFES:
                if not honours(m, n):
                    continue
                e = edit(m, bundle.velocity, x0, n, source=y, target=tgt, null_label=null, strength=strength,
                         switch=args.switch, inject=args.inject, inject_weight=args.inject_weight, **kw)
                assert e.inversion.nfe == n and e.regeneration.nfe == n, (m, e.inversion.nfe, e.regeneration.nfe)
                cells[n] = {**score(e.x), "nfe": e.nfe}
                if n == 10 and strength == args.grid_strength:
                    pictures[row] = e
            rows[row] = cells
        for row, start in (("sdedit (ba, no inversion)", (1.0 - strength) * x0 + strength * eps),
                           ("fresh noise (ba)", None)):
            cells = {}
            for n in EDIT_NFES:
                if start is None:
                    r = solve("ba", bundle.velocity, eps, n, y=tgt, sidenet=bundle.sidenet)
                else:
                    r = regenerate("ba", bundle.velocity, start, n, t_start=strength, cond={"y": tgt},
                                   sidenet=bundle.sidenet)
                cells[n] = {**score(r.x), "nfe": r.nfe}
            rows[row] = cells
        for row, cells in rows.items():
            print(f"[edit {strength}] {row}: " + ", ".join(
                f"{n}: acc {c['target_accuracy']:.2f} psnr {c['psnr_kept']:.2f}" for n, c in cells.items()), flush=True)
        edits["strengths"][str(strength)] = rows
    if args.grid:
        picture(pictures, x0, dr, args.grid)
        edits["grid"] = f"{os.path.relpath(args.grid, ROOT)} (strength {args.grid_strength}, N = 10)"
    return edits


def picture(pictures, x0, dr, path):
    from anchorflow.plots import save_labeled_rows

    pick = np.arange(10)
    rows = {"source": x0[pick]}
    for name in ("ba", "euler", "fireflow", "rf-solver"):
        if name in pictures:
            rows[f"{name} noise"] = np.clip(pictures[name].noise[pick] / 3.0, -1, 1)
            rows[f"{name} edit"] = pictures[name].x[pick]
    save_labeled_rows(rows, path, data_range=dr, upscale=6)


def mixture(args):
    from anchorflow.runtime.evaluation.analytic import ExactSideNet, GaussianMixture, exact_flow

    mix = GaussianMixture.random((1, 4, 4), 8, classes=4, seed=3)
    rng = np.random.default_rng(0)
    y = np.arange(args.n_mix) % 4
    noise = rng.standard_normal((args.n_mix, 1, 4, 4))
    x0 = exact_flow(mix, noise, cond={"y": y}, steps=400)
    dr = (float(x0.min()), float(x0.max()))
    side = ExactSideNet(mix, scale=0.9, steps=40)  # a 0.9-scaled exact SideNet: an imperfect learned one
    rec = reconstruction_table("mixture", mix, x0, {"y": y}, side, dr, exact_noise=noise)
    return {"n": int(args.n_mix), "data_range": list(dr), "reconstruction": rec,
            "sidenet": "the exact SideNet scaled by 0.9 (an imperfect learned one)"}


def sd3(args):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import sd3_digits_bench as sb

    model = Path(args.sd3_model)
    velocity, side = sb.open_nets(model)
    with np.load(model / "prompts.npz") as z:
        prompts = {k: z[k] for k in ("encoder_hidden_states", "pooled_projections")}
    from anchorflow.trainers.data import load_dataset

    x_test, y_test = load_dataset("digits", "test")
    n = args.n_sd3
    y = y_test[:n]
    cond = {k: v[y] for k, v in prompts.items()}
    x0 = x_test[:n]
    global NFES
    keep, NFES = NFES, tuple(int(v) for v in args.sd3_nfes.split(","))
    try:
        return {"n": int(n), "sidenet": "the data-free SideNet of sd3_digits_bench.py",
                "reconstruction": reconstruction_table("sd3", velocity, x0, cond, side, (-1.0, 1.0))}
    finally:
        NFES = keep


def _table(head, nfes, rows, fmt):
    out = ["| " + head + " | " + " | ".join(f"N={n}" for n in nfes) + " |", "|---" * (len(nfes) + 1) + "|"]
    for row, cells in rows.items():
        out.append(f"| {row} | " + " | ".join(fmt(cells[n]) if n in cells else "" for n in nfes) + " |")
    return out


def markdown(res) -> str:
    lines = [f"# Inversion and editing (benchmarks/inversion_bench.py)\n\nCommand: `{res['command']}`  \n"
             f"Machine: {res['machine']}; wall time {res['wall_s']:.0f} s\n",
             "Time: t = 1 noise, t = 0 data. Calls are the runtime's counts (checked in every run). A blank cell: "
             "the solver cannot spend exactly that budget (refused, never rounded).\n"]
    for key, title in (("reconstruction", "bundled digits model (real test digits)"),
                       ("mixture", "closed-form Gaussian mixture (exact inverse known)"),
                       ("sd3", "SD3-architecture digits model (torch through the adapter)")):
        if key not in res:
            continue
        rec = res[key]["reconstruction"]
        nfes = sorted({int(n) for r in rec["rows"].values() for n in r})
        lines += [f"## Reconstruction PSNR (dB), {title}, {res[key]['n']} samples: invert N + regenerate N calls, "
                  f"grid {rec.get('grid', 'uniform')}\n",
                  f"Euler at 50 + 50 calls: **{rec['euler50']:.2f} dB**"
                  + (f"; SideNet: {res[key]['sidenet']}" if "sidenet" in res[key] else "") + "\n"]
        lines += _table("solver", nfes, rec["rows"], lambda c: f"{c['psnr']:.2f}")
        if key == "mixture":
            lines += ["", "Inversion RMSE against the exact noise:", ""]
            lines += _table("solver", nfes, rec["rows"], lambda c: f"{c['inversion_rmse']:.2e}")
        lines.append("")
    if "backwards" in res:
        b = res["backwards"]
        lines += [f"## BA backwards (digits, {b['n']} test digits): inversion RMSE against {b['reference']} "
                  f"(reference vs half its calls: {b['reference_self_rmse']:.1e})\n"]
        lines += _table("inverter", NFES, b["rows"], lambda c: f"{c:.4f}")
        lines.append("")
    if "edits" in res:
        e = res["edits"]
        lines += [f"## Edits (digits, {e['n']} test digits): class a -> {e['pairs']}, switch {e['switch']}, "
                  f"inject {e['inject']} (weight {e['inject_weight']})\n",
                  f"Source digits classified correctly: {e['source_accuracy']:.3f}; kept region (background in the "
                  f"source and in class b's mean training image): {e['kept_pixels']:.2f} of the pixels. Calls: N to "
                  "invert + N to regenerate (sdedit and fresh noise: N in all)." +
                  (f" Picture: {e['grid']}." if "grid" in e else "") + "\n"]
        for strength, rows in e["strengths"].items():
            lines += [f"### strength {strength}: target-class accuracy / PSNR (dB) to the source on the kept region\n",
                      "| solver | acc N=5 | PSNR N=5 | acc N=10 | PSNR N=10 |", "|---|---|---|---|---|"]
            for row, cells in rows.items():
                f = [(f"{cells[n]['target_accuracy']:.3f}", f"{cells[n]['psnr_kept']:.2f}") if n in cells else ("", "")
                     for n in EDIT_NFES]
                lines.append(f"| {row} | {f[0][0]} | {f[0][1]} | {f[1][0]} | {f[1][1]} |")
            lines.append("")
    return "\n".join(lines) + "\n"


PARTS = ("reconstruction", "backwards", "edits", "mixture", "sd3")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parts", default="reconstruction,backwards,edits",
                   help="comma-separated: " + ", ".join(PARTS) + " (each fits one run of a few minutes)")
    p.add_argument("--n", type=int, default=360, help="test digits (the test split has 360)")
    p.add_argument("--ref", type=int, default=400, help="reference inversion calls (RK4)")
    p.add_argument("--ref-grid", default="shift:0.1", help="its grid (steps crowded near t = 0, where v is stiff)")
    p.add_argument("--recon-grid", default="uniform", help="the grid of every reconstruction (invert and regenerate)")
    p.add_argument("--strengths", default="0.6,0.8", help="edit strengths")
    p.add_argument("--grid-strength", type=float, default=0.8, help="the strength the picture shows (N = 10)")
    p.add_argument("--switch", type=float, default=None)
    p.add_argument("--inject", type=int, default=0)
    p.add_argument("--inject-weight", type=float, default=1.0)
    p.add_argument("--n-mix", type=int, default=64)
    p.add_argument("--sd3-model", default=str(ROOT / "benchmarks" / "results" / "sd3_digits" / "model"))
    p.add_argument("--n-sd3", type=int, default=32)
    p.add_argument("--sd3-nfes", default="3,5,8,10,20")
    p.add_argument("--grid", default=str(ROOT / "docs" / "inversion_grid.png"), help="edit picture ('' for none)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "inversion"), help="writes OUT.json, OUT.md")
    args = p.parse_args(argv)
    global GRID
    GRID = args.recon_grid
    parts = [s for s in args.parts.split(",") if s]
    bad = [s for s in parts if s not in PARTS]
    if bad:
        p.error(f"unknown part(s) {bad}; choose from {PARTS}")
    with open("/proc/loadavg") as f:
        load = f.read().split()[:3]
    res = {"command": "python benchmarks/inversion_bench.py " + shlex.join(sys.argv[1:] if argv is None else argv),
           "machine": f"{os.cpu_count()} cores, loadavg {' '.join(load)} at start (shared machine)"}
    start = time.perf_counter()
    for part in parts:
        res[part] = {"reconstruction": digits_reconstruction, "backwards": digits_backwards, "edits": digits_edits,
                     "mixture": mixture, "sd3": sd3}[part](args)
    res["wall_s"] = time.perf_counter() - start
    with open("/proc/loadavg") as f:
        res["machine"] += f", {' '.join(f.read().split()[:3])} at the end"
    _io.write_json(args.out + ".json", res)
    _io.write_bytes(args.out + ".md", markdown(res).encode())
    print(markdown(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
