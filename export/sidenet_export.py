"""Export a SideNet next to a diffusers or factory backbone, its conditions declared like the backbone's.

The SideNet ``delta = S(x, v, t, h, *conds)`` (BA-solver, arXiv 2601.21542; t = 1 noise, t = 0
data, h > 0 toward data; ``v_hat(t - h) = v + delta``) becomes ``sidenet.onnx`` with inputs x, v
(role state / velocity, the SideNet's fixed state shape (batch, *state)), t (time), h (offset)
and exactly the conditions its arch names (``cond_inputs``), each declared as the backbone
declares it (dtype, shape with named axes such as the text length ``L``, per_row). So the
runtime (:mod:`anchorflow.runtime.bundles.networks`) feeds it from the same ``cond`` dict as the
backbone, and a SideNet conditioned on nothing gets no conditions. Dynamic axes: ``batch``
(1 .. the rows BA's merged probes need) and the named axes of those conditions (the backbone's
ranges). Parity: onnxruntime against torch at 3 batch sizes (fp32: max abs error <= 1e-4),
refused otherwise. The stages are the one export pipeline's (:mod:`.stages`); this module declares
the SideNet's graph (:func:`sidenet_net`) and writes its bundle.json entry.

Entry point: ``anchorflow export SOURCE --sidenet CKPT --out B``, i.e.
:func:`~.adapter_export.export_adapter` with ``sidenet=`` (one bundle, written atomically, the
SideNet's backbone identity checked by the caller before any export work), which calls
:func:`write_sidenet`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import numpy as np

from ..base._deps import require
from ..base.errors import CheckpointError, ConfigError
from ..runtime.evaluation.parity import Case
from ..runtime.evaluation.parity.cases import OFFSETS
from ..runtime.solving.solvers import max_sidenet_offsets
from .stages import DEFAULT_OPSET, CaseParity, Net, export_net

FILE = "sidenet.onnx"


def sidenet_rows(guidance_mode: str, max_batch: int) -> int:
    """Most SideNet rows per call for ``max_batch`` samples: the merged BA probe's offsets x rows."""
    return (2 if guidance_mode == "rows" else 1) * max(max_sidenet_offsets(), 1) * int(max_batch)


def declaration(side: Any, backbone_inputs: list[dict]) -> list[dict]:
    """bundle.json ``inputs`` of the SideNet (see the module docstring); ``backbone_inputs`` the
    backbone's declared inputs (bundle.json's, or an adapter spec's ``inputs()``)."""
    state = ["batch", *(int(s) for s in side.state_shape)]
    decls = [{"name": "x", "dtype": "float32", "shape": state, "role": "state", "per_row": True},
             {"name": "v", "dtype": "float32", "shape": state, "role": "velocity", "per_row": True},
             {"name": "t", "dtype": "float32", "shape": ["batch"], "role": "time", "per_row": True},
             {"name": "h", "dtype": "float32", "shape": [OFFSETS, "batch"] if _shared(side) else ["batch"],
              "role": "offset", "per_row": True}]
    backbone = {i["name"]: i for i in backbone_inputs}
    for name in side.cond_inputs:
        if name not in backbone:
            raise CheckpointError(f"the SideNet is conditioned on {name!r}, which the backbone does not take "
                                  f"({', '.join(backbone)}); it belongs to another backbone")
        d = backbone[name]
        decls.append({"name": name, "dtype": d["dtype"], "shape": list(d["shape"]), "role": "condition",
                      "per_row": bool(d.get("per_row", True))})
    return decls


def _shared(side: Any) -> bool:
    """A shared-body (polynomial-offset) SideNet: h (offsets, batch) -> delta (offsets, batch, ...)."""
    return bool(getattr(side, "shared_body", False))


def _with_offsets(side: Any, axes: dict) -> dict:
    """The backbone's axes plus, for a shared-body SideNet, ``offsets`` 1..(BA's merged-probe offsets)."""
    k = max(max_sidenet_offsets(), 1)
    return {**axes, OFFSETS: (1, k, k)} if _shared(side) else dict(axes)


def _example(decls: list[dict], rows: int, sizes: dict, rng: np.random.Generator, num_classes: int) -> dict:
    out = {}
    for d in decls:
        shape = tuple(rows if a == "batch" else sizes[a] if isinstance(a, str) else int(a) for a in d["shape"])
        if d["name"] == "t":
            out["t"] = rng.random(shape).astype(np.float32)
        elif d["name"] == "h":
            out["h"] = (rng.random(shape) - (1.0 - out["t"])).astype(np.float32)  # t - h in (0, 1), either sign
        elif d["dtype"].startswith("int"):
            out[d["name"]] = rng.integers(0, max(num_classes, 1) + 1, shape).astype(d["dtype"])
        else:
            out[d["name"]] = rng.standard_normal(shape).astype(np.float32)
    return out


def sidenet_net(side: Any, decls: list[dict], axes: dict, top_rows: int, validate: bool = True) -> Net:
    """The export declaration of the SideNet: the declared inputs, a dynamic ``batch`` (1 .. ``top_rows``)
    and the named axes of its conditions; judged against torch at 1, 5 and the most rows (a shared-body
    SideNet: its anchor rows at the most offsets per row)."""
    torch = require("torch")
    dims = {"batch": torch.export.Dim("batch", min=1, max=max(top_rows, 3))}
    sizes = {}
    for d in decls:
        for a in d["shape"]:
            if isinstance(a, str) and a != "batch" and a not in dims:
                lo, opt, hi = axes[a]
                dims[a] = torch.export.Dim(a, min=lo, max=hi)
                sizes[a] = max(opt, 2) if hi >= 2 else opt  # torch.export specialises a size of 1
    classes = int(side.num_classes)
    net = Net("sidenet", side, decls, ("delta",), dims, _example(decls, 3, sizes, np.random.default_rng(0), classes),
              FILE, what="the SideNet")
    if validate:
        if _shared(side):
            sizes = {**sizes, OFFSETS: axes[OFFSETS][2]}  # parity at the most offsets per row
            top_rows = max(1, top_rows // axes[OFFSETS][2])  # anchor rows: the offsets no longer tile them
        rng = np.random.default_rng(1)
        todo = [Case("random", b, _example(decls, b, sizes, rng, classes)) for b in sorted({1, min(5, top_rows), top_rows})]
        net.parity = CaseParity("sidenet", "delta", todo, lambda f: _torch(side, decls, f), ("torch", "torch"))
    return net


def _torch(side: Any, decls: list[dict], feeds: dict) -> np.ndarray:
    torch = require("torch")
    with torch.no_grad():
        return side(*(torch.from_numpy(feeds[d["name"]]) for d in decls)).numpy()


def checkpoint_record(side: Any, path: Optional[str | Path]) -> dict:
    """What the bundle records about the SideNet checkpoint (as the checkpoint exporter does)."""
    cfg = dict(getattr(side, "checkpoint_config", None) or {})
    training = {k: v for k, v in (cfg.get("training") or {}).items() if k != "loss_log"}
    return {"path": None if path is None else str(Path(path).resolve()), "kind": "sidenet",
            "weights_sha256": cfg.get("weights_sha256"), "arch": cfg.get("arch"), "data": cfg.get("data"),
            "training": training, "backbone": cfg.get("backbone")}


def write_sidenet(side: Any, folder: Path, backbone_inputs: list[dict], axes: dict, top_rows: int,
                  validate: bool = True, path: Optional[str | Path] = None, precisions: tuple = ("fp32",),
                  opset: int = DEFAULT_OPSET) -> dict:
    """Export the SideNet (and its fp16 variant when in ``precisions``, checked against torch fp32 at
    that precision's tolerance, so ``sample --precision fp16`` finds a SideNet of the backbone's
    precision) through the export pipeline into ``folder`` (a bundle being written) -> its bundle.json
    network entry. int8 / fp8 are not made here (the SideNet stays fp32 next to a quantised backbone,
    :mod:`.quantize`).

    ``axes``: axis name -> (min, opt, max) of the backbone; ``top_rows``: most rows per call.
    """
    floats = [p for p in precisions if p not in ("int8", "fp8")]
    if "bf16" in floats:
        raise ConfigError("the SideNet exports fp32 and fp16 only: onnxruntime CPU has no bf16 kernels to check it")
    decls = declaration(side, backbone_inputs)
    axes = _with_offsets(side, axes)
    done = export_net(sidenet_net(side, decls, axes, top_rows, validate), Path(folder), opset=opset, precisions=floats)
    if _shared(side):
        top_rows = max(1, top_rows // axes[OFFSETS][2])  # anchor rows: the offsets no longer tile them
    used = {a for d in decls for a in d["shape"] if isinstance(a, str) and a != "batch"}
    out_shape = [OFFSETS, *decls[0]["shape"]] if _shared(side) else decls[0]["shape"]
    return {**done.record, "inputs": decls,
            "outputs": [{"name": "delta", "dtype": "float32", "shape": out_shape, "role": "velocity", "per_row": True}],
            "batch": {"min": 1, "opt": top_rows, "max": top_rows},
            "axes": {a: dict(zip(("min", "opt", "max"), map(int, axes[a]))) for a in sorted(used)},
            "precisions": done.variants, "validation": done.validation, "checkpoint": checkpoint_record(side, path)}
