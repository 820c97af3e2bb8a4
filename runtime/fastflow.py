"""FastFlow's bandits: one UCB1 bandit per grid step, persisted across runs.

Bajpai et al., "FastFlow: Accelerating The Generative Flow Matching Models with Bandit
Inference" (arXiv 2602.11105, ICLR 2026), with the project's decisions from the FastFlow spec.
After a computed Euler step k (t = 1 noise -> t = 0 data), bandit B_k picks an arm a: "skip
the next a steps" (their velocities are extrapolated). B_k is paid at the next computed step
m = k + a + 1 with ``r = mu * a - mse(v_hat_m, v_m)``; Q is the running mean of r, N the count.

The state is keyed by the time grid (T and a hash of its values) and a model identity string
the caller gives (e.g. the bundle's backbone sha256); it persists as versioned JSON, replaced
atomically, with a lock file beside it for concurrent writers (:func:`update_file`).
:func:`run_with_state` is the one call a command needs: load or create, solve, merge, save.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

import numpy as np

from .._io import write_json
from ..errors import ConfigError, StateFileError
from .grids import GridSpec, make_grid

SCHEMA = "anchorflow.fastflow-bandit"
VERSION = 1
DEFAULT_ARMS = (0, 2, 4, 6)
DEFAULT_GAMMA = 2.0
BONUS_UNITS = ("mu", "raw")
LOCK_TIMEOUT_S = 120.0


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


def _check_arms(arms: Iterable[int]) -> tuple[int, ...]:
    try:
        values = tuple(sorted(int(a) for a in arms))
    except (TypeError, ValueError):
        raise ConfigError(f"arms must be integers (steps to skip), got {arms!r}") from None
    if 0 not in values or len(set(values)) != len(values) or values[0] < 0:
        raise ConfigError(f"arms must be distinct integers >= 0 and include 0 (compute the next step); got {arms!r}")
    return values


def _check_mu(mu: Optional[float]) -> Optional[float]:
    if mu is None:
        return None
    if not (isinstance(mu, (int, float)) and math.isfinite(mu) and mu >= 0):
        raise ConfigError(f"mu must be a finite number >= 0 (or None to calibrate it), got {mu!r}")
    return float(mu)


class FastFlowBandit:
    """Per-step UCB1 bandits for FastFlow's skip lengths on one grid and one model.

    Args:
        T: number of grid steps.
        grid: the time grid spec (None / "uniform", "shift:S", or T + 1 times from 1 to 0).
        model_id: identity of the backbone this state is learned for.
        arms: skip lengths to choose from (must include 0); default (0, 2, 4, 6).
        gamma: UCB1 exploration weight: ``argmax_a Q_k(a) + gamma * u * sqrt(ln n_k / N_k(a))``.
        bonus: the unit u of the exploration bonus. "mu" (default, a project decision): u = mu,
            i.e. UCB1 on rewards measured in skipped steps (``a - mse / mu``), which makes gamma
            independent of the model's velocity scale. "raw": u = 1, the formula taken literally;
            with a calibrated mu (rewards ~ 1e-4) the bonus then dwarfs every reward and the
            bandits keep exploring round-robin (see benchmarks/results/fastflow.md).
        mu: reward per skipped step; None: calibrated by the first (fully computed) generation
            as ``mu_factor * max_k mse_k / T``. mu = 0 disables skipping.
        mu_factor: scales the calibrated mu (1 = the paper's rule). The calibrated rule is
            cautious: on the digits model 10-30 gives 3-3.6x fewer calls at a PSNR above
            Euler-25 (benchmarks/results/fastflow.md).
        seed: seeds the tie-breaking generator (its state is saved with the bandit).

    Arrays: ``Q`` (T, A) float64 running mean rewards, ``N`` (T, A) int64 pull counts, A = len(arms).
    """

    def __init__(
        self,
        T: int,
        grid: GridSpec = None,
        *,
        model_id: str = "",
        arms: Sequence[int] = DEFAULT_ARMS,
        gamma: float = DEFAULT_GAMMA,
        mu: Optional[float] = None,
        seed: int = 0,
        bonus: str = "mu",
        mu_factor: float = 1.0,
    ) -> None:
        if bonus not in BONUS_UNITS:
            raise ConfigError(f"bonus must be one of {BONUS_UNITS}, got {bonus!r}")
        if isinstance(T, bool) or not isinstance(T, (int, np.integer)) or T < 3:
            raise ConfigError(f"FastFlow needs a grid of T >= 3 steps, got {T!r}")
        if not (isinstance(gamma, (int, float)) and math.isfinite(gamma) and gamma >= 0):
            raise ConfigError(f"gamma must be a finite number >= 0, got {gamma!r}")
        self.grid = make_grid(int(T), grid)
        self.key = BanditKey.of(self.grid, model_id)
        self.arms = _check_arms(arms)
        self.gamma = float(gamma)
        self.bonus = bonus
        self.mu = _check_mu(mu)
        if not (isinstance(mu_factor, (int, float)) and math.isfinite(mu_factor) and mu_factor > 0):
            raise ConfigError(f"mu_factor must be a finite number > 0, got {mu_factor!r}")
        self.mu_factor = float(mu_factor)
        self.seed = int(seed)
        self.rng = np.random.default_rng(self.seed)
        self.Q = np.zeros((int(T), len(self.arms)))
        self.N = np.zeros((int(T), len(self.arms)), dtype=np.int64)
        self.generations = 0

    @property
    def T(self) -> int:
        return self.key.T

    # -- learning -------------------------------------------------------------------------------
    def select(self, k: int, max_arm: int) -> int:
        """B_k's UCB1 choice among the arms <= ``max_arm``; an untried arm first (lowest first)."""
        idx = [i for i, a in enumerate(self.arms) if a <= max_arm]
        if not idx:
            raise ConfigError(f"no arm of {self.arms} fits in {max_arm} remaining steps")
        n = self.N[k, idx]
        untried = np.flatnonzero(n == 0)
        if untried.size:
            return self.arms[idx[untried[0]]]
        unit = self.mu if self.bonus == "mu" and self.mu else 1.0
        score = self.Q[k, idx] + (self.gamma * unit) * np.sqrt(np.log(self.N[k].sum()) / n)
        best = np.flatnonzero(score == score.max())
        pick = int(best[0]) if best.size == 1 else int(self.rng.choice(best))
        return self.arms[idx[pick]]

    def observe(self, k: int, arm: int, reward: float) -> None:
        """Credit ``reward`` to arm ``arm`` of B_k (running mean)."""
        i = self.arms.index(int(arm))
        self.N[k, i] += 1
        self.Q[k, i] += (float(reward) - self.Q[k, i]) / self.N[k, i]

    def merge(self, info: dict, rng_state: Optional[dict] = None) -> None:
        """Apply one generation's outcome (a fastflow ``Result.info``) to this state."""
        if self.mu is None and info.get("calibrated_mu") is not None:
            self.mu = float(info["calibrated_mu"])
        for k, arm, reward in info.get("rewards", ()):
            self.observe(int(k), int(arm), float(reward))
        self.generations += 1
        if rng_state is not None:
            self.rng.bit_generator.state = rng_state

    def greedy(self) -> list[Optional[int]]:
        """Per step, the arm with the best Q among those tried (None where nothing was tried)."""
        out: list[Optional[int]] = []
        for q, n in zip(self.Q, self.N):
            tried = np.flatnonzero(n > 0)
            out.append(None if tried.size == 0 else self.arms[int(tried[np.argmax(q[tried])])])
        return out

    def copy(self) -> "FastFlowBandit":
        return copy.deepcopy(self)

    # -- persistence ----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "version": VERSION,
            "key": {"T": self.T, "grid": self.grid.tolist(), "grid_sha256": self.key.grid_sha256,
                    "model_id": self.key.model_id},
            "arms": list(self.arms),
            "gamma": self.gamma,
            "bonus": self.bonus,
            "mu": self.mu,
            "mu_factor": self.mu_factor,
            "seed": self.seed,
            "generations": self.generations,
            "Q": self.Q.tolist(),
            "N": self.N.tolist(),
            "rng": self.rng.bit_generator.state,
        }

    @classmethod
    def from_dict(cls, d: Any, source: str = "bandit state") -> "FastFlowBandit":
        """Rebuild a bandit from :meth:`to_dict` output; anything malformed -> StateFileError."""
        return _parse_state(d, source)

    def save(self, path: str | os.PathLike) -> None:
        """Write the state atomically (under the lock file ``<path>.lock``)."""
        with state_lock(path):
            _write_state(self, path)

    @classmethod
    def load(cls, path: str | os.PathLike, key: Optional[BanditKey] = None) -> "FastFlowBandit":
        """Read a state file; refuse a corrupt or foreign one, or one whose key differs from ``key``."""
        bandit = _parse_state(_read_state(path), str(path))
        if key is not None:
            diffs = bandit.key.differences(key)
            if diffs:
                raise StateFileError(
                    f"{path} holds bandit state for another setup ({'; '.join(diffs)}); "
                    "use a different state file for this model and grid, or delete it to learn afresh"
                )
        return bandit


# -- file format --------------------------------------------------------------------------------
def _bad(source: str, what: str) -> StateFileError:
    return StateFileError(
        f"{source} is not a usable FastFlow bandit state ({what}); delete it to start learning afresh "
        "or restore a good copy"
    )


def _read_state(path: str | os.PathLike) -> Any:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise StateFileError(f"{path} does not exist; run fastflow with this --bandit-state to create it") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise _bad(str(path), f"unreadable: {exc}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise _bad(str(path), f"corrupt or truncated JSON: {exc}") from None


def _matrix(d: dict, name: str, shape: tuple[int, int], dtype: type, source: str) -> np.ndarray:
    try:
        m = np.asarray(d[name], dtype=dtype)
    except (KeyError, TypeError, ValueError):
        raise _bad(source, f"missing or non-numeric {name}") from None
    if m.shape != shape or not np.all(np.isfinite(m)):
        raise _bad(source, f"{name} must be a finite {shape[0]}x{shape[1]} table, got shape {m.shape}")
    return m


def _parse_state(d: Any, source: str) -> FastFlowBandit:
    if not isinstance(d, dict) or d.get("schema") != SCHEMA:
        found = d.get("schema") if isinstance(d, dict) else type(d).__name__
        raise _bad(source, f"schema {found!r}, expected {SCHEMA!r}")
    if d.get("version") != VERSION:
        raise _bad(source, f"schema version {d.get('version')!r}; this anchorflow reads version {VERSION}")
    try:
        key = d["key"]
        bandit = FastFlowBandit(int(key["T"]), key["grid"], model_id=str(key["model_id"]), arms=d["arms"],
                                gamma=d["gamma"], mu=d["mu"], seed=int(d["seed"]), bonus=d["bonus"],
                                mu_factor=d["mu_factor"])
        bandit.generations = int(d["generations"])
        bandit.rng.bit_generator.state = d["rng"]
    except (KeyError, TypeError, ValueError, ConfigError) as exc:
        raise _bad(source, f"bad or missing field: {exc}") from None
    if bandit.key.grid_sha256 != key.get("grid_sha256"):
        raise _bad(source, "grid hash does not match its grid values")
    shape = (bandit.T, len(bandit.arms))
    bandit.Q = _matrix(d, "Q", shape, np.float64, source)
    bandit.N = _matrix(d, "N", shape, np.int64, source)
    if bandit.N.min() < 0 or bandit.generations < 0:
        raise _bad(source, "negative counts")
    return bandit


def _write_state(bandit: FastFlowBandit, path: str | os.PathLike) -> None:
    write_json(path, bandit.to_dict())


# -- concurrency ----------------------------------------------------------------------------------
class state_lock:
    """Context manager: hold ``<path>.lock`` (filelock) while reading-modifying-writing ``path``."""

    def __init__(self, path: str | os.PathLike, timeout: float = LOCK_TIMEOUT_S) -> None:
        from filelock import FileLock

        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.lock = FileLock(f"{os.fspath(path)}.lock", timeout=timeout)

    def __enter__(self) -> "state_lock":
        from filelock import Timeout

        try:
            self.lock.acquire()
        except Timeout:
            raise StateFileError(
                f"{self.path} is locked by another process (lock file {self.lock.lock_file}); "
                "wait for it to finish, or remove the lock file if no process uses it"
            ) from None
        return self

    def __exit__(self, *exc: Any) -> None:
        self.lock.release()


def update_file(
    path: str | os.PathLike,
    fn: Callable[[FastFlowBandit], None],
    *,
    key: Optional[BanditKey] = None,
    create: Optional[Callable[[], FastFlowBandit]] = None,
) -> FastFlowBandit:
    """Read-modify-write under the lock: load ``path`` (or ``create()`` it), apply ``fn``, save.

    Concurrent callers are serialised, so every update lands. Returns the saved bandit.
    """
    with state_lock(path):
        if create is not None and not Path(path).exists():
            bandit = create()
        else:
            bandit = FastFlowBandit.load(path, key=key)
        fn(bandit)
        _write_state(bandit, path)
    return bandit


def _check_settings(bandit: FastFlowBandit, path: Any, arms: Any, gamma: Any, mu: Any, mu_factor: Any) -> None:
    """A state file's arms, gamma and mu (factor) are part of what it learned; refuse different ones."""
    asked = {"arms": None if arms is None else _check_arms(arms), "gamma": gamma, "mu": mu, "mu_factor": mu_factor}
    held = {"arms": bandit.arms, "gamma": bandit.gamma, "mu": bandit.mu, "mu_factor": bandit.mu_factor}
    for name, value in asked.items():
        if value is not None and held[name] is not None and (
            value != held[name] if name == "arms" else float(value) != held[name]
        ):
            raise StateFileError(
                f"{path} was learned with {name}={held[name]!r} but {name}={value!r} was asked; "
                f"omit {name} to continue with the file's value, or use another state file"
            )


def guided_model_id(model_id: str, cfg_scale: float = 1.0, cfg_interval: Optional[Sequence[float]] = None) -> str:
    """The identity of the field the bandits see: the backbone plus its guidance, if any."""
    if float(cfg_scale) == 1.0:
        return model_id
    lo, hi = (0.0, 1.0) if cfg_interval is None else (float(cfg_interval[0]), float(cfg_interval[1]))
    return f"{model_id}|cfg {float(cfg_scale):g} on ({lo:g}, {hi:g}]"


def run_with_state(
    velocity: Callable,
    noise: np.ndarray,
    T: int,
    state_path: str | os.PathLike,
    model_id: str,
    *,
    grid: GridSpec = None,
    arms: Optional[Sequence[int]] = None,
    gamma: Optional[float] = None,
    mu: Optional[float] = None,
    mu_factor: Optional[float] = None,
    seed: int = 0,
    learn: bool = True,
    **solve_kwargs: Any,
):
    """Sample one batch with FastFlow using (and updating) a persistent bandit state file.

    Loads ``state_path`` under its lock (or starts a fresh bandit; with ``mu`` None the first
    generation calibrates mu, times ``mu_factor``), solves without holding the lock, then merges
    this generation's rewards into the file's latest state under the lock, so concurrent
    processes all count.
    ``model_id`` names the backbone; the guidance setting is added to it (see
    :func:`guided_model_id`), so one file never mixes guided fields. ``solve_kwargs`` go to
    :func:`anchorflow.runtime.solve` (y, cfg_scale, tail, ...). Returns its :class:`Result`.
    """
    from .solve import solve

    if not isinstance(model_id, str) or not model_id:
        raise ConfigError("a bandit state file needs a model identity (model_id), e.g. the backbone's sha256")
    model_id = guided_model_id(model_id, solve_kwargs.get("cfg_scale", 1.0), solve_kwargs.get("cfg_interval"))
    t_grid = make_grid(T, grid)
    key = BanditKey.of(t_grid, model_id)

    def fresh() -> FastFlowBandit:
        return FastFlowBandit(T, t_grid, model_id=model_id, arms=DEFAULT_ARMS if arms is None else arms,
                              gamma=DEFAULT_GAMMA if gamma is None else gamma, mu=mu, seed=seed,
                              mu_factor=1.0 if mu_factor is None else mu_factor)

    with state_lock(state_path):
        bandit = FastFlowBandit.load(state_path, key=key) if Path(state_path).exists() else fresh()
    _check_settings(bandit, state_path, arms, gamma, mu, mu_factor)
    result = solve("fastflow", velocity, noise, T, grid=t_grid, bandit=bandit, learn=learn, **solve_kwargs)
    if learn:
        rng_state = bandit.rng.bit_generator.state

        def apply(latest: FastFlowBandit) -> None:
            _check_settings(latest, state_path, arms, gamma, mu, mu_factor)
            latest.merge(result.info, rng_state)

        update_file(state_path, apply, key=key, create=fresh)
    return result
