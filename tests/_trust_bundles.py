"""Fixtures for the trust tests: bundles made by the real exporter (a factory module, the digits copy)
and a factory that would leave a marker file behind if anything ever imported or ran it."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

FACTORY = '''
import torch

class Toy(torch.nn.Module):
    """v = x * w * tau + mean_L(text), model time tau = 1 - t (flip)."""
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(0.5))
        self.b = torch.nn.Parameter(torch.linspace(0.1, 0.4, 4).reshape(1, 4, 1, 1))

    def forward(self, x, tau, text):
        return x * self.w * tau[:, None, None, None] + text.mean(1)[:, :2, None, None] + self.b[:, :2]

def make():
    spec = {"name": "toy", "state": (2, 4, 4), "axes": {"L": (1, 3, 6)},
            "conditions": [{"name": "text", "dtype": "float32", "shape": ("batch", "L", 3)}],
            "time": {"map": "flip"}, "guidance": {"mode": "rows"}}
    return Toy(), spec
'''

EVIL = '''
from pathlib import Path
Path({marker!r}).write_text("imported")

def make():
    Path({marker!r}).write_text("ran")
    raise SystemExit("evil factory ran")
'''


def write_factory(folder: Path) -> str:
    """A benign factory file; returns its ``path.py:make`` source."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "toy_factory.py").write_text(FACTORY)
    return f"{folder / 'toy_factory.py'}:make"


def write_evil(folder: Path, marker: Path) -> dict[str, str]:
    """The evil factory as a file (``/x/evil.py:make``) and as a module (``evil_mod:make``, with
    ``folder`` on sys.path); importing or calling either writes ``marker``."""
    folder.mkdir(parents=True, exist_ok=True)
    code = textwrap.dedent(EVIL.format(marker=str(marker)))
    (folder / "evil.py").write_text(code)
    (folder / "evil_mod.py").write_text(code)
    return {"file": f"{folder / 'evil.py'}:make", "module": "evil_mod:make"}


def point_source_at(bundle: Path, source: str) -> None:
    """Rewrite bundle.json's recorded backbone source (bundle.json has no hash of its own)."""
    meta = json.loads((bundle / "bundle.json").read_text())
    meta["networks"]["backbone"]["source"]["path"] = source
    (bundle / "bundle.json").write_text(json.dumps(meta, indent=2))


# -- breakages of a copy of the digits bundle, each with bundle.json's hashes updated -----------------
def _sha(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def _meta(bundle: Path) -> dict:
    return json.loads((bundle / "bundle.json").read_text())


def _save_meta(bundle: Path, meta: dict) -> None:
    (bundle / "bundle.json").write_text(json.dumps(meta, indent=2))


def rehash(bundle: Path) -> None:
    """Record the current sha256 (and size) of every file bundle.json names, as a forger would."""
    meta = _meta(bundle)
    records = []
    for entry in meta["networks"].values():
        if entry:
            records += [entry, *(entry.get("precisions") or {}).values(), *(entry.get("external_data") or [])]
    tuned = meta.get("tuned") or {}
    records += [r for r in (tuned.get("grids"), tuned.get("first_call")) if r]
    for rec in records:
        path = bundle / rec["file"]
        if path.is_file():
            rec["sha256"], rec["bytes"] = _sha(path), path.stat().st_size
    _save_meta(bundle, meta)


def swap_graphs(bundle: Path) -> None:
    """backbone.onnx and sidenet.onnx exchanged, hashes updated."""
    a, b = bundle / "backbone.onnx", bundle / "sidenet.onnx"
    data_a, data_b = a.read_bytes(), b.read_bytes()
    a.write_bytes(data_b)
    b.write_bytes(data_a)
    rehash(bundle)


def rename_declared_input(bundle: Path, old: str = "y", new: str = "label") -> None:
    """bundle.json declares another name for one input of both networks than the graphs have."""
    meta = _meta(bundle)
    for entry in meta["networks"].values():
        for i in entry["inputs"]:
            if i["name"] == old:
                i["name"] = new
    _save_meta(bundle, meta)


def zero_weights(bundle: Path, network: str = "backbone") -> None:
    """Every float weight of the fp32 graph set to 0, hashes updated (a re-export of zeroed weights)."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    path = bundle / f"{network}.onnx"
    model = onnx.load(str(path))
    for init in model.graph.initializer:
        arr = numpy_helper.to_array(init)
        if arr.dtype == np.float32:
            init.CopyFrom(numpy_helper.from_array(np.zeros_like(arr), init.name))
    onnx.save(model, str(path))
    rehash(bundle)


def external_data_at(bundle: Path, location: str, network: str = "sidenet") -> None:
    """One initializer of the fp32 graph moved to external data at ``location`` (written there when
    it is relative and inside reach), the graph's sha256 updated: onnxruntime would read it."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    path = bundle / f"{network}.onnx"
    model = onnx.load(str(path))
    init = max(model.graph.initializer, key=lambda t: int(np.prod(t.dims)) if t.data_type == 1 else 0)
    arr = numpy_helper.to_array(init)
    target = Path(location) if Path(location).is_absolute() else path.parent / location
    if not Path(location).is_absolute():
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(arr.tobytes())
    init.ClearField("raw_data")
    del init.float_data[:]
    init.data_location = onnx.TensorProto.EXTERNAL
    for k, v in (("location", location), ("offset", "0"), ("length", str(arr.nbytes))):
        entry = init.external_data.add()
        entry.key, entry.value = k, v
    onnx.save(model, str(path))
    rehash(bundle)


def symlink_out(bundle: Path, outside: Path, network: str = "sidenet") -> None:
    """The fp32 graph replaced by a symlink to an identical copy outside the bundle (hash still matches)."""
    path = bundle / f"{network}.onnx"
    outside.write_bytes(path.read_bytes())
    path.unlink()
    path.symlink_to(outside)


def edit_tuned(bundle: Path, change) -> None:
    """``change(tuned_json_dict)`` applied to tuned.json, its sha256 updated."""
    path = bundle / "tuned.json"
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))
    rehash(bundle)


def first_grid(data: dict) -> dict:
    return data["grids"][sorted(data["grids"])[0]]


def replace_first_call(bundle: Path, payload) -> None:
    """first_call.npy replaced by ``payload`` (bytes, or an array saved with pickles allowed), hash updated."""
    import numpy as np

    path = bundle / "first_call.npy"
    if isinstance(payload, bytes):
        path.write_bytes(payload)
    else:
        with open(path, "wb") as fh:
            np.save(fh, payload, allow_pickle=True)
    rehash(bundle)


def name_source(bundle: Path, source: str) -> None:
    """The backbone recorded as exported from ``source`` (a factory) instead of its checkpoint."""
    meta = _meta(bundle)
    entry = meta["networks"]["backbone"]
    entry.pop("checkpoint", None)
    entry["source"] = {"kind": "factory", "path": source, "family": "custom"}
    meta["model"]["num_classes"] = meta["model"].get("num_classes")
    _save_meta(bundle, meta)


def redeclare_input(bundle: Path, name: str, state_shape=None, **changes) -> None:
    """bundle.json declares input ``name`` of both networks with another dtype or shape than the graphs have
    (``state_shape``: model.state_shape changed to match, so only the graphs disagree)."""
    meta = _meta(bundle)
    if state_shape is not None:
        meta["model"]["state_shape"] = state_shape
    for entry in meta["networks"].values():
        for i in entry["inputs"]:
            if i["name"] == name:
                i.update(changes)
    _save_meta(bundle, meta)


def tamper(path: Path) -> None:
    """One byte of ``path`` changed and bundle.json left as it was (its sha256 no longer matches)."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def other_weights(bundle: Path) -> None:
    """The bundle recorded as exported from other weights (its identity, the key of its bandit states)."""
    meta = _meta(bundle)
    meta["networks"]["backbone"]["checkpoint"]["weights_sha256"] = "f" * 64
    _save_meta(bundle, meta)


def name_file_outside(bundle: Path, where: Path, record: str = "sidenet") -> None:
    """bundle.json names a file outside the bundle (``where``: relative to the bundle or absolute), an
    identical copy of the real one put there, so only the path is wrong (the sha256 still matches)."""
    import shutil

    meta = _meta(bundle)
    entry = meta["networks"][record] if record in meta["networks"] else meta["tuned"][record]
    target = where if where.is_absolute() else bundle / where
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(bundle / entry["file"], target)
    entry["file"] = str(where)
    _save_meta(bundle, meta)
