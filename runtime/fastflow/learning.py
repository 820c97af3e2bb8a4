"""FastFlow with a state file: load (or create) the bandits, solve, then merge what was learned.

This sits *above* :func:`anchorflow.runtime.solve` (the solver loop is
:mod:`.solvers.fastflow`, the bandit maths :mod:`.bandit`, the file :mod:`.bandit_state`), so
nothing below imports it. All-or-nothing: :func:`solve_with_state` returns a
:class:`PendingUpdate` whose :meth:`~PendingUpdate.commit` merges the generation into the file;
a command commits only after its own outputs are written, so a failed command leaves the state
as it was. :func:`run_with_state` does both at once. Time convention: t = 1 noise, t = 0 data.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

from ...base.errors import ConfigError, StateFileError
from . import state as bandit_state
from .bandit import DEFAULT_ARMS, DEFAULT_GAMMA, BanditKey, FastFlowBandit, budget_target, check_arms
from ..solving.grids import GridSpec, make_grid
from ..solving.result import Result
from ..solving.solve import solve

__all__ = ["AskedSettings", "FastFlowBandit", "PendingUpdate", "guided_model_id", "run_with_state", "solve_with_state"]


def guided_model_id(model_id: str, cfg_scale: float = 1.0, cfg_interval: Optional[Sequence[float]] = None) -> str:
    """The identity of the field the bandits see: the backbone's weights plus its guidance, if any."""
    if float(cfg_scale) == 1.0:
        return model_id
    lo, hi = (0.0, 1.0) if cfg_interval is None else (float(cfg_interval[0]), float(cfg_interval[1]))
    return f"{model_id}|cfg {float(cfg_scale):g} on ({lo:g}, {hi:g}]"


@dataclass
class AskedSettings:
    """The bandit settings a run asks for; None means "whatever the state file holds".

    :meth:`fresh` makes the bandits of a new state-file entry from them; :meth:`apply` checks
    them against bandits loaded from the file (refusing a contradiction, taking a new calls
    budget over). Used by :func:`solve_with_state` and by drivers with their own step loop.
    """

    arms: Optional[tuple[int, ...]] = None
    gamma: Optional[float] = None
    target: Optional[float] = None
    mu: Optional[float] = None
    mu_factor: Optional[float] = None
    tol: Optional[float] = None
    adapt: Optional[bool] = None
    extra: dict = field(default_factory=dict)

    def fresh(self, T: int, grid: np.ndarray, model_id: str, seed: int) -> FastFlowBandit:
        budget = {} if self.target is None else {"calls": self.target}
        return FastFlowBandit(T, grid, model_id=model_id, arms=DEFAULT_ARMS if self.arms is None else self.arms,
                              gamma=DEFAULT_GAMMA if self.gamma is None else self.gamma, mu=self.mu,
                              mu_factor=1.0 if self.mu_factor is None else self.mu_factor, tol=self.tol,
                              adapt=self.adapt, seed=seed, **budget)

    def apply(self, b: FastFlowBandit, path: Any) -> None:
        """Refuse settings that contradict what ``b`` learned with; a new budget is taken over."""
        if self.adapt is False and b.adaptive or (self.adapt or self.target is not None) and not b.adaptive:
            mode = "a calls budget" if b.adaptive else "a fixed mu"
            raise StateFileError(f"{path} was learned with {mode}; use another state file to change that")
        held = b.settings()
        for name in ("arms", "gamma", "mu", "mu_factor", "tol"):
            value = getattr(self, name)
            value = list(value) if name == "arms" and value is not None else value
            if value is not None and held[name] is not None and value != held[name]:
                raise StateFileError(
                    f"{path} was learned with {name}={held[name]!r} but {name}={value!r} was asked; "
                    f"omit {name} to continue with the file's value, or use another state file"
                )
        if self.target is not None:
            b.target = self.target  # a new budget: mu re-adapts from where it is


@dataclass
class PendingUpdate:
    """One solved generation whose learning is not in the state file yet; :meth:`commit` puts it there."""

    result: Result
    path: str
    key: BanditKey
    asked: AskedSettings
    create: Callable[[], FastFlowBandit]
    rng_state: Optional[dict]
    lock_timeout: float
    committed: bool = False

    def commit(self) -> Optional[FastFlowBandit]:
        """Merge this generation into the file's latest state under its lock (once); returns it."""
        if self.committed or self.rng_state is None:
            return None

        def apply(latest: FastFlowBandit) -> None:
            self.asked.apply(latest, self.path)
            latest.merge(self.result.info, self.rng_state)

        saved = bandit_state.update(self.path, apply, key=self.key, create=self.create, timeout=self.lock_timeout)
        self.committed = True
        return saved


def solve_with_state(
    velocity: Callable,
    noise: np.ndarray,
    T: int,
    state_path: str | os.PathLike,
    model_id: str,
    *,
    grid: GridSpec = None,
    arms: Optional[Sequence[int]] = None,
    gamma: Optional[float] = None,
    calls: Optional[float] = None,
    speedup: Optional[float] = None,
    mu: Optional[float] = None,
    mu_factor: Optional[float] = None,
    tol: Optional[float] = None,
    adapt: Optional[bool] = None,
    seed: int = 0,
    learn: bool = True,
    lock_timeout: float = bandit_state.LOCK_TIMEOUT_S,
    **solve_kwargs: Any,
) -> PendingUpdate:
    """Sample one batch with FastFlow from the bandit state file ``state_path``; learn on commit.

    Loads the file under its lock (or starts a fresh bandit: by default a 3x speed-up budget,
    see :class:`FastFlowBandit` for ``calls`` / ``speedup`` / ``mu`` / ``adapt`` / ``tol``) and
    solves without holding the lock. ``model_id`` names the weights; the guidance setting is
    added to it (:func:`guided_model_id`), so one file never mixes guided fields. A budget
    different from the file's replaces it; other settings that differ are refused.
    ``solve_kwargs`` go to :func:`anchorflow.runtime.solve` (y, cfg_scale, tail, ...).
    """
    if not isinstance(model_id, str) or not model_id:
        raise ConfigError("a bandit state file needs a model identity (model_id), e.g. the weights' sha256")
    model_id = guided_model_id(model_id, solve_kwargs.get("cfg_scale", 1.0), solve_kwargs.get("cfg_interval"))
    t_grid = make_grid(T, grid)
    key = BanditKey.of(t_grid, model_id)
    target = None if calls is None and speedup is None else budget_target(T, calls, speedup)
    asked = AskedSettings(None if arms is None else check_arms(arms), gamma, target, mu, mu_factor, tol, adapt)
    path = os.fspath(state_path)

    def create() -> FastFlowBandit:
        return asked.fresh(T, t_grid, model_id, seed)

    with bandit_state.state_lock(path, lock_timeout):
        b = bandit_state.load(path, key=key) if Path(path).exists() else create()
    asked.apply(b, path)
    result = solve("fastflow", velocity, noise, T, grid=t_grid, bandit=b, learn=learn, **solve_kwargs)
    rng_state = b.rng.bit_generator.state if learn else None
    return PendingUpdate(result, path, key, asked, create, rng_state, lock_timeout)


def run_with_state(*args: Any, **kwargs: Any) -> Result:
    """:func:`solve_with_state` and commit at once; returns the :class:`Result`."""
    pending = solve_with_state(*args, **kwargs)
    pending.commit()
    return pending.result
