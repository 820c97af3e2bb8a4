"""The checks of a tuned.json read from disk: a leaf module, so runtime.tuned and
runtime.audit can both use it without importing each other."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np

from ...base.errors import CheckpointError


def check_grids_file(path: Path, TUNE_SCHEMA: str, grid_key: Callable) -> None:
    """tuned.json: every grid finite, strictly decreasing from 1 to 0, with its key and budget
    (``TUNE_SCHEMA`` and ``grid_key`` come from runtime.tuned, which imports this module)."""
    from ...base._io import read_json

    data = read_json(path)
    grids = data.get("grids") if isinstance(data, dict) else None
    if not isinstance(data, dict) or data.get("schema") != TUNE_SCHEMA or not isinstance(grids, dict):
        raise CheckpointError(f"{path} is not an {TUNE_SCHEMA} file with a 'grids' object; rerun 'anchorflow tune'")
    for key, g in grids.items():
        why = _grid_fault(key, g, grid_key)
        if why:
            raise CheckpointError(f"{path}: grid {str(key)[:40]!r} {why}; rerun 'anchorflow tune'")


def _grid_fault(key: Any, g: Any, grid_key) -> str:
    if not isinstance(g, dict):
        return "is not an object"
    times, nfe = g.get("times"), g.get("nfe")
    if not isinstance(times, list) or len(times) < 2 or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in times):
        return "has no list of times"
    t = np.asarray(times, np.float64)
    if not np.all(np.isfinite(t)):
        return "holds NaN or Inf"
    if t[0] != 1.0 or t[-1] != 0.0 or not np.all(np.diff(t) < 0):
        return "is not strictly decreasing from t = 1 (noise) to t = 0 (data)"
    if isinstance(nfe, bool) or not isinstance(nfe, int) or nfe < 1 or not isinstance(g.get("solver"), str):
        return "has no solver name and positive integer nfe"
    if key != grid_key(g["solver"], nfe, str(g.get("first_call", "backbone"))):
        return f"is stored under the key of another grid (its solver and nfe make {grid_key(g['solver'], nfe)!r})"
    for k in ("shift", "power", "psnr", "uniform_psnr"):
        v = g.get(k)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not np.isfinite(v):
            return f"has a {k} that is not a finite number"
    return ""
