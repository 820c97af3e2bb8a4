"""Running the plan: one typed record per (solver, NFE, guidance), references first.

Every job sees the same :class:`Inputs` (model, plan, noise, labels, evaluator); a record is
either a measurement (counted calls, timing split, scores, samples) or the reason it was skipped.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np

from ..errors import ConfigError
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

    def grid_for(self, job: Job) -> tuple[Any, str]:
        """(grid for ``solve``, its description): the tuned one when the plan asks and one exists."""
        if self.plan.grids == "tuned" and not job.ladder_only and self.tuning is not None:
            g = self.tuning.grid_for(job.solver, job.nfe, job.first_call)
            if g is not None:
                return np.asarray(g.times), g.spec
        return None, "uniform"

    def solve_kwargs(self, cfg: float) -> dict:
        """The keyword arguments of ``solve`` shared by every solver at guidance ``cfg``."""
        return dict(y=self.y, sidenet=self.model.sidenet, cfg_scale=cfg, cfg_interval=self.plan.cfg_interval,
                    null_label=self.model.meta.get("null_label"))


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

    def to_json(self) -> dict[str, Any]:
        """The results.json form (keys in the order the schema has always had them)."""
        head = {"solver": self.solver, "nfe_requested": self.nfe_requested, "cfg": self.cfg}
        if self.method and self.method != self.solver or self.grid != "uniform":
            head.update(method=self.method, first_call=self.first_call, grid=self.grid)
        if self.skipped is not None:
            return {**head, "skipped": self.skipped}
        return {**head, "nfe": self.nfe, "sidenet_calls": self.sidenet_calls, "timing": dict(self.timing),
                **self.scores}

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


def _first_call(inp: Inputs, job: Job):
    """"backbone", or the tuned first-call table (a ConfigError when the model has none)."""
    if job.first_call == "backbone":
        return "backbone"
    table = None if inp.tuning is None else inp.tuning.first_call
    if table is None:
        raise ConfigError("the cached first call needs the model's first-call table; run 'anchorflow tune' first")
    return table


def _fastflow_options(inp: Inputs, nfe: int, common: dict) -> dict:
    """A fresh FastFlow bandit warmed on FASTFLOW_WARMUP generations of other noise (batch <= 16).

    The measured generation is the next one of that stream, still learning, as in deployment.
    """
    from ..runtime import solve
    from ..runtime.fastflow import FastFlowBandit

    seed, noise = inp.plan.seed, inp.noise
    bandit = FastFlowBandit(nfe, model_id=str(inp.model.meta.get("model_id", "")), seed=seed)
    rng = np.random.default_rng([seed, 2])
    b = min(16, noise.shape[0])
    warm = dict(common, y=None if common["y"] is None else common["y"][:b])
    for _ in range(FASTFLOW_WARMUP):
        solve("fastflow", inp.model.velocity, rng.standard_normal((b, *noise.shape[1:])).astype(np.float32), nfe,
              bandit=bandit, **warm)
    return {"bandit": bandit}


# Solvers that need options prepared per (model, nfe) before a fair measurement.
PREPARE: dict[str, Callable[[Inputs, int, dict], dict]] = {"fastflow": _fastflow_options}


def _timing(t) -> dict[str, float]:
    return {"total_ms": t.total_s * 1e3, "backbone_ms": t.backbone_s * 1e3, "sidenet_ms": t.sidenet_s * 1e3,
            "overhead_ms": t.overhead_s * 1e3, "overhead_frac": t.overhead_s / t.total_s if t.total_s > 0 else 0.0}


def run_one(inp: Inputs, job: Job, cfg: float) -> RunRecord:
    """One (solver, NFE, guidance) measurement, or a record of why it was skipped."""
    from ..runtime import solve

    grid, grid_name = inp.grid_for(job)
    rec = RunRecord(job.label, int(job.nfe), cfg, method=job.solver, first_call=job.first_call, grid=grid_name,
                    ladder_only=job.ladder_only)
    rec.skipped = skip_reason(job.solver, job.nfe, inp.model.sidenet is not None, int(job.first_call == "cached"))
    if rec.skipped:
        return rec
    common = inp.solve_kwargs(cfg)
    options = PREPARE[job.solver](inp, job.nfe, common) if job.solver in PREPARE else {}
    res = solve(job.solver, inp.model.velocity, inp.noise, int(job.nfe), grid=grid, first_call=_first_call(inp, job),
                **common, **options)
    rec.nfe, rec.sidenet_calls, rec.timing = int(res.nfe), int(res.sidenet_calls), _timing(res.timing)
    rec.scores = inp.evaluate(res.x)
    rec.x = None if job.ladder_only else res.x  # ladder-only runs feed the Euler-to-match table, not the grids
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
                                       plan.self_check)
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
