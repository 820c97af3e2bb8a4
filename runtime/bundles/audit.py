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


from ...base.errors import AnchorflowError, CheckpointError
from .format import BundleFormat, NetworkDecl, compare_io  # noqa: F401 (compare_io: the audit's own)

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


def audit_tuning(fmt: BundleFormat) -> dict[str, str]:
    """Faults of the tuned grids and the first-call table (none when the bundle has no tuning)."""
    entry = fmt.meta.get("tuned")
    if entry is None:
        return {}
    problems: dict[str, str] = {}
    from .format import inside, verify_file
    from ..solving.first_call import load_means

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
    from .grid_check import check_grids_file
    from .tuned_grids import TUNE_SCHEMA, grid_key

    check_grids_file(path, TUNE_SCHEMA, grid_key)
