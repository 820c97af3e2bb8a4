"""From measurements to the results dict (schema ``anchorflow.bench/1``): Euler-to-match, orders, machine."""

from __future__ import annotations

import math
import os
import platform
from importlib import metadata
from typing import Any, Optional, Sequence

import numpy as np

from ..base.errors import ConfigError
from ..runtime.evaluation import metrics as M
from . import calibration
from .plan import BenchPlan, method_of
from .runs import Measured, RunRecord

SCHEMA = "anchorflow.bench/1"


def done_runs(runs: list[dict], name: str, cfg: float, nfes: Sequence[int]) -> list[dict]:
    """The runs (JSON dicts) of solver ``name`` at guidance ``cfg`` that ran (not skipped) at a requested NFE."""
    return [r for r in runs if r["solver"] == name and r["cfg"] == cfg and "skipped" not in r
            and r["nfe_requested"] in nfes]


def euler_nfe_to_match(ladder: Sequence[tuple[int, float]], target: float) -> dict[str, Any]:
    """Smallest Euler NFE whose PSNR reaches ``target``, interpolated linearly in log NFE.

    ``ladder``: (nfe, psnr) pairs of Euler runs. Returns ``nfe`` (float, None when even the top
    rung falls short) and the ``bracket`` [lower rung, upper rung] (lower None: Euler at the
    first rung is already as good; upper None: the ladder never gets there).
    """
    pts = sorted((int(k), float(p)) for k, p in ladder)
    for i, (k, p) in enumerate(pts):
        if p >= target:
            if i == 0 or p == target:
                return {"nfe": float(k), "bracket": [None if p > target else k, k]}
            k0, p0 = pts[i - 1]
            frac = (target - p0) / (p - p0) if p > p0 else 1.0
            return {"nfe": float(math.exp(math.log(k0) + frac * (math.log(k) - math.log(k0)))), "bracket": [k0, k]}
    return {"nfe": None, "bracket": [pts[-1][0], None]}


def orders(runs: list[dict], plan: BenchPlan) -> list[dict]:
    """Per (guidance, solver): the empirical order (slope of log RMSE vs log NFE) beside the textbook one."""
    from ..runtime import get_solver

    out = []
    for cfg in plan.cfg_scales:
        for name in plan.labels:
            pts = sorted({(r["nfe"], r["rmse"]) for r in done_runs(runs, name, cfg, plan.nfes)})
            try:
                p = M.empirical_order([k for k, _ in pts], [e for _, e in pts])
            except ConfigError:
                p = None
            out.append({"solver": name, "cfg": cfg, "empirical": p, "textbook": get_solver(method_of(name)).order,
                        "fit_nfes": [k for k, _ in pts]})
    return out


def machine_info(model) -> dict[str, Any]:
    """Platform, CPU count, library versions and the providers the model really runs on."""

    def version(pkg: str) -> Optional[str]:
        try:
            return metadata.version(pkg)
        except metadata.PackageNotFoundError:
            return None

    ort = version("onnxruntime") or version("onnxruntime-gpu")
    return {"platform": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count(),
            "numpy": np.__version__, "onnxruntime": ort, "providers": list(getattr(model, "providers", []) or [])}


def _with_match(runs: list[RunRecord], ladder: Sequence[int]) -> list[dict]:
    """Every run as JSON, each measured one with the Euler NFE that reaches its PSNR at its guidance."""
    rungs = [r for r in runs if r.ladder_rung and r.nfe_requested in ladder and r.skipped is None]
    out = []
    for r in runs:
        d = r.to_json()
        if r.skipped is None:
            pts = [(e.nfe, e.scores["psnr"]) for e in rungs if e.cfg == r.cfg]
            d["euler_nfe_to_match"] = euler_nfe_to_match(pts, r.scores["psnr"])
        out.append(d)
    return out


def assemble(model, plan: BenchPlan, measured: Measured) -> dict:
    """The results dict (JSON-ready): schema, model, machine, settings, references, runs, ladder, orders,
    and the error estimate's calibration (which solvers give one; pooled Spearman per solver)."""
    runs = _with_match(measured.runs, plan.euler_ladder)
    meta = model.meta
    ladder = [d for r, d in zip(measured.runs, runs) if r.ladder_rung and r.nfe_requested in plan.euler_ladder
              and r.skipped is None]
    main = [d for r, d in zip(measured.runs, runs) if not r.ladder_only]
    return {
        "schema": SCHEMA,
        "model": {k: meta.get(k) for k in ("name", "model_id", "num_classes", "null_label", "data_range")}
        | {"state_shape": list(meta["state_shape"])},
        "machine": machine_info(model),
        "settings": plan.settings(),
        "references": measured.references,
        "runs": main,
        "euler_ladder": [{k: r[k] for k in ("cfg", "nfe", "psnr", "rmse")} for r in ladder],
        "orders": orders(main, plan),
        "calibration": calibration.summary(measured.runs, plan.labels, plan.cfg_scales),
    }
