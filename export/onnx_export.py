"""The export declarations of our own nets (backbone, SideNet): one dynamic batch axis.

I/O contract (docs/architecture.md): backbone ``x`` (batch, *state) f32, ``t`` (batch,) f32,
``y`` (batch,) int64 -> ``v``; SideNet ``x``, ``v``, ``t``, ``h`` (batch,) f32, ``y`` -> ``delta``
with ``v_hat(t - h) = v + delta`` (BA-solver, arXiv 2601.21542). Time: t = 1 noise, t = 0 data.

Exporter: ``torch.onnx.export(dynamo=True)`` (torch.export + onnxscript), chosen over the
TorchScript exporter because, measured on these nets with torch 2.13: (1) it is the maintained
path (the TorchScript one emits a DeprecationWarning announcing its removal); (2) its graph
(opset 18, already folded by the onnxscript optimiser) goes through onnxconverter-common's fp16
converter cleanly, while the TorchScript graph of the same nets comes out with Identity/Cast type
mismatches that neither the checker nor onnxruntime accept; (3) the batch range is declared once
as ``torch.export.Dim(min, max)`` and checked by torch.export. It costs ~2-6 s per net instead of
~0.1 s. Weights are stored inline (one self-contained file per net; protobuf caps it at 2 GB).
The trace itself is the one export pipeline's (:func:`.stages.trace`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..base._deps import require
from ..base.errors import ConfigError
from ..runtime.evaluation.parity.cases import OFFSETS, Domain, decls, random_feeds
from ..runtime.solving.solvers import max_sidenet_offsets
from .stages import DEFAULT_OPSET, EXAMPLE_BATCH, MIN_OPSET, Net, check_opset, trace  # noqa: F401 - re-exported

EXAMPLE_OFFSETS = 2  # likewise for a shared-body SideNet's offsets axis


@dataclass(frozen=True)
class NetSpec:
    """One exported network: ONNX input names (in forward order), output name, file name.

    ``rows``: batch rows per generated sample at most; the backbone sees 2 (cond + uncond rows
    with guidance), the SideNet 2 x the most offsets a registered solver puts in one call (BA's merged
    probe: 4, so 8).
    """

    name: str
    inputs: tuple[str, ...]
    output: str
    rows: int
    file: str
    offsets: int = 0  # > 0: a shared-body SideNet, h (offsets, batch) with up to this many offsets per row

    def batch_range(self, max_batch: int) -> dict[str, int]:
        """Batch range of the dynamic axis for ``max_batch`` samples per solve (TensorRT profile too)."""
        if max_batch < 1:
            raise ConfigError(f"--max-batch must be a positive integer, got {max_batch}")
        return {"min": 1, "opt": self.rows * max_batch, "max": self.rows * max_batch}

    def signature(self, state_shape: tuple[int, ...]) -> dict[str, list[dict[str, Any]]]:
        """Names, shapes (``"batch"`` for the dynamic axis) and dtypes of inputs and output."""
        def entry(name: str) -> dict[str, Any]:
            role = ROLE_OF_NAME.get(name, "condition")
            if self.offsets and name in ("h", "delta"):  # K offsets per row: (offsets, batch[, *state])
                shape = [OFFSETS, "batch", *(map(int, state_shape) if name == "delta" else ())]
                return {"name": name, "shape": shape, "dtype": "float32", "role": role, "per_row": True}
            if name == "y":
                return {"name": name, "shape": ["batch"], "dtype": "int64", "role": role, "per_row": True}
            if name in ("t", "h"):
                return {"name": name, "shape": ["batch"], "dtype": "float32", "role": role, "per_row": True}
            return {"name": name, "shape": ["batch", *map(int, state_shape)], "dtype": "float32", "role": role,
                    "per_row": True}

        return {"inputs": [entry(n) for n in self.inputs], "outputs": [entry(self.output)]}

    def axes(self) -> dict[str, dict[str, int]]:
        """Named axes besides ``batch`` (bundle.json ``axes``): the offsets of a shared-body SideNet."""
        return {OFFSETS: {"min": 1, "opt": self.offsets, "max": self.offsets}} if self.offsets else {}


ROLE_OF_NAME = {"x": "state", "t": "time", "v": "velocity", "h": "offset", "delta": "velocity"}
BACKBONE = NetSpec("backbone", ("x", "t", "y"), "v", 2, "backbone.onnx")
SIDENET = NetSpec("sidenet", ("x", "v", "t", "h", "y"), "delta", 2 * max_sidenet_offsets(), "sidenet.onnx")
# a polynomial-offset SideNet: the body runs on the anchor rows once, h (offsets, batch) -> delta (offsets, batch, ...)
SIDENET_SHARED = NetSpec("sidenet", ("x", "v", "t", "h", "y"), "delta", 2, "sidenet.onnx",
                         offsets=max_sidenet_offsets())
NETS = {spec.name: spec for spec in (BACKBONE, SIDENET)}


def sidenet_spec(module: Any) -> NetSpec:
    """The export spec of a SideNet module: :data:`SIDENET_SHARED` for shared-body (polynomial) forms."""
    return SIDENET_SHARED if getattr(module, "shared_body", False) else SIDENET


def random_inputs(
    spec: NetSpec, state_shape: tuple[int, ...], num_classes: int, batch: int, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """Random feeds in the nets' domain (:func:`anchorflow.runtime.evaluation.parity.cases.random_feeds`): x, v ~
    N(0, 1); t ~ U(0, 1); h in [-(1 - t), t] so that t - h stays in [0, 1]; y uniform over
    0..num_classes (the last is the null label)."""
    dom = Domain.for_labels(num_classes)
    if spec.offsets:
        dom = Domain(sizes={OFFSETS: EXAMPLE_OFFSETS}, labels=dom.labels, null=dom.null)
    return random_feeds(decls(spec.signature(state_shape)["inputs"]), batch, rng, dom)


def reference_net(module: Any, spec: NetSpec, state_shape: tuple[int, ...], num_classes: int, *,
                  max_batch: int) -> Net:
    """The export declaration of one of our nets (:func:`.stages.export_net` does the rest): inputs in
    ``spec`` order, dynamic ``batch`` 1 .. ``spec.batch_range(max_batch)["max"]`` rows (and a shared-body
    SideNet's ``offsets`` axis), traced on random inputs of :data:`EXAMPLE_BATCH` rows."""
    torch = require("torch")
    feeds = random_inputs(spec, state_shape, num_classes, EXAMPLE_BATCH, np.random.default_rng(0))
    top = spec.batch_range(max_batch)["max"]
    dims = {"batch": torch.export.Dim("batch", min=1, max=max(top, EXAMPLE_BATCH))}
    if spec.offsets:
        dims[OFFSETS] = torch.export.Dim(OFFSETS, min=1, max=max(spec.offsets, EXAMPLE_OFFSETS))
    return Net(spec.name, module, spec.signature(state_shape)["inputs"], (spec.output,), dims, feeds, spec.file,
               what=f"the {spec.name}", hint="; the net must run without data-dependent Python control flow on a "
               "dynamic batch axis")


def export_onnx(module: Any, spec: NetSpec, state_shape: tuple[int, ...], num_classes: int, *,
                max_batch: int, opset: int = DEFAULT_OPSET) -> Any:
    """``module`` (eval mode, CPU) as an in-memory ``onnx.ModelProto`` with a dynamic batch (the
    pipeline's trace stage alone; the batch axis accepts 1 .. ``spec.batch_range(max_batch)["max"]`` rows)."""
    return trace(reference_net(module, spec, state_shape, num_classes, max_batch=max_batch), opset)
