"""apply_fastflow on tiny random-init SD3 and FLUX pipelines.

Truth: the runtime's FastFlow with a state file (``run_with_state``, what ``anchorflow sample
--bandit-state`` runs) on the same transformer, grid and noise; and the pipeline without the hook.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from _tiny_pipelines import build, inputs, pipe  # noqa: E402,F401  (pipe: the shared fixture)

from anchorflow.base.errors import ConfigError  # noqa: E402
from anchorflow.integrations.diffusers import apply_fastflow, capture_pipeline  # noqa: E402
from anchorflow.runtime.fastflow.state import load as load_state  # noqa: E402
from anchorflow.runtime.fastflow.learning import run_with_state  # noqa: E402

T = 12
MU = 1e3  # a large reward per skipped step: once arm 0 has been tried everywhere, the bandits skip
# Same arithmetic as the scheduler test (float32 Euler steps in torch vs numpy on identical
# velocities): measured 0; 1e-5 leaves room for re-association, far below a changed decision.
TOL = 1e-5


def _gen(pipe, cfg=1.0, seed=0):
    return pipe(**inputs(pipe.kind, cfg, T, seed=seed)).images.float().numpy()


@pytest.mark.parametrize("cfg", [1.0, 2.0])
def test_fewer_calls_and_remove_restores_bit_identical(pipe, cfg):
    before = _gen(pipe, cfg)
    hook = apply_fastflow(pipe, mu=MU, model_id="tiny")
    try:
        for seed in range(3):
            _gen(pipe, cfg, seed)
    finally:
        hook.remove()
    per_step = hook.history[0]["calls_per_step"]
    assert per_step == (2 if pipe.kind == "flux" and cfg != 1.0 else 1)
    calls = [h["transformer_calls"] for h in hook.history]
    assert calls[0] == T * per_step  # first generation: every bandit tries arm 0 (no skip) first
    assert all(c < T * per_step for c in calls[1:]), calls
    assert calls[1] == per_step * sum(hook.history[1]["computed"])
    np.testing.assert_array_equal(_gen(pipe, cfg), before)


def test_hook_equals_runtime_fastflow_with_state_file(pipe, tmp_path):
    """Generation by generation, the hooked pipeline and run_with_state agree: outputs and state files."""
    ours, theirs = tmp_path / "hook.json", tmp_path / "runtime.json"
    runtime = []
    for seed in range(3):  # the runtime first: its velocity calls the (then unhooked) transformer
        field = capture_pipeline(pipe, **inputs(pipe.kind, 1.0, T, seed=seed))
        runtime.append(run_with_state(field.velocity, field.noise, T, theirs, "tiny", mu=MU, **field.solve_kwargs()))
    hook = apply_fastflow(pipe, state_path=ours, model_id="tiny", mu=MU)
    try:
        for seed, res in enumerate(runtime):
            x = _gen(pipe, seed=seed)
            assert hook.history[-1]["computed"] == res.info["computed"]
            assert hook.history[-1]["transformer_calls"] == res.nfe
            np.testing.assert_allclose(x, res.x, rtol=0, atol=TOL)
    finally:
        hook.remove()
    a, b = load_state(ours), load_state(theirs)
    assert a.generations == b.generations == 3
    np.testing.assert_array_equal(a.N, b.N)
    np.testing.assert_allclose(a.Q, b.Q, rtol=1e-6)
    assert a.key == b.key


def test_state_file_round_trips_across_hooks(pipe, tmp_path):
    path = tmp_path / "bandit.json"
    first = apply_fastflow(pipe, state_path=path, model_id="tiny", mu=MU)
    _gen(pipe)
    first.remove()
    saved = load_state(path)
    assert saved.generations == 1 and saved.N.sum() > 0
    second = apply_fastflow(pipe, state_path=path, model_id="tiny")  # continues with the file's settings
    _gen(pipe, seed=1)
    second.remove()
    again = load_state(path)
    assert again.generations == 2 and again.N.sum() > saved.N.sum() and again.mu == MU
    assert second.history[0]["transformer_calls"] < T  # it learned from the first hook's generation
    with pytest.raises(Exception, match="gamma"):  # a state file's settings are part of what it learned
        bad = apply_fastflow(pipe, state_path=path, model_id="tiny", gamma=0.5)
        try:
            _gen(pipe)
        finally:
            bad.remove()


def test_refuses_a_second_hook(pipe):
    hook = apply_fastflow(pipe, mu=MU, model_id="tiny")
    try:
        with pytest.raises(ConfigError, match="already"):
            apply_fastflow(pipe, mu=MU, model_id="tiny")
    finally:
        hook.remove()


def test_sana_positional_call_and_euler_scheduler(tmp_path):
    """Sana calls its transformer with hidden_states positionally; FastFlow on AnchorflowScheduler("euler")."""
    from anchorflow.integrations.diffusers import AnchorflowScheduler

    sana = build("sana", tmp_path)
    sana.set_progress_bar_config(disable=True)
    sana.scheduler = AnchorflowScheduler.from_config(sana.scheduler.config, solver="euler")
    before = sana(**inputs("sana", 2.0, T)).images.float().numpy()
    hook = apply_fastflow(sana, mu=MU, model_id="tiny-sana")
    try:
        for seed in range(2):
            sana(**inputs("sana", 2.0, T, seed=seed))
    finally:
        hook.remove()
    assert [h["transformer_calls"] for h in hook.history][0] == T
    assert hook.history[1]["transformer_calls"] < T
    np.testing.assert_array_equal(sana(**inputs("sana", 2.0, T)).images.float().numpy(), before)
