"""anchorflow inside diffusers pipelines (extra ``anchorflow[diffusers]``).

- :class:`AnchorflowScheduler`: every single-call solver of the registry (euler, ab2, ipndm,
  dpmpp2m, ...) as a drop-in ``pipe.scheduler`` for flow-matching pipelines (SD3, FLUX, ...).
- :func:`apply_fastflow`: FastFlow's bandit step skipping as a hook on ``pipe.transformer``.
- :func:`run_ba`: the BA-solver driving a pipeline's own components.
- :func:`capture_pipeline`: a pipeline's transformer as a runtime ``velocity(x, t, cond)`` callable.

Time convention: diffusers' sigma is our t (t = 1 noise, t = 0 data); ``timestep = 1000 * sigma``.
Importing this package is cheap; diffusers and torch are imported on first use of a name.
"""

from __future__ import annotations

from ...base._lazy import lazy_attributes

_LAZY = {
    "AnchorflowScheduler": ".scheduler",
    "scheduler_solvers": ".scheduler",
    "capture_pipeline": ".capture",
    "PipelineField": ".capture",
    "apply_fastflow": ".fastflow_hook",
    "FastFlowHook": ".fastflow_hook",
    "run_ba": ".ba",
}

__getattr__ = lazy_attributes(__name__, _LAZY)

__all__ = list(_LAZY)
