"""Where each torch weight of a backbone lives in its exported ONNX graph (for LoRA refits).

``torch.onnx.export`` keeps some weights under their parameter names (``Gemm`` with ``transB``) and
folds others into anonymous initializers (``MatMul`` takes ``W^T``, stored as ``val_123``). A refit
rewrites weights in place, so it must know, for every weight a LoRA may touch, which initializer
holds it and in which layout. The export computes that once, while it still has the torch module,
by matching values (a weight is found as itself or as its transpose; random or trained weights of
two layers never coincide, and a weight found twice is recorded twice), and records it in
bundle.json as the backbone's ``parameters`` entry::

    "parameters": {"schema": "anchorflow.parameters/1",
                   "weights": {"transformer_blocks.0.attn.to_q.weight": [["val_22", "T"]], ...},
                   "folded": ["...weights found nowhere: the exporter merged them with other constants"]}

Names are those of the user's own module (``transformer.`` / ``module.`` wrappers stripped), which are
the names a diffusers / PEFT LoRA file uses. Layouts: ``""`` as is, ``"T"`` transposed (2-D only).
"""

from __future__ import annotations

import hashlib
from typing import Any, Iterable

import numpy as np

PARAMS_SCHEMA = "anchorflow.parameters/1"
WRAPPERS = ("adapter.", "transformer.", "module.")  # the export's wrappers around the user's module


def user_name(name: str) -> str:
    """``adapter.transformer.blocks.0.w`` -> ``blocks.0.w``: the name in the user's own module."""
    for prefix in WRAPPERS:
        if name.startswith(prefix):
            name = name[len(prefix):]
    return name


def _digest(a: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(a, dtype=np.float32).tobytes()).hexdigest()


def parameter_map(params: Iterable[tuple[str, np.ndarray]], initializers: dict[str, np.ndarray]) -> dict[str, Any]:
    """The ``parameters`` entry for ``params`` (name, float32 array) against the graph's initializers.

    Only weights of two or more dimensions are mapped (linear and convolution weights: what a LoRA
    changes); biases and norms are not refitted."""
    index: dict[tuple[tuple[int, ...], str], list[str]] = {}
    for name, arr in initializers.items():
        if arr.dtype == np.float32 and arr.ndim >= 2:
            index.setdefault((arr.shape, _digest(arr)), []).append(name)
    weights, folded = {}, []
    for name, w in params:
        w = np.asarray(w, dtype=np.float32)
        if w.ndim < 2:
            continue
        hits = [[n, ""] for n in index.get((w.shape, _digest(w)), [])]
        if w.ndim == 2:
            hits += [[n, "T"] for n in index.get((w.T.shape, _digest(w.T)), [])]
        key = user_name(name)
        if hits:
            weights[key] = hits
        else:
            folded.append(key)
    return {"schema": PARAMS_SCHEMA, "weights": weights, "folded": sorted(folded)}


def onnx_initializers(model: Any) -> dict[str, np.ndarray]:
    """Initializer name -> array of an in-memory ``onnx.ModelProto`` (external data already loaded)."""
    from onnx import numpy_helper

    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def torch_parameters(module: Any) -> list[tuple[str, np.ndarray]]:
    """(name, float32 array) of a torch module's parameters, in module order."""
    return [(n, p.detach().cpu().float().numpy()) for n, p in module.named_parameters()]


def map_for_export(module: Any, model: Any) -> dict[str, Any]:
    """What the exporter records: :func:`parameter_map` of ``module`` (torch) against ``model`` (ONNX)."""
    return parameter_map(torch_parameters(module), onnx_initializers(model))
