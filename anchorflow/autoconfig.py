"""Ask for a quality, get the fastest sampler that keeps it: ``autoconfigure``.

Given a model, a reference configuration the user would otherwise run (``"euler@50"``: solver @
backbone calls, uniform grid) and a target mean PSNR against it, the search:

1. draws a held-out batch (its own ``seed``; never the benchmark's seed 0) and solves the reference;
2. solves every candidate (solver x NFE x grid; grids: ``uniform``, ``tuned`` = the bundle's grid
   for that solver and budget when ``anchorflow tune`` recorded one, or any ``shift:S`` /
   ``warp:S,P``) exactly once on that batch (candidates with the same times are one solve) and
   scores the per-sample PSNR against the reference;
3. bounds the mean PSNR from below by a percentile bootstrap over the samples (``confidence``,
   default 95 %: the (1 - confidence) quantile of ``resamples`` resampled means);
4. times every candidate whose bound meets the target (median of ``repeats`` solves of the same
   batch, interleaved round-robin so machine load hits all alike; the SideNet and the runtime's
   own overhead count) and picks the fastest.

A target no candidate's bound meets is refused in one line naming the best bound reached. The
result is a :class:`~anchorflow.runtime.bundles.presets.Preset` (``record`` stores it in the bundle's
tuned.json under the bundle lock), the table of every candidate tried, and the search's own cost.
Time convention: t = 1 noise, t = 0 data; NFE = backbone calls. Torch-free (numpy, the runtime).
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np

from .base.errors import ConfigError
from .runtime.bundles.presets import Preset, check_name

DEFAULT_SOLVERS = ("euler", "ab2", "ipndm", "unipc", "ba")
DEFAULT_NFES = (3, 4, 5, 6, 7, 8, 10, 12, 16, 20)
DEFAULT_GRIDS = ("uniform", "tuned")
QUANTILE = 0.1  # the per-sample PSNR quantile a preset also reports (its worst decile starts there)


@dataclass
class Candidate:
    """One configuration tried: its scores on the tuning batch and (when it met the target) its latency."""

    solver: str
    nfe: int
    grid_label: str
    times: tuple[float, ...]
    mean_psnr: float
    lower_bound: float
    quantile_psnr: float
    calls: int
    latency_s: Optional[float] = None
    meets: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"solver": self.solver, "nfe": self.nfe, "grid": self.grid_label, "mean_psnr": self.mean_psnr,
                "lower_bound": self.lower_bound, "quantile_psnr": self.quantile_psnr, "calls": self.calls,
                "latency_s": self.latency_s, "meets": self.meets}


@dataclass
class AutoConfig:
    """What :func:`autoconfigure` found: the chosen preset, every candidate, and what the search cost."""

    preset: Preset
    candidates: list[Candidate]
    cost: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)


def parse_reference(text: str) -> tuple[str, int]:
    """``"euler@50"`` -> ("euler", 50); the solver must exist and the budget be one it can spend."""
    from .runtime import get_solver
    from .runtime.plan import MAX_NFE, check_int

    if not isinstance(text, str) or text.count("@") != 1:
        raise ConfigError(f"--reference must be SOLVER@NFE (e.g. euler@50, rk4@256), got {text!r}")
    name, _, nfe = text.partition("@")
    spec = get_solver(name.strip())
    try:
        k = int(nfe)
    except ValueError:
        raise ConfigError(f"--reference must be SOLVER@NFE with an integer NFE, got {text!r}") from None
    check_int(k, "--reference NFE", 1, MAX_NFE)
    spec.steps_for_nfe(k)
    return spec.name, k


def bootstrap_lower(values: np.ndarray, confidence: float, resamples: int, rng: np.random.Generator) -> float:
    """Percentile-bootstrap lower confidence bound of the mean of ``values`` (n,) at ``confidence``."""
    v = np.asarray(values, np.float64).reshape(-1)
    idx = rng.integers(0, v.size, size=(int(resamples), v.size))
    means = v[idx].mean(axis=1)
    return float(np.quantile(means, 1.0 - confidence))


def check_settings(target_psnr: float, confidence: float, samples: int, resamples: int, repeats: int,
                   seed: int) -> None:
    from .runtime.plan import MAX_N, MAX_SEED, check_int

    if isinstance(target_psnr, bool) or not isinstance(target_psnr, (int, float)) or not math.isfinite(target_psnr):
        raise ConfigError(f"--target-psnr must be a finite number of dB, got {target_psnr!r}")
    if isinstance(confidence, bool) or not isinstance(confidence, (int, float)) or not 0.5 <= confidence < 1.0:
        raise ConfigError(f"--confidence must be in [0.5, 1), e.g. 0.95, got {confidence!r}")
    check_int(samples, "--samples", 2, MAX_N)
    check_int(resamples, "--resamples", 100, 1_000_000)
    check_int(repeats, "--repeats", 1, 100)
    check_int(seed, "--seed", 0, MAX_SEED)


def _grid_choices(model, tuning, solver: str, nfe: int, grids: Sequence[str]) -> list[tuple[str, tuple]]:
    """(label, times) for each grid name that applies to (solver, nfe); "tuned" only where recorded."""
    from .runtime import get_solver
    from .runtime.solving.grids import make_grid

    steps = get_solver(solver).steps_for_nfe(nfe)
    out = []
    for g in grids:
        if g == "tuned":
            tg = None if tuning is None else tuning.grid_for(solver, nfe)
            if tg is not None:
                out.append((f"tuned {tg.spec}", tuple(float(t) for t in tg.times)))
            continue
        out.append((g, tuple(float(t) for t in make_grid(steps, g))))
    return out


def autoconfigure(model, target_psnr: float, *, reference: str = "euler@50",
                  solvers: Sequence[str] = DEFAULT_SOLVERS, nfes: Sequence[int] = DEFAULT_NFES,
                  grids: Sequence[str] = DEFAULT_GRIDS, samples: int = 32, seed: int = 1, cfg: float = 1.0,
                  confidence: float = 0.95, resamples: int = 2000, repeats: int = 3, name: Optional[str] = None,
                  tuning: Any = None, cond: Optional[dict] = None, null_cond: Optional[dict] = None,
                  backend: str = "", progress: bool = False) -> AutoConfig:
    """Search solvers x NFE x grids for the fastest configuration whose PSNR lower bound meets ``target_psnr``.

    ``model``: a LoadedBundle / OpenModel (anything :func:`anchorflow.runtime.plan.plan` takes);
    ``tuning``: the bundle's :class:`~anchorflow.runtime.bundles.tuned_grids.Tuning` for the ``tuned`` grids (None:
    none). See the module docstring for the procedure. Raises ConfigError (one line) when no
    candidate's bound meets the target, naming the best bound reached and where.
    """
    from .bench.evaluate import span_of
    from .runtime import get_solver
    from .runtime.evaluation import metrics as M
    from .runtime.solving.grids import make_grid
    from .runtime.plan import plan

    check_settings(target_psnr, confidence, samples, resamples, repeats, seed)
    name = check_name(name if name is not None else f"psnr{target_psnr:g}")
    ref_solver, ref_nfe = parse_reference(reference)
    names = list(dict.fromkeys(solvers))
    for s in names:
        get_solver(s)
    for g in grids:
        if g != "tuned":
            make_grid(2, g)  # a bad grid name fails before any work
    names = [s for s in names if not get_solver(s).needs_sidenet or model.sidenet is not None]
    started = time.perf_counter()
    meta = model.meta if "state_shape" in model.meta else {**model.meta, **(model.meta.get("model") or {})}
    shape = tuple(int(v) for v in meta["state_shape"])
    noise = np.random.default_rng(seed).standard_normal((samples, *shape)).astype(np.float32)

    def make(solver: str, nfe: int, times) -> Any:
        return plan(model, solver=solver, nfe=nfe, grid=np.asarray(times, np.float64), cfg_scale=cfg, cond=cond,
                    null_cond=null_cond, noise=noise, tuning=None)

    ref_times = tuple(float(t) for t in make_grid(get_solver(ref_solver).steps_for_nfe(ref_nfe), "uniform"))
    ref_res = make(ref_solver, ref_nfe, ref_times).run()
    ref = ref_res.x
    dr = meta.get("data_range", (-1.0, 1.0))
    span = span_of(ref) if dr is None else (float(dr[0]), float(dr[1]))  # null: latents, scored on the reference
    rng = np.random.default_rng(seed + 1)
    solved: dict = {}  # (solver, nfe, times) -> (plan, Result): no configuration is solved twice
    cands: list[Candidate] = []
    calls = ref_res.nfe
    for s in names:
        for k in sorted(set(int(v) for v in nfes)):
            try:
                choices = _grid_choices(model, tuning, s, k, grids)
            except ConfigError:
                continue  # a budget this solver cannot spend exactly
            for label, times in choices:
                key = (s, k, times)
                if (s, k, times) == (ref_solver, ref_nfe, ref_times):
                    continue  # the reference itself is not a candidate: it is what the user runs today
                if key not in solved:
                    p = make(s, k, times)
                    res = p.run()
                    solved[key] = (p, res, [res.timing.total_s])
                    calls += res.nfe
                p, res, _ = solved[key]
                per = (M.psnr_per_sample(res.x, ref, span) if np.all(np.isfinite(res.x))
                       else np.full(samples, -math.inf))
                lcb = bootstrap_lower(per, confidence, resamples, rng) if np.all(np.isfinite(per)) else -math.inf
                cands.append(Candidate(s, k, label, times, float(np.mean(per)), lcb,
                                       float(np.quantile(per, QUANTILE)), res.nfe, meets=lcb >= target_psnr))
    if not cands:
        raise ConfigError(f"no candidate configuration: none of {', '.join(names) or 'the solvers'} can spend "
                          f"{', '.join(map(str, nfes))} backbone calls")
    feasible = [c for c in cands if c.meets]
    if not feasible:
        best = max(cands, key=lambda c: c.lower_bound)
        raise ConfigError(
            f"target PSNR {target_psnr:g} dB against {reference} is not reachable with {', '.join(names)} at "
            f"NFE {min(c.nfe for c in cands)}..{max(c.nfe for c in cands)}: the best {confidence:.0%} lower bound "
            f"is {best.lower_bound:.2f} dB ({best.solver}@{best.nfe} {best.grid_label}); lower the target or "
            "allow more calls (--nfe)")
    timed = {(c.solver, c.nfe, c.times) for c in feasible}
    for _ in range(max(0, repeats - 1)):  # round-robin: load on the machine hits every candidate alike
        for key in timed:
            p, res, times_s = solved[key]
            times_s.append(p.run().timing.total_s)
            calls += res.nfe
    for c in feasible:
        c.latency_s = float(statistics.median(solved[(c.solver, c.nfe, c.times)][2]))
    best = min(feasible, key=lambda c: (c.latency_s, c.nfe))
    preset = Preset(name, best.solver, best.nfe, "backbone", best.grid_label, best.times, float(target_psnr),
                    f"{ref_solver}@{ref_nfe}", float(confidence), best.lower_bound, best.mean_psnr, QUANTILE,
                    best.quantile_psnr, best.latency_s, int(samples), str(backend))
    cost = {"solves": len(solved) + 1 + (repeats - 1) * len(timed), "configurations": len(solved),
            "backbone_calls": int(calls), "seconds": round(time.perf_counter() - started, 3)}
    settings = {"target_psnr": float(target_psnr), "reference": f"{ref_solver}@{ref_nfe}", "solvers": names,
                "nfes": sorted(set(int(v) for v in nfes)), "grids": list(grids), "samples": int(samples),
                "seed": int(seed), "cfg": float(cfg), "confidence": float(confidence), "resamples": int(resamples),
                "repeats": int(repeats), "bootstrap": "percentile, over samples"}
    return AutoConfig(preset, cands, cost, settings)


def record(bundle_dir, found: AutoConfig) -> None:
    """Store the preset in the bundle's tuned.json (merged under the bundle's lock; grids kept)."""
    from .runtime.bundles.tuned_grids import Tuning, write_tuning

    write_tuning(bundle_dir, Tuning(settings={"autoconfig": {**found.settings, "preset": found.preset.name,
                                                              "cost": found.cost}},
                                    presets={found.preset.name: found.preset}))


def tune_to_target(model: str, target_psnr: float, *, reference: str, solvers: str, nfe: Optional[str], grids: str,
                   samples: int, seed: int, cfg: float, confidence: float, name: Optional[str], backend: str,
                   dry_run: bool) -> list[str]:
    """``anchorflow tune MODEL --target-psnr Q``: search, record the preset in the bundle, return the lines to print."""
    from .modelref import open_model
    from .runtime.bundles.tuned_grids import read_tuning

    names = [s.strip() for s in solvers.split(",") if s.strip()]
    try:
        nfes = DEFAULT_NFES if nfe is None else [int(v) for v in nfe.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"--nfe must be comma-separated integers, got {nfe!r}") from None
    grid_names = [g.strip() for g in grids.split(",") if g.strip()]
    check_settings(target_psnr, confidence, samples, 2000, 3, seed)
    parse_reference(reference)
    if name is not None:
        check_name(name)
    if model == "default" and not dry_run:
        raise ConfigError("the bundled model is read-only; pass a copy of its bundle folder or use --dry-run")
    m = open_model(model, backend=backend)
    folder = m.files.bundle
    if not dry_run and folder is None:
        raise ConfigError(f"{model} is not an exported bundle; export it first ('anchorflow export {model} --out DIR')")
    tuning = None if folder is None else read_tuning(folder)
    found = autoconfigure(m, target_psnr, reference=reference, solvers=names, nfes=nfes, grids=grid_names,
                          samples=samples, seed=seed, cfg=cfg, confidence=confidence, name=name, tuning=tuning,
                          backend=", ".join(m.providers) or backend)
    p = found.preset
    lines = [f"{'config':<28} {'mean':>7} {'bound':>7} {'p10':>7} {'ms':>8}"]
    for c in sorted(found.candidates, key=lambda c: (c.latency_s is None, c.latency_s or 0.0, c.nfe)):
        ms = "" if c.latency_s is None else f"{c.latency_s * 1e3:8.1f}"
        lines.append(f"{c.solver + '@' + str(c.nfe) + ' ' + c.grid_label:<28} {c.mean_psnr:7.2f} {c.lower_bound:7.2f} "
                     f"{c.quantile_psnr:7.2f} {ms}")
    lines.append(f"quality {p.name}: {p.solver}@{p.nfe} {p.grid_label}: {p.confidence:.0%} lower bound "
                 f"{p.lower_bound:.2f} dB >= {p.target_psnr:g} dB against {p.reference} (mean {p.mean_psnr:.2f}, "
                 f"10% quantile {p.quantile_psnr:.2f}), {p.latency_s * 1e3:.1f} ms per {p.batch} samples")
    c = found.cost
    lines.append(f"search cost: {c['configurations']} configurations, {c['solves']} solves, {c['backbone_calls']} "
                 f"backbone calls, {c['seconds']:.1f} s")
    if not dry_run:
        record(folder, found)
        lines.append(f"stored in {folder}/tuned.json (presets: {p.name}); use it with 'anchorflow sample "
                     f"{model} --quality {p.name}'")
    return lines
