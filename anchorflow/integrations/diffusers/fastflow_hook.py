"""FastFlow inside a diffusers pipeline: a hook on ``pipe.transformer`` that skips calls.

Bajpai et al., "FastFlow" (arXiv 2602.11105). The pipeline and its scheduler run unchanged; at a
step the bandit chose to skip, the hook returns the finite-difference extrapolation
``v_q + (t - t_q) (v_q - v_p) / (t_q - t_p)`` of the last two computed transformer outputs
instead of calling the transformer. The per-step bookkeeping (extrapolation, extrapolation
error, reward, UCB1 choice) is the runtime's own (:mod:`anchorflow.runtime.solving.solvers.fastflow_loop`);
the bandit state persists in the same file format, loaded and merged under the same lock, as
``anchorflow sample --bandit-state``.

Steps are read from ``pipe.scheduler`` (``step_index``, ``sigmas``); a generation starts at step 0
and ends after its last step (always computed). The bandits see raw transformer outputs: all the
rows of a step (cond and uncond, both calls of FLUX's true CFG), one decision per step. FastFlow's
base solver is Euler: use it with the pipeline's FlowMatchEulerDiscreteScheduler (or
``AnchorflowScheduler("euler")``). Time: sigma = t, 1 noise -> 0 data.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from ...base._deps import require
from ...base.errors import ConfigError
from ...runtime.fastflow import state as bandit_state
from .capture import keywords
from ...runtime.fastflow.bandit import BanditKey, FastFlowBandit, budget_target, calibrated_mu, check_arms
from ...runtime.fastflow.learning import AskedSettings
from ...runtime.solving.solvers.fastflow_loop import FastFlowRun, extrapolate, generation_info

HOOK_NAME = "anchorflow_fastflow"


def model_fingerprint(module: Any) -> str:
    """Identity of a diffusers model: class, config, and per-tensor sums of its weights (cheap on GPU)."""
    torch = require("torch", extra="diffusers")
    h = hashlib.sha256(type(module).__name__.encode())
    h.update(json.dumps(dict(getattr(module, "config", {})), sort_keys=True, default=str).encode())
    with torch.no_grad():
        for name, p in module.state_dict().items():
            p = p.detach().double()
            h.update(f"{name}{tuple(p.shape)}{p.sum().item():.17g}{p.square().sum().item():.17g}".encode())
    return f"{type(module).__name__}:{h.hexdigest()[:16]}"


class _Generation:
    """One pipeline call's FastFlow run: the runtime's :class:`FastFlowRun` plus the per-step call rows."""

    def __init__(self, grid: np.ndarray, bandit: FastFlowBandit, tail: int) -> None:
        self.grid, self.bandit, self.T = grid, bandit, len(grid) - 1
        if not 1 <= tail <= self.T:
            raise ConfigError(f"tail must be an integer in 1..T ({self.T}): the last steps always computed; got {tail}")
        self.run = FastFlowRun(self.T, tail, forced_zero=bandit.mu is None or bandit.mu == 0.0, fixed_skip=None)
        self.k = -1  # the step whose calls are being seen
        self.branch = 0  # calls seen so far at step k
        self.outs: list[np.ndarray] = []  # this step's computed outputs, one per call
        self.branch_rows: Optional[list[int]] = None  # rows of each call of a step (from step 0)
        self.skip = 0
        self.skipping = False
        self.calls = 0

    def enter(self, k: int) -> None:
        """First call of step k: settle the previous step, then decide whether k is computed."""
        self.flush()
        self.k, self.outs, self.branch = k, [], 0
        self.skipping = self.skip > 0
        if self.skipping:
            self.skip -= 1

    def flush(self) -> None:
        if self.k < 0 or self.skipping or not self.outs:
            return
        if self.branch_rows is None:
            self.branch_rows = [o.shape[0] for o in self.outs]
        v = np.concatenate(self.outs, axis=0)
        t = float(self.grid[self.k])
        self.run.computed_step(self.k, t, v, self.bandit)
        self.skip = self.run.decide(self.k, self.bandit)
        self.outs = []

    def extrapolated(self, branch: int) -> np.ndarray:
        """This skipped step's extrapolated output for call ``branch`` of the step."""
        if self.branch_rows is None or branch >= len(self.branch_rows):
            raise ConfigError("the pipeline made more transformer calls in a step than at step 0; FastFlow cannot skip here")
        v = extrapolate(*self.run.anchors, float(self.grid[self.k]))
        lo = sum(self.branch_rows[:branch])
        return v[lo: lo + self.branch_rows[branch]]

    def finished(self) -> bool:
        return self.k == self.T - 1 and self.branch_rows is not None and len(self.outs) == len(self.branch_rows)

    def info(self, learn: bool) -> dict:
        mu = self.bandit.mu
        calibrated = calibrated_mu(self.run.mse, self.T) if mu is None else None
        info = generation_info(self.run, mu, calibrated, learn)
        info.update(transformer_calls=self.calls, steps=self.T, calls_per_step=len(self.branch_rows or [1]))
        return info


class FastFlowHook:
    """The FastFlow hook of :func:`apply_fastflow`; ``history`` holds one info dict per generation.

    Each info has ``calls`` (computed steps), ``transformer_calls`` (calls made), ``steps`` (T),
    ``calls_per_step``, ``computed``, ``arms``, ``skip_hist``, ``mse``, ``rewards``, ``mu``.
    """

    def __init__(self, pipe: Any, *, state_path: Optional[str], model_id: Optional[str], tail: int, seed: int,
                 learn: bool, **settings: Any) -> None:
        self.pipe = pipe
        self.state_path = None if state_path is None else os.fspath(state_path)
        self.model_id = model_id or model_fingerprint(pipe.transformer)
        self.settings = settings  # arms, gamma, calls, speedup, mu, mu_factor, tol, adapt
        self.tail, self.seed, self.learn = int(tail), int(seed), bool(learn)
        self.bandit: Optional[FastFlowBandit] = None  # the in-memory bandit (no state file)
        self.history: list[dict] = []
        self.gen: Optional[_Generation] = None
        self._registry = None

    # -- bandit state: as runtime.fastflow.solve_with_state / PendingUpdate.commit -----------------
    def _asked(self, T: int) -> AskedSettings:
        s = self.settings
        target = None if s["calls"] is None and s["speedup"] is None else budget_target(T, s["calls"], s["speedup"])
        arms = None if s["arms"] is None else check_arms(s["arms"])
        return AskedSettings(arms, s["gamma"], target, s["mu"], s["mu_factor"], s["tol"], s["adapt"])

    def _open(self, grid: np.ndarray) -> FastFlowBandit:
        """The bandit for this grid: the state file's (as ``anchorflow sample --bandit-state``) or in memory."""
        T, key = len(grid) - 1, BanditKey.of(grid, self.model_id)
        asked = self._asked(T)
        if self.state_path is None:
            if self.bandit is None or self.bandit.key.differences(key):
                self.bandit = asked.fresh(T, grid, self.model_id, self.seed)
            return self.bandit
        with bandit_state.state_lock(self.state_path):
            exists = Path(self.state_path).exists()
            bandit = bandit_state.load(self.state_path, key=key) if exists else asked.fresh(T, grid, self.model_id, self.seed)
        asked.apply(bandit, self.state_path)
        return bandit

    def _commit(self, gen: _Generation) -> None:
        info = gen.info(self.learn)
        self.history.append(info)
        if not self.learn:
            return
        if self.state_path is None:
            gen.bandit.merge(info)
            return
        rng_state, asked = gen.bandit.rng.bit_generator.state, self._asked(gen.T)

        def apply(latest: FastFlowBandit) -> None:
            asked.apply(latest, self.state_path)
            latest.merge(info, rng_state)

        bandit_state.update(self.state_path, apply, key=BanditKey.of(gen.grid, self.model_id),
                            create=lambda: asked.fresh(gen.T, gen.grid, self.model_id, self.seed))

    # -- the hook -------------------------------------------------------------------------------
    def _step(self) -> tuple[int, np.ndarray]:
        sched = self.pipe.scheduler
        k = sched.step_index
        if k is None:
            k = sched.begin_index or 0
        grid = sched.sigmas.detach().to("cpu").double().numpy()
        return int(k), grid

    def forward(self, original: Any, kwargs: dict) -> Any:
        torch = require("torch", extra="diffusers")
        k, grid = self._step()
        gen = self.gen
        if gen is None or k < gen.k or len(grid) - 1 != gen.T:
            gen = self.gen = _Generation(grid, self._open(grid), self.tail)
        if k != gen.k:
            gen.enter(k)
        branch, gen.branch = gen.branch, gen.branch + 1
        if gen.skipping:
            ref = kwargs["hidden_states"]
            v = torch.from_numpy(gen.extrapolated(branch)).to(ref.device, ref.dtype)
            return _wrap(v, kwargs)
        out = original(**kwargs)
        gen.calls += 1
        sample = out[0] if isinstance(out, tuple) else out.sample
        gen.outs.append(sample.detach().to("cpu", torch.float32).numpy())
        if gen.finished():
            gen.flush()
            self.gen = None
            self._commit(gen)
        return out

    def remove(self) -> None:
        """Detach the hook: the transformer's forward is the original again."""
        if self._registry is not None:
            self._registry.remove_hook(HOOK_NAME, recurse=False)
            self._registry = None

    def summary(self) -> str:
        """One line per generation: transformer calls used against the scheduler's steps."""
        return "\n".join(f"generation {i}: {h['transformer_calls']} transformer calls for {h['steps']} steps "
                         f"(skips {dict(Counter(a for a in h['arms'] if a))})" for i, h in enumerate(self.history))


def _wrap(v: Any, kwargs: dict) -> Any:
    """A skipped call's output in the type the transformer returns for these kwargs."""
    if not kwargs.get("return_dict", True):
        return (v,)
    from diffusers.models.modeling_outputs import Transformer2DModelOutput

    return Transformer2DModelOutput(sample=v)


def apply_fastflow(pipe: Any, *, state_path: Optional[str | os.PathLike] = None, model_id: Optional[str] = None,
                   arms: Optional[Sequence[int]] = None, gamma: Optional[float] = None, calls: Optional[float] = None,
                   speedup: Optional[float] = None, mu: Optional[float] = None, mu_factor: Optional[float] = None,
                   tol: Optional[float] = None, adapt: Optional[bool] = None, tail: int = 1, seed: int = 0,
                   learn: bool = True) -> FastFlowHook:
    """Put FastFlow on ``pipe.transformer``; returns the hook (``.history``, ``.summary()``, ``.remove()``).

    ``state_path``: a bandit state file with ``anchorflow sample --bandit-state`` semantics (loaded
    at each generation's start, merged under its lock at its end; None keeps the bandits in memory
    across calls). ``model_id``: the transformer's identity in the state key (default: a fingerprint
    of its class, config and weights; add the guidance setting when it changes). ``arms``, ``gamma``,
    ``calls`` / ``speedup`` (the calls budget; default speed-up 3), ``mu``, ``mu_factor``, ``tol``,
    ``adapt``, ``seed``: the bandit's settings, as :class:`anchorflow.runtime.fastflow.bandit.FastFlowBandit`
    takes them (a state file's own are kept; contradicting ones are refused). ``tail``: last steps
    always computed.
    """
    from diffusers.hooks import HookRegistry, ModelHook

    hook = FastFlowHook(pipe, state_path=state_path, model_id=model_id, tail=tail, seed=seed, learn=learn,
                        arms=arms, gamma=gamma, calls=calls, speedup=speedup, mu=mu, mu_factor=mu_factor,
                        tol=tol, adapt=adapt)

    class _Hook(ModelHook):
        def new_forward(self, module: Any, *args: Any, **kwargs: Any) -> Any:
            return hook.forward(self.fn_ref.original_forward, keywords(args, kwargs))

    registry = HookRegistry.check_if_exists_or_initialize(pipe.transformer)
    if registry.get_hook(HOOK_NAME) is not None:
        raise ConfigError("this pipeline already has FastFlow applied; call .remove() on its hook first")
    registry.register_hook(_Hook(), HOOK_NAME)
    hook._registry = registry
    return hook
