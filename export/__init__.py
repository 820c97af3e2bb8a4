"""torch -> validated ONNX bundles (extra ``[export]``): export, parity, fp16/bf16 variants, clean-up.

Nothing heavy is imported here, so ``anchorflow.export.validate`` (the parity statistics that
``anchorflow verify`` also uses on torch-free installs) imports without torch or onnx.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "export_bundle": ".bundle",
    "export_onnx": ".onnx_export",
    "BACKBONE": ".onnx_export",
    "SIDENET": ".onnx_export",
    "compare": ".validate",
    "TOLERANCES": ".validate",
    "convert": ".precision",
    "clean": ".cleanup",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = list(_LAZY)
