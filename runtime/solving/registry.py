"""One registry of solvers: the CLI's choices, the benchmark and the docs all read it.

Pure data: :data:`SOLVERS` and :func:`register`. Look solvers up through :mod:`anchorflow.runtime.solving.solvers`
(``get_solver``, ``solver_names``, ``max_sidenet_offsets``), which imports every built-in solver
module first; this module imports none of them, so no import cycle runs through it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from ...base.errors import ConfigError


@dataclass(frozen=True)
class SolverSpec:
    """A registered solver.

    ``fn(field, x, grid, **options) -> SolverOutput`` runs the method on a GuidedField.
    ``calls_per_step``: backbone calls per grid step (None: variable, e.g. FastFlow, where NFE
    names the grid size instead). ``last_calls``: calls of the final step when it differs
    (Heun and RK4 take an Euler last step, as k-diffusion and EDM do: 1 call, none at t = 0).
    ``order``: textbook order (None when not an ODE order).

    Free calls: with a cached first call (``first_call="cached"``) the solver's first backbone
    call, at t = 1, costs nothing, so the same budget buys more steps; ``free_calls`` below
    counts such calls.
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
    last_calls: Optional[int] = None
    # most SideNet offsets in one call (rows = offsets x guidance rows x samples); 0: no SideNet
    sidenet_offsets: int = 0

    def nfe_for_steps(self, steps: int, free_calls: int = 0) -> int:
        """Backbone calls the method makes on a grid of ``steps`` steps (minus the free ones)."""
        if self.nfe_rule in ("intervals", "grid"):
            return int(steps) - free_calls
        k = self.calls_per_step or 1
        last = k if self.last_calls is None else self.last_calls
        return k * (int(steps) - 1) + last - free_calls

    def steps_for_nfe(self, nfe: int, free_calls: int = 0) -> int:
        """Grid steps for an NFE budget; refuse a budget this method cannot honour exactly."""
        if isinstance(nfe, bool) or not isinstance(nfe, int) and not hasattr(nfe, "__index__"):
            raise ConfigError(f"nfe must be an integer, got {nfe!r}")
        nfe = int(nfe)
        if free_calls and self.nfe_rule == "grid":
            raise ConfigError(f"{self.name} decides its calls at run time; it has no cached first call")
        least = max(1, self.min_nfe - free_calls)
        if nfe < least:
            per_step = f" ({self.calls_per_step} backbone calls per step)" if (self.calls_per_step or 1) > 1 else ""
            raise ConfigError(f"{self.name} needs nfe >= {least}{per_step}, got {nfe}")
        if self.nfe_rule in ("intervals", "grid"):
            return nfe + free_calls
        k = self.calls_per_step or 1
        base = self.nfe_for_steps(1, free_calls)
        rest = nfe - base
        if rest % k:
            lo, hi = nfe - rest % k, nfe - rest % k + k
            how = f"{k} backbone calls per step" + ("" if self.last_calls is None else
                                                    f" and {self.last_calls} in its last (Euler) step")
            first = base + k * max(0, -(-(least - base) // k))
            rule = (f"a multiple of {k}" if base % k == 0 else
                    f"one of {', '.join(str(first + k * j) for j in range(3))}, ...")
            raise ConfigError(f"{self.name} makes {how}, so nfe must be {rule} "
                              f"(got {nfe}; try {lo if lo >= least else hi} or {hi})")
        return rest // k + 1


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
    last_calls: Optional[int] = None,
    sidenet_offsets: int = 0,
) -> Callable[[Callable], Callable]:
    """Decorator: add a solver function to :data:`SOLVERS` under ``name``."""

    def deco(fn: Callable) -> Callable:
        if name in SOLVERS:
            raise RuntimeError(f"solver {name!r} registered twice")
        SOLVERS[name] = SolverSpec(name, fn, calls_per_step, order, summary, needs_sidenet, min_nfe, nfe_rule, last_calls,
                                   sidenet_offsets)
        return fn

    return deco
