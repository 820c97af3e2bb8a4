"""The schema of ``bundle.json`` as checks: one pass over the whole file when it is read.

Each fault raises CheckpointError naming the key path (``networks.backbone.batch.max``), what
was found and what was expected, so a hand-edited file is refused before any ONNX session opens.
See :mod:`anchorflow.runtime.bundles.format` for the layout. Torch-free, no jsonschema needed.
"""

from __future__ import annotations

import math
import re
from typing import Any

from ...base.errors import CheckpointError

_SHA = re.compile(r"^[0-9a-f]{64}$")
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*$")
MAX_INT = 2**31 - 1  # sizes, batch ranges and labels: a larger number is not a model's (and overflows int32)
DTYPES = ("float32", "float16", "bfloat16", "int64", "int32", "bool")
ROLES = ("state", "time", "velocity", "offset", "condition")
GUIDANCE_MODES = ("rows", "embedded", "none")
TIME_MAPS = ("identity", "scale", "flip")


class _Checker:
    def __init__(self, where: Any) -> None:
        self.where = where

    def fail(self, key: str, found: Any, expected: str) -> None:
        shown = repr(found)
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
        raise CheckpointError(f"{self.where}: {key} is {shown}, expected {expected}; re-export the bundle "
                              "(or undo the edit to bundle.json)")

    def dict(self, obj: Any, key: str) -> dict:
        if not isinstance(obj, dict):
            self.fail(key, obj, "an object")
        return obj

    def int(self, obj: Any, key: str, lo: int | None = None) -> int:
        if isinstance(obj, bool) or not isinstance(obj, int) or (lo is not None and obj < lo) or abs(obj) > MAX_INT:
            self.fail(key, obj, "an integer" + (f" in {lo}..{MAX_INT}" if lo is not None else f" of at most {MAX_INT}"))
        return obj

    def number(self, obj: Any, key: str, expected: str = "a finite number") -> float:
        if isinstance(obj, bool) or not isinstance(obj, (int, float)) or not math.isfinite(obj) or abs(obj) > 1e30:
            self.fail(key, obj, expected)
        return obj

    def str(self, obj: Any, key: str) -> str:
        if not isinstance(obj, str) or not obj:
            self.fail(key, obj, "a non-empty string")
        return obj

    def range(self, obj: Any, key: str) -> tuple[int, int, int]:
        r = self.dict(obj, key)
        lo, opt, hi = (self.int(r.get(k), f"{key}.{k}", 1) for k in ("min", "opt", "max"))
        if not lo <= opt <= hi:
            self.fail(key, obj, "min <= opt <= max")
        return lo, opt, hi

    def file(self, obj: Any, key: str) -> None:
        e = self.dict(obj, key)
        self.str(e.get("file"), f"{key}.file")
        if not isinstance(e.get("sha256"), str) or not _SHA.match(e["sha256"]):
            self.fail(f"{key}.sha256", e.get("sha256"), "64 lowercase hex digits")
        for i, extra in enumerate(e.get("external_data") or []):
            self.file(extra, f"{key}.external_data[{i}]")


def _tensor(c: _Checker, obj: Any, key: str, v1: bool) -> str:
    e = c.dict(obj, key)
    name = c.str(e.get("name"), f"{key}.name")
    if not _NAME.match(name):
        c.fail(f"{key}.name", name, "an identifier")
    if e.get("dtype", "float32") not in DTYPES:
        c.fail(f"{key}.dtype", e.get("dtype"), "one of " + ", ".join(DTYPES))
    shape = e.get("shape")
    if not isinstance(shape, list):
        c.fail(f"{key}.shape", shape, "a list of sizes and axis names")
    for j, d in enumerate(shape):
        if isinstance(d, str):
            if not _NAME.match(d):
                c.fail(f"{key}.shape[{j}]", d, "an axis name")
        else:
            c.int(d, f"{key}.shape[{j}]", 1)
    if not v1 and e.get("role") not in ROLES:
        c.fail(f"{key}.role", e.get("role"), "one of " + ", ".join(ROLES))
    if "per_row" in e and not isinstance(e["per_row"], bool):
        c.fail(f"{key}.per_row", e["per_row"], "true or false")
    return name


def _network(c: _Checker, name: str, obj: Any, v1: bool) -> None:
    key = f"networks.{name}"
    e = c.dict(obj, key)
    c.file(e, key)
    names = []
    for part in ("inputs", "outputs"):
        items = e.get(part)
        if not isinstance(items, list) or not items:
            c.fail(f"{key}.{part}", items, "a non-empty list")
        names += [_tensor(c, item, f"{key}.{part}[{i}]", v1) for i, item in enumerate(items)]
    if len(set(names)) != len(names):
        c.fail(f"{key}.inputs", names, "distinct tensor names")
    if e.get("batch") is not None:
        c.range(e["batch"], f"{key}.batch")
    axes = c.dict(e.get("axes") or {}, f"{key}.axes")
    used = {d for item in e["inputs"] for d in item["shape"] if isinstance(d, str)} - {"batch"}
    for axis, r in axes.items():
        c.range(r, f"{key}.axes.{axis}")
    if not v1 and used - set(axes):
        c.fail(f"{key}.axes", sorted(axes), f"a range for every named axis ({', '.join(sorted(used))})")
    roles = [item.get("role") for item in e["inputs"]]
    if not v1 and ("state" not in roles or "time" not in roles):
        c.fail(f"{key}.inputs", roles, "one input of role 'state' and one of role 'time'")
    for precision, variant in c.dict(e.get("precisions") or {}, f"{key}.precisions").items():
        if precision not in ("fp16", "bf16", "int8", "fp8"):  # quant: int8 / fp8 (export/quantize.py)
            c.fail(f"{key}.precisions", precision, "fp16, bf16, int8 or fp8")
        c.file(variant, f"{key}.precisions.{precision}")


def _model(c: _Checker, obj: Any, v1: bool) -> None:
    m = c.dict(obj, "model")
    shape = m.get("state_shape")
    if not isinstance(shape, list) or not shape:
        c.fail("model.state_shape", shape, "a non-empty list of positive integers")
    for j, d in enumerate(shape):
        c.int(d, f"model.state_shape[{j}]", 1)
    classes = m.get("num_classes")
    if v1 or classes is not None:
        c.int(classes, "model.num_classes", 0)
    null = m.get("null_label")
    if null is not None:
        c.int(null, "model.null_label", 0)
        if classes is not None and null > classes:
            c.fail("model.null_label", null, f"an integer in 0..{classes} (num_classes)")
    data_range = m.get("data_range")
    if data_range is not None and (not isinstance(data_range, list) or len(data_range) != 2):
        c.fail("model.data_range", data_range, "[lo, hi]")
    for j, v in enumerate(data_range or ()):
        c.number(v, f"model.data_range[{j}]", "[lo, hi] with finite numbers")
    if data_range is not None and not data_range[0] < data_range[1]:
        c.fail("model.data_range", data_range, "[lo, hi] with lo < hi")


def _guidance(c: _Checker, meta: dict) -> None:
    g = c.dict(meta.get("guidance") or {"mode": "none"}, "guidance")
    if g.get("mode") not in GUIDANCE_MODES:
        c.fail("guidance.mode", g.get("mode"), "rows, embedded or none")
    if g["mode"] == "embedded":
        inputs = [i["name"] for i in meta["networks"]["backbone"]["inputs"]]
        if g.get("input") not in inputs:
            c.fail("guidance.input", g.get("input"), f"a backbone input ({', '.join(inputs)})")
    null = c.dict(g.get("null") or {}, "guidance.null")
    for name, value in null.items():
        c.number(value, f"guidance.null.{name}", "a finite number (tensors are given with --null-cond)")
    t = c.dict(meta.get("time") or {"map": "identity"}, "time")
    if t.get("map") not in TIME_MAPS:
        c.fail("time.map", t.get("map"), "identity, scale or flip")
    if t["map"] == "scale" and c.number(t.get("scale"), "time.scale", "a positive finite number") <= 0:
        c.fail("time.scale", t.get("scale"), "a positive finite number")


def validate_meta(meta: dict, v1: bool, where: Any) -> None:
    """Check a whole bundle.json dict (schema /1 when ``v1``); raises CheckpointError at the first fault."""
    c = _Checker(where)
    _model(c, meta.get("model"), v1)
    networks = c.dict(meta.get("networks"), "networks")
    if networks.get("backbone") is None:
        c.fail("networks", sorted(networks), "a 'backbone' entry")
    for name, entry in networks.items():
        if name not in ("backbone", "sidenet"):
            c.fail("networks", name, "backbone or sidenet")
        if entry is not None:
            _network(c, name, entry, v1)
    if not v1:
        _guidance(c, meta)
    classes = meta["model"].get("num_classes")
    for name, entry in networks.items():
        for key in ("checkpoint", "source", "validation", "cleanup"):
            if entry is not None and entry.get(key) is not None:
                c.dict(entry[key], f"networks.{name}.{key}")
    arch = ((networks["backbone"].get("checkpoint") or {}).get("arch") or {})
    if isinstance(arch, dict) and isinstance(arch.get("num_classes"), int) and classes != arch["num_classes"]:
        c.fail("model.num_classes", classes, f"{arch['num_classes']} (the checkpoint's num_classes)")
