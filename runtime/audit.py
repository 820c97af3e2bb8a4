"""Check everything a bundle holds against what bundle.json says about it (torch-free, no sessions).

:func:`audit` returns one line per fault, keyed by the file's role (``backbone/fp32``, ``tuned
grids``, ``first-call table``); empty when the bundle is whole. Per ONNX file: inside the bundle
and matching its sha256, external data inside the bundle and recorded, graph inputs and outputs
against the declaration (names, dtypes, ranks, static sizes: a graph swapped between networks or
a hand-edited declaration shows here), and cheap statistics over the inline weights (any NaN /
Inf, or weights that are (almost) all zero): a re-export of broken weights has a valid sha256, so
the hash alone cannot catch it. The tuned grids must be finite, strictly decreasing from t = 1
(noise) to t = 0 (data); the first-call table a float (C + 1, *state) array. ``inspect`` and
``verify`` both report these.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..errors import AnchorflowError, CheckpointError
from .bundle_format import BundleFormat, NetworkDecl, _ORT_TYPES

ZERO_FRACTION = 0.9  # trained (or randomly initialised) weights are never 90 % exact zeros


def audit(fmt: BundleFormat) -> dict[str, str]:
    """role -> what is wrong with it (see the module docstring); {} when everything matches."""
    problems: dict[str, str] = {}
    for name, decl in fmt.networks.items():
        for precision in ["fp32", *sorted(decl.variants)]:
            try:
                check_graph(decl, fmt.network_file(name, precision))
            except AnchorflowError as exc:
                problems[f"{name}/{precision}"] = str(exc)
    problems.update(audit_tuning(fmt))
    return problems


def check_graph(decl: NetworkDecl, path: Path) -> None:
    """The ONNX file's inputs/outputs against ``decl`` and its weights' statistics; CheckpointError."""
    from .onnx_scan import ScanError, scan

    try:
        s = scan(path)
    except (ScanError, OSError) as exc:
        raise CheckpointError(f"{path} is not a well-formed ONNX file ({exc}); re-export the bundle") from None
    for part, declared, got in (("inputs", decl.inputs, s.inputs), ("outputs", decl.outputs, s.outputs)):
        compare_io(decl.name, part, declared, got, path)
    if s.nonfinite:
        raise CheckpointError(f"{path}: the weights {', '.join(s.nonfinite[:3])} hold NaN or Inf (the sha256 matches: "
                              "they were exported so); re-export from good weights")
    if s.weights and s.zeros >= ZERO_FRACTION * s.weights:
        raise CheckpointError(f"{path}: {100 * s.zeros / s.weights:.0f}% of its {s.weights} weights are exactly zero "
                              "(the sha256 matches: they were exported so); re-export from trained weights")


FIX = "re-export the bundle (or undo the edit to bundle.json)"


def compare_io(network: str, part: str, declared: tuple, got: list, path: Any, fix: str = FIX) -> None:
    want = {t.name: t for t in declared}
    have = {name: (_ORT_TYPES.get(dtype, dtype), list(dims)) for name, dtype, dims in got}
    if set(have) != set(want):
        raise CheckpointError(f"{path} has {part} {sorted(have)}, but bundle.json declares {sorted(want)} for the "
                              f"{network} (a graph of another network, or an edited bundle.json); {fix}")
    for name, (dtype, dims) in have.items():
        t = want[name]
        static_differs = any(isinstance(w, int) and isinstance(g, int) and w != g for w, g in zip(t.shape, dims))
        if dtype != t.dtype or len(dims) != len(t.shape) or static_differs:
            raise CheckpointError(f"{path}: {part[:-1]} {name!r} is {dtype} {dims}, but bundle.json declares "
                                  f"{t.dtype} {list(t.shape)}; {fix}")


def audit_tuning(fmt: BundleFormat) -> dict[str, str]:
    """Faults of the tuned grids and the first-call table (none when the bundle has no tuning)."""
    entry = fmt.meta.get("tuned")
    if entry is None:
        return {}
    problems: dict[str, str] = {}
    from .bundle_format import inside, verify_file
    from .first_call import load_means

    if not isinstance(entry, dict):
        return {"tuned": f"{fmt.folder}/bundle.json: 'tuned' is not an object; rerun 'anchorflow tune'"}
    rec = entry.get("first_call")
    if rec is not None:
        try:
            path = verify_file(inside(fmt.folder, str(_get(rec, "file")), "the first-call table"), str(_get(rec, "sha256")))
            load_means(path, fmt.state_shape, fmt.model.get("num_classes"))
        except AnchorflowError as exc:
            problems["first-call table"] = str(exc)
    try:
        rec = entry.get("grids")
        path = verify_file(inside(fmt.folder, str(_get(rec, "file")), "the tuned grids"), str(_get(rec, "sha256")))
        check_grids(path)
    except AnchorflowError as exc:
        problems["tuned grids"] = str(exc)
    return problems


def _get(rec: Any, key: str) -> Any:
    return rec.get(key) if isinstance(rec, dict) else None


def check_grids(path: Path) -> None:
    """tuned.json: every grid finite, strictly decreasing from 1 to 0, with its key and budget."""
    from .._io import read_json
    from .tuned import TUNE_SCHEMA, grid_key

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
