"""Export any :class:`~anchorflow.trainers.adapters.BackboneAdapter` to a validated bundle (schema /2).

``export_adapter(adapter, out, ...)`` declares the adapter's graph (:func:`adapter_net`) and runs it
through the one export pipeline (:mod:`.stages`): ``torch.onnx.export(dynamo=True)`` on the adapter's
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
from typing import Any, Optional, Sequence

import numpy as np

from ..base._deps import require
from ..base._io import atomic_dir
from ..base.errors import ConfigError
from ..runtime.bundles.format import SCHEMA, TIME_CONVENTION
from ..runtime.evaluation.parity import Case
from .precision import parse_precisions
from .quantize import float_precisions
from .stages import (DEFAULT_OPSET, EXAMPLE_BATCH, CaseParity, Net, doubles,  # noqa: F401 - doubles re-exported
                     export_net, export_record, finish, versions)

FILE = "backbone.onnx"


def _dims(spec: Any, top_rows: int) -> dict:
    """One torch.export Dim per axis name (``batch`` included); multiples as ``m * Dim``."""
    torch = require("torch")
    dims = {"batch": torch.export.Dim("batch", min=1, max=max(top_rows, EXAMPLE_BATCH))}
    for axis, (lo, _, hi) in spec.axes.items():
        m = int(spec.multiples.get(axis, 1))
        if m > 1:
            dims[axis] = m * torch.export.Dim(f"{axis}_over_{m}", min=max(1, math.ceil(lo / m)), max=hi // m)
        else:
            dims[axis] = torch.export.Dim(axis, min=lo, max=hi)
    return dims


def _example_sizes(spec: Any) -> dict:
    """Axis sizes of the traced example: the opt sizes, at least 2 (torch.export specialises 1)."""
    out = {}
    for axis, (_, opt, hi) in spec.axes.items():
        m = int(spec.multiples.get(axis, 1))
        out[axis] = max(opt, 2 * m if 2 * m <= hi else opt)
    return out


def adapter_net(adapter: Any, top_rows: int, validate: bool = True, external: Optional[bool] = None) -> Net:
    """The export declaration of ``Positional(adapter)``: named inputs x, t, conditions (``forward(x, t,
    *conds)``), a dynamic batch and the spec's named axes; judged at 3 batch sizes x 2 sets of axis
    sizes against the torch adapter; fp16 keeps the adapter's ``float32_scopes``; weight map recorded."""
    from ..trainers.adapters.base import Positional

    spec = adapter.spec
    decl = spec.inputs()

    def pack(per_input: list) -> tuple:  # forward(x, t, *conds)
        return (per_input[0], per_input[1], tuple(per_input[2:]))[: 3 if len(decl) > 2 else 2]

    net = Net("backbone", Positional(adapter.eval()), decl, ("v",), _dims(spec, top_rows),
              spec.example(EXAMPLE_BATCH, np.random.default_rng(0), **_example_sizes(spec)), FILE,
              what=f"the {spec.name} backbone", hint="; the adapter must run without data-dependent Python control "
              "flow on its dynamic axes", pack=pack, keep=getattr(adapter, "float32_scopes", ()),
              guarded=True, weight_map=True, external=external)
    if validate:
        net.parity = CaseParity("backbone", "v", cases(spec, top_rows),
                                lambda f: adapter.call_numpy(f["x"], f["t"], _cond(f)))
    return net


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
    from .bundle import BundleExport

    if max_batch < 1:
        raise ConfigError(f"--max-batch must be a positive integer, got {max_batch}")
    precisions = parse_precisions(precisions)
    if "bf16" in precisions:
        raise ConfigError("diffusers and factory sources export fp32 and fp16 only: onnxruntime CPU has no bf16 kernels "
                          "to check a bf16 graph against torch; drop bf16 from --precision")
    start = time.perf_counter()
    out = Path(out)
    with atomic_dir(out) as tmp:
        meta = adapter_meta(adapter, tmp, max_batch=max_batch, opset=opset, validate=validate,
                            external_data=external_data, source=source, command=command, sidenet=sidenet,
                            sidenet_path=sidenet_path, precisions=precisions, start=start)
        meta = finish(tmp, meta, precisions)
    return BundleExport(out, meta)


def adapter_meta(adapter: Any, folder: Path, *, max_batch: int, opset: int, validate: bool,
                 external_data: Optional[bool], source: Optional[dict], command: Optional[str], sidenet: Any,
                 sidenet_path: Optional[str], precisions: Sequence[str], start: float) -> dict:
    """The backbone (and SideNet) through the export pipeline into ``folder``; the bundle.json to write."""
    spec = adapter.spec
    rows = 2 if spec.guidance.get("mode") == "rows" else 1
    top = rows * int(max_batch)
    done = export_net(adapter_net(adapter, top, validate, external_data), folder, opset=opset,
                      precisions=float_precisions(precisions))
    pieces = spec.to_bundle()
    entry = {**done.record,
             "inputs": pieces["inputs"], "outputs": [{"name": "v", "dtype": "float32", "shape": ["batch", *spec.state],
                                                      "role": "velocity", "per_row": True}],
             "batch": {"min": 1, "opt": top, "max": top}, "axes": pieces["axes"], "precisions": done.variants,
             "source": source or {"family": spec.family}, "parameters": done.parameters,
             "validation": done.validation}
    meta = {"schema": SCHEMA, "model": {**pieces["model"], "source": source}, "time_convention": TIME_CONVENTION,
            "time": pieces["time"], "guidance": pieces["guidance"], "networks": {"backbone": entry},
            "precisions": list(precisions), "export": export_record(opset, max_batch, validate, command, start),
            "versions": versions(opset)}
    if sidenet is not None:
        from .sidenet_export import sidenet_rows, write_sidenet

        meta["networks"]["sidenet"] = write_sidenet(
            sidenet, folder, pieces["inputs"], dict(spec.axes), sidenet_rows(spec.guidance.get("mode"), max_batch),
            validate=validate, path=sidenet_path, precisions=float_precisions(precisions), opset=opset)
    meta["export"]["seconds"] = round(time.perf_counter() - start, 2)
    return meta
