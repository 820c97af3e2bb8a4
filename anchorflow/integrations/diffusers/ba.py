"""``run_ba``: the BA-solver driving a diffusers pipeline, in ONE run of the pipeline's own loop.

A scheduler only ever sees the guided velocity; BA needs the raw per-row velocities (its SideNet
corrects the unguided field, then guidance is applied per quadrature node), so BA cannot be a plain
scheduler. Instead the pipeline runs once, as it always does (its prompt encoding, latents, progress
bar, ``callback_on_step_end`` and decoding are its own): a hook on the transformer records each real
call's raw rows, and the pipeline's ``scheduler.step`` is replaced for that run by one BA step. Step k
replays the runtime's ``solve("ba")`` on the k + 1 recorded velocities (SideNet outputs memoised, so
each SideNet call is made once) and stops where the solver asks for its next backbone velocity; the
state it asks at is what ``step`` returns, so the pipeline's next transformer call computes exactly
that velocity. N NFE = N steps = N transformer calls (FLUX's true CFG: 2 per step, one per branch).

Between steps the pipeline's latents are therefore the point BA evaluates next (its predictor),
not its corrected state; after the last step they are BA's result. A callback that changes the
latents is refused (ConfigError): BA's state and history cannot be replaced mid-run.

BA integrates (B, C, H, W) latents, the layout of the SideNet ``anchorflow train sidenet`` makes and
of the bundle ``anchorflow export`` writes (FLUX's 2x2-packed tokens are unpacked for the solver and
packed back for the pipeline). Time: sigma = t, 1 noise -> 0 data.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Optional

import numpy as np

from ...base._deps import require
from ...base.errors import ConfigError
from ...runtime.solving.grids import check_grid, make_grid
from ...runtime.solving.result import Result, Timing
from ...runtime.solving.solve import solve
from ...runtime.solving.solvers import get_solver
from .capture import PipelineField, _build, keywords, pack, unpack


def run_ba(pipe: Any, sidenet: Callable, nfe: int, *, solver: str = "ba", grid: Any = None,
           solver_options: dict | None = None, **pipeline_inputs: Any) -> Any:
    """Generate with the BA-solver in ``nfe`` transformer calls; returns the pipeline's own output.

    Args:
        pipe: a flow-matching diffusers pipeline (SD3, FLUX, ...).
        sidenet: the runtime SideNet ``sidenet(x, v, t, h, cond) -> delta`` trained for this transformer
            (e.g. ``load_bundle(path).sidenet``); it sees (B, C, H, W) latents (FLUX's packed
            tokens unpacked, as ``anchorflow train sidenet`` and ``export`` lay them out) and the
            conditions of :class:`PipelineField`.
        nfe: transformer calls (= BA intervals = the pipeline's steps; its schedule is built for
            ``nfe`` steps, its shift and FLUX's ``mu`` included).
        solver: "ba" or another SideNet solver of the registry ("ba-single").
        grid: None (the pipeline's sigmas) or an anchorflow grid ("uniform", "shift:S", a list of
            nfe + 1 times) that replaces the scheduler's sigmas for this run.
        solver_options: options of the solver (e.g. ``{"a": 1/3}``).
        pipeline_inputs: the pipeline's arguments (``prompt_embeds``, ``guidance_scale``, ``height``,
            ``generator``, ``output_type``, ``callback_on_step_end``, ...); ``num_inference_steps``
            is set from ``nfe``.

    The output has an ``anchorflow`` attribute: the runtime :class:`~anchorflow.runtime.Result`
    (``nfe``, ``sidenet_calls``, ``steps``, ``timing`` of the real calls; ``x`` (B, C, H, W)
    latents, FLUX's unpacked); with ``return_dict=False`` the Result is the tuple's last item.
    """
    if "num_inference_steps" in pipeline_inputs:
        raise ConfigError("run_ba sets num_inference_steps from nfe; drop it")
    spec = get_solver(solver)
    if not spec.needs_sidenet or spec.calls_per_step != 1:
        raise ConfigError(f"run_ba runs the SideNet solvers (ba, ba-single); {solver!r} is not one: "
                          "use AnchorflowScheduler for single-call solvers")
    nfe = int(nfe)
    steps = spec.steps_for_nfe(nfe, 0)  # refuses a budget the solver cannot honour, before any work
    if grid is not None:
        grid = make_grid(steps, grid) if isinstance(grid, str) else np.asarray(check_grid(grid), np.float64)
    driver = _Driver(pipe, sidenet, solver, nfe, dict(solver_options or {}), pipeline_inputs)
    with driver.installed(grid):
        out = pipe(**pipeline_inputs, num_inference_steps=steps)
    res = driver.result()
    if isinstance(out, tuple):
        return (*out, res)
    out.anchorflow = res
    return out


class _Pause(Exception):
    """Raised by the replay velocity when the solver asks for a velocity not computed yet."""

    def __init__(self, x: np.ndarray) -> None:
        super().__init__("replay paused")
        self.x = x


class _Driver:
    """The state of one run_ba call: recorded transformer calls, velocities, memoised SideNet outputs."""

    def __init__(self, pipe: Any, sidenet: Callable, solver: str, nfe: int, options: dict, inputs: dict) -> None:
        self.torch = require("torch", extra="diffusers")
        self.pipe, self.sidenet, self.solver, self.nfe = pipe, sidenet, solver, nfe
        self.options, self.inputs = options, inputs
        self.step_calls: list[tuple[dict, Any]] = []  # this step's transformer calls (kwargs, output)
        self.field: Optional[PipelineField] = None
        self.k = 0  # steps done
        self.x0, self.velocities = None, []
        self.side_cache: list[Any] = []
        self.last: Any = None  # the sample this driver handed the pipeline last
        self.res: Optional[Result] = None
        self.backbone_s = self.sidenet_s = 0.0
        self.t_begin = time.perf_counter()

    # -- installation -------------------------------------------------------------------------
    def installed(self, grid: Optional[np.ndarray]) -> Any:
        import contextlib

        from diffusers.hooks import HookRegistry, ModelHook

        driver, torch = self, self.torch

        class _Record(ModelHook):
            def new_forward(self, module: Any, *args: Any, **kwargs: Any) -> Any:
                start = time.perf_counter()
                out = self.fn_ref.original_forward(*args, **kwargs)
                driver.backbone_s += time.perf_counter() - start
                sample = out[0] if isinstance(out, tuple) else out.sample
                driver.step_calls.append((keywords(args, kwargs), sample.detach()))
                return out

        @contextlib.contextmanager
        def manager():
            sched = self.pipe.scheduler
            registry = HookRegistry.check_if_exists_or_initialize(self.pipe.transformer)
            registry.register_hook(_Record(), "anchorflow_run_ba")
            sched.step = self.step
            if grid is not None:
                original = sched.set_timesteps

                def set_timesteps(*a: Any, **kw: Any) -> None:
                    original(*a, **kw)
                    device = sched.sigmas.device
                    sched.sigmas = torch.tensor(grid, dtype=torch.float32, device=device)
                    sched.timesteps = sched.sigmas[:-1] * sched.config.num_train_timesteps
                    sched.num_inference_steps = len(grid) - 1

                sched.set_timesteps = set_timesteps
            self.t_begin = time.perf_counter()
            try:
                yield
            finally:
                del sched.step
                if grid is not None:
                    del sched.set_timesteps
                registry.remove_hook("anchorflow_run_ba", recurse=False)
        return manager()

    # -- one pipeline step ----------------------------------------------------------------------
    def step(self, model_output: Any, timestep: Any, sample: Any, *a: Any, **kw: Any) -> Any:
        torch = self.torch
        calls, self.step_calls = self.step_calls, []
        if not calls:
            raise ConfigError("the pipeline called scheduler.step without calling its transformer; "
                              "run_ba supports pipelines that call the transformer every step")
        if self.field is None:  # the first step: prompts, guidance, grid and timestep scaling, as the pipeline made them
            self.field = _build(self.pipe, self.inputs, [(c, o) for c, o in calls],
                                dict(model_output=model_output, timestep=timestep, sample=sample), torch, live=True)
            self.grid = self.field.grid
        f = self.field
        if len(calls) != f.calls_per_step:
            raise ConfigError(f"the pipeline made {len(calls)} transformer calls at step {self.k}, "
                              f"{f.calls_per_step} at the first")
        if self.x0 is None:
            self.x0 = self._latent(sample)
        elif not _same(sample, self.last, torch):
            raise ConfigError(f"the latents changed between steps {self.k - 1} and {self.k} (a callback returning "
                              "latents?); BA's state cannot be changed mid-run: change them before or after run_ba")
        self.velocities.append(self._raw(calls))
        self.k += 1
        x = self._replay()
        x = pack(x) if f.packed else x
        prev = torch.from_numpy(np.ascontiguousarray(x)).to(sample.device, sample.dtype)
        self.last = prev
        if not kw.get("return_dict", True):
            return (prev,)
        from diffusers.schedulers.scheduling_flow_match_euler_discrete import FlowMatchEulerDiscreteSchedulerOutput

        return FlowMatchEulerDiscreteSchedulerOutput(prev_sample=prev)

    def _latent(self, a: Any) -> np.ndarray:
        x = a.detach().to("cpu", self.torch.float32).numpy()
        return unpack(x, self.field.latent_shape) if self.field.packed else x

    def _raw(self, calls: list) -> np.ndarray:
        """The step's raw rows in the runtime's layout: [cond; null] (cond only without guidance)."""
        f, B = self.field, self.field.batch
        outs = [self._latent(o) for _, o in calls]
        if f.calls_per_step == 2:  # FLUX true CFG: a cond call, then an uncond call
            v_c, v_u = outs
        elif outs[0].shape[0] == 2 * B:  # batched CFG, diffusers' layout [uncond; cond]
            v_u, v_c = outs[0][:B], outs[0][B:]
        else:
            return outs[0]
        return np.concatenate([v_c, v_u]) if f.guided else v_c

    def _replay(self) -> np.ndarray:
        """Run the solver on the recorded velocities; the state where it asks for the next one (or its result)."""
        f, B = self.field, self.field.batch
        count = [0, 0]
        velocities, grid = self.velocities, self.grid

        def velocity(x: np.ndarray, t: np.ndarray, cond: Any) -> np.ndarray:
            j = count[0]
            if j == len(velocities):
                raise _Pause(x[:B])
            count[0] += 1
            v = velocities[j]
            return v if x.shape[0] == v.shape[0] else v[: x.shape[0]]

        def side(*args: Any) -> Any:
            j = count[1]
            count[1] += 1
            if j == len(self.side_cache):
                start = time.perf_counter()
                self.side_cache.append(self.sidenet(*args))
                self.sidenet_s += time.perf_counter() - start
            return self.side_cache[j]

        kwargs = f.solve_kwargs()
        kwargs["grid"] = grid
        try:
            res = solve(self.solver, velocity, self.x0, len(grid) - 1, sidenet=side, **kwargs, **self.options)
        except _Pause as pause:
            return pause.x
        self.res = res
        return res.x

    def result(self) -> Result:
        if self.res is None:
            raise ConfigError(f"the pipeline stopped after {self.k} of {self.nfe} steps; no BA result")
        total = time.perf_counter() - self.t_begin
        return dataclasses.replace(self.res, timing=Timing(total, self.backbone_s, self.sidenet_s))


def _same(sample: Any, last: Any, torch: Any) -> bool:
    """Is ``sample`` this driver's previous output (up to the pipeline's dtype cast)?"""
    return last is not None and sample.shape == last.shape and torch.equal(sample.to(last.device, last.dtype), last)
