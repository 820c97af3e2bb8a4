"""Parity reports: an exported network against its torch module, or any backend against another.

Per output and case: max / mean / p99 absolute and relative error, and the smallest atol that
would pass (Polygraphy's comparator report, STYLE.md item 7). Inputs cover batch 1, a prime
batch and the maximum batch, each with random inputs and with real ones: noised data
``x_t = (1 - t) x_data + t noise`` at several t (t = 1 noise, t = 0 data) through the backbone,
and for the SideNet real (x, v) pairs with the offsets the BA-solver asks for (arXiv 2601.21542).

The statistics are computed here with numpy instead of polygraphy's ``CompareFunc.simple``:
(1) ``anchorflow verify`` runs on torch-free edge installs (numpy + onnxruntime) where polygraphy,
an ``[export]`` extra, is absent, and both must report the same numbers; (2) polygraphy's relative
error divides by ``|ref| + 2e-16`` where the reference is exactly 0, and the SideNet's delta IS
exactly 0 on every h = 0 row by construction, so its relative statistics would explode;
(3) its p99 is only computed when p99 is the checked statistic, while the report wants max, mean
and p99 together. Nothing in this module imports torch at import time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import numpy as np

from ..errors import CheckpointError
from ..runtime.solvers.ba import LOBATTO_A
from .onnx_export import NetSpec, random_inputs

# Relative error is |a - b| / max(|b|, REL_FLOOR * rms(b)): elements far below the tensor's own
# scale (a SideNet delta at h ~ 0) are judged against that scale instead of against ~0.
REL_FLOOR = 1e-3
BA_FRACTIONS = (LOBATTO_A, 1.0 - LOBATTO_A, 1.0, -LOBATTO_A)  # the BA probe offsets, in units of h
STEP_SIZES = (1 / 5, 1 / 7, 1 / 10)  # intervals of 5-, 7- and 10-NFE uniform grids
# Times at which solvers call the nets: from t = 1 (noise) down to 1/50, the last backbone call of
# a 50-step grid. No solver calls the backbone at t = 0 (the last step ends there), where the
# learned field is steepest: a trained digits DiT's fp16 error grows from 3 u at t = 0.05 to
# 15 u at t = 0 (u = 2^-11), while fp32 parity is unaffected.
T_LEVELS = (0.02, 0.05, 0.2, 0.4, 0.6, 0.8, 0.95, 1.0)
PRIME_BATCH = 7


@dataclass(frozen=True)
class Tolerance:
    """Pass when the ``stat`` ("max" or "mean") of ``|a - b| - rtol |b|`` is at most ``atol``."""

    atol: float
    rtol: float = 0.0
    stat: str = "max"

    def describe(self) -> str:
        return f"{self.stat} abs err <= {self.atol:.2g}" + (f" + {self.rtol:.2g} |ref|" if self.rtol else "")


# One table of tolerances. Outputs are velocities of unit scale (v ~ noise - data, data in
# [-1, 1]) and SideNet deltas of size |h| * O(1).
# - fp32, max, absolute only: float32 spacing at 1 is 1.2e-7; reordered sums (matmul, softmax,
#   layer norm in onnxruntime's kernels vs torch's) give errors around 1e-6..1e-5 at these widths
#   (measured <= 5e-6), so 1e-4 leaves a ~10x margin while any real export bug (a wrong op or
#   constant) shows up at 1e-2 or more. rtol is 0: a relative criterion is ill-posed where the
#   SideNet's delta is exactly 0 (h = 0 rows).
# - fp16 / bf16, mean, relative: rounding errors scale with the values, so the mean error may be
#   32 unit roundoffs u of the mean |output| (fp16 u = 2^-11, bf16 u = 2^-8), plus one u absolute
#   for near-zero outputs. Measured on the trained digits DiT: <= 3 u for t >= 0.05 and worst at
#   the smallest solver time t = 0.02 (fp16 8 u, bf16 15 u), so 32 u is 2x the worst case, while a
#   wrong conversion (a dropped cast, a constant in the wrong type) gives O(1) relative errors
#   (>= 256 u). The mean, not the max, because single rounding events dominate the max.
U_FP16, U_BF16 = 2.0**-11, 2.0**-8
TOLERANCES: dict[str, Tolerance] = {
    "fp32": Tolerance(1e-4, 0.0, "max"),
    "fp16": Tolerance(U_FP16, 32 * U_FP16, "mean"),
    "bf16": Tolerance(U_BF16, 32 * U_BF16, "mean"),
}


@dataclass(frozen=True)
class ErrorStats:
    """Errors of one output against its reference; ``problem`` names NaN/Inf or a shape mismatch."""

    max_abs: float
    mean_abs: float
    p99_abs: float
    max_rel: float
    mean_rel: float
    p99_rel: float
    needed_atol: float
    passed: bool
    problem: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {k: (v if isinstance(v, (bool, str)) else _num(v)) for k, v in self.__dict__.items()}


def _num(v: float) -> Optional[float]:
    return float(f"{v:.6g}") if np.isfinite(v) else None


def nonfinite(a: np.ndarray) -> str:
    """'' when every value is finite, else e.g. '12 NaN, 0 Inf of 448 values'."""
    a = np.asarray(a)
    if not np.issubdtype(a.dtype, np.floating) or np.isfinite(a).all():
        return ""
    return f"{int(np.isnan(a).sum())} NaN, {int(np.isinf(a).sum())} Inf of {a.size} values"


def compare(out: np.ndarray, ref: np.ndarray, tol: Tolerance) -> ErrorStats:
    """Error statistics of ``out`` against ``ref`` and whether they meet ``tol``."""
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    problem = "" if out.shape == ref.shape else f"shape {out.shape} vs reference {ref.shape}"
    bad = [f"{who}: {msg}" for who, msg in (("output", nonfinite(out)), ("reference", nonfinite(ref))) if msg]
    problem = problem or "; ".join(bad)
    if problem:
        inf = float("inf")
        return ErrorStats(inf, inf, inf, inf, inf, inf, inf, False, problem)
    if out.size == 0:
        return ErrorStats(0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, True)
    err, mag = np.abs(out - ref).ravel(), np.abs(ref).ravel()
    floor = max(REL_FLOOR * float(np.sqrt(np.mean(mag**2))), np.finfo(np.float64).tiny)
    rel = err / np.maximum(mag, floor)
    excess = err - tol.rtol * mag
    needed = max(float(excess.max() if tol.stat == "max" else excess.mean()), 0.0)
    return ErrorStats(
        float(err.max()), float(err.mean()), float(np.quantile(err, 0.99)),
        float(rel.max()), float(rel.mean()), float(np.quantile(rel, 0.99)),
        needed, needed <= tol.atol,
    )


# -- inputs -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    """One set of feeds: ``kind`` "random" or "real", ``batch`` rows."""

    kind: str
    batch: int
    feeds: dict[str, np.ndarray]

    @property
    def label(self) -> str:
        return f"{self.kind} b={self.batch}"


@dataclass(frozen=True)
class RealData:
    """Where real inputs come from: data samples x0 (N, *state) at t = 0 with labels y0 (N,), and
    the reference backbone ``velocity(x, t, cond)`` that turns noised states into (x, v) pairs."""

    x0: np.ndarray
    y0: Optional[np.ndarray]
    velocity: Callable[[np.ndarray, np.ndarray, Optional[np.ndarray]], np.ndarray]


def batches_for(spec: NetSpec, max_batch: int) -> list[int]:
    """Batch 1, a prime batch and the network's maximum batch (deduplicated, in order)."""
    top = spec.batch_range(max_batch)["max"]
    return sorted({1, min(PRIME_BATCH, top), top})


def make_cases(spec: NetSpec, state_shape: tuple[int, ...], num_classes: int, batches: Sequence[int],
               real: Optional[RealData] = None, seed: int = 0) -> list[Case]:
    """Random cases for every batch, plus real ones when ``real`` is given."""
    rng = np.random.default_rng(seed)
    cases = [Case("random", b, random_inputs(spec, state_shape, num_classes, b, rng)) for b in batches]
    if real is not None:
        cases += [Case("real", b, real_inputs(spec, real, num_classes, b, rng)) for b in batches]
    return cases


def real_inputs(spec: NetSpec, real: RealData, num_classes: int, batch: int,
                rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Noised data at the levels :data:`T_LEVELS` (cycled); for the SideNet also the backbone's v
    there and BA probe offsets ``fraction * step`` clipped so that t - h stays in [0, 1]."""
    idx = rng.integers(0, len(real.x0), batch)
    t = np.resize(np.asarray(T_LEVELS, np.float32), batch)
    x0 = real.x0[idx].astype(np.float32)
    noise = rng.standard_normal(x0.shape).astype(np.float32)
    tb = t.reshape(-1, *([1] * (x0.ndim - 1)))
    x = ((1 - tb) * x0 + tb * noise).astype(np.float32)
    if real.y0 is None:
        y = np.full(batch, num_classes, np.int64)
    else:
        y = real.y0[idx].astype(np.int64)
        y[rng.random(batch) < 0.1] = num_classes  # some unconditional rows, as the sampler sends
    feeds = {"x": x, "t": t, "y": y}
    if "v" in spec.inputs:
        feeds["v"] = np.asarray(real.velocity(x, t, {"y": y}), np.float32)
        h = rng.choice(BA_FRACTIONS, batch) * rng.choice(STEP_SIZES, batch)
        feeds["h"] = np.clip(h, -(1.0 - t), t).astype(np.float32)
    return {name: feeds[name] for name in spec.inputs}


# -- reports ----------------------------------------------------------------------------------
@dataclass
class NetworkReport:
    """Parity of one network (one precision, one runtime) against a reference, per case."""

    network: str
    precision: str
    runtime: str
    reference: str
    tolerance: Tolerance
    results: list[tuple[Case, ErrorStats]] = field(default_factory=list)
    note: str = ""

    @property
    def passed(self) -> bool:
        return bool(self.results) and all(s.passed for _, s in self.results)

    def worst(self) -> ErrorStats:
        """Element-wise worst statistics over the cases (``passed`` only if every case passed)."""
        stats = [s for _, s in self.results]
        keys = ("max_abs", "mean_abs", "p99_abs", "max_rel", "mean_rel", "p99_rel", "needed_atol")
        vals = {k: max(getattr(s, k) for s in stats) for k in keys}
        problem = "; ".join(f"{c.label}: {s.problem}" for c, s in self.results if s.problem)
        return ErrorStats(**vals, passed=self.passed, problem=problem)

    def failure(self) -> str:
        """One line naming the worst failing case ('' when it passed)."""
        bad = [(c, s) for c, s in self.results if not s.passed]
        if not bad:
            return ""
        case, s = max(bad, key=lambda cs: cs[1].needed_atol)
        what = s.problem or (f"{self.tolerance.stat} abs error exceeds {self.tolerance.describe()} "
                             f"(needs atol {s.needed_atol:.3g})")
        return f"{self.network} {self.precision} on {self.runtime} vs {self.reference}, {case.label}: {what}"

    def as_dict(self) -> dict[str, Any]:
        return {
            "runtime": self.runtime, "reference": self.reference, "passed": self.passed,
            "tolerance": self.tolerance.__dict__, "note": self.note,
            "worst": self.worst().as_dict() if self.results else None,
            "cases": [{"case": c.label, **s.as_dict()} for c, s in self.results],
        }


def run_report(network: str, precision: str, runtime: str, reference: str, cases: Sequence[Case],
               ref_outputs: Sequence[np.ndarray], run: Callable[[dict], np.ndarray],
               tol: Optional[Tolerance] = None) -> NetworkReport:
    """Run ``run`` on every case and compare with the precomputed reference outputs."""
    report = NetworkReport(network, precision, runtime, reference, tol or TOLERANCES[precision])
    for case, ref in zip(cases, ref_outputs):
        report.results.append((case, compare(run(case.feeds), ref, report.tolerance)))
    return report


def reference_outputs(network: str, run: Callable[[dict], np.ndarray], cases: Sequence[Case],
                      who: str = "torch") -> list[np.ndarray]:
    """Reference outputs; refuses (CheckpointError) a reference that itself yields NaN/Inf."""
    outs = []
    for case in cases:
        out = np.asarray(run(case.feeds))
        bad = nonfinite(out)
        if bad:
            raise CheckpointError(
                f"export refused: the {network}'s {who} output has {bad} on {case.label} inputs; the "
                "checkpoint itself produces non-finite values (fix or retrain it); nothing was written"
            )
        outs.append(out)
    return outs


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """Fixed-width text table; floats in 3 significant digits."""
    def cell(v: Any) -> str:
        if isinstance(v, bool):
            return "PASS" if v else "FAIL"
        if isinstance(v, float):
            return f"{v:.3g}"
        return "-" if v is None else str(v)

    body = [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(b[i]) for b in body)) if body else len(c) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(b, widths)) for b in body]
    return "\n".join(lines)


STAT_COLUMNS = ("max_abs", "mean_abs", "p99_abs", "max_rel", "mean_rel", "p99_rel", "needed_atol")


def report_rows(reports: Sequence[NetworkReport]) -> list[dict[str, Any]]:
    """One table row per report (its worst case), for :func:`format_table`."""
    rows = []
    for r in reports:
        row = {"network": r.network, "precision": r.precision, "runtime": r.runtime, "reference": r.reference,
               "cases": len(r.results), "tolerance": r.tolerance.describe(), "result": r.passed, "note": r.note}
        if r.results:
            row.update({k: getattr(r.worst(), k) for k in STAT_COLUMNS})
        rows.append(row)
    return rows


# -- graph and runtimes -------------------------------------------------------------------------
def check_graph(model: Any, network: str) -> None:
    """``onnx.checker.check_model(full_check=True)``; a failure is a CheckpointError."""
    from .._deps import require

    onnx = require("onnx")
    try:
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise CheckpointError(f"export refused: the {network} ONNX graph fails onnx.checker ({exc})") from None


def ort_runner(model: Any, output: str, threads: int = 1) -> Callable[[dict], np.ndarray]:
    """An onnxruntime CPU session on an in-memory model -> ``run(feeds) -> output``."""
    from .._deps import require

    ort = require("onnxruntime")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return lambda feeds: sess.run([output], feeds)[0]


def onnx_reference_runner(model: Any, output: str) -> Callable[[dict], np.ndarray]:
    """onnx's own pure-python reference evaluator (slow; runs bf16 graphs that ORT CPU cannot)."""
    from .._deps import require

    reference = require("onnx.reference")
    ev = reference.ReferenceEvaluator(model)
    return lambda feeds: np.asarray(ev.run([output], feeds)[0], np.float32)


def torch_runner(module: Any, spec: NetSpec) -> Callable[[dict], np.ndarray]:
    """``run(feeds) -> output`` for a torch module called as ``module(*inputs in spec order)``."""
    from .._deps import require

    torch = require("torch")
    module = module.eval()

    def run(feeds: dict) -> np.ndarray:
        with torch.no_grad():
            out = module(*(torch.from_numpy(np.ascontiguousarray(feeds[n])) for n in spec.inputs))
        return out.numpy()

    return run
