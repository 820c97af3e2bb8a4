"""Files of ``anchorflow bench``: results.json, report.md, quality_vs_nfe.png, calibration.png and .csv,
and the sample figures."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ..base import _io
from . import calibration
from .report import grid_run, render_report
from .results import done_runs
from .runs import Measured


@dataclass(frozen=True)
class Shown:
    """What the sample figures draw beside the samples: the data's (lo, hi), labels (n,), held-out data."""

    data_range: tuple[float, float]
    labels: Optional[np.ndarray] = None
    held_out: Optional[np.ndarray] = None


def _panels(results: dict, measured: Measured, cfg: float) -> dict[str, np.ndarray]:
    """Reference and, per solver, its samples at the NFE closest to GRID_NFE (label -> (n, ...))."""
    s = results["settings"]
    samples = {(r.solver, r.nfe_requested, r.cfg): r.x for r in measured.runs if r.x is not None}
    shown = {"reference": measured.ref_x[cfg]}
    for name in s["solvers"]:
        r = grid_run(results["runs"], name, cfg, s["nfes"])
        if r is not None:
            shown[f"{name} nfe={r['nfe']}"] = samples[(name, r["nfe_requested"], cfg)]
    return shown


def _sample_figures(out: Path, results: dict, measured: Measured, shown_with: Shown) -> dict:
    """Sample grids (images) or one scatter figure per guidance scale (2-D points); name -> file."""
    from .. import plots
    from ..base._deps import available

    shape, classes = results["model"]["state_shape"], results["model"]["num_classes"] or 0
    files: dict[str, str] = {}
    for cfg in results["settings"]["cfg_scales"]:
        shown = _panels(results, measured, cfg)
        if len(shape) == 1:
            if available("matplotlib"):
                fname = f"samples_cfg{cfg:g}.png"
                if shown_with.held_out is not None:
                    shown["held-out data"] = shown_with.held_out
                plots.plot_points({k: v[:, :2] for k, v in shown.items()}, out / fname, labels=shown_with.labels)
                files[f"samples cfg={cfg:g}"] = fname
            continue
        nrow = classes if 2 <= classes <= 16 else 8
        for label, x in shown.items():
            fname = f"samples_{label.replace(' ', '_').replace('=', '')}_cfg{cfg:g}.png"
            plots.save_grid(x[: nrow * 8], out / fname, nrow=nrow, data_range=shown_with.data_range)
            files[f"{label} cfg={cfg:g}"] = fname
    return files


def _quality_figure(out: Path, results: dict) -> Optional[str]:
    """PSNR vs NFE, one panel per guidance scale, one line per solver (log x); None without matplotlib."""
    from .. import plots
    from ..base._deps import available

    if not available("matplotlib"):
        return None
    panels = {}
    for cfg in results["settings"]["cfg_scales"]:
        lines = {}
        for name in results["settings"]["solvers"]:
            pts = sorted((r["nfe"], r["psnr"]) for r in done_runs(results["runs"], name, cfg, results["settings"]["nfes"]))
            if pts:
                lines[name] = ([k for k, _ in pts], [p for _, p in pts])
        ladder = [(r["nfe"], r["psnr"]) for r in results["euler_ladder"] if r["cfg"] == cfg]
        lines["euler ladder"] = ([k for k, _ in ladder], [p for _, p in ladder])
        panels[f"guidance {cfg:g}"] = lines
    plots.plot_curves(panels, out / "quality_vs_nfe.png", "NFE (backbone calls)", "PSNR vs reference (dB)",
                      dashed=("euler ladder",))
    return "quality_vs_nfe.png"


def _calibration_files(out: Path, results: dict, measured: Measured, no_mpl: str) -> dict[str, str]:
    """calibration.csv and calibration.png (estimate vs true error), or why they were not written."""
    from ..base._deps import available

    if not results["calibration"]["with_estimate"]:
        why = "skipped: no solver of this run gives an error estimate"
        return {"calibration": why, "calibration_csv": why}
    _io.write_text(out / "calibration.csv", calibration.csv_text(measured.runs))
    files = {"calibration_csv": "calibration.csv", "calibration": no_mpl}
    if available("matplotlib"):
        s = results["settings"]
        calibration.plot(measured.runs, out / "calibration.png", s["solvers"], s["nfes"], s["cfg_scales"])
        files["calibration"] = "calibration.png"
    return files


def write_outputs(out: Path, results: dict, measured: Measured, shown_with: Shown) -> dict:
    """Write results.json, report.md, quality_vs_nfe.png, calibration.png / .csv and the sample
    figures (each atomically)."""
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, Any] = {"results": "results.json", "report": "report.md"}
    no_mpl = "skipped: matplotlib is not installed (pip install 'anchorflow[plot]')"
    files["quality_vs_nfe"] = _quality_figure(out, results) or no_mpl
    files.update(_calibration_files(out, results, measured, no_mpl))
    files["samples"] = _sample_figures(out, results, measured, shown_with)
    results["files"] = files
    _io.write_json(out / "results.json", results)
    _io.write_text(out / "report.md", render_report(results))
    return files
