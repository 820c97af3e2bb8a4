"""FastFlow benchmark: a persistent bandit over a stream of generations, against static baselines.

FastFlow (Bajpai et al., arXiv 2602.11105, ICLR 2026) on a 50-step Euler grid (t = 1 noise ->
t = 0 data). For each guidance scale, one bandit learns over a stream of >= 200 batches (fresh
noise each); we record the backbone calls of every generation (how the bandit settles), then
freeze it and measure PSNR against the RK4-512 reference of held-out noise, beside Euler-25,
Euler-50, static Euler at FastFlow's average calls and AB2 at that NFE (evaluation spec).
mu is swept as calibrated mu (``max_k mse_k / T``) times a factor; the spec's literal UCB
bonus (``bonus="raw"``) runs once at factor 1 for comparison.

Runs on the bundled digits model (anchorflow/bundled/digits/bundle, onnxruntime CPU) when it
exists, else on the closed-form Gaussian mixture of :mod:`anchorflow.runtime.analytic`.
Writes benchmarks/results/fastflow.json, fastflow.md and fastflow_settling.png.

    python benchmarks/fastflow_bench.py [--source auto|bundle|analytic] [--generations 200]
"""

from __future__ import annotations

import argparse
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import numpy as np
from tqdm import tqdm

from anchorflow._io import atomic_path, write_json, write_text
from anchorflow.runtime import FastFlowBandit, solve
from anchorflow.runtime.metrics import psnr

ROOT = Path(__file__).resolve().parents[1]
BUNDLE = ROOT / "anchorflow" / "bundled" / "digits" / "bundle"
T = 50
SETTLED = 50  # the last generations of the stream count as "settled"
GOAL_SPEEDUP = 2.6


# -- the field ----------------------------------------------------------------------------------
def open_field(source: str, bundle: Path = BUNDLE) -> tuple[Callable, dict[str, Any]]:
    """(velocity, meta) of an exported bundle (default: the bundled digits model), or of an
    8x8, 10-class Gaussian mixture."""
    if source == "bundle" or (source == "auto" and (Path(bundle) / "bundle.json").exists()):
        from anchorflow.modelref import open_model

        m = open_model(bundle, backend="ort-cpu")
        return m.velocity, {**m.meta, "name": f"{m.meta.get('name', 'model')} bundle {bundle}, ONNX on "
                                              f"{', '.join(m.providers)}"}
    from anchorflow.runtime.analytic import GaussianMixture

    gm = GaussianMixture.random((1, 8, 8), 20, classes=10, seed=0, spread=0.6, std=(0.2, 0.4))
    return gm, {"name": "analytic Gaussian mixture (8x8, 20 components, 10 classes)", "state_shape": (1, 8, 8),
                "num_classes": 10, "null_label": 10, "data_range": None}


def batches(meta: dict, n: int, batch: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal((batch, *meta["state_shape"])).astype(np.float32),
             rng.integers(0, meta["num_classes"], batch)) for _ in range(n)]


class Bench:
    """One guidance setting: the evaluation set, its RK4-512 references, and the runs on them."""

    def __init__(self, velocity: Callable, meta: dict, cfg: float, args: argparse.Namespace) -> None:
        self.velocity, self.meta, self.args = velocity, meta, args
        self.kw = dict(cfg_scale=cfg, null_label=meta["null_label"])
        self.evalset = batches(meta, args.eval_batches, args.eval_batch, seed=12345)
        self.refs = [solve("rk4", velocity, n, 4 * 512, y=y, **self.kw).x
                     for n, y in tqdm(self.evalset, desc=f"RK4-512 reference, cfg {cfg}", leave=False)]
        dr = meta["data_range"]
        self.data_range = dr if dr is not None else (min(r.min() for r in self.refs), max(r.max() for r in self.refs))

    def quality(self, method: str, nfe: int, **options) -> dict[str, Any]:
        """Mean PSNR (dB) over the evaluation set and the mean backbone calls per batch."""
        runs = [solve(method, self.velocity, n, nfe, y=y, **self.kw, **options) for n, y in self.evalset]
        return {"psnr": float(np.mean([psnr(r.x, ref, self.data_range) for r, ref in zip(runs, self.refs)])),
                "calls": float(np.mean([r.nfe for r in runs])),
                "skip_hist": dict(sum((Counter(r.info.get("skip_hist", {})) for r in runs), Counter()))}

    def calibrated_mu(self) -> float:
        """mu from a first, fully computed generation (the stream's first batch)."""
        noise, y = batches(self.meta, 1, self.args.batch, seed=1)[0]
        return solve("fastflow", self.velocity, noise, T, y=y, **self.kw).info["calibrated_mu"]


class Stream:
    """One persistent bandit learning over a stream of fresh batches (seeded, so resumable)."""

    def __init__(self, bench: Bench, factor: float, mu: float, bonus: str = "mu") -> None:
        self.bench, self.factor, self.bonus = bench, factor, bonus
        self.bandit = FastFlowBandit(T, mu=mu, bonus=bonus, seed=0)
        self.calls: list[int] = []
        self.hist: list[dict] = []

    def run(self, generations: int) -> "Stream":
        b, start = self.bench, len(self.calls)
        todo = batches(b.meta, start + generations, b.args.batch, seed=1)[start:]
        for n, y in tqdm(todo, leave=False, desc=f"stream mu x{self.factor:g} ({self.bonus})"):
            r = solve("fastflow", b.velocity, n, T, y=y, bandit=self.bandit, **b.kw)
            self.calls.append(r.nfe)
            self.hist.append(r.info["skip_hist"])
        return self

    def report(self) -> dict[str, Any]:
        """The stream so far, then the frozen bandit on the evaluation set beside static baselines."""
        b = self.bench
        frozen = b.quality("fastflow", T, bandit=self.bandit, learn=False)
        n = max(int(round(frozen["calls"])), 2)
        hist = sum((Counter(h) for h in self.hist[-SETTLED:]), Counter())
        return {"factor": self.factor, "mu": self.bandit.mu, "bonus": self.bonus, "generations": len(self.calls),
                "calls_curve": self.calls, "settled_calls": float(np.mean(self.calls[-SETTLED:])),
                "settled_at": settled_at(self.calls), "skip_hist": dict(sorted(hist.items())),
                "greedy": self.bandit.greedy(), "eval": frozen,
                "euler_same_calls": {"nfe": n, **b.quality("euler", n)}, "ab2_same_calls": {"nfe": n, **b.quality("ab2", n)}}


def settled_at(calls: list[int], window: int = 20, band: float = 1.0) -> int:
    """First generation after which the moving mean of calls stays within ``band`` of the final mean."""
    final = float(np.mean(calls[-SETTLED:]))
    mov = np.convolve(calls, np.ones(window) / window, mode="valid")
    outside = np.flatnonzero(np.abs(mov - final) > band)
    return int(outside[-1] + window) if outside.size else window


# -- one guidance setting -------------------------------------------------------------------------
def run_cfg(velocity, meta, cfg: float, factors: list[float], args: argparse.Namespace) -> dict[str, Any]:
    """Sweep mu over ``args.sweep`` generations each, then continue the best stream to ``args.generations``."""
    bench = Bench(velocity, meta, cfg, args)
    mu0 = bench.calibrated_mu()
    out = {"cfg": cfg, "calibrated_mu": mu0, "euler25": bench.quality("euler", 25), "euler50": bench.quality("euler", 50)}
    streams = [Stream(bench, f, mu0 * f).run(args.sweep) for f in factors]
    out["runs"] = [s.report() for s in streams]
    out["raw_bonus"] = Stream(bench, 1.0, mu0, bonus="raw").run(args.sweep).report()
    pick = pick_headline(out)
    best = streams[pick].run(args.generations - args.sweep).report() if args.generations > args.sweep else out["runs"][pick]
    out["runs"][pick] = best
    out["headline"] = headline(out, best)
    return out


def pick_headline(out: dict) -> int:
    """Index of the run with the best PSNR among those reaching the speed-up goal (else the fastest).

    Choosing the best quality at >= 2.6x, rather than the fewest calls that still pass, keeps the
    pick away from the PSNR threshold, which a 16-sample evaluation only knows to about 0.5 dB.
    """
    runs = out["runs"]
    fast = [i for i, r in enumerate(runs) if T / r["eval"]["calls"] >= GOAL_SPEEDUP]
    if fast:
        return max(fast, key=lambda i: runs[i]["eval"]["psnr"])
    return min(range(len(runs)), key=lambda i: runs[i]["eval"]["calls"])


def headline(out: dict, best: dict) -> dict[str, Any]:
    speedup = T / best["eval"]["calls"]
    return {"factor": best["factor"], "generations": best["generations"], "speedup": speedup,
            "psnr": best["eval"]["psnr"], "goal_speedup_met": speedup >= GOAL_SPEEDUP,
            "goal_psnr_met": best["eval"]["psnr"] >= out["euler25"]["psnr"],
            "beats_static_euler": best["eval"]["psnr"] > best["euler_same_calls"]["psnr"],
            "beats_ab2": best["eval"]["psnr"] > best["ab2_same_calls"]["psnr"]}


# -- reports --------------------------------------------------------------------------------------
def markdown(res: dict) -> str:
    lines = [f"# FastFlow benchmark ({res['source']})", "",
             f"T = {T}-step Euler grid. Each row: one persistent bandit learning over a stream of batches of "
             f"{res['batch']} (fresh noise each); mu swept as calibrated mu x factor for {res['sweep']} generations, "
             f"the headline row continued to {res['generations']}. Then the bandit is frozen and run on "
             f"{res['eval_samples']} held-out samples: PSNR (dB) against RK4-512 of the same noise, beside static "
             f"Euler and AB2 at the same number of calls. Calls = backbone calls per generation (CFG rows count once); "
             f"settled = mean over the last {SETTLED} generations. Run time {res['seconds']:.0f} s.", ""]
    for c in res["cfgs"]:
        e25, e50 = c["euler25"], c["euler50"]
        lines += [f"## guidance {c['cfg']}  (calibrated mu = {c['calibrated_mu']:.3g})", "",
                  f"Euler-25: {e25['psnr']:.2f} dB; Euler-50: {e50['psnr']:.2f} dB.", "",
                  "| mu factor | bonus | gens | calls (settled stream) | calls (eval) | speed-up vs 50 | settled at gen | "
                  "FastFlow PSNR | Euler same calls | AB2 same calls | skip hist (settled) |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in [*c["runs"], c["raw_bonus"]]:
            eu, ab = r["euler_same_calls"], r["ab2_same_calls"]
            lines.append(
                f"| {r['factor']:g} | {r['bonus']} | {r['generations']} | {r['settled_calls']:.1f} | {r['eval']['calls']:.1f} | "
                f"{T / r['eval']['calls']:.2f}x | {r['settled_at']} | {r['eval']['psnr']:.2f} | "
                f"{eu['psnr']:.2f} (N={eu['nfe']}) | {ab['psnr']:.2f} | {r['skip_hist']} |")
        h = c["headline"]
        lines += ["", f"Headline: factor {h['factor']:g} after {h['generations']} generations, {h['speedup']:.2f}x fewer calls than 50 steps, "
                  f"{h['psnr']:.2f} dB; goals: speed-up >= {GOAL_SPEEDUP} {'met' if h['goal_speedup_met'] else 'NOT met'}, "
                  f"PSNR >= Euler-25 {'met' if h['goal_psnr_met'] else 'NOT met'}, beats static Euler at the same calls: "
                  f"{'yes' if h['beats_static_euler'] else 'no'}, beats AB2 at the same calls: "
                  f"{'yes' if h['beats_ab2'] else 'no'}.", ""]
    return "\n".join(lines)


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfgs = res["cfgs"]
    fig, axes = plt.subplots(2, len(cfgs), figsize=(6 * len(cfgs), 8), squeeze=False)
    for j, c in enumerate(cfgs):
        ax = axes[0, j]
        for r in [*c["runs"], c["raw_bonus"]]:
            curve = np.convolve(r["calls_curve"], np.ones(10) / 10, mode="valid")
            ax.plot(np.arange(curve.size) + 10, curve, label=f"mu x{r['factor']:g} ({r['bonus']})")
        ax.set(title=f"guidance {c['cfg']}: calls per generation (10-gen mean)", xlabel="generation",
               ylabel="backbone calls", ylim=(0, T + 2))
        ax.legend(fontsize=8)
        h = next(r for r in c["runs"] if r["factor"] == c["headline"]["factor"])
        hist = {int(k): v for k, v in h["skip_hist"].items()}
        axes[1, j].bar([str(a) for a in sorted(hist)], [hist[a] for a in sorted(hist)])
        axes[1, j].set(title=f"skip lengths chosen, last {SETTLED} generations (mu x{h['factor']:g})",
                       xlabel="arm (steps skipped)", ylabel="decisions")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--source", choices=["auto", "bundle", "analytic"], default="auto")
    p.add_argument("--bundle", default=str(BUNDLE), help="bundle folder for --source bundle/auto")
    p.add_argument("--generations", type=int, default=200, help="length of the headline stream")
    p.add_argument("--sweep", type=int, default=100, help="generations of each mu-sweep stream")
    p.add_argument("--batch", type=int, default=4, help="samples per generation in the streams")
    p.add_argument("--eval-batch", type=int, default=16)
    p.add_argument("--eval-batches", type=int, default=1)
    p.add_argument("--cfg", default="1.0,1.5", help="guidance scales, comma-separated")
    p.add_argument("--factors", default="1,10,30,100,300", help="mu = calibrated mu x factor, comma-separated")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = p.parse_args(argv)
    start = time.perf_counter()
    velocity, meta = open_field(args.source, Path(args.bundle))
    factors = [float(f) for f in args.factors.split(",")]
    cfgs = [run_cfg(velocity, meta, float(c), factors, args) for c in args.cfg.split(",")]
    res = {"source": meta["name"], "T": T, "generations": args.generations, "sweep": args.sweep, "batch": args.batch,
           "eval_samples": args.eval_batches * args.eval_batch, "cfgs": cfgs, "seconds": time.perf_counter() - start}
    out = Path(args.out)
    write_json(out / "fastflow.json", res)
    write_text(out / "fastflow.md", markdown(res))
    plot(res, out / "fastflow_settling.png")
    print(markdown(res))
    return res


if __name__ == "__main__":
    main()
