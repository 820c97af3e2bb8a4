"""report.md of ``anchorflow bench``: markdown tables rendered from a results dict (as in results.json)."""

from __future__ import annotations

import math
from typing import Any, Callable, Optional, Sequence

from . import calibration
from .results import done_runs

GRID_NFE = 8  # sample grids and timing tables show each solver at the requested NFE closest to this


def grid_run(runs: list[dict], name: str, cfg: float, nfes: Sequence[int]) -> Optional[dict]:
    """The run of ``name`` shown in its sample grid: the ran NFE closest (in log) to GRID_NFE."""
    return min(done_runs(runs, name, cfg, nfes), key=lambda r: (abs(math.log(r["nfe_requested"] / GRID_NFE)),
                                                                r["nfe_requested"]), default=None)


# -- report.md ---------------------------------------------------------------------------------
def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    return ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers),
            *("| " + " | ".join(str(c) for c in row) + " |" for row in rows), ""]


def _grid_table(results: dict, cfg: float, cell: Callable[[dict], str],
                names: Optional[Sequence[str]] = None) -> list[str]:
    """Solver x NFE table of ``cell(run)`` ("-" when skipped); rows ``names`` (default: every solver)."""
    nfes = results["settings"]["nfes"]
    by = {(r["solver"], r["nfe_requested"]): r for r in results["runs"] if r["cfg"] == cfg}
    rows = [[name, *("-" if "skipped" in by[(name, k)] else cell(by[(name, k)]) for k in nfes)]
            for name in (results["settings"]["solvers"] if names is None else names)]
    return _table(["solver \\ NFE", *map(str, nfes)], rows)


def _psnr_cell(r: dict) -> str:
    extra = "" if r["nfe"] == r["nfe_requested"] else f" ({r['nfe']} calls)"
    return f"{r['psnr']:.2f}{extra}"


def _match_cell(r: dict) -> str:
    m = r["euler_nfe_to_match"]
    lo, hi = m["bracket"]
    return f">{lo}" if m["nfe"] is None else f"<={hi}" if lo is None else f"{m['nfe']:.1f}"


def _dist_cell(r: dict) -> str:
    parts = [f"FD {r['fd']:.3g}" if "fd" in r else "", f"acc {r['accuracy']:.0%}" if "accuracy" in r else "",
             f"SWD {r['swd']:.3g}" if "swd" in r else ""]
    return " / ".join(p for p in parts if p) or "n/a"


def _timing_rows(results: dict, cfg: float) -> list[list[Any]]:
    rows = []
    for name in results["settings"]["solvers"]:
        r = grid_run(results["runs"], name, cfg, results["settings"]["nfes"])
        if r is not None:
            t = r["timing"]
            rows.append([name, r["nfe"], r["sidenet_calls"], f"{t['total_ms']:.2f}", f"{t['backbone_ms']:.2f}",
                         f"{t['sidenet_ms']:.2f}", f"{t['overhead_ms']:.2f}", f"{t['overhead_frac']:.1%}"])
    return rows


def _calibration_lines(results: dict, cfg: float) -> list[str]:
    """The error estimate's Spearman / median ratio per solver x NFE (solvers with an estimate only)."""
    cal = results.get("calibration")
    if not cal:
        return []
    lines = ["### Error estimate vs true error (Spearman / median estimate over true)", "",
             f"True error: {cal['true_error']}. Spearman 1 = the estimate ranks the samples exactly as their "
             "true error; median ratio 1 = calibrated scale. Per-sample values: `calibration.csv`; figure: "
             "`calibration.png`.", ""]
    if cal["with_estimate"]:
        pooled = {p["solver"]: p["spearman"] for p in cal["pooled"] if p["cfg"] == cfg}
        rows = [s for s in cal["with_estimate"] if s in pooled]
        lines += _grid_table(results, cfg, lambda r: calibration.cell(r) if "error_estimate" in r else "n/a", rows)
        lines += ["Spearman over every NFE together: " + ", ".join(
            f"{s} {'n/a' if pooled[s] is None else f'{pooled[s]:.2f}'}" for s in rows) + ".", ""]
    ref = next((r for r in results["references"] if r["cfg"] == cfg), {})
    floor = (ref.get("reference_error") or {}).get("rmse_estimate")
    near = [f"{r['solver']}@{r['nfe_requested']}" for r in results["runs"] if r["cfg"] == cfg
            and "error_estimate" in r and floor is not None and r["error_estimate"]["mean_true_error"] is not None
            and r["error_estimate"]["mean_true_error"] < calibration.FLOOR_FACTOR * floor]
    if near:
        lines += [f"Caution: the true error of {', '.join(near)} is under {calibration.FLOOR_FACTOR:g}x the "
                  f"reference's own error (RMSE {floor:.1e}); their Spearman partly ranks the reference's error "
                  "(use a finer --reference).", ""]
    if cal["without_estimate"]:
        lines += [f"No error estimate (not in the table or the figure): {', '.join(cal['without_estimate'])}.", ""]
    return lines


def _section(results: dict, cfg: float) -> list[str]:
    ref = next(r for r in results["references"] if r["cfg"] == cfg)
    chk, dist = ref["self_check"], _dist_cell(ref)
    if chk is None:
        check = "self-check skipped (--no-self-check)."
    else:
        check = (f"self-check {chk['compare']}: RMSE {chk['rmse']:.2e}, PSNR {chk['psnr']:.1f} dB (the error of the "
                 f"coarser solve)")
        est = ref.get("reference_error")
        check += "." if est is None else (f"; the reference's own error, by Richardson (order 4): RMSE "
                                          f"{est['rmse_estimate']:.1e}, PSNR {est['psnr_estimate']:.1f} dB.")
    lines = [f"## Guidance scale {cfg:g}", "",
             f"Reference: {ref['method']} ({ref['nfe']} calls); {check}" + (f" Reference {dist}." if dist != "n/a" else ""),
             "",
             "### PSNR (dB) against the reference", "", *_grid_table(results, cfg, _psnr_cell),
             "### Euler NFE needed to match that PSNR", "", *_grid_table(results, cfg, _match_cell)]
    if any(k in r for r in results["runs"] for k in ("fd", "accuracy", "swd")):
        lines += ["### Distribution quality", "", *_grid_table(results, cfg, _dist_cell)]
    lines += _calibration_lines(results, cfg)
    if results["settings"].get("grids") == "tuned":
        lines += ["### Time grid of each run (`warp:S,P` from `anchorflow tune`; uniform where none was tuned)", "",
                  *_grid_table(results, cfg, lambda r: r.get("grid", "uniform"))]
    orders = [[o["solver"], "-" if o["textbook"] is None else o["textbook"],
               "-" if o["empirical"] is None else f"{o['empirical']:.2f}"]
              for o in results["orders"] if o["cfg"] == cfg]
    lines += ["### Empirical order (slope of log RMSE vs log NFE)", "",
              *_table(["solver", "textbook", "empirical"], orders),
              f"### Timing per batch of {results['settings']['n']} (ms), at the NFE closest to {GRID_NFE}", "",
              *_table(["solver", "NFE", "SideNet calls", "total", "backbone", "SideNet", "overhead", "overhead %"],
                      _timing_rows(results, cfg))]
    return lines


def render_report(results: dict) -> str:
    """The markdown report of a results dict."""
    s, mach, model = results["settings"], results["machine"], results["model"]
    lines = [f"# anchorflow bench: {model['name']}", "",
             f"Model id `{model['model_id']}`, state {tuple(model['state_shape'])}, "
             f"{model['num_classes'] or 0} classes; "
             f"{s['n']} samples, seed {s['seed']}, guidance interval {tuple(s['cfg_interval'])}. "
             f"Machine: {mach['platform']}, {mach['cpu_count']} CPUs, numpy {mach['numpy']}, onnxruntime "
             f"{mach['onnxruntime']}, providers {', '.join(mach['providers']) or 'n/a'}.", "",
             f"Command: `{s['command']}`", "",
             "PSNR is per sample against the reference from the same noise, averaged (range = the data's own lo..hi). "
             "NFE = backbone calls counted by the runtime. Euler NFE to match: interpolated in log NFE on the "
             f"Euler ladder {s['euler_ladder'][0]}..{s['euler_ladder'][-1]}.", ""]
    for cfg in s["cfg_scales"]:
        lines += _section(results, cfg)
    skipped = sorted({(r["solver"], r["skipped"]) for r in results["runs"] if "skipped" in r})
    if skipped:
        lines += ["## Skipped", "", *(f"- {name}: {why}" for name, why in skipped), ""]
    return "\n".join(lines)
