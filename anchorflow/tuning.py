"""Per-model sampler tuning behind ``anchorflow tune``: a time grid per (solver, budget, first call).

For every solver and NFE budget, coordinate descent in (log S, log P) of the two-parameter
schedule ``warp:S,P`` (:func:`anchorflow.runtime.solving.grids.warped`; (1, 1) is uniform, P = 1 the
SD3 shift) maximises the PSNR against an RK4 reference on a small held-out batch (its own seed,
never the benchmark's noise). With ``first_call="cached"`` the t = 1 table is measured first and
refused where its residual exceeds the bound. Time convention: t = 1 noise, t = 0 data.
Torch-free (numpy, the runtime); :func:`anchorflow.runtime.bundles.tuned_grids.write_tuning` stores the result.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import numpy as np

from .base.errors import ConfigError
from .runtime.bundles.tuned_grids import FIRST_CALLS, TunedGrid, Tuning, resolve_sampling


def coordinate_descent(score: Callable[[float, float], float], step: float = 0.5, min_step: float = 0.06,
                       max_evals: int = 24) -> tuple[tuple[float, float], float, int]:
    """Maximise ``score(log S, log P)`` from (0, 0) by +-step moves per coordinate, halving the step
    after a sweep without gain; stops below ``min_step`` or after ``max_evals`` scores."""
    best_p, best, evals = (0.0, 0.0), score(0.0, 0.0), 1
    while step >= min_step and evals < max_evals:
        moved = False
        for axis in (0, 1):
            for sign in (1.0, -1.0):
                if evals >= max_evals:
                    break
                p = list(best_p)
                p[axis] += sign * step
                s = score(*p)
                evals += 1
                if s > best + 1e-6:
                    best_p, best, moved = (p[0], p[1]), s, True
                    break
        if not moved:
            step /= 2.0
    return best_p, best, evals


@dataclass(frozen=True)
class Problem:
    """The held-out batch a grid is tuned on: noise (n, ...) at t = 1, its conditions (the checked
    ``base`` plan: labels or --cond rows, null rows, guidance), reference x at t = 0."""

    model: Any
    noise: np.ndarray
    base: Any  # runtime.plan.SamplePlan: the conditions and guidance every candidate grid is solved with
    ref: np.ndarray
    cfg: float
    data_range: tuple[float, float]

    @property
    def y(self) -> Optional[np.ndarray]:
        return self.base.labels

    def plan(self, method: str, nfe: int, times: np.ndarray, first_call):
        """The sampling plan of one candidate grid (``first_call``: "backbone" or a measured table)."""
        from .runtime.plan import plan

        cached = not isinstance(first_call, str)
        return plan(self.model, solver=method, nfe=nfe, grid=times, first_call="cached" if cached else "backbone",
                    cfg_scale=self.cfg, cfg_interval=self.base.cfg_interval, cond=self.base.cond,
                    null_cond=self.base.null_cond, noise=self.noise,
                    tuning=Tuning(first_call=first_call) if cached else None)

    def psnr(self, method: str, nfe: int, times: np.ndarray, first_call) -> float:
        from .runtime.evaluation import metrics as M

        res = self.plan(method, nfe, times, first_call).run()
        return float(M.psnr(res.x, self.ref, self.data_range)) if np.all(np.isfinite(res.x)) else -math.inf


def make_problem(model, samples: int, seed: int, cfg: float, reference_steps: int, cond: Optional[dict] = None,
                 null_cond: Optional[dict] = None) -> Problem:
    """A held-out batch (seed distinct from the benchmark's), its conditions checked by the sampling
    plan (``cond`` / ``null_cond``: the user's held-out conditions, rows ``samples`` or 1; default
    balanced labels), and its plain-RK4 reference."""
    from .bench.evaluate import data_range
    from .bench.plan import make_inputs
    from .bench.reference import Guidance, _solve_once
    from .runtime.plan import plan

    meta = model.meta
    noise, _ = make_inputs(tuple(meta["state_shape"]), int(meta.get("num_classes") or 0), samples, seed)
    base = plan(model, solver="euler", nfe=1, grid="uniform", cfg_scale=cfg, cond=cond, null_cond=null_cond,
                noise=noise, tuning=None, names=_TUNE_NAMES)
    ref, _ = _solve_once(model.velocity, noise, Guidance.of(base), "rk4", reference_steps)
    return Problem(model, noise, base, ref, float(cfg), data_range(model, ref))


_TUNE_NAMES = {"cfg_scale": "--cfg", "cond": "--cond", "null_cond": "--null-cond", "seed": "--seed",
               "n": "--samples", "labels": "--labels"}


def conditions_besides_labels(problem: Problem) -> list[str]:
    """The conditions of the tuned model other than the class label ``y`` (declared by its bundle,
    or given with the held-out batch): the first-call table is per label, so these rule it out
    (the runtime's CachedStartField refuses them too)."""
    from .runtime.plan import bundle_format

    names = set(problem.base.cond or {})
    fmt = bundle_format(problem.model)
    if fmt is not None:
        names |= {c.name for c in fmt.backbone.conditions}
    return sorted(names - {"y"})


def tune_one(problem: Problem, method: str, nfe: int, first_call, max_evals: int = 24) -> TunedGrid:
    """Coordinate descent of ``warp:S,P`` for one solver and budget (``first_call``: None or a table)."""
    from .runtime import get_solver
    from .runtime.solving.grids import warped

    steps = get_solver(method).steps_for_nfe(nfe, 0 if first_call is None else 1)
    fc = "backbone" if first_call is None else first_call

    def score(ls: float, lp: float) -> float:
        return problem.psnr(method, nfe, warped(steps, math.exp(ls), math.exp(lp)), fc)

    (ls, lp), best, evals = coordinate_descent(score, max_evals=max_evals)
    times = warped(steps, math.exp(ls), math.exp(lp))
    return TunedGrid(method, int(nfe), "backbone" if first_call is None else "cached", math.exp(ls), math.exp(lp),
                     tuple(float(t) for t in times), best, score(0.0, 0.0), evals)


def held_out_record(cond_file: Optional[str], null_file: Optional[str]) -> Optional[dict]:
    """How held-out condition files are recorded in the tuning's settings: name and sha256 of each."""
    from .base._io import sha256_file

    rec = {what: {"file": str(path), "sha256": sha256_file(path)}
           for what, path in (("cond", cond_file), ("null_cond", null_file)) if path}
    return rec or None


def check_tune(solvers: Sequence[str], nfes: Sequence[int], first_calls: Sequence[str], cfg: float, samples: int,
               seed: int, reference_steps: int, max_evals: int) -> None:
    """Every tune argument, before any work (one-line ConfigError; the sampling plan's rules)."""
    from .runtime import get_solver
    from .runtime.plan import MAX_N, MAX_NFE, MAX_SEED, check_cfg_scale, check_int

    if not solvers:
        raise ConfigError("--solvers is empty; name at least one solver (see 'anchorflow solvers')")
    for name in solvers:
        get_solver(name)  # unknown -> ConfigError listing the known ones
    bad = [f for f in first_calls if f not in FIRST_CALLS]
    if bad or not first_calls:
        raise ConfigError(f"--first-call must be among {', '.join(FIRST_CALLS)}, got {list(first_calls)!r}")
    if not nfes:
        raise ConfigError("--nfe is empty")
    for k in nfes:
        check_int(k, "--nfe", 1, MAX_NFE)
    check_cfg_scale(cfg, "--cfg")
    check_int(samples, "--samples", 1, MAX_N)
    check_int(seed, "--seed", 0, MAX_SEED)
    check_int(reference_steps, "--reference-steps", 1, 4096)
    check_int(max_evals, "--max-evals", 1, 1000)


def tune(model, solvers: Sequence[str], nfes: Sequence[int], first_calls: Sequence[str] = FIRST_CALLS,
         cfg: float = 1.0, samples: int = 32, seed: int = 1, reference_steps: int = 64, max_evals: int = 24,
         progress: bool = True, cond: Optional[dict] = None, null_cond: Optional[dict] = None,
         held_out: Optional[dict] = None) -> Tuning:
    """Tune a grid per (solver, nfe, first call) on ``samples`` held-out samples; see the module doc.

    ``cond`` / ``null_cond``: held-out conditions (rows ``samples`` or 1) and their null rows;
    ``held_out``: how they are recorded in the tuning's settings (e.g. file names and sha256)."""
    from tqdm.auto import tqdm

    from .runtime.solving.first_call import measure_first_call

    check_tune(solvers, nfes, first_calls, cfg, samples, seed, reference_steps, max_evals)
    meta = model.meta
    out = Tuning(settings={"solvers": list(solvers), "nfes": [int(k) for k in nfes], "first_calls": list(first_calls),
                           "cfg": float(cfg), "samples": int(samples), "seed": int(seed),
                           "reference": f"rk4:{int(reference_steps)}", "max_evals": int(max_evals),
                           "family": "warp:S,P", **({"held_out": held_out} if held_out else {})})
    problem = make_problem(model, samples, seed, cfg, reference_steps, cond, null_cond)  # conditions checked first
    other = conditions_besides_labels(problem)
    if "cached" in first_calls and other:  # the table is per class label: not measured, refused with the reason
        out.first_call_refused = (f"the cached first call is tabulated per class label y; this model also takes "
                                  f"{', '.join(other)}; use --first-call backbone")
    elif "cached" in first_calls:
        table = measure_first_call(model.velocity, tuple(meta["state_shape"]), int(meta.get("num_classes") or 0))
        try:
            out.first_call = table.check()
        except ConfigError as exc:
            out.first_call, out.first_call_refused = table, str(exc)
    jobs = [(s, k, f) for s in solvers for k in nfes for f in first_calls
            if f == "backbone" or out.first_call_refused is None]
    bar = tqdm(jobs, desc="tune", unit="grid", disable=not progress)
    for s, k, f in bar:
        bar.set_postfix_str(f"{s} nfe={k} {f}")
        try:
            g = tune_one(problem, s, k, None if f == "backbone" else out.first_call, max_evals)
        except ConfigError:
            continue  # a budget this solver cannot spend exactly (e.g. even NFE for heun)
        out.grids[g.key] = g
    if not out.grids and out.first_call_refused and "backbone" not in first_calls:
        raise ConfigError(f"{out.first_call_refused}; nothing was stored")
    if not out.grids:
        raise ConfigError(f"no grid could be tuned for solvers {', '.join(solvers)} at nfe {', '.join(map(str, nfes))} "
                          "(no budget any of them can spend exactly); nothing was stored")
    return out


# every tune option checked before any work, with runtime.plan's rules (the
# sample CLI's and the service's); a refused tune writes nothing
MAX_TUNE_SAMPLES, MAX_REFERENCE_STEPS, MAX_EVALS = 4096, 10_000, 1000


def check_tune_options(solvers, nfes, cfg, samples, seed, reference_steps, max_evals) -> tuple:
    from .runtime import get_solver
    from .runtime.plan import MAX_NFE, MAX_SEED, check_cfg_scale, check_int

    solvers = list(solvers)
    if not solvers:
        raise ConfigError("--solvers names no solver (see `anchorflow solvers`)")
    for name in solvers:
        get_solver(name)  # unknown: ConfigError naming the known ones
    nfes = [check_int(k, "--nfe", 1, MAX_NFE) for k in nfes]
    if not nfes:
        raise ConfigError("--nfe names no budget")
    return (solvers, nfes, check_cfg_scale(cfg, "--cfg"), check_int(samples, "--samples", 1, MAX_TUNE_SAMPLES),
            check_int(seed, "--seed", 0, MAX_SEED), check_int(reference_steps, "--reference-steps", 1, MAX_REFERENCE_STEPS),
            check_int(max_evals, "--max-evals", 1, MAX_EVALS))


def sampling_setup(bundle_folder, method: str, nfe: int, grid: Optional[str], first_call: str = "backbone"):
    """What ``sample`` passes to ``solve`` for the grid and the first call:
    :func:`anchorflow.runtime.bundles.tuned_grids.resolve_sampling` (serve's rule too) on the bundle's recorded
    tuning (None for a model without a bundle or without tuning)."""
    from .runtime.bundles.tuned_grids import read_tuning

    tuning = None if bundle_folder is None else read_tuning(bundle_folder)
    return resolve_sampling(tuning, method, nfe, grid, first_call)
