"""FastFlow at equal calls: every variant against fixed skip patterns and multistep solvers.

Time runs from t = 1 (noise) to t = 0 (data); "calls" are backbone calls (one CFG call counts
once). At each budget C (10, 15, 20 calls) and per field:

- multistep baselines on C steps: AB2, UniPC (bh2), iPNDM (AB up to 4), and BA where the field
  has a SideNet (digits, sd3digits);
- fixed skip patterns "compute 1, skip s" (s = 1, 2, 4) with Taylor extrapolation of order
  1, 2, 3 (order 1 is the caching/FastFlow rule, orders 2-3 the TaylorSeer form) on the largest
  grid whose calls fit in C;
- FastFlow variants: the bandit (calls budget C, mu adapted online, and the hard cap
  ``max_calls=C``: no generation spends more) on a fine grid of M * C steps, over the Euler
  update (``base="euler"``, order 1 or 2) or the Adams update (``base="adams"``:
  Adams-Bashforth of order + 1 on the bandit-chosen sub-grid, order 1, 2 or 3); it learns over
  ``--generations`` batches, then runs frozen on the held-out set;
- at C = 10: FastFlow over another solver of the registry (BA where the field has a SideNet, UniPC,
  iPNDM): that solver on the sub-grid each variant's frozen bandit computes, against the same solver
  at 10 calls on its tuned grid.

Same grid-search budget for every baseline: ``anchorflow.tuning.coordinate_descent`` of the
``warp:S,P`` family (24 scores at most, the budget of ``anchorflow tune``), scored on a tuning
batch (its own seed), reported on the held-out batches (another seed). FastFlow's fine grid gets
no search of its own: it is ``uniform`` or borrows the warp tuned for its multistep twin at C
(``twinwarp``). Same noise for every method.

Defaults are chosen on the dev fields (``--phase dev``: gm, relax, digits) by the mean margin
over the best multistep solver, written to ``fastflow_calls_dev.json``; ``--phase held`` runs
the chosen default (and its siblings of every base and order, for the record) on fields none
of it was chosen on (aniso, swirl, sd3digits, and digits-cfg1.5: the digits model at guidance 1.5). Each run writes one file per field and budget
(``--budgets`` splits a slow field into runs under 5 minutes), then ``--combine`` writes the tables:

    python benchmarks/fastflow_calls.py --phase dev --fields gm     # and relax, digits
    python benchmarks/fastflow_calls.py --phase dev --combine
    python benchmarks/fastflow_calls.py --phase held --fields aniso  # and swirl, sd3digits, digits-cfg1.5
    python benchmarks/fastflow_calls.py --phase held --combine

Writes benchmarks/results/fastflow_calls_{phase}_{field}_{C}.json per run, and
fastflow_calls_{dev,held}.json and .md.
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

from anchorflow.base._io import write_json, write_text  # noqa: E402
from anchorflow.runtime import FastFlowBandit, solve  # noqa: E402
from anchorflow.runtime.evaluation.analytic import GaussianMixture  # noqa: E402
from anchorflow.runtime.solving.grids import uniform, warped  # noqa: E402
from anchorflow.runtime.evaluation.metrics import psnr  # noqa: E402
from anchorflow.tuning import coordinate_descent  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BUNDLE = ROOT / "anchorflow" / "bundled" / "digits" / "bundle"
RESULTS = ROOT / "benchmarks" / "results"
BUDGETS = (10, 15, 20)
MULTISTEP = ("ab2", "unipc", "ipndm")
PATTERNS = (1, 2, 4)
PATTERN_ORDERS = (1, 2, 3)
VARIANTS = (("euler", 1), ("euler", 2), ("adams", 1), ("adams", 2), ("adams", 3))
MULTS = (2, 3)
FINE_GRIDS = ("uniform", "twinwarp")
OVER_BASES = ("unipc", "ipndm")  # FastFlow over these (and BA where there is a SideNet) at 10 calls
PHASES = {"dev": ("gm", "relax", "digits"), "held": ("aniso", "swirl", "sd3digits", "digits-cfg1.5")}
SD3 = ROOT / "benchmarks" / "results" / "sd3_digits" / "model"


def twin(base: str, order: int) -> str:
    """The multistep solver whose tuned warp a ``twinwarp`` fine grid borrows: AB2 for Euler and
    Adams order 1 (AB2 itself), iPNDM (Adams-Bashforth up to 4) for Adams orders 2-3."""
    return "ipndm" if base == "adams" and order > 1 else "ab2"
MAX_EVALS = 24


class Field:
    def __init__(self, name: str, label: str, velocity: Callable, exact: Optional[Callable] = None,
                 classes: int = 0, cfg: float = 1.0, null_label=None, sidenet=None) -> None:
        self.name, self.label, self.velocity, self.classes, self.sidenet = name, label, velocity, classes, sidenet
        self.kw = dict(cfg_scale=cfg, null_label=null_label) if cfg != 1.0 else {}
        self.exact = exact or (lambda noise, extra: self.solve("rk4", noise, extra, 4 * 512).x)

    prompts: Optional[dict] = None  # sd3digits: the class prompts (a cond dict per batch)

    def batch(self, rng: np.random.Generator, b: int) -> tuple[np.ndarray, dict]:
        noise = rng.standard_normal((b, 1, 8, 8)).astype(np.float32)
        if self.prompts is not None:
            labels = rng.integers(0, self.classes, b)
            return noise, {"cond": {k: v[labels] for k, v in self.prompts.items()}}
        return noise, ({"y": rng.integers(0, self.classes, b)} if self.classes else {})

    def solve(self, method: str, noise, extra: dict, nfe: int, **options):
        side = {"sidenet": self.sidenet} if method.startswith("ba") else {}
        return solve(method, self.velocity, noise, nfe, **extra, **self.kw, **side, **options)


def make_field(name: str) -> Field:
    if name.startswith("digits"):
        from anchorflow.runtime.bundles.load import load_bundle

        m = load_bundle(BUNDLE, backend="ort-cpu", threads=1)  # one thread: the machine is shared
        model = m.meta["model"]
        cfg = 1.5 if name.endswith("cfg1.5") else 1.0
        f = Field(name, f"digits model (bundled ONNX + SideNet), guidance {cfg:g}", m.velocity,
                  classes=int(model["num_classes"]), cfg=cfg, null_label=model["null_label"], sidenet=m.sidenet)
        f.exact = lambda noise, extra: f.solve("rk4", noise, extra, 4 * 128).x  # 67.6 dB from RK4-256
        return f
    if name == "sd3digits":
        import torch

        from anchorflow.trainers.adapters import load_source
        from anchorflow.trainers.sidenet import load_sidenet
        from anchorflow.trainers.torch_wrappers import TorchSideNet

        torch.set_num_threads(1)  # the machine is shared
        adapter = load_source(str(SD3 / "transformer"))
        side = TorchSideNet(load_sidenet(SD3 / "sidenet", adapter))
        f = Field(name, "SD3-architecture digits model (torch, class prompts) + its data-free SideNet, guidance 1",
                  adapter.call_numpy, classes=10, sidenet=side)
        with np.load(SD3 / "prompts.npz") as z:
            f.prompts = {k: z[k] for k in ("encoder_hidden_states", "pooled_projections")}
        f.exact = lambda noise, extra: f.solve("rk4", noise, extra, 4 * 128).x
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
        """The bandit (budget C, hard cap C) learning on a stream, then frozen on the held-out set."""
        T = mult * C
        grid = uniform(T) if fine == "uniform" else warped(T, warp["S"], warp["P"])
        bandit = FastFlowBandit(T, grid, calls=C, seed=0)
        rng, curve = np.random.default_rng(1), []
        for _ in range(self.args.generations):
            n, e = self.field.batch(rng, self.args.batch)
            curve.append(self.field.solve("fastflow", n, e, T, grid=grid, bandit=bandit, base=base, order=order,
                                             max_calls=C).nfe)
        p, calls = self.score("eval", "fastflow", T, grid=grid, bandit=bandit, learn=False, base=base, order=order,
                              max_calls=C)
        settled = float(np.mean(curve[-20:]))
        out = {"psnr": p, "calls": calls, "max_calls": max(curve), "T": T, "fine": fine, "base": base,
               "order": order, "mult": mult, "settled_calls": settled, "mu": bandit.mu}
        if C == 10:
            over = (("ba",) if self.field.sidenet is not None else ()) + OVER_BASES
            out["over"] = {m: self.over(T, grid, bandit, base, order, m) for m in over}
            if "ba" in out["over"]:
                out["over_ba"] = out["over"]["ba"]
        return out

    def over(self, T: int, grid: np.ndarray, bandit: FastFlowBandit, base: str, order: int,
             method: str) -> dict[str, Any]:
        """FastFlow over ``method`` (a registry solver: BA with its SideNet between anchors, UniPC,
        iPNDM): ``method`` on the sub-grid the frozen bandit computes, so the bandit decides which
        grid points get a backbone call and the computed steps use ``method``'s updates.

        A frozen bandit's choices depend on its statistics and on the calls spent so far only,
        not on the batch, so its computed sub-grid is one fixed schedule (checked: ``distinct``
        counts the sub-grids seen over the held-out batches); ``method`` on it costs its own calls only.
        """
        subs, ps, calls = [], [], []
        for (n, e), ref in zip(self.eval_set, self.eval_ref):
            r = self.field.solve("fastflow", n, e, T, grid=grid, bandit=bandit, learn=False, base=base,
                                 order=order, max_calls=int(round(bandit.target)))
            sub = np.r_[grid[:-1][np.array(r.info["computed"])], 0.0]
            b = self.field.solve(method, n, e, len(sub) - 1, grid=sub)
            subs.append(tuple(np.round(sub, 12)))
            ps.append(psnr(b.x, ref, self.range) if np.all(np.isfinite(b.x)) else -math.inf)
            calls.append(b.nfe)
        return {"psnr": float(np.mean(ps)), "calls": float(np.mean(calls)), "distinct": len(set(subs)),
                "sub_grid": [float(t) for t in subs[0]]}


def run_field(name: str, args, variants, budgets) -> dict[str, Any]:
    start = time.perf_counter()
    field = make_field(name)
    b = Bench(field, args)
    out = {"field": name, "label": field.label, "budgets": {}}
    for C in budgets:
        row: dict[str, Any] = {"multistep": {}, "patterns": {}, "fastflow": {}}
        for m in MULTISTEP + (("ba",) if field.sidenet is not None else ()):
            row["multistep"][m] = b.tuned(m, C)
        for s in PATTERNS:
            for o in PATTERN_ORDERS:
                T = pattern_grid(s, o, C)
                row["patterns"][f"skip{s}-o{o}"] = {**b.tuned("fastflow", T, fixed_skip=s, order=o), "skip": s, "order": o}
        for base, order, mult, fine in variants:
            key = f"{base}-o{order}-x{mult}-{fine}"
            row["fastflow"][key] = b.fastflow(C, base, order, mult, fine, row["multistep"][twin(base, order)])
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
             "Commands (one per field, then the combining step; machine load at each field's start in the "
             "field list below, 2 shared cores):", ""]
    lines += [f"    {c}" for f in out["fields"] for c in f["commands"]] + [f"    {out['command']}", ""]
    lines += [
        "Cells: held-out PSNR in dB against the exact flow (relax, swirl) or RK4 (gm, aniso: RK4-2048 steps; "
        "digits, sd3digits: RK4-512), and (mean backbone calls per sample). Baselines' `warp:S,P` grids tuned by the "
        f"same coordinate descent ({MAX_EVALS} scores) on a separate tuning batch. Pattern `skip s-o k`: compute 1, "
        "skip s, Taylor order k, on the largest grid whose calls fit in C (its warp tuned the same way). FastFlow "
        "`base-o k-x M-grid`: bandit with calls budget C *and hard cap C* on M*C fine steps (`uniform`, or "
        "`twinwarp`: the warp tuned for AB2 (Euler, Adams o1) or iPNDM (Adams o2, o3) at C), learned over a stream "
        f"of {out['args']['generations']} batches of {out['args']['batch']}, then frozen. `adams-o k` is "
        "Adams-Bashforth of order k + 1 on the bandit-chosen sub-grid; `euler-o k` the paper's Euler update with "
        "order-k Taylor extrapolation of skipped velocities.",
        f"Default FastFlow variant (chosen on the dev fields {', '.join(out['default'].get('dev_fields', []))} by "
        f"the mean margin over the best multistep solver, {out['default']['mean_margin_db']:+.2f} dB there): "
        f"**{default}**.", "",
        "| field | C | AB2 | UniPC | iPNDM | best fixed pattern | FastFlow default | best FastFlow variant | "
        "default - best pattern | default - max(AB2, UniPC) | default - best multistep |",
        "|---|---|---|---|---|---|---|---|---|---|---|"]
    for f in out["fields"]:
        for C, row in f["budgets"].items():
            ms = {k: v for k, v in row["multistep"].items() if k != "ba"}
            mk, mr = _best(ms)
            pk, pr = _best(row["patterns"])
            fk, fr = _best(row["fastflow"])
            d = row["fastflow"].get(default)
            au = max(ms["ab2"]["psnr"], ms["unipc"]["psnr"])
            cells = [f"{_c(d)}", f"{d['psnr'] - pr['psnr']:+.2f}", f"{d['psnr'] - au:+.2f}",
                     f"{d['psnr'] - mr['psnr']:+.2f} ({mk})"] if d else ["-"] * 4
            lines.append(f"| {f['field']} | {C} | {_c(ms['ab2'])} | {_c(ms['unipc'])} | {_c(ms['ipndm'])} | "
                         f"{pk} {_c(pr)} | {cells[0]} | {fk} {_c(fr)} | " + " | ".join(cells[1:]) + " |")
    lines += ["", "Every baseline (tuned grid; `uniform` in brackets: the same solver on the uniform grid):", ""]
    for f in out["fields"]:
        for C, row in f["budgets"].items():
            cells = [f"{k} {_c(r)} [{r['uniform_psnr']:.2f}]" for k, r in {**row["multistep"], **row["patterns"]}.items()]
            lines.append(f"- {f['field']} C={C}: " + "; ".join(cells))
    lines += ["", "Every FastFlow variant (most calls any learning generation spent, then the mean of the last 20, "
              "in brackets):", ""]
    for f in out["fields"]:
        for C, row in f["budgets"].items():
            cells = [f"{k} {_c(r)} [{r['max_calls']}, {r['settled_calls']:.1f}]" for k, r in row["fastflow"].items()]
            lines.append(f"- {f['field']} C={C}: " + "; ".join(cells))
    for f in out["fields"]:
        row = f["budgets"].get("10", {})
        for m in ("ba",) + OVER_BASES:
            over = {k: (r.get("over") or {"ba": r.get("over_ba")}).get(m) for k, r in row.get("fastflow", {}).items()}
            over = {k: r for k, r in over.items() if r is not None}
            if not over or m not in row["multistep"]:
                continue
            own, name = row["multistep"][m], {"ba": "BA", "unipc": "UniPC", "ipndm": "iPNDM"}[m]
            bk = max(over, key=lambda k: over[k]["psnr"])
            lines += ["", f"FastFlow over {name} at 10 calls on {f['field']}: {name}-10 on its tuned grid {_c(own)} "
                      f"(uniform grid {own['uniform_psnr']:.2f}); {name} on the sub-grid the frozen bandit computes:", ""]
            for k, r in over.items():
                mark = " (default)" if k == default else (" (best)" if k == bk else "")
                lines.append(f"- {k}{mark}: {_c(r)}, {r['psnr'] - own['psnr']:+.2f} dB vs {name}-10 tuned; "
                             f"{r['distinct']} distinct sub-grid(s) over the held-out batches")
    lines += ["", "Fields:", ""] + [f"- `{f['field']}`: {f['label']}; load at start {f['load']}; {f['seconds']:.0f} s"
                                    for f in out["fields"]]
    return "\n".join(lines) + "\n"


def run_path(dest: Path, phase: str, name: str, C: int) -> Path:
    return dest / f"fastflow_calls_{phase}_{name}_{C}.json"


def load_field(dest: Path, phase: str, name: str) -> dict:
    """One field's results from its per-budget run files (each records its own command and load)."""
    runs = [json.loads(run_path(dest, phase, name, C).read_text()) for C in BUDGETS]
    return {"field": name, "label": runs[0]["label"], "args": runs[0]["args"],
            "budgets": {k: v for r in runs for k, v in r["budgets"].items()},
            "commands": sorted({r["command"] for r in runs}), "load": "; ".join(r["load"] for r in runs),
            "seconds": sum(r["seconds"] for r in runs)}


def main(argv: Optional[list[str]] = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--phase", choices=sorted(PHASES), default="dev")
    p.add_argument("--fields", default=None, help="comma list (default: the phase's fields)")
    p.add_argument("--combine", action="store_true",
                   help="no runs: read the phase's per-field results, choose the default (dev), write the tables")
    p.add_argument("--budgets", default=",".join(map(str, BUDGETS)), help="comma list of calls budgets C")
    p.add_argument("--generations", type=int, default=40, help="learning stream length per bandit")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--tune-batch", type=int, default=16)
    p.add_argument("--eval-batch", type=int, default=16)
    p.add_argument("--eval-batches", type=int, default=2)
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    dest = Path(args.out)
    command = "python benchmarks/fastflow_calls.py " + " ".join(argv if argv is not None else sys.argv[1:])
    names = args.fields.split(",") if args.fields else list(PHASES[args.phase])
    if not args.combine:
        if args.phase == "dev":
            variants = [(b, o, m, g) for b, o in VARIANTS for m in MULTS for g in FINE_GRIDS]
        else:
            dev = json.loads((dest / "fastflow_calls_dev.json").read_text())["default"]
            variants = [(b, o, dev["mult"], dev["fine"]) for b, o in VARIANTS]  # the default and its siblings
        for n in names:
            for C in (int(c) for c in args.budgets.split(",")):
                load = " ".join(f"{v:.2f}" for v in os.getloadavg())
                out = {**run_field(n, args, variants, [C]), "command": command, "load": load, "args": vars(args)}
                write_json(run_path(dest, args.phase, n, C), out)
        return out
    fields = [load_field(dest, args.phase, n) for n in names]
    out = {"command": command, "phase": args.phase, "args": fields[0]["args"], "fields": fields,
           "seconds": sum(f["seconds"] for f in fields)}
    out["default"] = {**choose_default(fields), "dev_fields": names} if args.phase == "dev" else {
        **json.loads((dest / "fastflow_calls_dev.json").read_text())["default"], "chosen_on": "dev"}
    write_json(dest / f"fastflow_calls_{args.phase}.json", out)
    write_text(dest / f"fastflow_calls_{args.phase}.md", markdown(out))
    print(markdown(out))
    return out


if __name__ == "__main__":
    main()
