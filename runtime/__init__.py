"""Torch-free runtime: solvers over plain callables, on numpy and onnxruntime only.

``from anchorflow.runtime import solve, SOLVERS``. Time convention: t = 1 noise, t = 0 data;
NFE counts backbone calls. This package must never import torch (a test checks it).
"""

from __future__ import annotations

import importlib
from typing import Any

from .field import GuidedField, SideNet, Velocity
from .grids import make_grid
from .registry import SOLVERS, SolverSpec, get_solver, register, solver_names
from .result import Result, SolverOutput, StepRecord, Timing
from .solve import solve

# Names served lazily from sub-modules (keeps `import anchorflow.runtime` light).
_LAZY = {
    "FastFlowBandit": ".fastflow",
    "load_bundle": ".bundle",
    "LoadedBundle": ".bundle",
    "OrtVelocity": ".backends",
    "OrtSideNet": ".backends",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "GuidedField", "Result", "SOLVERS", "SideNet", "SolverOutput", "SolverSpec", "StepRecord",
    "Timing", "Velocity", "get_solver", "make_grid", "register", "solve", "solver_names",
    *_LAZY,
]
