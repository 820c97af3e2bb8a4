"""Built-in solvers; importing this package registers each of them in ``SOLVERS``.

The look-ups live here (not in :mod:`..registry`, which the solver modules import to register
themselves) so the registry never imports the solvers: no import cycle.
"""

from __future__ import annotations

from ....base.errors import ConfigError
from ..registry import SOLVERS, SolverSpec
from . import (  # noqa: F401,I001  (registration order = listing order)
    classic, multistep, unipc, ba, fastflow_loop as fastflow, inverse)


def get_solver(name: str) -> SolverSpec:
    """The registered solver ``name``; a :class:`ConfigError` naming the known ones otherwise."""
    try:
        return SOLVERS[name]
    except KeyError:
        known = ", ".join(sorted(SOLVERS))
        raise ConfigError(f"unknown solver {name!r}; known solvers: {known}") from None


def solver_names() -> list[str]:
    """Every registered solver's name, in registration order."""
    return list(SOLVERS)


def max_sidenet_offsets() -> int:
    """The most SideNet offsets any registered solver batches into one call (by default: ba's merged
    probe, 4). Export and engine profiles size the SideNet's rows from it."""
    return max((s.sidenet_offsets for s in SOLVERS.values()), default=0)


def rows_note() -> str:
    """Why a network sees more rows than samples, from the registry (for messages and help texts)."""
    return (f"guidance doubles the rows, the BA SideNet's merged probe multiplies them by {max_sidenet_offsets()} "
            "offsets")
