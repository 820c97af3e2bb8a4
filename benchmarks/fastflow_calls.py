"""FastFlow at equal calls: every variant against fixed skip patterns and multistep solvers.

Time runs from t = 1 (noise) to t = 0 (data); "calls" are backbone calls (one CFG call counts
once). At each budget C (10, 15, 20 calls) and per field:

- multistep baselines on C steps: AB2, UniPC (bh2), iPNDM (AB up to 4), and BA where the field
  has a SideNet (the digits bundle);
- fixed skip patterns "compute 1, skip s" (s = 1, 2, 4) with Taylor extrapolation of order
  1, 2, 3 (order 1 is the caching/FastFlow rule, orders 2-3 the TaylorSeer form) on the largest
  grid whose calls fit in C;
- FastFlow variants: the bandit (calls budget C, mu adapted online) on a fine grid of M * C
  steps, over the Euler update (``base="euler"``, order 1 or 2) or the Adams update
  (``base="adams"``: Adams-Bashforth of order + 1 on the bandit-chosen sub-grid, order 1 or 2);
  it learns over ``--generations`` batches, then runs frozen on the held-out set.

Same grid-search budget for every baseline: ``anchorflow.tuning.coordinate_descent`` of the
``warp:S,P`` family (24 scores at most, the budget of ``anchorflow tune``), scored on a tuning
batch (its own seed), reported on the held-out batch (another seed). FastFlow's fine grid gets
no search of its own: it is ``uniform`` or borrows the warp tuned for AB2 at C ("ab2warp"), a
choice made on the dev fields. Same noise for every method.

Defaults are chosen on the dev fields (``--phase dev``: gm, relax, digits) by the mean margin
over the best multistep solver, written to ``fastflow_calls_dev.json``; ``--phase held`` runs
the chosen default (and every variant, for the record) on fields none of it was chosen on
(aniso, swirl).

    python benchmarks/fastflow_calls.py --phase dev
    python benchmarks/fastflow_calls.py --phase held

Writes benchmarks/results/fastflow_calls_{dev,held}.json and .md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fastflow_fields import AnisoMixture, Relax, Swirl  # noqa: E402

from anchorflow._io import write_json, write_text  # noqa: E402
from anchorflow.runtime import FastFlowBandit, solve  # noqa: E402
from anchorflow.runtime.analytic import GaussianMixture  # noqa: E402
from anchorflow.runtime.grids import uniform, warped  # noqa: E402
from anchorflow.runtime.metrics import psnr  # noqa: E402
from anchorflow.tuning import coordinate_descent  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BUNDLE = ROOT / "anchorflow" / "bundled" / "digits" / "bundle"
RESULTS = ROOT / "benchmarks" / "results"
BUDGETS = (10, 15, 20)
MULTISTEP = ("ab2", "unipc", "ipndm")
PATTERNS = (1, 2, 4)
PATTERN_ORDERS = (1, 2, 3)
VARIANTS = (("euler", 1), ("euler", 2), ("adams", 1), ("adams", 2))
MULTS = (2, 3)
FINE_GRIDS = ("uniform", "ab2warp")
PHASES = {"dev": ("gm", "relax", "digits"), "held": ("aniso", "swirl")}
MAX_EVALS = 24


class Field:
    def __init__(self, name: str, label: str, velocity: Callable, exact: Optional[Callable] = None,
                 classes: int = 0, cfg: float = 1.0, null_label=None, sidenet=None) -> None:
        self.name, self.label, self.velocity, self.classes, self.sidenet = name, label, velocity, classes, sidenet
        self.kw = dict(cfg_scale=cfg, null_label=null_label) if cfg != 1.0 else {}
        self.exact = exact or (lambda noise, extra: self.solve("rk4", noise, extra, 4 * 512).x)

    def batch(self, rng: np.random.Generator, b: int) -> tuple[np.ndarray, dict]:
        noise = rng.standard_normal((b, 1, 8, 8)).astype(np.float32)
        return noise, ({"y": rng.integers(0, self.classes, b)} if self.classes else {})

    def solve(self, method: str, noise, extra: dict, nfe: int, **options):
        side = {"sidenet": self.sidenet} if method.startswith("ba") else {}
        return solve(method, self.velocity, noise, nfe, **extra, **self.kw, **side, **options)


def make_field(name: str) -> Field:
    if name.startswith("digits"):
        from anchorflow.runtime.bundle import load_bundle

        m = load_bundle(BUNDLE, backend="ort-cpu", threads=1)  # one thread: the machine is shared
        model = m.meta["model"]
        cfg = 1.5 if name.endswith("cfg1.5") else 1.0
        f = Field(name, f"digits model (bundled ONNX + SideNet), guidance {cfg:g}", m.velocity,
                  classes=int(model["num_classes"]), cfg=cfg, null_label=model["null_label"], sidenet=m.sidenet)
        f.exact = lambda noise, extra: f.solve("rk4", noise, extra, 4 * 128).x  # 67.6 dB from RK4-256
        return f
    if name == "gm":
        gm = GaussianMixture.random((1, 8, 8), 20, classes=10, seed=0, spread=0.6, std=(0.2, 0.4))
        return Field(name, "analytic Gaussian mixture (8x8, 20 isotropic components, 10 classes)", gm, classes=10)
    if name == "aniso":
        a = AnisoMixture()
        return Field(name, a.name, a)
    if name in ("relax", "swirl"):
        field = Relax() if name == "relax" else Swirl()
        return Field(name, field.name, field, exact=lambda noise, extra: field.flow(noise))
    raise SystemExit(f"unknown field {name!r}")


def fastflow_calls(T: int, skip: int, order: int) -> int:
    """Backbone calls of the fixed pattern on a T-step grid, counted by the solver itself."""
    zero = lambda x, t, cond=None: np.zeros_like(x)  # noqa: E731
    return solve("fastflow", zero, np.zeros((1, 1)), T, fixed_skip=skip, order=order).nfe


def pattern_grid(skip: int, order: int, calls: int) -> int:
    """The largest grid whose "compute 1, skip ``skip``" pattern spends at most ``calls`` calls."""
    return max(t for t in range(max(3, skip), 8 * calls) if fastflow_calls(t, skip, order) <= calls)


class Bench:
    def __init__(self, field: Field, args) -> None:
        self.field, self.args = field, args
        self.tune_set = [field.batch(np.random.default_rng(777), args.tune_batch)]
        rng = np.random.default_rng(12345)
        self.eval_set = [field.batch(rng, args.eval_batch) for _ in range(args.eval_batches)]
        self.tune_ref = [field.exact(n, e) for n, e in self.tune_set]
        self.eval_ref = [field.exact(n, e) for n, e in self.eval_set]
        refs = self.tune_ref + self.eval_ref
        self.range = (min(float(r.min()) for r in refs), max(float(r.max()) for r in refs))

    def score(self, which: str, method: str, nfe: int, **options) -> tuple[float, float]:
        sets, refs = (self.tune_set, self.tune_ref) if which == "tune" else (self.eval_set, self.eval_ref)
        ps, calls = [], []
        for (n, e), ref in zip(sets, refs):
            r = self.field.solve(method, n, e, nfe, **options)
            ps.append(psnr(r.x, ref, self.range) if np.all(np.isfinite(r.x)) else -math.inf)
            calls.append(r.nfe)
        return float(np.mean(ps)), float(np.mean(calls))

    def tuned(self, method: str, steps: int, **options) -> dict[str, Any]:
        """Coordinate descent of warp:S,P on the tuning batch; the held-out PSNR of the winner."""
        def score(ls: float, lp: float) -> float:
            return self.score("tune", method, steps, grid=warped(steps, math.exp(ls), math.exp(lp)), **options)[0]

        (ls, lp), best, evals = coordinate_descent(score, max_evals=MAX_EVALS)
        grid = warped(steps, math.exp(ls), math.exp(lp))
        p, calls = self.score("eval", method, steps, grid=grid, **options)
        return {"psnr": p, "calls": calls, "steps": steps, "S": math.exp(ls), "P": math.exp(lp),
                "tune_psnr": best, "evals": evals, "uniform_psnr": self.score("eval", method, steps, **options)[0]}

    def fastflow(self, C: int, base: str, order: int, mult: int, fine: str, warp: dict) -> dict[str, Any]:
        T = mult * C
        grid = uniform(T) if fine == "uniform" else warped(T, warp["S"], warp["P"])
        bandit = FastFlowBandit(T, grid, calls=C, seed=0)
        rng, curve = np.random.default_rng(1), []
        for _ in range(self.args.generations):
            n, e = self.field.batch(rng, self.args.batch)
            curve.append(self.field.solve("fastflow", n, e, T, grid=grid, bandit=bandit, base=base, order=order).nfe)
        p, calls = self.score("eval", "fastflow", T, grid=grid, bandit=bandit, learn=False, base=base, order=order)
        settled = float(np.mean(curve[-20:]))
        return {"psnr": p, "calls": calls, "T": T, "fine": fine, "base": base, "order": order, "mult": mult,
                "settled_calls": settled, "mu": bandit.mu, "grid": [float(t) for t in grid]}

    def ba_on_fastflow_grid(self, C: int, row: dict) -> dict[str, Any]:
        """BA on the sub-grid each held-out batch's frozen FastFlow run computed (offline composition)."""
        grid = np.asarray(row["grid"])
        bandit = FastFlowBandit(row["T"], grid, calls=C, seed=0)
        rng = np.random.default_rng(1)
        for _ in range(self.args.generations):  # the same stream: the same bandit as the row's
            n, e = self.field.batch(rng, self.args.batch)
            self.field.solve("fastflow", n, e, row["T"], grid=grid, bandit=bandit, base=row["base"], order=row["order"])
        ps, calls = [], []
        for (n, e), ref in zip(self.eval_set, self.eval_ref):
            r = self.field.solve("fastflow", n, e, row["T"], grid=grid, bandit=bandit, learn=False,
                                 base=row["base"], order=row["order"])
            sub = np.r_[grid[:-1][np.array(r.info["computed"])], 0.0]
            b = self.field.solve("ba", n, e, len(sub) - 1, grid=sub)
            ps.append(psnr(b.x, ref, self.range))
            calls.append(b.nfe)
        return {"psnr": float(np.mean(ps)), "calls": float(np.mean(calls))}


def run_field(name: str, args, variants) -> dict[str, Any]:
    start = time.perf_counter()
    field = make_field(name)
    b = Bench(field, args)
    out = {"field": name, "label": field.label, "budgets": {}}
    for C in BUDGETS:
        row: dict[str, Any] = {"multistep": {}, "patterns": {}, "fastflow": {}}
        for m in MULTISTEP + (("ba",) if field.sidenet is not None else ()):
            row["multistep"][m] = b.tuned(m, C)
        for s in PATTERNS:
            for o in PATTERN_ORDERS:
                T = pattern_grid(s, o, C)
                row["patterns"][f"skip{s}-o{o}"] = {**b.tuned("fastflow", T, fixed_skip=s, order=o), "skip": s, "order": o}
        for base, order, mult, fine in variants:
            key = f"{base}-o{order}-x{mult}-{fine}"
            row["fastflow"][key] = b.fastflow(C, base, order, mult, fine, row["multistep"]["ab2"])
        if field.sidenet is not None and C == 10:
            best = max(row["fastflow"].values(), key=lambda r: r["psnr"])
            row["ba_on_fastflow_grid"] = {"from": best["base"] + f"-o{best['order']}-x{best['mult']}-{best['fine']}",
                                          **b.ba_on_fastflow_grid(C, best)}
        for r in row["fastflow"].values():
            r.pop("grid")
        out["budgets"][str(C)] = row
        print(f"{name} C={C}: done at {time.perf_counter() - start:.0f} s", flush=True)
    out["seconds"] = time.perf_counter() - start
    return out


def _best(d: dict) -> tuple[str, dict]:
    k = max(d, key=lambda k: d[k]["psnr"])
    return k, d[k]


def choose_default(fields: list[dict]) -> dict[str, Any]:
    """The variant with the largest mean margin over the best multistep solver, dev fields and budgets."""
    margins: dict[str, list[float]] = {}
    for f in fields:
        for row in f["budgets"].values():
            ms = max(r["psnr"] for k, r in row["multistep"].items() if k != "ba")
            for k, r in row["fastflow"].items():
                margins.setdefault(k, []).append(r["psnr"] - ms)
    key = max(margins, key=lambda k: np.mean(margins[k]))
    base, order, mult, fine = key.split("-")
    return {"key": key, "base": base, "order": int(order[1:]), "mult": int(mult[1:]), "fine": fine,
            "mean_margin_db": float(np.mean(margins[key])),
            "all_mean_margins_db": {k: float(np.mean(v)) for k, v in margins.items()}}


def _c(r: dict) -> str:
    return f"{r['psnr']:.2f} ({r['calls']:.1f})"


def markdown(out: dict) -> str:
    default = out["default"]["key"]
    lines = [f"# FastFlow at equal calls ({out['phase']} fields)", "",
             f"Command: `{out['command']}`. Machine load at start: {out['load']} (2 shared cores). "
             f"Run time {out['seconds']:.0f} s.", "",
             "Cells: held-out PSNR in dB against the exact flow (relax, swirl) or RK4 (gm, aniso: RK4-512 steps; "
             "digits: RK4-128), and (mean backbone calls). Baselines' `warp:S,P` grids tuned by the same "
             f"coordinate descent ({MAX_EVALS} scores) on a separate tuning batch. Pattern `skip s-o k`: compute 1, "
             "skip s, Taylor order k, on the largest grid whose calls fit. FastFlow `base-o k-x M-grid`: bandit with "
             "calls budget C on M*C fine steps.",
             f"Default FastFlow variant (chosen on the dev fields, mean margin over the best multistep solver "
             f"{out['default']['mean_margin_db']:+.2f} dB there): **{default}**.", "",
             "| field | C | best multistep | best fixed pattern | FastFlow default | best FastFlow variant | "
             "default - best pattern | default - best multistep |",
             "|---|---|---|---|---|---|---|---|"]
    for f in out["fields"]:
        for C, row in f["budgets"].items():
            mk, mr = _best({k: v for k, v in row["multistep"].items() if k != "ba"})
            pk, pr = _best(row["patterns"])
            fk, fr = _best(row["fastflow"])
            d = row["fastflow"].get(default)
            dcell = f"{_c(d)}" if d else "-"
            m1 = f"{d['psnr'] - pr['psnr']:+.2f}" if d else "-"
            m2 = f"{d['psnr'] - mr['psnr']:+.2f}" if d else "-"
            lines.append(f"| {f['field']} | {C} | {mk} {_c(mr)} | {pk} {_c(pr)} | {dcell} | {fk} {_c(fr)} | {m1} | {m2} |")
    lines += ["", "Every baseline (tuned grid; `uniform` in brackets: the same solver on the uniform grid):", ""]
    for f in out["fields"]:
        for C, row in f["budgets"].items():
            cells = [f"{k} {_c(r)} [{r['uniform_psnr']:.2f}]" for k, r in {**row["multistep"], **row["patterns"]}.items()]
            lines.append(f"- {f['field']} C={C}: " + "; ".join(cells))
    lines += ["", "Every FastFlow variant (settled calls while learning in brackets):", ""]
    for f in out["fields"]:
        for C, row in f["budgets"].items():
            cells = [f"{k} {_c(r)} [{r['settled_calls']:.1f}]" for k, r in row["fastflow"].items()]
            lines.append(f"- {f['field']} C={C}: " + "; ".join(cells))
    for f in out["fields"]:
        ba = f["budgets"].get("10", {}).get("ba_on_fastflow_grid")
        if ba:
            own = f["budgets"]["10"]["multistep"]["ba"]
            lines += ["", f"BA at 10 calls on {f['field']}: on its tuned grid {_c(own)}; on the sub-grid the "
                      f"best FastFlow variant ({ba['from']}) chose per batch {_c(ba)} "
                      f"({ba['psnr'] - own['psnr']:+.2f} dB)."]
    lines += ["", "Fields:", ""] + [f"- `{f['field']}`: {f['label']}" for f in out["fields"]]
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--phase", choices=sorted(PHASES), default="dev")
    p.add_argument("--fields", default=None, help="comma list (default: the phase's fields)")
    p.add_argument("--generations", type=int, default=40, help="learning stream length per bandit")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--tune-batch", type=int, default=16)
    p.add_argument("--eval-batch", type=int, default=16)
    p.add_argument("--eval-batches", type=int, default=2)
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--from-json", default=None, help="only rewrite the markdown from a results JSON")
    args = p.parse_args(argv)
    dest = Path(args.out)
    if args.from_json:
        out = json.loads(Path(args.from_json).read_text())
        write_text(dest / f"fastflow_calls_{out['phase']}.md", markdown(out))
        return out
    names = args.fields.split(",") if args.fields else list(PHASES[args.phase])
    if args.phase == "dev":
        variants = [(b, o, m, g) for b, o in VARIANTS for m in MULTS for g in FINE_GRIDS]
    else:
        dev = json.loads((dest / "fastflow_calls_dev.json").read_text())["default"]
        variants = [(b, o, dev["mult"], dev["fine"]) for b, o in VARIANTS]  # the default and its siblings
    start, load = time.perf_counter(), " ".join(f"{v:.2f}" for v in os.getloadavg())
    fields = [run_field(n, args, variants) for n in names]
    out = {"command": "python benchmarks/fastflow_calls.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "phase": args.phase, "load": load, "args": vars(args), "fields": fields,
           "seconds": time.perf_counter() - start}
    out["default"] = choose_default(fields) if args.phase == "dev" else {
        **json.loads((dest / "fastflow_calls_dev.json").read_text())["default"], "chosen_on": "dev"}
    write_json(dest / f"fastflow_calls_{args.phase}.json", out)
    write_text(dest / f"fastflow_calls_{args.phase}.md", markdown(out))
    print(markdown(out))
    return out


if __name__ == "__main__":
    main()
