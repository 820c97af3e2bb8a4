"""BA-solver (bi-anchor interpolation) and its single-anchor ablation.

Algorithm 1 of "Bi-Anchor Interpolation Solver for Accelerating Generative Modeling"
(arXiv 2601.21542), with the choices written out here and in the functions below. Time runs from t = 1 (noise) to t = 0
(data); an interval [t_i, t_{i+1}] has length ``h = t_i - t_{i+1} > 0`` and ``x -= h * (average
velocity)``. The SideNet predicts the raw velocity at ``t - offset`` from an anchor:
``v_hat = v_raw + S(x, v_raw, t, offset, y)``; guidance is applied per node at the node's own time.
States are (B, ...); with CFG the raw velocities have 2B rows (see :class:`GuidedField`), or B rows
where guidance is off over every time a backbone call's velocities (and the SideNet predictions
from them) are guided at: each call passes that span to :meth:`GuidedField.raw`.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from ....base.errors import ConfigError
from ..estimate import ErrorEstimate
from ..field import GuidedField
from ..registry import register
from ..result import SolverOutput

LOBATTO_A = (1.0 - 1.0 / math.sqrt(5.0)) / 2.0  # 4-point Gauss-Lobatto: weights [1, 5, 5, 1] / 12


@dataclass(frozen=True)
class Quadrature:
    """A rule on one interval: ``nodes`` are fractions c of h (node time t - c h), ``weights`` sum to 1."""

    nodes: tuple[float, ...]
    weights: tuple[float, ...]


def bi_anchor_rule(a: float = LOBATTO_A) -> Quadrature:
    """Nodes (0, a, 1 - a, 1) with ``s = 1 - 2a``, ``w_in = 1 / (3 (1 - s^2))``, ``w_out = 1/2 - w_in``.

    a = (1 - 1/sqrt 5)/2: Gauss-Lobatto [1, 5, 5, 1]/12 (default); a = 1/3: Simpson 3/8; a = 1/4.
    The rule integrates cubics exactly for every 0 < a < 1/2.
    """
    if isinstance(a, bool) or not isinstance(a, numbers.Real) or not 0.0 < float(a) < 0.5:
        raise ConfigError(f"ba option a (node fraction) must be a number with 0 < a < 1/2, got {a!r}; "
                          f"default {LOBATTO_A:.7f} (Gauss-Lobatto), 1/3 (Simpson 3/8) or 0.25")
    a = float(a)
    w_in = 1.0 / (3.0 * (1.0 - (1.0 - 2.0 * a) ** 2))
    w_out = 0.5 - w_in
    return Quadrature((0.0, a, 1.0 - a, 1.0), (w_out, w_in, w_in, w_out))


def gauss_legendre(k: int) -> Quadrature:
    """K-point Gauss-Legendre rule on [0, 1] (exact for polynomials of degree 2K - 1)."""
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 1 <= k <= 10:
        raise ConfigError(f"ba-single option k (Gauss-Legendre nodes) must be an integer in 1..10, got {k!r}")
    z, w = np.polynomial.legendre.leggauss(int(k))
    return Quadrature(tuple((1.0 + z) / 2.0), tuple(w / 2.0))


def _probe(field: GuidedField, x: np.ndarray, v_raw: np.ndarray, t: float,
           offsets: Sequence[float], times: Sequence[float]) -> list[np.ndarray]:
    """ONE SideNet call from the anchor (x, v_raw, t); guided ``v_hat`` at each node time (B, ...)."""
    deltas = field.side(x, v_raw, t, offsets)
    return [field.guide(v_raw + d, tk) for d, tk in zip(deltas, times)]


def _weighted(weights: Sequence[float], vs: Sequence[np.ndarray]) -> np.ndarray:
    return sum(float(w) * v for w, v in zip(weights, vs))


def _forward_nodes(t: float, tn: float, a: float) -> tuple[list[float], list[float]]:
    """Offsets (a h, (1-a) h, h) and node times (t - a h, t - (1-a) h, tn) of [t, tn]'s forward probe."""
    h = t - tn
    return [a * h, (1 - a) * h, h], [t - a * h, t - (1 - a) * h, tn]


def _span(*times: float) -> tuple[float, float]:
    """The (lo, hi) of the times a backbone call's velocities are guided at (for GuidedField.raw)."""
    return min(times), max(times)


def corrects(t: float, tn: float, corrector_limit: float) -> bool:
    """Whether the interval [t, tn] takes the bi-anchor corrector: ``t - tn <= corrector_limit * tn``.

    False for the final interval (tn = 0) whatever the limit, and for every interval with
    ``corrector_limit = 0``; ``math.inf`` corrects every interval but the final one.
    """
    return t - tn <= corrector_limit * tn


def _interval(field: GuidedField, x: np.ndarray, v_raw: np.ndarray, fwd: list[np.ndarray], grid: np.ndarray,
              i: int, rule: Quadrature, merged: bool, corrector_limit: float = math.inf,
              est: Optional[ErrorEstimate] = None, est_stiff: bool = True) -> tuple[np.ndarray, np.ndarray, Optional[list[np.ndarray]]]:
    """Interval i = [t, tn]: predictor; unless last, terminal call, backward probe, corrector.

    ``fwd``: this interval's forward-probe velocities (va, vb, ve). Returns the new state, the
    terminal raw velocity (the next start anchor) and the next interval's forward probe. With
    ``merged`` the backward probe and the next forward probe are ONE SideNet call from the
    terminal anchor (x_pred, v_end) with offsets [-a h, a h', (1-a) h', h'] (h' the next length).
    Where :func:`corrects` is False (``h > corrector_limit * tn``) the terminal call is still made
    (it is the next start anchor), but there is no backward probe and the state is the predictor.
    """
    t, tn = float(grid[i]), float(grid[i + 1])
    h, a, w = t - tn, rule.nodes[1], rule.weights
    v0 = field.guide(v_raw, t)
    x_pred = x - h * _weighted(w, [v0, *fwd])  # predictor
    if i == len(grid) - 2:
        return x_pred, v_raw, None  # the final interval returns the predictor: no backbone call
    t2 = float(grid[i + 2])
    offsets, times = _forward_nodes(tn, t2, a)  # the next interval's forward probe
    if not corrects(t, tn, corrector_limit):  # too close to t = 0 for its length: keep the predictor
        v_end_raw = field.raw(x_pred, tn, span=_span(tn, *times))
        return x_pred, v_end_raw, _probe(field, x_pred, v_end_raw, tn, offsets, times)
    # the terminal anchor is guided at tn (v1, next v0), tn + a h (backward node) and the next probe's nodes
    v_end_raw = field.raw(x_pred, tn, span=_span(tn, tn + a * h, *times))
    v1 = field.guide(v_end_raw, tn)
    if merged:  # the backward node lands on t - (1-a) h = tn + a h; the rest is the next forward probe
        vb2, *nxt = _probe(field, x_pred, v_end_raw, tn, [-a * h, *offsets], [tn + a * h, *times])
    else:
        (vb2,) = _probe(field, x_pred, v_end_raw, tn, [-a * h], [tn + a * h])  # lands on node t - (1-a) h
    x = x - h * _weighted(w, [v0, fwd[0], vb2, v1])  # bi-anchor corrector; state reuse
    if est is not None:  # corrector - predictor, from the two nodes they differ in (0 when they agree)
        est.add(-h * (w[2] * (vb2 - fwd[1]) + w[3] * (v1 - fwd[2])), weight=h / tn if est_stiff else 1.0)
    if not merged:
        nxt = _probe(field, x, v_end_raw, tn, offsets, times)  # the paper: from the corrected state
    return x, v_end_raw, nxt


PROBES = ("merged", "paper")
ESTIMATES = ("stiff", "plain")  # how BA's per-sample error estimate weights its intervals
CORRECTOR_LIMIT = 2.5  # h / t_end above which an interval keeps its predictor (see ba's docstring)


def _corrector_limit(value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or math.isnan(value) or value < 0:
        raise ConfigError(f"ba option corrector_limit must be a number >= 0 (math.inf: always correct), got {value!r}; "
                          f"default {CORRECTOR_LIMIT:g}")
    return float(value)


@register("ba", calls_per_step=1, order=None, needs_sidenet=True, min_nfe=2, nfe_rule="intervals", sidenet_offsets=4,
          summary="BA-solver: bi-anchor SideNet quadrature, N calls for N intervals")
def ba(field: GuidedField, x: np.ndarray, grid: np.ndarray, a: float = LOBATTO_A, probes: str = "merged",
       corrector_limit: float = CORRECTOR_LIMIT, estimate: str = "stiff") -> SolverOutput:
    """BA-solver (arXiv 2601.21542, Algorithm 1): exactly N backbone calls for N intervals.

    Per interval: forward probe (offsets a h, (1-a) h, h from the start anchor), predictor,
    terminal backbone call at the predictor, backward probe (offset -a h from the terminal
    anchor), corrector; the terminal velocity is the next start anchor and the last interval
    returns its predictor. ``probes="paper"``: the next forward probe is a separate SideNet call
    from the corrected state (2N - 1 SideNet calls); ``"merged"`` (default): it shares the
    backward probe's call and anchor (x_pred, v_end), N SideNet calls with the same rows.
    ``a``: node fraction (0 < a < 1/2). Order: that of the SideNet's predictions (with delta = 0
    on a uniform grid the iterates are exactly Adams-Bashforth 2's).

    ``corrector_limit`` (default 2.5): an interval [t, tn] with ``h > corrector_limit * tn`` keeps
    its predictor, as the final interval (tn = 0) always does; its terminal call is still made (it
    anchors the next interval), so the calls stay N, and its backward probe is dropped. Reason: near
    t = 0 the field of concentrated data is stiff (ideally v = (x - E[x_0 | x]) / t, Lipschitz ~ 1/t
    off the data) and the corrector puts weight h/2 on the terminal anchor (w_out h on v1, w_in h on
    the backward probe v1 + delta), so it multiplies the predictor's error by about h L / 2, which
    grows with h / tn. Uniform grids (h / tn <= 1) and the bundle's tuned grids (<= 2.21) are
    unchanged bit for bit; ``math.inf`` corrects everywhere. The measurements behind the limit:
    docs/results.md ("BA's corrector limit", ``benchmarks/ba_tail.py``).

    ``estimate`` (``Result.error_estimate``, see runtime/solving/estimate.py): ``"stiff"`` (default) sums the
    per-sample RMS of corrector - predictor weighted by ``h / t_end``; ``"plain"`` unweighted.
    """
    rule = bi_anchor_rule(a)
    if estimate not in ESTIMATES:
        raise ConfigError(f"ba option estimate must be one of {', '.join(ESTIMATES)}, got {estimate!r}")
    if probes not in PROBES:
        raise ConfigError(f"ba option probes must be one of {', '.join(PROBES)}, got {probes!r}")
    limit = _corrector_limit(corrector_limit)
    n = len(grid) - 1
    if n < 2:
        raise ConfigError(f"ba needs at least 2 intervals (nfe >= 2), got {n}; use nfe >= 2 or another solver")
    since = field.counts()
    t0, offsets, times = float(grid[0]), *_forward_nodes(float(grid[0]), float(grid[1]), rule.nodes[1])
    v_raw = field.raw(x, t0, span=_span(t0, *times))  # guided at t0 (v0) and at the forward probe's nodes
    fwd = _probe(field, x, v_raw, t0, offsets, times)
    steps, est = [], ErrorEstimate()
    for i in range(n):
        x, v_raw, fwd = _interval(field, x, v_raw, fwd, grid, i, rule, probes == "merged", limit, est,
                                  estimate == "stiff")
        corrected = i < n - 1 and corrects(float(grid[i]), float(grid[i + 1]), limit)
        steps.append(field.record(i, float(grid[i]), float(grid[i + 1]), since, corrected=corrected))
        since = field.counts()
    return SolverOutput(x, steps, {"a": rule.nodes[1], "probes": probes, "corrector_limit": limit, "estimate": estimate},
                        error_estimate=est.value(x.shape[0]))


@register("ba-single", calls_per_step=1, order=None, needs_sidenet=True, min_nfe=1, nfe_rule="intervals",
          sidenet_offsets=3,
          summary="single-anchor ablation: 1 call + K SideNet nodes per interval")
def ba_single(field: GuidedField, x: np.ndarray, grid: np.ndarray, k: int = 3) -> SolverOutput:
    """Single-anchor ablation of the BA-solver (arXiv 2601.21542): per interval one backbone call
    at t_i, K Gauss-Legendre nodes predicted from that anchor in ONE SideNet call,
    ``x -= h sum_k w_k v_hat_k``. With delta = 0 it is Euler."""
    rule = gauss_legendre(k)
    steps = []
    for i in range(len(grid) - 1):
        since = field.counts()
        t, tn = float(grid[i]), float(grid[i + 1])
        h = t - tn
        times = [t - c * h for c in rule.nodes]  # v_raw itself is never guided, only the nodes' v_hat
        v_raw = field.raw(x, t, span=_span(*times))
        v_hat = _probe(field, x, v_raw, t, [c * h for c in rule.nodes], times)
        x = x - h * _weighted(rule.weights, v_hat)
        steps.append(field.record(i, t, tn, since))
    return SolverOutput(x, steps, {"k": len(rule.nodes)})
