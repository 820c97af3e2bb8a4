"""runtime/bundles/onnx_scan.py: the numpy-only ONNX reader behind inspect's graph checks and the bundle's
external-data guard. A damaged graph is a ScanError (one line for the CLI), never ``BufferError: cannot
close exported pointers exist`` from the memory map; a real graph reads as onnx itself reads it."""

from __future__ import annotations

import gc

import numpy as np
import pytest

from anchorflow.runtime.bundles import onnx_scan

from _bundles import ROOT

onnx = pytest.importorskip("onnx")

GRAPH = ROOT / "bundle" / "backbone.onnx"


def _damaged() -> dict[str, bytes]:
    good = GRAPH.read_bytes()
    return {
        "garbage": b"not onnx",                     # wire type 6: refused on the first key
        "truncated": good[: len(good) // 2],        # a field runs past the end, deep inside the graph
        "overlong-varint": b"\x3a" + b"\xff" * 12,  # graph field, a size varint that never ends
        "no-graph": b"\x08\x07",                    # ir_version only
        "two-graphs": b"\x3a\x00\x3a\x00",
        "length-where-int": b"\x3a\x08\x5a\x06\x12\x04\x0a\x02\x10\x01",  # dtype given as bytes
    }


@pytest.mark.parametrize("kind", list(_damaged()))
def test_a_damaged_graph_is_one_scan_error_and_the_map_is_closed(tmp_path, kind, monkeypatch):
    path = tmp_path / "g.onnx"
    path.write_bytes(_damaged()[kind])
    # the map must close by itself: no view left alive, not even one a collection would free
    monkeypatch.setattr(gc, "collect", lambda *a: pytest.fail("a view of the map outlived the scan"))
    gc.disable()
    try:
        if kind == "length-where-int":  # malformed but harmless: only ints and strings reach the result
            got = onnx_scan.scan(path)
            assert all(isinstance(d, (int, str)) or d is None for _, d, _ in got.inputs)
        else:
            with pytest.raises(onnx_scan.ScanError) as info:
                onnx_scan.scan(path)
            # a fresh error: no BufferError, and no parser frames (holding map slices) chained to it
            assert info.value.__context__ is None and info.value.__cause__ is None
            assert "\n" not in str(info.value) and str(info.value)
    finally:
        gc.enable()
    path.write_bytes(b"")  # not held open: the file can be rewritten and removed at once
    path.unlink()


def test_a_real_graph_reads_as_onnx_reads_it():
    """Independent truth: onnx's own protobuf parser on the bundled digits backbone."""
    got = onnx_scan.scan(GRAPH)
    model = onnx.load(str(GRAPH))

    def io(values):
        out = []
        for v in values:
            t = v.type.tensor_type
            dims = [d.dim_value if d.HasField("dim_value") else d.dim_param if d.HasField("dim_param") else "?"
                    for d in t.shape.dim]
            out.append((v.name, onnx_scan.ELEM[t.elem_type], dims))
        return out

    assert got.inputs == io(model.graph.input) and got.outputs == io(model.graph.output)
    floats = [onnx.numpy_helper.to_array(t) for t in model.graph.initializer if t.data_type in (1, 10, 11)]
    assert got.weights == sum(a.size for a in floats) > 0
    assert got.zeros == sum(int(np.count_nonzero(a == 0)) for a in floats)
    assert got.nonfinite == [] and got.locations == []
