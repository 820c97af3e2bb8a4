"""FastFlow's state file across invocations: migration, merge, lock, all-or-nothing, identity.

Truths: a version-1 document as the previous release wrote it, counts that must add up over
invocations, a lock held by another process, the bundle's recorded weights hash.
"""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from anchorflow.base.errors import StateFileError
from anchorflow.runtime import FastFlowBandit
from anchorflow.runtime.fastflow import state as bandit_state
from anchorflow.runtime.fastflow.learning import run_with_state, solve_with_state

T = 12
BUNDLE = Path(__file__).resolve().parents[1] / "anchorflow" / "bundled" / "digits" / "bundle"


def _noise(seed: int, b: int = 8) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((b, 2)).astype(np.float32)


def _labels(b: int = 8) -> np.ndarray:
    return np.arange(b) % 2


def _v1_document(b: FastFlowBandit) -> dict:
    """The version-1 document exactly as the previous release's ``to_dict`` wrote it."""
    return {"schema": "anchorflow.fastflow-bandit", "version": 1,
            "key": {"T": b.T, "grid": b.grid.tolist(), "grid_sha256": b.key.grid_sha256, "model_id": b.key.model_id},
            "arms": list(b.arms), "gamma": b.gamma, "bonus": b.bonus, "mu": b.mu, "mu_factor": b.mu_factor,
            "seed": b.seed, "generations": b.generations, "Q": b.Q.tolist(), "N": b.N.tolist(),
            "rng": b.rng.bit_generator.state}


def test_version_1_file_migrates_and_keeps_learning(mixture, tmp_path):
    old = FastFlowBandit(T, mu=2e-3, model_id="m")
    for g in range(4):
        from anchorflow.runtime import solve

        solve("fastflow", mixture, _noise(g), T, y=_labels(), bandit=old)
    path = tmp_path / "s.json"
    path.write_text(json.dumps(_v1_document(old)))
    migrated = bandit_state.load(path)
    # v1 had a fixed mu and no guard: every reward was paid, so R = N, and Q is unchanged
    assert not migrated.adaptive and migrated.mu == 2e-3 and migrated.generations == 4
    np.testing.assert_array_equal(migrated.Q, old.Q)
    np.testing.assert_array_equal(migrated.R, old.N)
    assert [migrated.select(k, 6) for k in range(1, T)] == [old.select(k, 6) for k in range(1, T)]
    run_with_state(mixture, _noise(9), T, path, "m", y=_labels())
    d = json.loads(path.read_text())
    assert d["version"] == bandit_state.VERSION and d["generations"] == 5 and d["mu"] == 2e-3
    with pytest.raises(StateFileError, match="fixed mu"):  # a budget cannot be bolted onto it
        run_with_state(mixture, _noise(10), T, path, "m", y=_labels(), speedup=3)


@pytest.mark.parametrize("version,match", [(4, "newer anchorflow"), (0, "schema version"), ("2", "schema version")])
def test_unknown_versions_refused(tmp_path, version, match):
    path = tmp_path / "s.json"
    bandit_state.write(FastFlowBandit(T, model_id="m"), path)
    d = json.loads(path.read_text())
    d["version"] = version
    path.write_text(json.dumps(d))
    with pytest.raises(StateFileError, match=match):
        bandit_state.load(path)


def test_version_2_round_trip_keeps_every_field(mixture, tmp_path):
    b = FastFlowBandit(T, model_id="m", calls=5, tol=0.5, seed=4)
    from anchorflow.runtime import solve

    for g in range(5):
        solve("fastflow", mixture, _noise(g), T, y=_labels(), bandit=b)
    bandit_state.write(b, tmp_path / "s.json")
    back = bandit_state.load(tmp_path / "s.json")
    assert bandit_state.to_dict(back) == bandit_state.to_dict(b)


def test_learning_merges_across_invocations(mixture, tmp_path):
    """Each invocation's decisions land in the file (kills a deleted merge): the counts add up and
    the second run starts from what the first learned (its choices differ from a fresh bandit's)."""
    path = tmp_path / "s.json"
    runs = [run_with_state(mixture, _noise(g), T, path, "m", y=_labels(), mu=1e-3) for g in range(3)]
    state = bandit_state.load(path)
    assert state.generations == 3
    assert state.N.sum() == sum(len(r.info["losses"]) for r in runs)
    fresh = [run_with_state(mixture, _noise(g), T, tmp_path / f"f{g}.json", "m", y=_labels(), mu=1e-3) for g in (1, 2)]
    assert [r.info["arms"] for r in runs[1:]] != [r.info["arms"] for r in fresh]


def test_uncommitted_generation_changes_nothing(mixture, tmp_path):
    path = tmp_path / "s.json"
    run_with_state(mixture, _noise(0), T, path, "m", y=_labels())
    before = path.read_bytes()
    pending = solve_with_state(mixture, _noise(1), T, path, "m", y=_labels())
    assert pending.result.nfe < T and path.read_bytes() == before  # solved, not learned yet
    pending.commit()
    assert bandit_state.load(path).generations == 2
    pending.commit()  # once only
    assert bandit_state.load(path).generations == 2


def test_cli_failed_output_leaves_state_unchanged(tmp_path):
    """``sample --npy`` into a path that cannot be written: the command fails and the bandit state
    is byte-for-byte what it was (all or nothing)."""
    from anchorflow.cli import cli

    state, runner = tmp_path / "b.json", CliRunner()
    args = ["sample", "default", "--solver", "fastflow", "--nfe", "12", "--n", "4", "--bandit-state", str(state),
            "--out", str(tmp_path / "f.png")]
    assert runner.invoke(cli, args).exit_code == 0
    assert runner.invoke(cli, args).exit_code == 0
    before = state.read_bytes()
    (tmp_path / "file").write_text("not a folder")
    bad = runner.invoke(cli, [*args, "--npy", str(tmp_path / "file" / "x.npy")])
    assert bad.exit_code != 0
    assert state.read_bytes() == before
    assert bandit_state.load(state).generations == 2


def test_cli_budget_options(tmp_path):
    from anchorflow.cli import cli

    state, runner = tmp_path / "b.json", CliRunner()
    base = ["sample", "default", "--solver", "fastflow", "--nfe", "12", "--n", "2", "--bandit-state", str(state),
            "--out", str(tmp_path / "f.png")]
    assert runner.invoke(cli, [*base, "--calls", "6"]).exit_code == 0
    assert bandit_state.load(state).target == 6.0
    assert runner.invoke(cli, [*base, "--speedup", "3"]).exit_code == 0  # a new budget is taken over
    assert bandit_state.load(state).target == 4.0
    bad = runner.invoke(cli, [*base, "--calls", "40"])
    assert bad.exit_code == 1 and "calls must be in 3..T (12)" in str(bad.exception)
    other = runner.invoke(cli, ["sample", "default", "--solver", "euler", "--calls", "6"])
    assert other.exit_code == 1 and "only apply to --solver fastflow" in str(other.exception)


def _hold_lock(path: str, ready, release) -> None:
    from filelock import FileLock

    with FileLock(f"{path}.lock"):
        ready.set()
        release.wait(30)


def test_lock_held_elsewhere_is_announced_then_times_out(mixture, tmp_path):
    path = str(tmp_path / "s.json")
    ctx = multiprocessing.get_context("spawn")
    ready, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold_lock, args=(path, ready, release))
    holder.start()
    try:
        assert ready.wait(30)
        said: list[str] = []
        with pytest.raises(StateFileError, match="locked by another process .* for over 1.5 s"):
            with bandit_state.state_lock(path, timeout=1.5, notify=said.append):
                pass
        assert len(said) == 1 and "waiting for the bandit state lock" in said[0] and "1.5 s" in said[0]
        with pytest.raises(StateFileError, match="locked by another process"):
            run_with_state(mixture, _noise(0), T, path, "m", y=_labels(), lock_timeout=1.2)
    finally:
        release.set()
        holder.join(30)
    assert not Path(path).exists()  # nothing was written while the lock was held elsewhere


def test_model_identity_is_the_weights_not_the_onnx_bytes():
    """The bundle's identity for FastFlow is the recorded weights hash: a copy of the bundle whose
    backbone.onnx bytes differ (re-exported elsewhere) keeps the same identity."""
    from anchorflow.runtime.bundles.models import model_meta as _bundle_meta

    meta = json.loads((BUNDLE / "bundle.json").read_text())
    weights = meta["networks"]["backbone"]["checkpoint"]["weights_sha256"]
    assert _bundle_meta(meta)["model_id"] == weights != meta["networks"]["backbone"]["sha256"]
    reexported = json.loads(json.dumps(meta))
    reexported["networks"]["backbone"]["sha256"] = "0" * 64
    reexported["networks"]["backbone"]["checkpoint"]["path"] = "/elsewhere/backbone"
    assert _bundle_meta(reexported)["model_id"] == weights
