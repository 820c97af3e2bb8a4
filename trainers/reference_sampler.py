"""Torch reference samplers: BA-solver (Algorithm 1 of arXiv 2601.21542) and Euler.

Used by tests (parity with the numpy runtime, ``anchorflow.runtime.solve("ba", ...)``) and for
training-time previews. Time convention: t = 1 noise, t = 0 data; uniform grid
``t_i = 1 - i/N``; NFE = backbone calls, a CFG call on 2B rows ``[cond; uncond]`` counting once.
Guidance ``v_u + s (v_c - v_u)`` applies for t in the CFG interval (lo, hi] (t = 0 included when
lo = 0), per quadrature node at the node's own time, exactly as the runtime's GuidedField.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from ..base.errors import ConfigError

# 4-point Gauss-Lobatto node (weights 1/12, 5/12, 5/12, 1/12). Written here on purpose rather than
# imported from runtime/solving/solvers/ba.py: this torch sampler is the runtime's test oracle and shares no code with it.
GAUSS_LOBATTO_A = (1 - 1 / math.sqrt(5)) / 2


def in_interval(t: float, interval: tuple[float, float]) -> bool:
    """Guidance is active for ``lo < t <= hi``; with ``lo == 0`` the end point t = 0 is included
    (the rule of the runtime's GuidedField, written again here: the oracle shares no code with it)."""
    lo, hi = interval
    return t <= hi and (t > lo or lo <= 0.0)


def quadrature_weights(a: float) -> tuple[float, float]:
    """(w_out, w_in) of the 4-node rule at fractions 0, a, 1-a, 1: ``w_in = 1 / (3 (1 - s^2))``, s = 1 - 2a."""
    if not 0 < a < 0.5:
        raise ConfigError(f"the BA node fraction a must lie in (0, 0.5), got {a}")
    s = 1 - 2 * a
    w_in = 1 / (3 * (1 - s * s))
    return 0.5 - w_in, w_in


class _Field:
    """Backbone + SideNet with CFG rows, in torch; counts backbone calls in ``nfe``."""

    def __init__(self, backbone, sidenet, y: Optional[torch.Tensor], batch: int, cfg_scale: float,
                 cfg_interval: tuple[float, float]) -> None:
        self.backbone, self.sidenet, self.batch = backbone, sidenet, batch
        self.scale, self.interval = float(cfg_scale), (float(cfg_interval[0]), float(cfg_interval[1]))
        self.rows = 2 if self.scale != 1.0 else 1
        if y is None:
            y = torch.full((batch,), int(backbone.null_label), dtype=torch.int64)
        null = torch.full((batch,), int(backbone.null_label), dtype=torch.int64)
        self.labels = torch.cat([y, null]) if self.rows == 2 else y
        self.nfe = 0

    def expand(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, x]) if self.rows == 2 else x

    def raw(self, x: torch.Tensor, t: float) -> torch.Tensor:
        xe = self.expand(x)
        self.nfe += 1
        return self.backbone(xe, torch.full((xe.shape[0],), t, dtype=x.dtype), self.labels)

    def guide(self, v_raw: torch.Tensor, t: float) -> torch.Tensor:
        if self.rows == 1:
            return v_raw
        v_c, v_u = v_raw[: self.batch], v_raw[self.batch:]
        return v_u + self.scale * (v_c - v_u) if in_interval(t, self.interval) else v_c

    def side(self, x: torch.Tensor, v_raw: torch.Tensor, t: float, offsets: list[float]) -> list[torch.Tensor]:
        """ONE batched SideNet call for all offsets; raw v_hat = v_raw + delta per offset."""
        k, xe = len(offsets), self.expand(x)
        n = xe.shape[0]
        h = torch.tensor(offsets, dtype=x.dtype).repeat_interleave(n)
        delta = self.sidenet(xe.repeat(k, *[1] * (x.dim() - 1)), v_raw.repeat(k, *[1] * (x.dim() - 1)),
                             torch.full((n * k,), t, dtype=x.dtype), h, self.labels.repeat(k))
        return [v_raw + d for d in delta.split(n)]


def _grid(nfe: int) -> list[float]:
    if isinstance(nfe, bool) or int(nfe) != nfe or nfe < 1:
        raise ConfigError(f"nfe must be a positive integer, got {nfe!r}")
    return [1.0 - i / int(nfe) for i in range(int(nfe) + 1)]


@torch.no_grad()
def ba_sample_torch(backbone, sidenet, noise: torch.Tensor, y: Optional[torch.Tensor], nfe: int,
                    cfg_scale: float = 1.0, cfg_interval: tuple[float, float] = (0.0, 1.0),
                    a: float = GAUSS_LOBATTO_A) -> torch.Tensor:
    """BA-solver with exactly ``nfe`` backbone calls: noise (B, ...) at t = 1 -> samples (B, ...) at t = 0.

    Per interval [t_{i+1}, t_i] of length h: a predictor from the start anchor (SideNet offsets
    a h, (1-a) h, h in one call), one backbone call at the predicted end point (reused as the
    next start anchor), and a bi-anchor corrector whose node near the end comes from the terminal
    anchor (offset -a h). The last interval returns its predictor.
    """
    w_out, w_in = quadrature_weights(a)
    grid = _grid(nfe)
    f = _Field(backbone, sidenet, y, noise.shape[0], cfg_scale, cfg_interval)
    x = noise
    v_raw = f.raw(x, grid[0])
    for i in range(len(grid) - 1):
        t0, t1 = grid[i], grid[i + 1]
        h = t0 - t1
        v0 = f.guide(v_raw, t0)
        va, vb, ve = f.side(x, v_raw, t0, [a * h, (1 - a) * h, h])
        va, vb, ve = f.guide(va, t0 - a * h), f.guide(vb, t0 - (1 - a) * h), f.guide(ve, t1)
        x_pred = x - h * (w_out * v0 + w_in * va + w_in * vb + w_out * ve)
        if i == len(grid) - 2:
            return x_pred
        v_end_raw = f.raw(x_pred, t1)
        (vb2,) = f.side(x_pred, v_end_raw, t1, [-a * h])
        vb2 = f.guide(vb2, t1 + a * h)
        x = x - h * (w_out * v0 + w_in * va + w_in * vb2 + w_out * f.guide(v_end_raw, t1))
        v_raw = v_end_raw
    return x  # not reached: the loop returns on its last interval


@torch.no_grad()
def euler_sample_torch(backbone, noise: torch.Tensor, y: Optional[torch.Tensor], nfe: int,
                       cfg_scale: float = 1.0, cfg_interval: tuple[float, float] = (0.0, 1.0)) -> torch.Tensor:
    """Explicit Euler on the uniform grid with ``nfe`` steps: ``x_{i+1} = x_i - h v(x_i, t_i)``."""
    grid = _grid(nfe)
    f = _Field(backbone, None, y, noise.shape[0], cfg_scale, cfg_interval)
    x = noise
    for t0, t1 in zip(grid[:-1], grid[1:]):
        x = x - (t0 - t1) * f.guide(f.raw(x, t0), t0)
    return x
