"""torch -> validated ONNX bundles (extra ``[export]``): export, parity, fp16/bf16 variants, clean-up.

Nothing heavy is imported here, so ``anchorflow.export.validate`` (the parity statistics that
``anchorflow verify`` also uses on torch-free installs) imports without torch or onnx.
"""

from __future__ import annotations

from .._lazy import lazy_attributes

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


__getattr__ = lazy_attributes(__name__, _LAZY)


__all__ = list(_LAZY)
