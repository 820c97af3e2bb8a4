"""Cross-request batching: merge compatible requests into as few solves as fit (Ray-free).

Requests with the same :attr:`SampleRequest.key` (solver, NFE, grid, guidance) are packed, in
arrival order, into solves of at most ``rows`` state rows; a request larger than ``rows`` is
split over several solves (not FastFlow: its skip decisions are taken per solved batch). Each
request draws its own start noise from its own seed (:func:`anchorflow.sampling.start_noise`),
so with row-independent networks every request's rows equal those of a lone
``anchorflow sample`` run.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np

from .request import SampleRequest


@dataclass(frozen=True)
class Piece:
    """Rows ``start:stop`` of request number ``index`` (in the list given to :func:`plan`)."""

    index: int
    start: int
    stop: int

    @property
    def rows(self) -> int:
        return self.stop - self.start


@dataclass
class Solve:
    """One planned solve: requests of one key, as pieces, at most ``rows`` rows in total."""

    key: tuple
    pieces: list[Piece] = field(default_factory=list)

    @property
    def rows(self) -> int:
        return sum(p.rows for p in self.pieces)

    @property
    def requests(self) -> int:
        return len({p.index for p in self.pieces})


def plan(requests: Sequence[SampleRequest], rows_for: Callable[[SampleRequest], int]) -> list[Solve]:
    """Group by key (first-arrival order) and pack each group's rows into solves of <= rows_for(req)."""
    groups: "OrderedDict[tuple, list[int]]" = OrderedDict()
    for i, req in enumerate(requests):
        groups.setdefault(req.key, []).append(i)
    solves: list[Solve] = []
    for key, members in groups.items():
        cap = rows_for(requests[members[0]])
        current = Solve(key)
        for i in members:
            start = 0
            while start < requests[i].n:
                room = cap - current.rows
                if current.pieces and (room == 0 or (requests[i].solver == "fastflow" and room < requests[i].n)):
                    solves.append(current)
                    current, room = Solve(key), cap
                stop = min(requests[i].n, start + room)
                current.pieces.append(Piece(i, start, stop))
                start = stop
        if current.pieces:
            solves.append(current)
    return solves


def gather(solve: Solve, arrays: Sequence[np.ndarray]) -> np.ndarray:
    """Concatenate the solve's rows taken from the per-request arrays (axis 0)."""
    return np.concatenate([arrays[p.index][p.start : p.stop] for p in solve.pieces], axis=0)


def scatter(solve: Solve, x: np.ndarray, out: list[list[tuple]], estimate: Optional[np.ndarray] = None) -> None:
    """Hand each piece's rows of the solved batch ``x`` back to its request: ``out[index]`` gets
    (start, rows of x, the same rows of the per-sample ``estimate`` or None)."""
    row = 0
    for p in solve.pieces:
        est = None if estimate is None else estimate[row : row + p.rows]
        out[p.index].append((p.start, x[row : row + p.rows], est))
        row += p.rows
