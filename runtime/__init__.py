"""Torch-free runtime: solvers over plain callables, on numpy and onnxruntime only.

``from anchorflow.runtime import solve, SOLVERS``. Time convention: t = 1 noise, t = 0 data;
NFE counts backbone calls. This package must never import torch (a test checks it).
"""

from __future__ import annotations

from .._lazy import lazy_attributes

from .field import GuidedField, SideNet, Velocity
from .grids import make_grid
from .registry import SOLVERS, SolverSpec, register
from .solvers import get_solver, solver_names
from .result import Result, SolverOutput, StepRecord, Timing
from .solve import solve

# Names served lazily from sub-modules (keeps `import anchorflow.runtime` light).
_LAZY = {
    "FastFlowBandit": ".bandit",
    "load_bundle": ".bundle",
    "LoadedBundle": ".bundle",
    "SamplePlan": ".plan",
    "OrtVelocity": ".backends",
    "OrtSideNet": ".backends",
    "load_pipeline": ".pipeline",  # pipeline bundles: prompt -> image (runtime/pipeline.py)
}


__getattr__ = lazy_attributes(__name__, _LAZY)


__all__ = [
    "GuidedField", "Result", "SOLVERS", "SideNet", "SolverOutput", "SolverSpec", "StepRecord",
    "Timing", "Velocity", "get_solver", "make_grid", "register", "solve", "solver_names",
    *_LAZY,
]
