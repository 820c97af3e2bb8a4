"""``run_ba``: the BA-solver driving a diffusers pipeline's own components.

A scheduler only ever sees the guided velocity; BA needs the raw per-row velocities (its SideNet
corrects the unguided field, then guidance is applied per quadrature node), so BA cannot be a
scheduler. Instead: the pipeline encodes the prompts and prepares the latents itself
(:func:`capture_pipeline`, no transformer call), the runtime's ``solve("ba")`` integrates with the
transformer on ``[cond; uncond]`` rows (exactly N transformer calls for N NFE), and the pipeline
decodes the result with its own post-processing. BA integrates (B, C, H, W) latents, the layout of
the SideNet ``anchorflow train sidenet`` makes and of the bundle ``anchorflow export`` writes (FLUX's
2x2-packed tokens are unpacked around each transformer call and packed back for decoding). Time: sigma = t, 1 noise -> 0 data.
"""

from __future__ import annotations

from typing import Any, Callable

from ..._deps import require
from ...errors import ConfigError
from ...runtime.solve import solve
from .capture import PipelineField, _output, capture_pipeline, keywords, pack


def run_ba(pipe: Any, sidenet: Callable, nfe: int, *, solver: str = "ba", grid: Any = None,
           solver_options: dict | None = None, **pipeline_inputs: Any) -> Any:
    """Generate with the BA-solver in ``nfe`` transformer calls; returns the pipeline's own output.

    Args:
        pipe: a flow-matching diffusers pipeline (SD3, FLUX, ...).
        sidenet: the runtime SideNet ``sidenet(x, v, t, h, cond) -> delta`` trained for this transformer
            (e.g. ``load_bundle(path).sidenet``); it sees (B, C, H, W) latents (FLUX's packed
            tokens unpacked, as ``anchorflow train sidenet`` and ``export`` lay them out) and the
            conditions of :class:`PipelineField`.
        nfe: transformer calls (= BA intervals; the pipeline's schedule is built for ``nfe`` steps,
            its shift and FLUX's ``mu`` included).
        solver: "ba" or another SideNet solver of the registry ("ba-single").
        grid: None (the pipeline's sigmas) or an anchorflow grid ("uniform", "shift:S", a list).
        solver_options: options of the solver (e.g. ``{"a": 1/3}``).
        pipeline_inputs: the pipeline's arguments (``prompt_embeds``, ``guidance_scale``, ``height``,
            ``generator``, ``output_type``, ...); ``num_inference_steps`` is set from ``nfe``.

    The output has an ``anchorflow`` attribute: the runtime :class:`~anchorflow.runtime.Result`
    (``nfe``, ``sidenet_calls``, ``steps``, ``timing``; ``x`` (B, C, H, W) latents, FLUX's
    unpacked); with ``return_dict=False`` the Result is the tuple's last item.
    """
    if "num_inference_steps" in pipeline_inputs:
        raise ConfigError("run_ba sets num_inference_steps from nfe; drop it")
    field = capture_pipeline(pipe, **pipeline_inputs, num_inference_steps=int(nfe))
    kwargs = field.solve_kwargs()
    if grid is not None:
        kwargs["grid"] = grid
    res = solve(solver, field.latent_velocity, field.latent_noise(), nfe, sidenet=sidenet, **kwargs,
                **(solver_options or {}))
    out = finish(pipe, field, pack(res.x) if field.packed else res.x, pipeline_inputs)
    if isinstance(out, tuple):
        return (*out, res)
    out.anchorflow = res
    return out


def finish(pipe: Any, field: PipelineField, x: Any, pipeline_inputs: dict) -> Any:
    """Run the pipeline's own post-processing (decoding, ``output_type``) on final latents ``x``.

    The pipeline runs one step in which the transformer is not called and the scheduler returns
    ``x``; whatever it does after the loop (unpacking, VAE decoding) is its own code.
    """
    torch = require("torch", extra="diffusers")
    from diffusers.hooks import HookRegistry, ModelHook

    final = torch.from_numpy(x).to(field.device, field.dtype)

    class _Idle(ModelHook):
        def new_forward(self, module: Any, *args: Any, **kwargs: Any) -> Any:
            hs = torch.zeros_like(keywords(args, kwargs)["hidden_states"])
            return (hs,) if not kwargs.get("return_dict", True) else _output(hs)

    def step(model_output: Any, timestep: Any, sample: Any, *a: Any, **kw: Any) -> Any:
        return (final.to(sample.dtype),) if not kw.get("return_dict", True) else _sched_out(final.to(sample.dtype))

    registry = HookRegistry.check_if_exists_or_initialize(pipe.transformer)
    registry.register_hook(_Idle(), "anchorflow_finish")
    pipe.scheduler.step = step
    try:
        return pipe(**{**pipeline_inputs, "num_inference_steps": 1})
    finally:
        del pipe.scheduler.step
        registry.remove_hook("anchorflow_finish", recurse=False)


def _sched_out(sample: Any) -> Any:
    from diffusers.schedulers.scheduling_flow_match_euler_discrete import FlowMatchEulerDiscreteSchedulerOutput

    return FlowMatchEulerDiscreteSchedulerOutput(prev_sample=sample)
