"""Reduced-precision ONNX variants (fp16, bf16) with float32 inputs and outputs.

The graph itself carries the precision (TensorRT 10+/11 strongly typed networks take it from
there, and onnxruntime runs what the graph says). Numerically sensitive ops stay in float32:
normalisations, reductions, softmax, pow / sqrt / exp / log / erf, and the whole sinusoidal
time-embedding subgraph (every ancestor of a Sin / Cos node): its arguments reach ``1000 * t``,
where fp16 has a spacing of 0.5 and bf16 of 4, which would scramble the embedding of t and h.

One pass (:func:`to_low`) does both fp16 and bf16: every float tensor produced by a converted
node is low precision, blocked nodes (the ops above, ops whose ONNX schema at the model's opset
has no such type -- e.g. Conv has no bf16 before opset 22 -- and the time embeddings) compute in
float32 and their outputs STAY float32 until a converted node reads them; float32 initializers
used only by converted nodes are stored in low precision (half the bytes); the graph's float
inputs and outputs stay float32 behind one Cast each.

Why not onnxconverter-common's ``convert_float_to_float16(keep_io_types=True, op_block_list=...)``:
it casts the output of EVERY blocked node back to fp16 (``insert_cast16_after_node``), so a chain
of blocked nodes still passes fp16-rounded values between its links; the chain ``1000 t`` ->
``* freqs`` -> ``cos`` then sees arguments rounded to a spacing of 0.5. Measured mean abs error
against torch fp32 (onnxconverter-common vs this pass): trained digits SideNet 4.8e-4 vs 1.2e-4,
trained digits DiT 1.36e-3 vs 1.28e-3, a random-weight test DiT 5.3e-3 vs 1.9e-4. It has no bf16
path either, so one pass for both keeps the rules in one place.
"""

from __future__ import annotations

from typing import Any, Iterable

import numpy as np

from ..base._deps import require
from ..base.errors import ConfigError
from ..runtime.bundles.format import PRECISIONS

SENSITIVE_OPS = (
    "LayerNormalization", "GroupNormalization", "InstanceNormalization", "BatchNormalization",
    "ReduceMean", "ReduceSum", "ReduceSumSquare", "ReduceL2", "ReduceLogSumExp",
    "Softmax", "LogSoftmax", "Pow", "Sqrt", "Reciprocal", "Exp", "Log", "Erf", "Sin", "Cos",
    "Range", "CumSum", "Resize", "Upsample", "TopK", "NonMaxSuppression", "RoiAlign",
)
# Nodes that pass a tensor through whatever its type, or whose output type an attribute fixes.
_NEUTRAL = ("Cast", "Shape", "Size", "Constant", "ConstantOfShape")
_CONTROL_FLOW = ("If", "Loop", "Scan")
_TYPE_STR = {"fp16": "tensor(float16)", "bf16": "tensor(bfloat16)"}
FP16_MAX = 65504.0


def variant_file(base: str, precision: str) -> str:
    """``backbone.onnx`` -> ``backbone.fp16.onnx`` (fp32 keeps the base name)."""
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown precision {precision!r}; choose from {', '.join(PRECISIONS)}")
    return base if precision == "fp32" else base.replace(".onnx", f".{precision}.onnx")


def parse_precisions(values: Iterable[str]) -> list[str]:
    """'fp16,bf16' and repeated values -> ['fp32', 'fp16', 'bf16'] (fp32 always, first, no repeats)."""
    out = ["fp32"]
    for value in values:
        for p in (v.strip().lower() for v in str(value).split(",")):
            if p and p not in PRECISIONS:
                raise ConfigError(f"unknown precision {p!r}; choose from {', '.join(PRECISIONS)}")
            if p and p not in out:
                out.append(p)
    return out


def convert(model: Any, precision: str, keep: Iterable[str] = ()) -> Any:
    """The ``precision`` variant of an fp32 ``onnx.ModelProto`` (fp32 returns it unchanged); ``keep``: see to_low."""
    if precision == "fp32":
        return model
    if precision not in _TYPE_STR:
        raise ConfigError(f"unknown precision {precision!r}; choose from {', '.join(PRECISIONS)}")
    return to_low(model, precision, keep)


def time_embedding_nodes(graph: Any) -> set[str]:
    """Names of the nodes feeding any Sin / Cos (transitively): the sinusoidal embeddings of t and h."""
    producer = {out: node for node in graph.node for out in node.output}
    todo = [node for node in graph.node if node.op_type in ("Sin", "Cos")]
    seen: set[str] = set()
    while todo:
        node = todo.pop()
        if node.name in seen:
            continue
        seen.add(node.name)
        todo.extend(producer[i] for i in node.input if i in producer)
    return seen


def scoped_nodes(graph: Any, scopes: Iterable[str]) -> set[str]:
    """Names of the nodes the dynamo exporter recorded inside a module whose path fully matches one of
    the ``scopes`` regexes (its ``pkg.torch.onnx.name_scopes`` metadata, e.g. ``transformer_blocks.0.attn1``)."""
    import json
    import re

    patterns = [re.compile(p) for p in scopes]
    out = set()
    for node in graph.node if patterns else ():
        meta = {p.key: p.value for p in node.metadata_props}
        try:
            names = json.loads(meta.get("pkg.torch.onnx.name_scopes", "[]").replace("'", '"'))
        except ValueError:
            continue
        if any(p.fullmatch(str(n)) for p in patterns for n in names):
            out.add(node.name)
    return out


def to_low(model: Any, precision: str, keep: Iterable[str] = ()) -> Any:
    """fp16 / bf16 variant of an fp32 model; float32 I/O (see the module docstring for the rules).

    ``keep``: module-path regexes whose nodes also compute in float32 (:func:`scoped_nodes`), for
    blocks a model runs in float32 on purpose (Sana's linear attention)."""
    onnx = require("onnx")
    model = _named(model)
    graph = model.graph
    if any(node.op_type in _CONTROL_FLOW for node in graph.node):
        raise ConfigError(f"{precision} conversion does not handle control flow (If/Loop/Scan); export fp32 only")
    types = _elem_types(model)
    _route_outputs_through_casts(graph, types)
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    blocked = time_embedding_nodes(graph) | scoped_nodes(graph, keep) | {
        n.name for n in graph.node
        if n.op_type in SENSITIVE_OPS or not _schema_allows(n, opset, types, _TYPE_STR[precision])
    }
    low_t = onnx.TensorProto.FLOAT16 if precision == "fp16" else onnx.TensorProto.BFLOAT16
    low_init = _low_initializers(graph, blocked)
    _insert_casts(graph, types, blocked, low_init, low_t)
    _store_low(graph, low_init, precision)
    del graph.value_info[:]  # stale float32 entries; onnxruntime and TensorRT infer the rest
    return onnx.shape_inference.infer_shapes(model)


def _named(model: Any) -> Any:
    """A copy of ``model`` in which every node has a unique name (block lists go by name)."""
    onnx = require("onnx")
    model = onnx.ModelProto.FromString(model.SerializeToString())
    used: set[str] = set()
    for i, node in enumerate(model.graph.node):
        if not node.name or node.name in used:
            node.name = f"{node.op_type}_{i}"
        used.add(node.name)
    return model


def _schema_allows(node: Any, opset: int, types: dict[str, int], type_str: str) -> bool:
    """True when the op's schema at ``opset`` accepts ``type_str`` for every float input."""
    onnx = require("onnx")
    if node.domain not in ("", "ai.onnx"):
        return False
    try:
        schema = onnx.defs.get_schema(node.op_type, opset)
    except onnx.defs.SchemaError:
        return False
    allowed = {tc.type_param_str: tc.allowed_type_strs for tc in schema.type_constraints}
    for i, name in enumerate(node.input):
        if not name or types.get(name) != onnx.TensorProto.FLOAT or not schema.inputs:
            continue
        formal = schema.inputs[min(i, len(schema.inputs) - 1)].type_str
        if type_str not in allowed.get(formal, [formal]):
            return False
    return True


def _converts(node: Any, blocked: set[str]) -> bool:
    return node.name not in blocked and node.op_type not in _NEUTRAL


def _elem_types(model: Any) -> dict[str, int]:
    """Element type of every tensor of the fp32 graph. onnx's inference leaves some outputs untyped
    (e.g. GroupNormalization-21 in onnx 1.23); those follow the op schema's type variable."""
    onnx = require("onnx")
    graph = onnx.shape_inference.infer_shapes(model).graph
    vis = list(graph.input) + list(graph.output) + list(graph.value_info)
    types = {v.name: v.type.tensor_type.elem_type for v in vis if v.type.tensor_type.elem_type}
    types.update({t.name: t.data_type for t in graph.initializer})
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    for node in graph.node:
        for j, out in enumerate(node.output):
            if out and out not in types:
                types[out] = _schema_output_type(node, j, types, opset)
    return types


def _schema_output_type(node: Any, j: int, types: dict[str, int], opset: int) -> int:
    """Output j's type from an input that shares its type variable in the op's schema."""
    onnx = require("onnx")
    try:
        schema = onnx.defs.get_schema(node.op_type, opset, node.domain)
        formal = schema.outputs[min(j, len(schema.outputs) - 1)].type_str
        ins = schema.inputs
        for i, name in enumerate(node.input):
            if name in types and ins and ins[min(i, len(ins) - 1)].type_str == formal:
                return types[name]
    except (onnx.defs.SchemaError, IndexError):
        pass
    raise ConfigError(f"precision conversion: the type of {node.output[j]!r} ({node.op_type}) could not be inferred")


def _route_outputs_through_casts(graph: Any, types: dict[str, int]) -> None:
    """Graph output ``o`` becomes ``Cast(o__inner, to=FLOAT)`` so converted producers may write low precision."""
    onnx = require("onnx")
    float_t = onnx.TensorProto.FLOAT
    for out in graph.output:
        if out.type.tensor_type.elem_type != float_t:
            continue
        inner = f"{out.name}__inner"
        types[inner] = float_t
        for node in graph.node:
            node.output[:] = [inner if o == out.name else o for o in node.output]
            node.input[:] = [inner if i == out.name else i for i in node.input]
        graph.node.append(onnx.helper.make_node("Cast", [inner], [out.name], to=float_t, name=f"{out.name}__to_fp32"))


def _low_initializers(graph: Any, blocked: set[str]) -> set[str]:
    """Float initializers whose every consumer is a converted node: stored in low precision directly."""
    onnx = require("onnx")
    out = {t.name for t in graph.initializer if t.data_type == onnx.TensorProto.FLOAT}
    for node in graph.node:
        if not _converts(node, blocked):
            out -= set(node.input)
    return out


def _insert_casts(graph: Any, types: dict[str, int], blocked: set[str], low: set[str], low_t: int) -> None:
    """Walk the (topologically sorted) nodes; give each float input the precision its node computes in."""
    onnx = require("onnx")
    float_t = onnx.TensorProto.FLOAT
    low = set(low)
    casts: dict[tuple[str, int], str] = {}
    nodes = []

    def cast(name: str, to: int) -> str:
        if (name, to) not in casts:
            out = f"{name}__{'low' if to == low_t else 'fp32'}"
            nodes.append(onnx.helper.make_node("Cast", [name], [out], to=to, name=f"{out}__cast"))
            casts[(name, to)] = out
        return casts[(name, to)]

    for node in graph.node:
        convert = _converts(node, blocked)
        if node.op_type not in _NEUTRAL:
            for i, name in enumerate(node.input):
                if name and types.get(name) == float_t and (name in low) != convert:
                    node.input[i] = cast(name, low_t if convert else float_t)
        if convert:
            low.update(o for o in node.output if types.get(o) == float_t)
        nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)


def _store_low(graph: Any, names: set[str], precision: str) -> None:
    """Replace the float32 initializers in ``names`` by fp16 / bf16 ones (round to nearest even)."""
    onnx = require("onnx")
    for i, tensor in enumerate(graph.initializer):
        if tensor.name in names:
            a = onnx.numpy_helper.to_array(tensor).astype(np.float32)
            graph.initializer[i].CopyFrom(low_tensor(a, tensor.name, precision))


def low_tensor(a: np.ndarray, name: str, precision: str) -> Any:
    """float32 array -> fp16 / bf16 ``TensorProto``; fp16 saturates at +-65504 instead of overflowing."""
    onnx = require("onnx")
    a = np.ascontiguousarray(a, np.float32)
    if precision == "fp16":
        t = onnx.numpy_helper.from_array(np.clip(a, -FP16_MAX, FP16_MAX).astype(np.float16), name)
        return t
    bits = a.view(np.uint32).astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    t = onnx.TensorProto(name=name, data_type=onnx.TensorProto.BFLOAT16, dims=list(a.shape))
    t.raw_data = rounded.tobytes()
    return t
