"""One front door: user intent + a bundle -> a checked, frozen :class:`SamplePlan` -> ``solve``.

Every front end (``anchorflow sample``, ``bench``, ``demo``, ``tune``, the HTTP service, the Python
API ``load_bundle(...).sample(...)``) turns its arguments into a plan here, so what a request
means (conditions and their null rows, the time grid, the first call, guidance, the FastFlow
state) is resolved once, and every number and label is validated once: the CLI and the HTTP API
cannot disagree. Torch-free (numpy, the runtime).

API (stable; the service builds on it)::

    p = plan(bundle, *, solver="ba", nfe=7, grid=None, first_call="backbone", cfg_scale=1.0,
             cfg_interval=(0.0, 1.0), labels=None, cond=None, null_cond=None, n=None, seed=0,
             noise=None, bandit_state=None, calls=None, speedup=None, mu_factor=None,
             options=None, tuning=USE_BUNDLE, quality=None)
    p.key                  # sha256 of every field that changes the numbers (see KEY_EXCLUDED)
    p.run(noise=None)      # -> Result (FastFlow with a state file: learns and commits)
    p.begin(noise=None)    # -> Pending: .result now, .commit() once the caller's outputs are written
    p.solve_kwargs()       # the exact keyword arguments given to runtime.solve

``bundle``: what :func:`anchorflow.runtime.load_bundle` returns (``LoadedBundle``), or an
``OpenModel`` (``anchorflow.runtime.bundles.models``; the CLI's torch-checkpoint fallback has no bundle
declaration, so only class labels apply there). Arguments:

- ``grid``: None = the bundle's tuned grid for (solver, nfe, first call) when ``anchorflow tune``
  stored one, else uniform; or "uniform", "shift:S", "warp:S,P", or explicit times 1 -> 0.
- ``first_call``: "backbone", or "cached" (the bundle's tuned t = 1 table: no NFE, one more interval).
- ``labels``: class labels, ints in [0, C) exactly (a list cycled over the samples, or "1,2,3");
  default 0..C-1 cycled on a class-conditional model. bool / float / negative labels are refused.
- ``cond`` / ``null_cond``: dict name -> array, checked against the bundle's declaration
  (rows n or 1; integer conditions must be integers, label conditions in [0, C), the null label C
  allowed in ``null_cond``; float conditions finite). Missing null values come from the bundle.
- ``n`` / ``seed`` / ``noise``: the start noise at t = 1 is ``noise`` (n, *state) when given, else
  ``numpy.random.default_rng(seed)`` normal (n defaults to 16).
- FastFlow (``solver="fastflow"`` only): ``bandit_state`` (a state file learned across runs),
  ``calls`` or ``speedup`` (one of them), ``mu_factor``; each finite and > 0 (and in the bandit's range).
- ``options``: other solver options (e.g. ``{"bandit": FastFlowBandit(...)}``), passed to ``solve``.
- ``tuning``: the bundle's :class:`~anchorflow.runtime.bundles.tuned_grids.Tuning` read once by a caller that
  plans many requests (the service); default: read from the bundle.
- ``quality``: a preset recorded by ``anchorflow tune --target-psnr`` (a name, or a number of dB: the
  fastest preset whose bound meets it) in place of solver / nfe / grid / first_call (not with them).

Every refusal is a :class:`~anchorflow.base.errors.ConfigError` with one line. Time convention:
t = 1 noise, t = 0 data; NFE = backbone calls.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

import numpy as np

from ..base.errors import ConfigError

# Backbone calls per solve: RK4 at 256 calls already agrees with RK4-512 to > 60 dB on the bundled
# model, so a budget beyond this buys nothing but hours.
MAX_NFE = 1000
# Samples per plan: beyond this the state alone outgrows a machine's memory for image models.
MAX_N = 100_000
MAX_SEED = 2**32 - 1
# Guidance scales in use stay below ~30 (SD 7.5, FLUX 3.5); 1e3 already saturates any field, and
# larger values (1e300) overflow to Inf samples.
MAX_CFG_SCALE = 1000.0
# FastFlow's mu factor scales a calibrated price; beyond 1e6 every skip is free (the same as mu = inf).
MAX_MU_FACTOR = 1e6
DEFAULT_N = 16

USE_BUNDLE = object()  # tuning=...: read the bundle's tuned grids (the default)

# Fields of SamplePlan that do NOT enter the key, each with its reason; every other field does (by
# construction: SamplePlan.key walks dataclasses.fields). tests/test_plan.py pins this set.
KEY_EXCLUDED = {
    "model": "the callables; their identity is model_id and engine",
    "grid_source": "words describing the grid; the times themselves are the field grid",
    "rows": "per-row conditions: requests with equal keys are merged by concatenating rows",
    "n": "the row count: requests of any size merge",
    "seed": "start noise (row data)",
    "noise": "start noise (row data)",
    "quality": "the preset's name: its solver, nfe, grid and first call are fields of their own",
}


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))


def check_int(value: Any, what: str, low: int, high: int) -> int:
    """An integer (not a bool, not a float) in [low, high]; else one-line ConfigError."""
    if not _is_int(value):
        raise ConfigError(f"{what} must be an integer in {low}..{high}, got {value!r}")
    if not low <= int(value) <= high:
        raise ConfigError(f"{what} must be in {low}..{high}, got {value}")
    return int(value)


def check_positive(value: Any, what: str, high: float = math.inf, *, optional: bool = False) -> Optional[float]:
    """A finite number > 0 and <= high (None allowed when ``optional``)."""
    if value is None and optional:
        return None
    if not _is_number(value) or not math.isfinite(float(value)) or not float(value) > 0:
        raise ConfigError(f"{what} must be a finite number > 0, got {value!r}")
    if float(value) > high:
        raise ConfigError(f"{what} {value!r} is above the cap of {high:g}")
    return float(value)


def check_cfg_scale(value: Any, what: str = "cfg_scale") -> float:
    """Guidance scale: finite, > 0 and at most MAX_CFG_SCALE (1.0 = no guidance). The CLI's --cfg
    and the HTTP field ``cfg`` both go through this."""
    if not _is_number(value) or not math.isfinite(float(value)) or not float(value) > 0:
        raise ConfigError(f"{what} must be finite and > 0 (1.0 = no guidance), got {value!r}")
    if float(value) > MAX_CFG_SCALE:
        raise ConfigError(f"{what} {value!r} is above the cap of {MAX_CFG_SCALE:g}")
    return float(value)


def check_interval(value: Any, what: str = "cfg_interval") -> tuple[float, float]:
    """(lo, hi) or "lo,hi" with 0 <= lo < hi <= 1: guidance applies for t in (lo, hi]."""
    text = value
    if isinstance(value, str):
        try:
            value = [float(v) for v in value.split(",") if v.strip()]
        except ValueError:
            raise ConfigError(f"{what} must be a comma-separated list of numbers 'lo,hi', got {text!r}") from None
    try:
        lo, hi = value
    except (TypeError, ValueError):
        raise ConfigError(f"{what} takes exactly two numbers 'lo,hi', got {text!r}") from None
    if not (_is_number(lo) and _is_number(hi)) or not 0.0 <= float(lo) < float(hi) <= 1.0:
        raise ConfigError(f"{what} must satisfy 0 <= lo < hi <= 1, got {text!r}")
    return float(lo), float(hi)


def parse_labels(labels: Any, what: str = "labels") -> Optional[list[int]]:
    """"1,2,3" or a sequence of ints -> list of ints; bools, floats and non-numbers refused."""
    if labels is None:
        return None
    if isinstance(labels, str):
        parts = [p.strip() for p in labels.split(",") if p.strip()]
        try:
            values: list = [int(p) for p in parts]
        except ValueError:
            raise ConfigError(f"{what} must be integers (comma-separated), got {labels!r}") from None
    else:
        arr = np.asarray(labels, dtype=object) if not isinstance(labels, np.ndarray) else labels
        if arr.ndim != 1:
            raise ConfigError(f"{what} must be a flat list of integers, got shape {np.shape(labels)}")
        values = list(arr.tolist()) if isinstance(labels, np.ndarray) and labels.dtype.kind in "iu" else list(labels)
    if not values:
        raise ConfigError(f"{what} is empty")
    bad = [v for v in values if not _is_int(v)]
    if bad:
        raise ConfigError(f"{what} must be integers, got {bad[0]!r}")
    return [int(v) for v in values]


@dataclass(frozen=True)
class Pending:
    """A solved plan whose FastFlow learning (if any) is not committed yet; ``commit()`` once."""

    result: Any
    _update: Any = None

    def commit(self) -> None:
        if self._update is not None:
            self._update.commit()


@dataclass(frozen=True, eq=False)
class SamplePlan:
    """A checked sampling request on one model: everything ``solve`` needs, resolved.

    Build it with :func:`plan`. ``key`` hashes every field except :data:`KEY_EXCLUDED`.
    """

    model: Any = field(repr=False)
    model_id: str
    engine: str
    solver: str
    nfe: int
    grid: tuple[float, ...]
    grid_source: str
    first_call: str
    first_call_table: Any = field(repr=False)
    cfg_scale: float
    cfg_interval: tuple[float, float]
    rows: Mapping[str, np.ndarray] = field(repr=False)
    shared: Mapping[str, np.ndarray] = field(repr=False)
    null_cond: Optional[Mapping[str, np.ndarray]] = field(repr=False)
    bandit_state: Optional[str]
    calls: Optional[float]
    speedup: Optional[float]
    mu_factor: Optional[float]
    options: tuple = ()
    n: int = DEFAULT_N
    seed: int = 0
    noise: Optional[np.ndarray] = field(default=None, repr=False)
    quality: Optional[str] = None  # the recorded preset this plan came from (plan(..., quality=)), if any

    @property
    def key(self) -> str:
        """sha256 of every field but :data:`KEY_EXCLUDED`: plans with equal keys give the same numbers
        per row, so a service may merge their rows into one solve."""
        h = hashlib.sha256()
        for f in dataclasses.fields(self):
            if f.name not in KEY_EXCLUDED:
                h.update(f"{f.name}=".encode())
                _canon(getattr(self, f.name), h)
                h.update(b";")
        return h.hexdigest()

    @property
    def tuned_spec(self) -> Optional[str]:
        """``warp:S,P`` when the grid is the bundle's tuned one (grid=None and tuned), else None."""
        return self.grid_source.split()[1] if self.grid_source.startswith("tuned ") else None

    @property
    def cond(self) -> Optional[dict]:
        """Every condition (per-row and shared) as ``solve`` gets it, None for an unconditional model."""
        return {**self.rows, **self.shared} or None

    @property
    def labels(self) -> Optional[np.ndarray]:
        """The class labels (n,) int64, or None for a model without them."""
        return self.rows.get("y")

    @property
    def state_shape(self) -> tuple[int, ...]:
        """The state's shape: the given noise's (a pipeline's latents follow the image size), else the model's."""
        if self.noise is not None:
            return tuple(self.noise.shape[1:])
        return tuple(_info(self.model)[0]["state_shape"])

    def start_noise(self) -> np.ndarray:
        """The plan's start noise at t = 1: ``noise`` or ``default_rng(seed)`` normal (n, *state) float32."""
        if self.noise is not None:
            return self.noise
        return np.random.default_rng(self.seed).standard_normal((self.n, *self.state_shape)).astype(np.float32)

    def solve_kwargs(self) -> dict:
        """The keyword arguments this plan gives :func:`anchorflow.runtime.solve`."""
        return dict(cond=self.cond, null_cond=None if self.null_cond is None else dict(self.null_cond),
                    sidenet=self.model.sidenet, cfg_scale=self.cfg_scale, cfg_interval=self.cfg_interval,
                    grid=np.asarray(self.grid, np.float64),
                    first_call="backbone" if self.first_call_table is None else self.first_call_table,
                    **dict(self.options))

    def begin(self, noise: Optional[np.ndarray] = None) -> Pending:
        """Solve; a FastFlow state's learning waits for :meth:`Pending.commit` (all or nothing)."""
        from .solving.solve import solve

        x0 = self.start_noise() if noise is None else _check_noise(noise, self.n, self.state_shape, "noise")
        kwargs = self.solve_kwargs()
        if self.solver == "fastflow" and self.bandit_state is not None:
            from .fastflow.learning import solve_with_state

            extra = {k: v for k, v in (("calls", self.calls), ("speedup", self.speedup),
                                       ("mu_factor", self.mu_factor)) if v is not None}
            pending = solve_with_state(self.model.velocity, x0, self.nfe, self.bandit_state, self.model_id,
                                       **extra, **kwargs)
            return Pending(pending.result, pending)
        return Pending(solve(self.solver, self.model.velocity, x0, self.nfe, **kwargs))

    def run(self, noise: Optional[np.ndarray] = None):
        """Solve and commit any FastFlow learning; returns the :class:`~anchorflow.runtime.solving.result.Result`."""
        p = self.begin(noise)
        p.commit()
        return p.result


def _canon(value: Any, h) -> None:
    """Feed a canonical byte form of ``value`` to the hash ``h`` (arrays by dtype, shape and bytes)."""
    if value is None or isinstance(value, (bool, int, float, str, np.generic)):
        h.update(f"{type(value).__name__}:{value!r}".encode())
    elif isinstance(value, np.ndarray):
        a = np.ascontiguousarray(value)
        h.update(f"nd:{a.dtype.str}:{a.shape}:".encode())
        h.update(a.tobytes())
    elif isinstance(value, Mapping):
        h.update(b"{")
        for k in sorted(value):
            h.update(f"{k!r}:".encode())
            _canon(value[k], h)
            h.update(b",")
        h.update(b"}")
    elif isinstance(value, (tuple, list)):
        h.update(b"(")
        for v in value:
            _canon(v, h)
            h.update(b",")
        h.update(b")")
    elif dataclasses.is_dataclass(value):
        h.update(f"{type(value).__name__}".encode())
        _canon({f.name: getattr(value, f.name) for f in dataclasses.fields(value)}, h)
    else:  # an object option (e.g. a live FastFlowBandit): equal only to itself
        h.update(f"obj:{type(value).__name__}:{id(value)}".encode())


# -- resolving ----------------------------------------------------------------------------------------


def _info(bundle) -> tuple[dict, Any]:
    """(model meta with state_shape/num_classes/null_label/model_id, BundleFormat or None) of a
    LoadedBundle or an OpenModel."""
    from .bundles.format import read_bundle
    from .bundles.models import model_meta

    meta = bundle.meta
    fmt = getattr(bundle, "format", None)
    if "networks" in meta:  # a LoadedBundle's bundle.json
        meta = model_meta(meta)
    if fmt is None:
        files = getattr(bundle, "files", None)
        folder = getattr(files, "bundle", None)
        if folder is not None:
            fmt = read_bundle(folder)
    return meta, fmt


def _state_fits(shape: tuple, state_shape: tuple, fmt: Any) -> bool:
    if shape == state_shape:
        return True
    decl = None if fmt is None else fmt.backbone.input("state")
    if decl is None or not decl.per_row or len(decl.shape) != len(shape) + 1:
        return False
    for d, g in zip(decl.shape[1:], shape):
        rng = None if isinstance(d, int) else fmt.backbone.axis_range(d)
        if (isinstance(d, int) and d != g) or (rng is not None and not rng[0] <= g <= rng[2]) or \
                (not isinstance(d, int) and rng is None):
            return False
    return True


def _check_noise(noise: Any, n: Optional[int], state_shape: tuple, what: str, fmt: Any = None) -> np.ndarray:
    """The start noise, checked: float, finite, (n, *state). A state whose bundle declares named
    axes (a pipeline's latent height and width) may take any size in the declared ranges."""
    a = np.asarray(noise)
    if a.ndim < 1 or not _state_fits(tuple(a.shape[1:]), tuple(state_shape), fmt) \
            or not np.issubdtype(a.dtype, np.floating):
        raise ConfigError(f"{what} must be a float array (n, {', '.join(map(str, state_shape))}), "
                          f"got {a.dtype} {a.shape}")
    if n is not None and a.shape[0] != n:
        raise ConfigError(f"{what} has {a.shape[0]} rows but the plan has n = {n}")
    check_int(a.shape[0], f"the rows of {what}", 1, MAX_N)
    if not np.all(np.isfinite(a)):
        raise ConfigError(f"{what} holds NaN or Inf values")
    return a.astype(np.float32, copy=False)


def label_rows(values: Optional[list], n: int, num_classes: int, nm: Mapping[str, str]) -> Optional[np.ndarray]:
    """(n,) int64 labels: ``values`` cycled (default 0..C-1 cycled), each in [0, C); None without classes."""
    if num_classes <= 0:
        if values:
            raise ConfigError(f"this model has no class labels; drop {nm['labels']}")
        return None
    if values is None:
        values = list(range(num_classes))
    bad = [v for v in values if not 0 <= v < num_classes]
    if bad:
        raise ConfigError(f"{nm['labels']} must be integers in 0..{num_classes - 1}, got {bad[0]}")
    return np.resize(np.asarray(values, np.int64), n)


def _check_values(name: str, value: np.ndarray, dtype: str, num_classes: int, null_label: Optional[int],
                  is_label: bool, what: str, null: bool) -> None:
    """Type and range of one condition's values (shapes are :func:`check_conditions`')."""
    kind = value.dtype.kind
    if dtype.startswith(("int", "uint")):
        if kind not in "iu":
            raise ConfigError(f"{what}: {name} must hold integers ({dtype}), got {value.dtype}")
        if is_label and value.size:
            top = num_classes if null else num_classes - 1
            lo, hi = int(value.min()), int(value.max())
            if lo < 0 or hi > top:
                allowed = f"0..{top}" + (f" ({null_label} = the null label)" if null else "")
                raise ConfigError(f"{what}: {name} labels must be in {allowed}, got {lo if lo < 0 else hi}")
        elif value.size and np.iinfo(np.dtype(dtype)).max < int(value.max()):
            raise ConfigError(f"{what}: {name} holds {int(value.max())}, above {dtype}'s range")
    elif dtype.startswith(("float", "bfloat")):
        if kind not in "fiu" or kind == "b":
            raise ConfigError(f"{what}: {name} must hold numbers ({dtype}), got {value.dtype}")
        if not np.all(np.isfinite(value)):
            raise ConfigError(f"{what}: {name} holds NaN or Inf values")
    elif dtype == "bool" and kind != "b":
        raise ConfigError(f"{what}: {name} must be boolean, got {value.dtype}")


def _conditions(meta: dict, fmt, labels, cond, null_cond, n: int, guided: bool, nm: Mapping[str, str]):
    """(rows, shared, null_cond) checked against the bundle's declaration."""
    from .bundles.networks import check_conditions

    num_classes = int(meta.get("num_classes") or 0)
    null_label = meta.get("null_label")
    if fmt is None:  # the torch checkpoints: class labels only
        if cond or null_cond:
            raise ConfigError(f"{nm['cond']} / {nm['null_cond']} need an exported bundle (they are checked "
                              "against its declaration)")
        y = label_rows(labels, n, num_classes, nm)
        if guided and y is None:
            raise ConfigError(f"this model is unconditional: guidance ({nm['cfg_scale']} != 1) does not apply; use 1.0")
        rows = {} if y is None else {"y": y}
        null = {"y": np.asarray(int(null_label), np.int64)} if y is not None and null_label is not None else None
        return rows, {}, null
    decl, inline = fmt.backbone, dict(fmt.guidance.null)
    declared = {c.name: c for c in decl.conditions}
    for what, given in ((nm["cond"], cond), (nm["null_cond"], null_cond)):
        if given is not None and not isinstance(given, Mapping):
            raise ConfigError(f"{what} must be a dict of condition name -> array, got {type(given).__name__}")
    cond = {k: np.asarray(v) for k, v in (cond or {}).items()}
    if "y" in declared and "y" not in cond:
        y = label_rows(labels, n, num_classes, nm)
        if y is not None:
            cond["y"] = y
    elif labels is not None:
        if "y" in cond:
            raise ConfigError(f"give labels either as {nm['labels']} or as the condition y in {nm['cond']}, not both")
        raise ConfigError(f"this model has no class labels; drop {nm['labels']}; it expects: "
                          f"{', '.join(c.describe() for c in decl.conditions) or 'no conditions'}")
    if guided and not declared:
        raise ConfigError(f"this model is unconditional: guidance ({nm['cfg_scale']} != 1) does not apply; use 1.0")
    if guided and not cond:
        raise ConfigError(f"guidance ({nm['cfg_scale']} != 1) needs conditions: pass {nm['cond']}; the bundle "
                          f"expects: {', '.join(c.describe() for c in decl.conditions)}")

    def is_label(name: str) -> bool:
        return num_classes > 0 and name == "y"

    for name, value in cond.items():
        if name in declared:
            _check_values(name, value, declared[name].dtype, num_classes, null_label, is_label(name), nm["cond"], False)
    cond = check_conditions(decl, cond, n, inline, nm["cond"])
    null = None
    if guided or null_cond:
        null = {k: np.asarray(v) for k, v in inline.items() if k in cond}
        given = {k: np.asarray(v) for k, v in (null_cond or {}).items()}
        for name, value in given.items():
            if name in declared:
                _check_values(name, value, declared[name].dtype, num_classes, null_label, is_label(name),
                              nm["null_cond"], True)
        # null values may be given for some conditions only (the others: the bundle's, or refused below)
        null.update(check_conditions(decl, given, n, dict.fromkeys(declared), nm["null_cond"]))
        missing = sorted(set(cond) - set(null)) if guided else []
        if missing:
            raise ConfigError(f"guidance needs a null value for {', '.join(missing)} and this bundle has none; "
                              f"pass {nm['null_cond']}")
    rows, shared = {}, {}
    for name, value in cond.items():
        inp = declared[name]
        if inp.per_row:
            rows[name] = value if value.shape[0] == n else np.broadcast_to(value, (n, *value.shape[1:]))
        else:
            shared[name] = value
    return rows, shared, null


def _grid(tuning, spec, nfe: int, grid: Any, first_call: str):
    """(times, source, first-call table or None): the tuned grid rule shared by every front end."""
    from .solving.grids import make_grid
    from .bundles.tuned_grids import resolve_sampling

    chosen, fc, _ = resolve_sampling(tuning, spec.name, nfe, grid, first_call)
    table = None if isinstance(fc, str) else fc.check()
    steps = spec.steps_for_nfe(nfe, 0 if table is None else 1)
    times = make_grid(steps, chosen)
    tuned = None if grid is not None or tuning is None else tuning.grid_for(spec.name, nfe, first_call)
    if tuned is not None:
        source = f"tuned {tuned.spec} for {tuned.key}"
    else:
        source = "uniform" if grid is None else grid if isinstance(grid, str) else "explicit"
    return tuple(float(t) for t in times), source, table


NAMES = {"solver": "solver", "nfe": "nfe", "grid": "grid", "first_call": "first_call", "cfg_scale": "cfg_scale",
         "cfg_interval": "cfg_interval", "labels": "labels", "cond": "cond", "null_cond": "null_cond", "n": "n",
         "seed": "seed", "noise": "noise", "bandit_state": "bandit_state", "calls": "calls", "speedup": "speedup",
         "mu_factor": "mu_factor"}  # how a front end names each argument in its messages (the CLI: --cfg, ...)


def check_request(*, solver: str = "ba", nfe: int = 7, grid: Any = None, first_call: str = "backbone",
                  cfg_scale: float = 1.0, cfg_interval: Any = (0.0, 1.0), labels: Any = None, n: Optional[int] = None,
                  seed: int = 0, bandit_state: Optional[str] = None, calls: Optional[float] = None,
                  speedup: Optional[float] = None, mu_factor: Optional[float] = None,
                  names: Optional[Mapping[str, str]] = None) -> dict:
    """The checks that need no model (a front end runs them before loading one; :func:`plan` runs
    them again). Returns the normalised values by argument name."""
    from .solving.grids import make_grid
    from .solving.solvers import get_solver

    nm = {**NAMES, **(names or {})}
    if not isinstance(solver, str):
        raise ConfigError(f"{nm['solver']} must be a solver name, got {solver!r}")
    spec = get_solver(solver)  # unknown -> ConfigError listing the known ones
    nfe = check_int(nfe, nm["nfe"], 1, MAX_NFE)
    if isinstance(grid, str):
        make_grid(1, grid)  # a bad name fails here
    if first_call not in ("backbone", "cached"):
        raise ConfigError(f"{nm['first_call']} must be 'backbone' or 'cached', got {first_call!r}")
    out = dict(solver=spec.name, nfe=nfe, grid=grid, first_call=first_call,
               cfg_scale=check_cfg_scale(cfg_scale, nm["cfg_scale"]),
               cfg_interval=check_interval(cfg_interval, nm["cfg_interval"]),
               labels=parse_labels(labels, nm["labels"]), n=None if n is None else check_int(n, nm["n"], 1, MAX_N),
               seed=check_int(seed, nm["seed"], 0, MAX_SEED))
    out.update(zip(("bandit_state", "calls", "speedup", "mu_factor"),
                   _fastflow(spec.name, nfe, bandit_state, calls, speedup, mu_factor, nm)))
    return out


def plan(bundle, *, solver: str = "ba", nfe: int = 7, grid: Any = None, first_call: str = "backbone",
         cfg_scale: float = 1.0, cfg_interval: Any = (0.0, 1.0), labels: Any = None,
         cond: Optional[Mapping] = None, null_cond: Optional[Mapping] = None, n: Optional[int] = None,
         seed: int = 0, noise: Optional[np.ndarray] = None, bandit_state: Optional[str] = None,
         calls: Optional[float] = None, speedup: Optional[float] = None, mu_factor: Optional[float] = None,
         options: Optional[Mapping[str, Any]] = None, tuning: Any = USE_BUNDLE,
         names: Optional[Mapping[str, str]] = None, quality: Any = None) -> SamplePlan:
    """Check every argument against ``bundle`` and resolve it into a :class:`SamplePlan` (module doc).

    ``names``: how the caller names the arguments in messages (e.g. ``{"cfg_scale": "--cfg"}``).
    ``quality``: a preset recorded by ``anchorflow tune --target-psnr`` (its name, or a number of dB:
    the fastest preset whose bound meets it) instead of ``solver`` / ``nfe`` / ``grid`` / ``first_call``
    (giving both is refused); the plan's ``quality`` field names the preset.
    """
    from .solving.solvers import get_solver

    nm = {**NAMES, **(names or {})}
    preset_name = None
    if quality is not None:
        from .bundles.presets import resolve_quality

        given = [k for k, v, d in (("solver", solver, "ba"), ("nfe", nfe, 7), ("grid", grid, None),
                                   ("first_call", first_call, "backbone")) if (v is not None if d is None else v != d)]
        if given:
            raise ConfigError(f"quality {quality!r} sets the solver, nfe, grid and first call; do not also give "
                              f"{', '.join(nm.get(k, k) for k in given)}")
        if tuning is USE_BUNDLE:
            from .bundles.tuned_grids import read_tuning

            fmt0 = _info(bundle)[1]
            tuning = None if fmt0 is None else read_tuning(fmt0)
        p = resolve_quality(tuning, quality)
        solver, nfe, grid, first_call, preset_name = p.solver, p.nfe, np.asarray(p.times, np.float64), p.first_call, p.name
    a = check_request(solver=solver, nfe=nfe, grid=grid, first_call=first_call, cfg_scale=cfg_scale,
                      cfg_interval=cfg_interval, labels=labels, n=n, seed=seed, bandit_state=bandit_state,
                      calls=calls, speedup=speedup, mu_factor=mu_factor, names=nm)
    meta, fmt = _info(bundle)
    spec = get_solver(a["solver"])
    state_shape = tuple(int(s) for s in meta["state_shape"])
    n = a["n"]
    if noise is not None:
        noise = _check_noise(noise, n, state_shape, nm["noise"], fmt)
        n = noise.shape[0]
    if n is None:  # -- byo (#24): a request with conditions but no n samples their rows
        rows = _cond_rows(fmt, cond)
        n = DEFAULT_N if rows is None else check_int(rows, f"the rows of {nm['cond']}", 1, MAX_N)
    if spec.needs_sidenet and bundle.sidenet is None:
        raise ConfigError(f"solver {spec.name!r} needs a SideNet and this model has none; train one with "
                          "'anchorflow train sidenet' and export it (--sidenet)")
    if tuning is USE_BUNDLE:
        from .bundles.tuned_grids import read_tuning

        tuning = None if fmt is None else read_tuning(fmt)
    times, source, table = _grid(tuning, spec, a["nfe"], grid, a["first_call"])
    rows, shared, null = _conditions(meta, fmt, a["labels"], cond, null_cond, n, a["cfg_scale"] != 1.0, nm)
    if not isinstance(options or {}, Mapping):
        raise ConfigError(f"options must be a dict, got {type(options).__name__}")
    engine = f"{getattr(bundle, 'precision', 'fp32')}|{getattr(bundle, 'backend', '')}"
    return SamplePlan(bundle, str(meta.get("model_id")), engine, spec.name, a["nfe"], times, source, a["first_call"],
                      table, a["cfg_scale"], a["cfg_interval"], _frozen(rows), _frozen(shared),
                      None if null is None else _frozen(null), a["bandit_state"], a["calls"], a["speedup"],
                      a["mu_factor"], tuple(sorted((options or {}).items())), n, a["seed"], noise, preset_name)


# -- byo (#24): the default row count of a request with --cond and no --n / --samples
def bundle_format(bundle):
    """The validated bundle declaration (``BundleFormat``) of a LoadedBundle or an OpenModel; None for
    the torch-checkpoint fallback, which has no bundle."""
    return _info(bundle)[1]


def cond_rows(bundle, cond: Optional[Mapping]) -> Optional[int]:
    """The rows of ``cond``'s per-row conditions on ``bundle`` when they agree and exceed 1 (what
    ``sample``, ``tune`` and ``bench`` default their count to); None otherwise (one row is shared
    by every sample; rows that disagree are refused by the condition checks)."""
    return _cond_rows(bundle_format(bundle), cond)


def _cond_rows(fmt, cond: Optional[Mapping]) -> Optional[int]:
    if fmt is None or not isinstance(cond, Mapping) or not cond:
        return None
    per_row = {c.name for c in fmt.backbone.conditions if c.per_row}
    rows = {int(np.shape(v)[0]) for k, v in cond.items() if k in per_row and np.ndim(v) >= 1}
    return rows.pop() if len(rows) == 1 and min(rows) > 1 else None
# -- end byo


def _frozen(d: dict) -> Mapping[str, np.ndarray]:
    """The checked arrays in a read-only mapping (the arrays themselves stay writable views: the
    torch backend cannot take read-only ones; a plan's owner does not change them)."""
    from types import MappingProxyType

    return MappingProxyType({k: np.asarray(v) for k, v in d.items()})


def _fastflow(solver: str, nfe: int, bandit_state, calls, speedup, mu_factor, nm: Mapping[str, str]) -> tuple:
    """(bandit_state, calls, speedup, mu_factor), checked: FastFlow only, finite, > 0, one budget."""
    given = [nm[name] for name, v in (("bandit_state", bandit_state), ("calls", calls), ("speedup", speedup),
                                      ("mu_factor", mu_factor)) if v is not None]
    if given and solver != "fastflow":
        raise ConfigError(f"{', '.join(given)} only apply to {nm['solver']} fastflow")
    if calls is not None and speedup is not None:
        raise ConfigError(f"give the FastFlow budget as {nm['calls']} or as {nm['speedup']}, not both")
    calls = check_positive(calls, nm["calls"], optional=True)  # its range (3..T) and speedup's: the bandit's
    speedup = check_positive(speedup, nm["speedup"], optional=True)
    mu_factor = check_positive(mu_factor, nm["mu_factor"], MAX_MU_FACTOR, optional=True)
    if calls is not None or speedup is not None:
        from .fastflow.bandit import budget_target

        budget_target(nfe, calls, speedup)  # its own ranges: 3 <= calls <= T, T / speedup >= 3
    if bandit_state is not None:
        import os

        if not isinstance(bandit_state, (str, os.PathLike)):
            raise ConfigError(f"{nm['bandit_state']} must be a file path, got {bandit_state!r}")
        bandit_state = os.fspath(bandit_state)
    return bandit_state, calls, speedup, mu_factor

