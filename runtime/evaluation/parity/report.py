"""Parity reports: one network (one precision, one runtime) against a reference, per case (torch-free).

``run_report`` runs a ``run(feeds) -> output`` callable on every :class:`~.cases.Case` and compares
it with precomputed reference outputs (:func:`reference_outputs`, which refuses a NaN/Inf
reference); :class:`NetworkReport` keeps the per-case :class:`~.stats.ErrorStats`, its worst case
and a one-line failure; :func:`format_table` / :func:`report_rows` print them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import numpy as np

from ....base.errors import CheckpointError
from .cases import Case
from .stats import STAT_COLUMNS, TOLERANCES, ErrorStats, Tolerance, compare, nonfinite


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
        vals = {k: max(getattr(s, k) for s in stats) for k in STAT_COLUMNS}
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
