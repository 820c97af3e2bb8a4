"""Helpers for the robustness tests: copies of the bundled digits model, and ways to break them.

Every breakage is a real one (a flipped byte, a NaN weight in the ONNX graph with its sha256
updated, a further-trained checkpoint), applied to a copy in ``tmp_path``; the installed package
is never touched.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np

from anchorflow.modelref import BUNDLED

ROOT = BUNDLED / "digits"


def copy_root(dst: Path, parts=("bundle", "backbone", "sidenet", "classifier")) -> Path:
    """A copy of the bundled digits model root (the named sub-folders) at ``dst``."""
    dst.mkdir(parents=True, exist_ok=True)
    for part in parts:
        shutil.copytree(ROOT / part, dst / part)
    return dst


def flip_byte(path: Path, offset: int | None = None) -> None:
    """Flip one bit in the middle of ``path`` (or at ``offset``)."""
    data = bytearray(path.read_bytes())
    i = len(data) // 2 if offset is None else offset
    data[i] ^= 0x01
    path.write_bytes(bytes(data))


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def poison_onnx(bundle: Path, network: str = "backbone", value: float = float("nan")) -> None:
    """Set one weight of ``network``'s fp32 graph to ``value`` and record the new sha256, as a
    re-export of NaN weights would: the bundle passes its integrity check but computes NaN."""
    import onnx
    from onnx import numpy_helper

    meta = json.loads((bundle / "bundle.json").read_text())
    entry = meta["networks"][network]
    path = bundle / entry["file"]
    model = onnx.load(str(path))
    for init in model.graph.initializer:
        arr = numpy_helper.to_array(init)
        if arr.dtype == np.float32 and arr.size > 16:
            arr = arr.copy()
            arr.flat[0] = value
            init.CopyFrom(numpy_helper.from_array(arr, init.name))
            break
    onnx.save(model, str(path))
    entry["sha256"] = _sha(path)
    (bundle / "bundle.json").write_text(json.dumps(meta, indent=2))


def train_further(checkpoint: Path) -> None:
    """Change one weight of a checkpoint folder and record its new sha256 (as more training would)."""
    from safetensors.numpy import load_file, save_file

    weights = checkpoint / "model.safetensors"
    state = load_file(str(weights))
    name = next(k for k, v in state.items() if v.dtype == np.float32 and v.size > 1)
    state[name] = state[name] + np.float32(1e-3)
    save_file(state, str(weights))
    cfg = json.loads((checkpoint / "config.json").read_text())
    cfg["weights_sha256"] = _sha(weights)
    (checkpoint / "config.json").write_text(json.dumps(cfg, indent=2))


def snapshot(*folders: Path) -> dict[str, str]:
    """path -> sha256 of every file under ``folders`` (hidden files included)."""
    out = {}
    for folder in folders:
        if folder.is_dir():
            for p in sorted(folder.rglob("*")):
                if p.is_file():
                    out[str(p)] = _sha(p)
        elif folder.is_file():
            out[str(folder)] = _sha(folder)
    return out
