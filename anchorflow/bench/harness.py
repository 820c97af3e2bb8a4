"""``run_bench``: plan, measure, assemble, write (the library call behind ``anchorflow bench``)."""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ..base.errors import ConfigError
from .evaluate import Evaluator, classifier_dir, data_range
from .outputs import Shown, write_outputs
from .plan import DEFAULT_NFES, EULER_LADDER, BenchPlan, Job, make_inputs
from .results import assemble
from .runs import Inputs, measure_all


def run_bench(
    model,
    solvers: Optional[Sequence[str]] = None,
    nfes: Sequence[int] = DEFAULT_NFES,
    n: int = 256,
    cfg_scales: Sequence[float] = (1.0,),
    seed: int = 0,
    out: str | os.PathLike = "bench",
    reference: str = "rk4:512",
    progress: bool = True,
    cfg_interval: tuple[float, float] = (0.0, 1.0),
    euler_ladder: Sequence[int] = EULER_LADDER,
    command: Optional[str] = None,
    first_calls: Sequence[str] = ("backbone",),
    grids: str = "uniform",
    tuning=None,
    self_check: bool = True,
    cond: Optional[dict] = None,
    null_cond: Optional[dict] = None,
) -> dict:
    """Benchmark ``solvers`` on ``model`` at every NFE and guidance scale; write ``out``; return the results.

    Args:
        model: an opened model (:func:`anchorflow.modelref.open_model`): ``velocity``, ``sidenet``
            (or None), ``meta`` (name, state_shape, num_classes, null_label, data_range, model_id;
            optional ``sampler(n, y, seed) -> (n, *state_shape)`` held-out data), ``providers``,
            ``classifier`` (folder or None).
        solvers: registry names; None: every registered solver this model can run.
        nfes: backbone-call budgets (FastFlow: grid sizes; its counted calls are reported).
        n: samples per run; noise (n, *state_shape) from ``seed``, labels ``i mod C``.
        cfg_scales: guidance scales; each gets its own reference.
        out: folder for results.json, report.md, quality_vs_nfe.png and the sample grids.
        reference: "rk4:N" or "dopri5[:tol]".
        first_calls: "backbone" and/or "cached" (each solver once per mode; "cached" rows are
            labelled ``name+cache`` and need the tuning's first-call table).
        grids: "uniform", or "tuned": each solver on its tuned grid for its budget (uniform where
            none was tuned; the Euler ladder always runs uniform from the backbone).
        tuning: an :class:`anchorflow.tuning.Tuning` (default: the model's ``tuning``, if any).
        cond, null_cond: conditions (rows n or 1) and their null rows, checked against the bundle by
            the sampling plan (:mod:`anchorflow.runtime.plan`); None: balanced labels ``i mod C``.
    """
    plan = BenchPlan.make(model, solvers, nfes, n, cfg_scales, seed=int(seed), reference=reference,
                          cfg_interval=cfg_interval, euler_ladder=euler_ladder,
                          command=command or shlex.join(sys.argv), first_calls=tuple(first_calls), grids=grids,
                          self_check=bool(self_check))
    return run_plan(model, plan, out, progress, tuning if tuning is not None else getattr(model, "tuning", None),
                    cond, null_cond)


def run_plan(model, plan: BenchPlan, out: str | os.PathLike, progress: bool = True, tuning=None,
             cond: Optional[dict] = None, null_cond: Optional[dict] = None) -> dict:
    """Run a checked plan on ``model``, write the report folder ``out``, return the results dict."""
    meta = model.meta
    noise, y = make_inputs(tuple(meta["state_shape"]), int(meta.get("num_classes") or 0), plan.n, plan.seed)
    if tuning is None and (plan.grids == "tuned" or "cached" in plan.first_calls):
        raise ConfigError("tuned grids and the cached first call need the model's tuning; run 'anchorflow tune' first")
    inputs = Inputs(model, plan, noise, y, None, tuning, cond, null_cond)
    for cfg in plan.cfg_scales:  # the conditions and every guidance scale checked before any work
        inputs.y = y = inputs.sample_plan(Job("euler", 1), cfg, grid="uniform").labels
    sampler = meta.get("sampler")
    held_out = None if sampler is None else np.asarray(sampler(plan.n, y, plan.seed + 1))
    inputs.evaluate = Evaluator(data_range(model), y, classifier_dir(model), held_out)
    measured = measure_all(inputs, progress)
    results = assemble(model, plan, measured)
    refs = np.concatenate(list(measured.ref_x.values())) if measured.ref_x else None
    write_outputs(Path(out), results, measured, Shown(data_range(model, refs), y, held_out))
    return results
