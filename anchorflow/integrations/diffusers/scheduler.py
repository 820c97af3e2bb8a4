"""``AnchorflowScheduler``: the runtime's single-call solvers as a diffusers flow-matching scheduler.

It is a :class:`diffusers.FlowMatchEulerDiscreteScheduler` (same config, same sigmas: the
pipeline's ``num_inference_steps``, ``sigmas``, ``shift`` and FLUX's dynamic shift ``mu`` are
honoured exactly) whose ``step`` runs a solver of our registry instead of Euler.

The maths is not re-derived here: ``step`` k replays the registered solver function
(``anchorflow.runtime.SOLVERS[name].fn``) on the sigma grid from the first step's sample, feeding
it the k + 1 model outputs seen so far, and stops it when it asks for the next velocity; the state
it holds then is the next sample. The replay costs O(k) array updates per step (no model calls),
negligible next to a transformer call.

Time: diffusers' sigma is our t (t = 1 noise, t = 0 data); ``timestep = num_train_timesteps * sigma``;
the model output is the velocity ``dx/dt`` (diffusers' flow-matching convention ``noise - x0``).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import numpy as np

from ...base._deps import require
from ...base.errors import ConfigError
from ...runtime.solving.field import GuidedField
from ...runtime.solving.grids import check_grid, make_grid
from ...runtime.solving.registry import SolverSpec
from ...runtime.solving.solvers import get_solver, solver_names
from ...runtime.solving.solve import _check_options

torch = require("torch", extra="diffusers", purpose="the diffusers integration")
_diffusers = require("diffusers", extra="diffusers", purpose="the diffusers integration")
from diffusers.configuration_utils import register_to_config  # noqa: E402
# A saved pipeline names this module as the scheduler's library (model_index.json); diffusers'
# ``from_pretrained`` then looks up the loadable base classes ON this module (``SchedulerMixin`` ->
# ``from_pretrained``), so it must expose them for a pipeline saved with it to load back.
from diffusers.schedulers.scheduling_utils import SchedulerMixin  # noqa: E402,F401
from diffusers.schedulers.scheduling_flow_match_euler_discrete import (  # noqa: E402
    FlowMatchEulerDiscreteScheduler,
    FlowMatchEulerDiscreteSchedulerOutput,
)


def scheduler_solvers() -> list[str]:
    """Registry solvers a scheduler can run: one backbone call per step, no SideNet, fixed steps."""
    return [n for n in solver_names() if _fits(get_solver(n))]


def _fits(spec: SolverSpec) -> bool:
    # fireflow reuses a midpoint (N calls for N - 1 steps): its budget is not one call per scheduler step
    return spec.calls_per_step == 1 and not spec.needs_sidenet and spec.nfe_rule == "steps" and spec.name != "fireflow"


class _Pause(Exception):
    """Raised by the replay velocity when the solver asks for a velocity not yet computed."""

    def __init__(self, x: np.ndarray) -> None:
        super().__init__("replay paused")
        self.x = x


def replay(spec: SolverSpec, x0: np.ndarray, grid: np.ndarray, velocities: Sequence[np.ndarray],
           options: dict) -> np.ndarray:
    """Run ``spec`` from ``x0`` on ``grid`` with the given velocities; the state after the last one.

    ``velocities[j]`` answers the solver's j-th velocity request. Returns the state at which it
    makes request ``len(velocities)`` (the next sample), or its final state after the last step.
    """
    count = [0]

    def velocity(x: np.ndarray, t: np.ndarray, y: Any) -> np.ndarray:
        j = count[0]
        if j == len(velocities):
            raise _Pause(x)
        count[0] += 1
        return velocities[j]

    field = GuidedField(velocity, x0.shape[0], dtype=x0.dtype)
    try:
        return spec.fn(field, x0.copy(), grid, **options).x
    except _Pause as pause:
        return pause.x


def _to_numpy(a: "torch.Tensor") -> np.ndarray:
    a = a.detach()
    dtype = torch.float64 if a.dtype == torch.float64 else torch.float32
    return a.to(device="cpu", dtype=dtype).numpy()


def _same(sample: "torch.Tensor", last: Optional["torch.Tensor"]) -> bool:
    """Is ``sample`` this scheduler's previous output (up to the pipeline's dtype cast)?"""
    return last is not None and sample.shape == last.shape and torch.equal(sample.to(last.device, last.dtype), last)


class AnchorflowScheduler(FlowMatchEulerDiscreteScheduler):
    """A flow-matching scheduler that steps with an anchorflow solver (default AB2).

    Args:
        solver: a single-call registry solver (:func:`scheduler_solvers`: euler, ab2, ipndm,
            dpmpp2m, ...).
        grid: None (default): the pipeline's sigmas (shift, dynamic shift, custom ``sigmas``, as
            diffusers computes them). Else an anchorflow grid ("uniform", "shift:S", or an
            explicit decreasing list of ``num_inference_steps + 1`` times from 1 to 0) that
            replaces the pipeline's sigmas (its ``mu`` is then ignored).
        solver_options: options of the solver (e.g. ``{"order": 3}`` for ipndm).
        The other arguments are :class:`FlowMatchEulerDiscreteScheduler`'s, so
        ``AnchorflowScheduler.from_config(pipe.scheduler.config, solver="ab2")`` keeps a
        pipeline's shift settings. ``stochastic_sampling`` and ``per_token_timesteps`` are refused.

    The pipeline's latents must be this scheduler's own outputs between steps; when a pipeline
    changes them (inpainting blends), the solver restarts from the changed sample (history lost,
    exact for Euler). Internal state is float32 (float64 for float64 models), whatever the
    latents' dtype.
    """

    _compatibles = ["FlowMatchEulerDiscreteScheduler"]
    order = 1

    @register_to_config
    def __init__(
        self,
        solver: str = "ab2",
        grid: Union[None, str, Sequence[float]] = None,
        solver_options: Optional[dict] = None,
        num_train_timesteps: int = 1000,
        shift: float = 1.0,
        use_dynamic_shifting: bool = False,
        base_shift: Optional[float] = 0.5,
        max_shift: Optional[float] = 1.15,
        base_image_seq_len: int = 256,
        max_image_seq_len: int = 4096,
        invert_sigmas: bool = False,
        shift_terminal: Optional[float] = None,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        time_shift_type: str = "exponential",
        stochastic_sampling: bool = False,
    ) -> None:
        spec = get_solver(solver)
        if not _fits(spec):
            raise ConfigError(
                f"solver {solver!r} cannot run as a scheduler (it needs {spec.calls_per_step or 'a variable number of'} "
                f"calls per step{' and a SideNet' if spec.needs_sidenet else ''}); schedulers run one of: "
                f"{', '.join(scheduler_solvers())}. For ba use anchorflow.integrations.diffusers.run_ba, "
                "for fastflow apply_fastflow"
            )
        if stochastic_sampling:
            raise ConfigError("AnchorflowScheduler integrates the ODE; stochastic_sampling=True is not supported")
        if invert_sigmas:
            raise ConfigError("AnchorflowScheduler needs sigmas from noise to data; invert_sigmas=True is not supported")
        options = dict(solver_options or {})
        _check_options(spec.name, spec.fn, options)
        super().__init__(
            num_train_timesteps=num_train_timesteps, shift=shift, use_dynamic_shifting=use_dynamic_shifting,
            base_shift=base_shift, max_shift=max_shift, base_image_seq_len=base_image_seq_len,
            max_image_seq_len=max_image_seq_len, invert_sigmas=invert_sigmas, shift_terminal=shift_terminal,
            use_karras_sigmas=use_karras_sigmas, use_exponential_sigmas=use_exponential_sigmas,
            use_beta_sigmas=use_beta_sigmas, time_shift_type=time_shift_type,
            stochastic_sampling=stochastic_sampling,
        )
        if isinstance(grid, str):
            make_grid(2, grid)  # refuse a bad spec now, not mid-pipeline
        elif grid is not None:
            check_grid(grid)
        self._spec = spec
        self._options = options
        self._reset_history()

    @classmethod
    def from_config(cls, config: Any = None, return_unused_kwargs: bool = False, **kwargs: Any) -> Any:
        """diffusers' ``from_config``; a DPM-Solver flow config (Sana: ``use_flow_sigmas``,
        ``flow_shift``) keeps its shift as ``shift``."""
        config = dict(config or {})
        if config.get("use_flow_sigmas") and "flow_shift" in config and "shift" not in config:
            config["shift"] = config["flow_shift"]
        return super().from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)

    # -- grid ---------------------------------------------------------------------------------
    def set_timesteps(self, num_inference_steps: Optional[int] = None, device: Any = None,
                      sigmas: Optional[list] = None, mu: Optional[float] = None,
                      timesteps: Optional[list] = None) -> None:
        """diffusers' sigmas (shift / ``mu`` / ``sigmas``), or ``config.grid`` when one is set."""
        grid = self.config.grid
        if grid is None:
            super().set_timesteps(num_inference_steps, device, sigmas=sigmas, mu=mu, timesteps=timesteps)
        else:
            steps = num_inference_steps or len(sigmas if sigmas is not None else timesteps or ())
            g = make_grid(int(steps), grid)
            self.num_inference_steps = len(g) - 1
            self.sigmas = torch.tensor(g, dtype=torch.float32, device=device)
            self.timesteps = self.sigmas[:-1] * self.config.num_train_timesteps
            self._step_index = None
            self._begin_index = None
        self._reset_history()

    def _reset_history(self) -> None:
        self._x0: Optional[np.ndarray] = None
        self._start = 0
        self._velocities: list[np.ndarray] = []
        self._last: Optional["torch.Tensor"] = None

    def anchorflow_grid(self) -> np.ndarray:
        """The time grid (float64, T + 1 times, decreasing to 0) the solver runs on."""
        return self.sigmas.detach().to("cpu", torch.float64).numpy()

    # -- stepping -----------------------------------------------------------------------------
    def step(self, model_output: "torch.Tensor", timestep: Any, sample: "torch.Tensor",
             s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0,
             generator: Any = None, per_token_timesteps: Any = None, return_dict: bool = True):
        """One solver step from ``sample`` at sigma_k with velocity ``model_output`` (same shape)."""
        if per_token_timesteps is not None:
            raise ConfigError("AnchorflowScheduler does not support per_token_timesteps")
        if isinstance(timestep, int) or (torch.is_tensor(timestep) and not timestep.is_floating_point()):
            raise ConfigError("pass one of scheduler.timesteps to step(), not an integer index")
        if self.step_index is None:
            self._init_step_index(timestep)
        k = self.step_index
        if self._x0 is None or not _same(sample, self._last):
            self._x0, self._start, self._velocities = _to_numpy(sample), k, []  # (re)start the solver here
        v = _to_numpy(model_output).astype(self._x0.dtype, copy=False)
        if v.shape != self._x0.shape:
            raise ConfigError(f"model_output has shape {tuple(v.shape)} but the sample has {self._x0.shape}")
        self._velocities.append(v)
        grid = self.anchorflow_grid()[self._start:]
        x = replay(self._spec, self._x0, grid, self._velocities, self._options)
        prev = torch.from_numpy(np.ascontiguousarray(x)).to(device=sample.device, dtype=model_output.dtype)
        self._last = prev
        self._step_index += 1
        if not return_dict:
            return (prev,)
        return FlowMatchEulerDiscreteSchedulerOutput(prev_sample=prev)
