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
4. times every candidate whose bound meets the target again (``repeats`` solves in all of the same
   batch, interleaved round-robin so machine load hits all alike) and picks the fastest by its
   *modelled* latency: backbone calls x the time per backbone call + SideNet calls x the time per
   SideNet call + steps x the solver's runtime overhead per step, each a median over every solve
   of the search (the SideNet and the runtime's own overhead count). On a loaded machine one
   configuration's own median of 3 wall times swings by 2x (measured: benchmarks/results/
   autoconfig.md), which made the pick close to random among the feasible ones; the pooled
   per-call times are stable. The candidate's own median wall time is kept as ``measured_s``.

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
from .runtime.bundles.presets import Preset, check_name, resolve_quality  # noqa: F401  (resolve_quality: API)

DEFAULT_SOLVERS = ("euler", "ab2", "ipndm", "unipc", "ba")
DEFAULT_NFES = (3, 4, 5, 6, 7, 8, 10, 12, 16, 20)
DEFAULT_GRIDS = ("uniform", "tuned")
FASTFLOW_SPEEDUPS = (2.0, 3.0)  # FastFlow candidates: T = speedup x k Euler steps for a budget of k calls
FASTFLOW_LEARN = 6  # learning generations of each FastFlow bandit (on their own noise) before it is frozen
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
    latency_s: Optional[float] = None  # modelled from the search's pooled per-call times (module doc, 4.)
    meets: bool = False
    per_sample: Optional[np.ndarray] = field(default=None, repr=False, compare=False)  # (samples,) PSNR dB
    first_s: Optional[float] = None  # wall time of its one scoring solve (every candidate; noisier than latency_s)
    measured_s: Optional[float] = None  # median wall time of its timing solves (met the target), for reference
    first_call: str = "backbone"  # "cached": the t = 1 velocity from the bundle's table (one interval more)
    recordable: bool = True  # False: a learned FastFlow bandit (scored for the record; a preset cannot hold it)

    @property
    def key(self) -> tuple:
        """(solver, nfe, times, first_call): one configuration, solved once (a FastFlow candidate adds
        its calls budget: two budgets on the same T steps are two bandits)."""
        return (self.solver, self.nfe, self.times, self.first_call) + (() if self.recordable else (self.calls,))

    @property
    def seconds(self) -> Optional[float]:
        """``latency_s`` (modelled, every candidate), else the scoring solve's time."""
        return self.latency_s if self.latency_s is not None else self.first_s

    def to_json(self) -> dict[str, Any]:
        return {"solver": self.solver, "nfe": self.nfe, "grid": self.grid_label, "mean_psnr": self.mean_psnr,
                "first_call": self.first_call, "recordable": self.recordable,
                "lower_bound": self.lower_bound, "quantile_psnr": self.quantile_psnr, "calls": self.calls,
                "latency_s": self.latency_s, "measured_s": self.measured_s, "meets": self.meets}


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


def bootstrap_lower(values: np.ndarray, confidence: float, resamples: int, rng: np.random.Generator,
                    future: Optional[int] = None, groups: Optional[np.ndarray] = None) -> float:
    """Percentile-bootstrap lower bound at ``confidence`` from the per-sample ``values`` (n,).

    ``future`` None: a bound on the population mean, the (1 - c) quantile of ``resamples`` resampled
    means. ``future`` = m: a *prediction* bound on the mean of a fresh batch of m samples (what a
    user's next batch gets): ``mean - q_c(mean*_n - mean*_m)``, the c quantile of the difference of
    a resampled mean of n (the tuning batch's own error) and one of m (the fresh batch's spread);
    about ``sqrt(1 + n/m)`` times as far below the mean as the population bound.

    ``groups`` (n,) condition ids (class labels, prompt rows): a two-level bootstrap for *fresh
    conditions*, the tuning conditions taken as a sample of the conditions a user will run. Each
    resample draws G of the G groups with replacement, then each drawn group's own n_g samples
    with replacement from it; a fresh batch draws its own G groups the same way and its m samples
    spread over them. The bound then also pays for how much the conditions differ (with few
    groups, a lot); one group, or every sample its own group, is the one-level bound.
    """
    v = np.asarray(values, np.float64).reshape(-1)
    if groups is not None:
        ids, inverse = np.unique(np.asarray(groups).reshape(-1), return_inverse=True)
        if inverse.size != v.size:
            raise ConfigError(f"bootstrap groups must give one id per sample ({v.size}), got {inverse.size}")
        if 1 < ids.size < v.size:
            return _grouped_lower(v, inverse, ids.size, confidence, int(resamples), rng, future)
    idx = rng.integers(0, v.size, size=(int(resamples), v.size))
    means = v[idx].mean(axis=1)
    if future is None:
        return float(np.quantile(means, 1.0 - confidence))
    fresh = v[rng.integers(0, v.size, size=(int(resamples), int(future)))].mean(axis=1)
    return float(v.mean() - np.quantile(means - fresh, confidence))


def _grouped_lower(v: np.ndarray, inverse: np.ndarray, g: int, confidence: float, resamples: int,
                   rng: np.random.Generator, future: Optional[int]) -> float:
    """:func:`bootstrap_lower` over groups, then samples (vectorised: groups padded to the largest)."""
    sizes = np.bincount(inverse, minlength=g)
    pad = np.zeros((g, int(sizes.max())))
    for k in range(g):
        pad[k, : sizes[k]] = v[inverse == k]
    chosen = rng.integers(0, g, size=(resamples, g))  # (R, G) the groups of each resample
    n_of = sizes[chosen]  # (R, G)
    j = np.floor(rng.random((resamples, g, pad.shape[1])) * n_of[..., None]).astype(np.int64)
    live = np.arange(pad.shape[1])[None, None, :] < n_of[..., None]  # each drawn group keeps its own size
    means = np.where(live, pad[chosen[..., None], j], 0.0).sum(axis=(1, 2)) / n_of.sum(axis=1)
    if future is None:
        return float(np.quantile(means, 1.0 - confidence))
    fresh_groups = rng.integers(0, g, size=(resamples, g))  # the fresh batch's own draw of conditions
    slot = fresh_groups[np.arange(resamples)[:, None], rng.integers(0, g, size=(resamples, int(future)))]
    pick = np.floor(rng.random((resamples, int(future))) * sizes[slot]).astype(np.int64)
    fresh = pad[slot, pick].mean(axis=1)
    return float(v.mean() - np.quantile(means - fresh, confidence))


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


def _grid_choices(model, tuning, solver: str, nfe: int, grids: Sequence[str],
                  first_call: str = "backbone") -> list[tuple[str, tuple]]:
    """(label, times) for each grid name that applies to (solver, nfe, first call); "tuned" only where
    recorded. A cached first call buys one more step for the same backbone calls (label "... +cached")."""
    from .runtime import get_solver
    from .runtime.solving.grids import make_grid

    cached = first_call == "cached"
    steps = get_solver(solver).steps_for_nfe(nfe, 1 if cached else 0)
    tag = " +cached" if cached else ""
    out = []
    for g in grids:
        if g == "tuned":
            tg = None if tuning is None else tuning.grid_for(solver, nfe, first_call)
            if tg is not None:
                out.append((f"tuned {tg.spec}{tag}", tuple(float(t) for t in tg.times)))
            continue
        out.append((g + tag, tuple(float(t) for t in make_grid(steps, g))))
    return out


def autoconfigure(model, target_psnr: float, *, reference: str = "euler@50",
                  solvers: Sequence[str] = DEFAULT_SOLVERS, nfes: Sequence[int] = DEFAULT_NFES,
                  grids: Sequence[str] = DEFAULT_GRIDS, samples: int = 32, seed: int = 1, cfg: float = 1.0,
                  confidence: float = 0.95, resamples: int = 2000, repeats: int = 3, name: Optional[str] = None,
                  tuning: Any = None, cond: Optional[dict] = None, null_cond: Optional[dict] = None,
                  backend: str = "", progress: bool = False, batch: Optional[int] = None,
                  labels: Any = None, groups: Any = None,
                  first_calls: Sequence[str] = ("backbone", "cached"),
                  speedups: Sequence[float] = FASTFLOW_SPEEDUPS) -> AutoConfig:
    """Search solvers x NFE x grids for the fastest configuration whose PSNR lower bound meets ``target_psnr``.

    ``model``: a LoadedBundle / OpenModel (anything :func:`anchorflow.runtime.plan.plan` takes);
    ``tuning``: the bundle's :class:`~anchorflow.runtime.bundles.tuned_grids.Tuning` for the ``tuned`` grids (None:
    none). ``batch``: the promise is about the mean PSNR of a fresh batch of this many samples
    (default ``samples``; 0: about the population mean), see :func:`bootstrap_lower`. ``labels``:
    the tuning batch's class labels (default 0..C-1 cycled). ``groups``: (samples,) condition ids for a
    bound over fresh conditions as well as fresh noise (:func:`bootstrap_lower`; ``"labels"``: the
    labels; None: over samples only). ``first_calls``: "backbone" and/or "cached" (the t = 1 velocity
    from the bundle's measured table, one more interval for the same calls; skipped where the bundle
    has no table, as the settings say). ``speedups``: FastFlow candidates at each budget k of ``nfes``
    (:func:`_fastflow_candidates`); () for none. See the module docstring for the
    procedure. Raises ConfigError (one line) when no candidate's bound meets the target, naming the
    best bound reached and where.
    """
    from .bench.evaluate import span_of
    from .runtime import get_solver
    from .runtime.evaluation import metrics as M
    from .runtime.solving.grids import make_grid
    from .runtime.plan import MAX_N, check_int, plan

    check_settings(target_psnr, confidence, samples, resamples, repeats, seed)
    future = samples if batch is None else None if batch == 0 else check_int(batch, "batch", 1, MAX_N)
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
    groups = _groups(groups, labels, samples, meta)

    bad = [f for f in first_calls if f not in ("backbone", "cached")]
    if bad or not first_calls:
        raise ConfigError(f"first calls must be among backbone, cached, got {list(first_calls)!r}")
    table = None if tuning is None else getattr(tuning, "first_call", None)
    modes = [f for f in dict.fromkeys(first_calls) if f == "backbone" or table is not None]

    def make(solver: str, nfe: int, times, first_call: str = "backbone") -> Any:
        return plan(model, solver=solver, nfe=nfe, grid=np.asarray(times, np.float64), cfg_scale=cfg, cond=cond,
                    null_cond=null_cond, noise=noise, first_call=first_call,
                    tuning=tuning if first_call == "cached" else None, labels=labels)

    ref_times = tuple(float(t) for t in make_grid(get_solver(ref_solver).steps_for_nfe(ref_nfe), "uniform"))
    ref_res = make(ref_solver, ref_nfe, ref_times).run()
    timings = [(ref_solver, ref_res)]  # every solve of the search: the pooled per-call times
    ref = ref_res.x
    dr = meta.get("data_range", (-1.0, 1.0))
    span = span_of(ref) if dr is None else (float(dr[0]), float(dr[1]))  # null: latents, scored on the reference
    solved: dict = {}  # Candidate.key -> (plan, Result, wall times): no configuration is solved twice
    cands: list[Candidate] = []
    calls = ref_res.nfe

    def scored(res) -> tuple[np.ndarray, float]:
        """(per-sample PSNR, lower bound) of one solve. Every candidate resamples the same sample
        indices (its own generator, same seed): common random numbers, and a bound anyone can
        recompute from the per-sample PSNRs."""
        if not np.all(np.isfinite(res.x)):
            return np.full(samples, -math.inf), -math.inf
        per = M.psnr_per_sample(res.x, ref, span)
        lcb = (bootstrap_lower(per, confidence, resamples, np.random.default_rng(seed + 1), future, groups)
               if np.all(np.isfinite(per)) else -math.inf)
        return per, lcb

    for s, k, fc in ((s, k, fc) for s in names for k in sorted(set(int(v) for v in nfes)) for fc in modes):
        try:
            choices = _grid_choices(model, tuning, s, k, grids, fc)
        except ConfigError:
            continue  # a budget this solver cannot spend exactly
        for label, times in choices:
            key = (s, k, times, fc)
            if key == (ref_solver, ref_nfe, ref_times, "backbone"):
                continue  # the reference itself is not a candidate: it is what the user runs today
            if key not in solved:
                p = make(s, k, times, fc)
                res = p.run()
                solved[key] = (p, res, [res.timing.total_s])
                timings.append((s, res))
                calls += res.nfe
            p, res, _ = solved[key]
            per, lcb = scored(res)
            cands.append(Candidate(s, k, label, times, float(np.mean(per)), lcb,
                                   float(np.quantile(per, QUANTILE)), res.nfe, meets=lcb >= target_psnr,
                                   per_sample=per, first_s=solved[key][2][0], first_call=fc))

    def make_ff(T: int, options: dict, x: np.ndarray) -> Any:
        return plan(model, solver="fastflow", nfe=T, grid="uniform", cfg_scale=cfg, cond=cond, null_cond=null_cond,
                    noise=x, tuning=None, labels=labels, options=options)

    learn_noise = np.random.default_rng(seed + 7).standard_normal(noise.shape).astype(np.float32)
    for label, p, res, spent in _fastflow_candidates(make_ff, nfes, speedups, noise, learn_noise):
        per, lcb = scored(res)
        c = Candidate("fastflow", p.nfe, label, p.grid, float(np.mean(per)), lcb, float(np.quantile(per, QUANTILE)),
                      res.nfe, meets=lcb >= target_psnr, per_sample=per, first_s=res.timing.total_s, recordable=False)
        solved[c.key] = (p, res, [res.timing.total_s])
        timings.append(("fastflow", res))
        calls += spent
        cands.append(c)
    if not cands:
        raise ConfigError(f"no candidate configuration: none of {', '.join(names) or 'the solvers'} can spend "
                          f"{', '.join(map(str, nfes))} backbone calls")
    feasible = [c for c in cands if c.meets]
    if not any(c.recordable for c in feasible):
        best = max((c for c in cands if c.recordable), key=lambda c: c.lower_bound)
        raise ConfigError(
            f"target PSNR {target_psnr:g} dB against {reference} is not reachable with {', '.join(names)} at "
            f"NFE {min(c.nfe for c in cands)}..{max(c.nfe for c in cands)}: the best {confidence:.0%} lower bound "
            f"is {best.lower_bound:.2f} dB ({best.solver}@{best.nfe} {best.grid_label}); lower the target or "
            "allow more calls (--nfe)")
    timed = {c.key for c in feasible}
    for _ in range(max(0, repeats - 1)):  # round-robin: load on the machine hits every candidate alike
        for key in timed:
            p, res, times_s = solved[key]
            again = p.run()
            times_s.append(again.timing.total_s)
            timings.append((key[0], again))
            calls += res.nfe
    for c in feasible:
        c.measured_s = float(statistics.median(solved[c.key][2]))
    per_call = latency_model(timings)
    for c in cands:
        r = solved[c.key][1]
        c.latency_s = modelled_latency(per_call, c.solver, r.nfe, r.sidenet_calls, len(r.steps))
    settings_ = {"reference": f"{ref_solver}@{ref_nfe}", "confidence": float(confidence), "samples": int(samples),
                 "backend": str(backend)}
    preset = _choose(cands, float(target_psnr), name, settings_)
    cost = {"solves": len(solved) + 1 + (repeats - 1) * len(timed), "configurations": len(solved),
            "backbone_calls": int(calls), "seconds": round(time.perf_counter() - started, 3),
            "per_call_ms": {"backbone": round(per_call["backbone_s"] * 1e3, 4),
                            "sidenet": round(per_call["sidenet_s"] * 1e3, 4),
                            "overhead_per_step": {k: round(v * 1e3, 4)
                                                  for k, v in per_call["overhead_s_per_step"].items()}}}
    settings = {"target_psnr": float(target_psnr), "reference": f"{ref_solver}@{ref_nfe}", "solvers": names,
                "nfes": sorted(set(int(v) for v in nfes)), "grids": list(grids), "samples": int(samples),
                "first_calls": modes + [f"{f} (skipped: the bundle has no first-call table; run 'anchorflow tune')"
                                        for f in dict.fromkeys(first_calls) if f not in modes],
                "seed": int(seed), "cfg": float(cfg), "confidence": float(confidence), "resamples": int(resamples),
                "repeats": int(repeats),
                "bootstrap": ("percentile, over samples" if groups is None else
                              f"percentile, two-level: over {np.unique(groups).size} condition groups, then samples"),
                "bound": ("the population mean" if future is None
                          else f"the mean of a fresh batch of {future} samples (prediction bound)")}
    return AutoConfig(preset, cands, cost, settings)


def _groups(groups: Any, labels: Any, samples: int, meta: dict) -> Optional[np.ndarray]:
    """``autoconfigure``'s ``groups``: None, ``"labels"`` (the labels, or 0..C-1 cycled) or (samples,) ids."""
    if groups is None:
        return None
    if isinstance(groups, str):
        if groups != "labels":
            raise ConfigError(f"groups must be None, 'labels' or one condition id per sample, got {groups!r}")
        if labels is not None:
            return np.asarray(labels).reshape(-1)
        classes = meta.get("num_classes")
        if not classes:
            raise ConfigError("groups='labels' needs a class-conditional model or labels; pass groups= ids instead")
        return np.arange(samples) % int(classes)
    g = np.asarray(groups).reshape(-1)
    if g.size != samples:
        raise ConfigError(f"groups must give one condition id per sample ({samples}), got {g.size}")
    return g


def _fastflow_candidates(make_ff, nfes: Sequence[int], speedups: Sequence[float], noise: np.ndarray,
                         learn_noise: np.ndarray) -> list[tuple[str, Any, Any, int]]:
    """FastFlow at each budget k: a bandit on T = round(speedup k) uniform Euler steps with the budget k
    calls (``speedup`` = T / k), learned over :data:`FASTFLOW_LEARN` generations on ``learn_noise``
    (never the scoring batch), then frozen and solved on ``noise``. Returns (grid label, plan, frozen
    Result, backbone calls spent learning and scoring) per candidate. A frozen bandit is one fixed
    schedule, but a preset cannot hold the learned state: the candidates are scored for the record
    and never chosen (``recordable=False``)."""
    from .runtime import FastFlowBandit

    out = []
    for k in sorted(set(int(v) for v in nfes)):
        for sp in dict.fromkeys(float(v) for v in speedups):
            T = int(round(sp * k))
            if k < 3 or T <= k:  # the bandit takes budgets of >= 3 calls
                continue
            bandit = FastFlowBandit(T, "uniform", calls=float(k), seed=0)
            spent = 0
            for _ in range(FASTFLOW_LEARN):
                spent += make_ff(T, {"bandit": bandit}, learn_noise).run().nfe
            p = make_ff(T, {"bandit": bandit, "learn": False, "max_calls": k}, noise)
            res = p.run()
            spent += res.nfe
            out.append((f"uniform, bandit x{T / k:.3g} ({k} calls)", p, res, spent))
    return out


def latency_model(timings: Sequence[tuple[str, Any]]) -> dict[str, Any]:
    """Per-call times from ``(solver, Result)`` solves of one batch: the median time per backbone call,
    per SideNet call, and per solver the median runtime overhead (all but the networks) per step."""
    back = [r.timing.backbone_s / r.nfe for _, r in timings if r.nfe]
    side = [r.timing.sidenet_s / r.sidenet_calls for _, r in timings if r.sidenet_calls]
    over: dict[str, list] = {}
    for s, r in timings:
        over.setdefault(s, []).append(r.timing.overhead_s / max(len(r.steps), 1))
    return {"backbone_s": statistics.median(back) if back else 0.0,
            "sidenet_s": statistics.median(side) if side else 0.0,
            "overhead_s_per_step": {s: statistics.median(v) for s, v in over.items()}}


def modelled_latency(per_call: dict[str, Any], solver: str, nfe: int, sidenet_calls: int, steps: int) -> float:
    """``nfe`` x time per backbone call + SideNet calls x time per SideNet call + steps x the solver's overhead."""
    over = per_call["overhead_s_per_step"]
    o = over.get(solver, statistics.median(over.values()) if over else 0.0)
    return float(nfe * per_call["backbone_s"] + sidenet_calls * per_call["sidenet_s"] + steps * o)


def _choose(cands: Sequence[Candidate], target_psnr: float, name: str, st: dict) -> Preset:
    """The fastest measured candidate whose bound meets ``target_psnr`` (ties: fewer calls), as a Preset."""
    ok = [c for c in cands if c.lower_bound >= target_psnr and c.latency_s is not None and c.recordable]
    if not ok:
        raise ConfigError(f"no candidate of this search has a {st['confidence']:.0%} lower bound >= {target_psnr:g} dB")
    best = min(ok, key=lambda c: (c.latency_s, c.nfe))
    return Preset(name, best.solver, best.nfe, best.first_call, best.grid_label, best.times, float(target_psnr),
                  st["reference"], st["confidence"], best.lower_bound, best.mean_psnr, QUANTILE,
                  best.quantile_psnr, best.latency_s, st["samples"], st["backend"])


def preset_for(found: AutoConfig, target_psnr: float, name: Optional[str] = None) -> Preset:
    """The preset the same search gives for another target (every candidate's latency is modelled):
    one search, several presets (e.g. fast / balanced / best). The choice is exactly what
    :func:`autoconfigure` makes for that target given the same solves and per-call times."""
    st = {**found.settings, "backend": found.preset.backend}
    return _choose(found.candidates, float(target_psnr),
                   check_name(name if name is not None else f"psnr{target_psnr:g}"), st)


def record(bundle_dir, found: AutoConfig) -> None:
    """Store the preset in the bundle's tuned.json (merged under the bundle's lock; grids kept)."""
    from .runtime.bundles.tuned_grids import Tuning, write_tuning

    write_tuning(bundle_dir, Tuning(settings={"autoconfig": {**found.settings, "preset": found.preset.name,
                                                              "cost": found.cost}},
                                    presets={found.preset.name: found.preset}))


def search_report(found: AutoConfig, width: int, where: str = "", what: str = "", calls: str = "backbone") -> list[str]:
    """The lines ``tune --target-psnr`` prints: every candidate (met first, then by latency), the chosen
    preset and what the search cost (``where`` / ``what``: words about the scores and the batch)."""
    p = found.preset
    lines = [f"{'config':<{width}} {'mean':>7} {'bound':>7} {'p10':>7} {'ms':>8}  (ms: modelled from the per-call times)"]
    for c in sorted(found.candidates, key=lambda c: (not c.meets, c.latency_s, c.nfe)):
        lines.append(f"{c.solver + '@' + str(c.nfe) + ' ' + c.grid_label:<{width}} {c.mean_psnr:7.2f} "
                     f"{c.lower_bound:7.2f} {c.quantile_psnr:7.2f} {c.latency_s * 1e3:8.1f}")
    lines.append(f"quality {p.name}: {p.solver}@{p.nfe} {p.grid_label}: {p.confidence:.0%} lower bound "
                 f"{p.lower_bound:.2f} dB >= {p.target_psnr:g} dB against {p.reference}{where} (mean {p.mean_psnr:.2f}, "
                 f"10% quantile {p.quantile_psnr:.2f}), {what}{p.latency_s * 1e3:.1f} ms per {p.batch} samples (modelled)")
    c = found.cost
    lines.append(f"search cost: {c['configurations']} configurations, {c['solves']} solves, {c['backbone_calls']} "
                 f"{calls} calls, {c['seconds']:.1f} s")
    return lines


def tune_to_target(model: str, target_psnr: float, *, reference: str, solvers: str, nfe: Optional[str], grids: str,
                   samples: int, seed: int, cfg: float, confidence: float, name: Optional[str], backend: str,
                   dry_run: bool, plot: Optional[str] = None, batch: Optional[int] = None,
                   bound: str = "samples", first_calls: Sequence[str] = ("backbone", "cached")) -> list[str]:
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
    if plot is not None:
        from .base._io import check_output

        if not str(plot).lower().endswith(".png"):
            raise ConfigError(f"--plot {plot}: the Pareto figure is a PNG; give a .png file name")
        check_output(plot, "--plot")
    if model == "default" and not dry_run:
        raise ConfigError("the bundled model is read-only; pass a copy of its bundle folder or use --dry-run")
    m = open_model(model, backend=backend)
    folder = m.files.bundle
    if not dry_run and folder is None:
        raise ConfigError(f"{model} is not an exported bundle; export it first ('anchorflow export {model} --out DIR')")
    tuning = None if folder is None else read_tuning(folder)
    found = autoconfigure(m, target_psnr, reference=reference, solvers=names, nfes=nfes, grids=grid_names,
                          samples=samples, seed=seed, cfg=cfg, confidence=confidence, name=name, tuning=tuning,
                          backend=", ".join(m.providers) or backend, batch=batch,
                          groups="labels" if bound == "conditions" else None, first_calls=first_calls)
    p = found.preset
    lines = search_report(found, 28)
    if plot is not None:
        plot_pareto(found, plot)
        lines.append(f"wrote {plot} (quality vs latency and calls, every configuration tried, the chosen one ringed)")
    if not dry_run:
        record(folder, found)
        lines.append(f"stored in {folder}/tuned.json (presets: {p.name}); use it with 'anchorflow sample "
                     f"{model} --quality {p.name}'")
    return lines


# -- using a preset: sample --quality NAME|PSNR, and escalation (--max-error) ---------------------------
def ladder(tuning, chosen: Preset) -> list[Preset]:
    """The configurations escalation climbs after ``chosen``: the recorded presets measured slower than
    it with a higher lower bound (fastest first), then its reference (uniform grid) as the last rung."""
    from .runtime import get_solver
    from .runtime.solving.grids import make_grid

    presets = {} if tuning is None else dict(getattr(tuning, "presets", {}) or {})
    up = sorted((p for p in presets.values() if p.name != chosen.name and p.latency_s > chosen.latency_s
                 and p.lower_bound > chosen.lower_bound), key=lambda p: (p.latency_s, p.nfe, p.name))
    solver, nfe = parse_reference(chosen.reference)
    times = tuple(float(t) for t in make_grid(get_solver(solver).steps_for_nfe(nfe), "uniform"))
    ref = Preset(f"reference {chosen.reference}", solver, nfe, "backbone", "uniform", times, math.inf,
                 chosen.reference, chosen.confidence, math.inf, math.inf, chosen.quantile, math.inf, math.inf,
                 chosen.batch, chosen.backend)
    seen = {(chosen.solver, chosen.nfe, chosen.times), (solver, nfe, times)}
    out = []
    for p in up:  # one rung per configuration (two presets may have chosen the same one)
        if (p.solver, p.nfe, p.times) not in seen:
            seen.add((p.solver, p.nfe, p.times))
            out.append(p)
    return out + [ref]


@dataclass
class Escalated:
    """What escalation did: the samples and estimates after it, and per rung how many samples it re-solved."""

    x: np.ndarray
    error_estimate: np.ndarray
    rungs: list[dict[str, Any]]  # {"config", "samples", "backbone_calls"} per rung used
    resolved: int  # samples re-solved at least once
    extra_calls: int  # backbone calls spent by the re-solves (batched: one solve per rung)
    above: int  # samples whose estimate, still in the first solver's units, exceeds max_error at the end

    def to_json(self) -> dict[str, Any]:
        return {"rungs": self.rungs, "resolved": self.resolved, "extra_calls": self.extra_calls,
                "still_above": self.above}


def _rows(plan_, idx: np.ndarray) -> dict:
    """``plan_.solve_kwargs()`` for the rows ``idx`` only (per-row conditions and null rows sliced)."""
    kw = plan_.solve_kwargs()
    if kw.get("cond") is not None:
        kw["cond"] = {k: (np.asarray(v)[idx] if k in plan_.rows else v) for k, v in kw["cond"].items()}
    if kw.get("null_cond") is not None:
        kw["null_cond"] = {k: (np.asarray(v)[idx] if np.ndim(v) and np.shape(v)[0] == plan_.n and plan_.n > 1 else v)
                           for k, v in kw["null_cond"].items()}
    return kw


def escalate(first, result, max_error: float, rungs: Sequence[Any],
             labels: Optional[Sequence[str]] = None) -> Escalated:
    """Re-solve only the samples whose ``result.error_estimate`` exceeds ``max_error`` with the next
    costlier configuration (``rungs``: SamplePlans of the same request, cheapest first), and those
    still above it with the one after, and so on. A rung whose solver gives no estimate (the
    reference), or whose solver is not the first one's, ends the climb for the samples it solved:
    E is in the first solver's units, and the solvers' estimates differ in scale (median estimate /
    true error measured from about 0.3 for UniPC to about 3 for BA, benchmarks/results/autoconfig.md),
    so another solver's estimate is not compared with it. Same start noise and conditions per sample.
    """
    from .runtime.solving.solve import solve

    if isinstance(max_error, bool) or not isinstance(max_error, (int, float)) or not max_error >= 0 \
            or not math.isfinite(max_error):
        raise ConfigError(f"--max-error must be a finite number >= 0 (state units), got {max_error!r}")
    if result.error_estimate is None:
        raise ConfigError(f"--max-error needs a per-sample error estimate and solver {first.solver!r} gives none "
                          "(ba, ab2, ipndm and unipc do)")
    noise = first.start_noise()
    x = np.array(result.x, copy=True)
    est = np.asarray(result.error_estimate, np.float64).copy()
    todo = np.flatnonzero(est > max_error)
    comparable = np.ones(x.shape[0], bool)  # estimate in the first solver's units
    resolved: set = set()
    used, calls = [], 0
    for i, q in enumerate(rungs):
        if todo.size == 0:
            break
        r = solve(q.solver, q.model.velocity, noise[todo], q.nfe, **_rows(q, todo))
        x[todo] = r.x
        same = r.error_estimate is not None and q.solver == first.solver
        e = np.zeros(todo.size) if r.error_estimate is None else np.asarray(r.error_estimate, np.float64)
        est[todo] = e
        comparable[todo] = same
        resolved.update(int(i) for i in todo)
        used.append({"config": labels[i] if labels else f"{q.solver}@{q.nfe} {q.grid_source}",
                     "samples": int(todo.size),
                     "backbone_calls": int(r.nfe)})
        calls += int(r.nfe)
        todo = todo[e > max_error] if same else todo[:0]
    return Escalated(x, est, used, len(resolved), calls, int(np.sum((est > max_error) & comparable)))


def quality_plans(model, quality: Any, tuning=None, **request) -> tuple[Preset, Any, list]:
    """(preset, its SamplePlan, the escalation ladder as (label, SamplePlan)) for ``--quality`` on ``model``;
    ``request``: the rest of :func:`anchorflow.runtime.plan.plan`'s arguments (conditions, n, seed, ...)."""
    from .runtime.plan import plan

    if tuning is None:
        from .runtime.bundles.tuned_grids import read_tuning

        files = getattr(model, "files", None)
        folder = getattr(files, "bundle", None) if files is not None else getattr(model, "path", None)
        tuning = None if folder is None else read_tuning(folder)
    chosen = resolve_quality(tuning, quality)

    def make(p: Preset):
        return plan(model, solver=p.solver, nfe=p.nfe, grid=np.asarray(p.times, np.float64),
                    first_call=p.first_call, tuning=tuning, **request)

    return chosen, make(chosen), [(f"{p.name}: {p.solver}@{p.nfe} {p.grid_label}" if math.isfinite(p.lower_bound)
                                   else p.name, make(p)) for p in ladder(tuning, chosen)]


def describe(p: Preset) -> str:
    """One line: what a preset is and what it promised."""
    return (f"quality {p.name}: {p.solver}@{p.nfe} {p.grid_label} ({p.confidence:.0%} lower bound {p.lower_bound:.2f} dB "
            f">= {p.target_psnr:g} dB against {p.reference}, measured {p.latency_s * 1e3:.1f} ms per {p.batch} samples)")


def plot_pareto(found: AutoConfig, path) -> Any:
    """Mean PSNR vs latency (left) and vs backbone calls (right) of every configuration
    tried: filled where its lower bound met the target, hollow where not; the Pareto front (no
    configuration both faster and better) drawn; the chosen one ringed. A PNG (matplotlib, lazily).
    Latency: modelled from the search's pooled per-call times (every candidate alike)."""
    from .plots import LINE_COLOURS, _figure, _save_figure

    fig, (ax_t, ax_c) = _figure(2, width=5.4, height=4.2)
    p = found.preset
    cands = [c for c in found.candidates if math.isfinite(c.mean_psnr) and c.seconds is not None]
    for i, s in enumerate(dict.fromkeys(c.solver for c in cands)):
        colour = LINE_COLOURS[i % len(LINE_COLOURS)]
        for meets in (True, False):
            mine = [c for c in cands if c.solver == s and c.meets == meets]
            style = dict(color=colour) if meets else dict(facecolors="none", edgecolors=colour)
            label = s if meets == any(c.solver == s and c.meets for c in cands) else None  # one entry per solver
            ax_t.scatter([c.seconds * 1e3 for c in mine], [c.mean_psnr for c in mine], s=16, label=label, **style)
            ax_c.scatter([c.calls for c in mine], [c.mean_psnr for c in mine], s=16, **style)
    for ax, xs in ((ax_t, lambda c: c.seconds * 1e3), (ax_c, lambda c: c.calls)):
        front, best = [], -math.inf
        for c in sorted(cands, key=lambda c: (xs(c), -c.mean_psnr)):
            if c.mean_psnr > best:
                front.append(c)
                best = c.mean_psnr
        ax.step([xs(c) for c in front], [c.mean_psnr for c in front], where="post", color="0.4", lw=1,
                label="Pareto front")
        ax.axhline(p.target_psnr, ls="--", color="0.5", lw=1, label=f"target {p.target_psnr:g} dB "
                   f"({p.confidence:.0%} lower bound)")
        chosen = [c for c in cands if c.key == (p.solver, p.nfe, p.times, p.first_call)]
        if chosen:
            ax.scatter([xs(chosen[0])], [chosen[0].mean_psnr], s=170, facecolors="none", edgecolors="k",
                       linewidths=1.6, label=f"chosen: {p.solver}@{p.nfe} {p.grid_label}")
        ax.grid(True, which="both", alpha=0.3)
    ax_t.legend(fontsize=7)
    from matplotlib.ticker import ScalarFormatter

    ax_t.set_xscale("log")
    ax_t.xaxis.set_major_formatter(ScalarFormatter())
    ax_t.xaxis.set_minor_formatter(ScalarFormatter())
    ax_t.set(xlabel=f"latency per {p.batch} samples (ms, modelled from measured per-call times)",
             ylabel=f"mean PSNR vs {p.reference} (dB)", title="quality vs latency (filled: bound meets target)")
    ax_c.set(xlabel="backbone calls", ylabel=f"mean PSNR vs {p.reference} (dB)", title="quality vs calls")
    return _save_figure(fig, path)


def check_quality_request(quality: Any, max_error: Any, explicit: Sequence[str]) -> None:
    """``sample --quality`` / ``--max-error`` before the model loads: a preset replaces the options
    in ``explicit`` (those the user gave), and escalation climbs the recorded presets."""
    if quality is not None and explicit:
        raise ConfigError(f"--quality {quality} chooses the solver, NFE, grid and first call; drop "
                          f"{', '.join(explicit)}")
    if quality is not None and not str(quality).strip():
        raise ConfigError("--quality is empty; give a preset name or a number of dB")
    if max_error is not None:
        if quality is None:
            raise ConfigError("--max-error needs --quality (it re-solves with the next costlier recorded preset)")
        if not (isinstance(max_error, (int, float)) and math.isfinite(max_error) and max_error >= 0):
            raise ConfigError(f"--max-error must be a finite number >= 0 (state units), got {max_error!r}")


def run_record(p, result, chosen: Optional[Preset], esc: Optional[Escalated]) -> dict[str, Any]:
    """What ``sample --json`` writes: the configuration that ran, its calls, the per-sample estimate."""
    est = None if result.error_estimate is None else [float(v) for v in np.asarray(result.error_estimate)]
    return {"solver": p.solver, "nfe": int(p.nfe), "grid": p.grid_source, "times": list(p.grid),
            "first_call": p.first_call, "backbone_calls": int(result.nfe), "n": int(p.n),
            "quality": None if chosen is None else chosen.to_json(),
            "error_estimate": est,
            "escalation": None if esc is None else {**esc.to_json(),
                                                     "error_estimate_after": [float(v) for v in esc.error_estimate]}}


# -- pipeline bundles: held-out prompts through the bundle's own text encoders ---------------------------
class _PipelineGrids:
    """The ``tuned`` grid slot of :func:`autoconfigure` on a pipeline bundle: what ``generate`` runs
    without ``--grid`` (the bundle's tuned grid for the solver and budget where recorded, else the
    pipeline scheduler's sigmas for the search's latent size)."""

    SCHEDULER = "scheduler sigmas"

    def __init__(self, tuning, decl, latent_hw: tuple[int, int]) -> None:
        self.tuning, self.decl, self.latent_hw = tuning, decl, latent_hw

    def grid_for(self, solver: str, nfe: int, first_call: str = "backbone"):
        from types import SimpleNamespace

        from .runtime import get_solver
        from .runtime.pipelines.schedule import pipeline_sigmas

        tuned = None if self.tuning is None else self.tuning.grid_for(solver, nfe, first_call)
        if tuned is not None:
            return tuned
        steps = get_solver(solver).steps_for_nfe(nfe)
        return SimpleNamespace(spec=self.SCHEDULER, times=pipeline_sigmas(self.decl.family, self.decl.scheduler, steps,
                                                                          self.latent_hw))


def pipeline_conditions(bundle, text, decl, prompts: Sequence[str], samples: int, cfg: Optional[float],
                        negative_prompt: Optional[str] = None) -> tuple[dict, Optional[dict], float, np.ndarray, float]:
    """(cond, null_cond, cfg_scale for the plan, prompt index per sample, guidance) of ``samples`` rows,
    prompt i % P for row i, encoded ONCE per prompt with the bundle's own text encoders (as generate
    encodes them). Guidance ``cfg`` (None: the pipeline's default): CFG rows with the negative prompt's
    embeddings (SD3, Sana), the embedded guidance input (FLUX-dev), none (FLUX-schnell: 1 only)."""
    mode = bundle.format.guidance.mode
    g = float(decl.defaults["guidance_scale"]) if cfg is None else float(cfg)
    if decl.variant == "flux-schnell":
        if cfg is not None and g != 1.0:
            raise ConfigError(f"FLUX-schnell has no guidance; drop --cfg (got {g:g})")
        g = 1.0
    if negative_prompt is not None and mode != "rows":
        raise ConfigError(f"a {decl.variant} bundle has no negative-prompt guidance (its guidance is {mode}); drop "
                          "--negative-prompt")
    rows = mode == "rows" and g > 1.0
    unique = [str(p) for p in prompts]
    emb = text.encode(unique, [negative_prompt or ""] * len(unique) if rows else None)
    idx = np.arange(samples) % len(unique)

    def take(arrays: dict) -> dict:
        return {k: (np.asarray(v)[idx] if np.ndim(v) and np.shape(v)[0] == len(unique) else v)
                for k, v in arrays.items()}

    cond, null = take(emb.cond), None if emb.null is None else take(emb.null)
    if mode == "embedded":
        cond[bundle.format.guidance.input or "guidance"] = np.full((samples,), g, np.float32)
    return cond, null, (g if rows else 1.0), idx, g


def tune_pipeline_to_target(bundle: str, target_psnr: float, *, prompts_file: str, reference: str = "euler@50",
                            solvers: str = "euler,ab2,unipc,ba", nfe: Optional[str] = None,
                            grids: str = "uniform,tuned", samples: Optional[int] = None, seed: int = 1,
                            cfg: Optional[float] = None, negative_prompt: Optional[str] = None,
                            confidence: float = 0.95, name: Optional[str] = None, backend: str = "ort-cpu",
                            dry_run: bool = False, plot: Optional[str] = None, batch: Optional[int] = None,
                            bound: str = "samples", repeats: int = 3) -> list[str]:
    """``anchorflow tune PIPELINE_BUNDLE --target-psnr Q --prompts FILE``: :func:`autoconfigure` on the
    pipeline's transformer (and SideNet) with the held-out prompts' embeddings as conditions; the
    preset is recorded in the bundle's tuned.json (hashed in bundle.json like a plain bundle's), with
    the guidance it was tuned at under ``settings.pipeline_presets``; returns the lines to print.

    ``samples`` (None: 2 per prompt, at least 8): held-out noise rows, prompt i % P for row i;
    ``bound="conditions"`` bootstraps over the prompts, then samples. ``grids``: as
    :func:`autoconfigure`'s, with ``tuned`` (or ``default``) meaning what ``generate`` runs without
    ``--grid``: the bundle's tuned grid where recorded, else the scheduler's sigmas. The PSNR is that
    of the denoised latents against the reference's (the span of the reference latents). Torch-free.
    """
    import dataclasses
    import hashlib

    from .runtime.bundles.load import load_bundle
    from .runtime.bundles.tuned_grids import read_tuning
    from .runtime.pipelines.format import parse_pipeline
    from .runtime.pipelines.pipeline import PRESETS_KEY, _text
    from .runtime.pipelines.text import read_prompts
    from .runtime.plan import MAX_N, check_int, check_request

    names = [s.strip() for s in solvers.split(",") if s.strip()]
    try:
        nfes = DEFAULT_NFES if nfe is None else [int(v) for v in nfe.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"--nfe must be comma-separated integers, got {nfe!r}") from None
    if not nfes:
        raise ConfigError("--nfe names no budget")
    grid_names = list(dict.fromkeys("tuned" if g.strip() == "default" else g.strip()
                                    for g in grids.split(",") if g.strip()))
    if samples is not None:
        check_int(samples, "--samples", 2, MAX_N)
    if cfg is not None:
        check_request(cfg_scale=cfg, names={"cfg_scale": "--cfg"})
    if bound not in ("samples", "conditions"):
        raise ConfigError(f"--bound must be samples or conditions, got {bound!r}")
    check_settings(target_psnr, confidence, 2 if samples is None else samples, 2000, repeats, seed)
    parse_reference(reference)
    name = check_name(name if name is not None else f"psnr{target_psnr:g}")
    if plot is not None:
        from .base._io import check_output

        if not str(plot).lower().endswith(".png"):
            raise ConfigError(f"--plot {plot}: the Pareto figure is a PNG; give a .png file name")
        check_output(plot, "--plot")
    prompts = read_prompts(prompts_file, "--prompts")
    samples = max(8, 2 * len(prompts)) if samples is None else samples
    if samples < len(prompts):
        raise ConfigError(f"--samples {samples} is fewer than the {len(prompts)} prompts of {prompts_file}; give "
                          f"--samples >= {len(prompts)} (each prompt gets samples / prompts noise rows)")
    m = load_bundle(bundle, backend=backend)
    decl = parse_pipeline(m.meta, m.path)
    if decl is None:
        raise ConfigError(f"{bundle} is a transformer bundle without text encoders; --prompts needs a pipeline bundle "
                          "(anchorflow export PIPELINE_FOLDER), or give --cond files")
    text = _text(decl, backend if backend in ("ort-cpu", "ort-cuda", "ort-trt", "auto") else "ort-cpu", None)
    cond, null, cfg_scale, idx, guidance = pipeline_conditions(m, text, decl, prompts, samples, cfg, negative_prompt)
    tuning = read_tuning(m.format)
    shape = tuple(int(v) for v in m.meta["model"]["state_shape"])
    grids_ = _PipelineGrids(tuning, decl, (shape[-2], shape[-1]))
    found = autoconfigure(m, target_psnr, reference=reference, solvers=names, nfes=nfes, grids=grid_names,
                          samples=samples, seed=seed, cfg=cfg_scale, confidence=confidence, name=name, tuning=grids_,
                          cond=cond, null_cond=null, backend=", ".join(m.providers) or backend, batch=batch,
                          repeats=repeats, groups=idx if bound == "conditions" else None,
                          first_calls=("backbone",))  # generate runs no cached first call
    sched = "tuned " + _PipelineGrids.SCHEDULER
    for c in found.candidates:  # "tuned scheduler sigmas" -> "scheduler sigmas" (a real tuned grid keeps its name)
        if c.grid_label == sched:
            c.grid_label = _PipelineGrids.SCHEDULER
    p = found.preset
    if p.grid_label == sched:
        p = found.preset = dataclasses.replace(p, grid_label=_PipelineGrids.SCHEDULER)
    digest = hashlib.sha256("\n".join(prompts).encode()).hexdigest()
    how = {"cfg": guidance, "guidance": m.format.guidance.mode, "prompts": len(prompts), "prompts_sha256": digest,
           "prompts_file": str(prompts_file), "negative_prompt": negative_prompt, "samples": int(samples),
           "latent_shape": list(shape), "height": shape[-2] * int(decl.vae["spatial_factor"]),
           "width": shape[-1] * int(decl.vae["spatial_factor"])}
    found.settings["pipeline"] = how
    found.settings["cfg"] = guidance
    lines = search_report(found, 40, where=" on the denoised latents",
                          what=f"{len(prompts)} held-out prompts x {samples} samples, guidance {guidance:g}, ",
                          calls="transformer")
    if plot is not None:
        plot_pareto(found, plot)
        lines.append(f"wrote {plot} (quality vs latency and calls, every configuration tried, the chosen one ringed)")
    if not dry_run:
        from .runtime.bundles.tuned_grids import Tuning, write_tuning

        old = dict(((tuning.settings if tuning is not None else {}) or {}).get(PRESETS_KEY) or {})
        kept = {k: v for k, v in old.items() if k in (getattr(tuning, "presets", {}) or {})}
        write_tuning(m.path, Tuning(settings={"autoconfig": {**found.settings, "preset": p.name, "cost": found.cost},
                                              PRESETS_KEY: {**kept, p.name: how}},
                                    presets={p.name: p}))
        lines.append(f"stored in {m.path}/tuned.json (presets: {p.name}); use it with 'anchorflow generate {bundle} "
                     f"--prompt ... --quality {p.name}'")
    return lines
