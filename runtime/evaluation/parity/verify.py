"""``verify``'s library: one bundle, the same inputs through every available backend (torch-free).

Per network (backbone, SideNet) on random and real inputs at batch 1, 7 and the bundle's maximum
rows, built from the inputs bundle.json declares (:mod:`.cases`: any condition, of its dtype,
shape and axis sizes: opt, and min where it differs), and end to end: a full BA-solver sample
(arXiv 2601.21542) at 7 NFE from the same noise (Euler for a bundle without a SideNet). Each
backend x precision is compared with the reference backend in fp32 (:mod:`.stats`). "Real"
inputs are states of the reference's own 16-step Euler samples, noised again at several t
(t = 1 noise, t = 0 data), so no data set and no torch is needed: with the ort-cpu backend alone
this runs on numpy + onnxruntime.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from ....base.errors import AnchorflowError, CheckpointError, ConfigError
from ...bundles.load import BACKENDS
from ...bundles.format import BundleFormat, read_bundle
from .cases import Case, Domain, RealData, batches, conditions, make_cases, shape_of
from .report import NetworkReport, format_table, report_rows, run_report
from .stats import compare, tolerance

BACKEND_NAMES = tuple(b for b in BACKENDS if b != "auto")  # every backend of the runtime's registry
E2E_NFE = 7
E2E_BATCH = 4
# End to end the per-call error is integrated over E2E_NFE steps of size <= 1 / E2E_NFE through a
# guided field with Lipschitz factor ~ cfg scale 1.5; 10x the per-call tolerance bounds that
# growth ((1 + 1.5 / 7)^7 ~ 3.9, times the 1.5 guidance amplification of each call's error).
E2E_FACTOR = 10.0
CFG_SCALE, CFG_INTERVAL = 1.5, (0.0, 0.7)
REAL_POOL = 256  # reference samples the real inputs are drawn from (at most one call's worth of rows)


@dataclass
class Opened:
    """One backend x precision, opened: the runtime's callables and what it really runs on."""

    name: str
    precision: str
    velocity: Callable
    sidenet: Optional[Callable]
    providers: list[str] = field(default_factory=list)
    meta: dict = field(default_factory=dict)  # bundle.json and its declarations: what a sampling plan reads
    format: Optional[BundleFormat] = None

    @property
    def label(self) -> str:
        return f"{self.name}/{self.precision}"


def open_backend(folder: Path, name: str, precision: str, allow_fallback: bool = False,
                 sources: Optional[dict] = None, trust_source: bool = False) -> Opened:
    """Open ``name`` (any backend of the runtime's registry, torch included) on a bundle; raises
    AnchorflowError (the reason it is unavailable). ``sources`` / ``trust_source``: where the torch
    backend finds a network's torch model (see ``anchorflow.trainers.torch_wrappers.bundle_runs``;
    nothing bundle.json names is imported unless ``trust_source``)."""
    from ...bundles.load import load_bundle

    if name == "torch":
        return _open_torch(folder, precision, sources, trust_source)
    b = load_bundle(folder, backend=name, allow_fallback=allow_fallback, precision=precision)
    return Opened(name, precision, b.velocity, b.sidenet, list(b.providers), b.meta, b.format)


def _open_torch(folder: Path, precision: str, sources: Optional[dict], trust_source: bool) -> Opened:
    """The registry's torch backend (imported lazily, as ``load_bundle`` does) with the user's sources."""
    from ...bundles.load import external_runs
    from ...bundles.networks import WRAPPERS

    fmt = read_bundle(folder)
    runs, providers = external_runs("torch", fmt, precision, sources=sources, trust_source=trust_source)
    nets = {n: WRAPPERS[n](fmt.networks[n], run, fmt.guidance.null, list(providers)) for n, run in runs.items()}
    return Opened("torch", precision, nets["backbone"], nets.get("sidenet"), list(providers), fmt.meta, fmt)


def _runner(opened: Opened, network: str) -> Callable[[dict], np.ndarray]:
    if network == "backbone":
        return lambda f: np.asarray(opened.velocity(f["x"], f["t"], _cond(f)))
    return lambda f: np.asarray(opened.sidenet(f["x"], f["v"], f["t"], f["h"], _cond(f)))


def _cond(feeds: dict) -> dict:
    return {k: v for k, v in feeds.items() if k not in ("x", "v", "t", "h")}


def _size_sets(fmt: BundleFormat) -> list[dict]:
    """Axis sizes to test: every named axis at its opt, then (if any differs) at its min."""
    axes = {a: r for net in fmt.networks.values() for a, r in net.axes.items()}
    low = {a: r[0] for a, r in axes.items() if r[0] != r[1]}
    return [{}, low] if low else [{}]


def build_cases(fmt: BundleFormat, ref: Opened, seed: int) -> dict[str, list[Case]]:
    """Per network: random cases (per set of axis sizes) and real ones at batch 1, 7 and the maximum."""
    rng = np.random.default_rng(seed)
    dom = Domain.of_bundle(fmt)
    pool = min(REAL_POOL, fmt.backbone.batch[2]) if fmt.backbone.batch else REAL_POOL
    cond0 = conditions(fmt.backbone.inputs, pool, rng, dom, null=False)
    noise = rng.standard_normal(shape_of(fmt.backbone.input("state"), pool, dom.sizes)).astype(np.float32)
    labels = {k: cond0.pop(k) for k in list(cond0) if k in dom.labels and k in dom.null}
    y0 = next(iter(labels.values()), None)
    x0 = _plan(ref, "euler", 16, noise, {**cond0, **labels}).run().x
    real = RealData(x0, y0, ref.velocity, cond0)
    out: dict[str, list[Case]] = {}
    for name, net in fmt.networks.items():
        top = net.batch[2] if net.batch else 7
        cases = []
        for i, sizes in enumerate(_size_sets(fmt)):
            tag = " ".join(f"{a}={s}" for a, s in sorted(sizes.items()))
            cases += make_cases(net.inputs, batches(top), Domain.of_bundle(fmt, sizes), real if i == 0 else None,
                                seed + i, tag)
        out[name] = cases
    return out


def end_to_end(opened: Opened, fmt: BundleFormat, seed: int) -> np.ndarray:
    """A full sample at E2E_NFE from fixed noise: BA-solver with a SideNet, else Euler; guided
    (cfg 1.5 on [cond; null] rows) when the bundle has null values for every condition."""
    rng = np.random.default_rng(seed + 1)
    dom = Domain.of_bundle(fmt)
    cond = conditions(fmt.backbone.inputs, E2E_BATCH, rng, dom, null=False)
    noise = rng.standard_normal(shape_of(fmt.backbone.input("state"), E2E_BATCH, dom.sizes))
    nulls = fmt.guidance.null
    guided = fmt.guidance.mode == "rows" and cond and all(k in nulls for k in cond)
    extra = dict(cfg_scale=CFG_SCALE, cfg_interval=CFG_INTERVAL) if guided else {}  # the bundle's null rows
    return _plan(opened, e2e_method(fmt), E2E_NFE, noise.astype(np.float32), cond, **extra).run().x


def _plan(opened: Opened, solver: str, nfe: int, noise: np.ndarray, cond: dict, **guidance: Any):
    """The sampling plan of a comparison: the same uniform grid on every backend (no tuned grid)."""
    from ...plan import plan

    return plan(opened, solver=solver, nfe=nfe, grid="uniform", noise=noise, cond=cond or None, tuning=None,
                **guidance)


def e2e_method(fmt: BundleFormat) -> str:
    from ...solving.solvers import solver_names

    return "ba" if "sidenet" in fmt.networks and "ba" in solver_names() else "euler"


@dataclass
class VerifyReport:
    """Comparisons run, skipped (``unavailable``: a missing provider, precision or dependency, with
    the reason) and ``broken`` (a file that fails its integrity check: a failure, not a skip).

    ``passed`` only when at least one comparison ran, all of them passed and nothing is broken.
    """

    reference: str
    reports: list = field(default_factory=list)  # NetworkReport
    unavailable: dict[str, str] = field(default_factory=dict)
    providers: dict[str, list[str]] = field(default_factory=dict)
    broken: dict[str, str] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)  # asked backends / precisions that were not compared

    @property
    def passed(self) -> bool:
        return (bool(self.reports) and not self.broken and not self.missing
                and all(r.passed for r in self.reports))

    def as_dict(self) -> dict[str, Any]:
        return {"reference": self.reference, "passed": self.passed, "unavailable": self.unavailable,
                "broken": self.broken, "not_compared": self.missing, "providers": self.providers,
                "comparisons": [{"network": r.network, "backend": r.runtime, "precision": r.precision,
                                 **r.as_dict()} for r in self.reports]}

    def verdict(self) -> str:
        fails = [r.failure() for r in self.reports if not r.passed]
        fails += [f"{k} is broken ({why})" for k, why in self.broken.items()]
        if self.reports and self.missing:
            fails.append(f"asked but not compared: {', '.join(self.missing)} (skipped, see above)")
        if fails:
            return "; ".join(fails)
        if not self.reports:
            return (f"nothing was compared (reference {self.reference}/fp32; every other backend x precision was "
                    "skipped, see above): add --precision fp16, or make the torch reference available (the skipped "
                    "torch row says how)")
        return f"all {len(self.reports)} comparisons passed"

    def text(self) -> str:
        cols = ("network", "runtime", "precision", "cases", "max_abs", "mean_abs", "p99_abs", "max_rel", "mean_rel",
                "p99_rel", "needed_atol", "tolerance", "result")
        lines = [f"reference: {self.reference} (fp32)"]
        lines += [f"  {label}: {', '.join(p)}" for label, p in self.providers.items()]
        if self.reports:
            lines.append(format_table(report_rows(self.reports), cols))
        lines += [f"skipped {label}: {why}" for label, why in self.unavailable.items()]
        lines += [f"BROKEN {label}: {why}" for label, why in self.broken.items()]
        lines.append(("FAILED: " if not self.passed else "") + self.verdict())
        return "\n".join(line for line in lines if line)


def _pick_reference(folder: Path, backends: list[str], reference: Optional[str], report: VerifyReport,
                    sources: Optional[dict] = None, trust_source: bool = False) -> Opened:
    choices = [reference] if reference else (["torch", "ort-cpu"] if "torch" in backends else ["ort-cpu"])
    for name in choices:
        try:
            return open_backend(folder, name, "fp32", sources=sources, trust_source=trust_source)
        except AnchorflowError as exc:
            report.unavailable[f"{name}/fp32"] = str(exc)
    raise ConfigError(f"the reference backend ({' or '.join(choices)}) is unavailable: "
                      + "; ".join(report.unavailable.values()))


def verify_bundle(path: str | Path, backends: list[str], precisions: list[str], reference: Optional[str] = None,
                  atol: Optional[float] = None, rtol: Optional[float] = None, seed: int = 0,
                  progress: Optional[Callable[[list], Any]] = None, allow_fallback: bool = False,
                  sources: Optional[dict] = None, trust_source: bool = False,
                  required: tuple = ()) -> VerifyReport:
    """Compare every backend x precision with the reference (fp32); see the module docstring.

    ``progress``: wraps the list of (backend, precision) pairs to show a bar (the CLI passes tqdm).
    ``sources`` / ``trust_source``: where the torch reference comes from (:func:`open_backend`).
    ``required``: ``"backends"`` and/or ``"precisions"``: every one asked must be compared (in at
    least one comparison, the reference counting for its backend and fp32), else the report fails
    listing those that were not. The bundle's other files (tuned grids, first-call table, graphs
    against their declaration, weights) are audited too (:func:`anchorflow.runtime.bundles.audit.audit`).
    """
    from ...bundles.audit import audit

    fmt = read_bundle(path)
    folder = fmt.folder
    report = VerifyReport(reference or "")
    report.broken.update(audit(fmt))
    ref = _pick_reference(folder, backends, reference, report, sources, trust_source)
    report.reference = ref.name
    cases = build_cases(fmt, ref, seed)
    refs = {n: [_runner(ref, n)(c.feeds) for c in cs] for n, cs in cases.items()}
    ref_e2e = end_to_end(ref, fmt, seed)
    e2e_name = f"e2e {e2e_method(fmt)}@{E2E_NFE}"
    todo = [(b, p) for b in backends for p in precisions if not (b == ref.name and p == "fp32")]
    for name, precision in (progress(todo) if progress else todo):
        try:
            opened = open_backend(folder, name, precision, allow_fallback, sources, trust_source)
        except CheckpointError as exc:  # a tampered or missing ONNX file: the bundle is broken (a failure)
            (report.unavailable if name == "torch" else report.broken)[f"{name}/{precision}"] = str(exc)
            continue
        except AnchorflowError as exc:
            report.unavailable[f"{name}/{precision}"] = str(exc)
            continue
        report.providers[opened.label] = opened.providers
        tol = tolerance(precision, atol, rtol)
        for net, cs in cases.items():
            report.reports.append(run_report(net, precision, name, ref.name, cs, refs[net], _runner(opened, net), tol))
        e2e = NetworkReport(e2e_name, precision, name, ref.name, tolerance(precision, atol, rtol, E2E_FACTOR))
        e2e.results.append((Case("noise", E2E_BATCH, {}), compare(end_to_end(opened, fmt, seed), ref_e2e, e2e.tolerance)))
        report.reports.append(e2e)
    report.missing = not_compared(report, ref.name, backends if "backends" in required else [],
                                  precisions if "precisions" in required else [])
    return report


def not_compared(report: VerifyReport, reference: str, backends: list, precisions: list) -> list[str]:
    """The asked backends and precisions that no comparison covered (the reference covers its
    backend and fp32 once anything was compared with it)."""
    ran = {(r.runtime, r.precision) for r in report.reports}
    if ran:
        ran.add((reference, "fp32"))
    seen_b, seen_p = {b for b, _ in ran}, {p for _, p in ran}
    return ([f"backend {b}" for b in backends if b not in seen_b]
            + [f"precision {p}" for p in precisions if p not in seen_p])
