"""Few-step inversion and editing, measured: reconstruction PSNR, the SideNet backwards, digit edits.

1. Reconstruction: ``invert`` (N calls, t = 0 -> 1, the image's own label) then ``regenerate`` (N calls,
   same label, same grid); PSNR against the input at N = 3, 5, 8, 10, 20 for every inverting solver
   (budgets a solver cannot honour exactly are left blank), against Euler at 50 + 50 calls. Models:
   the bundled digits model (real test digits, onnxruntime CPU), the closed-form Gaussian mixture
   (``--mixture``: exact inverse known, so the inversion error itself is reported too) and, with
   ``--sd3``, the SD3-architecture digits model (torch through the adapter; see sd3_digits_bench.py).
2. The BA SideNet backwards (digits): inversion error of ``ba`` with the forward-trained SideNet,
   with a zero SideNet (= AB2's iterates on a uniform grid), and AB2, against a reference inversion
   (RK4, ``--ref`` calls).
3. Edits (digits): every test digit of class a regenerated as class b = (a + 1) mod 10 (or ``--pairs``)
   at N = 5 and 10 per solver, with ``--strength`` / ``--switch`` / ``--inject``: the bundled
   classifier's accuracy on b, and the PSNR to the source on the pixels that are background in both
   the source and the mean training image of class b (the "outside the changed strokes" region);
   a picture grid (sources, inversions, edits) in docs/inversion_grid.png.

    python benchmarks/inversion_bench.py [--n 360] [--mixture] [--sd3] [--out benchmarks/results/inversion]

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

from anchorflow import _io
from anchorflow.runtime import SOLVERS
from anchorflow.runtime.invert import edit, invert, inverting_solvers, regenerate
from anchorflow.runtime.metrics import psnr, rmse

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


def reconstruct(method, velocity, x0, nfe, cond, kw, data_range):
    inv = invert(method, velocity, x0, nfe, cond=cond, **kw)
    gen = regenerate(method, velocity, inv.x, nfe, cond=cond, **kw)
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
    return {"rows": rows, "euler50": p50}


def digits(args, out):
    from anchorflow.runtime import load_bundle
    from anchorflow.runtime.classifier import Classifier
    from anchorflow.trainers.data import load_dataset

    bundle = load_bundle("default", backend="ort-cpu")
    dr = tuple(bundle.meta["model"]["data_range"])
    x_test, y_test = load_dataset("digits", "test")
    x_train, y_train = load_dataset("digits", "train")
    x0, y = x_test[: args.n], y_test[: args.n]
    cond = {"y": y}
    res = {"n": int(len(x0)), "data_range": list(dr)}
    start = time.perf_counter()
    res["reconstruction"] = reconstruction_table("digits", bundle.velocity, x0, cond, bundle.sidenet, dr)
    res["reconstruction_s"] = time.perf_counter() - start
    # the SideNet backwards: inversion error against a reference inversion
    ref = invert("rk4", bundle.velocity, x0, args.ref, cond=cond).x
    half = invert("rk4", bundle.velocity, x0, 4 * (args.ref // 8), cond=cond).x
    back = {"reference": f"rk4 at {args.ref} calls", "reference_self_rmse": rmse(half, ref), "rows": {}}
    for row, m, kw in [("ba", "ba", {"sidenet": bundle.sidenet}), ("ba (zero SideNet)", "ba", {"sidenet": ZeroSideNet()}),
                       ("ab2", "ab2", {}), ("euler", "euler", {})]:
        back["rows"][row] = {n: rmse(invert(m, bundle.velocity, x0, n, cond=cond, **kw).x, ref) for n in NFES}
    res["backwards"] = back
    # edits
    clf = Classifier(ROOT / "anchorflow" / "bundled" / "digits" / "classifier")
    means = np.stack([x_train[y_train == c].mean(axis=0) for c in range(10)])
    tgt = (y + 1) % 10
    keep = (x0 < 0.0) & (means[tgt] < 0.0)  # background in the source and in the target class's mean
    edits = {"pairs": "b = (a + 1) mod 10", "strength": args.strength, "switch": args.switch, "inject": args.inject,
             "inject_weight": args.inject_weight, "kept_pixels": float(keep.mean()), "rows": {}}
    pictures = {}
    for row, m, kw in methods(bundle.sidenet):
        cells = {}
        for n in EDIT_NFES:
            if not honours(m, n):
                continue
            e = edit(m, bundle.velocity, x0, n, source=y, target=tgt, null_label=bundle.meta["model"]["null_label"],
                     strength=args.strength, switch=args.switch, inject=args.inject,
                     inject_weight=args.inject_weight, **kw)
            acc = float(np.mean(clf.labels(e.x) == tgt))
            mse = float(np.sum(((e.x - x0) ** 2) * keep) / max(1, keep.sum()))
            cells[n] = {"target_accuracy": acc, "psnr_kept": 10 * np.log10((dr[1] - dr[0]) ** 2 / max(mse, 1e-12)),
                        "nfe": e.nfe}
            if n == 10:
                pictures[row] = e
        edits["rows"][row] = cells
        print(f"[edit] {row}: " + ", ".join(f"{n}: acc {c['target_accuracy']:.2f} psnr {c['psnr_kept']:.2f}"
                                            for n, c in cells.items()), flush=True)
    edits["source_accuracy"] = float(np.mean(clf.labels(x0) == y))
    res["edits"] = edits
    if args.grid:
        picture(pictures, x0, dr, args.grid)
    return res


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
    from anchorflow.runtime.analytic import ExactSideNet, GaussianMixture, exact_flow

    mix = GaussianMixture.random((1, 4, 4), 8, classes=4, seed=3)
    rng = np.random.default_rng(0)
    y = np.arange(args.n_mix) % 4
    noise = rng.standard_normal((args.n_mix, 1, 4, 4))
    x0 = exact_flow(mix, noise, cond={"y": y}, steps=400)
    dr = (float(x0.min()), float(x0.max()))
    side = ExactSideNet(mix, scale=0.9, steps=40)  # a 0.9-scaled exact SideNet: an imperfect learned one
    res = reconstruction_table("mixture", mix, x0, {"y": y}, side, dr, exact_noise=noise)
    res["data_range"] = list(dr)
    res["sidenet"] = "ExactSideNet(scale=0.9)"
    return res


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
        return reconstruction_table("sd3", velocity, x0, cond, side, (-1.0, 1.0))
    finally:
        NFES = keep


def markdown(res) -> str:
    lines = [f"# Inversion and editing\n\nCommand: `{res['command']}`  \nMachine: {res['machine']}\n"]
    for key, title in (("digits", "bundled digits model (real test digits)"), ("mixture", "closed-form mixture"),
                       ("sd3", "SD3-architecture digits model")):
        if key not in res:
            continue
        rec = res[key]["reconstruction"] if key == "digits" else res[key]
        nfes = sorted({int(n) for r in rec["rows"].values() for n in r})
        lines += [f"## Reconstruction PSNR (dB), {title}: invert N + regenerate N calls\n",
                  f"Euler at 50 + 50 calls: **{rec['euler50']:.2f} dB**\n",
                  "| solver | " + " | ".join(f"N={n}" for n in nfes) + " |", "|---" * (len(nfes) + 1) + "|"]
        for row, cells in rec["rows"].items():
            lines.append(f"| {row} | " + " | ".join(
                f"{cells[n]['psnr']:.2f}" if n in cells else "" for n in nfes) + " |")
        if key == "mixture":
            lines += ["", "Inversion RMSE against the exact noise:", "",
                      "| solver | " + " | ".join(f"N={n}" for n in nfes) + " |", "|---" * (len(nfes) + 1) + "|"]
            for row, cells in rec["rows"].items():
                lines.append(f"| {row} | " + " | ".join(
                    f"{cells[n]['inversion_rmse']:.2e}" if n in cells else "" for n in nfes) + " |")
        lines.append("")
    if "digits" in res:
        b = res["digits"]["backwards"]
        lines += [f"## BA backwards (digits): inversion RMSE against {b['reference']} "
                  f"(reference self-check {b['reference_self_rmse']:.1e})\n",
                  "| inverter | " + " | ".join(f"N={n}" for n in NFES) + " |", "|---" * (len(NFES) + 1) + "|"]
        for row, cells in b["rows"].items():
            lines.append(f"| {row} | " + " | ".join(f"{cells[n]:.4f}" for n in NFES) + " |")
        e = res["digits"]["edits"]
        lines += ["", f"## Edits (digits): class a -> {e['pairs']}, strength {e['strength']}, switch {e['switch']}, "
                  f"inject {e['inject']} (weight {e['inject_weight']})\n",
                  f"Source digits classified correctly: {e['source_accuracy']:.3f}; kept region: "
                  f"{e['kept_pixels']:.2f} of the pixels. Calls: N to invert + N to regenerate.\n",
                  "| solver | acc@5 | PSNR kept@5 | acc@10 | PSNR kept@10 |", "|---|---|---|---|---|"]
        for row, cells in e["rows"].items():
            f = [(f"{cells[n]['target_accuracy']:.3f}", f"{cells[n]['psnr_kept']:.2f}") if n in cells else ("", "")
                 for n in EDIT_NFES]
            lines.append(f"| {row} | {f[0][0]} | {f[0][1]} | {f[1][0]} | {f[1][1]} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=360, help="test digits (the test split has 360)")
    p.add_argument("--ref", type=int, default=400, help="reference inversion calls (RK4)")
    p.add_argument("--strength", type=float, default=0.8)
    p.add_argument("--switch", type=float, default=None)
    p.add_argument("--inject", type=int, default=0)
    p.add_argument("--inject-weight", type=float, default=1.0)
    p.add_argument("--mixture", action="store_true")
    p.add_argument("--n-mix", type=int, default=64)
    p.add_argument("--no-digits", action="store_true")
    p.add_argument("--sd3", action="store_true")
    p.add_argument("--sd3-model", default=str(ROOT / "benchmarks" / "results" / "sd3_digits" / "model"))
    p.add_argument("--n-sd3", type=int, default=32)
    p.add_argument("--sd3-nfes", default="3,5,8,10,20")
    p.add_argument("--grid", default=str(ROOT / "docs" / "inversion_grid.png"))
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "inversion"))
    args = p.parse_args(argv)
    with open("/proc/loadavg") as f:
        load = f.read().split()[:3]
    res = {"command": "python benchmarks/inversion_bench.py " + shlex.join(sys.argv[1:] if argv is None else argv),
           "machine": f"{os.cpu_count()} cores, loadavg {' '.join(load)} at start (shared machine)"}
    if not args.no_digits:
        res["digits"] = digits(args, args.out)
    if args.mixture:
        res["mixture"] = mixture(args)
    if args.sd3:
        res["sd3"] = sd3(args)
    _io.write_json(args.out + ".json", res)
    _io.write_bytes(args.out + ".md", markdown(res).encode())
    print(markdown(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
