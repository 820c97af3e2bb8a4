"""Per-sample error estimates that cost no backbone call: the difference between a solver's update
and a companion update built from the velocities the solver already has.

- BA-solver (arXiv 2601.21542): per corrected interval, corrector minus predictor (the predictor
  uses the SideNet's guess of the terminal velocity, the corrector the backbone's value there).
- Multistep (Adams-Bashforth 2, iPNDM): per step, the order-k update minus the order-(k-1) one on
  the same history (the classic Milne-type embedded estimate), written as
  ``dt * sum_j (w_j - w'_j) (v_j - v_n)`` so that it is exactly 0 whenever every velocity of the
  history is the same (a constant field, where every solver here is exact).
- UniPC (arXiv 2302.04867): per step, UniC's corrected state minus UniP's predicted one.

How the local differences d_i (B, ...) add up, per sample (measured, ``benchmarks/autoconfig_estimate.py``,
``benchmarks/autoconfig_bench.py``):
the multistep methods sum their per-step RMS, ``sum_i sqrt(mean(d_i^2))`` (on digits and the
closed-form mixture this ranked samples better than the RMS of the signed sum, whose terms cancel);
BA weights each corrected interval [t, t_end] by ``h / t_end`` (``estimate="stiff"``, default;
``"plain"``: weight 1): its error is dominated by the final interval, which has no corrector (so no
difference of its own), and near t = 0 a miss is amplified about ``h L / 2`` with ``L ~ 1 / t``
(the reason for BA's corrector limit), so the intervals nearest the data say most about it;
UniPC takes the RMS of the signed sum ``sqrt(mean((sum_i d_i)^2))`` (better for it on digits). Either
way one float per sample in the units of the state, comparable to the per-sample RMSE against a
reference. It is an *indicator* ranked against the true error, not a bound: steps without a
companion (the first Euler step of a multistep method, the BA and UniPC final interval) contribute
nothing, and an error made early is counted as if the flow carried it unchanged to t = 0.
Time convention: t = 1 noise, t = 0 data. Numpy only.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np


class ErrorEstimate:
    """Per-step local differences d_i (B, ...) -> :meth:`value` (B,) float64, in state units.

    ``signed=False``: the sum over steps of each step's per-sample RMS; ``signed=True``: the
    per-sample RMS of the summed differences (see the module docstring for which solver uses which).
    """

    def __init__(self, signed: bool = False) -> None:
        self.signed = signed
        self.total: Optional[np.ndarray] = None
        self.steps = 0

    def add(self, diff: np.ndarray, weight: float = 1.0) -> None:
        """One step's difference (B, ...), counted ``weight`` times (BA: ``h / t_end``, see the module doc)."""
        d = np.asarray(diff)  # kept in the state's dtype (no float64 copies of large latents per step)
        if not self.signed:
            flat = d.reshape(d.shape[0], -1).astype(np.float64)
            d = np.sqrt(np.mean(flat * flat, axis=1))
        if weight != 1.0:
            d = float(weight) * d
        self.total = d.copy() if self.total is None else self.total + d
        self.steps += 1

    def value(self, batch: int) -> np.ndarray:
        """(batch,) the estimate (zeros when no step had a companion)."""
        if self.total is None:
            return np.zeros(batch, np.float64)
        if not self.signed:
            return np.asarray(self.total, np.float64)
        flat = self.total.reshape(self.total.shape[0], -1).astype(np.float64)
        return np.sqrt(np.mean(flat * flat, axis=1))


def adams_difference(weights: Sequence[float], lower: Sequence[float], vs: Sequence[np.ndarray],
                     dt: float) -> np.ndarray:
    """``dt * sum_j (w_j - w'_j) (v_j - v_n)``: an order-k Adams step minus the order-(k-1) one.

    ``weights`` (k,) the order-k weights on ``vs`` (oldest first, v_n last); ``lower`` (k-1,) the
    order-(k-1) weights on the newest k-1 of them. Both weight sets sum to 1, so subtracting v_n
    from every velocity changes nothing in exact arithmetic and makes the result exactly 0 when
    all velocities are equal.
    """
    vn = vs[-1]
    pad = [0.0] * (len(weights) - len(lower)) + list(lower)
    out = np.zeros_like(vn)
    for w, w2, v in zip(weights[:-1], pad[:-1], vs[:-1]):
        out = out + (float(w) - float(w2)) * (v - vn)
    return dt * out


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation of two (n,) samples (ties share their mean rank); NaN when one is constant."""
    def ranks(v: np.ndarray) -> np.ndarray:
        v = np.asarray(v, np.float64).reshape(-1)
        order = np.argsort(v, kind="mergesort")
        r = np.empty(v.size, np.float64)
        r[order] = np.arange(v.size, dtype=np.float64)
        values, inverse, counts = np.unique(v, return_inverse=True, return_counts=True)
        if np.any(counts > 1):  # mean rank per tied value
            r = (np.bincount(inverse, weights=r) / counts)[inverse]
        return r

    ra, rb = ranks(a), ranks(b)
    if ra.size != rb.size or ra.size < 2:
        raise ValueError(f"spearman needs two samples of the same size >= 2, got {ra.size} and {rb.size}")
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = float(np.sqrt((ra * ra).sum() * (rb * rb).sum()))
    return float((ra * rb).sum() / den) if den > 0 else float("nan")
