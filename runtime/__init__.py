"""Torch-free runtime: solvers over plain callables, on numpy and onnxruntime only.

``from anchorflow.runtime import solve, SOLVERS``. Time convention: t = 1 noise, t = 0 data;
NFE counts backbone calls. This package must never import torch (a test checks it).
"""

from __future__ import annotations

from ..base._lazy import lazy_attributes

from .solving.field import GuidedField, SideNet, Velocity
from .solving.grids import make_grid
from .solving.registry import SOLVERS, SolverSpec, register
from .solving.solvers import get_solver, solver_names
from .solving.result import Result, SolverOutput, StepRecord, Timing
from .solving.solve import solve

# Names served lazily from sub-modules (keeps `import anchorflow.runtime` light).
_LAZY = {
    "FastFlowBandit": ".fastflow.bandit",
    "load_bundle": ".bundles.load",
    "LoadedBundle": ".bundles.load",
    "SamplePlan": ".plan",
    "OrtVelocity": ".bundles.backends",
    "OrtSideNet": ".bundles.backends",
    "load_pipeline": ".pipelines.pipeline",  # pipeline bundles: prompt -> image (runtime/pipelines/pipeline.py)
}


__getattr__ = lazy_attributes(__name__, _LAZY)


__all__ = [
    "GuidedField", "Result", "SOLVERS", "SideNet", "SolverOutput", "SolverSpec", "StepRecord",
    "Timing", "Velocity", "get_solver", "make_grid", "register", "solve", "solver_names",
    *_LAZY,
]
