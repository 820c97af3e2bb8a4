"""A diffusers pipeline's transformer as a runtime ``velocity(x, t, cond)`` callable.

:func:`capture_pipeline` runs the pipeline itself up to its first scheduler step (so prompt
encoding, latent preparation, ids, guidance embeddings and timestep scaling are the pipeline's
own), records the transformer calls of that step, and stops. The transformer is not run: each
recorded call returns a distinct constant per row, and the model output the pipeline hands its
scheduler shows how it combines the rows (checked to be plain CFG at the given scale). The
returned :class:`PipelineField` calls the transformer for any state and time:
``solve(method, f.velocity, f.noise, nfe, **f.solve_kwargs())``.

Conditions are the transformer's per-row forward arguments under their diffusers names
(``encoder_hidden_states``, ``pooled_projections``, FLUX-dev's embedded ``guidance``), as numpy
arrays: ``cond`` the prompts', ``null_cond`` the negative prompts' (the runtime's
``anchorflow.bundle/2`` contract uses the same names). Shared arguments (FLUX's ``txt_ids`` /
``img_ids``) are kept as the pipeline made them. Time: t = 1 noise, t = 0 data; the transformer
gets the pipeline's timestep ``1000 t`` (FLUX: ``1000 t / 1000``, as its pipeline computes it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from ...base._deps import require
from ...base.errors import ConfigError

_SHARED = {"txt_ids", "img_ids"}  # FLUX position ids: one table for every row
_GUIDANCE_ULPS = 8  # the pipeline's CFG sum on small row constants, re-done in float32: a few ulp of its dtype


class _Captured(Exception):
    pass


@dataclass
class PipelineField:
    """The transformer of a pipeline at the prompts, latents and guidance of one call.

    ``noise`` (B, ...) the pipeline's initial latents (its generator honoured; FLUX: packed
    tokens (B, L, C)); ``grid`` the scheduler's sigmas (float64, t = 1 -> 0); ``cond`` /
    ``null_cond`` name -> (B, ...) arrays; ``cfg_scale`` the pipeline's guidance scale (1.0:
    none); ``calls_per_step`` the transformer calls the pipeline itself makes per step (FLUX's
    true CFG: 2, one per branch; batched CFG: 1 call of 2B rows). ``calls`` counts this field's.
    ``latent_shape`` (C, H, W) when the latents are FLUX's packed tokens (:meth:`latent_noise`,
    :meth:`latent_velocity` give the (B, C, H, W) view bundles and SideNets use), else None.
    """

    transformer: Any
    noise: np.ndarray
    grid: np.ndarray
    cfg_scale: float
    calls_per_step: int
    timestep_mode: str
    cond: dict = field(repr=False)
    null_cond: Optional[dict] = field(repr=False)
    shared: dict = field(repr=False)
    dtypes: dict = field(repr=False)
    dtype: Any = None
    device: Any = None
    calls: int = 0
    latent_shape: Optional[tuple] = None

    @property
    def packed(self) -> bool:
        """True when the pipeline's latents are FLUX's 2x2-packed tokens (B, HW/4, 4C)."""
        return self.latent_shape is not None

    @property
    def batch(self) -> int:
        return int(self.noise.shape[0])

    @property
    def guided(self) -> bool:
        return self.cfg_scale != 1.0

    def solve_kwargs(self) -> dict:
        """``cond``, ``null_cond``, ``cfg_scale`` and ``grid`` for :func:`anchorflow.runtime.solve`."""
        kw = {"cond": self.cond, "grid": self.grid, "cfg_scale": self.cfg_scale}
        if self.guided:
            kw["null_cond"] = self.null_cond
        return kw

    def velocity(self, x: np.ndarray, t: np.ndarray, cond: Optional[dict] = None) -> np.ndarray:
        """Transformer velocity (n, ...) float32 at states x (n, ...), our times t (n,), conditions (n, ...)."""
        torch = require("torch", extra="diffusers")
        cond = self.cond if cond is None else cond
        missing = sorted(set(self.dtypes) - set(cond))
        if missing:
            raise ConfigError(f"the transformer needs the conditions {', '.join(missing)}")
        kwargs = {k: torch.from_numpy(np.ascontiguousarray(cond[k])).to(self.device, self.dtypes[k])
                  for k in self.dtypes}
        tt = torch.from_numpy(np.asarray(t, np.float32)).to(self.device) * 1000.0
        if self.timestep_mode == "unit":
            tt = tt / 1000.0
        with torch.no_grad():
            out = self.transformer(
                hidden_states=torch.from_numpy(np.ascontiguousarray(x)).to(self.device, self.dtype),
                timestep=tt.to(self.dtype), **kwargs, **self.shared, return_dict=False,
            )[0]
        self.calls += 1
        return out.detach().to("cpu", torch.float32).numpy()

    def latent_noise(self) -> np.ndarray:
        """``noise`` as (B, C, H, W) latents (unpacked for FLUX; as is otherwise)."""
        return unpack(self.noise, self.latent_shape) if self.packed else self.noise

    def latent_velocity(self, x: np.ndarray, t: np.ndarray, cond: Optional[dict] = None) -> np.ndarray:
        """:meth:`velocity` on (n, C, H, W) latents, the layout ``anchorflow export`` and
        ``anchorflow train sidenet`` use for FLUX (packing to tokens and back around the call)."""
        if not self.packed:
            return self.velocity(x, t, cond)
        return unpack(self.velocity(pack(x), t, cond), self.latent_shape)


def pack(x: np.ndarray) -> np.ndarray:
    """FluxPipeline's 2x2 packing: (B, C, H, W) -> (B, HW/4, 4C)."""
    b, c, h, w = x.shape
    return x.reshape(b, c, h // 2, 2, w // 2, 2).transpose(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(x: np.ndarray, shape: tuple) -> np.ndarray:
    """Inverse of :func:`pack`: (B, HW/4, 4C) -> (B, C, H, W) with ``shape`` = (C, H, W)."""
    c, h, w = shape
    return np.ascontiguousarray(x.reshape(x.shape[0], h // 2, w // 2, c, 2, 2).transpose(0, 3, 1, 4, 2, 5)
                                .reshape(x.shape[0], c, h, w))


def _latent_shape(noise: np.ndarray, shared: dict) -> Optional[tuple]:
    """(C, H, W) of 2x2-packed tokens, read off the pipeline's ``img_ids`` (row, column per token)."""
    ids = shared.get("img_ids")
    if ids is None or noise.ndim != 3 or noise.shape[-1] % 4:
        return None
    ids = ids.reshape(-1, ids.shape[-1])
    rows, cols = int(ids[:, 1].max().item()) + 1, int(ids[:, 2].max().item()) + 1
    if rows * cols != noise.shape[1]:
        return None
    return (noise.shape[-1] // 4, 2 * rows, 2 * cols)


def capture_pipeline(pipe: Any, **inputs: Any) -> PipelineField:
    """Run ``pipe(**inputs)`` up to its first scheduler step and return its :class:`PipelineField`.

    ``inputs`` are the pipeline's own arguments (``prompt_embeds``, ``pooled_prompt_embeds``,
    ``negative_*``, ``guidance_scale`` / ``true_cfg_scale``, ``height``, ``width``,
    ``num_inference_steps``, ``generator`` or ``latents``, ...). The pipeline's guidance must be
    plain CFG (checked against the model output it hands its scheduler).
    """
    torch = require("torch", extra="diffusers")
    from diffusers.hooks import HookRegistry, ModelHook

    calls: list[tuple[dict, Any]] = []
    seen: dict = {}

    class _Record(ModelHook):
        def new_forward(self, module: Any, *args: Any, **kwargs: Any) -> Any:
            kwargs = keywords(args, kwargs)
            hs = kwargs["hidden_states"]
            ids = torch.arange(hs.shape[0], dtype=torch.float32) + 1.0 + 100.0 * len(calls)
            out = ids.reshape(-1, *[1] * (hs.ndim - 1)).expand(hs.shape).to(hs.device, hs.dtype).contiguous()
            calls.append((dict(kwargs), out))
            return (out,) if not kwargs.get("return_dict", True) else _output(out)

    def fake_step(model_output: Any, timestep: Any, sample: Any, *a: Any, **kw: Any) -> Any:
        seen.update(model_output=model_output, timestep=timestep, sample=sample)
        raise _Captured

    registry = HookRegistry.check_if_exists_or_initialize(pipe.transformer)
    registry.register_hook(_Record(), "anchorflow_capture")
    pipe.scheduler.step = fake_step
    try:
        pipe(**inputs)
    except _Captured:
        pass
    finally:
        del pipe.scheduler.step
        registry.remove_hook("anchorflow_capture", recurse=False)
    if not seen:
        raise ConfigError("the pipeline finished without calling scheduler.step; is num_inference_steps >= 1?")
    return _build(pipe, inputs, calls, seen, torch)


def keywords(args: tuple, kwargs: dict) -> dict:
    """A transformer call's arguments as keywords (Sana passes ``hidden_states`` positionally)."""
    if len(args) > 1 or (args and "hidden_states" in kwargs):
        raise ConfigError("the pipeline calls its transformer with several positional arguments; "
                          "anchorflow needs hidden_states first and the rest by keyword")
    return {"hidden_states": args[0], **kwargs} if args else kwargs


def _output(sample: Any) -> Any:
    from diffusers.models.modeling_outputs import Transformer2DModelOutput

    return Transformer2DModelOutput(sample=sample)


def _build(pipe: Any, inputs: dict, calls: list, seen: dict, torch: Any, live: bool = False) -> PipelineField:
    """The field of a pipeline's first step from its transformer ``calls`` and ``seen`` step inputs;
    ``live``: the calls' outputs are real velocities (run_ba), not the row constants of the capture."""
    sample = seen["sample"]
    B = sample.shape[0]
    kw0 = calls[0][0]
    rows = kw0["hidden_states"].shape[0]
    per_row = [k for k, v in kw0.items() if torch.is_tensor(v) and v.ndim and v.shape[0] == rows
               and k not in _SHARED | {"hidden_states", "timestep"}]
    shared = {k: v for k, v in kw0.items() if k not in per_row and k not in {"hidden_states", "timestep", "return_dict"}}
    if len(calls) == 1 and rows == B:
        cfg, cond, null, outs = 1.0, {k: kw0[k] for k in per_row}, None, [calls[0][1]]
    elif len(calls) == 1 and rows == 2 * B:  # batched CFG, diffusers' layout [uncond; cond]
        cfg = float(getattr(pipe, "_guidance_scale", inputs.get("guidance_scale", 1.0)))
        cond, null = {k: kw0[k][B:] for k in per_row}, {k: kw0[k][:B] for k in per_row}
        outs = [calls[0][1][B:], calls[0][1][:B]]
    elif len(calls) == 2 and rows == B:  # FLUX true CFG: a cond call, then an uncond call
        cfg = float(inputs.get("true_cfg_scale", 1.0))
        cond, null = {k: kw0[k] for k in per_row}, {k: calls[1][0][k] for k in per_row}
        outs = [calls[0][1], calls[1][1]]
    else:
        raise ConfigError(f"unsupported pipeline: {len(calls)} transformer call(s) of {rows} rows for {B} latents per step")
    _check_guidance(seen["model_output"], outs, cfg, torch, live)
    sigma_step = seen["timestep"].reshape(-1)[0].float()
    tau = kw0["timestep"].reshape(-1)[0].float()
    mode = "train" if torch.equal(tau, sigma_step) else ("unit" if torch.allclose(tau * 1000.0, sigma_step) else None)
    if mode is None:
        raise ConfigError(f"the pipeline passes timestep {tau.item()} at scheduler timestep {sigma_step.item()}; "
                          "only 1000*sigma and sigma are supported")
    sched = pipe.scheduler
    k0 = sched.index_for_timestep(seen["timestep"]) if sched.begin_index is None else sched.begin_index
    grid = sched.sigmas.detach().to("cpu", torch.float64).numpy()[k0:]
    hs = kw0["hidden_states"]

    def arrays(d: Optional[dict]) -> Optional[dict]:
        return None if d is None else {k: v.detach().to("cpu", torch.float32).numpy() for k, v in d.items()}

    noise = sample.detach().to("cpu", torch.float32).numpy()
    return PipelineField(pipe.transformer, noise, grid, cfg, len(calls), mode, arrays(cond), arrays(null), shared,
                         {k: kw0[k].dtype for k in per_row}, hs.dtype, hs.device,
                         latent_shape=_latent_shape(noise, shared))


def _check_guidance(model_output: Any, outs: list, cfg: float, torch: Any, live: bool = False) -> None:
    """The pipeline must hand its scheduler ``v_u + s (v_c - v_u)`` (plain CFG) or v_c.

    ``live``: real velocities, whose CFG sum rounds at their magnitude: the tolerance is the same
    ulps of ``(1 + 2 s) max |v|`` (the largest term of the sum) instead of an absolute one."""
    v_c = outs[0].float()
    expected = v_c if len(outs) == 1 else outs[1].float() + cfg * (v_c - outs[1].float())
    got = model_output.float()
    rtol = _GUIDANCE_ULPS * torch.finfo(model_output.dtype).eps
    if live:
        scale = max(float(o.float().abs().max()) for o in outs) * (1.0 + 2.0 * abs(cfg))
        rtol = rtol * max(scale, 1.0)
    if got.shape != expected.shape or not torch.allclose(got, expected, rtol=rtol, atol=rtol):
        raise ConfigError("this pipeline's guidance is not plain classifier-free guidance at the scale given "
                          "(guidance rescale or skip-layer guidance?); anchorflow cannot reproduce it")
