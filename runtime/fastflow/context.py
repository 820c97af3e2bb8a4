"""FastFlow bandits keyed by context: one bandit table per condition group or guidance setting.

A :class:`ContextBandits` holds one :class:`~.bandit.FastFlowBandit` per context, all with the
same settings (grid, arms, budget, reward, ...), each created fresh on the context's first
sight. The context of a row is

- ``by="label"``: its class label ``y``, mapped through ``groups`` (label -> group name) when
  given (a label outside ``groups`` is refused), else ``"label <y>"``;
- ``by="rows"``: a per-row ``context`` array the caller passes (any values, compared as strings);
- ``by="guidance"``: no per-row part (the whole batch shares one table per guidance setting);

and the guidance scale is always part of the key (``"<row part>|cfg <s>"``, or ``"cfg <s>"``
for ``by="guidance"``), so one stream may mix guidance settings. :func:`solve_contextual` splits
a batch whose rows belong to several contexts into one FastFlow sub-run per context (its own
table, its own decisions, on its own rows) and merges the samples back in row order.
Time convention: t = 1 noise, t = 0 data; calls are backbone calls.
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np

from ...base.errors import ConfigError
from ..solving.grids import GridSpec
from ..solving.result import Result, StepRecord, Timing
from ..solving.solve import solve
from .bandit import FastFlowBandit

CONTEXT_KINDS = ("label", "rows", "guidance")


def check_groups(groups: Any) -> Optional[dict[int, str]]:
    """``groups``: None or a mapping integer label -> non-empty group name (no ``|``)."""
    if groups is None:
        return None
    if not isinstance(groups, Mapping) or not groups:
        raise ConfigError(f"groups must be a non-empty mapping label -> group name, got {groups!r}")
    out: dict[int, str] = {}
    for label, name in groups.items():
        try:
            lab = int(label)
        except (TypeError, ValueError):
            raise ConfigError(f"groups: label {label!r} is not an integer") from None
        if isinstance(label, bool) or str(lab) != str(label).strip():
            raise ConfigError(f"groups: label {label!r} is not an integer")
        if not isinstance(name, str) or not name or "|" in name:
            raise ConfigError(f"groups: the group of label {lab} must be a non-empty name without '|', got {name!r}")
        out[lab] = name
    return out


def guidance_part(cfg_scale: float) -> str:
    return f"cfg {float(cfg_scale):g}"


class ContextBandits:
    """One FastFlow bandit table per context (see the module docstring), same settings for all.

    Args:
        T, grid, model_id, **settings: as :class:`FastFlowBandit` (arms, gamma, calls, speedup,
            mu, adapt, eta, tol, bonus, mu_factor, seed, reward); every table starts as
            ``FastFlowBandit(T, grid, model_id=model_id, **settings)`` would.
        by: "label" (default), "rows" or "guidance".
        groups: with ``by="label"``, a mapping label -> group name (None: one table per label).
    """

    def __init__(self, T: int, grid: GridSpec = None, *, model_id: str = "", by: str = "label",
                 groups: Optional[Mapping[int, str]] = None, **settings: Any) -> None:
        if by not in CONTEXT_KINDS:
            raise ConfigError(f"context must be one of {', '.join(CONTEXT_KINDS)}, got {by!r}")
        if groups is not None and by != "label":
            raise ConfigError(f"groups map labels to groups: they need by='label', not by={by!r}")
        self.template = FastFlowBandit(T, grid, model_id=model_id, **settings)
        self.by, self.groups = by, check_groups(groups)
        self.tables: dict[str, FastFlowBandit] = {}

    @property
    def key(self):
        return self.template.key

    @property
    def grid(self) -> np.ndarray:
        return self.template.grid

    @property
    def T(self) -> int:
        return self.template.T

    def spec(self) -> dict:
        """What the contexts are made of (stored in the state file and compared on load)."""
        groups = None if self.groups is None else {str(k): v for k, v in sorted(self.groups.items())}
        return {"by": self.by, "groups": groups}

    def table(self, context: str) -> FastFlowBandit:
        """The bandit of ``context``, created from the template's settings on first use."""
        if context not in self.tables:
            self.check_name(context)
            self.tables[context] = copy.deepcopy(self.template)
        return self.tables[context]

    def check_name(self, context: Any) -> None:
        """A context name this spec can make (ConfigError otherwise): ``<row part>|cfg <s>``."""
        if not isinstance(context, str) or not context:
            raise ConfigError(f"a context name must be a non-empty string, got {context!r}")
        if self.by == "guidance":
            ok = context.startswith("cfg ") and "|" not in context
        else:
            row, sep, g = context.rpartition("|")
            ok = bool(sep) and bool(row) and g.startswith("cfg ")
            if ok and self.groups is not None:
                ok = row in set(self.groups.values())
            elif ok and self.by == "label":
                ok = row.startswith("label ")
        if not ok:
            raise ConfigError(f"context {context!r} is not one this {self.spec()} setup makes")

    def contexts(self, n: int, *, y: Optional[np.ndarray] = None, context: Optional[Sequence] = None,
                 cfg_scale: float = 1.0) -> list[str]:
        """The context name of each of the ``n`` rows."""
        g = guidance_part(cfg_scale)
        if self.by == "guidance":
            if context is not None:
                raise ConfigError("by='guidance' takes no per-row context")
            return [g] * n
        if self.by == "rows":
            if context is None or len(context) != n:
                got = None if context is None else len(context)
                raise ConfigError(f"by='rows' needs a per-row context of {n} values, got {got}")
            return [f"{c}|{g}" for c in context]
        if context is not None:
            raise ConfigError("by='label' takes its context from y; pass no per-row context")
        if y is None:
            raise ConfigError("by='label' needs the class labels y of every row")
        labels = np.asarray(y).reshape(-1)
        if labels.size != n or not np.issubdtype(labels.dtype, np.integer):
            raise ConfigError(f"by='label' needs {n} integer labels y, got {labels.size} of {labels.dtype}")
        if self.groups is None:
            return [f"label {int(v)}|{g}" for v in labels]
        missing = sorted({int(v) for v in labels} - set(self.groups))
        if missing:
            raise ConfigError(f"label(s) {missing} have no group in groups; add them or use by='label' without groups")
        return [f"{self.groups[int(v)]}|{g}" for v in labels]


def _rows(value: Any, idx: np.ndarray, n: int) -> Any:
    """Row ``idx`` of a per-row array (leading axis n); a broadcast (1, ...) / 0-d value as it is."""
    if value is None:
        return None
    if isinstance(value, dict):
        return {k: _rows(v, idx, n) for k, v in value.items()}
    a = np.asarray(value)
    return a[idx] if a.ndim and a.shape[0] == n else value


def solve_contextual(velocity: Callable, noise: np.ndarray, T: int, bandits: ContextBandits, *,
                     y: Optional[np.ndarray] = None, cond: Optional[dict] = None,
                     null_cond: Optional[dict] = None, context: Optional[Sequence] = None,
                     cfg_scale: float = 1.0, learn: bool = True, **options: Any) -> Result:
    """FastFlow with one bandit table per context: one sub-run per context, merged in row order.

    Each context's rows are solved by ``solve("fastflow", ...)`` with that context's table (and
    learn into it when ``learn``), in the order the contexts first appear in the batch; the
    samples come back in the batch's row order. ``options`` go to every sub-run (tail, base,
    order, max_calls, grid must be left to ``bandits``...).

    The merged :class:`Result`: ``nfe`` the backbone invocations of all sub-runs together (one
    call per computed step per sub-run, each on that context's rows); ``info["calls_per_sample"]``
    the mean over rows of the calls their own sub-run made (what each sample cost, the number
    comparable to a plain run's ``nfe``); ``info["contexts"]`` {context: {"rows", "calls", "info"}};
    ``steps[k].calls`` how many sub-runs computed step k.
    """
    noise = np.asarray(noise)
    if noise.ndim < 2:
        raise ConfigError(f"noise must have a batch axis, shape (B, ...); got shape {noise.shape}")
    if "grid" in options or "bandit" in options:
        raise ConfigError("the grid and the bandit tables come from bandits (a ContextBandits)")
    if not isinstance(bandits, ContextBandits):
        raise ConfigError(f"bandits must be a ContextBandits, got {type(bandits).__name__}")
    n = noise.shape[0]
    names = bandits.contexts(n, y=y, context=context, cfg_scale=cfg_scale)
    order = list(dict.fromkeys(names))
    x = None
    runs: dict[str, tuple[np.ndarray, Result]] = {}
    for name in order:
        idx = np.flatnonzero(np.array([c == name for c in names]))
        r = solve("fastflow", velocity, noise[idx], T, grid=bandits.grid, bandit=bandits.table(name), learn=learn,
                  y=_rows(y, idx, n), cond=_rows(cond, idx, n), null_cond=_rows(null_cond, idx, n),
                  cfg_scale=cfg_scale, **options)
        if x is None:
            x = np.empty((n, *r.x.shape[1:]), r.x.dtype)
        x[idx] = r.x
        runs[name] = (idx, r)
    results = [r for _, r in runs.values()]
    steps = tuple(
        StepRecord(k, float(bandits.grid[k]), float(bandits.grid[k + 1]),
                   calls=sum(r.steps[k].calls for r in results),
                   sidenet_calls=sum(r.steps[k].sidenet_calls for r in results),
                   info={"computed_by": [c for c, (_, r) in runs.items() if r.steps[k].calls]})
        for k in range(T))
    nfe = sum(r.nfe for r in results)
    estimates = [r.error_estimate for r in results]
    err = None
    if all(e is not None for e in estimates):
        err = np.empty(n, np.float64)
        for (idx, _), e in zip(runs.values(), estimates):
            err[idx] = e
    info = {"calls": nfe, "backbone_invocations": nfe,
            "calls_per_sample": float(sum(len(idx) * r.nfe for idx, r in runs.values()) / n),
            "contexts": {c: {"rows": idx.tolist(), "calls": r.nfe, "info": dict(r.info)} for c, (idx, r) in runs.items()}}
    timing = Timing(sum(r.timing.total_s for r in results), sum(r.timing.backbone_s for r in results),
                    sum(r.timing.sidenet_s for r in results))
    return Result(x, nfe, sum(r.sidenet_calls for r in results), steps, "fastflow", bandits.grid.copy(), timing,
                  info, err)
