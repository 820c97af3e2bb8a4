"""run_ba on tiny random-init SD3 and FLUX pipelines.

Truths: the runtime's ``solve("ba")`` on the pipeline's transformer (captured) with the same
SideNet and grid; a counting hook on the transformer for the exact number of calls.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from _tiny_pipelines import CallCount as _Count, build, inputs, pipe  # noqa: E402,F401  (pipe: the shared fixture)
from diffusers.hooks import HookRegistry  # noqa: E402

from anchorflow.base.errors import ConfigError  # noqa: E402
from anchorflow.integrations.diffusers import capture_pipeline, run_ba  # noqa: E402
from anchorflow.runtime import solve  # noqa: E402

N = 5
# run_ba and solve("ba") run the same runtime code on the same transformer; the only difference
# is the pipeline's own post-processing (FLUX: unpacking) and dtype round trips: exact in float32.
TOL = 0.0


def toy_sidenet(x, v, t, h, y):
    """A smooth nonzero SideNet (delta = h * tanh(...)), zero at h = 0 as the contract requires."""
    shape = (-1,) + (1,) * (x.ndim - 1)
    return (h.reshape(shape) * np.tanh(0.3 * x - 0.2 * v + t.reshape(shape))).astype(np.float32)


def _inputs(kind, cfg):
    kw = inputs(kind, cfg, N)
    del kw["num_inference_steps"]
    return kw


@pytest.mark.parametrize("cfg", [1.0, 2.0])
def test_run_ba_equals_solve_with_exactly_n_calls(pipe, cfg):
    count = _Count()
    registry = HookRegistry.check_if_exists_or_initialize(pipe.transformer)
    registry.register_hook(count, "count")
    try:
        out = run_ba(pipe, toy_sidenet, N, **_inputs(pipe.kind, cfg))
    finally:
        registry.remove_hook("count", recurse=False)
    field = capture_pipeline(pipe, **inputs(pipe.kind, cfg, N))
    # N steps of the pipeline's own loop; FLUX's true CFG makes its two B-row calls per step (the
    # compute of one 2B-row call: NFE counts a guided step once)
    assert count.calls == field.calls_per_step * N and out.anchorflow.nfe == N
    assert out.anchorflow.sidenet_calls == N  # merged probes: one SideNet call per interval
    ref = solve("ba", field.velocity, field.noise, N, sidenet=toy_sidenet, **field.solve_kwargs())
    # run_ba integrates FLUX's latents unpacked; the toy SideNet is elementwise, so packing commutes with BA
    got = _pack(out.anchorflow.x) if field.packed else out.anchorflow.x
    np.testing.assert_allclose(got, ref.x, rtol=0, atol=TOL)
    images = out.images.float().numpy()
    if pipe.kind == "sd3":  # output_type="latent": the pipeline hands back our latents as they are
        np.testing.assert_array_equal(images, ref.x)
    else:  # FLUX unpacks its (B, L, C) tokens to (B, C, H, W) latents itself
        assert images.shape[0] == ref.x.shape[0] and images.size == ref.x.size
        assert field.latent_shape == (4, 4, 4) and np.array_equal(_unpack(field.noise, 4, 4), field.latent_noise())
    ab2 = solve("ab2", field.velocity, field.noise, N, **field.solve_kwargs()).x
    assert np.abs(ab2 - ref.x).max() > 1e-3  # the SideNet matters: BA with delta = 0 would be AB2


def test_run_ba_refuses_num_inference_steps(pipe):
    with pytest.raises(ConfigError, match="nfe"):
        run_ba(pipe, toy_sidenet, N, num_inference_steps=N, **_inputs(pipe.kind, 1.0))


def _pack(x):
    """FluxPipeline's 2x2 packing: (B, C, H, W) -> (B, HW/4, 4C)."""
    b, c, h, w = x.shape
    return x.reshape(b, c, h // 2, 2, w // 2, 2).transpose(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def _unpack(x, h, w):
    b, _, c4 = x.shape
    return x.reshape(b, h // 2, w // 2, c4 // 4, 2, 2).transpose(0, 3, 1, 4, 2, 5).reshape(b, c4 // 4, h, w)


@pytest.mark.parametrize("cfg", [1.0, 2.0])
@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_run_ba_equals_solve_on_the_contract_adapter(kind, cfg, tmp_path):
    """An independent implementation of the model's calling convention: the backbone adapter that
    ``anchorflow export`` turns into the bundle (x (B, C, H, W) in our time, FLUX packing inside)."""
    from anchorflow.trainers.adapters import load_source

    pipe = build(kind, tmp_path)
    pipe.set_progress_bar_config(disable=True)
    out = run_ba(pipe, toy_sidenet, N, **_inputs(kind, cfg))
    field = capture_pipeline(pipe, **inputs(kind, cfg, N))
    adapter = load_source(str(tmp_path))
    noise = field.noise if kind == "sd3" else _unpack(field.noise, 4, 4)
    ref = solve("ba", adapter.call_numpy, noise, N, sidenet=toy_sidenet, **field.solve_kwargs()).x
    # Same float32 network, different code paths: diffusers' float64 rotary embedding vs the
    # adapter's float32 one (FLUX), and the batch layout. Measured 0 (SD3), <= 4.8e-7 (FLUX) on |x| ~ 4; 1e-4 is the
    # fp32 parity budget the export uses for these models.
    np.testing.assert_allclose(out.anchorflow.x, ref, rtol=0, atol=1e-4)


def test_run_ba_is_one_pipeline_run_with_per_step_callbacks(pipe):
    """ONE run of the pipeline's loop: N transformer ``__call__``s, all real computations (no idle
    or capture calls), one progress bar, ``callback_on_step_end`` once per step with the
    pipeline's own arguments (step index, timestep, its latents)."""
    cfg = 2.0
    count = _Count()  # real computations (the hook wraps the original forward)
    registry = HookRegistry.check_if_exists_or_initialize(pipe.transformer)
    registry.register_hook(count, "count")
    dunder = []  # every transformer __call__, whatever a hook does inside it
    handle = pipe.transformer.register_forward_pre_hook(lambda m, a: dunder.append(1))
    bars, seen = [], []
    original_bar = pipe.progress_bar

    def progress_bar(*a, **kw):
        bars.append(kw.get("total"))
        return original_bar(*a, **kw)

    def callback(p, i, t, kwargs):
        seen.append((i, float(t), kwargs["latents"].clone()))
        return {}

    pipe.progress_bar = progress_bar
    try:
        out = run_ba(pipe, toy_sidenet, N, callback_on_step_end=callback,
                     callback_on_step_end_tensor_inputs=["latents"], **_inputs(pipe.kind, cfg))
    finally:
        del pipe.progress_bar
        handle.remove()
        registry.remove_hook("count", recurse=False)
    per_step = 2 if pipe.kind == "flux" else 1  # FLUX's true CFG: a cond and an uncond call per step
    assert count.calls == len(dunder) == per_step * N
    assert bars == [N]
    assert [i for i, _, _ in seen] == list(range(N))
    field = capture_pipeline(pipe, **inputs(pipe.kind, cfg, N))
    np.testing.assert_allclose([t for _, t, _ in seen], 1000.0 * field.grid[:-1], rtol=1e-6)
    final = seen[-1][2].float().numpy()  # after the last step the latents are BA's result
    np.testing.assert_array_equal(final, _pack(out.anchorflow.x) if field.packed else out.anchorflow.x)
    assert out.anchorflow.nfe == N and out.anchorflow.timing.backbone_s > 0


def test_run_ba_refuses_a_callback_that_changes_the_latents(pipe):
    def callback(p, i, t, kwargs):
        return {"latents": kwargs["latents"] * 0.5} if i == 1 else {}

    with pytest.raises(ConfigError, match="latents changed between steps 1 and 2"):
        run_ba(pipe, toy_sidenet, N, callback_on_step_end=callback, callback_on_step_end_tensor_inputs=["latents"],
               **_inputs(pipe.kind, 1.0))
    assert not hasattr(pipe.scheduler, "step") or "step" not in vars(pipe.scheduler)  # the pipeline is restored
