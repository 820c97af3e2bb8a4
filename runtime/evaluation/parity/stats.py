"""Parity statistics and the one table of tolerances (torch-free: numpy only).

Per output: max / mean / p99 absolute and relative error, and the smallest atol that would pass
(Polygraphy's comparator report). Computed here with numpy instead of
polygraphy's ``CompareFunc.simple``: (1) ``anchorflow verify`` runs on torch-free edge installs
(numpy + onnxruntime) where polygraphy, an ``[export]`` extra, is absent, and export and verify must
report the same numbers; (2) polygraphy's relative error divides by ``|ref| + 2e-16`` where the
reference is exactly 0, and the SideNet's delta IS exactly 0 on every h = 0 row by construction,
so its relative statistics would explode; (3) its p99 is only computed when p99 is the checked
statistic, while the report wants max, mean and p99 together.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Optional

import numpy as np

# Relative error is |a - b| / max(|b|, REL_FLOOR * rms(b)): elements far below the tensor's own
# scale (a SideNet delta at h ~ 0) are judged against that scale instead of against ~0.
REL_FLOOR = 1e-3


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
    # quant: int8 Q/DQ backbones (export/quantize.py), mean, relative like fp16. Measured on the
    # digits DiT's int8 variant (`verify --precision int8`, ort-cpu fp32 reference): mean abs error
    # 0.005-0.010 per case (random and real inputs, batch 1..128), mean |ref| ~ 0.3-0.8; the bound
    # 2^-6 + 2^-5 |ref| is 3-4x that, while a wrong scale or a dropped DQ gives O(0.1..1) errors.
    # Quality is the export's guard (end-to-end PSNR), not this table.
    "int8": Tolerance(2.0**-6, 2.0**-5, "mean"),
    # quant: fp8 E4M3 Q/DQ (amax / 448 scales), mean, one E4M3 unit roundoff (2^-4) of |ref| + 2^-5.
    # Measured on the digits DiT, attention + final projection in fp8: mean abs 0.014-0.036 at mean
    # |ref| 0.9-1.7 (pass with >= 2x margin); the MLP layers in fp8 too (5 dB lost end to end) fail
    # at t = 0.018 (mean abs 0.118 at |ref| 0.87).
    "fp8": Tolerance(2.0**-5, 2.0**-4, "mean"),
}


def tolerance(precision: str, atol: Optional[float] = None, rtol: Optional[float] = None,
              factor: float = 1.0) -> Tolerance:
    """The table's tolerance for ``precision``, with ``atol`` / ``rtol`` overrides, scaled by ``factor``."""
    tol = TOLERANCES[precision]
    tol = replace(tol, atol=tol.atol if atol is None else atol, rtol=tol.rtol if rtol is None else rtol)
    return replace(tol, atol=tol.atol * factor, rtol=tol.rtol * factor)


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


STAT_COLUMNS = ("max_abs", "mean_abs", "p99_abs", "max_rel", "mean_rel", "p99_rel", "needed_atol")


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
