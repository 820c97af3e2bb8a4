"""Parsing and validating one ``POST /v1/sample`` body into a :class:`SampleRequest` (Ray-free).

Every problem raises :class:`RequestError` (an AnchorflowError, answered as HTTP 400 with
``{"error": message}``). The request mirrors ``anchorflow sample``'s options:

    {"solver": "ba", "nfe": 6, "n": 3, "labels": [0, 1, 2], "cfg": 1.5, "cfg_interval": [0, 1],
     "seed": 0, "grid": null, "format": "npy" | "png" | "json"}

``grid`` is null (what ``anchorflow sample`` uses by default: the bundle's tuned grid for the solver
and NFE where it has one, else uniform), "uniform", "shift:S" or an explicit list of times from 1
(noise) to 0 (data).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from ..errors import ConfigError
from ..runtime.solvers import max_sidenet_offsets
from .errors import RequestError  # noqa: F401  (raised here; its home is below conditions)

FORMATS = ("npy", "png", "json")
FIELDS = ("solver", "nfe", "n", "labels", "cfg", "cfg_interval", "seed", "grid", "format", "conditions",
          "null_conditions")
DEFAULTS: dict[str, Any] = {"solver": "ba", "nfe": 7, "n": 16, "labels": None, "cfg": 1.0,
                            "cfg_interval": [0.0, 1.0], "seed": 0, "grid": None, "format": "npy",
                            "conditions": None, "null_conditions": None}


@dataclass(frozen=True)
class Limits:
    """What the service accepts: ``max_rows`` per solve (state rows, before CFG doubling), ``max_n``
    per request (larger non-FastFlow requests are split into several solves), ``max_nfe``."""

    max_rows: int
    max_n: int
    max_nfe: int = 512


# The most SideNet offsets per state row in one call, from the solver registry (BA's merged probe: 4).
SIDENET_PROBES = max_sidenet_offsets()


def rows_limit(cap: int, guided: bool, sidenet: bool, backbone_max: Optional[int], sidenet_max: Optional[int]) -> int:
    """State rows one solve may hold so every network call stays inside the bundle's batch range."""
    g = 2 if guided else 1
    limits = [cap]
    if backbone_max:
        limits.append(backbone_max // g)
    if sidenet and sidenet_max:
        limits.append(sidenet_max // (g * SIDENET_PROBES))
    return max(1, min(limits))


@dataclass(frozen=True)
class SampleRequest:
    """One validated request. ``key`` groups requests that may share one solve."""

    solver: str
    nfe: int
    n: int
    labels: Optional[tuple[int, ...]]
    cfg: float
    cfg_interval: tuple[float, float]
    seed: int
    grid: Any  # None, "uniform", "shift:S" or a tuple of times
    format: str
    arrived: float = field(default=0.0, compare=False)
    # named conditions: sorted ((name, array), ...) with n or 1 rows each, and their null values
    conditions: Optional[tuple] = field(default=None, compare=False)
    null_conditions: Optional[tuple] = field(default=None, compare=False)

    @property
    def key(self) -> tuple:
        """Solver, NFE, grid, guidance and condition layout: requests with equal keys share one solve."""
        from .conditions import signature

        interval = self.cfg_interval if self.cfg != 1.0 else (0.0, 1.0)
        # grid None (the bundle's tuned default for this solver and NFE) is not "uniform" when tuned
        return (self.solver, self.nfe, self.grid, self.cfg, interval, signature(self.conditions, self.null_conditions))


def _fail(msg: str) -> RequestError:
    return RequestError(msg)


def _int(body: dict, name: str, lo: int, hi: Optional[int] = None) -> int:
    v = body[name]
    if isinstance(v, bool) or not isinstance(v, int):
        raise _fail(f"{name!r} must be an integer, got {json.dumps(v)}")
    if v < lo or (hi is not None and v > hi):
        rng = f">= {lo}" if hi is None else f"in {lo}..{hi}"
        raise _fail(f"{name!r} must be {rng}, got {v}")
    return v


def _number(v: Any, name: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise _fail(f"{name!r} must be a finite number, got {json.dumps(v)}")
    return float(v)


def decode_body(raw: bytes) -> dict:
    """The JSON object of a request body (RequestError for anything else)."""
    try:
        body = json.loads(raw.decode("utf-8") if raw else "{}")
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _fail(f"the body is not valid JSON ({exc}); send a JSON object such as "
                    '{"solver": "ba", "nfe": 6, "n": 4}') from None
    if not isinstance(body, dict):
        raise _fail(f"the body must be a JSON object, got {type(body).__name__}")
    unknown = sorted(set(body) - set(FIELDS))
    if unknown:
        raise _fail(f"unknown field(s) {', '.join(map(repr, unknown))}; known: {', '.join(FIELDS)}")
    return {**DEFAULTS, **{k: v for k, v in body.items() if v is not None or k == "grid"}}


def parse_request(raw: bytes, meta: dict, limits: Limits, has_sidenet: bool, arrived: float = 0.0,
                  model_conditions: Optional[tuple] = None) -> SampleRequest:
    """Validate a request body against the model (``meta``: state_shape, num_classes) and the limits.

    ``model_conditions``: (declared conditions, axis_range(name) -> (min, opt, max) or None, the
    bundle's null values) of a bundle whose backbone declares conditions; None: labels only.
    """
    from ..runtime import get_solver, make_grid, solver_names

    body = decode_body(raw)
    solver = body["solver"]
    if not isinstance(solver, str) or solver not in solver_names():
        raise _fail(f"unknown solver {json.dumps(solver)}; choose from {', '.join(solver_names())}")
    spec = get_solver(solver)
    if spec.needs_sidenet and not has_sidenet:
        raise _fail(f"solver {solver!r} needs a SideNet and this model has none; pick another solver")
    nfe = _int(body, "nfe", 1, limits.max_nfe)
    n = _int(body, "n", 1, limits.max_n)
    seed = _int(body, "seed", 0, 2**63 - 1)
    cfg = _number(body["cfg"], "cfg")
    interval = body["cfg_interval"]
    if not isinstance(interval, (list, tuple)) or len(interval) != 2:
        raise _fail(f"'cfg_interval' must be two numbers [lo, hi], got {json.dumps(interval)}")
    lo, hi = (_number(v, "cfg_interval") for v in interval)
    if not 0.0 <= lo < hi <= 1.0:
        raise _fail(f"'cfg_interval' must satisfy 0 <= lo < hi <= 1, got [{lo:g}, {hi:g}]")
    fmt = body["format"]
    if fmt not in FORMATS:
        raise _fail(f"unknown format {json.dumps(fmt)}; choose from {', '.join(FORMATS)}")
    conds = nulls = None
    if body["conditions"] is not None or body["null_conditions"] is not None:
        from .conditions import parse_conditions

        if not model_conditions or not model_conditions[0]:
            raise _fail("this model declares no named conditions; drop 'conditions'")
        conds, nulls = parse_conditions(body, n, *model_conditions, guided=cfg != 1.0)
    labels = _labels(body["labels"], n, int(meta.get("num_classes", 0) or 0))
    if cfg != 1.0 and not int(meta.get("num_classes", 0) or 0) and conds is None:
        raise _fail("this model is unconditional, so classifier-free guidance does not apply; send cfg 1")
    grid = body["grid"]
    if isinstance(grid, list):
        grid = tuple(_number(v, "grid") for v in grid)
    elif grid is not None and not isinstance(grid, str):
        raise _fail(f"'grid' must be null, 'uniform', 'shift:S' or a list of times, got {json.dumps(grid)}")
    try:
        make_grid(spec.steps_for_nfe(nfe), grid)
    except ConfigError as exc:
        raise _fail(str(exc)) from None
    return SampleRequest(solver, nfe, n, labels, cfg, (lo, hi), seed, grid, fmt, arrived, conds, nulls)


def _labels(value: Any, n: int, num_classes: int) -> Optional[tuple[int, ...]]:
    from ..sampling import cycle_labels

    if value is not None and (not isinstance(value, list) or not value):
        raise _fail(f"'labels' must be a non-empty list of integers (cycled over the n samples), got {json.dumps(value)}")
    try:
        cycle_labels(value, 1, num_classes, "'labels'")
    except ConfigError as exc:
        raise _fail(str(exc)) from None
    return None if value is None else tuple(int(v) for v in value)


def request_labels(req: SampleRequest, num_classes: int) -> Optional[np.ndarray]:
    """The (n,) labels of a request, exactly as ``anchorflow sample --labels`` cycles them."""
    from ..sampling import cycle_labels

    return cycle_labels(req.labels, req.n, num_classes)
