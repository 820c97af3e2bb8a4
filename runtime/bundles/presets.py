"""Quality presets: a named sampler configuration chosen by ``anchorflow tune --target-psnr``.

A preset is the cheapest configuration (solver, NFE, grid, first call) whose bootstrap lower
confidence bound on the mean PSNR against a named reference met a target on held-out noise; it is
stored in the bundle's tuned.json under ``"presets"`` (hashed in bundle.json with the grids, so a
changed file is refused and a re-export with other weights drops it like the grids), and
``sample --quality NAME`` / ``plan(..., quality=NAME)`` solve with it. The grid is stored as its
explicit times (t = 1 noise -> t = 0 data). Torch-free; every field is checked on read (a bundle
is data).
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from typing import Any, Mapping

import numpy as np

from ...base.errors import ConfigError, StateFileError

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
MAX_GRID_POINTS = 1002  # nfe <= 1000 (runtime.plan.MAX_NFE), + 1 point, + 1 for a cached first call


@dataclass(frozen=True)
class Preset:
    """One recorded quality preset (PSNR in dB against ``reference`` on the tuning's held-out batch)."""

    name: str
    solver: str
    nfe: int
    first_call: str
    grid_label: str  # how the grid was named in the search ("uniform", "shift:3", "tuned warp:S,P")
    times: tuple[float, ...]
    target_psnr: float
    reference: str  # "solver@nfe" (uniform grid, backbone first call)
    confidence: float  # level of the lower bound, e.g. 0.95
    lower_bound: float  # bootstrap lower confidence bound of the mean PSNR on the tuning batch
    mean_psnr: float
    quantile: float  # per-sample quantile level reported, e.g. 0.1
    quantile_psnr: float  # that quantile of the per-sample PSNRs
    latency_s: float  # median measured wall time of one solve of ``batch`` samples
    batch: int
    backend: str

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "times": list(self.times)}


_FIELDS = {"name": str, "solver": str, "nfe": int, "first_call": str, "grid_label": str, "times": list,
           "target_psnr": float, "reference": str, "confidence": float, "lower_bound": float, "mean_psnr": float,
           "quantile": float, "quantile_psnr": float, "latency_s": float, "batch": int, "backend": str}


def check_name(name: Any, what: str = "--name") -> str:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise ConfigError(f"{what} must be 1-64 letters, digits, '_', '.' or '-' (starting with a letter or digit), "
                          f"got {name!r}")
    return name


def _bad(where: str, what: str) -> StateFileError:
    return StateFileError(f"{where}: {what}; rerun 'anchorflow tune --target-psnr' on the bundle")


def _is(v: Any, kind: type) -> bool:
    if kind is float:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))
    if kind is int:
        return isinstance(v, int) and not isinstance(v, bool)
    return isinstance(v, kind)


def presets_from_json(data: Any, where: str) -> dict[str, Preset]:
    """The ``"presets"`` object of tuned.json, every field checked (one-line StateFileError)."""
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise _bad(where, "'presets' must be an object of name -> preset")
    out = {}
    for key, p in data.items():
        if not isinstance(p, Mapping) or set(p) != set(_FIELDS):
            raise _bad(where, f"preset {key!r} must have exactly the fields {', '.join(_FIELDS)}")
        for name, kind in _FIELDS.items():
            if not _is(p[name], kind):
                raise _bad(where, f"preset {key!r}: {name} must be a finite {kind.__name__}")
        if p["name"] != key or not NAME_RE.match(key):
            raise _bad(where, f"preset {key!r} does not match its name {p['name']!r}")
        if p["first_call"] not in ("backbone", "cached") or not 1 <= p["nfe"] <= 1000 or p["batch"] < 1:
            raise _bad(where, f"preset {key!r}: nfe, batch or first_call out of range")
        if not 0.5 <= p["confidence"] < 1 or not 0 < p["quantile"] < 1 or p["latency_s"] < 0:
            raise _bad(where, f"preset {key!r}: confidence, quantile or latency out of range")
        times = p["times"]
        if not 2 <= len(times) <= MAX_GRID_POINTS or not all(_is(t, float) for t in times):
            raise _bad(where, f"preset {key!r}: times must be a list of 2..{MAX_GRID_POINTS} finite numbers")
        t = np.asarray(times, np.float64)
        if t[0] != 1.0 or t[-1] != 0.0 or not np.all(np.diff(t) < 0):
            raise _bad(where, f"preset {key!r}: times must decrease strictly from 1 to 0")
        out[key] = Preset(**{**{k: p[k] for k in _FIELDS}, "times": tuple(float(v) for v in times),
                             **{k: float(p[k]) for k, kind in _FIELDS.items() if kind is float}})
    return out


def get_preset(tuning, name: str) -> Preset:
    """The preset ``name`` of a bundle's tuning; ConfigError naming the recorded ones otherwise."""
    presets = {} if tuning is None else getattr(tuning, "presets", {}) or {}
    if name not in presets:
        known = ", ".join(sorted(presets)) or "none recorded"
        raise ConfigError(f"quality {name!r} is not recorded in this bundle (presets: {known}); "
                          "record one with 'anchorflow tune BUNDLE --target-psnr Q --name NAME'")
    return presets[name]


def resolve_quality(tuning, quality: Any) -> Preset:
    """The preset a ``--quality`` asks for: a recorded name, or a number of dB (the fastest recorded
    preset whose lower bound meets it). One-line ConfigError naming what is recorded otherwise."""
    presets = {} if tuning is None else dict(getattr(tuning, "presets", {}) or {})
    text = str(quality).strip()
    try:
        want = float(text)
    except ValueError:
        return get_preset(tuning, text)
    if not math.isfinite(want):
        raise ConfigError(f"--quality must be a preset name or a finite number of dB, got {quality!r}")
    ok = [p for p in presets.values() if p.lower_bound >= want]
    if not ok:
        best = max(presets.values(), key=lambda p: p.lower_bound, default=None)
        have = ("no preset is recorded" if best is None else
                f"the best recorded is {best.name!r} with a {best.confidence:.0%} lower bound of {best.lower_bound:.2f} dB")
        raise ConfigError(f"--quality {text}: no recorded preset reaches {want:g} dB ({have}); record one with "
                          f"'anchorflow tune BUNDLE --target-psnr {want:g}'")
    return min(ok, key=lambda p: (p.latency_s, p.nfe, p.name))
