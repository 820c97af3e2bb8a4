"""FastFlow with context bandits and the predictor-corrector reward: does either help?

Time runs from t = 1 (noise) to t = 0 (data); "calls" are backbone calls. At each budget C
(10, 15, 20) and per field, the bandit (calls budget C, hard cap ``max_calls=C``, fine grid of
2C steps warped as its multistep twin's tuned grid: the calls benchmark's default shape
``x2-twinwarp``) over two bases (``euler-o1``, the calls benchmark's default variant, and
``adams-o2``, its best variant) learns over one stream of batches, then runs frozen on
held-out noise, scored by PSNR against the fields' accurate references. Crossed:

- context: ``none`` (one bandit table, today's FastFlow), ``label`` (one table per class
  label), ``group2`` (labels 0-4 / 5-9: two tables) on the class-conditional mixture ``gm``;
  ``none`` vs ``guidance`` (one table per guidance setting) on ``digits``, whose stream mixes
  guidance 1 and 1.5 batch by batch (scored on both);
- reward: ``residual`` (the skip's velocity residual, the paper's) vs ``estimate`` (the
  predictor-corrector difference over the skipped span, in state units).

Every variant sees the same stream (same noise, labels and guidance per batch) and the same
held-out noise. The calls benchmark's helpers are imported, not copied: its fields
(``make_field``), its held-out/tuning sets and references and its warp tuning (``Bench``).
Reported per cell: held-out PSNR (dB), mean calls per sample, backbone invocations per
held-out batch (a contextual batch is split into one sub-run per context, each calling the
backbone on its own rows), and AB2 / iPNDM tuned at C for scale.

    python benchmarks/fastflow_context.py --fields gm
    python benchmarks/fastflow_context.py --fields digits
    python benchmarks/fastflow_context.py --combine

Writes benchmarks/results/fastflow_context_{field}.json per run, then fastflow_context.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fastflow_calls import BUDGETS, Bench, make_field, twin  # noqa: E402

from anchorflow.base._io import write_json, write_text  # noqa: E402
from anchorflow.runtime import FastFlowBandit  # noqa: E402
from anchorflow.runtime.evaluation.metrics import psnr  # noqa: E402
from anchorflow.runtime.fastflow.context import ContextBandits, solve_contextual  # noqa: E402
from anchorflow.runtime.solving.grids import warped  # noqa: E402

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
VARIANTS = (("euler", 1), ("adams", 2))
REWARDS = ("residual", "estimate")
CONTEXTS = {"gm": ("none", "label", "group2"), "digits": ("none", "guidance")}
MULT = 2


def _contexts(name: str, T: int, grid: np.ndarray, C: int, reward: str, seed: int = 0):
    """The bandit of context ``name``: a plain FastFlowBandit for ``none``, else ContextBandits."""
    settings = dict(calls=C, seed=seed, reward=reward)
    if name == "none":
        return FastFlowBandit(T, grid, **settings)
    if name == "label":
        return ContextBandits(T, grid, by="label", **settings)
    if name == "group2":
        return ContextBandits(T, grid, by="label", groups={i: "lo" if i < 5 else "hi" for i in range(10)}, **settings)
    if name == "guidance":
        return ContextBandits(T, grid, by="guidance", **settings)
    raise SystemExit(f"unknown context {name!r}")


def _run(field, bandit, noise, extra, T, grid, base, order, C, learn):
    kw = dict(base=base, order=order, max_calls=C, learn=learn)
    if isinstance(bandit, FastFlowBandit):
        r = field.solve("fastflow", noise, extra, T, grid=grid, bandit=bandit, **kw)
        return r.x, float(r.nfe), r.nfe
    r = solve_contextual(field.velocity, noise, T, bandit, **extra, **field.kw, **kw)
    return r.x, r.info["calls_per_sample"], r.nfe


class Setup:
    """One field (or a guidance pair of one model): its benches (held-out sets, references), the
    learning stream, and the tuned multistep baselines at each budget."""

    def __init__(self, name: str, args) -> None:
        self.name, self.args = name, args
        names = ["digits", "digitscfg1.5"] if name == "digits" else [name]
        self.benches = [Bench(make_field(n), args) for n in names]  # same noise seeds: same held-out noise
        first = self.benches[0].field
        self.streams = []  # one learning stream per seed (seed 0: the calls benchmark's stream seed 1)
        for seed in range(args.seeds):
            rng = np.random.default_rng(1 + 1000 * seed)
            self.streams.append([(i % len(self.benches), *first.batch(rng, args.batch)) for i in range(args.generations)])
        self.label = "; ".join(b.field.label for b in self.benches)

    def baselines(self, C: int) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for m in ("ab2", "ipndm"):
            out[m] = [b.tuned(m, C) for b in self.benches]
        return out

    def variant(self, C: int, base: str, order: int, context: str, reward: str, warp: dict) -> dict[str, Any]:
        """Every seed's learning stream and frozen held-out score; the mean and spread over seeds."""
        runs = [self.one(C, base, order, context, reward, warp, seed) for seed in range(self.args.seeds)]
        out = {k: float(np.mean([r[k] for r in runs])) for k in ("psnr", "calls", "invocations", "settled_calls")}
        out.update(psnr_std=float(np.std([r["psnr"] for r in runs])), seeds=runs, T=runs[0]["T"],
                   per_guidance=[{k: float(np.mean([r["per_guidance"][i][k] for r in runs])) for k in ("psnr", "calls")}
                                 for i in range(len(self.benches))])
        return out

    def one(self, C: int, base: str, order: int, context: str, reward: str, warp: dict, seed: int) -> dict[str, Any]:
        T = MULT * C
        grid = warped(T, warp["S"], warp["P"])
        bandit = _contexts(context, T, grid, C, reward, seed)
        curve = []
        for which, noise, extra in self.streams[seed]:
            _, calls, _ = _run(self.benches[which].field, bandit, noise, extra, T, grid, base, order, C, True)
            curve.append(calls)
        per = []
        for b in self.benches:
            ps, calls, inv = [], [], []
            for (n, e), ref in zip(b.eval_set, b.eval_ref):
                x, c, i = _run(b.field, bandit, n, e, T, grid, base, order, C, False)
                ps.append(psnr(x, ref, b.range) if np.all(np.isfinite(x)) else -math.inf)
                calls.append(c)
                inv.append(i)
            per.append({"psnr": float(np.mean(ps)), "calls": float(np.mean(calls)), "invocations": float(np.mean(inv))})
        tables = 1 if isinstance(bandit, FastFlowBandit) else len(bandit.tables)
        return {"psnr": float(np.mean([p["psnr"] for p in per])), "calls": float(np.mean([p["calls"] for p in per])),
                "invocations": float(np.mean([p["invocations"] for p in per])), "per_guidance": per,
                "tables": tables, "settled_calls": float(np.mean(curve[-10:])), "T": T}


def run_field(name: str, args, budgets) -> dict[str, Any]:
    start = time.perf_counter()
    s = Setup(name, args)
    out: dict[str, Any] = {"field": name, "label": s.label, "budgets": {}}
    for C in budgets:
        base_rows = s.baselines(C)
        row: dict[str, Any] = {"multistep": {m: {"psnr": float(np.mean([r["psnr"] for r in rs])),
                                                 "per_guidance": [r["psnr"] for r in rs]}
                                             for m, rs in base_rows.items()}, "fastflow": {}}
        for base, order in VARIANTS:
            warp = base_rows[twin(base, order)][0]  # the first (guidance 1) field's tuned warp
            for context in CONTEXTS[name]:
                for reward in REWARDS:
                    row["fastflow"][f"{base}-o{order}|{context}|{reward}"] = s.variant(C, base, order, context, reward,
                                                                                       warp)
        out["budgets"][str(C)] = row
        print(f"{name} C={C}: done at {time.perf_counter() - start:.0f} s", flush=True)
    out["seconds"] = time.perf_counter() - start
    return out


def markdown(out: dict) -> str:
    lines = ["# FastFlow: context bandits and the predictor-corrector reward", "",
             "Commands (machine load at each run's start in the field list; 2 shared cores):", ""]
    lines += [f"    {c}" for f in out["fields"] for c in f["commands"]] + [f"    {out['command']}", ""]
    lines += [
        "Cells: held-out PSNR (dB) against the accurate reference (RK4-2048 on gm, RK4-512 on digits), "
        "mean backbone calls per sample in brackets, then backbone invocations per held-out batch "
        "after the slash (a contextual batch runs one sub-run per context). "
        f"Bandit: calls budget C and hard cap C on a {MULT}C-step fine grid warped like its multistep twin's tuned "
        "grid (AB2 for euler-o1, iPNDM for adams-o2), learned over a stream of batches (same streams for every "
        "cell; stream length, batch and seeds per field below), then frozen; mean ± std over the seeds (seed s: "
        "learning stream and bandit seed s; the held-out noise is the same for every seed and cell). "
        "PSNR of a cell that spent fewer calls is not at equal calls: read the calls. digits: the stream alternates "
        "guidance 1 and 1.5; scores are the mean over both guidances.", ""]
    for f in out["fields"]:
        kind = f["field"].split("-")[0]
        ctxs = CONTEXTS[kind]
        cols = [f"{c} / {r}" for c in ctxs for r in REWARDS]
        runs = "; ".join(f"C = {a['budgets']}: stream {a['generations']} batches of {a['batch']}, {a['seeds']} seed(s), "
                         f"held-out {a['eval_batches']} x {a['eval_batch']} samples per guidance, warp tuning on "
                         f"{a['tune_batch']}" for a in f["run_args"])
        lines += [f"## {f['field']}: {f['label']}", "", runs + ".", "",
                  "| C | variant | AB2 | iPNDM | " + " | ".join(cols)
                  + " | estimate - residual (no context) | best context - none (residual) | "
                    "best context - none (estimate) |",
                  "|---|---|---|---|" + "---|" * (len(cols) + 3)]
        for C, row in f["budgets"].items():
            for base, order in VARIANTS:
                v = f"{base}-o{order}"
                cell = lambda c, r: row["fastflow"][f"{v}|{c}|{r}"]  # noqa: E731
                d = [cell("none", "estimate")["psnr"] - cell("none", "residual")["psnr"]]
                for r in REWARDS:
                    k = max(ctxs[1:], key=lambda c: cell(c, r)["psnr"])
                    d.append(f"{cell(k, r)['psnr'] - cell('none', r)['psnr']:+.2f} ({k})")
                ms = row["multistep"]
                lines.append(f"| {C} | {v} | {ms['ab2']['psnr']:.2f} | {ms['ipndm']['psnr']:.2f} | "
                             + " | ".join(f"{cell(c, r)['psnr']:.2f} ± {cell(c, r)['psnr_std']:.2f} "
                                          f"({cell(c, r)['calls']:.1f}) / {cell(c, r)['invocations']:.0f}"
                                          for c in ctxs for r in REWARDS)
                             + f" | {d[0]:+.2f} | {d[1]} | {d[2]} |")
        lines.append("")
        est, ctx = [], []
        for row in f["budgets"].values():
            for base, order in VARIANTS:
                cell = lambda c, r: row["fastflow"][f"{base}-o{order}|{c}|{r}"]["psnr"]  # noqa: E731
                est.append(cell("none", "estimate") - cell("none", "residual"))
                ctx += [cell(c, r) - cell("none", r) for c in ctxs[1:] for r in REWARDS]
        lines += [f"Summary over the {len(est)} (C, variant) cells: estimate - residual (no context) mean "
                  f"{np.mean(est):+.2f} dB, range {min(est):+.2f} to {max(est):+.2f}, ahead in {sum(e > 0 for e in est)}; "
                  f"context - none (every context and reward) mean {np.mean(ctx):+.2f} dB, range {min(ctx):+.2f} to "
                  f"{max(ctx):+.2f}, ahead in {sum(c > 0 for c in ctx)} of {len(ctx)}.", ""]
        if kind == "digits":
            lines += ["Per guidance (1 / 1.5), PSNR dB (mean over seeds):", ""]
            for C, row in f["budgets"].items():
                for k, r in row["fastflow"].items():
                    g = r["per_guidance"]
                    lines.append(f"- C={C} {k}: {g[0]['psnr']:.2f} / {g[1]['psnr']:.2f} "
                                 f"(calls {g[0]['calls']:.1f} / {g[1]['calls']:.1f})")
                ms = row["multistep"]
                lines.append(f"- C={C} AB2 {ms['ab2']['per_guidance'][0]:.2f} / {ms['ab2']['per_guidance'][1]:.2f}; "
                             f"iPNDM {ms['ipndm']['per_guidance'][0]:.2f} / {ms['ipndm']['per_guidance'][1]:.2f}")
            lines.append("")
    lines += ["Fields:", ""] + [f"- `{f['field']}`: load at start {f['load']}; {f['seconds']:.0f} s" for f in out["fields"]]
    return "\n".join(lines) + "\n"


def load_field(dest: Path, name: str) -> dict:
    """One field's results from its run files (all budgets in one, or one run per budget: a slow
    field's runs are split to stay under 5 minutes each); each run keeps its command and load."""
    files = sorted(dest.glob(f"fastflow_context_{name}.json")) + sorted(dest.glob(f"fastflow_context_{name}_*.json"))
    runs = [json.loads(f.read_text()) for f in files]
    if not runs:
        raise SystemExit(f"no results for field {name!r} in {dest}")
    budgets = {k: v for r in runs for k, v in r["budgets"].items()}
    return {"field": name, "label": runs[0]["label"], "args": runs[0]["args"],
            "budgets": {k: budgets[k] for k in sorted(budgets, key=int)}, "commands": [r["command"] for r in runs],
            "load": "; ".join(r["load"] for r in runs), "seconds": sum(r["seconds"] for r in runs),
            "run_args": [r["args"] for r in runs]}


def main(argv: Optional[list[str]] = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--fields", default="gm", help="comma list of gm, digits")
    p.add_argument("--combine", action="store_true", help="no runs: read the per-field results, write the tables")
    p.add_argument("--budgets", default=",".join(map(str, BUDGETS)))
    p.add_argument("--generations", type=int, default=60)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seeds", type=int, default=5, help="learning streams (and bandit seeds) per cell")
    p.add_argument("--tune-batch", type=int, default=16)
    p.add_argument("--eval-batch", type=int, default=16)
    p.add_argument("--eval-batches", type=int, default=4)
    p.add_argument("--tag", default="", help="a variant of a field's run (e.g. a longer stream): results under "
                   "FIELD-TAG, combined with --fields FIELD-TAG")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    dest = Path(args.out)
    command = "python benchmarks/fastflow_context.py " + " ".join(argv if argv is not None else sys.argv[1:])
    names = args.fields.split(",")
    if not args.combine:
        budgets = [int(c) for c in args.budgets.split(",")]
        tag = "" if budgets == list(BUDGETS) else "_" + "_".join(map(str, budgets))
        for n in names:
            load = " ".join(f"{v:.2f}" for v in os.getloadavg())
            out = {**run_field(n, args, budgets), "command": command, "load": load, "args": vars(args)}
            name = f"{n}-{args.tag}" if args.tag else n
            out["field"] = name
            write_json(dest / f"fastflow_context_{name}{tag}.json", out)
        return out
    fields = [load_field(dest, n) for n in names]
    out = {"command": command, "args": fields[0]["args"], "fields": fields}  # per-field settings: fields[i]["run_args"]
    write_json(dest / "fastflow_context.json", out)
    write_text(dest / "fastflow_context.md", markdown(out))
    print(markdown(out))
    return out


if __name__ == "__main__":
    main()
