"""The bundle format (runtime/bundles/format.py) and the one condition rule (runtime/bundles/networks.py).

Truths: closed forms of hand-built ONNX graphs (``v = t x + y + sum_L e`` per row, ``delta = h (x - v)``),
so every output is known in numpy; bundle.json edits a user could make by hand, each refused with a
one-line CheckpointError naming the key. Time convention: t = 1 noise, t = 0 data.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper  # noqa: E402

from anchorflow.base.errors import CheckpointError, ConfigError  # noqa: E402
from anchorflow.runtime import solve  # noqa: E402
from anchorflow.runtime.bundles.load import load_bundle  # noqa: E402
from anchorflow.runtime.bundles.format import SCHEMA, file_record, read_bundle, write_bundle_json  # noqa: E402

STATE, EMB, NULL = (1, 2, 2), 3, 4
ROWS = {"backbone": (1, 4, 8), "sidenet": (1, 12, 24)}
TOL = 1e-5  # float32 sums of a few O(1) terms: ~10 ulps


def _unsq(name: str, out: str, axes: list) -> list:
    c = helper.make_tensor(f"{out}_ax", TensorProto.INT64, [len(axes)], axes)
    return [helper.make_node("Constant", [], [f"{out}_ax"], value=c), helper.make_node("Unsqueeze", [name, f"{out}_ax"], [out])]


def _graphs() -> dict:
    f = TensorProto.FLOAT
    state = lambda n: helper.make_tensor_value_info(n, f, ["batch", *STATE])  # noqa: E731
    vec = lambda n, t=f: helper.make_tensor_value_info(n, t, ["batch"])  # noqa: E731
    red = helper.make_tensor("red_ax", TensorProto.INT64, [2], [1, 2])
    nodes = [helper.make_node("Cast", ["y"], ["yf"], to=f), *_unsq("yf", "y4", [1, 2, 3]), *_unsq("t", "t4", [1, 2, 3]),
             helper.make_node("Constant", [], ["red_ax"], value=red),
             helper.make_node("ReduceSum", ["e", "red_ax"], ["es"], keepdims=0), *_unsq("es", "e4", [1, 2, 3]),
             helper.make_node("Mul", ["t4", "x"], ["tx"]), helper.make_node("Add", ["tx", "y4"], ["txy"]),
             helper.make_node("Add", ["txy", "e4"], ["v"])]
    e = helper.make_tensor_value_info("e", f, ["batch", "L", EMB])
    backbone = helper.make_graph(nodes, "backbone", [state("x"), vec("t"), vec("y", TensorProto.INT64), e], [state("v")])
    side_nodes = [*_unsq("h", "h4", [1, 2, 3]), helper.make_node("Sub", ["x", "v"], ["d"]),
                  helper.make_node("Mul", ["h4", "d"], ["delta"])]
    sidenet = helper.make_graph(side_nodes, "sidenet", [state("x"), state("v"), vec("t"), vec("h")], [state("delta")])
    return {n: helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)
            for n, g in (("backbone", backbone), ("sidenet", sidenet))}


def _decl(name: str, role: str, shape: list, dtype: str = "float32") -> dict:
    return {"name": name, "dtype": dtype, "shape": shape, "role": role, "per_row": True}


def make_bundle(folder: Path) -> Path:
    folder.mkdir(parents=True)
    inputs = {"backbone": [_decl("x", "state", ["batch", *STATE]), _decl("t", "time", ["batch"]),
                           _decl("y", "condition", ["batch"], "int64"), _decl("e", "condition", ["batch", "L", EMB])],
              "sidenet": [_decl("x", "state", ["batch", *STATE]), _decl("v", "velocity", ["batch", *STATE]),
                          _decl("t", "time", ["batch"]), _decl("h", "offset", ["batch"])]}
    networks = {}
    for name, model in _graphs().items():
        onnx.save(model, str(folder / f"{name}.onnx"))
        out = "v" if name == "backbone" else "delta"
        networks[name] = {**file_record(folder, f"{name}.onnx"), "inputs": inputs[name],
                          "outputs": [_decl(out, "velocity", ["batch", *STATE])],
                          "batch": dict(zip(("min", "opt", "max"), ROWS[name])),
                          "axes": {"L": {"min": 1, "opt": 4, "max": 6}} if name == "backbone" else {}}
    meta = {"schema": SCHEMA, "model": {"name": "toy", "state_shape": list(STATE), "num_classes": NULL,
                                        "null_label": NULL, "data_range": [-1.0, 1.0]},
            "time": {"map": "identity"}, "guidance": {"mode": "rows", "null": {"y": NULL}}, "networks": networks}
    write_bundle_json(folder, meta)
    return folder


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    return make_bundle(tmp_path_factory.mktemp("toy") / "bundle")


@pytest.fixture
def edited(toy, tmp_path):
    """edit(fn) -> a copy of the toy bundle whose bundle.json went through fn(meta)."""
    def edit(fn) -> Path:
        folder = Path(shutil.copytree(toy, tmp_path / "b"))
        meta = json.loads((folder / "bundle.json").read_text())
        fn(meta)
        (folder / "bundle.json").write_text(json.dumps(meta))
        return folder
    return edit


def v_true(x, t, y, e):
    return t[:, None, None, None] * x + y[:, None, None, None] + e.sum((1, 2))[:, None, None, None]


def test_declarations_are_read(toy):
    fmt = read_bundle(toy)
    bb = fmt.backbone
    assert [c.name for c in bb.conditions] == ["y", "e"] and bb.axis_range("L") == (1, 4, 6)
    assert bb.axis_range("batch") == (1, 4, 8) and fmt.guidance.mode == "rows" and fmt.guidance.null == {"y": NULL}


def test_velocity_feeds_conditions_and_fills_the_null_label(toy):
    b = load_bundle(toy, backend="ort-cpu")
    rng = np.random.default_rng(0)
    x, t = rng.standard_normal((3, *STATE)).astype(np.float32), rng.random(3).astype(np.float32)
    y, e = np.array([0, 1, 2]), rng.standard_normal((3, 5, EMB)).astype(np.float32)
    assert np.abs(b.velocity(x, t, {"y": y, "e": e}) - v_true(x, t, y, e)).max() <= TOL
    # y missing: the bundle's null label on every row; the SideNet takes no conditions and gets none
    assert np.abs(b.velocity(x, t, {"e": e}) - v_true(x, t, np.full(3, NULL), e)).max() <= TOL
    assert np.abs(b.sidenet(x, x, t, t, {"y": y, "e": e})).max() == 0
    with pytest.raises(ConfigError, match="needs the condition 'e'.*expects: y int64 .batch., e float32 .batch, L, 3."):
        b.velocity(x, t, {"y": y})
    with pytest.raises(ConfigError, match=r"input 'e' got shape \(3, 7, 3\).*L in 1..6"):
        b.velocity(x, t, {"y": y, "e": np.zeros((3, 7, EMB), np.float32)})


def test_calls_beyond_the_exported_rows_run_in_chunks(toy):
    b = load_bundle(toy, backend="ort-cpu")
    rng = np.random.default_rng(1)
    n = 19  # > max 8 rows: three chunks (8, 8, 3)
    x, t = rng.standard_normal((n, *STATE)).astype(np.float32), rng.random(n).astype(np.float32)
    y, e = rng.integers(0, NULL, n), rng.standard_normal((n, 2, EMB)).astype(np.float32)
    assert np.abs(b.velocity(x, t, {"y": y, "e": e}) - v_true(x, t, y, e)).max() <= TOL


def test_solve_doubles_every_condition_for_guidance_rows_and_broadcasts(toy, counting):
    """Euler, 1 step, CFG s: x1 = x - (v_u + s (v_c - v_u)); the null text is one shared (1, L, D) row."""
    b = load_bundle(toy, backend="ort-cpu")
    rng = np.random.default_rng(2)
    x, y = rng.standard_normal((2, *STATE)).astype(np.float32), np.array([1, 3])
    e = rng.standard_normal((2, 4, EMB)).astype(np.float32)
    e_null = np.zeros((1, 4, EMB), np.float32)
    field = counting(b.velocity)
    s = 2.5
    out = solve("euler", field, x, 1, cond={"y": y, "e": e}, null_cond={"y": NULL, "e": e_null}, cfg_scale=s)
    call = field.calls[0]
    assert call["rows"] == 4 and call["cond"]["e"].shape == (4, 4, EMB) and list(call["y"]) == [1, 3, NULL, NULL]
    one = np.ones(2, np.float32)
    v_c, v_u = v_true(x, one, y, e), v_true(x, one, np.full(2, NULL), np.zeros_like(e))
    assert np.abs(out.x - (x - (v_u + s * (v_c - v_u)))).max() <= TOL
    with pytest.raises(ConfigError, match="null_cond lacks e"):
        solve("euler", field, x, 1, cond={"y": y, "e": e}, null_cond={"y": NULL}, cfg_scale=s)
    with pytest.raises(ConfigError, match="either y= .* or cond="):
        solve("euler", field, x, 1, y=y, cond={"e": e})


def test_sidenet_rows_tile_every_condition():
    from anchorflow.runtime import GuidedField

    seen = {}

    def side(x, v, t, h, cond):
        seen.update(rows=x.shape[0], h=h, e=cond["e"])
        return np.zeros_like(x)

    e = np.arange(2 * 3, dtype=np.float32).reshape(2, 3)
    f = GuidedField(lambda x, t, c: np.zeros_like(x), 2, {"e": e}, {"e": -np.ones(3, np.float32)}, cfg_scale=2.0,
                    sidenet=side)
    x = np.zeros((2, 1), np.float32)
    f.side(x, f.raw(x, 1.0), 1.0, [0.1, 0.2])
    rows = np.concatenate([e, -np.ones((2, 3))])  # [cond; null]
    assert seen["rows"] == 8 and np.array_equal(seen["e"], np.concatenate([rows, rows]))
    assert np.allclose(seen["h"], [0.1] * 4 + [0.2] * 4)


@pytest.mark.parametrize("edit, match", [
    (lambda m: m["model"].__setitem__("state_shape", [1, 3, 3]), "state_shape .* differs from the backbone's x input"),
    (lambda m: m["model"].__setitem__("null_label", 9), r"model.null_label is 9, expected an integer in 0..4"),
    (lambda m: m["networks"]["backbone"]["batch"].__setitem__("max", "64"), "networks.backbone.batch.max is '64'"),
    (lambda m: m["networks"]["backbone"]["batch"].__setitem__("min", -2), "networks.backbone.batch.min is -2"),
    (lambda m: m["networks"]["backbone"].pop("file"), "networks.backbone.file is None, expected a non-empty string"),
    (lambda m: m["networks"]["sidenet"].__setitem__("file", "../../etc/passwd"), "outside the bundle folder"),
    (lambda m: m["networks"]["backbone"]["inputs"][3].__setitem__("name", "text"), r"takes inputs \['e', 't', 'x', 'y'\]"),
    (lambda m: m["networks"]["backbone"]["inputs"][2].__setitem__("dtype", "float32"), "input 'y' is int64"),
    (lambda m: m["networks"]["backbone"]["axes"].clear(), r"networks.backbone.axes is \[\], expected a range for every named axis \(L\)"),
    (lambda m: m["guidance"].__setitem__("mode", "cfg"), "guidance.mode is 'cfg'"),
    (lambda m: m["networks"]["backbone"].__setitem__("sha256", "abc"), "networks.backbone.sha256 is 'abc'"),
])
def test_hand_edited_bundle_json_is_refused_in_one_line(edited, edit, match):
    folder = edited(edit)
    with pytest.raises(CheckpointError, match=match) as info:
        load_bundle(folder, backend="ort-cpu")
    assert "\n" not in str(info.value)


def test_a_v1_bundle_reads_as_v2(tmp_path):
    """The bundled digits bundle.json as the /1 exporter wrote it (tests/data, kept from before its
    re-export as /2): guidance, time map and input roles are inferred."""
    import shutil
    from pathlib import Path

    shutil.copy(Path(__file__).parent / "data" / "digits_bundle_v1.json", tmp_path / "bundle.json")
    fmt = read_bundle(tmp_path)
    assert fmt.schema == "anchorflow.bundle/1" and fmt.guidance.null == {"y": 10} and fmt.time.map == "identity"
    assert [(i.name, i.role) for i in fmt.networks["sidenet"].inputs] == [
        ("x", "state"), ("v", "velocity"), ("t", "time"), ("h", "offset"), ("y", "condition")]
