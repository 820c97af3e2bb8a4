"""FastFlow: Euler on a T-step grid where a per-step bandit decides which steps to skip.

Bajpai et al., "FastFlow: Accelerating The Generative Flow Matching Models with Bandit
Inference" (arXiv 2602.11105, ICLR 2026). Time runs from t = 1 (noise) to t = 0 (data),
``x_{k+1} = x_k + (t_{k+1} - t_k) v_k``. A computed step calls the backbone for v_k; a skipped
step extrapolates from the last two computed (guided) velocities v_p at t_p and v_q at t_q:

    v_hat(t) = v_q + (t - t_q) (v_q - v_p) / (t_q - t_p).

Steps 0 and 1 (0..order with ``order`` > 1) and the last ``tail`` steps are always computed;
a skip never crosses the end. ``order`` 2 or 3 extrapolates with Newton's divided differences
of the last order + 1 computed velocities on their true times (:func:`extrapolate_order`).
``base="adams"`` replaces the Euler update of every step by the integral of that same
polynomial over the step, ``x_{k+1} = x_k + int_{t_k}^{t_{k+1}} P(s) ds`` (P through the last
order + 1 computed velocities, :func:`interval_weights`): a run is then exactly Adams-Bashforth
of order + 1 on the sub-grid of computed times (order 1: AB2), the bandit choosing that sub-grid.
After a computed step k (k >= 1) the bandit B_k picks a skip length a; at the next computed
step m = k + a + 1 it is paid ``mu * a - mse(v_hat(t_m), v_m)`` (batch mean: one decision per
batch; see :mod:`anchorflow.runtime.fastflow.bandit`). ``fixed_skip=s`` replaces the bandit by the
static rule "compute one step, skip s" (a baseline). Here ``nfe`` (the registry's "grid" rule)
is T; ``Result.nfe`` counts the real calls.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Optional, Sequence

import numpy as np

from ....base.errors import ConfigError
from ...fastflow.bandit import DEFAULT_ARMS, DEFAULT_GAMMA, BanditKey, FastFlowBandit, calibrated_mu
from ..field import GuidedField
from ..registry import register
from ..result import SolverOutput, StepRecord

Anchor = tuple[float, np.ndarray]  # (t, guided velocity (B, ...)) of a computed step


def extrapolate(p: Anchor, q: Anchor, t: float) -> np.ndarray:
    """First-order Taylor extrapolation to ``t`` from anchors p (older) and q (latest)."""
    (t_p, v_p), (t_q, v_q) = p, q
    return v_q + (t - t_q) * ((v_q - v_p) / (t_q - t_p))


MAX_ORDER = 3


def extrapolate_order(anchors: list[Anchor], t: float, order: int = 1) -> np.ndarray:
    """Order-``order`` Taylor extrapolation to ``t`` from the last ``order + 1`` computed anchors.

    Newton's divided differences on the anchors' true (non-uniform) times: the polynomial of
    degree <= order through the anchors (t_i, v_i), evaluated at t. It is exact when the
    velocity is a polynomial in t of degree <= order (the interpolating polynomial through
    order + 1 points of a degree <= order polynomial is that polynomial). Order 1 is the
    paper's rule (:func:`extrapolate`); fewer anchors than order + 1 fall back to the highest
    order they support.
    """
    pts = anchors[-(order + 1):]
    ts = [float(a[0]) for a in pts]
    coef = [np.asarray(a[1], np.float64) for a in pts]  # divided-difference table, in place
    n = len(pts)
    for j in range(1, n):
        for i in range(n - 1, j - 1, -1):
            coef[i] = (coef[i] - coef[i - 1]) / (ts[i] - ts[i - j])
    out = coef[n - 1]
    for i in range(n - 2, -1, -1):  # Horner on the Newton form
        out = coef[i] + (t - ts[i]) * out
    return out.astype(np.result_type(pts[-1][1]), copy=False)


BASES = ("euler", "adams")


def interval_weights(times: Sequence[float], t_from: float, t_to: float) -> np.ndarray:
    """Weights w with ``sum_j w_j f_j = (1 / (t_to - t_from)) int_{t_from}^{t_to} P(s) ds``.

    P is the polynomial of degree < m through (times_j, f_j) (m = len(times)); the integral is
    exact for it. In u = (s - times[-1]) / (t_to - t_from) the moments are
    ``(u_b^{p+1} - u_a^{p+1}) / (p + 1)``; with t_from = times[-1] they are 1 / (p + 1), the
    variable-step Adams-Bashforth weights (:func:`..multistep.adams_weights`).
    """
    ts = np.asarray(times, np.float64)
    h = float(t_to) - float(t_from)
    u = (ts - ts[-1]) / h
    ua, ub = (float(t_from) - ts[-1]) / h, (float(t_to) - ts[-1]) / h
    p = np.arange(1, ts.size + 1)
    return np.linalg.solve(np.vander(u, ts.size, increasing=True).T, (ub ** p - ua ** p) / p)


def pc_weight(anchor_times: Sequence[float], t_m: float, span: Sequence[float], base: str = "euler") -> float:
    """W with ``corrector - predictor = W * (v_m - P(t_m))`` over a skipped span, in state units.

    P is the polynomial of degree <= k through the k + 1 anchors (t_i, v_i) a skip extrapolated
    from (the predictor); Q, of degree k + 1, also passes through (t_m, v_m), the velocity of the
    next computed step (the corrector). By Newton's form ``Q - P = e * w(s)`` with the residual
    ``e = v_m - P(t_m)`` and ``w(s) = prod_i (s - t_i) / prod_i (t_m - t_i)``, so re-integrating the
    span with Q instead of P moves the state by ``W e``: ``base="euler"`` (each skipped step j
    advances ``(t_{j+1} - t_j) * P(t_j)``; ``span`` = t_{k0+1}, ..., t_m, empty for a = 0):
    ``W = sum_j (t_{j+1} - t_j) w(t_j)``; ``base="adams"`` (every step integrates P, the computed
    step k0 too; ``span`` = t_k0, ..., t_m): ``W = int_{t_k0}^{t_m} w(s) ds``. Non-uniform times
    are exact; W = 0 when the skipped span is empty. A velocity polynomial of degree <= k has
    e = 0, hence no charge.
    """
    ts = np.asarray(anchor_times, np.float64)
    sp = np.asarray(span, np.float64)
    denom = float(np.prod(float(t_m) - ts))
    if sp.size < 2:
        return 0.0
    if base == "adams":
        prim = np.polynomial.Polynomial.fromroots(ts).integ()
        return float((prim(sp[-1]) - prim(sp[0])) / denom)
    nodes = sp[:-1]
    return float(np.sum(np.diff(sp) * np.prod(nodes[:, None] - ts[None, :], axis=1)) / denom)


def _mse(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean(np.square(np.asarray(a, np.float64) - b)))


def _bandit_for(grid: np.ndarray, bandit: Optional[FastFlowBandit], mu, arms, gamma, seed,
                reward: Optional[str] = None) -> FastFlowBandit:
    """The caller's bandit (checked against the grid), or a fresh one from the options."""
    T = len(grid) - 1
    if bandit is None:
        return FastFlowBandit(T, grid, arms=DEFAULT_ARMS if arms is None else arms,
                              gamma=DEFAULT_GAMMA if gamma is None else gamma, mu=mu, seed=seed,
                              reward="residual" if reward is None else reward)
    if not isinstance(bandit, FastFlowBandit):
        raise ConfigError(f"bandit must be a FastFlowBandit, got {type(bandit).__name__}")
    if reward is not None and reward != bandit.reward_mode:
        raise ConfigError(f"this bandit learns with reward={bandit.reward_mode!r}, not {reward!r}: the reward "
                          "belongs to the bandit (FastFlowBandit(..., reward=...))")
    if any(v is not None for v in (mu, arms, gamma)):
        raise ConfigError("mu, arms and gamma belong to the bandit; set them when creating it, not per solve")
    diffs = bandit.key.differences(BanditKey.of(grid, bandit.key.model_id))
    if diffs:
        raise ConfigError(f"this bandit was learned on another grid ({'; '.join(diffs)}); use a bandit for this grid")
    return bandit


class FastFlowRun:
    """Book-keeping of one FastFlow generation: anchors, pending decision, per-step facts.

    Public for drivers that own the step loop themselves (the diffusers transformer hook): per
    step k of the T-step grid (t_k -> t_{k+1}, t = 1 noise), call :meth:`computed_step` with the
    guided velocity (B, ...) of a computed step, then :meth:`decide` for the skip that follows;
    a skipped step uses :func:`extrapolate` of ``anchors``. :func:`generation_info` turns the
    run into ``Result.info``, the record ``FastFlowBandit.merge`` learns from.
    """

    def __init__(self, T: int, tail: int, forced_zero: bool, fixed_skip: Optional[int], order: int = 1,
                 max_calls: Optional[int] = None, max_arm: int = max(DEFAULT_ARMS), reward: str = "residual",
                 grid: Optional[np.ndarray] = None, base: str = "euler") -> None:
        self.T, self.tail, self.forced_zero, self.fixed_skip = T, tail, forced_zero, fixed_skip
        if reward == "estimate" and grid is None:
            raise ConfigError("reward='estimate' needs the run's grid (FastFlowRun(..., grid=...))")
        self.reward_mode, self.grid, self.base = reward, grid, base
        self.order = order
        self.max_calls = max_calls
        self.cap_skip = None if max_calls is None else cap_skip_length(T, tail, order, max_calls, max_arm)
        self.anchors: list[Anchor] = []  # the last two computed anchors (the paper's rule)
        self.history: list[Anchor] = []  # the last order + 1 computed anchors
        self.pending: Optional[tuple[int, int]] = None
        self.computed = [False] * T
        self.arms: list[Optional[int]] = [None] * T
        self.mse: list[Optional[float]] = [None] * T
        self.reward: list[Optional[float]] = [None] * T
        self.losses: list[tuple[int, int, float, bool]] = []  # (k, arm, mse at m, skip term paid)
        self.bound: Optional[tuple[int, int]] = None  # (steps, calls) left where the cap first bound

    def computed_step(self, k: int, t: float, v: np.ndarray, bandit: FastFlowBandit) -> None:
        """Record v_k, measure the extrapolation error, pay the pending decision."""
        self.computed[k] = True
        if len(self.anchors) == 2:
            self.mse[k] = _mse(self.predict(t), v)
            if self.pending is not None:
                k0, a = self.pending
                paid = a == 0 or bandit.guard_ok(self.mse[k], _mse(v, 0.0))
                loss = self.mse[k] if self.reward_mode == "residual" else self.estimate_loss(k0, k, t)
                self.reward[k0] = bandit.reward(a, loss, paid)
                self.losses.append((k0, a, loss, paid))
                self.pending = None
        self.anchors = [*self.anchors[-1:], (t, v)]
        self.history = [*self.history[-self.order:], (t, v)]

    def estimate_loss(self, k0: int, m: int, t_m: float) -> float:
        """``reward="estimate"``: mean square of the predictor-corrector difference over the span
        skipped after k0, ``W^2 mse_m`` (:func:`pc_weight`; mse_m the residual at t_m, the anchors
        those the skip extrapolated from)."""
        start = k0 if self.base == "adams" else k0 + 1
        times = [a[0] for a in (self.history if self.order > 1 else self.anchors)]
        w = pc_weight(times, t_m, self.grid[start:m + 1], self.base)
        return w * w * float(self.mse[m])

    def predict(self, t: float) -> np.ndarray:
        """A skipped step's velocity at t: order-``order`` extrapolation of the computed ones."""
        if self.order == 1:
            return extrapolate(*self.anchors, t)
        return extrapolate_order(self.history, t, self.order)

    def mean_velocity(self, t: float, t_next: float) -> np.ndarray:
        """``base="adams"``: the mean over [t, t_next] of the polynomial through the last
        order + 1 computed velocities (one anchor: that velocity, i.e. Euler)."""
        hist = self.history[-(self.order + 1):]
        if len(hist) == 1:
            return hist[0][1]
        w = interval_weights([a[0] for a in hist], t, t_next)
        out = sum(float(wj) * np.asarray(v, np.float64) for wj, (_, v) in zip(w, hist))
        return out.astype(np.result_type(hist[-1][1]), copy=False)

    def min_skip(self, k: int) -> int:
        """The shortest skip after computed step k that keeps the run within ``max_calls``.

        n = T - tail - 1 - k steps remain before the tail (always computed), R = max_calls -
        calls so far - tail calls are left for them. With skips of at most L = ``cap_skip``
        (the longest arm, or longer where the cap needs it), n steps are coverable by R calls
        iff n <= R + (R + 1) L; skipping a then computing one step leaves n - a - 1 steps and
        R - 1 calls, so a >= n - R - R L keeps that true (R = 0: skip straight to the tail).
        """
        if self.max_calls is None:
            return 0
        n = self.T - self.tail - 1 - k
        R = self.max_calls - sum(self.computed) - self.tail
        return max(0, min(n, n - R - R * self.cap_skip))

    def calls_demand(self) -> float:
        """The calls this run would have made without the cap, estimated; the budget adapts mu on
        it, so mu still rises while the cap binds (on the capped calls alone it could not).

        At the bandit's own rate r (mean of a + 1 over its decisions in this run, forced skips
        excluded; 1 if it made none), the n steps left before the tail when the cap first forced
        a skip would have cost n / r calls where R were left: demand = calls + max(0, n / r - R).
        A run the cap never bound: its calls.
        """
        calls = float(sum(self.computed))
        if self.bound is None:
            return calls
        n, R = self.bound
        chosen = [a for a in self.arms if a is not None]
        r = float(np.mean(chosen)) + 1.0 if chosen else 1.0
        return calls + max(0.0, n / r - R)

    def decide(self, k: int, bandit: FastFlowBandit) -> int:
        """After computed step k: how many steps to skip next (0 when no choice is allowed).

        With ``max_calls`` the skip is at least :meth:`min_skip`; a skip the cap forces outside
        the bandit's arms (or in a calibrating / fixed-pattern run) is not a bandit decision and
        is not learned from.
        """
        max_arm = self.T - self.tail - 1 - k
        if k < self.order:  # order + 1 computed anchors before any skip (order 1: steps 0, 1)
            return 0
        lo = self.min_skip(k)
        if lo and self.bound is None:  # where the cap first bound: steps and calls left (calls_demand)
            self.bound = (self.T - self.tail - 1 - k, self.max_calls - sum(self.computed) - self.tail)
        if self.fixed_skip is not None:
            return max(lo, min(self.fixed_skip, max(max_arm, 0)))
        if not any(max(lo, 1) <= a <= max_arm for a in bandit.arms):
            return lo  # nothing to choose (0), or a forced skip no arm fits
        if self.forced_zero and lo:
            return lo  # a calibration or mu = 0 run computes every step the cap allows
        a = 0 if self.forced_zero else bandit.select(k, max_arm, min_arm=lo)
        self.arms[k], self.pending = a, (k, a)
        return a


def cap_skip_length(T: int, tail: int, order: int, max_calls: int, longest_arm: int) -> int:
    """The longest skip a run capped at ``max_calls`` may need: the longest arm, or more.

    Steps 0..order and the last ``tail`` are computed; the n = T - tail - order - 1 steps
    between them get R = max_calls - order - 1 - tail calls, coverable with skips of at most L
    iff n <= R + (R + 1) L. A cap below order + 1 + tail calls is refused.
    """
    R = max_calls - order - 1 - tail
    if R < 0:
        raise ConfigError(f"max_calls {max_calls} is below the {order + 1 + tail} calls every run makes "
                          f"(steps 0..{order} and the last {tail}); raise it or lower order / tail")
    n = max(T - tail - order - 1, 0)
    return max(int(longest_arm), math.ceil(max(n - R, 0) / (R + 1)))


def generation_info(run: FastFlowRun, mu: Optional[float], calibrated: Optional[float], learn: bool) -> dict:
    """``Result.info`` of a finished run: calls, computed/skipped steps, arms, rewards, mu.

    ``mu`` the skip reward used (None: the first, calibrating generation), ``calibrated`` the mu
    measured by it, ``learn`` whether the bandits may merge this generation.
    """
    chosen = [a for a in run.arms if a is not None]
    return {
        "calls": sum(run.computed),
        "calls_demand": run.calls_demand(),
        "computed": run.computed,
        "arms": run.arms,
        "skip_hist": dict(sorted(Counter(chosen).items())),
        "mse": run.mse,
        "rewards": [[k, a, r] for (k, a, _, _), r in zip(run.losses, (run.reward[k] for k, *_ in run.losses))],
        "losses": [list(x) for x in run.losses],
        "mu": mu,
        "calibration": mu is None,
        "calibrated_mu": calibrated,
        "learned": learn,
    }


def _records(grid: np.ndarray, run: FastFlowRun) -> list[StepRecord]:
    return [
        StepRecord(k, float(grid[k]), float(grid[k + 1]), calls=int(run.computed[k]),
                   info={"computed": run.computed[k], "skipped": not run.computed[k], "arm": run.arms[k],
                         "reward": run.reward[k], "mse": run.mse[k]})
        for k in range(len(grid) - 1)
    ]


def _check_int(name: str, value, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not low <= value <= high:
        raise ConfigError(f"{name} must be an integer in {low}..{high}, got {value!r}")
    return int(value)


@register("fastflow", calls_per_step=None, order=1, nfe_rule="grid", min_nfe=3,
          summary="FastFlow: Euler or Adams with bandit-chosen step skipping (nfe = grid size T)")
def fastflow(
    field: GuidedField,
    x: np.ndarray,
    grid: np.ndarray,
    *,
    bandit: Optional[FastFlowBandit] = None,
    mu: Optional[float] = None,
    arms: Optional[tuple[int, ...]] = None,
    gamma: Optional[float] = None,
    tail: int = 1,
    seed: int = 0,
    learn: bool = True,
    fixed_skip: Optional[int] = None,
    order: int = 1,
    base: str = "euler",
    max_calls: Optional[int] = None,
    reward: Optional[str] = None,
) -> SolverOutput:
    """FastFlow on ``grid`` (T + 1 times, 1 -> 0); x (B, ...) is the noise at t = 1.

    Options: ``bandit`` (a :class:`FastFlowBandit` for this grid, updated when ``learn``; None:
    a fresh one from ``mu`` / ``arms`` / ``gamma`` / ``seed``), ``tail`` (last steps always
    computed, >= 1), ``fixed_skip`` (no bandit: after every computed step k >= 1 skip that many
    steps; a baseline), ``order`` (1..3: a skipped velocity from the Newton/Taylor extrapolation
    of the last order + 1 computed velocities on their true times; 1 is the paper's rule and the
    measured error the bandit is paid on uses the same order; steps 0..order are computed),
    ``base`` ("euler", the paper's update, or "adams": every step integrates that polynomial over
    the step, so the run is Adams-Bashforth of order + 1 on the sub-grid of computed times),
    ``max_calls`` (a hard cap: no generation makes more backbone calls, whatever the bandit,
    mu, calibration or ``fixed_skip`` would do; when the calls left only just cover the steps
    left, the skip is forced longer, see :meth:`FastFlowRun.min_skip`; None: no cap). The
    budget adapts mu on the calls the run would have made uncapped (``calls_demand``), so a
    budget at the cap still steers mu), ``reward`` (None: the bandit's; a fresh bandit's
    "residual" or "estimate", see :class:`FastFlowBandit` and :func:`pc_weight`).
    A bandit without mu runs this generation fully computed and calibrates
    ``mu = mu_factor * max_k mse_k / T`` (stored only when ``learn``). mu = 0 never skips.

    ``Result.info``: ``calls`` (computed steps), ``calls_demand`` (:meth:`FastFlowRun.calls_demand`: what
    the budget adapts mu on), ``max_calls``, per-step lists ``computed``, ``arms`` (the arm
    chosen after step k, None where no choice was made) and ``mse`` (extrapolation error at each
    computed step k >= 2), ``skip_hist`` {arm: decisions} (0 = no skip), ``rewards``
    [[k, arm, reward], ...], ``losses`` [[k, arm, mse, paid], ...], ``mu``, ``calibration``,
    ``calibrated_mu``, ``learned``, ``base``, ``order``.
    """
    T = len(grid) - 1
    tail = _check_int("tail (the last steps always computed)", tail, 1, T)
    order = _check_int("order (the extrapolation order)", order, 1, MAX_ORDER)
    if base not in BASES:
        raise ConfigError(f"fastflow base must be one of {', '.join(BASES)}, got {base!r}")
    if fixed_skip is not None:
        fixed_skip = _check_int("fixed_skip", fixed_skip, 0, T)
        if bandit is not None:
            raise ConfigError("fixed_skip replaces the bandit; pass one or the other")
        bandit = FastFlowBandit(T, grid, mu=0.0)
    bandit = _bandit_for(grid, bandit, mu, arms, gamma, seed, reward)
    mu = bandit.mu
    if max_calls is not None:
        max_calls = _check_int("max_calls (the most backbone calls per generation)", max_calls, 1, T)
    run = FastFlowRun(T, tail, forced_zero=mu is None or mu == 0.0, fixed_skip=fixed_skip, order=order,
                      max_calls=max_calls, max_arm=max(max(bandit.arms), fixed_skip or 0),
                      reward=bandit.reward_mode, grid=np.asarray(grid, np.float64), base=base)
    skip = 0
    for k in range(T):
        t, t_next = float(grid[k]), float(grid[k + 1])
        if skip:
            v, skip = run.predict(t), skip - 1
        else:
            v = field(x, t)
            run.computed_step(k, t, v, bandit)
            skip = run.decide(k, bandit)
        if base == "adams":
            v = run.mean_velocity(t, t_next)
        x = x + (t_next - t) * v
    calibrated = None
    if mu is None:
        # "estimate": the same rule in state units, each residual times its step's squared length
        # (the state error of step k advanced with the extrapolated velocity instead of v_k)
        mses = run.mse if bandit.reward_mode == "residual" else [
            None if e is None else e * float(grid[k + 1] - grid[k]) ** 2 for k, e in enumerate(run.mse)]
        calibrated = calibrated_mu(mses, T)
    info = generation_info(run, mu, calibrated, learn and fixed_skip is None)
    info.update(base=base, order=order, max_calls=max_calls)
    if bandit.reward_mode != "residual":
        info["reward"] = bandit.reward_mode
    if info["learned"]:
        bandit.merge(info)
    return SolverOutput(x, _records(grid, run), info)
