"""The reference solution every solver is scored against, and how exact it is.

``rk4:N``: plain classic RK4 on N uniform steps (4 N calls, no Euler last step); ``dopri5[:TOL]``: adaptive Dormand-Prince
5(4) at rtol = atol = TOL (the runtime's ``DOPRI5`` tableau driven by ``adaptive_solve``). Both
integrate in float64 states from t = 1 (noise) to t = 0 (data); the model still sees float32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from ..runtime.evaluation import metrics as M
from .plan import parse_reference


def _f64(velocity: Callable) -> Callable:
    """A velocity that takes float64 states (cast to float32 for the model) and returns float64."""

    def v(x: np.ndarray, t: np.ndarray, cond) -> np.ndarray:
        return np.asarray(velocity(x.astype(np.float32), t.astype(np.float32), cond), np.float64)

    return v


@dataclass(frozen=True)
class Guidance:
    """The guidance setup a reference is solved under: a sampling plan's conditions and null rows
    (:meth:`of`), or class labels y (B,) with the null label."""

    y: Optional[np.ndarray]
    cfg: float
    cfg_interval: tuple[float, float]
    null_label: Optional[int]
    cond: Optional[dict] = None
    null_cond: Optional[dict] = None

    @classmethod
    def of(cls, plan) -> "Guidance":
        """The guidance of a :class:`~anchorflow.runtime.plan.SamplePlan` (its checked conditions)."""
        return cls(None, plan.cfg_scale, plan.cfg_interval, None, plan.cond,
                   None if plan.null_cond is None else dict(plan.null_cond))

    def solve_kwargs(self) -> dict:
        if self.cond is not None:
            return dict(cond=self.cond, null_cond=self.null_cond, cfg_scale=self.cfg, cfg_interval=self.cfg_interval)
        return dict(y=self.y, cfg_scale=self.cfg, cfg_interval=self.cfg_interval, null_label=self.null_label)


def _solve_once(velocity: Callable, noise: np.ndarray, g: Guidance, method: str, arg: float) -> tuple[np.ndarray, int]:
    """One reference solve: (x at t = 0 (float64), backbone calls)."""
    from ..runtime import GuidedField
    from ..runtime.solving.grids import uniform
    from ..runtime.solving.solvers.classic import DOPRI5, RK4, adaptive_solve, fixed_step_solve

    vel, x64 = _f64(velocity), noise.astype(np.float64)
    field = GuidedField(vel, x64.shape[0], dtype=np.float64, **g.solve_kwargs())
    if method == "rk4":  # plain RK4 on every step (4 N calls), the last one included
        return fixed_step_solve(field, x64, uniform(int(arg)), RK4), field.nfe
    x, _ = adaptive_solve(field, x64, DOPRI5, rtol=arg, atol=arg)
    return x, field.nfe


def reference_solution(model, noise, y, cfg: float, cfg_interval, reference: str,
                       self_check: bool = True, guidance: Optional[Guidance] = None) -> tuple[np.ndarray, dict]:
    """The reference samples (float64) and a record of how they were made and how exact they are.

    The self-check solves again with half the steps (RK4) or a tenfold looser tolerance
    (Dormand-Prince) and reports the RMSE / PSNR between the two solves: that is the error of
    the COARSER solve. For RK4 (order 4) the reference's own error is about 1/15 of it
    (Richardson: e(N/2) - e(N) ~ (16 - 1) e(N)), recorded as ``reference_error`` (RK4 only).
    ``self_check=False`` skips the second solve (the record says so).
    """
    method, arg = parse_reference(reference)
    g = guidance or Guidance(y, float(cfg), tuple(cfg_interval), model.meta.get("null_label"))
    x, nfe = _solve_once(model.velocity, noise, g, method, arg)
    info = {"method": reference, "cfg": cfg, "nfe": int(nfe)}
    if not self_check:
        return x, info | {"self_check": None}
    check_arg = arg // 2 if method == "rk4" else arg * 10
    x_chk, _ = _solve_once(model.velocity, noise, g, method, check_arg)
    label = f"rk4:{int(check_arg)} vs rk4:{int(arg)}" if method == "rk4" else f"dopri5:{check_arg:g} vs dopri5:{arg:g}"
    from .evaluate import data_range

    rmse, psnr = M.rmse(x_chk, x), M.psnr(x_chk, x, data_range(model, x))
    info["self_check"] = {"compare": label, "rmse": rmse, "psnr": psnr}
    if method == "rk4":  # the check measures the coarse solve; the reference errs ~15x less (order 4)
        info["reference_error"] = {"rmse_estimate": rmse / 15.0, "psnr_estimate": psnr + 20.0 * math.log10(15.0),
                                   "how": f"Richardson: |rk4:{int(check_arg)} - rk4:{int(arg)}| / (2^4 - 1)"}
    return x, info
