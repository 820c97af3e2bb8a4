"""AnchorflowScheduler inside real (tiny, random-init) SD3 and FLUX pipelines.

Truths: diffusers' own FlowMatchEulerDiscreteScheduler (for "euler"), and the torch-free
runtime's ``solve`` run on the same transformer (captured from the pipeline) and the same grid.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from _tiny_pipelines import build, inputs, pipe  # noqa: E402,F401  (pipe: the shared fixture)

from anchorflow.base.errors import ConfigError  # noqa: E402
from anchorflow.integrations.diffusers import AnchorflowScheduler, capture_pipeline, scheduler_solvers  # noqa: E402
from anchorflow.runtime import solve  # noqa: E402

STEPS = 6
# The pipeline and solve() evaluate the same float32 transformer on the same rows, but in a
# different batch layout ([uncond; cond] in one call, or two calls for FLUX's true CFG, against
# our [cond; uncond]) and with the CFG sum in torch vs numpy: float32 re-association, a few ulp
# of the O(1) latents per step, compounded over 6 steps. Measured: 0 for SD3 and unguided FLUX,
# <= 7.2e-7 for FLUX's two-call true CFG. 1e-5 is ~80 ulp of |x| ~ 4; a wrong coefficient or an
# off-by-one step moves the result by far more (checked below against Euler).
TOL = 1e-5


def _run(pipe, scheduler, cfg, steps=STEPS, kind=None):
    original = pipe.scheduler
    pipe.scheduler = scheduler
    try:
        return pipe(**inputs(kind or pipe.kind, cfg, steps)).images.float().numpy()
    finally:
        pipe.scheduler = original


@pytest.mark.parametrize("cfg", [1.0, 2.0])
def test_euler_is_flow_match_euler(pipe, cfg):
    """AnchorflowScheduler("euler") reproduces diffusers' Euler bit for bit (same sigmas, same float32 step)."""
    ref = pipe(**inputs(pipe.kind, cfg, STEPS)).images.float().numpy()
    ours = _run(pipe, AnchorflowScheduler.from_config(pipe.scheduler.config, solver="euler"), cfg)
    np.testing.assert_array_equal(ours, ref)


@pytest.mark.parametrize("cfg", [1.0, 2.0])
@pytest.mark.parametrize("solver", scheduler_solvers())
def test_scheduler_equals_solve(pipe, solver, cfg):
    sched = AnchorflowScheduler.from_config(pipe.scheduler.config, solver=solver)
    ours = _run(pipe, sched, cfg)
    field = capture_pipeline(pipe, **inputs(pipe.kind, cfg, STEPS))
    np.testing.assert_array_equal(field.grid, sched.anchorflow_grid())  # the pipeline's own sigmas
    res = solve(solver, field.velocity, field.noise, STEPS, **field.solve_kwargs())
    assert res.nfe == STEPS
    np.testing.assert_allclose(ours, res.x, rtol=0, atol=TOL)
    euler = solve("euler", field.velocity, field.noise, STEPS, **field.solve_kwargs()).x
    if solver != "euler":  # the comparison can tell the solvers apart
        assert np.abs(euler - res.x).max() > 100 * TOL


@pytest.mark.parametrize("cfg", [1.0, 2.0])
def test_sana_with_its_flow_dpm_solver_config(tmp_path, cfg):
    """Sana ships a flow DPM-Solver config (flow_shift); from_config keeps the shift; every solver
    equals solve() on Sana's transformer (hidden_states passed positionally, a text attention mask)."""
    pipe = build("sana", tmp_path)
    pipe.set_progress_bar_config(disable=True)
    for solver in scheduler_solvers():
        sched = AnchorflowScheduler.from_config(pipe.scheduler.config, solver=solver)
        assert sched.config.shift == 3.0
        ours = _run(pipe, sched, cfg, kind="sana")
        pipe.scheduler, default = sched, pipe.scheduler
        try:
            field = capture_pipeline(pipe, **inputs("sana", cfg, STEPS))
        finally:
            pipe.scheduler = default
        assert "encoder_attention_mask" in field.cond
        res = solve(solver, field.velocity, field.noise, STEPS, **field.solve_kwargs())
        np.testing.assert_allclose(ours, res.x, rtol=0, atol=TOL)


def test_flux_dynamic_shift_is_honoured(tmp_path):
    """FLUX passes mu (resolution-dependent shift): the grid is diffusers' shifted one, not uniform."""
    pipe = build("flux", tmp_path)
    pipe.set_progress_bar_config(disable=True)
    sched = AnchorflowScheduler.from_config(pipe.scheduler.config, solver="ab2")
    assert sched.config.use_dynamic_shifting
    pipe.scheduler = sched
    pipe(**inputs("flux", 1.0, 4))
    ref = AnchorflowScheduler.from_config(pipe.scheduler.config, solver="euler")
    mu = 0.5 + (1.15 - 0.5) / (4096 - 256) * (4 - 256)  # FluxPipeline's calculate_shift for 4 image tokens
    ref.set_timesteps(sigmas=np.linspace(1.0, 1 / 4, 4), mu=mu)
    np.testing.assert_array_equal(sched.anchorflow_grid(), ref.anchorflow_grid())
    assert not np.allclose(sched.anchorflow_grid(), np.linspace(1, 0, 5))


def test_our_grid_replaces_the_pipelines(tmp_path):
    pipe = build("sd3", tmp_path)
    pipe.set_progress_bar_config(disable=True)
    sched = AnchorflowScheduler.from_config(pipe.scheduler.config, solver="ab2", grid="uniform")
    ours = _run(pipe, sched, 1.0, steps=5, kind="sd3")
    np.testing.assert_allclose(sched.anchorflow_grid(), np.linspace(1, 0, 6), atol=1e-7)
    field = capture_pipeline(pipe, **inputs("sd3", 1.0, 5))  # FlowMatchEuler scheduler: shifted grid
    res = solve("ab2", field.velocity, field.noise, 5, cond=field.cond, grid=sched.anchorflow_grid())
    np.testing.assert_allclose(ours, res.x, rtol=0, atol=TOL)


def test_config_round_trip(tmp_path):
    sched = AnchorflowScheduler(solver="ipndm", solver_options={"order": 3}, shift=3.0)
    sched.save_pretrained(tmp_path)
    back = AnchorflowScheduler.from_pretrained(tmp_path)
    assert (back.config.solver, back.config.solver_options, back.config.shift) == ("ipndm", {"order": 3}, 3.0)


@pytest.mark.parametrize("bad, words", [
    (dict(solver="heun"), "cannot run as a scheduler"),
    (dict(solver="ba"), "run_ba"),
    (dict(solver="nope"), "known solvers"),
    (dict(solver="ab2", solver_options={"order": 3}), "no option"),
    (dict(solver="ab2", grid="shift:x"), "bad grid"),
    (dict(solver="ab2", stochastic_sampling=True), "stochastic"),
])
def test_refusals_say_what_to_do(bad, words):
    with pytest.raises(ConfigError, match=words):
        AnchorflowScheduler(**bad)


def test_a_pipeline_saved_with_the_scheduler_loads_back(tmp_path):
    """save_pretrained / from_pretrained round trip: model_index.json names this module as the
    scheduler's library; the loaded pipeline has the same solver, grid and options and generates
    the same latents (the tiny pipeline has no text encoders or VAE: passed as None, as saved)."""
    from diffusers import DiffusionPipeline

    pipe = build("sd3", tmp_path / "tr")
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = AnchorflowScheduler.from_config(pipe.scheduler.config, solver="ipndm",
                                                     solver_options={"order": 3}, grid="shift:2")
    pipe.save_pretrained(tmp_path / "pipe")
    none = dict.fromkeys(["vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "text_encoder_3",
                          "tokenizer_3"])
    back = DiffusionPipeline.from_pretrained(tmp_path / "pipe", **none)
    back.set_progress_bar_config(disable=True)
    assert type(back.scheduler) is AnchorflowScheduler
    assert (back.scheduler.config.solver, back.scheduler.config.grid, back.scheduler.config.solver_options,
            back.scheduler.config.shift) == ("ipndm", "shift:2", {"order": 3}, 3.0)
    got = back(**inputs("sd3", 2.0, STEPS)).images.float().numpy()
    np.testing.assert_array_equal(got, pipe(**inputs("sd3", 2.0, STEPS)).images.float().numpy())
    alone = AnchorflowScheduler.from_pretrained(tmp_path / "pipe", subfolder="scheduler")
    assert alone.config.solver == "ipndm"
