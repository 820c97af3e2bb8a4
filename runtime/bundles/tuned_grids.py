"""A bundle's tuned sampler settings: a time grid per (solver, budget, first call) and the t = 1 table.

``anchorflow tune`` finds them (:mod:`anchorflow.tuning`); they are stored in the bundle as two
files recorded in bundle.json like the networks (``{"file", "sha256", "bytes"}``, hash-checked on
read, kept inside the bundle folder)::

    "tuned": {"schema": "anchorflow.tuned/1", "grids": FILE (tuned.json), "first_call": FILE? (first_call.npy)}

``solve`` takes the grid and table explicitly; the CLI (sample, bench) and serve look them up here when
the caller gives no grid, and says so. Time convention: t = 1 noise, t = 0 data. Torch-free.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from ...base.errors import CheckpointError, ConfigError, StateFileError
from ..solving.first_call import FirstCallTable

TUNE_SCHEMA = "anchorflow.tuned/1"
FIRST_CALLS = ("backbone", "cached")
GRIDS_FILE, TABLE_FILE = "tuned.json", "first_call.npy"
LOCK_FILE = ".tune.lock"  # inside the bundle folder: tune's read-modify-write holds it
LOCK_TIMEOUT_S = 600.0
MAX_GRID_POINTS = 100_001  # a tuned grid has nfe + 1 (or + 2) points; nfe is capped at 1000


def grid_key(solver: str, nfe: int, first_call: str = "backbone") -> str:
    """``"ba@10"`` or ``"ba@10+cached"``: the key of a tuned grid."""
    return f"{solver}@{int(nfe)}" + ("" if first_call == "backbone" else f"+{first_call}")


@dataclass(frozen=True)
class TunedGrid:
    """The best ``warp:S,P`` grid found for one (solver, nfe, first_call), and its gain over uniform
    (PSNR in dB against the tuning reference on the held-out batch)."""

    solver: str
    nfe: int
    first_call: str
    shift: float
    power: float
    times: tuple[float, ...]
    psnr: float
    uniform_psnr: float
    evals: int

    @property
    def key(self) -> str:
        return grid_key(self.solver, self.nfe, self.first_call)

    @property
    def spec(self) -> str:
        return f"warp:{self.shift:.4g},{self.power:.4g}"


@dataclass
class Tuning:
    """Tuned grids by key, the first-call table (None when not measured or refused) and the settings."""

    grids: dict[str, TunedGrid] = field(default_factory=dict)
    first_call: Optional[FirstCallTable] = None
    first_call_refused: Optional[str] = None
    settings: dict[str, Any] = field(default_factory=dict)
    presets: dict[str, Any] = field(default_factory=dict)  # name -> runtime.presets.Preset

    def grid_for(self, solver: str, nfe: int, first_call: str = "backbone") -> Optional[TunedGrid]:
        """The tuned grid for this solver and budget, or None when it was not tuned."""
        return self.grids.get(grid_key(solver, nfe, first_call))

    def to_json(self) -> dict[str, Any]:
        """tuned.json (the first-call table's rows are in first_call.npy)."""
        fc = self.first_call
        return {"schema": TUNE_SCHEMA, "settings": self.settings,
                "first_call": None if fc is None else {"residual": fc.residual, "bound": fc.bound,
                                                       "samples": fc.samples, "rows": int(fc.means.shape[0])},
                "first_call_refused": self.first_call_refused,
                "grids": {k: {**asdict(g), "times": list(g.times)} for k, g in sorted(self.grids.items())},
                **({"presets": {k: p.to_json() for k, p in sorted(self.presets.items())}} if self.presets else {})}

    @classmethod
    def from_json(cls, data: Any, means: Optional[np.ndarray] = None, where: str = GRIDS_FILE) -> "Tuning":
        check_grids(data, where)
        try:
            grids = {k: TunedGrid(**{**g, "times": tuple(float(t) for t in g["times"])})
                     for k, g in data["grids"].items()}
            fc = data.get("first_call")
            table = None if fc is None or means is None else FirstCallTable(
                np.asarray(means, np.float32), float(fc["residual"]), int(fc["samples"]), float(fc["bound"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise StateFileError(f"{where} is malformed ({exc}); rerun 'anchorflow tune'") from None
        from .presets import presets_from_json

        return cls(grids, table, data.get("first_call_refused"), dict(data.get("settings") or {}),
                   presets_from_json(data.get("presets"), where))


_GRID_FIELDS = {"solver": str, "nfe": int, "first_call": str, "shift": float, "power": float, "times": list,
                "psnr": float, "uniform_psnr": float, "evals": int}


def _bad(where: str, what: str) -> StateFileError:
    return StateFileError(f"{where}: {what}; rerun 'anchorflow tune' on the bundle")


def check_grids(data: Any, where: str = GRIDS_FILE) -> None:
    """Validate a tuned.json document (one-line StateFileError): the schema; per grid its fields and
    types, its key, finite shift and power > 0, and times: a list of 2..MAX_GRID_POINTS finite
    numbers strictly decreasing from exactly 1 (noise) to exactly 0 (data)."""
    if not isinstance(data, dict) or data.get("schema") != TUNE_SCHEMA:
        raise _bad(where, f"not an {TUNE_SCHEMA} file")
    grids = data.get("grids")
    if not isinstance(grids, dict):
        raise _bad(where, "'grids' must be an object of key -> grid")
    for key, g in grids.items():
        if not isinstance(g, dict) or set(g) != set(_GRID_FIELDS):
            raise _bad(where, f"grid {key!r} must have exactly the fields {', '.join(_GRID_FIELDS)}")
        for name, kind in _GRID_FIELDS.items():
            v = g[name]
            ok = (isinstance(v, (int, float)) and not isinstance(v, bool) if kind is float else
                  isinstance(v, int) and not isinstance(v, bool) if kind is int else isinstance(v, kind))
            if not ok:
                raise _bad(where, f"grid {key!r}: {name} must be {kind.__name__}, got {type(v).__name__}")
        if g["first_call"] not in FIRST_CALLS or g["nfe"] < 1 or key != grid_key(g["solver"], g["nfe"], g["first_call"]):
            raise _bad(where, f"grid {key!r} does not match its solver, nfe and first call")
        for name in ("shift", "power"):
            if not (np.isfinite(g[name]) and g[name] > 0):
                raise _bad(where, f"grid {key!r}: {name} must be finite and > 0, got {g[name]!r}")
        times = g["times"]
        if not 2 <= len(times) <= MAX_GRID_POINTS or not all(
                isinstance(t, (int, float)) and not isinstance(t, bool) for t in times):
            raise _bad(where, f"grid {key!r}: times must be a list of 2..{MAX_GRID_POINTS} numbers")
        t = np.asarray(times, np.float64)
        if not np.all(np.isfinite(t)) or t[0] != 1.0 or t[-1] != 0.0 or not np.all(np.diff(t) < 0):
            raise _bad(where, f"grid {key!r}: times must be finite and strictly decreasing from 1 to 0")


def check_table(means: Any, fmt, where: str = TABLE_FILE) -> np.ndarray:
    """The first-call table's rows: float, finite, (C + 1, *state) (or (1, *state) unconditional)."""
    model = fmt.meta.get("model") or {}
    shape = tuple(int(v) for v in model.get("state_shape", ()))
    c = int(model.get("num_classes") or 0)
    a = np.asarray(means)
    if a.dtype.kind != "f" or tuple(a.shape) != (c + 1 if c else 1, *shape) or not np.all(np.isfinite(a)):
        raise _bad(where, f"the first-call table must be finite floats of shape {(c + 1 if c else 1, *shape)}, "
                          f"got {a.dtype} {a.shape}")
    return a


def check_tuning(bundle) -> Optional[Tuning]:
    """Everything about a bundle's tuning that can be checked (``inspect`` and ``verify`` call it): the
    files against bundle.json's sha256 and tuned.json's grids (CheckpointError), the first-call table
    (StateFileError); each one line. Returns the tuning, None when the bundle has none."""
    return read_tuning(bundle)


def read_tuning(bundle) -> Optional[Tuning]:
    """The tuning recorded in a bundle (a folder or a :class:`BundleFormat`), None when it has none.

    Both files are checked against bundle.json's sha256 (CheckpointError when modified). A file
    found half-way through a running ``tune``'s replacement is read again once that writer is done."""
    from .format import BundleFormat, read_bundle

    fmt = bundle if isinstance(bundle, BundleFormat) else read_bundle(bundle)
    try:
        return _read_tuning(fmt)
    except CheckpointError:
        # a concurrent tune may have renamed tuned.json in before bundle.json; wait
        # for its lock (held until its last rename), then read the state it left
        from ...base import _io
        from .format import BUNDLE_JSON

        with _io.file_lock(fmt.folder / BUNDLE_JSON, shared=True, wait_s=60.0):
            fresh = read_bundle(fmt.folder)
            if fresh.meta.get("tuned") == fmt.meta.get("tuned"):
                raise
            return _read_tuning(fresh)


def _read_tuning(fmt) -> Optional[Tuning]:
    from ...base._io import read_json
    from .format import inside, verify_file

    entry = fmt.meta.get("tuned")
    if entry is None:
        return None
    if not isinstance(entry, dict) or entry.get("schema") != TUNE_SCHEMA or not isinstance(entry.get("grids"), dict):
        raise CheckpointError(f"{fmt.folder}/bundle.json: 'tuned' must be {{'schema': {TUNE_SCHEMA!r}, 'grids': "
                              "{file, sha256}, ...}; rerun 'anchorflow tune'")
    files = {}
    for key in ("grids", "first_call"):
        rec = entry.get(key)
        if rec is not None:
            path = inside(fmt.folder, str(rec.get("file")), f"the tuned {key} file")
            files[key] = verify_file(path, str(rec.get("sha256")))
    # both files parsed defensively, one line naming the file and the fault
    from ..solving.first_call import load_means
    from .grid_check import check_grids_file

    check_grids_file(files["grids"], TUNE_SCHEMA, grid_key)
    means = (load_means(files["first_call"], fmt.state_shape, fmt.model.get("num_classes"))
             if "first_call" in files else None)
    return Tuning.from_json(read_json(files["grids"]), means, str(files["grids"]))


# -- tune never loses grids ---------------------------------------------------------
# write_tuning reads the bundle's current tuning and writes the merge under bundle.json's lock (so
# concurrent tunes each add their grids), and replaces tuned.json, first_call.npy and bundle.json as
# one journaled change (anchorflow.base._io.replace_files): a kill at any step leaves the old state or
# the new one, repaired on the next open (runtime.bundle_format.find_bundle).


def merge_tuning(old: Optional[Tuning], new: Tuning) -> tuple[Tuning, list[str]]:
    """``new``'s grids added to ``old``'s (a key tuned again is replaced); the first-call table is
    the new one when measured, else the old one. Old ``+cached`` grids are kept only with the table
    they were tuned against (dropped, and said so, when a different table replaces it). Returns the
    merge and notes on what was kept or dropped."""
    if old is None:
        return new, []
    notes: list[str] = []
    table = new.first_call if new.first_call is not None else old.first_call
    same_table = (new.first_call is None or old.first_call is None
                  or np.array_equal(np.asarray(new.first_call.means), np.asarray(old.first_call.means)))
    kept = {}
    for key, g in old.grids.items():
        if key in new.grids:
            continue
        if g.first_call != "backbone" and not same_table:
            notes.append(f"dropped the tuned grid {key}: it was tuned for the previous first-call table")
            continue
        kept[key] = g
    if kept:
        notes.append(f"kept {len(kept)} earlier tuned grid(s) not tuned this time ({', '.join(sorted(kept)[:6])}"
                     + (", ..." if len(kept) > 6 else "") + ")")
    refused = None if table is not None else (new.first_call_refused or old.first_call_refused)
    return Tuning({**kept, **new.grids}, table, refused, dict(new.settings), {**old.presets, **new.presets}), notes


def write_tuning(bundle_dir: str | Path, tuning: Tuning, merge: bool = True,
                 notes: Optional[list] = None) -> Path:
    """Store ``tuning`` in the bundle (tuned.json, first_call.npy when measured, bundle.json's entry),
    merged into the grids already there (``merge``); what the merge kept or dropped is appended to
    ``notes``. Returns the bundle folder."""
    import io
    import json

    from ...base import _io
    from ...base.errors import warn
    from .format import BUNDLE_JSON, JOURNALED, SCHEMA, check_written_graphs, parse_meta, read_bundle

    folder = read_bundle(bundle_dir).folder
    with _io.file_lock(folder / BUNDLE_JSON):
        _io.recover_files(folder, JOURNALED, BUNDLE_JSON)
        fmt = read_bundle(folder)  # the state as it is now, under the lock: read-modify-write
        old = None
        if merge and fmt.meta.get("tuned") is not None:
            try:
                old = _read_tuning(fmt)
            except CheckpointError as exc:
                warn(f"the bundle's earlier tuning is unreadable and is replaced ({exc})")
        tuning, merged = merge_tuning(old, tuning)
        if notes is not None:
            notes += merged
        files: dict[str, bytes] = {GRIDS_FILE: (json.dumps(tuning.to_json(), indent=2) + "\n").encode()}
        if tuning.first_call is not None:
            buf = io.BytesIO()
            np.save(buf, np.asarray(tuning.first_call.means, np.float32))
            files[TABLE_FILE] = buf.getvalue()

        def record(name: str) -> dict[str, Any]:
            import hashlib

            return {"file": name, "sha256": hashlib.sha256(files[name]).hexdigest(), "bytes": len(files[name])}

        entry: dict[str, Any] = {"schema": TUNE_SCHEMA, "grids": record(GRIDS_FILE)}
        if TABLE_FILE in files:
            entry["first_call"] = record(TABLE_FILE)
        meta = {**fmt.meta, "tuned": entry}
        parsed = parse_meta(meta, folder, "the tuned bundle.json")
        if fmt.schema == SCHEMA:
            check_written_graphs(parsed)
        files[BUNDLE_JSON] = (json.dumps(meta, indent=2, sort_keys=False) + "\n").encode()
        _io.replace_files(folder, files, BUNDLE_JSON)
    return folder


def carried_tuning(candidates: Sequence[str | Path], weights: dict[str, Optional[str]]
                   ) -> tuple[Optional[Tuning], Optional[str]]:
    """The tuning a re-export keeps: that of the first candidate bundle holding one, when its networks
    were exported from the same weights (``weights``: network name -> checkpoint weights sha256, as
    each network's ``checkpoint.weights_sha256`` in bundle.json). Returns (tuning or None, a note
    saying what was kept or dropped and why, or None when no candidate had a tuning)."""
    from .format import BUNDLE_JSON, read_bundle

    for folder in candidates:
        if not (Path(folder) / BUNDLE_JSON).is_file():
            continue
        try:
            fmt = read_bundle(folder)
            if fmt.meta.get("tuned") is None:
                continue
            old = {name: (entry.get("checkpoint") or {}).get("weights_sha256")
                   for name, entry in (fmt.meta.get("networks") or {}).items()}
            if old != weights or None in weights.values():
                return None, (f"tuned grids of {fmt.folder} not kept: they were tuned for other weights "
                              f"({', '.join(sorted(old))}); run 'anchorflow tune' on the new bundle")
            tuning = read_tuning(fmt)
        except (CheckpointError, StateFileError) as exc:
            return None, f"tuned grids of {folder} not kept ({exc}); run 'anchorflow tune' on the new bundle"
        return tuning, f"kept the tuned grids of {fmt.folder} (same weights: {', '.join(sorted(weights))})"
    return None, None


def resolve_sampling(tuning: Optional[Tuning], method: str, nfe: int, grid: Any, first_call: str = "backbone"):
    """The grid and first call ``sample`` and ``serve`` both solve with (one rule for both).

    ``grid`` None: the tuned grid for (method, nfe, first_call) when ``tuning`` has one, else
    uniform. ``first_call="cached"`` needs the tuning's first-call table. Returns
    (grid, first_call for solve, a note saying what was chosen, or None).
    """
    if first_call not in FIRST_CALLS:
        raise ConfigError(f"first call must be one of {', '.join(FIRST_CALLS)}, got {first_call!r}")
    fc: Any = "backbone"
    if first_call == "cached":
        if tuning is not None and tuning.first_call is None and tuning.first_call_refused:  # byo (#24)
            raise ConfigError(f"--first-call cached: 'anchorflow tune' refused this bundle's first-call table "
                              f"({tuning.first_call_refused})")
        if tuning is None or tuning.first_call is None:
            raise ConfigError("--first-call cached needs the bundle's first-call table; run 'anchorflow tune' on it")
        fc = tuning.first_call
    if grid is not None:
        return grid, fc, None
    tuned = None if tuning is None else tuning.grid_for(method, nfe, first_call)
    if tuned is None:
        return "uniform", fc, None
    return np.asarray(tuned.times), fc, f"grid: tuned {tuned.spec} for {tuned.key} (from the bundle; --grid overrides)"
