"""Export any :class:`~anchorflow.trainers.adapters.BackboneAdapter` to a validated bundle (schema /2).

``export_adapter(adapter, out, ...)`` runs ``torch.onnx.export(dynamo=True)`` on the adapter's
``forward(x, t, *conditions)`` with a dynamic ``batch`` axis and one ``torch.export.Dim`` per named
axis of the spec (text length ``L``, latent ``H``/``W``; an axis that must be a multiple of m, e.g.
FLUX's 2x2 packing, is declared as ``m * Dim``), refuses float64 anywhere in the graph (TensorRT
cannot import it), writes the weights as ONNX external data (one ``backbone.onnx.data`` next to the
graph, hashed like the rest) above 2 GB, and checks onnxruntime against torch at 3 batch sizes x
2 sets of axis sizes (fp32: max abs error <= 1e-4). bundle.json declares the inputs, axes, time
map and guidance mode (:mod:`anchorflow.runtime.bundles.format`). The folder appears whole or not
at all. Time convention: t = 1 noise, t = 0 data.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

from ..base._deps import require
from ..base._io import atomic_dir
from ..base.errors import CheckpointError, ConfigError
from ..runtime.bundles.format import SCHEMA, TIME_CONVENTION, file_record, write_bundle_json
from ..runtime.evaluation.parity import Case, reference_outputs, run_report
from .onnx_export import DEFAULT_OPSET, _quiet, check_opset
from .precision import convert, parse_precisions, variant_file
from .quantize import add_quantized, float_precisions

EXAMPLE_BATCH = 3  # not 0 or 1, which torch.export would specialise
EXTERNAL_BYTES = 2 * 1024**3 - 64 * 1024**2  # protobuf's 2 GB cap, less room for the graph itself
FILE = "backbone.onnx"


def _dims(spec: Any, top_rows: int) -> tuple[dict, Any]:
    """One torch.export Dim per axis name (``batch`` included); multiples as ``m * Dim``."""
    torch = require("torch")
    dims = {"batch": torch.export.Dim("batch", min=1, max=max(top_rows, EXAMPLE_BATCH))}
    for axis, (lo, _, hi) in spec.axes.items():
        m = int(spec.multiples.get(axis, 1))
        if m > 1:
            dims[axis] = m * torch.export.Dim(f"{axis}_over_{m}", min=max(1, math.ceil(lo / m)), max=hi // m)
        else:
            dims[axis] = torch.export.Dim(axis, min=lo, max=hi)
    return dims, torch


def _example_sizes(spec: Any) -> dict:
    """Axis sizes of the traced example: the opt sizes, at least 2 (torch.export specialises 1)."""
    out = {}
    for axis, (_, opt, hi) in spec.axes.items():
        m = int(spec.multiples.get(axis, 1))
        out[axis] = max(opt, 2 * m if 2 * m <= hi else opt)
    return out


def trace(adapter: Any, top_rows: int, opset: int) -> Any:
    """``torch.onnx.export`` of ``Positional(adapter)`` -> ``onnx.ModelProto`` (named inputs x, t, conditions)."""
    from ..trainers.adapters.base import Positional

    spec = adapter.spec
    dims, torch = _dims(spec, top_rows)
    ex = spec.example(EXAMPLE_BATCH, np.random.default_rng(0), **_example_sizes(spec))
    decl = spec.inputs()
    args = tuple(torch.from_numpy(ex[d["name"]]) for d in decl)
    per_input = [{j: dims[a] for j, a in enumerate(d["shape"]) if isinstance(a, str)} or None for d in decl]
    shapes = (per_input[0], per_input[1], tuple(per_input[2:]))[: 3 if len(decl) > 2 else 2]  # forward(x, t, *conds)
    module = Positional(adapter).eval()
    try:
        with _quiet(), torch.no_grad():
            program = torch.onnx.export(module, args, None, input_names=[d["name"] for d in decl], output_names=["v"],
                                        dynamo=True, dynamic_shapes=shapes, opset_version=check_opset(opset),
                                        external_data=False, verbose=False, optimize=False)
            if not tiny_offsets(program.exported_program):
                program.optimize()
    except Exception as exc:  # torch.export raises many types; the message is what helps
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()] or [type(exc).__name__]
        first = next((ln for ln in lines if ln.startswith("<class")), lines[0])
        raise ConfigError(f"torch.onnx.export failed for the {spec.name} backbone: {first[:400]}; the adapter must "
                          "run without data-dependent Python control flow on its dynamic axes") from exc
    return program.model_proto


TINY = 1e-8  # onnxscript's no-op rules match a pattern constant 0 with math.isclose(abs_tol=1e-8)


def tiny_offsets(program: Any) -> list[str]:
    """FX nodes adding or subtracting a scalar 0 < |c| <= 1e-8 (an epsilon such as ``d + 1e-15``).

    The onnxscript optimizer run by ``torch.onnx.export`` deletes them as ``x + 0`` (rule ``add_0``,
    onnxscript 0.7), turning ``n / (d + eps)`` into 0 / 0 = NaN; a graph with one is kept unoptimized
    (onnxruntime and TensorRT fold constants themselves when they load it).
    """
    found = []
    for node in program.graph.nodes:
        name = str(node.target)
        if node.op == "call_function" and ("aten.add" in name or "aten.sub" in name):
            if any(isinstance(a, float) and 0 < abs(a) <= TINY for a in node.args[1:]):
                found.append(node.name)
    return found


def doubles(model: Any) -> list[str]:
    """Names of float64 tensors or casts in the graph (TensorRT cannot import double tensors)."""
    onnx = require("onnx")
    d = onnx.TensorProto.DOUBLE
    g = model.graph
    found = [t.name for t in g.initializer if t.data_type == d]
    found += [v.name for v in [*g.input, *g.output, *g.value_info] if v.type.tensor_type.elem_type == d]
    for node in g.node:
        if node.op_type == "Cast" and any(a.name == "to" and a.i == d for a in node.attribute):
            found.append(node.name or node.output[0])
        if node.op_type == "Constant" and any(a.t.data_type == d for a in node.attribute if a.type == a.TENSOR):
            found.append(node.output[0])
    return found


def save(model: Any, folder: Path, external: Optional[bool], file: str = FILE) -> dict:
    """Write the graph (external data above 2 GB or when asked); its bundle.json file record.

    The model's tensors become external references when written so: convert variants first."""
    onnx = require("onnx")
    size = sum(t.ByteSize() for t in model.graph.initializer)
    big = size > EXTERNAL_BYTES if external is None else external
    onnx.save_model(model, str(folder / file), save_as_external_data=big, all_tensors_to_one_file=True,
                    location=f"{file}.data", size_threshold=1024)  # small constants stay inline (ORT infers shapes)
    record = file_record(folder, file)
    if big:
        record["external_data"] = [file_record(folder, f"{file}.data")]
    return record


def cases(spec: Any, top_rows: int, seed: int = 0) -> list[Case]:
    """3 batch sizes (1, 3, up to 8 rows) x 2 sets of axis sizes (opt, and half-way to min or max)."""
    rng = np.random.default_rng(seed)
    alt = {}
    for axis, (lo, opt, hi) in spec.axes.items():
        m = int(spec.multiples.get(axis, 1))
        size = max(lo, (lo + opt) // 2 // m * m) if opt > lo else min(hi, opt + m)
        alt[axis] = size if size != opt else min(hi, opt + m)
    out = []
    for sizes in ({}, alt) if alt else ({},):
        label = " ".join(f"{a}={s}" for a, s in spec.sizes(**sizes).items()) or "static"
        for b in sorted({1, min(3, top_rows), min(8, top_rows)}):
            out.append(Case(f"random {label}", b, spec.example(b, rng, **sizes)))
    return out


def _parity(adapter: Any, spec: Any, top_rows: int) -> Callable[[Path, str], Any]:
    """``check(file, precision) -> report``: the written graph on onnxruntime CPU vs the torch adapter in
    fp32 on the same cases (3 batches x 2 axis sizes), refusing the export when it fails."""
    from ..runtime.bundles.backends import make_session

    todo = cases(spec, top_rows)
    refs = reference_outputs("backbone", lambda f: adapter.call_numpy(f["x"], f["t"], _cond(f)), todo)

    def check(path: Path, precision: str) -> Any:
        session = make_session(path, "ort-cpu", threads=1)
        report = run_report("backbone", precision, "ort-cpu", "torch fp32", todo, refs, lambda f: session.run(["v"], f)[0])
        if not report.passed:
            drop = "" if precision == "fp32" else f"; drop --precision {precision}"
            raise CheckpointError(f"export refused: {report.failure()}{drop}; nothing was written")
        return report

    return check


def _cond(feeds: dict) -> dict:
    return {k: v for k, v in feeds.items() if k not in ("x", "t")}


def export_adapter(adapter: Any, out: str | os.PathLike, *, max_batch: int = 8, opset: int = DEFAULT_OPSET,
                   validate: bool = True, external_data: Optional[bool] = None, source: Optional[dict] = None,
                   command: Optional[str] = None, sidenet: Any = None, sidenet_path: Optional[str] = None,
                   precisions: Sequence[str] = ("fp32",)) -> Any:
    """Export ``adapter`` to the bundle folder ``out`` (see the module docstring).

    ``max_batch``: samples per solve; the backbone takes up to 2x rows with ``rows`` guidance.
    ``external_data``: None = only above 2 GB. ``sidenet``: a SideNet module already checked to
    belong to this backbone (``trainers.sidenet.load_sidenet(path, adapter)``), exported into the
    same bundle as ``sidenet.onnx`` (:mod:`.sidenet_export`). ``precisions``: fp32 always, plus
    ``fp16`` (:func:`.precision.convert`: float32 inputs and outputs, normalisations, reductions and
    time embeddings in float32; checked against torch fp32 at the fp16 tolerance). bf16 is refused:
    onnxruntime CPU has no bf16 kernels to check such a graph with here. Returns :class:`~.bundle.BundleExport`.
    """
    from .bundle import BundleExport, _publishable, versions
    from .refit_map import map_for_export

    if max_batch < 1:
        raise ConfigError(f"--max-batch must be a positive integer, got {max_batch}")
    precisions = parse_precisions(precisions)
    if "bf16" in precisions:
        raise ConfigError("diffusers and factory sources export fp32 and fp16 only: onnxruntime CPU has no bf16 kernels "
                          "to check a bf16 graph against torch; drop bf16 from --precision")
    spec = adapter.spec
    rows = 2 if spec.guidance.get("mode") == "rows" else 1
    top = rows * int(max_batch)
    start = time.perf_counter()
    model = trace(adapter.eval(), top, opset)
    bad = doubles(model)
    if bad:
        raise CheckpointError(f"export refused: the graph computes in float64 ({', '.join(bad[:3])}...), which TensorRT "
                              "cannot import; cast to float32 in the adapter")
    pieces = spec.to_bundle()
    weights = map_for_export(adapter, model)  # where each weight lives, for LoRA refits (before save() moves them)
    out = Path(out)
    keep = getattr(adapter, "float32_scopes", ())  # blocks the model runs in float32 on purpose
    low = {p: convert(model, p, keep) for p in float_precisions(precisions)[1:]}  # before save() makes the weights external
    with atomic_dir(out) as tmp:
        entry = save(model, tmp, external_data)
        check = _parity(adapter, spec, top) if validate else None
        report = check(tmp / FILE, "fp32") if check else None
        variants = {}
        for p, vmodel in low.items():
            record = save(vmodel, tmp, external_data, variant_file(FILE, p))
            variants[p] = {**record, "validation": check(tmp / record["file"], p).as_dict() if check
                           else {"skipped": "--no-validate"}}
        entry.update({
            "inputs": pieces["inputs"], "outputs": [{"name": "v", "dtype": "float32", "shape": ["batch", *spec.state],
                                                    "role": "velocity", "per_row": True}],
            "batch": {"min": 1, "opt": top, "max": top}, "axes": pieces["axes"], "precisions": variants,
            "source": source or {"family": spec.family},
            "parameters": weights,
            "validation": report.as_dict() if report else {"skipped": "--no-validate"},
        })
        meta = {"schema": SCHEMA, "model": {**pieces["model"], "source": source}, "time_convention": TIME_CONVENTION,
                "time": pieces["time"], "guidance": pieces["guidance"], "networks": {"backbone": entry},
                "precisions": list(precisions),
                "export": {"exporter": "torch.onnx.export(dynamo=True)", "opset": opset, "max_batch": int(max_batch),
                           "validated": validate, "command": command, "seconds": round(time.perf_counter() - start, 2),
                           "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
                "versions": versions(opset)}
        if sidenet is not None:
            from .sidenet_export import sidenet_rows, write_sidenet

            meta["networks"]["sidenet"] = write_sidenet(
                sidenet, tmp, pieces["inputs"], dict(spec.axes), sidenet_rows(spec.guidance.get("mode"), max_batch),
                validate=validate, path=sidenet_path, precisions=float_precisions(precisions))
        write_bundle_json(tmp, meta)
        meta = add_quantized(tmp, precisions)  # int8 / fp8 variants, guarded (quant)
        _publishable(tmp)
    return BundleExport(out, meta)

