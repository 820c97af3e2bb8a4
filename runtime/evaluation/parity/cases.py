"""Parity inputs built from a network's declared inputs (torch-free: numpy only).

Every input is drawn by its declaration (:class:`~anchorflow.runtime.bundles.format.TensorDecl`:
role, dtype, shape with named axes) and a :class:`Domain` for what the declaration does not say:
- state x and velocity v ~ N(0, 1); time t ~ U(0, 1) (t = 1 noise, t = 0 data); offset h ~
  U(-(1 - t), t), so that t - h stays in [0, 1];
- a class-label condition (an integer one with a null label, e.g. ``y``) uniform over its labels,
  the null label included; any other integer or boolean condition is a mask: all ones;
- a float condition N(0, 1) (text embeddings, pooled projections), or uniform over a declared
  range (an embedded guidance scale such as FLUX-dev's ``guidance``: 1..5).
"Real" inputs are noised data ``x_t = (1 - t) x_data + t noise`` at the solver times
:data:`T_LEVELS`, and for a SideNet the backbone's v there with the offsets the BA-solver asks for
(arXiv 2601.21542). Cases cover batch 1, a prime batch and the network's maximum rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import numpy as np

from ...bundles.format import BATCH, BundleFormat, TensorDecl
from ...solving.solvers.ba import LOBATTO_A

BA_FRACTIONS = (LOBATTO_A, 1.0 - LOBATTO_A, 1.0, -LOBATTO_A)  # the BA probe offsets, in units of h
STEP_SIZES = (1 / 5, 1 / 7, 1 / 10)  # intervals of 5-, 7- and 10-NFE uniform grids
# Times at which solvers call the nets: from t = 1 (noise) down to 1/50, the last backbone call of
# a 50-step grid. No solver calls the backbone at t = 0 (the last step ends there), where the
# learned field is steepest: a trained digits DiT's fp16 error grows from 3 u at t = 0.05 to
# 15 u at t = 0 (u = 2^-11), while fp32 parity is unaffected.
T_LEVELS = (0.02, 0.05, 0.2, 0.4, 0.6, 0.8, 0.95, 1.0)
PRIME_BATCH = 7
GUIDANCE_SCALES = (1.0, 5.0)  # the range an embedded guidance input is drawn from
UNCOND_SHARE = 0.1  # real label rows replaced by the null label, as the sampler sends them


@dataclass(frozen=True)
class Case:
    """One set of feeds: ``kind`` ("random", "real", maybe with axis sizes), ``batch`` rows."""

    kind: str
    batch: int
    feeds: dict[str, np.ndarray]

    @property
    def label(self) -> str:
        return f"{self.kind} b={self.batch}"


@dataclass(frozen=True)
class RealData:
    """Where real inputs come from: data samples x0 (N, *state) at t = 0 with labels y0 (N,) (or
    None), other per-sample conditions ``cond0`` (name -> (N, ...)), and the reference backbone
    ``velocity(x, t, cond)`` that turns noised states into (x, v) pairs."""

    x0: np.ndarray
    y0: Optional[np.ndarray]
    velocity: Callable[[np.ndarray, np.ndarray, Optional[dict]], np.ndarray]
    cond0: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Domain:
    """What the declarations leave open: ``sizes`` (named axis -> size), ``labels`` (label
    condition -> number of values, the null label included), ``null`` (condition -> null value),
    ``uniform`` (float condition -> (low, high))."""

    sizes: dict = field(default_factory=dict)
    labels: dict = field(default_factory=dict)
    null: dict = field(default_factory=dict)
    uniform: dict = field(default_factory=dict)

    @classmethod
    def for_labels(cls, num_classes: int, name: str = "y") -> "Domain":
        """Class labels 0..C-1 plus the null label C (our checkpoints' convention)."""
        return cls(labels={name: num_classes + 1}, null={name: num_classes})

    @classmethod
    def of_bundle(cls, fmt: BundleFormat, sizes: Optional[dict] = None) -> "Domain":
        """The domain a bundle implies: labels from integer null values (or model.num_classes for
        ``y``), the embedded guidance input over :data:`GUIDANCE_SCALES`, axes at ``sizes`` (default opt)."""
        null = {k: v for k, v in fmt.guidance.null.items() if np.ndim(v) == 0}
        labels = {}
        for c in (c for net in fmt.networks.values() for c in net.conditions if c.dtype in ("int64", "int32")):
            if isinstance(null.get(c.name), int):
                labels[c.name] = int(null[c.name]) + 1
            elif c.name == "y" and fmt.model.get("num_classes"):
                labels[c.name] = int(fmt.model["num_classes"]) + 1
        uniform = {fmt.guidance.input: GUIDANCE_SCALES} if fmt.guidance.mode == "embedded" and fmt.guidance.input else {}
        axes = {a: r[1] for net in fmt.networks.values() for a, r in net.axes.items()}
        return cls({**axes, **(sizes or {})}, labels, null, uniform)


def decls(entries: Sequence[Any]) -> tuple[TensorDecl, ...]:
    """TensorDecls from bundle.json-style dicts (``name``, ``dtype``, ``shape``, ``role``, ``per_row``)."""
    return tuple(e if isinstance(e, TensorDecl) else TensorDecl(
        e["name"], e.get("dtype", "float32"), tuple(e["shape"]), e.get("role", "condition"),
        bool(e.get("per_row", True))) for e in entries)


def shape_of(decl: TensorDecl, batch: int, sizes: dict) -> tuple[int, ...]:
    """The declared shape with ``batch`` rows and the named axes at ``sizes``."""
    return tuple(batch if d == BATCH else int(sizes[d]) if isinstance(d, str) else int(d) for d in decl.shape)


def _condition(c: TensorDecl, batch: int, rng: np.random.Generator, dom: Domain, null: bool = True) -> np.ndarray:
    shape = shape_of(c, batch, dom.sizes)
    if c.dtype in ("int64", "int32", "bool"):
        if c.name in dom.labels:
            top = dom.labels[c.name] - (0 if null or c.name not in dom.null else 1)
            return rng.integers(0, top, shape).astype(c.dtype)
        return np.ones(shape, c.dtype)  # a mask: every token kept
    if c.name in dom.uniform:
        return rng.uniform(*dom.uniform[c.name], shape).astype(np.float32)
    return rng.standard_normal(shape).astype(np.float32)


def random_feeds(inputs: Sequence[TensorDecl], batch: int, rng: np.random.Generator,
                 dom: Optional[Domain] = None) -> dict[str, np.ndarray]:
    """Random feeds of the declared inputs (see the module docstring). t, x, v and h are drawn
    in that order for every network (v and h even for a backbone), then the conditions in order,
    so that one seed gives a backbone and its SideNet the same x and t."""
    dom = dom or Domain()
    state = next(i for i in inputs if i.role == "state")
    t = rng.random(batch).astype(np.float32)
    by_role = {"time": t, "state": rng.standard_normal(shape_of(state, batch, dom.sizes)).astype(np.float32)}
    by_role["velocity"] = rng.standard_normal(by_role["state"].shape).astype(np.float32)
    by_role["offset"] = (rng.random(batch) * 1.0 - (1.0 - t)).astype(np.float32)
    k = _offsets(inputs, dom)
    if k:  # a shared-body SideNet: K offsets per row, each in [-(1 - t), t]
        by_role["offset"] = (rng.random((k, batch)) - (1.0 - t)).astype(np.float32)
    return {i.name: by_role[i.role] if i.role in by_role else _condition(i, batch, rng, dom) for i in inputs}


OFFSETS = "offsets"  # the axis of a shared-body SideNet's h (offsets, batch): K offsets per row


def _offsets(inputs: Sequence[TensorDecl], dom: Domain) -> int:
    """K when the offset input is declared (offsets, batch) (``dom.sizes["offsets"]``, default 4), else 0."""
    h = next((i for i in inputs if i.role == "offset"), None)
    if h is None or len(h.shape) != 2:
        return 0
    return int(dom.sizes.get(OFFSETS, 4))


def conditions(inputs: Sequence[TensorDecl], batch: int, rng: np.random.Generator, dom: Optional[Domain] = None,
               null: bool = True) -> dict[str, np.ndarray]:
    """Random values of the declared conditions only; ``null=False``: labels without the null label."""
    dom = dom or Domain()
    return {c.name: _condition(c, batch, rng, dom, null) for c in inputs if c.role == "condition"}


def real_feeds(inputs: Sequence[TensorDecl], real: RealData, batch: int, rng: np.random.Generator,
               dom: Optional[Domain] = None) -> dict[str, np.ndarray]:
    """Noised data at the levels :data:`T_LEVELS` (cycled); labels from ``real.y0`` (some rows
    null) or the null label when there are none; other conditions from ``real.cond0`` or random;
    for the SideNet also the backbone's v there and BA probe offsets ``fraction * step`` clipped so
    that t - h stays in [0, 1]."""
    dom = dom or Domain()
    idx = rng.integers(0, len(real.x0), batch)
    t = np.resize(np.asarray(T_LEVELS, np.float32), batch)
    x0 = real.x0[idx].astype(np.float32)
    noise = rng.standard_normal(x0.shape).astype(np.float32)
    tb = t.reshape(-1, *([1] * (x0.ndim - 1)))
    cond = {k: np.asarray(v)[idx] for k, v in real.cond0.items()}
    for c in (i for i in inputs if i.role == "condition"):
        if c.name in cond:
            continue
        if c.name in dom.labels and c.name in dom.null:
            null = int(dom.null[c.name])
            if real.y0 is None:
                cond[c.name] = np.full(batch, null, c.dtype)
            else:
                y = real.y0[idx].astype(c.dtype)
                y[rng.random(batch) < UNCOND_SHARE] = null
                cond[c.name] = y
        else:
            cond[c.name] = _condition(c, batch, rng, dom)
    by_role = {"state": ((1 - tb) * x0 + tb * noise).astype(np.float32), "time": t}
    roles = {i.role for i in inputs}
    if "velocity" in roles:
        by_role["velocity"] = np.asarray(real.velocity(by_role["state"], t, cond), np.float32)
    if "offset" in roles:
        k = _offsets(inputs, dom)
        size = (k, batch) if k else batch
        h = rng.choice(BA_FRACTIONS, size) * rng.choice(STEP_SIZES, size)
        by_role["offset"] = np.clip(h, -(1.0 - t), t).astype(np.float32)
    return {i.name: by_role[i.role] if i.role in by_role else cond[i.name] for i in inputs}


def batches(top: int) -> list[int]:
    """Batch 1, a prime batch and the maximum rows ``top`` (deduplicated, in order)."""
    return sorted({1, min(PRIME_BATCH, top), top})


def make_cases(inputs: Sequence[Any], sizes: Sequence[int], dom: Optional[Domain] = None,
               real: Optional[RealData] = None, seed: int = 0, tag: str = "") -> list[Case]:
    """Random cases for every batch size in ``sizes``, plus real ones when ``real`` is given.
    ``tag`` (e.g. "L=7") is added to each case's kind."""
    inputs, rng = decls(inputs), np.random.default_rng(seed)
    kind = lambda k: f"{k} {tag}" if tag else k  # noqa: E731
    cases = [Case(kind("random"), b, random_feeds(inputs, b, rng, dom)) for b in sizes]
    if real is not None:
        cases += [Case(kind("real"), b, real_feeds(inputs, real, b, rng, dom)) for b in sizes]
    return cases
