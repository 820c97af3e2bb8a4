"""What every solver returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

import numpy as np


@dataclass(frozen=True)
class StepRecord:
    """One step (interval) of a solve: from ``t_start`` down to ``t_end``.

    ``calls`` and ``sidenet_calls`` count what this step spent; ``info`` holds method-specific
    facts (e.g. FastFlow's ``skipped`` / ``arm``).
    """

    index: int
    t_start: float
    t_end: float
    calls: int
    sidenet_calls: int = 0
    info: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Timing:
    """Wall-clock split of one solve, in seconds; ``overhead`` is everything but the networks."""

    total_s: float
    backbone_s: float
    sidenet_s: float

    @property
    def overhead_s(self) -> float:
        return max(self.total_s - self.backbone_s - self.sidenet_s, 0.0)


@dataclass(frozen=True)
class Result:
    """A generated batch and what it cost.

    ``x`` (B, ...) the samples at t = 0; ``nfe`` backbone calls actually made (CFG rows in one
    call count once); ``sidenet_calls`` SideNet calls; ``steps`` per-step records; ``grid`` the
    time grid used (t = 1 noise -> t = 0 data).
    """

    x: np.ndarray
    nfe: int
    sidenet_calls: int
    steps: tuple[StepRecord, ...]
    method: str
    grid: np.ndarray
    timing: Timing
    info: Mapping[str, Any] = field(default_factory=dict)
    # -- per-sample error estimate, (B,) float64 in the units of the state, or None
    # for a solver without a free companion (runtime/solving/estimate.py says how each solver makes it)
    error_estimate: Optional[np.ndarray] = None


@dataclass
class SolverOutput:
    """What a solver function returns to :func:`anchorflow.runtime.solve` (which adds counts and timing)."""

    x: np.ndarray
    steps: list[StepRecord]
    info: dict = field(default_factory=dict)
    error_estimate: Optional[np.ndarray] = None  # (B,), see runtime/solving/estimate.py
