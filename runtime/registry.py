"""One registry of solvers: the CLI's choices, the benchmark and the docs all read it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from ..errors import ConfigError


@dataclass(frozen=True)
class SolverSpec:
    """A registered solver.

    ``fn(field, x, grid, **options) -> SolverOutput`` runs the method on a GuidedField.
    ``calls_per_step``: backbone calls per grid step (None: variable, e.g. FastFlow, where NFE
    names the grid size instead). ``order``: textbook order (None when not an ODE order).
    """

    name: str
    fn: Callable
    calls_per_step: Optional[int]
    order: Optional[int]
    summary: str
    needs_sidenet: bool = False
    min_nfe: int = 1
    # "steps": nfe // calls_per_step steps; "intervals": N NFE -> N intervals (BA: state reuse);
    # "grid": nfe is the grid size and calls are decided at run time (FastFlow).
    nfe_rule: str = "steps"

    def steps_for_nfe(self, nfe: int) -> int:
        """Grid steps for an NFE budget; refuse a budget this method cannot honour exactly."""
        if isinstance(nfe, bool) or not isinstance(nfe, int) and not hasattr(nfe, "__index__"):
            raise ConfigError(f"nfe must be an integer, got {nfe!r}")
        nfe = int(nfe)
        if nfe < self.min_nfe:
            per_step = f" ({self.calls_per_step} backbone calls per step)" if (self.calls_per_step or 1) > 1 else ""
            raise ConfigError(f"{self.name} needs nfe >= {self.min_nfe}{per_step}, got {nfe}")
        if self.nfe_rule in ("intervals", "grid"):
            return nfe
        k = self.calls_per_step or 1
        if nfe % k:
            lo, hi = nfe - nfe % k, nfe - nfe % k + k
            raise ConfigError(
                f"{self.name} makes {k} backbone calls per step, so nfe must be a multiple of {k} "
                f"(got {nfe}; try {lo if lo >= self.min_nfe else hi} or {hi})"
            )
        return nfe // k


SOLVERS: dict[str, SolverSpec] = {}


def register(
    name: str,
    *,
    calls_per_step: Optional[int],
    order: Optional[int],
    summary: str,
    needs_sidenet: bool = False,
    min_nfe: int = 1,
    nfe_rule: str = "steps",
) -> Callable[[Callable], Callable]:
    """Decorator: add a solver function to :data:`SOLVERS` under ``name``."""

    def deco(fn: Callable) -> Callable:
        if name in SOLVERS:
            raise RuntimeError(f"solver {name!r} registered twice")
        SOLVERS[name] = SolverSpec(name, fn, calls_per_step, order, summary, needs_sidenet, min_nfe, nfe_rule)
        return fn

    return deco


def get_solver(name: str) -> SolverSpec:
    from . import solvers  # noqa: F401  (importing registers every built-in solver)

    try:
        return SOLVERS[name]
    except KeyError:
        known = ", ".join(sorted(SOLVERS))
        raise ConfigError(f"unknown solver {name!r}; known solvers: {known}") from None


def solver_names() -> list[str]:
    from . import solvers  # noqa: F401

    return list(SOLVERS)
