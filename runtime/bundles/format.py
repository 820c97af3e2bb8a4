"""The bundle format: the one module that reads, validates and hashes ``bundle.json`` (torch-free).

Runtime, exporter and engines all go through :func:`read_bundle` (and the exporter writes through
:func:`write_bundle_json`), so a hand-edited or foreign file is refused in one place, with one
message per fault, before onnxruntime or TensorRT see it.

Schema ``anchorflow.bundle/2`` (``/1``, written by anchorflow 0.1, is still read)::

    {"schema": "anchorflow.bundle/2",
     "model": {"name", "state_shape": [C, H, W], "data_range", "num_classes"?, "null_label"?},
     "time": {"map": "identity" | "scale" | "flip", "scale": 1000.0},      # applied inside the graph
     "guidance": {"mode": "rows" | "embedded" | "none", "input": "guidance"?, "null": {"y": 10}},
     "networks": {"backbone": NETWORK, "sidenet": NETWORK?}, "precisions", "export", "versions"}

    NETWORK = {"file": "backbone.onnx", "sha256", "bytes",
               "inputs": [{"name", "dtype", "shape": ["batch", 16, "H", "W"], "role", "per_row"}],
               "outputs": [...], "batch": {"min", "opt", "max"},             # rows per call
               "axes": {"H": {"min", "opt", "max"}, "L": {...}},             # other named dynamic axes
               "external_data": [{"file", "sha256", "bytes"}]?,              # weights > 2 GB
               "precisions": {"fp16": {"file", "sha256", "bytes", "external_data"?}}}

Input roles: ``state`` (x), ``time`` (t, OUR convention: t = 1 noise, t = 0 data; the graph
applies the declared time map itself), ``velocity`` (v) and ``offset`` (h) for the SideNet, and
``condition`` for everything else (class labels ``y`` int64 (batch,), text embeddings, pooled
projections, FLUX's ``guidance``...). ``per_row``: the input's first axis is the ``batch`` axis.

For the TensorRT helper (engines/): :attr:`NetworkDecl.inputs` gives every input's dtype and
shape with named axes, :meth:`NetworkDecl.axis_range` the (min, opt, max) of any named axis
(``batch`` included), :attr:`NetworkDecl.batch` the row range; a /1 bundle reads as /2 with roles
inferred and no axes besides ``batch``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from ...base._io import read_json, sha256_file
from ...base.errors import CheckpointError, ConfigError
from .schema import DTYPES, ROLES, validate_meta  # noqa: F401  (part of the format's API)

SCHEMA = "anchorflow.bundle/2"
SCHEMA_V1 = "anchorflow.bundle/1"
READABLE = (SCHEMA_V1, SCHEMA)
BUNDLE_JSON = "bundle.json"
BATCH = "batch"
PRECISIONS = ("fp32", "fp16", "bf16", "int8", "fp8")  # quant: int8 / fp8 = Q/DQ backbone variants (export/quantize.py)
TIME_CONVENTION = (
    "t = 1 is noise, t = 0 is data; x_t = (1 - t) x_data + t noise; v = dx/dt ~ noise - x_data; "
    "sampling integrates from t = 1 down to t = 0. SideNet: v_hat(t - h) = v + delta, h > 0 toward data."
)
_V1_ROLES = {"x": "state", "t": "time", "v": "velocity", "h": "offset"}


@dataclass(frozen=True)
class TensorDecl:
    """One declared graph input or output. ``shape`` mixes ints and axis names (``"batch"``, ``"L"``)."""

    name: str
    dtype: str
    shape: tuple
    role: str = "condition"
    per_row: bool = True

    def describe(self) -> str:
        return f"{self.name} {self.dtype} ({', '.join(map(str, self.shape))})"


@dataclass(frozen=True)
class NetworkDecl:
    """One network of a bundle as bundle.json declares it."""

    name: str
    file: str
    sha256: str
    inputs: tuple[TensorDecl, ...]
    outputs: tuple[TensorDecl, ...]
    batch: Optional[tuple[int, int, int]]
    axes: dict = field(default_factory=dict)  # axis name -> (min, opt, max), ``batch`` excluded
    variants: dict = field(default_factory=dict)  # precision -> {"file", "sha256", ...}
    external_data: tuple = ()

    @property
    def conditions(self) -> tuple[TensorDecl, ...]:
        return tuple(i for i in self.inputs if i.role == "condition")

    def input(self, role: str) -> Optional[TensorDecl]:
        return next((i for i in self.inputs if i.role == role), None)

    def axis_range(self, axis: str) -> Optional[tuple[int, int, int]]:
        """(min, opt, max) of a named axis (``batch``: rows per call); None when not declared."""
        return self.batch if axis == BATCH else self.axes.get(axis)

    def entry(self, precision: str) -> dict:
        """``{"file", "sha256", "external_data"?}`` of the fp32 file or a precision variant."""
        if precision not in PRECISIONS:
            raise ConfigError(f"unknown precision {precision!r}; choose from {', '.join(PRECISIONS)}")
        if precision == "fp32":
            return {"file": self.file, "sha256": self.sha256, "external_data": list(self.external_data)}
        if precision not in self.variants:
            have = ", ".join(["fp32", *sorted(self.variants)])
            raise ConfigError(f"the bundle has no {precision} variant of the {self.name} (it has: {have}); "
                              f"re-export with 'anchorflow export MODEL --precision {precision}'")
        return self.variants[precision]

    def check_rows(self, rows: int) -> None:
        """Refuse a call with more (or fewer) rows than the network was exported for (the runtime's
        wrappers chunk larger calls before they get here)."""
        if self.batch is not None and not self.batch[0] <= rows <= self.batch[2]:
            lo, _, hi = self.batch  # the format knows no solvers: the note says why rows exceed samples
            raise ConfigError(f"the {self.name} was exported for {lo}..{hi} rows per call, got {rows} "
                              "(guidance doubles the rows, a SideNet call carries several offsets per row); "
                              "use a smaller --n or re-export with a larger --max-batch")


@dataclass(frozen=True)
class Guidance:
    """How the model is guided: ``rows`` (CFG on [cond; null] rows), ``embedded`` (a scalar input
    such as FLUX-dev's ``guidance``) or ``none``. ``null``: condition name -> inline null value."""

    mode: str = "none"
    input: Optional[str] = None
    null: dict = field(default_factory=dict)


@dataclass(frozen=True)
class TimeMap:
    """``model_time = scale * t`` (``scale``), ``t`` (``identity``) or ``1 - t`` (``flip``); in the graph."""

    map: str = "identity"
    scale: float = 1.0


@dataclass(frozen=True)
class BundleFormat:
    """A validated bundle.json: the raw dict plus typed declarations."""

    folder: Path
    meta: dict
    schema: str
    networks: dict  # name -> NetworkDecl
    guidance: Guidance
    time: TimeMap

    @property
    def model(self) -> dict:
        return dict(self.meta.get("model") or {})

    @property
    def backbone(self) -> NetworkDecl:
        return self.networks["backbone"]

    @property
    def state_shape(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.model.get("state_shape", ()))

    def network_file(self, network: str, precision: str = "fp32", verify: bool = True) -> Path:
        """Path of ``network``'s ONNX file in ``precision``, inside the bundle and hash-checked."""
        decl = self.networks.get(network)
        if decl is None:
            raise CheckpointError(f"the bundle in {self.folder} has no {network}")
        entry = decl.entry(precision)
        path = inside(self.folder, entry["file"], f"the {network} {precision} file")
        declared = set()
        for extra in entry.get("external_data") or ():
            declared.add(verify_file(inside(self.folder, extra["file"], f"the {network} weights"), extra["sha256"],
                                     verify))
        verify_file(path, entry["sha256"], verify)
        check_external_data(path, self.folder, declared)
        return path


def check_external_data(path: Path, folder: Path, declared: set) -> None:
    """Refuse an ONNX file whose external-data locations leave the bundle folder (``..``, absolute,
    a symlink out) or name a file bundle.json does not record (and hash); onnxruntime would read them."""
    from .onnx_scan import ScanError, outside, resolve_location, scan

    try:
        locations = scan(path, stats=False).locations
    except (ScanError, OSError) as exc:
        raise CheckpointError(f"{path} is not a well-formed ONNX file ({exc}); re-export the bundle") from None
    bad = outside(folder, locations, path.parent)
    if bad:
        raise CheckpointError(f"{path} reads external data from {bad[0][:200]!r}, outside the bundle folder "
                              f"{Path(folder).resolve()}; refused (a bundle's files must sit inside it)")
    unknown = sorted({loc for loc in locations if resolve_location(path.parent, loc) not in declared})
    if unknown:
        raise CheckpointError(f"{path} reads external data from {unknown[0][:200]!r}, which bundle.json does not "
                              "record (no sha256 to check it against); re-export the bundle")


# files that `tune` replaces together (anchorflow.base._io.replace_files), bundle.json last
JOURNALED = ("tuned.json", "first_call.npy", BUNDLE_JSON)


def find_bundle(path: str | os.PathLike) -> Path:
    """The bundle folder for ``path``: the folder itself or a model root's ``bundle/``."""
    from ...base._io import recover_dir, recover_journal

    path = Path(path).expanduser()
    for folder in (path, path / "bundle"):
        if recover_dir(folder):  # undo a replacement that a crash interrupted (see anchorflow.base._io.atomic_dir)
            raise CheckpointError(f"{folder} is being replaced by a running export right now; retry when it has "
                                  "finished")
        if (folder / BUNDLE_JSON).is_file():
            recover_journal(folder, JOURNALED, BUNDLE_JSON)  # a tune killed mid-write
            return folder
    raise CheckpointError(f"{path} is not a bundle (no {BUNDLE_JSON}, nor bundle/{BUNDLE_JSON}); "
                          "create one with 'anchorflow export MODEL --out FOLDER'")


def read_bundle(path: str | os.PathLike) -> BundleFormat:
    """Find, read and validate a bundle (folder or model root); raises CheckpointError on any fault."""
    folder = find_bundle(path)
    where = folder / BUNDLE_JSON
    meta = read_json(where)
    return parse_meta(meta, folder, where)


def parse_meta(meta: Any, folder: Path, where: Any = BUNDLE_JSON) -> BundleFormat:
    """Validate a bundle.json dict (either schema) and build its declarations."""
    schema = meta.get("schema") if isinstance(meta, dict) else None
    if schema not in READABLE:
        raise CheckpointError(f"{where} has schema {schema!r}, but this anchorflow reads {' or '.join(READABLE)}; "
                              "re-export it with 'anchorflow export' (or use the anchorflow version that wrote it)")
    validate_meta(meta, schema == SCHEMA_V1, where)
    networks = {name: _network(name, entry, schema) for name, entry in meta["networks"].items() if entry is not None}
    model = meta["model"]
    if schema == SCHEMA_V1:
        null = model.get("null_label")
        guidance = Guidance("rows", None, {"y": int(null)}) if null is not None else Guidance()
        time = TimeMap()
    else:
        g, tm = meta.get("guidance") or {}, meta.get("time") or {}
        guidance = Guidance(g.get("mode", "none"), g.get("input"), dict(g.get("null") or {}))
        time = TimeMap(tm.get("map", "identity"), float(tm.get("scale", 1.0)))
    state = networks["backbone"].input("state")
    if state is not None and _static(state.shape[1:]) and list(state.shape[1:]) != list(model["state_shape"]):
        raise CheckpointError(f"{where}: model.state_shape {model['state_shape']} differs from the backbone's "
                              f"x input {list(state.shape)}; re-export the bundle (or undo the edit)")
    return BundleFormat(Path(folder), meta, schema, networks, guidance, time)


def _static(dims: Any) -> bool:
    return all(isinstance(d, int) for d in dims)


def _tensor(e: dict, schema: str) -> TensorDecl:
    shape = tuple(e["shape"])
    per_row = bool(e.get("per_row", bool(shape) and shape[0] == BATCH))
    role = e.get("role") or (_V1_ROLES.get(e["name"], "condition") if schema == SCHEMA_V1 else "condition")
    return TensorDecl(e["name"], e.get("dtype", "float32"), shape, role, per_row)


def _triple(r: Optional[dict]) -> Optional[tuple[int, int, int]]:
    return None if r is None else (int(r["min"]), int(r["opt"]), int(r["max"]))


def _network(name: str, e: dict, schema: str) -> NetworkDecl:
    return NetworkDecl(
        name=name, file=e["file"], sha256=e["sha256"],
        inputs=tuple(_tensor(i, schema) for i in e["inputs"]), outputs=tuple(_tensor(o, schema) for o in e["outputs"]),
        batch=_triple(e.get("batch")), axes={k: _triple(v) for k, v in (e.get("axes") or {}).items()},
        variants=dict(e.get("precisions") or {}), external_data=tuple(e.get("external_data") or ()),
    )


# -- files and hashes --------------------------------------------------------------------------
def inside(folder: Path, file: str, what: str) -> Path:
    """``folder / file``, refused when it would leave the bundle folder (``../../etc/passwd``)."""
    root = Path(folder).resolve()
    try:
        path = (root / file).resolve()
    except (OSError, ValueError):  # a NUL byte, a name too long, a symlink loop
        path = root
    if Path(file).is_absolute() or root not in path.parents:
        raise CheckpointError(f"bundle.json names {what} as {file!r}, which lies outside the bundle folder {root}; "
                              "a bundle's files must sit inside it (re-export the bundle)")
    return path


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 hex digest of a file (the one hash every bundle and engine record uses)."""
    return sha256_file(path)


def verify_file(path: Path, sha256: str, verify: bool = True) -> Path:
    """``path``, checked to exist and (``verify``) to match ``sha256``; CheckpointError otherwise."""
    if not path.is_file():
        raise CheckpointError(f"{path} is missing from the bundle; re-export it")
    if verify and file_sha256(path) != sha256:
        raise CheckpointError(f"{path} does not match the sha256 recorded in bundle.json (modified or corrupt); "
                              "re-export the bundle")
    return path


def file_record(folder: Path, file: str) -> dict[str, Any]:
    """``{"file", "sha256", "bytes"}`` for a file just written into a bundle folder."""
    path = Path(folder) / file
    return {"file": file, "sha256": file_sha256(path), "bytes": path.stat().st_size}


def write_bundle_json(folder: Path, meta: dict) -> BundleFormat:
    """Validate ``meta`` (schema /2) and write it as ``folder/bundle.json`` atomically."""
    from ...base._io import write_json

    if meta.get("schema") != SCHEMA:
        raise ValueError(f"internal error: new bundles are written as {SCHEMA}")
    parsed = parse_meta(meta, folder, "the new bundle.json")
    check_written_graphs(parsed)
    write_json(Path(folder) / BUNDLE_JSON, meta)
    return parsed


def check_written_graphs(fmt: BundleFormat) -> None:
    """Refuse to publish a bundle whose graphs do not compute what it declares: each graph's inputs
    and outputs against the declaration, and the backbone's velocity of the state's shape."""
    from .onnx_scan import ScanError, scan

    bb = fmt.backbone
    state, v = bb.input("state"), bb.outputs[0]
    if state is not None and list(v.shape[1:]) != list(state.shape[1:]):
        raise CheckpointError(f"the backbone returns {v.name} of shape {list(v.shape)}, but its state {state.name} is "
                              f"{list(state.shape)}: a velocity has the state's shape (check what the model returns)")
    for name, decl in fmt.networks.items():
        for precision in ["fp32", *sorted(decl.variants)]:
            path = fmt.folder / decl.entry(precision)["file"]
            if not path.is_file():
                continue
            try:
                s = scan(path, stats=False)
            except (ScanError, OSError) as exc:
                raise CheckpointError(f"{path} is not a well-formed ONNX file ({exc})") from None
            fix = "the exported graph does not compute what the model declares (check its outputs' shapes)"
            compare_io(name, "inputs", decl.inputs, s.inputs, f"the exported {path.name}", fix)
            compare_io(name, "outputs", decl.outputs, s.outputs, f"the exported {path.name}", fix)


# -- the graph against the declaration -----------------------------------------------------------
FIX = "re-export the bundle (or undo the edit to bundle.json)"


def compare_io(network: str, part: str, declared: tuple, got: list, path: Any, fix: str = FIX) -> None:
    want = {t.name: t for t in declared}
    have = {name: (ORT_DTYPES.get(dtype, dtype), list(dims)) for name, dtype, dims in got}
    if set(have) != set(want):
        raise CheckpointError(f"{path} has {part} {sorted(have)}, but bundle.json declares {sorted(want)} for the "
                              f"{network} (a graph of another network, or an edited bundle.json); {fix}")
    for name, (dtype, dims) in have.items():
        t = want[name]
        static_differs = any(isinstance(w, int) and isinstance(g, int) and w != g for w, g in zip(t.shape, dims))
        if dtype != t.dtype or len(dims) != len(t.shape) or static_differs:
            raise CheckpointError(f"{path}: {part[:-1]} {name!r} is {dtype} {dims}, but bundle.json declares "
                                  f"{t.dtype} {list(t.shape)}; {fix}")


# onnxruntime's type strings -> numpy dtype names (the one table: backends.py reads it too)
ORT_DTYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(bfloat16)": "bfloat16",
              "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(bool)": "bool"}


def check_graph_inputs(decl: NetworkDecl, graph_inputs: list[tuple[str, str, list]], file: str = "") -> None:
    """Compare the graph's inputs (name, ORT type string or dtype, shape) with bundle.json's.

    Names must agree exactly; ranks and static dimensions must agree; the io dtype must agree
    (reduced-precision variants keep float32 io). Raises CheckpointError naming the difference.
    """
    declared = {i.name: i for i in decl.inputs}
    got = {name: (ORT_DTYPES.get(kind, kind), list(shape or [])) for name, kind, shape in graph_inputs}
    where = f"{file or decl.file}"
    if set(got) != set(declared):
        raise CheckpointError(f"{where} takes inputs {sorted(got)} but bundle.json declares {sorted(declared)} for the "
                              f"{decl.name}; re-export the bundle (or undo the edit to bundle.json)")
    for name, (dtype, shape) in got.items():
        want = declared[name]
        if dtype != want.dtype or len(shape) != len(want.shape) or any(
                isinstance(w, int) and isinstance(g, int) and w != g for w, g in zip(want.shape, shape)):
            raise CheckpointError(f"{where} input {name!r} is {dtype} {shape}, but bundle.json declares "
                                  f"{want.dtype} {list(want.shape)}; re-export the bundle (or undo the edit)")
