"""Outputs of ``anchorflow bench``: results.json, report.md, quality_vs_nfe.png and sample grids."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from . import _io

GRID_NFE = 8  # sample grids show each solver at the requested NFE closest to this


def _done(runs: list[dict], name: str, cfg: float, nfes: Sequence[int]) -> list[dict]:
    """The runs of solver ``name`` at guidance ``cfg`` that ran (not skipped) at a requested NFE."""
    return [r for r in runs if r["solver"] == name and r["cfg"] == cfg and "skipped" not in r
            and r["nfe_requested"] in nfes]


# -- outputs -----------------------------------------------------------------------------------
def _grid_nfe(runs: list[dict], name: str, cfg: float, nfes: Sequence[int]) -> Optional[dict]:
    """The run of ``name`` shown in its sample grid: the ran NFE closest (in log) to GRID_NFE."""
    return min(_done(runs, name, cfg, nfes), key=lambda r: (abs(math.log(r["nfe_requested"] / GRID_NFE)),
                                                            r["nfe_requested"]), default=None)


def _sample_figures(out: Path, results: dict, runs: list[dict], ref_x: dict, data_range, y, held_out) -> dict:
    """Sample grids (images) or one scatter figure per guidance scale (2-D points); name -> file."""
    from . import plots
    from ._deps import available

    s = results["settings"]
    shape, classes = results["model"]["state_shape"], results["model"]["num_classes"] or 0
    files: dict[str, str] = {}
    for cfg in s["cfg_scales"]:
        shown = {"reference": ref_x[cfg]}
        for name in s["solvers"]:
            r = _grid_nfe(runs, name, cfg, s["nfes"])
            if r is not None:
                shown[f"{name} nfe={r['nfe']}"] = r["x"]
        if len(shape) == 1:
            if available("matplotlib"):
                fname = f"samples_cfg{cfg:g}.png"
                if held_out is not None:
                    shown["held-out data"] = held_out
                plots.plot_points({k: v[:, :2] for k, v in shown.items()}, out / fname, labels=y)
                files[f"samples cfg={cfg:g}"] = fname
            continue
        nrow = classes if 2 <= classes <= 16 else 8
        for label, x in shown.items():
            fname = f"samples_{label.replace(' ', '_').replace('=', '')}_cfg{cfg:g}.png"
            plots.save_grid(x[: nrow * 8], out / fname, nrow=nrow, data_range=data_range)
            files[f"{label} cfg={cfg:g}"] = fname
    return files


def _quality_figure(out: Path, results: dict) -> Optional[str]:
    """PSNR vs NFE, one panel per guidance scale, one line per solver (log x); None without matplotlib."""
    from . import plots
    from ._deps import available

    if not available("matplotlib"):
        return None
    panels = {}
    for cfg in results["settings"]["cfg_scales"]:
        lines = {}
        for name in results["settings"]["solvers"]:
            pts = sorted((r["nfe"], r["psnr"]) for r in _done(results["runs"], name, cfg, results["settings"]["nfes"]))
            if pts:
                lines[name] = ([k for k, _ in pts], [p for _, p in pts])
        ladder = [(r["nfe"], r["psnr"]) for r in results["euler_ladder"] if r["cfg"] == cfg]
        lines["euler ladder"] = ([k for k, _ in ladder], [p for _, p in ladder])
        panels[f"guidance {cfg:g}"] = lines
    plots.plot_curves(panels, out / "quality_vs_nfe.png", "NFE (backbone calls)", "PSNR vs reference (dB)",
                      dashed=("euler ladder",))
    return "quality_vs_nfe.png"


def write_outputs(out: Path, results: dict, runs: list[dict], ref_x: dict, data_range, y=None, held_out=None) -> dict:
    """Write results.json, report.md, quality_vs_nfe.png and the sample figures (each atomically)."""
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, Any] = {"results": "results.json", "report": "report.md"}
    no_mpl = "skipped: matplotlib is not installed (pip install 'anchorflow[plot]')"
    files["quality_vs_nfe"] = _quality_figure(out, results) or no_mpl
    files["samples"] = _sample_figures(out, results, runs, ref_x, data_range, y, held_out)
    results["files"] = files
    _io.write_json(out / "results.json", results)
    _io.write_text(out / "report.md", render_report(results))
    return files


# -- report.md ---------------------------------------------------------------------------------
def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    return ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers),
            *("| " + " | ".join(str(c) for c in row) + " |" for row in rows), ""]


def _grid_table(results: dict, cfg: float, cell: Callable[[dict], str]) -> list[str]:
    """Solver x NFE table of ``cell(run)`` ("-" when skipped)."""
    nfes = results["settings"]["nfes"]
    by = {(r["solver"], r["nfe_requested"]): r for r in results["runs"] if r["cfg"] == cfg}
    rows = [[name, *("-" if "skipped" in by[(name, k)] else cell(by[(name, k)]) for k in nfes)]
            for name in results["settings"]["solvers"]]
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
        r = _grid_nfe(results["runs"], name, cfg, results["settings"]["nfes"])
        if r is not None:
            t = r["timing"]
            rows.append([name, r["nfe"], r["sidenet_calls"], f"{t['total_ms']:.2f}", f"{t['backbone_ms']:.2f}",
                         f"{t['sidenet_ms']:.2f}", f"{t['overhead_ms']:.2f}", f"{t['overhead_frac']:.1%}"])
    return rows


def _section(results: dict, cfg: float) -> list[str]:
    ref = next(r for r in results["references"] if r["cfg"] == cfg)
    chk, dist = ref["self_check"], _dist_cell(ref)
    lines = [f"## Guidance scale {cfg:g}", "",
             f"Reference: {ref['method']} ({ref['nfe']} calls); self-check {chk['compare']}: RMSE {chk['rmse']:.2e}, "
             f"PSNR {chk['psnr']:.1f} dB." + (f" Reference {dist}." if dist != "n/a" else ""), "",
             "### PSNR (dB) against the reference", "", *_grid_table(results, cfg, _psnr_cell),
             "### Euler NFE needed to match that PSNR", "", *_grid_table(results, cfg, _match_cell)]
    if any(k in r for r in results["runs"] for k in ("fd", "accuracy", "swd")):
        lines += ["### Distribution quality", "", *_grid_table(results, cfg, _dist_cell)]
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
