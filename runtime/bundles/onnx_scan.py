"""What an ONNX file holds, read from its protobuf bytes without onnx or onnxruntime (numpy only).

:func:`scan` walks a ``ModelProto`` (graph, nested sub-graphs, functions) and returns its graph
inputs and outputs (name, dtype, shape), every external-data location an initializer or constant
points to, and cheap statistics over the inline weights (non-finite values, zeros). The bundle
reader uses it to refuse a graph whose external data leaves the bundle before onnxruntime opens
it (onnxruntime follows any location, ``../`` and absolute paths included); ``inspect`` and
``verify`` use it to check a graph against bundle.json's declaration.

Only the protobuf wire format is parsed (varints, fixed 32/64-bit, length-delimited), with the
ONNX field numbers of ``onnx.proto3``; anything else is a malformed file (:class:`ScanError`).
"""

from __future__ import annotations

import mmap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

MAX_DEPTH = 32  # sub-graphs nested deeper than this are refused (a hostile file, not a model)
# TensorProto.DataType -> the dtype names of bundle.json
ELEM = {1: "float32", 2: "uint8", 3: "int8", 5: "int16", 6: "int32", 7: "int64", 9: "bool", 10: "float16",
        11: "float64", 16: "bfloat16"}
_FLOATS = {1: np.float32, 10: np.float16, 11: np.float64}


class ScanError(ValueError):
    """The bytes are not a well-formed ONNX model."""


@dataclass
class Scan:
    inputs: list = field(default_factory=list)  # (name, dtype, [dims: int or str])
    outputs: list = field(default_factory=list)
    locations: list = field(default_factory=list)  # external-data locations, as written in the file
    weights: int = 0  # float weight values seen inline
    zeros: int = 0
    nonfinite: list = field(default_factory=list)  # names of initializers holding NaN / Inf


def _varint(buf, i: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        if i >= len(buf) or shift > 63:
            raise ScanError("truncated or overlong varint")
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, i
        shift += 7


def fields(buf) -> Iterator[tuple[int, int, object]]:
    """(field number, wire type, value) of one message: an int, or a memoryview for wire type 2."""
    i, n = 0, len(buf)
    while i < n:
        key, i = _varint(buf, i)
        num, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire == 1:
            value, i = int.from_bytes(buf[i:i + 8], "little"), i + 8
        elif wire == 5:
            value, i = int.from_bytes(buf[i:i + 4], "little"), i + 4
        elif wire == 2:
            size, i = _varint(buf, i)
            if i + size > n:
                raise ScanError("a field runs past the end of the file (truncated)")
            value, i = buf[i:i + size], i + size
        else:
            raise ScanError(f"unsupported protobuf wire type {wire}")
        if i > n:
            raise ScanError("truncated message")
        yield num, wire, value


def _text(v) -> str:
    return bytes(v).decode("utf-8", "replace")


def _value_info(buf) -> tuple:
    name, dtype, dims = "", None, []
    for num, wire, v in fields(buf):
        if num == 1 and wire == 2:
            name = _text(v)
        elif num == 2 and wire == 2:  # TypeProto
            for n2, w2, t in fields(v):
                if n2 != 1 or w2 != 2:
                    continue  # not a tensor type
                for n3, w3, tt in fields(t):
                    if n3 == 1 and w3 == 0:
                        dtype = ELEM.get(tt, f"type{tt}")
                    elif n3 == 2 and w3 == 2:
                        for n4, w4, d in fields(tt):
                            if n4 != 1 or w4 != 2:
                                continue
                            dim: object = "?"
                            for n5, w5, dv in fields(d):
                                if n5 == 1 and w5 == 0:
                                    dim = dv
                                elif n5 == 2 and w5 == 2:
                                    dim = _text(dv)
                            dims.append(dim)
    return name, dtype, dims


def _tensor(buf, out: Scan, stats: bool) -> None:
    name, dtype, raw, packed, location, external = "", 0, None, None, None, False
    for num, wire, v in fields(buf):
        if num == 8 and wire == 2:
            name = _text(v)
        elif num == 2 and wire == 0:
            dtype = v
        elif num == 9 and wire == 2:
            raw = v
        elif num == 4 and wire == 2:
            packed = v
        elif num == 14 and wire == 0:
            external = v == 1
        elif num == 13 and wire == 2:
            entry = dict((n, _text(x)) for n, w, x in fields(v) if w == 2)
            if entry.get(1) == "location":
                location = entry.get(2, "")
    if external or location is not None:
        out.locations.append(location or "")
        return
    if not stats or dtype not in _FLOATS:
        return
    data = raw if raw is not None else (packed if dtype == 1 else None)
    if data is None or len(data) % np.dtype(_FLOATS[dtype]).itemsize:
        return
    arr = np.frombuffer(data, _FLOATS[dtype])
    out.weights += arr.size
    out.zeros += int(np.count_nonzero(arr == 0))
    if not np.all(np.isfinite(arr)):
        out.nonfinite.append(name)


def _sparse(buf, out: Scan, stats: bool) -> None:
    for num, wire, v in fields(buf):
        if num in (1, 2) and wire == 2:
            _tensor(v, out, stats and num == 1)


def _graph(buf, out: Scan, stats: bool, depth: int, top: bool) -> None:
    if depth > MAX_DEPTH:
        raise ScanError(f"sub-graphs nested more than {MAX_DEPTH} deep")
    for num, wire, v in fields(buf):
        if wire != 2:
            continue
        if num == 1:
            _node(v, out, stats, depth)
        elif num == 5:
            _tensor(v, out, stats)
        elif num == 15:
            _sparse(v, out, stats)
        elif top and num == 11:
            out.inputs.append(_value_info(v))
        elif top and num == 12:
            out.outputs.append(_value_info(v))


def _node(buf, out: Scan, stats: bool, depth: int) -> None:
    for num, wire, v in fields(buf):
        if num != 5 or wire != 2:
            continue
        for n2, w2, a in fields(v):  # AttributeProto
            if w2 != 2:
                continue
            if n2 in (5, 10):
                _tensor(a, out, stats)
            elif n2 in (22, 23):
                _sparse(a, out, stats)
            elif n2 in (6, 11):
                _graph(a, out, stats, depth + 1, False)


def scan_bytes(buf, stats: bool = True) -> Scan:
    """Scan a serialized ModelProto (bytes or memoryview)."""
    out, graphs = Scan(), 0
    buf = memoryview(buf)
    for num, wire, v in fields(buf):
        if num == 7 and wire == 2:
            graphs += 1
            _graph(v, out, stats, 0, True)
        elif num == 25 and wire == 2:  # FunctionProto: its nodes
            for n2, w2, node in fields(v):
                if n2 == 7 and w2 == 2:
                    _node(node, out, stats, 1)
    if graphs != 1:
        raise ScanError("no graph in the file" if not graphs else "more than one graph")
    return out


def scan(path: str | Path, stats: bool = True) -> Scan:
    """Scan an ONNX file (memory-mapped; weights are not copied).

    Every view of the map (the memoryview slices the parser yields, numpy arrays over weights) must be
    gone before the map closes, or ``mmap.close`` raises ``BufferError``. On success they are (the parser
    keeps none: only ints and strings reach :class:`Scan`); on a malformed file the exception's traceback
    holds the parser's frames and their slices, so the message is taken, the exception dropped, and a
    fresh :class:`ScanError` raised after the map is closed."""
    with open(path, "rb") as fh:
        size = fh.seek(0, 2)
        if size == 0:
            raise ScanError("the file is empty")
        mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        message = None
        try:
            with memoryview(mm) as view:
                try:
                    return scan_bytes(view, stats)
                except ScanError as exc:
                    message = str(exc)
                except (ValueError, TypeError, IndexError, OverflowError, RecursionError) as exc:
                    message = f"malformed protobuf ({type(exc).__name__}: {exc})"
        finally:
            _close(mm)
        raise ScanError(message)


def _close(mm: mmap.mmap) -> None:
    try:
        mm.close()
    except BufferError:  # a view still alive in a reference cycle: collect it, then close
        import gc

        gc.collect()
        mm.close()


def resolve_location(base: Path, loc: str) -> Path:
    """Where onnxruntime reads an external-data location: relative to the model file's folder."""
    return (Path(base) / loc).resolve()


def outside(folder: Path, locations: list, base: Path | None = None) -> list[str]:
    """The external-data locations (relative to ``base``, the model file's folder; default
    ``folder``) that are empty, absolute or resolve (symlinks included) outside ``folder``."""
    root = Path(folder).resolve()
    bad = []
    for loc in locations:
        try:
            target = resolve_location(base or root, loc) if loc else root
        except (OSError, ValueError):
            target = root
        if not loc or Path(loc).is_absolute() or root not in target.parents:
            bad.append(loc)
    return bad
