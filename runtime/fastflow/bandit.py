"""FastFlow's bandits: one UCB1 bandit per grid step, and the budget that sets their price.

Bajpai et al., "FastFlow: Accelerating The Generative Flow Matching Models with Bandit
Inference" (arXiv 2602.11105, ICLR 2026), with the project's decisions written out below (the
calls budget that sets mu, the quality guard).
After a computed Euler step k (t = 1 noise -> t = 0 data), bandit B_k picks an arm a: "skip
the next a steps" (their velocities are extrapolated). B_k is paid at the next computed step
m = k + a + 1 with ``r = mu * a - mse(v_hat_m, v_m)``; Q is the running mean of r, N the count.

mu, the price of one backbone call in squared-velocity units, is what makes the rule work or
fail on a model: the paper's calibration (``max_k mse_k / T``) is set by the single worst
step, and the mu that met the speed goal ranged over 23x-770x of it across fields. So the
default is a **budget**: a target of ``calls`` backbone calls per generation (or a speed-up
``T / calls``, 3x by default), and after each generation ``mu <- mu exp(eta (calls - C) / C)``;
every stored Q(a) moves by the change of mu times a (times the share of its rewards that were
paid the skip term), so Q stays the mean reward under the current mu. The bandits then decide
*where* the budget is spent. A fixed mu (the paper's behaviour) stays an option.

Quality guard: with ``tol`` set, a skip whose extrapolation error exceeds ``tol`` times the
velocity's RMS (``sqrt(mse) > tol * rms(v_m)``) is never rewarded: it is charged
``-mu * a - mse``, as much as an allowed skip is paid.

Pure maths and choices: no files, no clocks (the state file is :mod:`.bandit_state`).
"""

from __future__ import annotations

import copy
import hashlib
import math
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import numpy as np

from ...base.errors import ConfigError
from ..solving.grids import GridSpec, make_grid

DEFAULT_ARMS = (0, 2, 4, 6)
DEFAULT_GAMMA = 2.0
DEFAULT_SPEEDUP = 3.0
DEFAULT_ETA = 0.3  # mu's step per generation: log mu moves by eta * relative calls error
BONUS_UNITS = ("mu", "raw")
REWARDS = ("residual", "estimate")  # what a skip is charged: velocity residual, or the state-unit estimate
HISTORY = 200  # generations of (calls, mu) kept for reports


def grid_sha256(grid: Sequence[float] | np.ndarray) -> str:
    """sha256 of the grid's float64 values: two grids share bandits only if they are identical."""
    return hashlib.sha256(np.ascontiguousarray(grid, dtype="<f8").tobytes()).hexdigest()


@dataclass(frozen=True)
class BanditKey:
    """What a bandit state is valid for: grid size T, the grid's hash, and the model identity."""

    T: int
    grid_sha256: str
    model_id: str

    @classmethod
    def of(cls, grid: Sequence[float] | np.ndarray, model_id: str) -> "BanditKey":
        return cls(len(grid) - 1, grid_sha256(grid), str(model_id))

    def differences(self, other: "BanditKey") -> list[str]:
        """Human-readable differences ``field: self vs other`` (empty when the keys match)."""
        out = []
        if self.T != other.T:
            out.append(f"grid size T {self.T} vs {other.T}")
        elif self.grid_sha256 != other.grid_sha256:
            out.append("time grid values (e.g. uniform vs shifted)")
        if self.model_id != other.model_id:
            out.append(f"model {self.model_id!r} vs {other.model_id!r}")
        return out


def calibrated_mu(mses: Iterable[Optional[float]], T: int) -> float:
    """``mu = max_k mse_k / T`` from a fully computed generation's extrapolation errors mse_k."""
    values = [m for m in mses if m is not None]
    if not values:
        raise ConfigError("mu calibration needs at least one extrapolation error (T >= 3)")
    return float(max(values)) / T


def check_arms(arms: Iterable[int]) -> tuple[int, ...]:
    """Sorted distinct skip lengths >= 0 that include 0; anything else -> ConfigError."""
    try:
        values = tuple(sorted(int(a) for a in arms))
    except (TypeError, ValueError):
        raise ConfigError(f"arms must be integers (steps to skip), got {arms!r}") from None
    if 0 not in values or len(set(values)) != len(values) or values[0] < 0:
        raise ConfigError(f"arms must be distinct integers >= 0 and include 0 (compute the next step); got {arms!r}")
    return values


def _number(name: str, value, *, low: float = 0.0, strict: bool = False, optional: bool = True) -> Optional[float]:
    """A finite float >= low (> low when strict), or None when allowed; else ConfigError."""
    if value is None and optional:
        return None
    ok = isinstance(value, (int, float, np.floating, np.integer)) and not isinstance(value, bool)
    if not ok or not math.isfinite(value) or value < low or (strict and value == low):
        raise ConfigError(f"{name} must be a finite number {'>' if strict else '>='} {low:g}, got {value!r}")
    return float(value)


def budget_target(T: int, calls: Optional[float], speedup: Optional[float]) -> float:
    """The target backbone calls per generation from ``calls`` or ``speedup`` (T / speedup)."""
    if calls is not None and speedup is not None:
        raise ConfigError("give a budget as calls or as speedup, not both")
    if calls is not None:
        c = _number("calls", calls, low=3.0)
        if c > T:
            raise ConfigError(f"calls must be in 3..T ({T}): the budget of backbone calls per generation; got {calls!r}")
        return c
    if speedup is None:  # the default: 3x, or as close as a short grid allows (3 calls at least)
        return max(T / DEFAULT_SPEEDUP, min(3.0, float(T)))
    s = _number("speedup", speedup, low=1.0)
    if T / s < 3.0:
        raise ConfigError(f"speedup {s:g} leaves fewer than 3 of the {T} steps computed; use at most {T / 3:g}")
    return T / s


class FastFlowBandit:
    """Per-step UCB1 bandits for FastFlow's skip lengths on one grid and one model.

    Args:
        T: number of grid steps.
        grid: the time grid spec (None / "uniform", "shift:S", or T + 1 times from 1 to 0).
        model_id: identity of the field this state is learned for (weights and guidance).
        arms: skip lengths to choose from (must include 0); default (0, 2, 4, 6).
        gamma: UCB1 exploration weight: ``argmax_a Q_k(a) + gamma * u * sqrt(ln n_k / N_k(a))``.
        calls, speedup: the budget, backbone calls per generation (speedup: ``calls = T / speedup``).
            Default when neither ``mu`` nor ``adapt=False`` is given: speedup 3.
        mu: reward per skipped step. With a budget it is the starting value (None: calibrated by
            the first, fully computed generation, then adapted); without one it is fixed
            (None: the paper's calibration, ``mu_factor * max_k mse_k / T``). mu = 0: never skip.
        adapt: None (default): adapt mu to the budget unless a fixed ``mu`` is given without one;
            False: the paper's fixed mu; True: adapt (a budget is then required or defaulted).
        eta: adaptation rate of log mu per generation.
        tol: quality guard; a skip whose RMS extrapolation error exceeds ``tol`` times the RMS of
            the computed velocity is charged ``-mu * a - mse`` (None: no guard).
        bonus: the unit u of the exploration bonus. "mu" (default, a project decision): u = mu,
            UCB1 on rewards measured in skipped steps, independent of the velocity scale.
            "raw": u = 1, the formula taken literally.
        mu_factor: scales the calibrated mu (1 = the paper's rule).
        seed: seeds the tie-breaking generator.
        reward: what a skip is charged (stored as ``reward_mode``). "residual" (default, the
            paper): ``mse(v_hat_m, v_m)``, squared velocity units. "estimate": the solver's own
            predictor-corrector difference over the skipped span, in squared *state* units
            (:func:`anchorflow.runtime.solving.solvers.fastflow_loop.pc_weight`); mu is then a
            price in state units too (its calibration weights each residual by the squared step).

    Arrays (T, A), A = len(arms): ``Q`` float64 mean rewards, ``N`` int64 pulls, ``R`` int64
    pulls paid ``+mu * a`` (the others were refused by the quality guard and charged ``-mu * a``).
    """

    def __init__(self, T: int, grid: GridSpec = None, *, model_id: str = "", arms: Sequence[int] = DEFAULT_ARMS,
                 gamma: float = DEFAULT_GAMMA, calls: Optional[float] = None, speedup: Optional[float] = None,
                 mu: Optional[float] = None, adapt: Optional[bool] = None, eta: float = DEFAULT_ETA,
                 tol: Optional[float] = None, bonus: str = "mu", mu_factor: float = 1.0, seed: int = 0,
                 reward: str = "residual") -> None:
        if reward not in REWARDS:
            raise ConfigError(f"reward must be one of {', '.join(REWARDS)}, got {reward!r}")
        self.reward_mode = reward
        if bonus not in BONUS_UNITS:
            raise ConfigError(f"bonus must be one of {BONUS_UNITS}, got {bonus!r}")
        if isinstance(T, bool) or not isinstance(T, (int, np.integer)) or T < 3:
            raise ConfigError(f"FastFlow needs a grid of T >= 3 steps, got {T!r}")
        self.grid = make_grid(int(T), grid)
        self.key = BanditKey.of(self.grid, model_id)
        self.arms = check_arms(arms)
        self.gamma = _number("gamma", gamma, optional=False)
        self.mu = _number("mu", mu)
        self.mu_factor = _number("mu_factor", mu_factor, strict=True, optional=False)
        self.eta = _number("eta", eta, optional=False)
        self.tol = _number("tol", tol, strict=True)
        self.bonus, self.seed = bonus, int(seed)
        budget = calls is not None or speedup is not None
        if adapt is None:
            adapt = budget or self.mu is None
        if not adapt and budget:
            raise ConfigError("a calls/speedup budget adapts mu; drop the budget or adapt=False")
        self.target = budget_target(int(T), calls, speedup) if adapt else None
        self.rng = np.random.default_rng(self.seed)
        self.Q = np.zeros((int(T), len(self.arms)))
        self.N = np.zeros((int(T), len(self.arms)), dtype=np.int64)
        self.R = np.zeros_like(self.N)
        self.generations = 0
        self.history: list[list[float]] = []  # [calls, mu after the generation], last HISTORY

    @property
    def T(self) -> int:
        return self.key.T

    @property
    def adaptive(self) -> bool:
        """True when mu follows a calls budget (``target``)."""
        return self.target is not None

    # -- choices ----------------------------------------------------------------------------------
    def select(self, k: int, max_arm: int, min_arm: int = 0) -> int:
        """B_k's UCB1 choice among the arms in ``min_arm..max_arm``; an untried arm first (lowest first).

        ``min_arm`` > 0 where a calls cap forbids the shorter skips (the bonus still counts
        every pull of B_k)."""
        idx = [i for i, a in enumerate(self.arms) if min_arm <= a <= max_arm]
        if not idx:
            raise ConfigError(f"no arm of {self.arms} fits in {min_arm}..{max_arm} steps")
        n = self.N[k, idx]
        untried = np.flatnonzero(n == 0)
        if untried.size:
            return self.arms[idx[untried[0]]]
        unit = self.mu if self.bonus == "mu" and self.mu else 1.0
        score = self.Q[k, idx] + (self.gamma * unit) * np.sqrt(np.log(self.N[k].sum()) / n)
        best = np.flatnonzero(score == score.max())
        pick = int(best[0]) if best.size == 1 else int(self.rng.choice(best))
        return self.arms[idx[pick]]

    def greedy(self) -> list[Optional[int]]:
        """Per step, the arm with the best Q among those tried (None where nothing was tried)."""
        out: list[Optional[int]] = []
        for q, n in zip(self.Q, self.N):
            tried = np.flatnonzero(n > 0)
            out.append(None if tried.size == 0 else self.arms[int(tried[np.argmax(q[tried])])])
        return out

    # -- learning ---------------------------------------------------------------------------------
    def reward(self, arm: int, mse: float, paid: bool = True) -> float:
        """``mu * arm - mse`` under the current mu (``-mu * arm - mse`` when the guard refused the skip)."""
        return (1.0 if paid else -1.0) * float(self.mu or 0.0) * arm - float(mse)

    def guard_ok(self, mse: float, v_ms: float) -> bool:
        """The quality guard: False when ``sqrt(mse) > tol * sqrt(v_ms)`` (v_ms: mean square of v_m)."""
        return self.tol is None or mse <= self.tol**2 * v_ms

    def observe(self, k: int, arm: int, reward: float, paid: bool = True) -> None:
        """Credit ``reward`` to arm ``arm`` of B_k (running mean); ``paid``: it included ``mu * arm``."""
        i = self.arms.index(int(arm))
        self.N[k, i] += 1
        self.R[k, i] += bool(paid)
        self.Q[k, i] += (float(reward) - self.Q[k, i]) / self.N[k, i]

    def set_mu(self, mu: float) -> None:
        """Change mu and shift every Q(a) by ``(mu_new - mu_old) * a * (R - (N - R)) / N``: the paid
        rewards hold ``+mu a``, the refused ones ``-mu a``, so Q stays their exact running mean."""
        old = float(self.mu or 0.0)
        a = np.asarray(self.arms, dtype=np.float64)[None, :]
        share = np.divide(2 * self.R - self.N, self.N, out=np.zeros(self.Q.shape), where=self.N > 0)
        self.Q += (float(mu) - old) * a * share
        self.mu = float(mu)

    def adapt(self, calls: float) -> None:
        """One budget step: ``mu <- mu * exp(eta * (calls - target) / target)``."""
        if self.target is not None and self.mu:
            self.set_mu(self.mu * math.exp(self.eta * (float(calls) - self.target) / self.target))

    def merge(self, info: dict, rng_state: Optional[dict] = None) -> None:
        """Apply one generation's outcome (a fastflow ``Result.info``) to this state.

        Rewards are recomputed from the recorded losses under *this* state's mu, so a state
        whose mu moved meanwhile (another process merged first) stays consistent.
        """
        if self.mu is None and info.get("calibrated_mu") is not None:
            self.mu = self.mu_factor * float(info["calibrated_mu"])
        for k, arm, mse, paid in info.get("losses", ()):
            self.observe(int(k), int(arm), self.reward(int(arm), float(mse), bool(paid)), bool(paid))
        self.generations += 1
        if not info.get("calibration"):  # a capped run: the calls it would have made (calls_demand)
            self.adapt(info.get("calls_demand", info.get("calls", self.T)))
        self.history = [*self.history, [float(info.get("calls", self.T)), self.mu]][-HISTORY:]
        if rng_state is not None:
            self.rng.bit_generator.state = rng_state

    def copy(self) -> "FastFlowBandit":
        return copy.deepcopy(self)

    def settings(self) -> dict:
        """What a state file learned with (compared when a run asks for other settings)."""
        return {"arms": list(self.arms), "gamma": self.gamma, "target": self.target, "tol": self.tol,
                "bonus": self.bonus, "mu_factor": self.mu_factor, "eta": self.eta,
                "mu": None if self.adaptive else self.mu, "reward": self.reward_mode}
