"""How well each solver's free per-sample error estimate (``Result.error_estimate``) tracks its true error.

For every run whose solver returns an estimate (BA, AB2, iPNDM, UniPC; every other solver gives
None and is listed as such): the **true error** of each sample is the RMSE of the solve against the
bench's own reference from the same noise, ``sqrt(mean((x_b - ref_b)^2))`` over the state's
elements, in state units, the units of the estimate. Per run the bench records

- ``spearman``: Spearman's rank correlation of estimate and true error over the samples (None with
  fewer than 2 samples or when either is constant);
- ``median_ratio``: the median over samples of estimate / true error (samples whose true error is
  exactly 0 left out; None when none is left): the estimate's scale, 1 = calibrated;
- ``mean_estimate``, ``mean_true_error`` and ``samples``.

Written: an ``error_estimate`` block per run in results.json, ``calibration.csv`` (one row per
sample: the arrays every number above is computed from), a table in report.md and
``calibration.png`` (log-log scatter of estimate against true error, one panel per solver, points
coloured by NFE, the y = x line). The estimate is an indicator, not a bound: a ranking (Spearman)
near 1 is what makes it useful for escalation; its scale differs between solvers.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from ..runtime.solving.estimate import spearman

TRUE_ERROR = "per-sample RMSE of the solve against the bench's reference from the same noise (state units)"
# A run whose mean true error is under this many times the reference's own (Richardson) error is flagged
# in report.md: its "true" error is then partly the reference's.
FLOOR_FACTOR = 10.0
CSV_HEADER = ("solver", "nfe_requested", "nfe", "cfg", "sample", "estimate", "true_error")


def per_sample_rmse(x: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """(B,) float64: the RMSE of each sample of ``x`` (B, ...) against ``ref`` (B, ...)."""
    d = (np.asarray(x, np.float64) - np.asarray(ref, np.float64)).reshape(len(x), -1)
    return np.sqrt(np.mean(d * d, axis=1))


def _finite(v: float) -> Optional[float]:
    return float(v) if math.isfinite(v) else None


def summarize(estimate: np.ndarray, true: np.ndarray) -> dict[str, Any]:
    """The per-run calibration numbers (JSON-ready; see the module docstring)."""
    est, tru = np.asarray(estimate, np.float64), np.asarray(true, np.float64)
    ok = np.isfinite(est) & np.isfinite(tru)  # a diverged sample is counted, not ranked
    bad = int(est.size - ok.sum())
    est, tru = est[ok], tru[ok]
    rho = spearman(est, tru) if est.size >= 2 else float("nan")
    pos = tru > 0
    ratio = float(np.median(est[pos] / tru[pos])) if pos.any() else float("nan")
    out = {"spearman": _finite(rho), "median_ratio": _finite(ratio),
           "mean_estimate": _finite(float(est.mean())) if est.size else None,
           "mean_true_error": _finite(float(tru.mean())) if tru.size else None, "samples": int(est.size)}
    return out | ({"nonfinite": bad} if bad else {})


def summary(runs: Sequence, labels: Sequence[str], cfgs: Sequence[float]) -> dict[str, Any]:
    """The results.json ``calibration`` block: which solvers give an estimate, and per (solver,
    guidance) the Spearman over every sample of every NFE together ("pooled": does the estimate
    also rank across budgets?). ``runs``: the :class:`~anchorflow.bench.runs.RunRecord` list."""
    done = [r for r in runs if r.skipped is None and not r.ladder_only]
    with_est = [s for s in labels if any(r.solver == s and r.estimate is not None for r in done)]
    without = [s for s in labels if s not in with_est and any(r.solver == s for r in done)]
    pooled = []
    for cfg in cfgs:
        for s in with_est:
            mine = [r for r in done if r.solver == s and r.cfg == cfg and r.estimate is not None]
            if mine:
                est = np.concatenate([r.estimate for r in mine])
                tru = np.concatenate([r.true_error for r in mine])
                rho = spearman(est, tru) if est.size >= 2 else float("nan")
                pooled.append({"solver": s, "cfg": cfg, "nfes": [r.nfe_requested for r in mine],
                               "spearman": _finite(rho)})
    return {"true_error": TRUE_ERROR, "file": "calibration.csv", "with_estimate": with_est,
            "without_estimate": without, "pooled": pooled}


def csv_text(runs: Sequence) -> str:
    """calibration.csv: one row per sample of every run with an estimate (floats exact: ``repr``)."""
    lines = [",".join(CSV_HEADER)]
    for r in runs:
        if r.estimate is None or r.ladder_only:
            continue
        for i, (e, t) in enumerate(zip(r.estimate, r.true_error)):
            lines.append(f"{r.solver},{r.nfe_requested},{r.nfe},{r.cfg!r},{i},{float(e)!r},{float(t)!r}")
    return "\n".join(lines) + "\n"


def read_csv(path: str | os.PathLike) -> list[dict[str, Any]]:
    """calibration.csv back as rows (numbers parsed), e.g. to recompute the table."""
    rows = Path(path).read_text().splitlines()
    head = rows[0].split(",")
    kinds = {"solver": str, "nfe_requested": int, "nfe": int, "sample": int}
    return [{k: kinds.get(k, float)(v) for k, v in zip(head, line.split(","))} for line in rows[1:] if line]


def _rho(v: Optional[float]) -> str:
    return "n/a" if v is None else f"{v:.2f}"


def cell(run: dict) -> str:
    """The report cell of one run: ``Spearman / median ratio`` (n/a where undefined)."""
    c = run["error_estimate"]
    ratio = "n/a" if c["median_ratio"] is None else f"{c['median_ratio']:.2g}"
    return f"{_rho(c['spearman'])} / {ratio}"


def plot(runs: Sequence, path: str | os.PathLike, labels: Sequence[str], nfes: Sequence[int],
         cfgs: Sequence[float]) -> Path:
    """calibration.png: per solver a log-log panel of estimate (y) against true error (x), one
    colour per NFE (and one marker per guidance scale), the y = x line, Spearman in the legend.
    Non-positive values cannot sit on log axes: they are counted in the panel title instead."""
    from .. import plots
    from ..base._deps import require

    require("matplotlib")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = [s for s in labels if any(r.solver == s and r.estimate is not None for r in runs)]
    ncols = max(1, min(4, len(names)))
    nrows = max(1, math.ceil(len(names) / ncols))
    fig = Figure(figsize=(4.2 * ncols, 3.8 * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False).reshape(-1)
    markers = "os^Dv<>p"
    for ax, name in zip(axes, names):
        mine = [r for r in runs if r.solver == name and r.estimate is not None and not r.ladder_only]
        lo, hi, hidden = math.inf, 0.0, 0
        for r in sorted(mine, key=lambda r: (r.cfg, r.nfe_requested)):
            est, tru = np.asarray(r.estimate, np.float64), np.asarray(r.true_error, np.float64)
            ok = (est > 0) & (tru > 0)
            hidden += int((~ok).sum())
            rho = summarize(est, tru)["spearman"]
            k = list(nfes).index(r.nfe_requested) if r.nfe_requested in nfes else 0
            tag = f"NFE {r.nfe}" + (f", cfg {r.cfg:g}" if len(cfgs) > 1 else "")
            ax.scatter(tru[ok], est[ok], s=10, alpha=0.75, color=plots.LINE_COLOURS[k % len(plots.LINE_COLOURS)],
                       marker=markers[list(cfgs).index(r.cfg) % len(markers)] if r.cfg in cfgs else "o",
                       label=f"{tag}: Spearman {_rho(rho)}")
            if ok.any():
                lo = min(lo, float(tru[ok].min()), float(est[ok].min()))
                hi = max(hi, float(tru[ok].max()), float(est[ok].max()))
        if hi > 0:  # the same range on both axes, so that y = x is the diagonal
            ax.plot([lo, hi], [lo, hi], ls="--", color="0.45", lw=1, label="y = x")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlim(lo / 1.25, hi * 1.25)
            ax.set_ylim(lo / 1.25, hi * 1.25)
            ax.tick_params(which="minor", labelsize=6)
        rho_all = summarize(np.concatenate([r.estimate for r in mine]),
                            np.concatenate([r.true_error for r in mine]))["spearman"]
        title = f"{name} (all runs together: Spearman {_rho(rho_all)})"
        if hidden:
            title += f"\n{hidden} points <= 0 or not finite: not shown"
        ax.set(title=title, xlabel="true error (per-sample RMSE vs reference)", ylabel="error estimate")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6)
    for ax in axes[len(names):]:
        ax.set_axis_off()
    return plots._save_figure(fig, path)
