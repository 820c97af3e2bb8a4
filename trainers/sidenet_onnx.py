"""Export a SideNet into an existing bundle, its conditions declared like the backbone's.

``add_sidenet(bundle_dir, sidenet_dir)``: the SideNet ``delta = S(x, v, t, h, *conds)``
(BA-solver, arXiv 2601.21542; t = 1 noise, t = 0 data, h > 0 toward data) becomes
``sidenet.onnx`` with inputs x, v (role state / velocity, the SideNet's fixed state shape),
t (time), h (offset) and exactly the conditions its arch names (``cond_inputs``), each declared
as the backbone declares it in bundle.json (dtype, shape with named axes such as the text
length ``L``, per_row). So the runtime (:mod:`anchorflow.runtime.networks`) feeds it from the
same ``cond`` dict as the backbone, and a SideNet conditioned on nothing gets no conditions.
Dynamic axes: ``batch`` (1 .. 3x the backbone's rows: the BA forward probe) and the named axes
of those conditions (the backbone's ranges). Parity: onnxruntime against torch at 2 batch sizes
(max abs error <= 1e-4), refused otherwise, before bundle.json changes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CheckpointError, ConfigError

FILE = "sidenet.onnx"
TOL = 1e-4  # fp32 parity bound, as for the backbone


def declaration(side: Any, backbone_inputs: list[dict]) -> list[dict]:
    """bundle.json ``inputs`` of the SideNet (see the module docstring); ``backbone_inputs`` the
    backbone's declared inputs (bundle.json's, or an adapter spec's ``inputs()``)."""
    state = ["batch", *(int(s) for s in side.state_shape)]
    decls = [{"name": "x", "dtype": "float32", "shape": state, "role": "state", "per_row": True},
             {"name": "v", "dtype": "float32", "shape": state, "role": "velocity", "per_row": True},
             {"name": "t", "dtype": "float32", "shape": ["batch"], "role": "time", "per_row": True},
             {"name": "h", "dtype": "float32", "shape": ["batch"], "role": "offset", "per_row": True}]
    backbone = {i["name"]: i for i in backbone_inputs}
    for name in side.cond_inputs:
        if name not in backbone:
            raise CheckpointError(f"the SideNet is conditioned on {name!r}, which the backbone does not take "
                                  f"({', '.join(backbone)}); it belongs to another backbone")
        d = backbone[name]
        decls.append({"name": name, "dtype": d["dtype"], "shape": list(d["shape"]), "role": "condition",
                      "per_row": bool(d.get("per_row", True))})
    return decls


def _example(decls: list[dict], rows: int, sizes: dict, rng: np.random.Generator, num_classes: int) -> dict:
    out = {}
    for d in decls:
        shape = tuple(rows if a == "batch" else sizes[a] if isinstance(a, str) else int(a) for a in d["shape"])
        if d["name"] == "t":
            out["t"] = rng.random(shape).astype(np.float32)
        elif d["name"] == "h":
            out["h"] = (rng.random(shape) - (1.0 - out["t"])).astype(np.float32)
        elif d["dtype"].startswith("int"):
            out[d["name"]] = rng.integers(0, max(num_classes, 1) + 1, shape).astype(d["dtype"])
        else:
            out[d["name"]] = rng.standard_normal(shape).astype(np.float32)
    return out


def trace(side: Any, decls: list[dict], axes: dict, top_rows: int) -> Any:
    """``torch.onnx.export(dynamo=True)`` of the SideNet with the declared inputs -> ModelProto."""
    import torch

    from ..export.onnx_export import DEFAULT_OPSET, _quiet, check_opset

    dims = {"batch": torch.export.Dim("batch", min=1, max=max(top_rows, 3))}
    sizes = {}
    for d in decls:
        for a in d["shape"]:
            if isinstance(a, str) and a != "batch" and a not in dims:
                lo, opt, hi = axes[a]
                dims[a] = torch.export.Dim(a, min=lo, max=hi)
                sizes[a] = max(opt, 2) if hi >= 2 else opt
    ex = _example(decls, 3, sizes, np.random.default_rng(0), int(side.num_classes))
    args = tuple(torch.from_numpy(ex[d["name"]]) for d in decls)
    shapes = tuple({j: dims[a] for j, a in enumerate(d["shape"]) if isinstance(a, str)} for d in decls)
    try:
        with _quiet(), torch.no_grad():
            program = torch.onnx.export(side.eval(), args, None, input_names=[d["name"] for d in decls],
                                        output_names=["delta"], dynamo=True, dynamic_shapes=shapes,
                                        opset_version=check_opset(DEFAULT_OPSET), external_data=False, verbose=False)
    except Exception as exc:  # torch.export raises many types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"torch.onnx.export failed for the SideNet: {first[:400]}") from exc
    return program.model_proto, sizes


def _parity(side: Any, data: bytes, decls: list[dict], sizes: dict) -> float:
    import onnxruntime as ort
    import torch

    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    rng, worst = np.random.default_rng(1), 0.0
    for rows in (1, 5):
        feeds = _example(decls, rows, sizes, rng, int(side.num_classes))
        with torch.no_grad():
            want = side(*(torch.from_numpy(feeds[d["name"]]) for d in decls)).numpy()
        got = sess.run(["delta"], feeds)[0]
        worst = max(worst, float(np.abs(got - want).max()))
    if not worst <= TOL:
        raise CheckpointError(f"SideNet export refused: onnxruntime differs from torch by {worst:.2e} (allowed {TOL})")
    return worst


def export_sidenet(side: Any, backbone_inputs: list[dict], axes: dict, top_rows: int) -> tuple[bytes, dict]:
    """The SideNet as ONNX bytes and its network entry (without file / sha256), parity-checked."""
    decls = declaration(side, backbone_inputs)
    proto, sizes = trace(side, decls, axes, top_rows)
    data = proto.SerializeToString()
    err = _parity(side, data, decls, sizes)
    used = {a for d in decls for a in d["shape"] if isinstance(a, str) and a != "batch"}
    entry = {"inputs": decls,
             "outputs": [{"name": "delta", "dtype": "float32", "shape": decls[0]["shape"], "role": "velocity",
                          "per_row": True}],
             "batch": {"min": 1, "opt": top_rows, "max": top_rows},
             "axes": {a: dict(zip(("min", "opt", "max"), map(int, axes[a]))) for a in sorted(used)},
             "parity_max_abs": err}
    return data, entry


def add_sidenet(bundle_dir: str | Path, sidenet_dir: str | Path) -> dict:
    """Export the SideNet checkpoint into the bundle (see the module docstring); returns its network entry."""
    from .. import _io
    from ..runtime.bundle_format import file_record, read_bundle, write_bundle_json
    from .checkpoint import load_checkpoint

    bundle = read_bundle(bundle_dir)
    side, cfg = load_checkpoint(sidenet_dir, kind="sidenet")
    if list(side.state_shape) != list(bundle.state_shape):
        raise CheckpointError(f"the SideNet in {sidenet_dir} is for states {list(side.state_shape)}, the bundle's "
                              f"backbone takes {list(bundle.state_shape)}")
    back = bundle.backbone.batch or (1, 16, 16)
    axes = {a: r for a, r in bundle.backbone.axes.items() if r is not None}
    inputs = [{"name": i.name, "dtype": i.dtype, "shape": list(i.shape), "per_row": i.per_row}
              for i in bundle.backbone.inputs]
    data, entry = export_sidenet(side, inputs, axes, 3 * int(back[2]))
    _io.write_bytes(Path(bundle.folder) / FILE, data)
    entry = {**file_record(Path(bundle.folder), FILE), **entry, "backbone": cfg.get("backbone"),
             "checkpoint_sha256": cfg.get("weights_sha256")}
    meta = dict(bundle.meta)
    meta["networks"] = {**meta["networks"], "sidenet": entry}
    write_bundle_json(Path(bundle.folder), meta)
    return entry
