"""What a benchmark run will do: a frozen, checked plan, and the inputs it derives.

Everything the harness measures follows from a :class:`BenchPlan` and the model: the same start
noise (from ``seed``) and balanced labels for every solver, one reference per guidance scale, one
job per (solver, NFE) plus the Euler ladder. Time convention: t = 1 noise, t = 0 data.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Optional, Sequence

import numpy as np

from ..base.errors import ConfigError

DEFAULT_NFES = (3, 4, 5, 6, 8, 10, 20, 50, 100)
EULER_LADDER = (*range(1, 11), 12, 15, 20, 25, 30, 40, 50, 60, 80, 100, 128, 160, 200)


def check_counts(n: int, nfes: Sequence[int]) -> None:
    """Refuse non-positive sample counts and NFE budgets (one-line ConfigError)."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ConfigError(f"n (number of samples) must be a positive integer, got {n!r}")
    bad = [k for k in nfes if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1]
    if bad or not nfes:
        raise ConfigError(f"every NFE must be a positive integer, got {list(nfes)!r}")


def select_solvers(names: Optional[Sequence[str]], has_sidenet: bool) -> list[str]:
    """Requested names, checked against the registry; None: every registered solver that can run."""
    from ..runtime import get_solver, solver_names

    if names is None:
        return [s for s in solver_names() if has_sidenet or not get_solver(s).needs_sidenet]
    names = list(dict.fromkeys(names))
    if not names:
        raise ConfigError(f"no solver given; known solvers: {', '.join(sorted(solver_names()))}")
    for name in names:
        get_solver(name)  # unknown -> ConfigError listing the known ones
    return names


def parse_reference(text: str) -> tuple[str, float]:
    """``rk4:N`` (N even, >= 2 uniform steps) or ``dopri5[:TOL]`` -> (method, steps or tolerance)."""
    method, _, arg = str(text).partition(":")
    try:
        if method == "rk4":
            steps = int(arg or 512)
            if steps >= 2 and steps % 2 == 0:
                return "rk4", steps
        elif method == "dopri5":
            tol = float(arg or 1e-6)
            if 0 < tol < 1:
                return "dopri5", tol
    except ValueError:
        pass
    raise ConfigError(
        f"bad reference {text!r}; use 'rk4:N' (N even, e.g. rk4:512) or 'dopri5[:TOL]' (e.g. dopri5:1e-6)"
    )


def check_cfgs(cfg_scales: Sequence[float]) -> list[float]:
    """Guidance scales by the sampling plan's rule (finite, > 0, capped), deduplicated in order.
    Whether the model can be guided at all is the plan's decision too (it knows its conditions)."""
    from ..runtime.plan import check_cfg_scale

    if not list(cfg_scales):
        raise ConfigError("no guidance scale given (--cfg)")
    return list(dict.fromkeys(check_cfg_scale(s, "--cfg") for s in cfg_scales))


def make_inputs(
    state_shape: Sequence[int], num_classes: int, n: int, seed: int
) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """Start noise (n, *state_shape) float32 at t = 1 and balanced labels ``i mod C`` (None if C = 0)."""
    noise = np.random.default_rng(seed).standard_normal((n, *state_shape)).astype(np.float32)
    labels = np.arange(n, dtype=np.int64) % num_classes if num_classes else None
    return noise, labels


CACHED_SUFFIX = "+cache"  # the label of a solver run with the cached first call


def label_of(method: str, first_call: str) -> str:
    """The row label of a (solver, first call) pair in the tables: ``ba`` or ``ba+cache``."""
    return method if first_call == "backbone" else method + CACHED_SUFFIX


def method_of(label: str) -> str:
    """The registry name behind a row label (``ba+cache`` -> ``ba``)."""
    return label[: -len(CACHED_SUFFIX)] if label.endswith(CACHED_SUFFIX) else label


@dataclass(frozen=True)
class Job:
    """One measurement per guidance scale: ``solver`` at ``nfe`` with its first call from the
    backbone or the cache; ``ladder_only`` runs feed the Euler-to-match table and keep no samples."""

    solver: str
    nfe: int
    ladder_only: bool = False
    first_call: str = "backbone"

    @property
    def label(self) -> str:
        return label_of(self.solver, self.first_call)


@dataclass(frozen=True)
class BenchPlan:
    """A checked benchmark plan (build it with :meth:`make`); ``settings()`` is what results.json records."""

    solvers: tuple[str, ...]
    nfes: tuple[int, ...]
    n: int
    cfg_scales: tuple[float, ...]
    seed: int = 0
    reference: str = "rk4:512"
    cfg_interval: tuple[float, float] = (0.0, 1.0)
    euler_ladder: tuple[int, ...] = EULER_LADDER
    command: str = ""
    first_calls: tuple[str, ...] = ("backbone",)
    grids: str = "uniform"  # "uniform" or "tuned" (each solver on the model's tuned grid for its budget)
    self_check: bool = True  # solve the reference again at half the steps to measure its error

    @classmethod
    def make(cls, model, solvers: Optional[Sequence[str]], nfes: Sequence[int], n: int,
             cfg_scales: Sequence[float], **settings: Any) -> "BenchPlan":
        """Check every argument against ``model`` (its meta and SideNet) and freeze them."""
        check_counts(n, list(nfes))
        cfgs = check_cfgs(cfg_scales)
        names = select_solvers(solvers, model.sidenet is not None)
        parse_reference(settings.get("reference", cls.reference))
        ladder = settings.pop("euler_ladder", EULER_LADDER)
        lo, hi = settings.pop("cfg_interval", (0.0, 1.0))
        first_calls = tuple(dict.fromkeys(settings.pop("first_calls", ("backbone",))))
        if not first_calls or any(f not in ("backbone", "cached") for f in first_calls):
            raise ConfigError(f"first calls must be 'backbone' and/or 'cached', got {list(first_calls)!r}")
        if settings.get("grids", "uniform") not in ("uniform", "tuned"):
            raise ConfigError(f"grids must be 'uniform' or 'tuned', got {settings['grids']!r}")
        return cls(tuple(names), tuple(sorted({int(k) for k in nfes})), int(n), tuple(cfgs),
                   euler_ladder=tuple(sorted({int(k) for k in ladder})), cfg_interval=(float(lo), float(hi)),
                   first_calls=first_calls, **settings)

    @property
    def labels(self) -> tuple[str, ...]:
        """Table rows: each solver once per first-call mode (``ba``, ``ba+cache``)."""
        return tuple(label_of(s, f) for s in self.solvers for f in self.first_calls)

    def jobs(self) -> list[Job]:
        """Every (solver, first call, NFE), then the Euler ladder rungs (uniform grid, backbone first
        call) that the solver jobs do not already cover."""
        jobs = [Job(s, k, first_call=f) for s in self.solvers for f in self.first_calls for k in self.nfes]
        plain_euler = "euler" in self.solvers and "backbone" in self.first_calls and self.grids == "uniform"
        return jobs + [Job("euler", k, True) for k in self.euler_ladder if not plain_euler or k not in self.nfes]

    def settings(self) -> dict[str, Any]:
        """The JSON ``settings`` block (lists, in the order results.json has always had them)."""
        d = asdict(self)
        extra = {} if self.first_calls == ("backbone",) and self.grids == "uniform" and self.self_check else {
            "first_calls": list(self.first_calls), "grids": self.grids, "self_check": self.self_check}
        return {"solvers": list(self.labels), "nfes": list(self.nfes), "cfg_scales": list(self.cfg_scales),
                "euler_ladder": list(self.euler_ladder), "n": self.n, "seed": self.seed,
                "reference": self.reference, "cfg_interval": list(self.cfg_interval), "command": d["command"],
                **extra}
