"""Running the plan: one typed record per (solver, NFE, guidance), references first.

Every job sees the same :class:`Inputs` (model, plan, noise, labels, evaluator); a record is
either a measurement (counted calls, timing split, scores, samples) or the reason it was skipped.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np

from ..base.errors import ConfigError
from .evaluate import Evaluator
from .plan import BenchPlan, Job
from .reference import reference_solution

FASTFLOW_WARMUP = 16  # bandit learning generations before a FastFlow run is measured


@dataclass
class Inputs:
    """What every job of a run shares: noise (n, *state_shape) at t = 1, labels (n,) or None."""

    model: Any
    plan: BenchPlan
    noise: np.ndarray
    y: Optional[np.ndarray]
    evaluate: Evaluator
    tuning: Optional[Any] = None  # anchorflow.tuning.Tuning: tuned grids and the first-call table
    cond: Optional[dict] = None  # the user's conditions (--cond), rows n or 1; None: balanced labels
    null_cond: Optional[dict] = None  # their null rows (--null-cond); None: the bundle's

    def sample_plan(self, job: Job, cfg: float, options: Optional[dict] = None, noise: Optional[np.ndarray] = None,
                    grid: Any = "auto"):
        """The sampling plan of one job (runtime.plan): the tuned grid when the bench asks for tuned
        grids and one exists (``grid="auto"``), else uniform; ``noise`` (default: the bench's) sets
        the rows, the conditions follow (their first rows)."""
        from ..runtime.plan import plan

        if grid == "auto":
            tuned = self.plan.grids == "tuned" and not job.ladder_only and self.tuning is not None
            grid = None if tuned else "uniform"
        noise = self.noise if noise is None else noise
        return plan(self.model, solver=job.solver, nfe=int(job.nfe), grid=grid, first_call=job.first_call,
                    cfg_scale=cfg, cfg_interval=self.plan.cfg_interval, cond=_head(self.cond, len(noise)),
                    null_cond=self.null_cond, noise=noise, options=options, tuning=self.tuning,
                    names=BENCH_NAMES)

    def guidance(self, cfg: float):
        """The reference's guidance at ``cfg``: the conditions a plan resolves (labels or --cond)."""
        from .reference import Guidance

        return Guidance.of(self.sample_plan(Job("euler", 1), cfg, grid="uniform"))


BENCH_NAMES = {"cfg_scale": "--cfg", "cfg_interval": "--cfg-interval", "cond": "--cond", "null_cond": "--null-cond",
               "nfe": "--nfe", "n": "--n", "solver": "--solvers"}


def _head(cond: Optional[dict], rows: int) -> Optional[dict]:
    """The first ``rows`` rows of each per-row condition (a 1-row or shared value as it is)."""
    if cond is None:
        return None
    return {k: (v[:rows] if np.ndim(v) and np.shape(v)[0] > rows else v) for k, v in cond.items()}


@dataclass
class RunRecord:
    """One (solver, NFE, guidance) measurement; ``x`` (samples) is kept for the figures, never written."""

    solver: str  # the row label: the registry name, "+cache" with the cached first call
    nfe_requested: int
    cfg: float
    skipped: Optional[str] = None
    method: str = ""
    first_call: str = "backbone"
    grid: str = "uniform"
    ladder_only: bool = False
    nfe: int = 0
    sidenet_calls: int = 0
    timing: dict[str, float] = field(default_factory=dict)
    scores: dict[str, float] = field(default_factory=dict)
    x: Optional[np.ndarray] = field(default=None, repr=False)
    # Result.error_estimate (n,) and the true per-sample error against the reference (n,), both in
    # state units; None for a solver without an estimate (anchorflow/bench/calibration.py)
    estimate: Optional[np.ndarray] = field(default=None, repr=False)
    true_error: Optional[np.ndarray] = field(default=None, repr=False)

    def to_json(self) -> dict[str, Any]:
        """The results.json form (keys in the order the schema has always had them)."""
        head = {"solver": self.solver, "nfe_requested": self.nfe_requested, "cfg": self.cfg}
        if self.method and self.method != self.solver or self.grid != "uniform":
            head.update(method=self.method, first_call=self.first_call, grid=self.grid)
        if self.skipped is not None:
            return {**head, "skipped": self.skipped}
        out = {**head, "nfe": self.nfe, "sidenet_calls": self.sidenet_calls, "timing": dict(self.timing),
               **self.scores}
        if self.estimate is not None:
            from .calibration import summarize

            out["error_estimate"] = summarize(self.estimate, self.true_error)
        return out

    @property
    def ladder_rung(self) -> bool:
        """Euler from the backbone on the uniform grid: a rung of the Euler-to-match ladder."""
        return self.method == "euler" and self.first_call == "backbone" and self.grid == "uniform"


def skip_reason(name: str, nfe: int, has_sidenet: bool, free_calls: int = 0) -> Optional[str]:
    """Why ``name`` cannot run at ``nfe`` on this model (None when it can)."""
    from ..runtime import get_solver

    spec = get_solver(name)
    if spec.needs_sidenet and not has_sidenet:
        return f"{name} needs a SideNet and this model has none"
    try:
        spec.steps_for_nfe(int(nfe), free_calls)
    except ConfigError as exc:
        return str(exc)
    return None


def _fastflow_options(inp: Inputs, job: Job, cfg: float) -> dict:
    """A fresh FastFlow bandit warmed on FASTFLOW_WARMUP generations of other noise (batch <= 16,
    uniform grid). The measured generation is the next one of that stream, still learning, as in
    deployment."""
    from ..runtime.fastflow.learning import FastFlowBandit

    seed, noise = inp.plan.seed, inp.noise
    bandit = FastFlowBandit(int(job.nfe), model_id=str(inp.model.meta.get("model_id", "")), seed=seed)
    rng = np.random.default_rng([seed, 2])
    b = min(16, noise.shape[0])
    for _ in range(FASTFLOW_WARMUP):
        warm = rng.standard_normal((b, *noise.shape[1:])).astype(np.float32)
        inp.sample_plan(job, cfg, {"bandit": bandit}, noise=warm, grid="uniform").run()
    return {"bandit": bandit}


# Solvers that need options prepared per (model, job, guidance) before a fair measurement.
PREPARE: dict[str, Callable[[Inputs, Job, float], dict]] = {"fastflow": _fastflow_options}


def _timing(t) -> dict[str, float]:
    return {"total_ms": t.total_s * 1e3, "backbone_ms": t.backbone_s * 1e3, "sidenet_ms": t.sidenet_s * 1e3,
            "overhead_ms": t.overhead_s * 1e3, "overhead_frac": t.overhead_s / t.total_s if t.total_s > 0 else 0.0}


def run_one(inp: Inputs, job: Job, cfg: float) -> RunRecord:
    """One (solver, NFE, guidance) measurement, or a record of why it was skipped."""
    rec = RunRecord(job.label, int(job.nfe), cfg, method=job.solver, first_call=job.first_call,
                    ladder_only=job.ladder_only)
    rec.skipped = skip_reason(job.solver, job.nfe, inp.model.sidenet is not None, int(job.first_call == "cached"))
    if rec.skipped:
        return rec
    if job.first_call == "cached" and inp.tuning is not None and inp.tuning.first_call is None \
            and inp.tuning.first_call_refused:
        raise ConfigError(f"--first-call cached: 'anchorflow tune' refused this model's first-call table "
                          f"({inp.tuning.first_call_refused})")
    if job.first_call == "cached" and (inp.tuning is None or inp.tuning.first_call is None):
        raise ConfigError("the cached first call needs the model's first-call table; run 'anchorflow tune' first")
    options = PREPARE[job.solver](inp, job, cfg) if job.solver in PREPARE else {}
    p = inp.sample_plan(job, cfg, options)
    rec.grid = p.tuned_spec or "uniform"
    res = p.run()
    rec.nfe, rec.sidenet_calls, rec.timing = int(res.nfe), int(res.sidenet_calls), _timing(res.timing)
    rec.scores = inp.evaluate(res.x)
    rec.x = None if job.ladder_only else res.x  # ladder-only runs feed the Euler-to-match table, not the grids
    if res.error_estimate is not None and not job.ladder_only:
        from .calibration import per_sample_rmse

        rec.estimate = np.asarray(res.error_estimate, np.float64).copy()
        rec.true_error = per_sample_rmse(res.x, inp.evaluate.ref)
    return rec


@dataclass
class Measured:
    """Everything measured: per guidance scale the reference record and samples, and every run."""

    references: list[dict] = field(default_factory=list)
    ref_x: dict[float, np.ndarray] = field(default_factory=dict)
    runs: list[RunRecord] = field(default_factory=list)


def measure_all(inp: Inputs, progress: bool) -> Measured:
    """Per guidance scale: the reference, then every job of the plan (one tqdm bar)."""
    from tqdm.auto import tqdm

    plan, out = inp.plan, Measured()
    jobs = plan.jobs()
    bar = tqdm(total=len(plan.cfg_scales) * (1 + len(jobs)), desc="bench", unit="run", disable=not progress)
    for cfg in plan.cfg_scales:
        bar.set_postfix_str(f"reference {plan.reference} cfg={cfg:g}")
        ref, info = reference_solution(inp.model, inp.noise, inp.y, cfg, plan.cfg_interval, plan.reference,
                                       plan.self_check, inp.guidance(cfg))
        inp.evaluate.ref = ref
        out.references.append(info | inp.evaluate.distribution(ref))
        out.ref_x[cfg] = ref
        bar.update()
        for job in jobs:
            bar.set_postfix_str(f"{job.solver} nfe={job.nfe} cfg={cfg:g}")
            out.runs.append(run_one(inp, job, cfg))
            bar.update()
    bar.close()
    return out
