"""The one export pipeline: a torch module -> checked ONNX files in a bundle folder being written.

Every exporter (the reference backbone and SideNet, :mod:`.bundle`; a diffusers / factory backbone,
:mod:`.adapter_export`; a SideNet next to it, :mod:`.sidenet_export`; a pipeline's text encoders and
VAE, :mod:`.pipeline_parts`) declares one :class:`Net` per graph and hands it to :func:`export_net`,
which runs the same stages for all:

1. ``trace``: ``torch.onnx.export(dynamo=True)`` of the module with the declared inputs, one
   ``torch.export.Dim`` per named axis, onnxscript's optimizer (a ``guarded`` net: only when the
   program adds no tiny epsilon the optimizer would delete, :func:`tiny_offsets`);
2. ``check``: refuse float64 anywhere (TensorRT cannot import it) and a graph ``onnx.checker``
   refuses;
3. ``clean`` (when the net asks): onnxslim, kept only if parity holds (:mod:`.cleanup`);
4. ``variants``: fp16 / bf16 graphs (:func:`.precision.convert`), checked like the fp32 one;
5. ``save``: each graph into the folder (metadata_props when the net gives them; ONNX external
   data above 2 GB), its file record (sha256, bytes);
6. ``parity``: onnxruntime CPU on the written file against the torch module on the net's cases
   (onnx.reference where ORT has no kernels, bf16), refusing the export on failure;
7. the weight map for LoRA refits (:mod:`.refit_map`) when the net asks.

Each exporter then writes its own bundle.json entry from the :class:`Exported` pieces, and the
folder is published whole by :func:`finish` (inside the caller's ``anchorflow.base._io.atomic_dir``; int8 / fp8
variants added by :mod:`.quantize`). Time convention: t = 1 noise, t = 0 data.
"""

from __future__ import annotations

import contextlib
import io
import logging
import platform
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np

from .. import __version__
from ..base._deps import require
from ..base.errors import CheckpointError, ConfigError
from .cleanup import clean, memory_session

DEFAULT_OPSET = 18
MIN_OPSET = 18  # the dynamo exporter emits 18+; its down-conversion to 17 breaks Split (measured)
EXAMPLE_BATCH = 3  # not 0 or 1, which torch.export would specialise
EXTERNAL_BYTES = 2 * 1024**3 - 64 * 1024**2  # protobuf's 2 GB cap, less room for the graph itself
REFERENCE_MAX_BATCH = 7  # onnx.reference (pure python) only sees batches up to this size
TINY = 1e-8  # onnxscript's no-op rules match a pattern constant 0 with math.isclose(abs_tol=1e-8)
EXPORTER = "torch.onnx.export(dynamo=True)"


# -- what an exporter declares ----------------------------------------------------------------
@dataclass
class Net:
    """One graph to export: the module and its declared I/O; the rest is the pipeline's.

    ``inputs``: ``[{"name", "shape": ["batch", "L", 16, ...], ...}]`` in forward order; every string
    axis must be in ``dims`` (name -> ``torch.export.Dim`` or ``m * Dim``). ``example``: input name
    -> array traced. ``pack``: per-input dynamic shapes -> what ``torch.onnx.export`` takes (default:
    a tuple, one per forward argument). ``parity``: how the written graphs are judged against torch
    (None: not validated). ``props``: precision -> the file's ``metadata_props`` (None: none).
    ``keep``: node scopes kept in float32 by the fp16 conversion.
    """

    name: str
    module: Any
    inputs: list
    outputs: Sequence[str]
    dims: dict
    example: dict
    file: str
    what: str = ""  # how a failing trace names it, e.g. "the SD3 backbone"
    hint: str = ""  # appended to a failing trace's message
    pack: Optional[Callable[[list], Any]] = None
    parity: Any = None
    props: Optional[Callable[[str], dict]] = None
    keep: Sequence[str] = ()
    # onnxscript's optimizer: True = after the names are set and only without a tiny epsilon
    # (:func:`tiny_offsets`; adapters); False = inside torch.onnx.export, before the outputs are named (which
    # leaves their original node names in metadata_props): the order our nets, SideNets and pipeline parts
    # were always exported in, kept so that their files stay byte for byte what they were
    guarded: bool = False
    clean: bool = False  # onnxslim, kept only when parity holds (our checkpoints' nets)
    weight_map: bool = False  # record where each weight lives (.refit_map), for LoRA refits
    external: Optional[bool] = None  # ONNX external data: None = only above 2 GB


@dataclass
class Exported:
    """What :func:`export_net` wrote for one net: the fp32 file record, its validation record, the
    variants' ``precision -> {file record, validation}``, the clean-up report, the weight map."""

    record: dict
    validation: dict
    variants: dict = field(default_factory=dict)
    cleanup: Any = None
    parameters: Optional[dict] = None
    model: Any = None


# -- 1. trace --------------------------------------------------------------------------------
@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence the exporter's progress prints, warnings and log lines (errors still raise)."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def check_opset(opset: int) -> int:
    onnx = require("onnx")
    top = onnx.defs.onnx_opset_version()
    if not MIN_OPSET <= int(opset) <= top:
        raise ConfigError(f"--opset must lie in {MIN_OPSET}..{top} (this onnx), got {opset}")
    return int(opset)


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


def trace(net: Net, opset: int) -> Any:
    """``torch.onnx.export(dynamo=True)`` of ``net.module`` (eval, CPU) -> ``onnx.ModelProto``."""
    torch = require("torch")
    args = tuple(torch.from_numpy(net.example[d["name"]]) for d in net.inputs)
    per_input = [{j: net.dims[a] for j, a in enumerate(d["shape"]) if isinstance(a, str)} or None for d in net.inputs]
    shapes = net.pack(per_input) if net.pack is not None else tuple(per_input)
    module = net.module.eval().to("cpu")
    try:
        with quiet(), torch.no_grad():
            program = torch.onnx.export(module, args, None, input_names=[d["name"] for d in net.inputs],
                                        output_names=list(net.outputs), dynamic_shapes=shapes, dynamo=True,
                                        opset_version=check_opset(opset), external_data=False, verbose=False,
                                        optimize=not net.guarded)
            if net.guarded and not tiny_offsets(program.exported_program):
                program.optimize()
    except Exception as exc:  # torch.export raises many types; the message is what helps
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()] or [type(exc).__name__]
        first = next((ln for ln in lines if ln.startswith("<class")), lines[0])
        raise ConfigError(f"torch.onnx.export failed for {net.what or 'the ' + net.name}: {first[:400]}"
                          f"{net.hint}") from exc
    return program.model_proto


# -- 2. check --------------------------------------------------------------------------------
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


def check_graph(model: Any, network: str) -> None:
    """Refuse (CheckpointError) a graph computing in float64 or failing ``onnx.checker`` (full check;
    a graph above protobuf's 2 GB cap is checked for float64 only)."""
    onnx = require("onnx")
    bad = doubles(model)
    if bad:
        raise CheckpointError(f"export refused: the {network} graph computes in float64 ({', '.join(bad[:3])}...), "
                              "which TensorRT cannot import; cast to float32 in the model")
    if model.ByteSize() > EXTERNAL_BYTES:
        return
    try:
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise CheckpointError(f"export refused: the {network} ONNX graph fails onnx.checker ({exc})") from None


# -- 5. save ---------------------------------------------------------------------------------
def stamp(model: Any, props: dict) -> Any:
    """Copy of ``model`` with ``props`` (JSON strings) as its ``metadata_props``, anchorflow as producer."""
    onnx = require("onnx")
    model = onnx.ModelProto.FromString(model.SerializeToString())
    del model.metadata_props[:]
    onnx.helper.set_model_props(model, props)
    model.producer_name, model.producer_version = "anchorflow", __version__
    return model


def save(model: Any, folder: Path, file: str, external: Optional[bool] = None) -> dict:
    """Write the graph (external data above 2 GB or when asked); its bundle.json file record.

    The model's tensors become external references when written so: convert variants first."""
    from ..base._io import write_bytes
    from ..runtime.bundles.format import file_record

    onnx = require("onnx")
    size = sum(t.ByteSize() for t in model.graph.initializer)
    big = size > EXTERNAL_BYTES if external is None else external
    if not big:
        write_bytes(Path(folder) / file, model.SerializeToString())
        return file_record(folder, file)
    onnx.save_model(model, str(Path(folder) / file), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=f"{file}.data", size_threshold=1024)  # small constants stay inline (ORT infers shapes)
    return {**file_record(folder, file), "external_data": [file_record(folder, f"{file}.data")]}


# -- 6. parity -------------------------------------------------------------------------------
def refused(failure: str, precision: str) -> CheckpointError:
    drop = "" if precision == "fp32" else f"; drop --precision {precision}"
    return CheckpointError(f"export refused: {failure}{drop}; nothing was written")


class CaseParity:
    """One output judged by :func:`anchorflow.runtime.evaluation.parity.run_report` on ``cases`` against
    torch outputs (computed once, NaN/Inf refused) at each precision's tolerance.

    ``torch_run(feeds) -> array``; ``labels``: how the reference is named in the record for fp32
    and for the variants (both fp32 torch)."""

    def __init__(self, name: str, output: str, cases: list, torch_run: Callable[[dict], np.ndarray],
                 labels: tuple[str, str] = ("torch fp32", "torch fp32")) -> None:
        from ..runtime.evaluation.parity import reference_outputs

        self.name, self.output, self.cases, self.labels = name, output, cases, labels
        self.refs = reference_outputs(name, torch_run, cases)

    def report(self, run: Callable[[dict], np.ndarray], precision: str, runtime: str = "ort-cpu",
               small: bool = False) -> Any:
        from ..runtime.evaluation.parity import run_report

        todo = [(c, r) for c, r in zip(self.cases, self.refs) if not small or c.batch <= REFERENCE_MAX_BATCH]
        label = self.labels[0] if precision == "fp32" else self.labels[1]
        return run_report(self.name, precision, runtime, label, [c for c, _ in todo], [r for _, r in todo],
                          lambda f: run(f)[0])

    def failure(self, model: Any) -> str:
        """'' when the in-memory ``model`` passes in fp32, else why (the clean-up's test)."""
        sess = memory_session(model)
        return self.report(lambda f: sess.run([self.output], f), "fp32").failure()

    def check(self, run: Callable[[dict], list], precision: str, reference: Optional[tuple] = None) -> dict:
        """The validation record of ``run`` (ORT on the written file; ``reference``: (model, note),
        onnx.reference on small batches where ORT cannot run the model); refused when it fails."""
        if reference is not None:
            report = self.report(reference_runner(reference[0], [self.output]), precision, "onnx.reference", True)
            report.note = reference[1]
        else:
            report = self.report(run, precision)
        if not report.passed:
            raise refused(report.failure(), precision)
        return report.as_dict()


def relative_max(got: np.ndarray, ref: np.ndarray) -> float:
    """``max |got - ref| / max(1, max |ref|)``: the error relative to the reference's scale."""
    return float(np.max(np.abs(got - ref))) / max(1.0, float(np.max(np.abs(ref))))


class RelativeParity:
    """Every output judged by its max abs error relative to the torch output's scale
    (``max |onnx - torch| / max(1, max |torch|) <= tol``), shapes equal (a pipeline's parts)."""

    def __init__(self, name: str, outputs: Sequence[str], cases: list, torch_run: Callable[[dict], list],
                 tol: float) -> None:
        self.name, self.outputs, self.cases, self.torch_run, self.tol = name, list(outputs), cases, torch_run, tol

    def check(self, run: Callable[[dict], list], precision: str, reference: Optional[tuple] = None) -> dict:
        if reference is not None:
            run = reference_runner(reference[0], self.outputs)
        worst, checks = 0.0, []
        for feeds in self.cases:
            ref, got = self.torch_run(feeds), run(feeds)
            for o, r, g in zip(self.outputs, ref, got):
                if r.shape != g.shape:
                    raise CheckpointError(f"export refused: the {self.name} output {o} has shape {g.shape} in "
                                          f"onnxruntime but {r.shape} in torch; nothing was written")
                err = relative_max(g, r)
                worst = max(worst, err)
                checks.append({"output": o, "shape": list(r.shape), "max_rel_err": err})
                if not err <= self.tol:
                    raise CheckpointError(f"export refused: the {self.name} output {o} differs from torch by "
                                          f"{err:.2e} (relative max, allowed {self.tol:.0e}) at shape {list(r.shape)}; "
                                          "nothing was written")
        return {"against": "torch fp32", "backend": "ort-cpu", "tolerance": self.tol, "max_rel_err": worst,
                "cases": checks, "passed": True}


def file_session(path: Path, outputs: Sequence[str]) -> Callable[[dict], list]:
    """onnxruntime CPU (one thread) on the written file, as the runtime opens it (external data too)."""
    from ..runtime.bundles.backends import make_session

    sess = make_session(path, "ort-cpu", threads=1, graph_cache=False)
    return lambda feeds: sess.run(list(outputs), feeds)


def reference_runner(model: Any, outputs: Sequence[str]) -> Callable[[dict], list]:
    """onnx's own pure-python reference evaluator (slow; runs bf16 graphs that ORT CPU cannot)."""
    ev = require("onnx.reference").ReferenceEvaluator(model)
    return lambda feeds: [np.asarray(o, np.float32) for o in ev.run(list(outputs), feeds)]


def _judge(net: Net, path: Path, model: Any, precision: str) -> dict:
    """The validation record of the written ``path``; onnx.reference on small batches where ORT has
    no kernels for it (bf16 on the CPU)."""
    try:
        run = file_session(path, net.outputs)
        return net.parity.check(run, precision)
    except CheckpointError:
        raise
    except Exception as exc:  # noqa: BLE001 - onnxruntime's NOT_IMPLEMENTED for ops of this type
        why = str(exc).strip().splitlines()[0][:200]
    note = f"ORT CPU cannot run it ({why}); checked with onnx.reference on batches <= {REFERENCE_MAX_BATCH}"
    return net.parity.check(None, precision, reference=(model, note))


# -- the pipeline ----------------------------------------------------------------------------
def export_net(net: Net, folder: Path, *, opset: int, precisions: Sequence[str] = ("fp32",),
               step: Callable[[str], None] = lambda s: None) -> Exported:
    """Stages 1-7 of the module docstring for one net; its files are written into ``folder``.

    ``precisions``: float ones, fp32 first. Raises CheckpointError / ConfigError when a stage refuses
    (the caller's atomic folder then leaves nothing behind)."""
    from .precision import convert, variant_file

    step(f"{net.name}: torch.onnx.export")
    model = trace(net, opset)
    check_graph(model, net.name)
    cleanup = None
    if net.clean:
        step(f"{net.name}: clean-up + parity")
        model, cleanup = clean(model, _probe(net), net.parity.failure if net.parity else (lambda m: ""))
    parameters = None
    if net.weight_map:  # before save() makes the weights external
        from .refit_map import map_for_export

        parameters = map_for_export(net.module, model)
    low = {}
    for p in [p for p in precisions if p != "fp32"]:
        step(f"{net.name}: {p}")
        low[p] = convert(model, p, net.keep)
        check_graph(low[p], f"{net.name} {p}")
    step(f"{net.name}: write")
    graphs = {"fp32": (model, net.file), **{p: (m, variant_file(net.file, p)) for p, m in low.items()}}
    records, validation = {}, {}
    for p, (m, file) in graphs.items():
        records[p] = save(stamp(m, net.props(p)) if net.props else m, folder, file, net.external)
        validation[p] = _judge(net, Path(folder) / file, m, p) if net.parity else {"skipped": "--no-validate"}
    variants = {p: {**records[p], "validation": validation[p]} for p in low}
    return Exported(records["fp32"], validation["fp32"], variants, cleanup, parameters, model)


def _probe(net: Net) -> dict:
    """Feeds for the clean-up's latency probe: the parity's first case (batch 1), else the traced example."""
    cases = getattr(net.parity, "cases", None)
    return cases[0].feeds if cases else net.example


# -- the bundle ------------------------------------------------------------------------------
def versions(opset: int) -> dict[str, Any]:
    out: dict[str, Any] = {"anchorflow": __version__, "python": platform.python_version(), "opset": opset}
    for name in ("torch", "onnx", "onnxruntime", "onnxscript", "onnxslim"):
        try:
            out[name] = require(name).__version__
        except Exception:  # noqa: BLE001 - a version we cannot read is recorded as missing
            out[name] = None
    return out


def export_record(opset: int, max_batch: int, validate: bool, command: Optional[str], start: float,
                  **extra: Any) -> dict:
    """bundle.json's ``export``: exporter, opset, max batch, validated, command, created, seconds."""
    return {"exporter": EXPORTER, "opset": opset, "max_batch": int(max_batch), "validated": validate, **extra,
            "command": command, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "seconds": round(time.perf_counter() - start, 2)}


def finish(folder: Path, meta: dict, precisions: Sequence[str], step: Callable[[str], None] = lambda s: None,
           tuning: Any = None) -> dict:
    """The last stage, in the folder being written (``anchorflow.base._io.atomic_dir``): bundle.json
    (validated against the written graphs), the tuned grids carried over from an earlier bundle
    (``tuning``), then the int8 / fp8 variants (:mod:`.quantize`, guarded); returns bundle.json as written."""
    from ..base._io import _publish
    from ..runtime.bundles.format import write_bundle_json
    from .quantize import add_quantized

    write_bundle_json(folder, meta)
    if tuning is not None:
        from ..runtime.bundles.tuned_grids import write_tuning

        write_tuning(folder, tuning)
    meta = add_quantized(folder, precisions, step=step)
    _publish(folder)  # ordinary modes (atomic_dir also sets them on rename)
    return meta
