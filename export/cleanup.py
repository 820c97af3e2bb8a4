"""Graph clean-up after export: onnxslim (constant folding, dead-node and shape-op elimination,
fusions) plus removal of the exporter's per-node debug metadata (source stack traces).

The cleaned graph is kept only if it still passes the parity check the caller gives; the report
says node count, file size and onnxruntime CPU latency (batch 1, one thread) before and after.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

import numpy as np

from ..base._deps import require


@dataclass(frozen=True)
class CleanupReport:
    nodes_before: int
    nodes_after: int
    bytes_before: int
    bytes_after: int
    latency_ms_before: float
    latency_ms_after: float
    kept: bool
    reason: str

    def as_dict(self) -> dict[str, Any]:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in asdict(self).items()}

    def line(self) -> str:
        state = "kept" if self.kept else f"discarded ({self.reason})"
        return (f"nodes {self.nodes_before} -> {self.nodes_after}, {self.bytes_before / 1e3:.0f} kB -> "
                f"{self.bytes_after / 1e3:.0f} kB, ORT CPU batch 1 {self.latency_ms_before:.3f} -> "
                f"{self.latency_ms_after:.3f} ms: {state}")


def strip_debug_info(model: Any) -> Any:
    """A copy without node-level metadata and doc strings (the exporter stores source stack traces,
    local paths included, on every node); graph inputs, outputs and weights are untouched."""
    onnx = require("onnx")
    model = onnx.ModelProto.FromString(model.SerializeToString())
    for node in model.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
    for vi in list(model.graph.input) + list(model.graph.output) + list(model.graph.value_info):
        del vi.metadata_props[:]
    for init in model.graph.initializer:
        del init.metadata_props[:]
    return model


def slim(model: Any) -> Any:
    """onnxslim's optimisation of ``model`` (in memory), then :func:`strip_debug_info`."""
    onnxslim = require("onnxslim", extra="export", purpose="ONNX graph clean-up")
    return strip_debug_info(onnxslim.slim(model))


def memory_session(model: Any) -> Any:
    """An onnxruntime CPU session (one thread, full graph optimisation) on an in-memory model."""
    ort = require("onnxruntime")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def latency_ms(model: Any, feeds: dict[str, np.ndarray], repeats: int = 20) -> float:
    """Median wall time of one onnxruntime CPU run (one thread, full graph optimisation)."""
    sess = memory_session(model)
    sess.run(None, feeds)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        sess.run(None, feeds)
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1e3)


def clean(model: Any, feeds: dict[str, np.ndarray], parity: Callable[[Any], str]) -> tuple[Any, CleanupReport]:
    """Slim ``model``; keep the result only when ``parity(cleaned)`` returns '' (else its reason).

    Returns the model to use (cleaned or original) and the report.
    """
    try:
        cleaned = slim(model)
    except Exception as exc:  # onnxslim raises arbitrary errors on graphs it cannot handle
        n, size = len(model.graph.node), model.ByteSize()
        t = latency_ms(model, feeds)
        return model, CleanupReport(n, n, size, size, t, t, False, f"onnxslim failed: {exc}"[:200])
    reason = parity(cleaned)
    report = CleanupReport(
        len(model.graph.node), len(cleaned.graph.node), model.ByteSize(), cleaned.ByteSize(),
        latency_ms(model, feeds), latency_ms(cleaned, feeds), not reason, reason,
    )
    return (cleaned if not reason else model), report
